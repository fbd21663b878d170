"""Matrix-free linear solvers over parameter pytrees.

:func:`conjugate_gradient` solves ``A x = b`` for a symmetric positive-definite linear operator given
only as ``matvec(v) = A v`` on pytrees, e.g. a damped curvature operator built from
:func:`~optax_second_order.curvature.products.gnvp_operator` or
:func:`~optax_second_order.curvature.products.hvp_operator`::

    ggn = oso.gnvp_operator(model_fn, loss, params)
    damped = lambda v: optax.tree_utils.tree_add_scale(ggn(v), damping, v)
    step, info = oso.conjugate_gradient(damped, grads, maxiter=50)

Conventions follow ``jax.scipy.sparse.linalg.cg`` (``tol`` relative to ``||b||``, ``atol`` absolute,
``maxiter`` defaulting to ``10 * size(b)``, the preconditioner ``M ~ A^{-1}`` as a function), and
the solver also returns how it stopped (:class:`CGInfo`), which Hessian-free methods need for
warm starts and damping heuristics. The loop is a ``jax.lax.while_loop``: jittable, one
compilation for any iteration count, not reverse-differentiable (an optimizer step does not need to be).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

__all__ = ["CGInfo", "conjugate_gradient"]

PyTree = Any


class CGInfo(NamedTuple):
    """How :func:`conjugate_gradient` stopped."""

    iterations: jax.Array  # int32: matrix-vector products after the initial residual
    residual_norm: jax.Array  # ||b - A x|| as updated by the recurrence
    converged: jax.Array  # bool: residual_norm <= max(tol * ||b||, atol)


class _State(NamedTuple):
    x: PyTree
    r: PyTree  # residual b - A x
    p: PyTree  # search direction
    gamma: jax.Array  # <r, M r>
    residual_sq: jax.Array  # ||r||^2
    k: jax.Array


def conjugate_gradient(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    x0: PyTree | None = None,
    *,
    tol: float = 1e-5,
    atol: float = 0.0,
    maxiter: int | None = None,
    preconditioner: Callable[[PyTree], PyTree] | None = None,
) -> tuple[PyTree, CGInfo]:
    """Preconditioned conjugate gradient for ``A x = b`` (Hestenes & Stiefel 1952).

    With ``r_0 = b - A x_0``, ``z_0 = M r_0``, ``p_0 = z_0``, each iteration is
    ``alpha = <r, z> / <p, A p>``, ``x += alpha p``, ``r -= alpha A p``, ``z = M r``,
    ``p = z + (<r, z>_new / <r, z>) p`` (Nocedal & Wright 2006, Algorithm 5.3). It stops when
    ``||r|| <= max(tol * ||b||, atol)`` or after ``maxiter`` iterations.

    Args:
      matvec: ``v -> A v`` on pytrees shaped like ``b``; ``A`` symmetric positive definite (damp a
        curvature operator that may be singular or, for the Hessian, indefinite).
      b: right-hand side, a pytree.
      x0: starting point (warm start); zeros by default.
      tol: relative tolerance on the residual norm (``jax.scipy.sparse.linalg.cg``'s default).
      atol: absolute tolerance on the residual norm.
      maxiter: iteration limit; ``10 * size(b)`` by default (as JAX's ``cg``).
      preconditioner: ``r -> M r`` with ``M ~ A^{-1}`` symmetric positive definite (e.g. the inverse
        of a diagonal estimate, Jacobi); identity by default.

    Returns:
      ``(x, info)`` with ``info`` a :class:`CGInfo`.
    """
    if tol < 0 or atol < 0:
        raise ValueError(f"conjugate_gradient: tol and atol must be >= 0, got tol={tol}, atol={atol}")
    if maxiter is None:
        maxiter = 10 * otu.tree_size(b)
    if maxiter < 0:
        raise ValueError(f"conjugate_gradient: maxiter must be >= 0, got {maxiter}")
    precondition = preconditioner if preconditioner is not None else (lambda r: r)
    x0 = otu.tree_zeros_like(b) if x0 is None else x0

    threshold_sq = jnp.maximum(tol * otu.tree_norm(b), atol) ** 2
    r0 = otu.tree_sub(b, matvec(x0))
    z0 = precondition(r0)
    init = _State(x0, r0, z0, otu.tree_vdot(r0, z0), otu.tree_vdot(r0, r0), jnp.asarray(0, jnp.int32))

    def not_done(s: _State) -> jax.Array:
        return (s.residual_sq > threshold_sq) & (s.k < maxiter)

    def iteration(s: _State) -> _State:
        ap = matvec(s.p)
        alpha = s.gamma / otu.tree_vdot(s.p, ap)
        x = otu.tree_add_scale(s.x, alpha, s.p)
        r = otu.tree_add_scale(s.r, -alpha, ap)
        z = precondition(r)
        gamma = otu.tree_vdot(r, z)
        p = otu.tree_add_scale(z, gamma / s.gamma, s.p)
        return _State(x, r, p, gamma, otu.tree_vdot(r, r), s.k + 1)

    final = jax.lax.while_loop(not_done, iteration, init)
    info = CGInfo(final.k, jnp.sqrt(final.residual_sq), final.residual_sq <= threshold_sq)
    return final.x, info
