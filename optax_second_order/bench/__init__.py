"""The benchmark harness: tasks on bundled data, an optimizer registry, a runner, tables and plots.

``python -m optax_second_order.bench`` (or ``oso-bench``) runs it; see ``docs/benchmark.md``.
"""

from optax_second_order.bench.optimizers import OPTIMIZERS, REFERENCE, OptimizerSpec
from optax_second_order.bench.tasks import TASKS, Task, get_task, npz_task

__all__ = ["OPTIMIZERS", "REFERENCE", "OptimizerSpec", "TASKS", "Task", "get_task", "npz_task"]
