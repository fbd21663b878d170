"""The contract's container checks: Flax training states, and two models traced at once in two threads.

The contract's toy model is written twice more, as a linen module and as an NNX module, with the same
parameter values and the same leaf order (``bias``, ``dense``, ``kernel``, ``scale``), so a transformation run
through :class:`optax_second_order.flax.TrainState` or ``nnx.Optimizer`` must take the plain run's steps.
K-FAC cases get the layers Flax capture finds on each module (``oso.flax.find_layers``), not the toy's tags.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import optax_second_order as oso
from contract import (
    LEARNING_RATE,
    NUM_STEPS,
    ROUNDING_RTOL,
    ContractCase,
    Problem,
    _problem,
    _trajectory,
    assert_trees_close,
    failure_as_assertion,
    make,
    toy_problem,
)

# --- the toy model as Flax modules -------------------------------------------------------------------


class LinenToy(nn.Module):
    """The contract's toy model in linen: params ``bias``, ``dense/kernel``, ``kernel_conv/kernel``, ``scale``."""

    @nn.compact
    def __call__(self, images):
        h = nn.Conv(4, (3, 3), padding="SAME", use_bias=False, name="kernel_conv")(images)
        features = jnp.mean(jnp.tanh(h), axis=(1, 2))
        logits = nn.Dense(3, use_bias=False, name="dense")(features)
        scale = self.param("scale", nn.initializers.ones, ())
        bias = self.param("bias", nn.initializers.zeros, (3,))
        return scale * logits + bias


def linen_params(params: dict) -> dict:
    """The toy's params in :class:`LinenToy`'s layout (the same leaves, in the same order)."""
    return {
        "bias": params["bias"],
        "dense": {"kernel": params["dense"]},
        "kernel_conv": {"kernel": params["kernel"]},
        "scale": params["scale"],
    }


class NNXToy(nnx.Module):
    """The contract's toy model in NNX, holding the given parameter values."""

    def __init__(self, params: dict):
        rngs = nnx.Rngs(0)
        self.bias = nnx.Param(jnp.asarray(params["bias"]))
        self.dense = nnx.Linear(4, 3, use_bias=False, rngs=rngs)
        self.dense.kernel.set_value(jnp.asarray(params["dense"]))
        self.kernel_conv = nnx.Conv(2, 4, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.kernel_conv.kernel.set_value(jnp.asarray(params["kernel"]))
        self.scale = nnx.Param(jnp.asarray(params["scale"]))

    def __call__(self, images):
        features = jnp.mean(jnp.tanh(self.kernel_conv(images)), axis=(1, 2))
        return self.scale * self.dense(features) + self.bias


def _assert_params_follow(case: ContractCase, params_by_step: list, what: str) -> None:
    """The params after each step (any tree with the toy's leaf order) equal the plain run's."""
    for step, (leaves, expected) in enumerate(zip(params_by_step, _trajectory(case))):
        got = jax.tree.unflatten(jax.tree.structure(expected[2]), leaves)
        assert_trees_close(got, expected[2], f"{case.name} {what}: params after step {step}", rtol=1e-4)


# --- the checks -----------------------------------------------------------------------------------------


def check_linen(case: ContractCase) -> None:
    """:class:`optax_second_order.flax.TrainState` on the linen toy takes the plain run's steps."""
    problem = _problem()
    module, loss, images = LinenToy(), problem.extra["loss"], problem.inputs
    params = linen_params(problem.params)
    overrides = {}
    if case.uses_layers:
        overrides["layers"] = oso.flax.find_layers(lambda p: module.apply({"params": p}, images), params)
    tx = make(case, LEARNING_RATE, problem, **overrides)
    state = oso.flax.TrainState.create(apply_fn=module.apply, params=params, tx=tx)

    @jax.jit
    def train_step(state):
        def model_fn(p):
            return state.apply_fn({"params": p}, images)

        def value_fn(p):
            return loss(model_fn(p))

        grads = jax.grad(value_fn)(state.params)
        return state.apply_gradients(grads=grads, value_fn=value_fn, model_fn=model_fn, loss=loss)

    params_by_step = []
    with failure_as_assertion(f"{case.name} in a linen TrainState"):
        for _ in range(NUM_STEPS):
            state = train_step(state)
            params_by_step.append(jax.tree.leaves(state.params))
    _assert_params_follow(case, params_by_step, "in a linen TrainState")


def check_nnx(case: ContractCase) -> None:
    """``nnx.Optimizer`` on the NNX toy (extras from ``oso.flax.nnx_extra_args``) takes the plain run's steps."""
    problem = _problem()
    model, loss, images = NNXToy(problem.params), problem.extra["loss"], problem.inputs
    overrides = {}
    if case.uses_layers:
        model_fn = oso.flax.nnx_extra_args(model, images)["model_fn"]
        overrides["layers"] = oso.flax.find_layers(model_fn, nnx.state(model, nnx.Param))

    @nnx.jit
    def train_step(model, optimizer):
        extra = oso.flax.nnx_extra_args(model, images, loss)
        grads = nnx.grad(lambda m: loss(m(images)))(model)
        optimizer.update(model, grads, **extra)

    params_by_step = []
    with failure_as_assertion(f"{case.name} in nnx.Optimizer"):
        optimizer = nnx.Optimizer(model, make(case, LEARNING_RATE, problem, **overrides), wrt=nnx.Param)
        for _ in range(NUM_STEPS):
            train_step(model, optimizer)
            params_by_step.append(jax.tree.leaves(nnx.state(model, nnx.Param)))
    _assert_params_follow(case, params_by_step, "in nnx.Optimizer")


def _synchronized(problem: Problem, barrier: threading.Barrier) -> Problem:
    """``problem`` whose ``model_fn`` waits at ``barrier`` on each call, so two threads trace it at the same time."""
    model_fn = problem.extra["model_fn"]
    loss = problem.extra["loss"]

    def synchronized(params):
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass  # the other thread made fewer calls: no overlap to force any more
        return model_fn(params)

    return problem._replace(extra={"model_fn": synchronized, "value_fn": lambda p: loss(synchronized(p)), "loss": loss})


def _run_steps(case: ContractCase, problem: Problem) -> list:
    """``NUM_STEPS`` steps of a fresh jitted training step (traced in the calling thread): the params after each."""
    tx = make(case, LEARNING_RATE, problem, **_layers_override(case, problem))
    extra = problem.extra

    @jax.jit
    def step(params, state):
        grads = jax.grad(extra["value_fn"])(params)
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    params, state, out = problem.params, tx.init(problem.params), []
    for _ in range(NUM_STEPS):
        params, state = step(params, state)
        out.append(params)
    return out


def _layers_override(case: ContractCase, problem: Problem) -> dict[str, Any]:
    if not case.uses_layers:
        return {}
    return {"layers": oso.kronecker.find_layers(problem.extra["model_fn"], problem.params)}


def check_threads(case: ContractCase, run: Callable = _run_steps) -> None:
    """Two models (the toy on two data sets) built, traced and run at once in two threads, each ``model_fn``
    call of one meeting the other's, take the steps each takes alone: capture state is not shared."""
    problems = [toy_problem(0), toy_problem(1)]
    alone = [run(case, problem) for problem in problems]
    barrier = threading.Barrier(2, timeout=20)
    results: list = [None, None]

    def worker(i):
        try:
            results[i] = run(case, _synchronized(problems[i], barrier))
        except Exception as error:  # reported below, in the test's thread
            results[i] = error
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, (together, by_itself) in enumerate(zip(results, alone)):
        if isinstance(together, Exception):
            raise AssertionError(f"{case.name}: model {i} failed when traced at the same time as another: {together!r}")
        for step, (a, b) in enumerate(zip(together, by_itself)):
            # float32: the synchronized model_fn is another program, rounded its own way (contract.ROUNDING_RTOL)
            assert_trees_close(a, b, f"{case.name}: model {i} traced beside another, params after step {step}",
                               rtol=ROUNDING_RTOL)


FLAX_CHECKS = {"linen": check_linen, "nnx": check_nnx, "threads": check_threads}
