"""A/B timing of the benchmark's step: this checkout's library against the one at a git revision, in one process.

``python -m optax_second_order.bench ab --rev REV --tasks T --optimizers A,B`` compiles the benchmark's jitted step
(:func:`~optax_second_order.bench.runner.make_step`, learning rate the first of each optimizer's grid) for every
optimizer with this checkout's package, then with the package as it was at ``REV`` (``git archive`` into a temporary
folder, imported in place of this one), plus Adam's step once; then steps all of them round-robin, ``--repeats``
rounds of 20 steps each on the task's batches, and prints each step's median and mean time (ms) and the mean as a
ratio to Adam's.

Why: on a shared CPU the same step's time moves by 25% between two runs of the benchmark (and Adam's with it, so
every ratio); compiled side by side and interleaved, the two versions meet the same load, so a change of a few
percent shows. Only ``optax_second_order`` is taken from ``REV``; everything else (JAX, optax) is this environment's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["main", "package_at"]

_PACKAGE = "optax_second_order"
_STEPS_PER_ROUND = 20


def package_at(rev: str, folder: str) -> str:
    """Extracts ``optax_second_order/`` as of git revision ``rev`` of the checkout this package is in into
    ``folder``; returns ``folder`` (to put first on ``sys.path``)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True,
                              cwd=here).stdout.strip()
        archive = subprocess.run(["git", "archive", rev, _PACKAGE], capture_output=True, check=True, cwd=root).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise SystemExit(f"ab: needs the package in a git checkout and a revision of it ({rev!r}): {error}") from error
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return folder


def _compiled_steps(task_name: str, names: Sequence[str], tag: str) -> dict[str, list]:
    """``{"<name> <tag>": [compiled step, params, state, batches]}`` with the currently imported package."""
    from optax_second_order.bench import runner, tasks
    from optax_second_order.bench.optimizers import OPTIMIZERS

    task = tasks.get_task(task_name)
    steps = {}
    for name in names:
        spec = OPTIMIZERS[name]
        tx = spec.make(spec.learning_rates[0], task)
        params = task.init(jax.random.key(0))
        state = jax.tree.map(jnp.copy, tx.init(params))  # donatable
        batches = task.batches(0)
        compiled = runner.make_step(task, tx, spec.hvp).lower(params, state, next(batches)).compile()
        steps[f"{name} {tag}"] = [compiled, params, state, batches]
    return steps


def _forget_package() -> None:
    for module in [m for m in sys.modules if m == _PACKAGE or m.startswith(_PACKAGE + ".")]:
        del sys.modules[module]


def _round_robin(steps: dict[str, list], repeats: int, clock=time.perf_counter) -> dict[str, np.ndarray]:
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for name, entry in steps.items():
            compiled, params, state, batches = entry
            for _ in range(_STEPS_PER_ROUND):
                batch = next(batches)
                jax.block_until_ready(batch)
                start = clock()
                params, state, _ = compiled(params, state, batch)
                jax.block_until_ready((params, state))
                times[name].append(clock() - start)
            entry[1], entry[2] = params, state
    return {k: 1e3 * np.asarray(v[1:]) for k, v in times.items()}


def main(rev: str, task_names: Sequence[str], names: Sequence[str], repeats: int,
         clock: str = "wall") -> dict[str, dict[str, float]]:
    """Prints and returns ``{task: {"<optimizer> <version>": mean ms}}`` (version ``tree`` or ``rev``).

    ``clock="process"`` times each step by the process's CPU time (``time.process_time``, every thread) instead of the
    wall clock: on a machine shared with other jobs, time spent descheduled then does not count (pin the process to
    one core, ``taskset -c 0``, so that XLA's threads do not spin on a second one)."""
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        package_at(rev, folder)
        for task_name in task_names:
            steps = _compiled_steps(task_name, ["adam", *names], "tree")
            sys.path.insert(0, folder)
            _forget_package()
            try:
                import optax_second_order as at_rev

                if not os.path.abspath(at_rev.__file__).startswith(os.path.abspath(folder)):
                    raise RuntimeError(f"ab: imported {at_rev.__file__}, not the package at {rev}")
                steps.update(_compiled_steps(task_name, names, rev))
            finally:
                sys.path.remove(folder)
                _forget_package()
            times = _round_robin(steps, repeats, time.process_time if clock == "process" else time.perf_counter)
            adam = times["adam tree"].mean()
            print(f"{task_name}: {repeats} rounds of {_STEPS_PER_ROUND} steps, round-robin, {clock} clock")
            for name, t in times.items():
                print(f"  {name:32s} median {np.median(t):8.2f} ms  mean {t.mean():8.2f} ms  mean x adam {t.mean() / adam:5.2f}")
            results[task_name] = {name: float(t.mean()) for name, t in times.items()}
    return results
