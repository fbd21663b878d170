"""Stochastic estimators of curvature diagonals.

* Hutchinson (Bekas, Kokiopoulou & Saad 2007): ``diag(H) = E_z[z * H z]`` for probes with
  ``E[z z^T] = I``; Rademacher probes (the default) make it exact on a diagonal matrix.
* Gauss-Newton-Bartlett (Liu et al. 2023, "Sophia", Algorithm 2): with targets ``t_hat`` sampled from
  the model and ``g_hat`` the gradient of the *mean* loss at them, ``B * g_hat^2`` is an unbiased estimate
  of ``diag(J^T H_L J)`` for a batch of ``B`` examples (second Bartlett identity).
* Empirical-Fisher diagonal from random signs: with ``s = sum_i eps_i g_i`` (one ``vjp`` of the per-example
  losses, ``eps_i = +-1``), ``E[s * s] = sum_i g_i * g_i``, so ``s * s / N`` is an unbiased estimate of
  ``diag(F_emp)`` without the ``N x #params`` per-example Jacobian of the exact
  :func:`~.products.empirical_fisher_diagonal`.
* Exact Hessian diagonal, for tests and small problems.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.flatten_util import ravel_pytree

from optax_second_order.curvature.losses import OutputLoss
from optax_second_order.curvature.products import hvp_operator

__all__ = [
    "rademacher",
    "probes",
    "hutchinson_diagonal",
    "gnb_diagonal",
    "empirical_fisher_diagonal_estimate",
    "exact_hessian_diagonal",
]

PyTree = Any
_DISTRIBUTIONS = ("rademacher", "gaussian")


def rademacher(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """Independent fair signs +-1, 32 of them from each random 32-bit word.

    Same distribution as ``jax.random.rademacher``, at a 32nd of the random-number work (which
    dominates a probe's cost on a CPU: a 500,000-entry probe took 10 ms with one word per sign and
    2.5 ms this way, on 2 CPU cores).
    """
    size = math.prod(shape)
    words = jax.random.bits(key, (-(-size // 32),), jnp.uint32)
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return (2 * bits.reshape(-1)[:size].astype(dtype) - 1).reshape(shape)


def probes(key: jax.Array, params: PyTree, distribution: str = "rademacher") -> PyTree:
    """A random pytree like ``params`` with ``E[z z^T] = I``: Rademacher (+-1) or standard Gaussian."""
    if distribution not in _DISTRIBUTIONS:
        raise ValueError(f"probes: distribution must be one of {_DISTRIBUTIONS}, got {distribution!r}")
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    draw = rademacher if distribution == "rademacher" else jax.random.normal
    return treedef.unflatten([_laid_out_like(draw(k, p.shape, p.dtype), p) for k, p in zip(keys, leaves)])


def _laid_out_like(z: jax.Array, like: Any) -> jax.Array:
    """``z`` with ``like``'s sharding where ``like`` lives on ``Explicit`` mesh axes (a probe is a tangent of the
    parameters: JAX wants it split as they are, e.g. FSDP parameters); ``z`` itself elsewhere."""
    sharding = jax.typeof(like).sharding
    mesh = sharding.mesh
    if mesh.empty or AxisType.Explicit not in mesh.axis_types:
        return z
    return jax.sharding.reshard(z, sharding.spec)


def hutchinson_diagonal(
    value_fn: Callable[[PyTree], jax.Array] | None,
    params: PyTree,
    key: jax.Array,
    num_probes: int = 1,
    distribution: str = "rademacher",
    hvp_fn: Callable[[PyTree], PyTree] | None = None,
) -> PyTree:
    """Hutchinson's estimate ``(1/n) sum_k z_k * H z_k`` of the Hessian diagonal of ``value_fn``.

    The Hessian is linearized once and applied to the ``num_probes`` probes in one batched call;
    probe ``k`` is ``probes(jax.random.split(key, num_probes)[k], params, distribution)``. With ``hvp_fn``
    (``v -> H v`` at ``params``, e.g. from :func:`~optax_second_order.grad_and_hvp_fn`) that map is used and
    ``value_fn`` is not differentiated (it may be ``None``).
    """
    if num_probes < 1:
        raise ValueError(f"hutchinson_diagonal: num_probes must be >= 1, got {num_probes}")
    hessian_vp = hvp_operator(value_fn, params) if hvp_fn is None else hvp_fn

    def z_hz(key):
        z = probes(key, params, distribution)
        return jax.tree.map(jnp.multiply, z, hessian_vp(z))

    keys = jax.random.split(key, num_probes)
    if num_probes == 1:  # not vmap over one probe: it turns every product of the linearization into a batched one,
        return z_hz(keys[0])  # which made the gradient-and-estimate of the autoencoder benchmark 20% slower
    estimates = jax.vmap(z_hz)(keys)
    return jax.tree.map(lambda e: jnp.mean(e, axis=0), estimates)


def gnb_diagonal(
    model_fn: Callable[[PyTree], jax.Array], loss: OutputLoss, params: PyTree, key: jax.Array
) -> PyTree:
    """Gauss-Newton-Bartlett estimate ``B * g_hat * g_hat`` of ``diag(J^T H_L J)``.

    ``g_hat`` is the gradient of the weighted mean loss with targets sampled from the model's
    predictive distribution at ``key``, and ``B = sum_i w_i`` the number of examples (unbiased for
    0/1 weights; for a language model an example is a token).
    """
    outputs, vjp_fn = jax.vjp(model_fn, params)
    sampled = loss.with_targets(loss.sample_targets(key, outputs))
    (g_hat,) = vjp_fn(jax.grad(sampled)(outputs).astype(outputs.dtype))
    batch = loss.num_examples(outputs)
    return jax.tree.map(lambda g: (batch * jnp.square(g.astype(batch.dtype))).astype(g.dtype), g_hat)


def empirical_fisher_diagonal_estimate(
    per_example_value_fn: Callable[[PyTree], jax.Array], params: PyTree, key: jax.Array
) -> PyTree:
    """Unbiased estimate ``s * s / N`` of ``diag(F_emp) = (1/N) sum_i g_i * g_i`` with ``s = sum_i eps_i g_i``.

    ``per_example_value_fn(params)`` returns the ``N`` per-example losses ``l_i`` (any shape) and
    ``g_i = d l_i / d params``; ``eps`` are fair signs drawn from ``key`` (:func:`rademacher`, one per example), so
    ``E[s * s] = sum_i g_i * g_i`` (the cross terms have mean zero). One ``vjp`` of the per-example losses, where
    :func:`~.products.empirical_fisher_diagonal` holds the ``N x #params`` per-example Jacobian.
    """
    values, vjp_fn = jax.vjp(per_example_value_fn, params)
    signs = rademacher(key, values.shape, values.dtype)
    (s,) = vjp_fn(signs)
    return jax.tree.map(lambda x: jnp.square(x) / values.size, s)


def exact_hessian_diagonal(value_fn: Callable[[PyTree], jax.Array], params: PyTree) -> PyTree:
    """The exact Hessian diagonal from the dense Hessian (``#params^2`` memory: small problems only)."""
    flat, unravel = ravel_pytree(params)
    return unravel(jnp.diag(jax.hessian(lambda x: value_fn(unravel(x)))(flat)))
