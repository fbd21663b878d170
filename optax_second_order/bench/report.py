"""Summaries of a benchmark run: best-of-grid rows, the markdown table, the JSON record and the plots.

For each task and optimizer, the *best* learning rate is the one with the lowest final eval loss averaged
over seeds (a diverged run counts as ``inf``). Its row reports that mean final loss, the median over seeds
of the steps and seconds to the target loss (resolved to the evaluation interval; ``n/k`` marks that only
``n`` of ``k`` seeds reached it), the mean held-out accuracy, and the step time: the median, over all of the
optimizer's runs on the task, of each run's median step time, also as a ratio to the reference optimizer's
(``adam``) measured in the same run, and the mean step time over those runs (amortized work included), also as a
ratio to the reference's mean. Tail latency: the median over the optimizer's runs of each run's slowest step
(after the first, which pays one-time work in every optimizer), as a ratio to the reference's median step.
Compile time: the jitted step's (once per task and optimizer), and its ratio to the reference's.

The target loss of a task is, by ``target``:

* ``"adam"`` (default): the reference optimizer's best-of-grid final loss in the same run, so "steps to
  target" reads "steps to match Adam's final loss";
* ``"task"``: the task's own default (:attr:`Task.target`);
* a number: that loss for every task.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import defaultdict
from typing import Any, Sequence

import numpy as np

from optax_second_order.bench.optimizers import REFERENCE
from optax_second_order.bench.runner import RunResult
from optax_second_order.bench.tasks import Task

__all__ = ["Row", "best_runs", "target_losses", "summarize", "markdown", "write_json", "plot", "plot_all"]


@dataclasses.dataclass
class Row:
    """The best-of-grid summary of one optimizer on one task."""

    optimizer: str
    learning_rate: float
    final_loss: float
    steps_to_target: float | None
    seconds_to_target: float | None
    reached: int
    seeds: int
    accuracy: float | None
    step_time: float
    step_time_ratio: float | None
    mean_step_time: float
    mean_step_ratio: float | None = None
    slowest_step_time: float | None = None
    slowest_step_ratio: float | None = None
    compile_time: float | None = None
    compile_ratio: float | None = None
    state_ratio: float | None = None
    hlo_ops: int | None = None
    kernels: int | None = None


def _by(results: Sequence[RunResult], *keys: str) -> dict[tuple, list[RunResult]]:
    groups: dict[tuple, list[RunResult]] = defaultdict(list)
    for r in results:
        groups[tuple(getattr(r, k) for k in keys)].append(r)
    return groups


def _mean_final(runs: Sequence[RunResult]) -> float:
    finals = [r.final_loss if math.isfinite(r.final_loss) else math.inf for r in runs]
    return float(np.mean(finals))


def best_runs(results: Sequence[RunResult], task: str, optimizer: str) -> list[RunResult]:
    """The runs (one per seed) of the learning rate with the lowest mean final loss."""
    grid = _by([r for r in results if r.task == task and r.optimizer == optimizer], "learning_rate")
    return min(grid.values(), key=_mean_final)


def target_losses(results: Sequence[RunResult], tasks: Sequence[Task], target: str | float) -> dict[str, float | None]:
    """The target loss of every task (see the module docstring for ``target``)."""
    targets: dict[str, float | None] = {}
    for task in tasks:
        if target == REFERENCE:
            ran = any(r.task == task.name and r.optimizer == REFERENCE for r in results)
            targets[task.name] = _mean_final(best_runs(results, task.name, REFERENCE)) if ran else None
        elif target == "task":
            targets[task.name] = task.target
        else:
            targets[task.name] = float(target)
    return targets


def _median_step_time(results: Sequence[RunResult], task: str, optimizer: str) -> float:
    return float(np.median([r.step_time for r in results if r.task == task and r.optimizer == optimizer]))


def _mean_step_time(results: Sequence[RunResult], task: str, optimizer: str) -> float:
    return float(np.mean([r.mean_step_time for r in results if r.task == task and r.optimizer == optimizer]))


def _slowest_step_time(results: Sequence[RunResult], task: str, optimizer: str) -> float | None:
    times = [r.max_step_time for r in results if r.task == task and r.optimizer == optimizer]
    times = [t for t in times if t is not None and math.isfinite(t)]
    return float(np.median(times)) if times else None


def _compile_time(results: Sequence[RunResult], task: str, optimizer: str) -> float | None:
    """The compile time of the step (runs that reused the executable record 0)."""
    times = [r.compile_time for r in results if r.task == task and r.optimizer == optimizer and r.compile_time > 0]
    return float(np.max(times)) if times else None


def _op_count(results: Sequence[RunResult], task: str, optimizer: str, field: str) -> int | None:
    """``hlo_ops`` or ``kernels`` of the step (the same for every run of one executable; 0: not measured)."""
    counts = [getattr(r, field) for r in results if r.task == task and r.optimizer == optimizer and getattr(r, field)]
    return int(max(counts)) if counts else None


def _ratio(value: float | None, reference: float | None) -> float | None:
    return value / reference if value is not None and reference else None


def summarize(results: Sequence[RunResult], targets: dict[str, float | None]) -> dict[str, list[Row]]:
    """Best-of-grid rows per task, in the order the optimizers ran."""
    summary: dict[str, list[Row]] = {}
    for (task,), task_runs in _by(results, "task").items():
        has_reference = any(r.optimizer == REFERENCE for r in task_runs)
        reference = _median_step_time(task_runs, task, REFERENCE) if has_reference else None
        reference_mean = _mean_step_time(task_runs, task, REFERENCE) if has_reference else None
        reference_compile = _compile_time(task_runs, task, REFERENCE) if has_reference else None
        rows = []
        for optimizer in dict.fromkeys(r.optimizer for r in task_runs):
            runs = best_runs(task_runs, task, optimizer)
            target = targets.get(task)
            hits = [h for h in (r.first_reaching(target) for r in runs) if h] if target is not None else []
            accuracies = [r.accuracy for r in runs if r.accuracy is not None]
            step_time = _median_step_time(task_runs, task, optimizer)
            mean_step_time = _mean_step_time(task_runs, task, optimizer)
            slowest = _slowest_step_time(task_runs, task, optimizer)
            compile_time = _compile_time(task_runs, task, optimizer)
            rows.append(
                Row(
                    optimizer=optimizer,
                    learning_rate=runs[0].learning_rate,
                    final_loss=_mean_final(runs),
                    steps_to_target=float(np.median([h[0] for h in hits])) if hits else None,
                    seconds_to_target=float(np.median([h[1] for h in hits])) if hits else None,
                    reached=len(hits),
                    seeds=len(runs),
                    accuracy=float(np.mean(accuracies)) if accuracies else None,
                    step_time=step_time,
                    step_time_ratio=step_time / reference if reference else None,
                    mean_step_time=mean_step_time,
                    mean_step_ratio=_ratio(mean_step_time, reference_mean),
                    slowest_step_time=slowest,
                    slowest_step_ratio=_ratio(slowest, reference),
                    compile_time=compile_time,
                    compile_ratio=_ratio(compile_time, reference_compile),
                    state_ratio=runs[0].state_ratio,
                    hlo_ops=_op_count(task_runs, task, optimizer, "hlo_ops"),
                    kernels=_op_count(task_runs, task, optimizer, "kernels"),
                )
            )
        summary[task] = rows
    return summary


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def _to_target(value: float | None, row: Row, spec: str) -> str:
    text = _fmt(value, spec)
    return text if row.reached in (0, row.seeds) else f"{text} ({row.reached}/{row.seeds})"


def markdown(summary: dict[str, list[Row]], tasks: Sequence[Task], targets: dict[str, float | None]) -> str:
    """One table per task."""
    descriptions = {t.name: t.description for t in tasks}
    lines = ["# Benchmark results", ""]
    for task, rows in summary.items():
        lines += [f"## {task}", "", descriptions.get(task, ""), "", f"Target loss: {_fmt(targets.get(task), '.4g')}", ""]
        lines += [
            f"| optimizer | best lr | final loss | steps to target | s to target | held-out acc | step ms | x {REFERENCE} "
            f"| mean step ms | mean x {REFERENCE} | slowest x {REFERENCE} median | compile s | compile x {REFERENCE} "
            f"| HLO ops | state / params |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            lines.append(
                f"| {row.optimizer} | {row.learning_rate:g} | {_fmt(row.final_loss, '.4g')} "
                f"| {_to_target(row.steps_to_target, row, '.0f')} | {_to_target(row.seconds_to_target, row, '.2f')} "
                f"| {_fmt(row.accuracy, '.3f')} | {_fmt(1e3 * row.step_time, '.2f')} | {_fmt(row.step_time_ratio, '.2f')} "
                f"| {_fmt(1e3 * row.mean_step_time, '.2f')} | {_fmt(row.mean_step_ratio, '.2f')} "
                f"| {_fmt(row.slowest_step_ratio, '.1f')} | {_fmt(row.compile_time, '.1f')} | {_fmt(row.compile_ratio, '.2f')} "
                f"| {_fmt(row.hlo_ops, 'd')} | {_fmt(row.state_ratio, '.2f')} |"
            )
        lines.append("")
    return "\n".join(lines)


def _finite(x: Any) -> Any:
    """JSON has no inf/nan: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_json(path: str, config: dict, results: Sequence[RunResult], summary: dict[str, list[Row]], targets) -> None:
    record = {
        "config": config,
        "targets": targets,
        "summary": {task: [dataclasses.asdict(r) for r in rows] for task, rows in summary.items()},
        "runs": [dataclasses.asdict(r) for r in results],
    }
    with open(path, "w") as f:
        json.dump(_finite(record), f, indent=1)


def _mean_curve(runs: Sequence[RunResult]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps, seconds and losses averaged over seeds, up to the shortest run (a diverged run stops early)."""
    n = min(len(r.steps) for r in runs)
    return (
        np.asarray(runs[0].steps[:n]),
        np.mean([r.seconds[:n] for r in runs], axis=0),
        np.mean([r.losses[:n] for r in runs], axis=0),
    )


_LOG_FLOOR = 1e-16
"""Losses of exactly 0 (Rosenbrock solved in float64) are drawn at this floor on the log scale."""


def plot(results: Sequence[RunResult], task: str, path: str, target: float | None = None) -> None:
    """Eval loss vs step and vs seconds of each optimizer's best learning rate, one PNG per task.

    The loss axis is logarithmic when no loss is negative (values below 1e-16 are drawn at 1e-16).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(13, 4.2))
    optimizers = dict.fromkeys(r.optimizer for r in results if r.task == task)
    log_scale = all(l >= 0 for r in results if r.task == task for l in r.losses if math.isfinite(l))
    for i, optimizer in enumerate(optimizers):
        runs = best_runs(results, task, optimizer)
        steps, seconds, losses = _mean_curve(runs)
        if log_scale:
            losses = np.maximum(losses, _LOG_FLOOR)
        label = f"{optimizer} (lr={runs[0].learning_rate:g}{', diverged' if all(r.diverged for r in runs) else ''})"
        style = ("-", "--", ":")[i // 10 % 3]  # the 10 default colours, then the next line style
        by_step.plot(steps, losses, style, label=label)
        by_time.plot(seconds, losses, style, label=label)
    for ax, xlabel in ((by_step, "step"), (by_time, "seconds (timed steps)")):
        if target is not None and math.isfinite(target):
            ax.axhline(target, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("eval loss")
        if log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(task)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(results: Sequence[RunResult], targets: dict[str, float | None], out: str) -> list[str]:
    """:func:`plot` for every task, into ``out/<task>.png``; returns the paths."""
    paths = []
    for task in dict.fromkeys(r.task for r in results):
        path = os.path.join(out, f"{task.replace(':', '_')}.png")
        plot(results, task, path, targets.get(task))
        paths.append(path)
    return paths
