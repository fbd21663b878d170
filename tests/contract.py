"""The contract every gradient transformation of this library passes.

A family registers its transformations in its own ``tests/cases_<family>.py``::

    from contract import ContractCase

    CASES = [
        ContractCase("sophia-h", oso.sophia, dict(estimator="hutchinson"), needs=("value_fn",), inject="rho"),
    ]

A case names the *alias itself* (a function of ``learning_rate`` and keyword hyperparameters, as a user calls
it) and the keyword arguments it is built with; ``uses_layers`` adds ``layers=`` found on the problem's model
(K-FAC). ``tests/test_contract.py`` runs every check below on every case:

* ``jit``: a few steps of ``tx.update`` under ``jax.jit``; the loss stays finite, updates have the
  params' shapes and dtypes, and the state keeps its tree structure, shapes and dtypes;
* ``leaves``: every leaf of the problem (a scalar, a vector, a matrix and a rank-4 leaf) moves and stays finite;
* ``chain``: the first update of ``optax.chain(optax.clip_by_global_norm(c), tx)`` equals ``tx``'s on
  gradients clipped by hand, and the chain runs a few jitted steps;
* ``inject_hyperparams``: ``optax.inject_hyperparams(alias)(learning_rate=lr, **kwargs)`` -- the alias itself,
  every numeric argument (defaults included) then an array, traced in ``update`` -- runs the plain alias's
  first steps, in float32 to the hyperparameters' rounding (``case.inject_rtol``); setting the case's ``inject``
  hyperparameter in ``state.hyperparams`` gives the steps of the alias built with that value; halving the injected
  learning rate halves the update;
* ``checkpoint``: params and state survive an orbax round trip and the run then continues
  bit-for-bit like an uninterrupted one;
* ``apply_if_finite``: under ``optax.apply_if_finite`` a step with NaN/Inf gradients is skipped,
  and the next finite step is bit-for-bit the one the skipped step would have been followed by;
* ``bf16``: with bfloat16 params the updates come back bfloat16 and finite;
* ``donate``: a few steps of ``jax.jit(step, donate_argnums=(0, 1))`` over fresh params and the state of an
  eager ``tx.init`` (as a Flax ``TrainState`` builds it), each step fed the previous step's outputs, run,
  stay finite and give the results of the same step jitted without donation, to 16 ulps -- so no two
  leaves of params and state may share a buffer (e.g. one ``jnp.zeros`` in two fields, or ``params``
  itself kept in the state);
* ``nonfinite`` (this library's cases): a step with NaN/Inf gradients and a step with the loss scaled by
  ``1e20`` (its float32 gradient is finite, squares are not) give finite, bounded updates and a finite state; the
  NaN/Inf step is counted in a ``nonfinite`` field of the state; the run then continues with finite steps;
* ``masked`` (this library's cases): ``optax.masked(tx, mask)`` with one leaf masked out, ``value_fn`` /
  ``model_fn`` on the whole tree and ``full_params=params``, updates the other leaves exactly as the
  transformation does on the problem where the masked leaf is a constant, and passes the masked leaf's gradient
  through; without ``full_params`` (the step still passing ``value_fn`` and the others), a case that needs no extra
  argument traces as it does with it, and one that needs some raises a ``TypeError`` naming ``full_params``;
* ``empty_tree`` / ``zero_size``: as optax takes them, an empty parameter tree ``{}`` (the update is ``{}``), and two
  leaves of shape ``(0, 3)``, one the kernel of a tagged dense layer on zero input features, beside a tagged dense
  layer and a vector (their updates have their shapes, the others move): two jitted steps each, on problems small
  enough to compile quickly; the state keeps its signature and stays finite;
* ``missing_extra``: for each name in ``needs``, an update without it raises a ``TypeError`` or
  ``ValueError`` whose message names the argument and the transformation, and an update given
  only the names in ``needs`` works;
* ``linen`` / ``nnx`` / ``threads`` (``contract_flax.py``): the same model written as a linen module in
  :class:`optax_second_order.flax.TrainState` and as an NNX module in ``nnx.Optimizer`` (K-FAC through the layers
  Flax capture finds) takes the plain run's steps; two models traced at once in two threads each take their own (cases with
  ``uses_layers``: layer capture is the only state a trace keeps).

"Names the transformation" means: the message contains the case name up to its first ``-``, ``[``,
``(``, ``:`` or space, compared without case and underscores (case ``"sophia_h-clip"`` is matched by
``scale_by_sophia_h: update() needs ...``).

The update must be linear in ``learning_rate`` on the first steps (the usual final
``optax.scale_by_learning_rate``). Every update receives all extra arguments of the problem (``value_fn``,
``model_fn``, ``loss``); a transformation ignores the ones it does not use.

Precision: the checks run in float32 with x64 off (``tests/test_contract.py`` turns it off around every test, as
users run), so hyperparameters injected as arrays are float32 and nothing is promoted; only ``masked``, a comparison
of two programs that must agree to their rounding, turns x64 on around itself (``jax.enable_x64``).

Run one family's cases with ``CONTRACT_CASES=cases_<family> pytest tests/test_contract.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_second_order as oso
from optax_second_order.curvature import losses
from optax_second_order.transforms.common import EXTRA_ARGS

LEARNING_RATE = 1e-2
NUM_STEPS = 3
# Two float32 programs that compute the same steps apart (XLA fuses, and so rounds, each its own way), e.g. the
# injected alias, which gets its hyperparameters as float32 arrays where the plain one folds Python floats into the
# program: each hyperparameter differs by up to half an ulp (u / 2, u = 1.19e-7) and enters the step through
# differences such as 1 - b2 (0.05 for b2 = 0.95: 20 u relative) and bias corrections. optax.adam needs 3.4e-6 (28 u)
# on the toy's first two steps, K-FAC's threads check 2.3e-6; 250 u leaves a margin of 8 (issue 23, item 1).
ROUNDING_RTOL = 250 * float(np.finfo(np.float32).eps)


class Problem(NamedTuple):
    """A toy problem: ``params``, the extra arguments ``value_fn``, ``model_fn``, ``loss``, and the model's ``inputs``.

    The gradients are ``jax.grad(extra["value_fn"])(params)``.
    """

    params: Any
    extra: dict[str, Any]
    inputs: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class ContractCase:
    """One transformation under contract (hashed by identity, so compiled pieces are cached per case).

    Attributes:
      name: unique id, shown in the test ids; its leading word names the transformation.
      alias: the ready optimizer, ``alias(learning_rate=..., **kwargs) -> GradientTransformation``.
      kwargs: the keyword arguments the case is built with.
      needs: the extra arguments the transformation requires (subset of ``value_fn``, ``model_fn``, ``loss``).
      inject: a numeric hyperparameter of ``alias`` that the ``inject_hyperparams`` check changes through the
        state (besides the learning rate), and ``injected_value``, the value it is changed to.
      uses_layers: pass ``layers=`` (the dense and conv layers Flax capture finds on the problem's model).
      static_args: ``static_args`` for ``optax.inject_hyperparams`` (structural arguments of a peer's alias).
      library: whether the case is one of this library's transformations, which the ``nonfinite`` and ``masked``
        checks hold to the library's policies (optax's own transformations propagate NaN by design).
      inject_rtol: the ``inject_hyperparams`` check's tolerance, in float32 (:data:`ROUNDING_RTOL`, unless the case
        states why its steps amplify rounding more).
      donate_ulps: the ``donate`` check's tolerance in ulps (16, unless the case states why its steps amplify the
        rounding of two separately compiled programs more).
    """

    name: str
    alias: Callable[..., optax.GradientTransformation]
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    needs: tuple[str, ...] = ()
    inject: str | None = None
    injected_value: float = 0.5
    uses_layers: bool = False
    static_args: tuple[str, ...] = ()
    library: bool = True
    inject_rtol: float = ROUNDING_RTOL
    donate_ulps: int = 16


def toy_params(rng: np.random.Generator) -> dict[str, jax.Array]:
    return {
        "bias": jnp.zeros(3, jnp.float32),
        "dense": jnp.asarray(0.5 * rng.standard_normal((4, 3)), jnp.float32),
        "kernel": jnp.asarray(0.3 * rng.standard_normal((3, 3, 2, 4)), jnp.float32),
        "scale": jnp.asarray(1.0, jnp.float32),
    }


def toy_model(params, images):
    """``scale * mean_hw(tanh(conv(x, kernel))) @ dense + bias``, with the conv and dense layers tagged for capture."""
    x = images.astype(params["kernel"].dtype)
    features = jnp.mean(jnp.tanh(oso.kronecker.conv(x, params["kernel"], padding="SAME")), axis=(1, 2))
    return params["scale"] * oso.kronecker.dense(features, params["dense"]) + params["bias"]


@functools.cache
def toy_problem(seed: int = 0) -> Problem:
    """A tiny conv net on 8 random 5x5x2 images, 3 classes, softmax cross-entropy.

    ``logits = scale * mean_hw(tanh(conv(x, kernel))) @ dense + bias`` uses a scalar (``scale``), a
    vector (``bias``), a matrix (``dense``) and a rank-4 leaf (``kernel``, HWIO); its conv and dense layers are
    tagged (K-FAC preconditions them; ``scale`` and ``bias`` fall back). The model computes in the params'
    dtype, the loss in float32. Data come from NumPy, so building it compiles nothing. ``seed`` gives other
    data and initial values of the same shapes.
    """
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((8, 5, 5, 2)).astype(np.float32)
    loss = losses.softmax_cross_entropy(rng.integers(0, 3, 8).astype(np.int32))
    params = toy_params(rng)

    def model_fn(params):
        return toy_model(params, images)

    def value_fn(params):
        return loss(model_fn(params))

    return Problem(params, {"value_fn": value_fn, "model_fn": model_fn, "loss": loss}, images)


def cast_params(problem: Problem, dtype) -> Problem:
    """The same problem with its floating-point params cast to ``dtype`` (the bf16 variant)."""
    def cast(x):
        x = np.asarray(x)
        return jnp.asarray(x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x)

    return problem._replace(params=jax.tree.map(cast, problem.params))


def make(case: ContractCase, learning_rate, problem: Problem, wrapper: Callable | None = None, **overrides):
    """``case.alias(learning_rate, **case.kwargs, **overrides)`` (through ``wrapper(alias)`` if given), with
    ``layers=`` found on ``problem`` when the case uses them."""
    kwargs = dict(case.kwargs, **overrides)
    if case.uses_layers and "layers" not in kwargs:
        kwargs["layers"] = _layers(problem)
    alias = case.alias if wrapper is None else wrapper(case.alias)
    return alias(learning_rate=learning_rate, **kwargs)


_LAYERS: dict[int, Any] = {}


def _layers(problem: Problem):
    """The layers Flax capture finds on ``problem`` (the toy's tags), once per (cached, long-lived) problem."""
    if id(problem) not in _LAYERS:
        _LAYERS[id(problem)] = oso.flax.find_layers(problem.extra["model_fn"], problem.params)
    return _LAYERS[id(problem)]


# ----------------------------------------------------------------------------------------------
# Compiled pieces, cached per process so that the checks of one case share their compilations.
# Everything outside them is NumPy, which compiles nothing.


@functools.cache
def _problem(dtype: str = "native") -> Problem:
    return toy_problem() if dtype == "native" else cast_params(toy_problem(), jnp.dtype(dtype))


@functools.cache
def _value_and_grad(dtype: str = "native"):
    return jax.jit(jax.value_and_grad(_problem(dtype).extra["value_fn"]))


@functools.cache
def _reduced_value_and_grad():
    return jax.jit(jax.value_and_grad(_problem_without(MASKED_LEAF).extra["value_fn"]))


class _Stepper(NamedTuple):
    """A transformation with its jitted ``init`` and ``step(grads, state, params) -> (updates, state, params)``."""

    tx: optax.GradientTransformation
    init: Callable
    step: Callable


def _stepper(tx: optax.GradientTransformation, extra: dict[str, Any]) -> _Stepper:
    def step(grads, state, params):
        updates, state = tx.update(grads, state, params, **extra)
        return updates, state, optax.apply_updates(params, updates)

    return _Stepper(tx, jax.jit(tx.init), jax.jit(step))


@functools.cache
def _plain(case: ContractCase, dtype: str = "native") -> _Stepper:
    """``make(case, LEARNING_RATE)`` on the problem."""
    problem = _problem(dtype)
    return _stepper(make(case, LEARNING_RATE, problem), problem.extra)


def _run(stepper, params, state, num_steps, dtype="native"):
    """``num_steps`` steps from ``(params, state)``: the list of ``(loss, updates, params, state)``.

    ``dtype`` names the problem whose gradients are taken (``"reduced"``: the masked check's problem).
    """
    value_and_grad = _reduced_value_and_grad() if dtype == "reduced" else _value_and_grad(dtype)
    trajectory = []
    for _ in range(num_steps):
        value, grads = value_and_grad(params)
        updates, state, params = stepper.step(grads, state, params)
        trajectory.append((value, updates, params, state))
    return trajectory


@functools.cache
def _trajectory(case: ContractCase, dtype: str = "native"):
    stepper = _plain(case, dtype)
    params = _problem(dtype).params
    return _run(stepper, params, stepper.init(params), NUM_STEPS, dtype)


# ----------------------------------------------------------------------------------------------
# Tree assertions, in NumPy.


@contextlib.contextmanager
def failure_as_assertion(what: str):
    """Any exception inside becomes an ``AssertionError`` saying ``what`` failed (a check fails, not errors)."""
    try:
        yield
    except AssertionError:
        raise
    except Exception as error:
        raise AssertionError(f"{what} failed: {type(error).__name__}: {error}") from error


def _arrays(tree) -> list[np.ndarray]:
    """Leaves as NumPy arrays (typed PRNG keys as their key data)."""
    def as_array(x):
        if jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return [as_array(x) for x in jax.tree.leaves(tree)]


def _paths(tree) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _signature(tree):
    return jax.tree.structure(tree), [(np.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(tree)]


def _is_finite(x: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(x.astype(np.float64)))) if np.issubdtype(x.dtype, np.inexact) else True


def _norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(x.astype(np.float64))) for x in _arrays(tree))))


def assert_trees_bitwise_equal(a, b, what: str) -> None:
    """Same structure, same dtypes, and the same bits (NaN equals NaN)."""
    assert jax.tree.structure(a) == jax.tree.structure(b), f"{what}: tree structures differ"
    for x, y in zip(_arrays(a), _arrays(b)):
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}"
        np.testing.assert_array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8), err_msg=what)


def assert_trees_close(actual, expected, what: str, rtol: float) -> None:
    """Leafwise ``|actual - expected| <= rtol * (|expected| + max|expected leaf|)``, in float64."""
    for path, x, y in zip(_paths(expected), _arrays(actual), _arrays(expected), strict=True):
        x, y = x.astype(np.float64), y.astype(np.float64)
        atol = rtol * np.max(np.abs(y), initial=0.0)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=f"{what} {path}")


def assert_like_params(updates, params, what: str) -> None:
    """``updates`` has the structure, shapes and dtypes of ``params``, and is finite."""
    assert jax.tree.structure(updates) == jax.tree.structure(params), f"{what}: updates' tree differs from params'"
    for path, u, p in zip(_paths(params), _arrays(updates), _arrays(params)):
        assert u.shape == p.shape and u.dtype == p.dtype, f"{what} {path}: update {u.dtype}{u.shape}, param {p.dtype}{p.shape}"
        assert _is_finite(u), f"{what} {path}: non-finite values"


# ----------------------------------------------------------------------------------------------
# The checks.


def check_jit(case: ContractCase) -> None:
    """A few jitted steps: finite loss, updates shaped and typed like params, a stable state."""
    stepper = _plain(case)
    params = _problem().params
    init_signature = _signature(stepper.init(params))
    for step, (value, updates, new_params, state) in enumerate(_trajectory(case)):
        assert _is_finite(np.asarray(value)), f"{case.name}: loss {value} at step {step}"
        assert_like_params(updates, params, f"{case.name} step {step}")
        assert_like_params(new_params, params, f"{case.name} params after step {step}")
        assert _signature(state) == init_signature, (
            f"{case.name}: the state's structure, shapes or dtypes changed at step {step} "
            "(breaks lax.scan and checkpoints)"
        )


def check_leaves(case: ContractCase) -> None:
    """Every leaf (scalar, vector, matrix, rank-4 in the default problem) moves and stays finite."""
    start = _problem().params
    end = _trajectory(case)[-1][2]
    for path, p0, p1 in zip(_paths(start), _arrays(start), _arrays(end)):
        assert _is_finite(p1), f"{case.name} {path}: non-finite after {NUM_STEPS} steps"
        assert np.any(p1 != p0), f"{case.name} {path} (shape {p0.shape}): never updated in {NUM_STEPS} steps"


def check_chain(case: ContractCase) -> None:
    """``chain(clip_by_global_norm(c), tx)``: its first update is ``tx``'s on gradients clipped by
    hand, and it runs a few jitted steps with finite updates and a stable state."""
    problem = _problem()
    grads = _value_and_grad()(problem.params)[1]
    norm = _norm(grads)
    max_norm = norm / 2
    chained = _stepper(
        optax.chain(optax.clip_by_global_norm(max_norm), make(case, LEARNING_RATE, problem)), problem.extra
    )
    state = chained.init(problem.params)
    init_signature = _signature(state)

    plain = _plain(case)
    clipped = jax.tree.map(lambda g: (np.asarray(g, np.float64) * (max_norm / norm)).astype(g.dtype), grads)
    reference = plain.step(clipped, plain.init(problem.params), problem.params)[0]
    for step, (_, updates, _, state) in enumerate(_run(chained, problem.params, state, NUM_STEPS)):
        if step == 0:
            assert_trees_close(updates, reference, f"{case.name}: chained vs hand-clipped first update", rtol=1e-4)
        assert_like_params(updates, problem.params, f"{case.name} in a chain, step {step}")
        assert _signature(state) == init_signature, f"{case.name}: the chain's state changed at step {step}"


def _two_steps(stepper: _Stepper, state, dtype: str) -> list:
    """The updates of the first two steps from the problem's params and ``state``."""
    return [updates for _, updates, _, _ in _run(stepper, _problem(dtype).params, state, 2, dtype)]


def check_inject_hyperparams(case: ContractCase) -> None:
    """``optax.inject_hyperparams(alias)`` takes the plain alias's steps, also with ``case.inject`` changed in
    the state; halving the injected learning rate halves the update.

    Compared in float32, as users run it, to ``case.inject_rtol`` (the hyperparameters' float32 rounding; see
    :data:`ROUNDING_RTOL`). It ran in float64 until issue 23: in float32 SOAP picked the basis of a degenerate
    eigenspace by rounding, and its injected alias differed from the plain one by 0.23 of the update.
    """
    dtype = "native"
    problem = _problem(dtype)
    inject = functools.partial(optax.inject_hyperparams, static_args=case.static_args)
    injected = _stepper(make(case, LEARNING_RATE, problem, inject), problem.extra)
    with failure_as_assertion(f"{case.name} under optax.inject_hyperparams"):
        state = injected.init(problem.params)
        got = _two_steps(injected, state, dtype)
    assert "learning_rate" in state.hyperparams, f"{case.name}: learning_rate is not an injectable hyperparameter"
    assert _norm(got) > 0, f"{case.name}: zero updates"
    plain = _plain(case, dtype)
    expected = _two_steps(plain, plain.init(problem.params), dtype)
    for step, (updates, reference) in enumerate(zip(got, expected)):
        assert_trees_close(updates, reference, f"{case.name}: injected vs plain update, step {step}",
                           rtol=case.inject_rtol)

    if case.inject is not None:
        assert case.inject in state.hyperparams, f"{case.name}: {case.inject} is not an injectable hyperparameter"
        value = np.asarray(case.injected_value, np.asarray(state.hyperparams[case.inject]).dtype)
        with failure_as_assertion(f"{case.name} with {case.inject} changed in the injected state"):
            changed = _two_steps(injected, state._replace(hyperparams=dict(state.hyperparams, **{case.inject: value})), dtype)
        other = _stepper(make(case, LEARNING_RATE, problem, **{case.inject: case.injected_value}), problem.extra)
        reference = _two_steps(other, other.init(problem.params), dtype)
        for step, (updates, want) in enumerate(zip(changed, reference)):
            assert_trees_close(
                updates, want, f"{case.name}: {case.inject}={case.injected_value} set in the injected state, step {step}",
                rtol=case.inject_rtol,
            )
        assert any(_norm(jax.tree.map(np.subtract, a, b)) > 0 for a, b in zip(expected, changed)), (
            f"{case.name}: changing {case.inject} to {case.injected_value} changed nothing; choose another value"
        )

    grads = _value_and_grad(dtype)(problem.params)[1]
    updates = injected.step(grads, state, problem.params)[0]
    halved_lr = np.asarray(state.hyperparams["learning_rate"]) / 2
    halved_state = state._replace(hyperparams=dict(state.hyperparams, learning_rate=halved_lr))
    halved = injected.step(grads, halved_state, problem.params)[0]
    expected = jax.tree.map(lambda u: np.asarray(u) / 2, updates)
    assert_trees_close(halved, expected, f"{case.name}: halving the learning rate should halve the update", rtol=1e-5)


def _as_host_array(x):
    """A restored array as NumPy (typed PRNG keys as they are): no device placement, so the jitted
    step sees the same kind of input as before the round trip and is not compiled again."""
    return x if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else np.asarray(x)


def check_checkpoint(case: ContractCase, directory) -> None:
    """Params and state saved with orbax after 2 steps, restored, then 2 more steps: bit-for-bit."""
    import orbax.checkpoint as ocp

    plain = _plain(case)
    params = _problem().params
    _, _, params, state = _run(plain, params, plain.init(params), 2)[-1]
    uninterrupted = _run(plain, params, state, 2)

    checkpointer = ocp.StandardCheckpointer()
    path = (directory / re.sub(r"[^A-Za-z0-9_.-]", "_", case.name)).absolute()
    checkpointer.save(path, {"params": params, "state": state})
    checkpointer.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "state": state})
    restored = jax.tree.map(_as_host_array, checkpointer.restore(path, target))
    checkpointer.close()
    assert_trees_bitwise_equal(restored["state"], state, f"{case.name}: restored state")

    resumed = _run(plain, restored["params"], restored["state"], 2)
    for step, (a, b) in enumerate(zip(resumed, uninterrupted)):
        assert_trees_bitwise_equal(a[1:], b[1:], f"{case.name}: resumed run differs at step {step}")


def _poisoned(grads):
    """``grads`` with a NaN as the first entry of the first leaf and an Inf as the last of the last."""
    leaves = [np.array(g) for g in jax.tree.leaves(grads)]
    leaves[0].reshape(-1)[0] = np.nan
    leaves[-1].reshape(-1)[-1] = np.inf
    return jax.tree.unflatten(jax.tree.structure(grads), leaves)


def check_apply_if_finite(case: ContractCase) -> None:
    """A NaN/Inf step under ``apply_if_finite`` is skipped; the next finite step is unaffected."""
    problem = _problem()
    guarded = _stepper(
        optax.apply_if_finite(make(case, LEARNING_RATE, problem), max_consecutive_errors=3), problem.extra
    )
    _, _, params, state = _run(guarded, problem.params, guarded.init(problem.params), 1)[-1]

    skipped, bad_state, _ = guarded.step(_poisoned(_value_and_grad()(params)[1]), state, params)
    assert not bool(bad_state.last_finite), f"{case.name}: NaN/Inf gradients gave finite updates"
    assert all(np.all(u == 0) for u in _arrays(skipped)), f"{case.name}: the skipped step moved params"

    after_bad = _run(guarded, params, bad_state, 1)[-1]
    reference = _run(guarded, params, state, 1)[-1]
    assert_like_params(after_bad[1], params, f"{case.name} after a NaN step")
    assert_trees_bitwise_equal(after_bad[1], reference[1], f"{case.name}: update after a skipped NaN step")
    assert_trees_bitwise_equal(
        after_bad[3].inner_state, reference[3].inner_state, f"{case.name}: state after a skipped NaN step"
    )


def check_bf16(case: ContractCase) -> None:
    """bfloat16 params: a few jitted steps give bfloat16, finite updates and params."""
    params = _problem("bfloat16").params
    for step, (value, updates, new_params, _) in enumerate(_trajectory(case, "bfloat16")):
        assert _is_finite(np.asarray(value)), f"{case.name} bf16: loss {value} at step {step}"
        assert_like_params(updates, params, f"{case.name} bf16 step {step}")
        assert_like_params(new_params, params, f"{case.name} bf16 params after step {step}")


def _training_step(tx: optax.GradientTransformation, extra: dict[str, Any]) -> Callable:
    """``step(params, state) -> (loss, params, state)``: gradient and update in one step, as in a training loop."""
    value_and_grad = jax.value_and_grad(extra["value_fn"])

    def step(params, state):
        value, grads = value_and_grad(params)
        updates, state = tx.update(grads, state, params, **extra)
        return value, optax.apply_updates(params, updates), state

    return step


def _shared_buffers(tree) -> list[list[str]]:
    """Groups of leaf paths that hold the same array object (so the same buffer)."""
    groups: dict[int, list[str]] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if isinstance(leaf, jax.Array):
            groups.setdefault(id(leaf), []).append(jax.tree_util.keystr(path))
    return [paths for paths in groups.values() if len(paths) > 1]


def _snapshot(tree):
    """A NumPy copy of ``tree`` (typed PRNG keys as their key data), which outlives donated buffers."""
    return jax.tree.unflatten(jax.tree.structure(tree), [np.array(x, copy=True) for x in _arrays(tree)])


def _training_run(case: ContractCase, donate: bool) -> list:
    """``NUM_STEPS`` steps of the jitted training step from fresh params and an eager ``tx.init``."""
    problem = _problem()
    tx = make(case, LEARNING_RATE, problem)
    step = jax.jit(_training_step(tx, problem.extra), donate_argnums=(0, 1) if donate else ())
    params = jax.tree.map(jnp.copy, problem.params)
    state = tx.init(params)
    trajectory = []
    for index in range(NUM_STEPS):
        shared = _shared_buffers((params, state))
        try:
            outputs = step(params, state)
        except Exception as error:
            raise AssertionError(
                f"{case.name}: step {index} ({'donated' if donate else 'kept'} params and state) failed; "
                f"leaves sharing one buffer (as (params, state)): {shared}; {error}"
            ) from error
        trajectory.append(_snapshot(outputs))
        _, params, state = outputs
    return trajectory


def assert_trees_equal_to_ulps(a, b, what: str, max_ulps: int) -> None:
    """Same structure and dtypes; integers equal, floats within ``max_ulps`` units in the last place (NaN at the
    same places)."""
    assert jax.tree.structure(a) == jax.tree.structure(b), f"{what}: tree structures differ"
    for x, y in zip(_arrays(a), _arrays(b)):
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}"
        if not jnp.issubdtype(x.dtype, jnp.floating):  # jnp knows bfloat16
            np.testing.assert_array_equal(x, y, err_msg=what)
            continue
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y), err_msg=what)
        finite = ~np.isnan(x)
        ulps = _ulp_distance(x[finite], y[finite])
        assert not ulps.size or ulps.max() <= max_ulps, f"{what}: {ulps.max()} ulps of {x.dtype} apart (> {max_ulps})"


def _ulp_distance(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Units in the last place between floats of one dtype, counted in that dtype (bfloat16 too, which NumPy's
    ``assert_array_max_ulp`` refuses): the distance of their bit patterns mapped to ordered integers."""
    bits = np.dtype(f"int{8 * x.dtype.itemsize}")

    def ordered(v):
        i = np.ascontiguousarray(v).view(bits).astype(np.int64)
        return np.where(i < 0, np.iinfo(bits).min - i, i)

    return np.abs(ordered(x) - ordered(y))


def check_donate(case: ContractCase) -> None:
    """``jax.jit(step, donate_argnums=(0, 1))`` over (params, state) runs, stays finite and matches the
    same step without donation (run second, so it also fails if an ``init`` handed out an array that outlives it,
    such as a module-level constant, and the donated run deleted it).

    Within 16 ulps (``case.donate_ulps``), not bit for bit: XLA compiles the two programs apart, and the buffer aliasing of the donated one
    may change its fusions and so their rounding (SOAP's bias moved by one ulp at step 2; in float32 EK-FAC's
    eigenbasis solve carried one fusion's rounding to 5 ulps at step 2); a donation bug (a buffer read after it was
    overwritten) moves numbers by far more."""
    donated = _training_run(case, donate=True)
    kept = _training_run(case, donate=False)
    for index, (a, b) in enumerate(zip(donated, kept)):
        finite = all(_is_finite(x) for x in jax.tree.leaves(a[:2]))
        assert finite, f"{case.name}: non-finite loss or params at step {index}"
        assert_trees_equal_to_ulps(a, b, f"{case.name}: donated vs kept buffers, step {index}",
                                   max_ulps=case.donate_ulps)


def _transform_word(name: str) -> str:
    return re.split(r"[-\[(:\s]", name)[0].lower().replace("_", "")


def check_missing_extra(case: ContractCase) -> None:
    """Without a needed extra argument: a TypeError/ValueError naming it and the transformation.

    Traced with ``jax.eval_shape`` only: nothing is compiled or run.
    """
    unknown = set(case.needs) - set(EXTRA_ARGS)
    assert not unknown, f"{case.name}: needs lists unknown extra arguments {sorted(unknown)}"
    problem = _problem()
    tx = make(case, LEARNING_RATE, problem)
    state = jax.eval_shape(tx.init, problem.params)

    def trace_update(extra):
        return jax.eval_shape(lambda g, s, p: tx.update(g, s, p, **extra), problem.params, state, problem.params)

    try:
        trace_update({name: problem.extra[name] for name in case.needs})
    except (TypeError, ValueError) as error:
        raise AssertionError(f"{case.name}: update() given only {case.needs} failed; needs more? {error}") from error
    for name in case.needs:
        try:
            trace_update({k: v for k, v in problem.extra.items() if k != name})
        except (TypeError, ValueError) as error:
            message = str(error)
        except Exception as error:
            raise AssertionError(f"{case.name}: update() without `{name}` raised {error!r}, not a TypeError/ValueError")
        else:
            raise AssertionError(f"{case.name}: update() without `{name}` raised no TypeError/ValueError")
        assert name in message, f"{case.name}: the error without `{name}` does not name it: {message!r}"
        word = _transform_word(case.name)
        assert word in message.lower().replace("_", ""), (
            f"{case.name}: the error without `{name}` does not name the transformation ({word!r}): {message!r}"
        )


def _nonfinite_count(state) -> int:
    """The sum of every ``nonfinite`` field of the (possibly chained and wrapped) state."""
    total = 0
    if hasattr(state, "_fields"):
        if "nonfinite" in state._fields:
            total += int(np.asarray(state.nonfinite))
        return total + sum(_nonfinite_count(getattr(state, f)) for f in state._fields if f != "nonfinite")
    if isinstance(state, (tuple, list)):
        return sum(_nonfinite_count(x) for x in state)
    if isinstance(state, dict):
        return sum(_nonfinite_count(x) for x in state.values())
    return 0


def check_nonfinite(case: ContractCase) -> None:
    """NaN/Inf and overflowing gradients: finite, bounded updates, a finite state, the bad step counted, and the
    run goes on."""
    if not case.library:
        return
    problem, plain = _problem(), _plain(case)
    _, _, params, state = _run(plain, problem.params, plain.init(problem.params), 1)[-1]
    grads = _value_and_grad()(params)[1]
    bound = 1e3 * (_norm(plain.step(grads, state, params)[0]) + LEARNING_RATE)
    # the loss scaled by 1e20: its gradient (and value_fn) in float32 are finite, their squares are not
    value_fn = problem.extra["value_fn"]
    scaled = _stepper(plain.tx, dict(problem.extra, value_fn=lambda p: 1e20 * value_fn(p)))
    overflowing = jax.tree.map(lambda g: (np.asarray(g, np.float64) * 1e20).astype(g.dtype), grads)
    for what, bad, stepper in (("NaN/Inf gradients", _poisoned(grads), plain),
                               ("the loss scaled by 1e20", overflowing, scaled)):
        with failure_as_assertion(f"{case.name} with {what}"):
            updates, new_state, new_params = stepper.step(bad, state, params)
        assert_like_params(updates, params, f"{case.name} with {what}")
        assert _norm(updates) <= bound, f"{case.name} with {what}: update of norm {_norm(updates)} > {bound}"
        for path, x in zip(_paths(new_state), _arrays(new_state)):
            assert _is_finite(x), f"{case.name} with {what}: state leaf {path} is not finite"
        if what.startswith("NaN"):
            assert _nonfinite_count(new_state) > _nonfinite_count(state), f"{case.name}: the NaN step was not counted"
        for step, (value, updates, _, _) in enumerate(_run(plain, new_params, new_state, 2)):
            assert _is_finite(np.asarray(value)), f"{case.name}: loss {value} {step + 1} steps after {what}"
            assert_like_params(updates, params, f"{case.name}: {step + 1} steps after {what}")


def _shapes_problem(params: dict[str, jax.Array]) -> Problem:
    """Softmax cross-entropy on ``dense(x, params["dense"]) + params["bias"] + sum(params["empty"]) +
    dense(x[:, :0], params["no_inputs"])`` over 4 examples, each term only where its leaf is in ``params`` (``{}``:
    constant logits)."""
    rng = np.random.default_rng(1)
    inputs = rng.standard_normal((4, 2)).astype(np.float32)
    loss = losses.softmax_cross_entropy(np.array([0, 1, 2, 0], np.int32))
    offset = np.linspace(-0.5, 0.5, 3, dtype=np.float32)

    def model_fn(p):
        logits = jnp.broadcast_to(offset, (4, 3))
        if "dense" in p:
            logits = logits + oso.kronecker.dense(inputs, p["dense"])
        if "bias" in p:
            logits = logits + p["bias"]
        if "empty" in p:
            logits = logits + jnp.sum(p["empty"])
        if "no_inputs" in p:  # a tagged dense layer on zero input features: its kernel is (0, 3)
            logits = logits + oso.kronecker.dense(inputs[:, :0], p["no_inputs"])
        return logits

    return Problem(params, {"value_fn": lambda p: loss(model_fn(p)), "model_fn": model_fn, "loss": loss}, inputs)


def _check_shapes(case: ContractCase, problem: Problem, what: str) -> list:
    """Two jitted steps on ``problem`` (``layers=`` from plain-JAX capture, which accepts a model without layers):
    updates like params, the state's signature kept and finite; the list of updates."""
    overrides = {"layers": oso.kronecker.find_layers(problem.extra["model_fn"], problem.params)} if case.uses_layers else {}
    value_and_grad = jax.jit(jax.value_and_grad(problem.extra["value_fn"]))
    all_updates = []
    with failure_as_assertion(f"{case.name} on {what}"):
        stepper = _stepper(make(case, LEARNING_RATE, problem, **overrides), problem.extra)
        params = problem.params
        state = stepper.init(params)
        init_signature = _signature(state)
        for step in range(2):
            updates, state, params = stepper.step(value_and_grad(params)[1], state, params)
            all_updates.append(updates)
            assert_like_params(updates, problem.params, f"{case.name} on {what}, step {step}")
            assert _signature(state) == init_signature, f"{case.name} on {what}: the state's signature changed"
            for path, x in zip(_paths(state), _arrays(state)):
                assert _is_finite(x), f"{case.name} on {what}: state leaf {path} is not finite at step {step}"
    return all_updates


def check_empty_tree(case: ContractCase) -> None:
    """An empty parameter tree ``{}``: ``init`` and two jitted steps give ``{}`` and a stable state."""
    _check_shapes(case, _shapes_problem({}), "an empty tree")


def check_zero_size(case: ContractCase) -> None:
    """Two ``(0, 3)`` leaves (one a tagged dense layer's kernel on zero input features, one not) beside a tagged dense
    layer and a vector: their updates are ``(0, 3)``, the others move."""
    params = {"bias": jnp.zeros(3, jnp.float32), "dense": jnp.asarray([[0.5, -0.2, 0.1], [0.3, 0.4, -0.6]], jnp.float32),
              "empty": jnp.zeros((0, 3), jnp.float32), "no_inputs": jnp.zeros((0, 3), jnp.float32)}
    all_updates = _check_shapes(case, _shapes_problem(params), "(0, 3) leaves")
    for name in ("bias", "dense"):
        assert any(np.any(np.asarray(u[name]) != 0) for u in all_updates), f"{case.name}: {name} never moved beside (0, 3) leaves"


MASKED_LEAF = "dense"


@functools.cache
def _problem_without(name: str) -> Problem:
    """The float64 toy problem with the leaf ``name`` held constant (not a parameter)."""
    problem = _problem("float64")
    fixed = problem.params[name]
    params = {k: v for k, v in problem.params.items() if k != name}

    def model_fn(p):
        return problem.extra["model_fn"]({**p, name: fixed})

    loss = problem.extra["loss"]
    return Problem(params, {"value_fn": lambda p: loss(model_fn(p)), "model_fn": model_fn, "loss": loss}, problem.inputs)


def check_masked(case: ContractCase) -> None:
    """``optax.masked`` with one leaf masked out: the others' steps are those of the problem without it.

    In float64 (``jax.enable_x64`` around the check): the two programs differ in their trees and so in their rounding,
    which float32 roots and eigenbases would amplify past a tolerance that still catches a leaf mixed up with another.
    """
    if not case.library:
        return
    with jax.enable_x64(True):
        _check_masked(case)


def _check_masked(case: ContractCase) -> None:
    problem, reduced = _problem("float64"), _problem_without(MASKED_LEAF)
    mask = {k: k != MASKED_LEAF for k in problem.params}
    masked = optax.masked(make(case, LEARNING_RATE, problem), mask)
    value_and_grad = _value_and_grad("float64")

    @jax.jit
    def masked_step(grads, state, params):
        updates, state = masked.update(grads, state, params, full_params=params, **problem.extra)
        # the masked leaf is left to another transformation; here it stays put, as in the reference
        applied = {k: jnp.zeros_like(u) if k == MASKED_LEAF else u for k, u in updates.items()}
        return updates, state, optax.apply_updates(params, applied)

    reference = _plain_reduced(case)
    expected = _run(reference, reduced.params, reference.init(reduced.params), 2, "reduced")
    params, state = problem.params, None
    with failure_as_assertion(f"{case.name} in optax.masked"):
        state = masked.init(params)
        for step, (_, want, _, _) in enumerate(expected):
            grads = value_and_grad(params)[1]
            updates, state, params = masked_step(grads, state, params)
            np.testing.assert_array_equal(updates[MASKED_LEAF], grads[MASKED_LEAF], f"{case.name}: masked leaf, step {step}")
            visible = {k: v for k, v in updates.items() if k != MASKED_LEAF}
            assert_trees_close(visible, want, f"{case.name} in optax.masked vs without the leaf, step {step}", rtol=1e-8)

    # without full_params (traced only): a transformation that calls no extra function needs none
    grads = jax.eval_shape(value_and_grad, problem.params)[1]
    state = jax.eval_shape(masked.init, problem.params)
    try:
        jax.eval_shape(lambda g, s, p: masked.update(g, s, p, **problem.extra), grads, state, problem.params)
    except TypeError as error:
        assert case.needs, f"{case.name} in optax.masked without full_params (it needs no extra argument): {error}"
        assert "full_params" in str(error), f"{case.name} in optax.masked without full_params: {error}"
    else:
        assert not case.needs, f"{case.name} in optax.masked needs {case.needs} but ran without full_params"


@functools.cache
def _plain_reduced(case: ContractCase) -> _Stepper:
    """The case on the problem without the masked leaf."""
    problem = _problem_without(MASKED_LEAF)
    return _stepper(make(case, LEARNING_RATE, problem), problem.extra)


CHECKS = {
    "jit": check_jit,
    "leaves": check_leaves,
    "chain": check_chain,
    "inject_hyperparams": check_inject_hyperparams,
    "checkpoint": check_checkpoint,
    "apply_if_finite": check_apply_if_finite,
    "bf16": check_bf16,
    "donate": check_donate,
    "empty_tree": check_empty_tree,
    "zero_size": check_zero_size,
    "missing_extra": check_missing_extra,
    "nonfinite": check_nonfinite,
    "masked": check_masked,
}
