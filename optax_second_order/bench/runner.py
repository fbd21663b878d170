"""Run tasks x optimizers x learning rates x seeds, under one protocol.

Protocol, for every run:

1. ``params = task.init(jax.random.key(seed))``, minibatches from ``task.batches(seed)``, the transformation
   from ``spec.make(learning_rate, task)``.
2. One jitted step computes ``value, grad = value_and_grad(value_fn)(params)`` on the minibatch and calls
   ``tx.update(grad, state, params, value_fn=, model_fn=, loss=, value=, grad=)`` -- every optimizer gets the
   same extras and ignores the ones it does not use. For an entry with ``hvp=True`` the gradient comes from
   ``oso.grad_and_hvp_fn`` instead, and ``hvp_fn`` is passed too. The transformation is built by
   ``spec.make(learning_rate, task)`` with ``task.seed`` set to the run's seed. Params and state are donated (``donate_argnums=(0, 1)``),
   as in a tuned training loop, so the step updates them in place instead of copying every state array;
   the initial state is copied leaf by leaf first, so that each leaf owns its buffer even where an
   ``init`` puts one array in two fields (``optax.lbfgs``).
3. The step is compiled ahead of time, once per (task, optimizer): the learning rate is a hyperparameter in
   the optimizer state (``optax.inject_hyperparams``), so the grid and the seeds share one executable (an
   optimizer that cannot take a traced learning rate is compiled once per learning rate instead). Compile
   time is recorded, not counted. Every step is timed with ``jax.block_until_ready``; the batch is fetched
   before the clock starts. ``seconds`` is the sum of the timed steps, ``step_time`` their median,
   ``mean_step_time`` their mean (which, unlike the median, includes amortized work such as a root computed
   every 10 steps) and ``max_step_time`` the slowest after the first (``first_step_time``: the first call also
   pays one-time work, such as SOAP's first eigenbases); ``step_times`` lists them all.
4. The loss on ``task.eval_batch`` (the fixed batch the task reports on) is measured at step 0, every
   ``eval_every`` steps and at the end, outside the clock. A non-finite loss stops the run (``diverged``).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_second_order.curvature.products import grad_and_hvp_fn

from optax_second_order.bench.optimizers import OptimizerSpec
from optax_second_order.bench.tasks import Batch, Task

__all__ = ["RunResult", "make_step", "run_one", "run_grid", "state_bytes_ratio", "hlo_op_count", "compiled_kernel_count"]


@dataclasses.dataclass
class RunResult:
    """One (task, optimizer, learning rate, seed) run. Curves are sampled at the evaluation steps."""

    task: str
    optimizer: str
    learning_rate: float
    seed: int
    steps: list[int]
    seconds: list[float]
    losses: list[float]
    final_loss: float
    accuracy: float | None
    step_time: float
    mean_step_time: float
    compile_time: float
    diverged: bool
    max_step_time: float = float("nan")
    first_step_time: float = float("nan")
    step_times: list[float] = dataclasses.field(default_factory=list)
    state_ratio: float = float("nan")  # the optimizer state's bytes over the parameters' bytes
    hlo_ops: int = 0  # operations in the step's StableHLO program (hlo_op_count); 0: not measured
    kernels: int = 0  # work instructions of the compiled step's entry computation (compiled_kernel_count)

    def first_reaching(self, target: float) -> tuple[int, float] | None:
        """``(step, seconds)`` of the first evaluation with loss <= ``target``, or ``None``."""
        for step, seconds, loss in zip(self.steps, self.seconds, self.losses):
            if loss <= target:
                return step, seconds
        return None


def make_step(task: Task, tx: optax.GradientTransformation, hvp: bool = False) -> Callable:
    """``step(params, state, batch) -> (params, state, value)``, passing every extra argument to ``tx``.

    With ``hvp`` the gradient comes from :func:`~optax_second_order.grad_and_hvp_fn` and ``hvp_fn`` is passed too.
    Jitted with ``params`` and ``state`` donated: the caller must not use them after the call.
    """

    def step(params, state, batch: Batch):
        inputs, targets = batch
        loss = task.loss(targets)

        def model_fn(p):
            return task.apply(p, inputs)

        def value_fn(p):
            return loss(model_fn(p))

        extra = {}
        if hvp:
            value, grad, extra["hvp_fn"] = grad_and_hvp_fn(value_fn, params, return_value=True)
        else:
            value, grad = jax.value_and_grad(value_fn)(params)
        updates, state = tx.update(
            grad, state, params, value_fn=value_fn, model_fn=model_fn, loss=loss, value=value, grad=grad, **extra
        )
        return optax.apply_updates(params, updates), state, value

    return jax.jit(step, donate_argnums=(0, 1))


def _accuracy(apply, params, inputs, labels):
    return jnp.mean(jnp.argmax(apply(params, inputs), axis=-1) == labels)


class _Evaluator:
    """Jitted loss on the task's eval batch and held-out accuracy, compiled once per task."""

    def __init__(self, task: Task):
        self.task = task
        self._loss = jax.jit(task.batch_loss)
        self._accuracy = jax.jit(_accuracy, static_argnums=0)

    def loss(self, params) -> float:
        return float(self._loss(params, self.task.eval_batch))

    def accuracy(self, params) -> float | None:
        if self.task.heldout is None:
            return None
        return float(self._accuracy(self.task.apply, params, *self.task.heldout))


def _injected(spec: OptimizerSpec, task: Task, learning_rate: float) -> optax.GradientTransformation:
    """``spec.make(learning_rate, task)`` with the learning rate kept in the state as an array (the seed, in
    ``task.seed``, only reaches ``init``: every seed shares the compiled step)."""
    return optax.inject_hyperparams(lambda learning_rate: spec.make(learning_rate, task))(learning_rate=learning_rate)


def _own_buffers(state):
    """A copy of ``state`` in which every leaf has a buffer of its own, so that it can be donated."""
    return jax.tree.map(jnp.copy, state)


_STABLEHLO_OP = re.compile(r'^\s*(?:%[^=]*=\s*)?"?(?:stablehlo|chlo|mhlo|sdy)\.\w+', re.MULTILINE)
_NO_WORK = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}


def hlo_op_count(lowered) -> int:
    """The number of operations in a lowered step's StableHLO program (``jax.jit(step).lower(...).as_text()``): what
    XLA is given to compile, so what compile time grows with.

    Every ``stablehlo`` / ``chlo`` operation in the module is counted once where it is written: a loop body
    (``lax.scan``, ``fori_loop``) or a function called several times counts once, while a Python loop over leaves or
    layers, which the trace unrolls, counts once per iteration. Constants and region terminators
    (``stablehlo.return``) count; ``func.call`` and ``return`` do not.
    """
    return len(_STABLEHLO_OP.findall(lowered.as_text()))


def compiled_kernel_count(compiled) -> int:
    """The work instructions (fusions, dots, custom calls, copies, loops...; not parameters, constants, tuples or
    bitcasts) of a compiled step's entry computation (``.compile().as_text()``): about the number of kernels XLA
    launches per step, outside loop bodies."""
    text = compiled.as_text()
    entry = text[text.index("\nENTRY"):] if "\nENTRY" in text else text
    entry = entry.split("\n}", 1)[0]
    ops = re.findall(r"^\s*(?:ROOT\s+)?%\S+ = \S+ ([\w-]+)\(", entry, re.MULTILINE)
    return sum(1 for op in ops if op not in _NO_WORK)


@dataclasses.dataclass
class _Compiled:
    step: Callable
    hlo_ops: int
    kernels: int


def _compile(task: Task, tx: optax.GradientTransformation, params, state, batch, hvp: bool) -> tuple[_Compiled, float]:
    start = time.perf_counter()
    lowered = make_step(task, tx, hvp).lower(params, state, batch)
    step = lowered.compile()
    seconds = time.perf_counter() - start
    return _Compiled(step, hlo_op_count(lowered), compiled_kernel_count(step)), seconds


def run_one(
    task: Task,
    name: str,
    spec: OptimizerSpec,
    learning_rate: float,
    seed: int,
    steps: int,
    eval_every: int,
    evaluator: _Evaluator | None = None,
    compiled: dict | None = None,
) -> RunResult:
    """One run under the protocol of this module (call inside ``jax.enable_x64(task.x64)``).

    ``compiled`` caches the step executable per (task, optimizer) across calls; ``compile_time`` is
    0 for a run that reused one.
    """
    evaluator = evaluator or _Evaluator(task)
    compiled = {} if compiled is None else compiled
    task = dataclasses.replace(task, seed=seed)  # spec.make passes the run's seed to optimizers that take one
    params = task.init(jax.random.key(seed))
    batches = task.batches(seed)
    batch = next(batches)
    key = (task.name, name)
    compile_time = 0.0
    if compiled.get(key) is not False:
        try:
            tx = _injected(spec, task, learning_rate)
            state = _own_buffers(tx.init(params))
            if key not in compiled:
                compiled[key], compile_time = _compile(task, tx, params, state, batch, spec.hvp)
        except Exception as error:  # e.g. a learning rate used as a Python number; real errors recur below
            print(f"{name}: no traced learning rate ({type(error).__name__}: {error}); compiling once per rate")
            compiled[key] = False
    if compiled[key] is False:
        tx = spec.make(learning_rate, task)
        state = _own_buffers(tx.init(params))
        executable, compile_time = _compile(task, tx, params, state, batch, spec.hvp)
    else:
        executable = compiled[key]
    step = executable.step

    curve_steps, curve_seconds, curve_losses, step_times = [0], [0.0], [evaluator.loss(params)], []
    diverged = not np.isfinite(curve_losses[0])
    for t in range(1, steps + 1):
        if diverged:
            break
        jax.block_until_ready(batch)
        start = time.perf_counter()
        params, state, _ = step(params, state, batch)
        jax.block_until_ready((params, state))
        step_times.append(time.perf_counter() - start)
        if t % eval_every == 0 or t == steps:
            loss = evaluator.loss(params)
            curve_steps.append(t)
            curve_seconds.append(float(np.sum(step_times)))
            curve_losses.append(loss)
            diverged = not np.isfinite(loss)
        batch = next(batches)
    return RunResult(
        task=task.name,
        optimizer=name,
        learning_rate=learning_rate,
        seed=seed,
        steps=curve_steps,
        seconds=curve_seconds,
        losses=curve_losses,
        final_loss=float("inf") if diverged else curve_losses[-1],
        accuracy=None if diverged else evaluator.accuracy(params),
        step_time=float(np.median(step_times)) if step_times else float("nan"),
        mean_step_time=float(np.mean(step_times)) if step_times else float("nan"),
        compile_time=compile_time,
        diverged=diverged,
        max_step_time=float(np.max(step_times[1:] or step_times)) if step_times else float("nan"),
        first_step_time=float(step_times[0]) if step_times else float("nan"),
        step_times=[float(t) for t in step_times],
        state_ratio=state_bytes_ratio(state, params),
        hlo_ops=executable.hlo_ops,
        kernels=executable.kernels,
    )


def state_bytes_ratio(state, params) -> float:
    """The bytes of every array of the optimizer state over the parameters' bytes (as stored: a quantized or
    low-precision array counts at its own size; the learning rate ``inject_hyperparams`` keeps is a few bytes)."""
    def size(tree):
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))

    return size(state) / size(params)


def run_grid(
    tasks: Sequence[Task],
    optimizers: dict[str, OptimizerSpec],
    seeds: Sequence[int],
    steps: int | None = None,
    learning_rates: Sequence[float] | None = None,
    evaluations: int = 50,
    progress: Callable[[Iterable], Any] | None = None,
) -> list[RunResult]:
    """Every task x optimizer x learning rate x seed.

    Args:
      steps: the step budget for every task (default: each task's own ``task.steps``).
      learning_rates: one grid for every optimizer (default: each optimizer's ``learning_rates``).
      evaluations: about how many times the eval loss is measured per run.
      progress: ``progress(total=...)`` returning a tqdm-like bar (``update``, ``set_postfix_str``).
    """
    jobs = [
        (task, name, spec, lr, seed)
        for task in tasks
        for name, spec in optimizers.items()
        for lr in (learning_rates or spec.learning_rates)
        for seed in seeds
    ]
    bar = progress(total=len(jobs)) if progress else None
    evaluators: dict[str, _Evaluator] = {}
    compiled: dict = {}
    results = []
    for task, name, spec, lr, seed in jobs:
        if bar is not None:
            bar.set_postfix_str(f"{task.name} {name} lr={lr:g} seed={seed}")
        budget = steps or task.steps
        with jax.enable_x64(task.x64):
            evaluator = evaluators.setdefault(task.name, _Evaluator(task))
            eval_every = max(1, budget // evaluations)
            results.append(run_one(task, name, spec, lr, seed, budget, eval_every, evaluator, compiled))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return results
