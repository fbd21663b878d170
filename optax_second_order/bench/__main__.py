"""Command line: ``python -m optax_second_order.bench [run|primitives|...] [flags]`` (also ``oso-bench``).

``run`` (the default) runs tasks x optimizers x learning rates x seeds and writes, under ``--out``:
``results.json`` (every run's curves and the summary), ``results.md`` (the table, also printed) and one
``<task>.png`` per task. ``primitives`` times curvature products against the gradient (see
:mod:`optax_second_order.bench.primitives`). ``newton-rosenbrock``, ``newton-grid`` and ``newton-cost`` count the Newton
family's evaluations to ``||g|| < 1e-6`` on Rosenbrock beside scipy, run its methods over a learning-rate x damping
grid counting non-finite steps, and time one CG iteration against a gradient; ``newton-kl`` measures the KL divergence
one natural-gradient step realizes against its budget (see :mod:`optax_second_order.bench.newton`).
``scale`` measures the state bytes per device, the step time and the collectives' bytes of Adam, Shampoo and SOAP
with sharded state on 1, 2, 4 and 8 simulated host devices (see :mod:`optax_second_order.bench.scale`).
``quasi-newton`` counts iterations and evaluations of the line-search methods on deterministic problems (see
:mod:`optax_second_order.bench.quasi_newton`). ``ab`` times the step of ``--optimizers`` on ``--tasks`` (default
``digits-autoencoder``) with this checkout's library against the one at ``--rev``, in one process (see
:mod:`optax_second_order.bench.ab`).

The default run is kept small so that it finishes in a few minutes on 2 CPU cores with every registered
optimizer: the tasks in :data:`DEFAULT_TASKS` at their default step budgets, one seed, each optimizer's
3-point learning-rate grid. Other tasks (``--tasks all``), longer budgets and more seeds are flags.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from typing import Sequence

import jax

from optax_second_order.bench import primitives, report
from optax_second_order.bench.optimizers import OPTIMIZERS, REFERENCE
from optax_second_order.bench.runner import run_grid
from optax_second_order.bench.tasks import TASKS, get_task, npz_task

__all__ = ["DEFAULT_TASKS", "main", "parse_args", "run_benchmark"]

DEFAULT_TASKS = ("digits-mlp", "rosenbrock-2")
"""Tasks of the default run (``make demo``): the cheap ones; ``--tasks all`` runs every task."""


def _names(text: str, known: Sequence[str], what: str) -> list[str]:
    if text == "all":
        return list(known)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known and not (what == "task" and n.endswith(".npz"))]
    if unknown:
        raise SystemExit(f"unknown {what}(s) {unknown}; choose from {sorted(known)} or 'all'")
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="oso-bench", description="Benchmark the optimizers (run) or time the curvature primitives (primitives)."
    )
    parser.add_argument(
        "command", nargs="?", default="run",
        choices=("run", "primitives", "scale", "newton-rosenbrock", "newton-grid", "newton-cost", "newton-kl",
                 "quasi-newton", "ab"),
        help="default: run",
    )
    parser.add_argument("--tasks", default=None, help=f"comma list or 'all' (default: {','.join(DEFAULT_TASKS)})")
    parser.add_argument("--optimizers", default="all", help=f"comma list or 'all'; {REFERENCE} is always added")
    parser.add_argument("--steps", type=int, default=None, help="step budget for every task (default: per task)")
    parser.add_argument("--seeds", type=int, default=1, help="number of seeds, 0..N-1 (default 1)")
    parser.add_argument("--lrs", default=None, help="one learning-rate grid for every optimizer, e.g. 1e-2,1e-3")
    parser.add_argument("--out", default="bench_results", help="output directory (default bench_results/)")
    parser.add_argument("--target", default=REFERENCE,
                        help=f"'{REFERENCE}' (its best final loss, default), 'task' (per-task default) or a number")
    parser.add_argument("--data", default=None, help="a .npz with arrays x and y: adds an MLP task on it")
    parser.add_argument("--evaluations", type=int, default=50, help="eval-loss measurements per run")
    parser.add_argument("--repeats", type=int, default=20,
                        help="primitives: timed repeats per product; ab: rounds of 20 steps (5 give a first look)")
    parser.add_argument("--rev", default="HEAD", help="ab: the git revision to time this checkout against")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="ab: time steps by the wall clock, or by the process's CPU time (all threads; steadier "
                        "on a loaded machine, with the process pinned to one core: taskset -c 0)")
    args = parser.parse_args(argv)
    if args.target not in (REFERENCE, "task"):
        try:
            args.target = float(args.target)
        except ValueError:
            parser.error(f"--target must be '{REFERENCE}', 'task' or a number, got {args.target!r}")
    return args


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not available on this platform
        return None


def _environment() -> dict:
    """Where the run ran: versions, the device, the threading settings that change CPU timings, the load."""
    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        # OpenBLAS runs XLA:CPU's eigh, QR and Cholesky; its threads compete with XLA's (docs/benchmark.md)
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "load_average": _load_average(),
    }


def _blas_threads() -> dict[str, int]:
    """``{library file: threads}`` of the BLAS libraries loaded (scipy's runs XLA:CPU's LAPACK calls; the library limits
    it to one thread unless ``OPENBLAS_NUM_THREADS`` is set, ``curvature/threads.py``)."""
    import threadpoolctl

    return {os.path.basename(i["filepath"]): i["num_threads"] for i in threadpoolctl.threadpool_info()
            if i["user_api"] == "blas"}


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="run", file=sys.stderr)


def run_benchmark(args: argparse.Namespace) -> dict[str, str]:
    """Runs the grid, writes the JSON, markdown and plots, prints the table; returns the written paths."""
    if args.tasks is None:
        task_names = [] if args.data else list(DEFAULT_TASKS)
    else:
        task_names = _names(args.tasks, list(TASKS), "task")
    tasks = [get_task(n) for n in task_names] + ([npz_task(args.data)] if args.data else [])
    names = _names(args.optimizers, list(OPTIMIZERS), "optimizer")
    if REFERENCE not in names:
        names.insert(0, REFERENCE)
    optimizers = {n: OPTIMIZERS[n] for n in names}
    lrs = [float(v) for v in args.lrs.split(",")] if args.lrs else None

    environment = _environment()
    results = run_grid(tasks, optimizers, range(args.seeds), args.steps, lrs, args.evaluations, _progress)
    environment["load_average_after"] = _load_average()
    environment["blas_threads_after"] = _blas_threads()
    targets = report.target_losses(results, tasks, args.target)
    summary = report.summarize(results, targets)
    table = report.markdown(summary, tasks, targets)

    os.makedirs(args.out, exist_ok=True)
    paths = {"json": os.path.join(args.out, "results.json"), "markdown": os.path.join(args.out, "results.md")}
    config = {k: v for k, v in vars(args).items() if k != "repeats"}
    report.write_json(paths["json"], {**config, "environment": environment}, results, summary, targets)
    with open(paths["markdown"], "w") as f:
        f.write(table)
    for i, path in enumerate(report.plot_all(results, targets, args.out)):
        paths[f"plot{i}"] = path
    print(table)
    print("wrote " + ", ".join(paths.values()))
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "primitives":
        primitives.main(args.out, args.repeats, _environment())
    elif args.command == "scale":  # sharded state on 1, 2, 4, 8 host devices
        from optax_second_order.bench import scale

        tasks = _names(args.tasks, list(TASKS), "task") if args.tasks else scale.TASKS
        scale.main(args.out, tasks, steps=args.steps or scale.STEPS)
    elif args.command in ("newton-rosenbrock", "newton-grid", "newton-cost", "newton-kl"):  # bench/newton.py
        from optax_second_order.bench import newton

        newton.main(args.command, args.repeats)
    elif args.command == "ab":  # this checkout's step against the one at --rev, in one process
        from optax_second_order.bench import ab

        tasks = _names(args.tasks or "digits-autoencoder", list(TASKS), "task")
        names = [n for n in _names(args.optimizers, list(OPTIMIZERS), "optimizer") if n != REFERENCE]
        ab.main(args.rev, tasks, names, args.repeats, args.clock)
    elif args.command == "quasi-newton":  # evaluations to a tolerance on deterministic problems
        from optax_second_order.bench import quasi_newton

        quasi_newton.main(args.out)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
