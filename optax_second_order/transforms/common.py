"""Shared pieces of every transformation: the extra-argument protocol, dtypes, amortization.

Extra arguments (passed as ``tx.update(grads, state, params, **extra)``; ``optax.chain`` hands the
same keywords to every child, so every transformation uses the same names):

* ``value_fn``: params -> scalar loss on the current batch (the name ``optax.lbfgs`` uses);
* ``model_fn``: params -> model outputs (logits, predictions) on the current batch;
* ``loss``: an output-space loss from :mod:`optax_second_order.curvature.losses`, bound to the
  batch's targets.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["EXTRA_ARGS", "extra_arg", "require_params", "stat_dtype", "is_refresh_step"]

EXTRA_ARGS = {
    "value_fn": "params -> scalar loss on the current batch",
    "model_fn": "params -> model outputs (logits, predictions) on the current batch",
    "loss": "an output-space loss from optax_second_order.losses bound to the batch's targets",
}


def extra_arg(extra: dict[str, Any], name: str, transform: str) -> Any:
    """The extra argument ``name`` from ``extra``, or a ``TypeError`` naming the transform and argument."""
    value = extra.get(name)
    if value is None:
        meaning = EXTRA_ARGS.get(name, "")
        raise TypeError(
            f"{transform}: update() needs the extra argument `{name}` ({meaning}); call "
            f"tx.update(grads, state, params, {name}=...)"
        )
    return value


def require_params(params: Any, transform: str) -> Any:
    """``params``, or a ``TypeError`` saying that ``transform`` needs them."""
    if params is None:
        raise TypeError(f"{transform}: update() needs `params` (call tx.update(grads, state, params, ...))")
    return params


def stat_dtype(dtype: Any) -> jnp.dtype:
    """The dtype statistics are kept in: float32 or better, whatever the parameter dtype."""
    return jnp.promote_types(dtype, jnp.float32)


def is_refresh_step(count: jax.Array, every: int, start: int = 0) -> jax.Array:
    """True on steps ``start, start + every, ...`` (``count`` counts completed updates)."""
    return (count >= start) & ((count - start) % every == 0)
