"""Shared pieces of every transformation: extra arguments, hyperparameter checks, finite guards, amortization,
device spreading.

Extra arguments (passed as ``tx.update(grads, state, params, **extra)``; ``optax.chain`` hands the
same keywords to every child, so every transformation uses the same names):

* ``value_fn``: params -> scalar loss on the current batch (the name ``optax.lbfgs`` uses);
* ``model_fn``: params -> model outputs (logits, predictions) on the current batch;
* ``loss``: an output-space loss from :mod:`optax_second_order.curvature.losses`, bound to the
  batch's targets.

Hyperparameters. ``optax.inject_hyperparams(alias)`` calls the alias with every numeric argument (defaults
included) as an array, traced inside ``update``; so a hyperparameter is checked only when it is a concrete
Python number (:func:`check`), and no code branches in Python on its value. Structural integers (block sizes,
memory sizes) cannot be traced: they default to ``None`` (resolved inside, so ``inject_hyperparams`` leaves them
alone) and :func:`static_int` says what to do when one arrives as an array.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from optax_second_order.curvature.losses import OutputLoss

__all__ = [
    "EXTRA_ARGS",
    "extra_arg",
    "require_params",
    "require_loss",
    "scalar_value_fn",
    "check",
    "check_choice",
    "static_int",
    "stat_dtype",
    "is_refresh_step",
    "all_finite",
    "keep_if_nonfinite",
    "finite_ema",
    "value_at",
    "map_over_devices",
]

PyTree = Any

EXTRA_ARGS = {
    "value_fn": "params -> scalar loss on the current batch",
    "model_fn": "params -> model outputs (logits, predictions) on the current batch",
    "loss": "an output-space loss from optax_second_order.losses bound to the batch's targets",
}


# --- extra arguments -------------------------------------------------------------------------------


def extra_arg(extra: dict[str, Any], name: str, transform: str) -> Any:
    """The extra argument ``name`` from ``extra``, or a ``TypeError`` naming the transform and argument."""
    value = extra.get(name)
    if value is None:
        meaning = EXTRA_ARGS.get(name, "")
        raise TypeError(
            f"{transform}: update() needs the extra argument `{name}` ({meaning}); call "
            f"tx.update(grads, state, params, {name}=...)"
        )
    if name == "loss":
        return require_loss(value, transform)
    if name == "value_fn":
        return scalar_value_fn(value, transform)
    return value


def require_params(params: Any, transform: str) -> Any:
    """``params``, or a ``TypeError`` saying that ``transform`` needs them."""
    if params is None:
        raise TypeError(f"{transform}: update() needs `params` (call tx.update(grads, state, params, ...))")
    return params


def require_loss(loss: Any, transform: str) -> OutputLoss:
    """``loss`` if it is an output-space loss, else a ``TypeError`` that says how to build one."""
    if not isinstance(loss, OutputLoss):
        raise TypeError(
            f"{transform}: the extra argument `loss` must be an output-space loss bound to the batch's targets, "
            f"such as oso.losses.softmax_cross_entropy(labels), sigmoid_binary_cross_entropy(targets) or "
            f"squared_error(targets); got {type(loss).__name__}"
        )
    return loss


def scalar_value_fn(value_fn: Callable, transform: str) -> Callable:
    """``value_fn`` wrapped so that a non-scalar result raises a ``ValueError`` naming ``transform`` (at trace time)."""

    def checked(params):
        value = value_fn(params)
        if jnp.ndim(value) != 0:
            raise ValueError(
                f"{transform}: value_fn must return the batch's scalar loss, got shape {jnp.shape(value)} "
                "(reduce it, e.g. with .mean())"
            )
        return value

    return checked


# --- hyperparameters -------------------------------------------------------------------------------


def _is_python_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check(transform: str, name: str, value: Any, ok: Callable[[Any], bool], requirement: str) -> None:
    """``ValueError("{transform}: {name} must be {requirement}, got {value}")`` if ``value`` is a concrete Python
    number that fails ``ok``; ``None``, arrays and traced values pass (they are checked by their users, or not)."""
    if _is_python_number(value) and not ok(value):
        raise ValueError(f"{transform}: {name} must be {requirement}, got {value!r}")


def check_choice(transform: str, name: str, value: Any, choices: tuple) -> None:
    """``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{transform}: {name} must be one of {choices}, got {value!r}")


def static_int(transform: str, name: str, value: Any, default: int, minimum: int = 1) -> int:
    """A structural integer (a shape or a memory size): ``default`` for ``None``, else a Python int ``>= minimum``.

    An array (as ``optax.inject_hyperparams`` passes numbers) is accepted when concrete; a traced one raises a
    ``TypeError`` that says to pass the argument in ``static_args``.
    """
    if value is None:
        return default
    try:
        number = float(value)
    except jax.errors.JAXTypeError as error:  # a tracer: its value is not known while tracing
        raise TypeError(
            f"{transform}: {name} sets array shapes and cannot be a traced value; with optax.inject_hyperparams "
            f"pass static_args=({name!r},)"
        ) from error
    if isinstance(value, bool) or not number.is_integer() or number < minimum:
        raise ValueError(f"{transform}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(number)


def value_at(value: Any, count: jax.Array) -> Any:
    """A hyperparameter's value at step ``count``: ``value(count)`` for a schedule, else ``value``."""
    return value(count) if callable(value) else value


# --- dtypes and amortization -----------------------------------------------------------------------


def stat_dtype(dtype: Any) -> jnp.dtype:
    """The dtype statistics are kept in: float32 or better, whatever the parameter dtype."""
    return jnp.promote_types(dtype, jnp.float32)


def is_refresh_step(count: jax.Array, every: Any, start: Any = 0) -> jax.Array:
    """True on steps ``start, start + every, ...`` (``count`` counts completed updates; ``every`` may be traced)."""
    return (count >= start) & ((count - start) % every == 0)


# --- non-finite numbers ----------------------------------------------------------------------------


def all_finite(tree: PyTree) -> jax.Array:
    """Whether every floating leaf of ``tree`` is finite (a scalar bool; True for a tree without such leaves)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.asarray(True)


def keep_if_nonfinite(old: PyTree, new: PyTree) -> tuple[PyTree, jax.Array]:
    """``new`` if it is all finite, else ``old`` (leafwise ``jnp.where``); and ``1`` (int32) if ``new`` was not."""
    ok = all_finite(new)
    kept = jax.tree.map(lambda o, n: jnp.where(ok, n.astype(o.dtype), o), old, new)
    return kept, (~ok).astype(jnp.int32)


def finite_ema(old: PyTree, new: PyTree, decay: Any) -> tuple[PyTree, jax.Array]:
    """The moving average ``decay * old + (1 - decay) * new``, unless it is not finite: then ``old`` is kept.

    Returns the average and ``1`` (int32) when ``new`` was discarded, for the state's non-finite counter.
    """
    average = jax.tree.map(lambda o, n: (decay * o + (1 - decay) * n.astype(o.dtype)).astype(o.dtype), old, new)
    return keep_if_nonfinite(old, average)


# --- devices ---------------------------------------------------------------------------------------


def map_over_devices(fn: Callable, stacks: tuple[jax.Array, ...], sharding: NamedSharding | None) -> Any:
    """``fn(*stacks)`` on stacks of equal leading size ``n``; with ``sharding``, spread over devices.

    ``sharding``'s first ``PartitionSpec`` entry names the mesh axes (e.g. ``NamedSharding(mesh, P("data"))``)
    over which the leading axis is split: the stacks are padded to a multiple of the number of those devices
    (with copies of their first entry) and ``fn`` runs under :func:`jax.shard_map`, so each device computes only
    its share (its roots, inverses or eigendecompositions) and XLA gathers the results where they are used.
    """
    if sharding is None:
        return fn(*stacks)
    axes = sharding.spec[0] if len(sharding.spec) else None
    if axes is None:
        raise ValueError(f"precondition_sharding: its PartitionSpec must name the mesh axes to split over, got {sharding.spec}")
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    devices = math.prod(sharding.mesh.shape[a] for a in axes)
    n = stacks[0].shape[0]
    pad = -n % devices
    padded = tuple(jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]) if pad else x for x in stacks)
    spec = PartitionSpec(axes)
    out = jax.shard_map(fn, mesh=sharding.mesh, in_specs=spec, out_specs=spec)(*padded)
    return jax.tree.map(lambda x: x[:n], out)
