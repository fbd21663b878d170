r"""Damping: Levenberg-Marquardt from the reduction ratio, KL clipping, step rejection.

A curvature-based step ``delta`` minimizes the local quadratic model
``M(delta) = grad . delta + 1/2 delta^T (C + lambda I) delta`` of the loss ``h`` (``C``: a Hessian, Gauss-Newton
or Fisher matrix). How far to trust the model is measured by the **reduction ratio**

.. math::

    \rho = \frac{h(\theta + \delta) - h(\theta)}{M(\delta) - M(0)},

(Moré 1978; Martens 2010, section 4.1; Martens & Grosse 2015, section 6.5): near 1 the model is good and the
damping ``lambda`` can shrink, small or negative the step went too far and ``lambda`` grows. These functions are
the pieces, shared by K-FAC and the solve-based family:

* :func:`reduction_ratio`: ``rho``, ``-inf`` where the new loss is not finite or the model predicts no decrease
  (a curvature estimate that is not positive definite along ``delta``);
* :func:`levenberg_marquardt`: the damping rule, ``lambda <- decrease * lambda`` if ``rho > upper``,
  ``lambda <- increase * lambda`` if ``rho < lower``, never below ``min_damping``;
* :func:`kl_clip_scale`: K-FAC's KL clipping factor (Ba, Grosse & Martens 2017);
* :func:`reject_step`: a zero update where a step is rejected (``rho <= 0``), so the loss on the batch never
  rises because of an accepted step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_second_order.transforms.common import computed_once

__all__ = ["reduction_ratio", "levenberg_marquardt", "kl_clip_scale", "reject_step"]

PyTree = Any


def reduction_ratio(actual: jax.Array, predicted: jax.Array) -> jax.Array:
    """``rho = actual / predicted`` (both changes of the loss, ``predicted < 0`` for a descent step).

    ``-inf`` where ``actual`` is not finite or ``predicted >= 0``: the step is then treated as a failure.
    """
    good = jnp.isfinite(actual) & jnp.isfinite(predicted) & (predicted < 0)
    return jnp.where(good, actual / jnp.where(good, predicted, -1.0), -jnp.inf)


def levenberg_marquardt(
    damping: jax.Array,
    rho: jax.Array,
    decrease: Any,
    increase: Any,
    min_damping: Any = 0.0,
    lower: float = 0.25,
    upper: float = 0.75,
) -> jax.Array:
    """The Levenberg-Marquardt damping rule on the reduction ratio ``rho``.

    ``lambda * decrease`` if ``rho > upper``, ``lambda * increase`` if ``rho < lower``, else ``lambda``; then at
    least ``min_damping``. Martens (2010): ``decrease = 2/3``, ``increase = 3/2``; Martens & Grosse (2015,
    section 6.5): ``decrease = omega``, ``increase = 1 / omega`` with ``omega = (19/20)^T1``; both with the
    thresholds ``1/4`` and ``3/4``.
    """
    new = jnp.where(rho > upper, damping * decrease, jnp.where(rho < lower, damping * increase, damping))
    return jnp.maximum(new, min_damping).astype(jnp.result_type(damping))


def kl_clip_scale(v: PyTree, grads: PyTree, learning_rate: Any, kl_clip: Any) -> jax.Array:
    """``nu = min(1, sqrt(kl_clip / (lr^2 v^T F v)))`` with ``v^T F v = v . grad`` for ``v = F^{-1} grad``.

    Scaling the step ``lr v`` by ``nu`` bounds the second-order KL change ``lr^2 nu^2 v^T F v`` by ``kl_clip``
    (Ba, Grosse & Martens 2017, section 5). ``v . grad`` is formed from ``v / max|v|`` and ``grad / max|grad|``,
    so a huge gradient (a loss scaled by ``1e20``) whose ``v . grad`` overflows float32 still gets its finite,
    clipped step. A ``v . grad`` that is not positive (a preconditioner that is not positive definite, garbage
    statistics) or not finite gives ``nu = 0``: no step, rather than an unbounded one.
    """
    v_max, g_max = _max_abs(v), _max_abs(grads)
    v_scaled = jax.tree.map(lambda x: x / v_max, v)
    g_scaled = jax.tree.map(lambda x: (x / g_max).astype(jnp.result_type(x, v_max)), grads)
    normalized = optax.tree.vdot(v_scaled, g_scaled)
    good = jnp.isfinite(normalized) & (normalized > 0) & jnp.isfinite(v_max) & jnp.isfinite(g_max)
    # sqrt(lr^2 v.g) = lr sqrt(v_max) sqrt(g_max) sqrt(normalized), each factor finite
    root = learning_rate * jnp.sqrt(v_max) * jnp.sqrt(g_max) * jnp.sqrt(jnp.where(good, normalized, 1.0))
    return computed_once(jnp.where(good, jnp.minimum(1.0, jnp.sqrt(kl_clip) / root), 0.0))  # scales every leaf


def _max_abs(tree: PyTree) -> jax.Array:
    """``max |x|`` over the leaves (float32 or better), at least the smallest normal number (safe to divide by); a
    zero-size leaf or an empty tree contributes nothing."""
    leaves = jax.tree.leaves(tree)
    dtype = jnp.result_type(*leaves, jnp.float32)
    largest = jnp.zeros([], dtype)
    for x in leaves:
        largest = jnp.maximum(largest, jnp.max(jnp.abs(x), initial=0).astype(dtype))
    return computed_once(jnp.maximum(largest, jnp.finfo(dtype).tiny))  # divides every leaf


def reject_step(rejected: jax.Array, updates: PyTree) -> PyTree:
    """``updates`` with every leaf zeroed where ``rejected`` is true (a scalar bool)."""
    return jax.tree.map(lambda u: jnp.where(rejected, jnp.zeros_like(u), u), updates)
