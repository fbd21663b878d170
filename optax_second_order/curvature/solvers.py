"""Linear solvers over parameter pytrees: truncated CG, dense solves, low-rank (row-space) solves.

Newton, Gauss-Newton / Levenberg-Marquardt, Hessian-free and natural-gradient steps all solve
``(M + damping I) x = b`` with a curvature matrix ``M`` (Hessian, GGN, Fisher); they differ in ``M``, in
how the system is solved and in how ``damping`` is chosen. This module holds the solvers:

* :func:`conjugate_gradient`: matrix-free truncated CG on ``v -> A v`` (any operator of
  :mod:`.products` plus damping), with a negative-curvature stop (Newton-CG), the quadratic model's
  value, Martens' (2010) relative-progress stop and his saved iterates for CG backtracking;
* :func:`dense_matrix` and :func:`dense_solve`: the operator as an explicit ``(n, n)`` matrix, solved by
  Cholesky with an eigendecomposition fallback, optionally saddle-free (``|M|``);
* :func:`low_rank_damped_solve`: ``(U U^T + damping I)^{-1} g`` by the Woodbury identity when ``M = U U^T``
  has few columns (the GGN and Fishers of a small batch: :func:`~.products.ggn_factor` and friends);
* :func:`newton_decrement`: ``sqrt(g^T M^{-1} g)`` from the gradient and any solver's step.

For example, a damped Gauss-Newton step by CG::

    ggn = oso.gnvp_operator(model_fn, loss, params)
    damped = lambda v: optax.tree_utils.tree_add_scale(ggn(v), damping, v)
    step, info = oso.conjugate_gradient(damped, grads, maxiter=50)

CG follows ``jax.scipy.sparse.linalg.cg`` (``tol`` relative to ``||b||``, ``atol`` absolute, ``maxiter``
defaulting to ``10 * size(b)``, the preconditioner ``M ~ A^{-1}`` as a function) and also returns how it
stopped (:class:`CGInfo`), which Hessian-free methods need for warm starts and damping. Its loop is a
``jax.lax.while_loop``: jittable, one compilation for any iteration count, not reverse-differentiable
(an optimizer step does not need to be). All solvers compute in float32 or better.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

from optax_second_order.curvature.matrix import symmetrize

__all__ = [
    "CGInfo",
    "conjugate_gradient",
    "DenseSolveInfo",
    "dense_matrix",
    "dense_solve",
    "low_rank_damped_solve",
    "newton_decrement",
]

PyTree = Any

# Martens (2010), section 4.4: the progress window k = max(10, 0.1 i).
_PROGRESS_MIN_WINDOW = 10
_PROGRESS_WINDOW_DIVISOR = 10


def _compute_dtype(*dtypes) -> jnp.dtype:
    """float32 or better: the inputs' dtypes promoted to at least float32."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def _is_concrete(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class CGInfo(NamedTuple):
    """How :func:`conjugate_gradient` stopped.

    A stop by Martens' progress rule shows as ``converged``, ``negative_curvature`` both False with
    ``iterations < maxiter``.
    """

    iterations: jax.Array  # int32: matrix-vector products after the initial residual (which takes one with x0)
    residual_norm: jax.Array  # ||b - A x|| of the returned x, as updated by the recurrence
    converged: jax.Array  # bool: residual_norm <= max(tol * ||b||, atol), no negative curvature met
    negative_curvature: jax.Array  # bool: stopped at a direction p with p^T A p <= eps ||p|| ||A p||
    quadratic_value: jax.Array  # phi(x) = 1/2 x^T A x - b^T x of the returned x, by the recurrence
    saved_iterates: PyTree = None  # with save_gamma: x_i for i in saved_iterations, stacked on axis 0
    saved_iterations: jax.Array | None = None  # int32, ascending; those > iterations were not reached (zeros)


class _State(NamedTuple):
    x: PyTree
    r: PyTree  # residual b - A x
    p: PyTree  # search direction
    gamma: jax.Array  # <r, M r>
    residual_sq: jax.Array  # ||r||^2
    k: jax.Array
    phi: jax.Array  # 1/2 x^T A x - b^T x
    negative_curvature: jax.Array
    stalled: jax.Array  # Martens' relative-progress rule fired
    phi_history: jax.Array | None  # phi(x_i) at i mod len (only with progress_eps)
    saved: PyTree  # x at the saved iterations (only with save_gamma)


def _is_nonpositive_curvature(curvature: jax.Array, p: PyTree, ap: PyTree) -> jax.Array:
    """``p^T A p <= eps ||p|| ||A p||``: the curvature along ``p`` is not positive at working precision.

    The test is on the cosine of the angle between ``p`` and ``A p``, so it does not depend on the scale of
    ``A`` or ``p``. A computed ``p^T A p`` carries a rounding error of order ``eps ||p|| ||A p||`` (Higham
    2002, section 3.1), so a smaller value is indistinguishable from zero. For a positive-definite ``A``
    the Kantorovich inequality gives ``cos(p, A p) >= 2 sqrt(kappa) / (kappa + 1)``, so the test never
    fires below the condition number ``kappa = 4 / eps^2`` (about ``3e14`` in float32, ``8e31`` in
    float64): CG on positive-definite systems runs exactly as without it.
    """
    eps = jnp.finfo(curvature.dtype).eps
    return curvature <= eps * otu.tree_norm(p) * otu.tree_norm(ap)


def _progress_window(i: jax.Array) -> jax.Array:
    """``k = max(10, 0.1 i)`` (Martens 2010, section 4.4), ``0.1 i`` rounded up in integer arithmetic."""
    return jnp.maximum(_PROGRESS_MIN_WINDOW, -(-i // _PROGRESS_WINDOW_DIVISOR))


def _progress_history_length(maxiter: int) -> int:
    """Ring-buffer length holding ``phi(x_{i-k}), ..., phi(x_i)`` for every ``i <= maxiter``."""
    return max(_PROGRESS_MIN_WINDOW, -(-maxiter // _PROGRESS_WINDOW_DIVISOR)) + 1


def _is_stalled(history: jax.Array, i: jax.Array, phi: jax.Array, progress_eps) -> jax.Array:
    """Martens' (2010, section 4.4) rule: ``i > k``, ``phi_i < 0`` and ``(phi_i - phi_{i-k}) / phi_i < k eps``.

    With ``phi_i < 0`` the ratio test is ``phi_i - phi_{i-k} > k eps phi_i`` (no division).
    """
    k = _progress_window(i)
    previous = history[(i - k) % history.shape[0]]
    return (i > k) & (phi < 0) & (phi - previous > k * progress_eps * phi)


def _record_progress(history: jax.Array, i: jax.Array, phi: jax.Array, progress_eps) -> tuple[jax.Array, jax.Array]:
    """Store ``phi(x_i)`` in the ring buffer and apply Martens' rule: ``(history, stalled)``."""
    history = history.at[i % history.shape[0]].set(phi)
    return history, _is_stalled(history, i, phi, progress_eps)


def _save_schedule(gamma: float, maxiter: int) -> np.ndarray:
    """The iterations ``ceil(gamma^j) <= maxiter``, ``j = 0, 1, ...``, without repeats (Martens 2010, section 4.6)."""
    schedule, j = [], 0
    while math.ceil(gamma**j) <= maxiter:
        if not schedule or schedule[-1] != math.ceil(gamma**j):
            schedule.append(math.ceil(gamma**j))
        j += 1
    return np.asarray(schedule, np.int32)


def _slot_of_iteration(schedule: np.ndarray, maxiter: int) -> jax.Array:
    """For ``i = 0..maxiter`` the slot of ``x_i`` among the saved iterates; ``len(schedule)`` (dropped) if unsaved."""
    slots = np.full(maxiter + 1, len(schedule), np.int32)
    slots[schedule] = np.arange(len(schedule), dtype=np.int32)
    return jnp.asarray(slots)


def _save_iterate(saved: PyTree, slot: jax.Array, x: PyTree) -> PyTree:
    """``saved[slot] = x`` leaf by leaf; a ``slot`` past the end (not a save iteration) writes nothing."""
    return jax.tree.map(lambda buffer, leaf: buffer.at[slot].set(leaf, mode="drop"), saved, x)


def _check_cg_arguments(tol, atol, maxiter, progress_eps, save_gamma) -> None:
    """Checks of the concrete Python numbers among the arguments (``tol``, ``atol`` and ``maxiter`` may be traced)."""
    if (_is_concrete(tol) and tol < 0) or (_is_concrete(atol) and atol < 0):
        raise ValueError(f"conjugate_gradient: tol and atol must be >= 0, got tol={tol}, atol={atol}")
    if _is_concrete(maxiter) and maxiter < 0:
        raise ValueError(f"conjugate_gradient: maxiter must be >= 0, got {maxiter}")
    python_int = isinstance(maxiter, int) and not isinstance(maxiter, bool)
    if (progress_eps is not None or save_gamma is not None) and not python_int:
        raise TypeError(
            "conjugate_gradient: with progress_eps or save_gamma, maxiter sizes the saved values and iterates and "
            f"must be a Python int, got {maxiter!r}"
        )
    if progress_eps is not None and _is_concrete(progress_eps) and not progress_eps > 0:
        raise ValueError(f"conjugate_gradient: progress_eps must be > 0, got {progress_eps}")
    if save_gamma is not None and not (_is_concrete(save_gamma) and save_gamma > 1):
        raise ValueError(f"conjugate_gradient: save_gamma must be a Python number > 1, got {save_gamma}")


def conjugate_gradient(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    x0: PyTree | None = None,
    *,
    tol: float = 1e-5,
    atol: float = 0.0,
    maxiter: int | None = None,
    preconditioner: Callable[[PyTree], PyTree] | None = None,
    progress_eps: float | None = None,
    save_gamma: float | None = None,
) -> tuple[PyTree, CGInfo]:
    """Preconditioned truncated conjugate gradient for ``A x = b`` (Hestenes & Stiefel 1952).

    With ``r_0 = b - A x_0``, ``z_0 = M r_0``, ``p_0 = z_0``, each iteration is
    ``alpha = <r, z> / <p, A p>``, ``x += alpha p``, ``r -= alpha A p``, ``z = M r``,
    ``p = z + (<r, z>_new / <r, z>) p`` (Nocedal & Wright 2006, Algorithm 5.3). It stops when
    ``||r|| <= max(tol * ||b||, atol)``, after ``maxiter`` iterations, or:

    * at the first direction of non-positive curvature, ``p^T A p <= eps ||p|| ||A p||`` (``eps`` the
      machine epsilon; see ``info.negative_curvature``), returning the last iterate; if that is the zero
      start (no ``x0``, first iteration) it returns the (preconditioned) steepest-descent direction
      ``p_0 = M b`` instead, ``b`` without a preconditioner (Nocedal & Wright 2006, Algorithm 7.1,
      Newton-CG). For positive-definite ``A`` this test cannot fire below condition number ``4 / eps^2``;
    * with ``progress_eps``, by Martens' relative-progress rule (Martens 2010, section 4.4): at iteration
      ``i`` when ``i > k``, ``phi(x_i) < 0`` and ``(phi(x_i) - phi(x_{i-k})) / phi(x_i) < k * progress_eps``
      with ``k = max(10, ceil(0.1 i))``, where ``phi(x) = 1/2 x^T A x - b^T x`` is the quadratic model CG
      minimizes. Set ``tol=0`` to stop by this rule (and ``maxiter``) alone, as Martens does.

    ``phi`` is tracked for free from ``phi(x + alpha p) = phi(x) - alpha <r, z> + alpha^2 / 2 <p, A p>``
    (``p^T r = <r, z>`` by conjugacy) and reported as ``info.quadratic_value``, the model decrease that
    reduction-ratio damping (Levenberg-Marquardt) compares with the true one.

    With ``save_gamma``, the iterates ``x_i`` at ``i = ceil(save_gamma^j)``, ``j = 0, 1, ...`` (1, 2, 3, 4, 5,
    7, 9, 11, 14, 18, ... for 1.3) are kept in ``info.saved_iterates`` so the caller can pick the best by
    the true objective, Martens' CG backtracking (2010, section 4.6, ``gamma = 1.3``): evaluate the
    objective at the returned ``x`` and walk back through the saved iterates while it decreases. This
    holds ``len(info.saved_iterations)`` (about ``log(maxiter) / log(save_gamma)``) copies of ``b``.

    Args:
      matvec: ``v -> A v`` on pytrees shaped like ``b``; ``A`` symmetric (damp a curvature operator that
        may be singular; a Hessian may be indefinite, which the negative-curvature stop handles).
      b: right-hand side, a pytree.
      x0: starting point (warm start); zeros by default.
      tol: relative tolerance on the residual norm (``jax.scipy.sparse.linalg.cg``'s default).
      atol: absolute tolerance on the residual norm.
      maxiter: iteration limit; ``10 * size(b)`` by default (as JAX's ``cg``). It may be a traced integer
        (``tol`` and ``atol`` too) unless ``progress_eps`` or ``save_gamma`` is given: their buffers are sized
        by it, so it must then be a Python int.
      preconditioner: ``r -> M r`` with ``M ~ A^{-1}`` symmetric positive definite (e.g. the inverse
        of a diagonal estimate, Jacobi); identity by default.
      progress_eps: Martens' ``epsilon`` (he uses ``5e-4``); ``None`` (default) disables the rule. It keeps
        the last ``max(10, ceil(0.1 maxiter)) + 1`` values of ``phi``.
      save_gamma: Martens' ``gamma`` (he uses ``1.3``), a Python number ``> 1``; ``None`` (default) saves
        nothing.

    Returns:
      ``(x, info)`` with ``info`` a :class:`CGInfo`.
    """
    if maxiter is None:
        maxiter = 10 * otu.tree_size(b)
    _check_cg_arguments(tol, atol, maxiter, progress_eps, save_gamma)
    precondition = preconditioner if preconditioner is not None else (lambda r: r)
    cold_start = x0 is None
    x0 = otu.tree_zeros_like(b) if cold_start else x0

    threshold_sq = jnp.maximum(tol * otu.tree_norm(b), atol) ** 2
    if cold_start:  # A 0 = 0: no product, only the dtypes b - A x0 would have
        products = jax.eval_shape(matvec, x0)
        r0 = jax.tree.map(lambda bi, ai: bi.astype(jnp.promote_types(bi.dtype, ai.dtype)), b, products)
    else:
        r0 = otu.tree_sub(b, matvec(x0))
    z0 = precondition(r0)
    gamma0 = otu.tree_vdot(r0, z0)
    phi0 = -0.5 * (otu.tree_vdot(x0, r0) + otu.tree_vdot(x0, b))  # 1/2 x^T A x - b^T x with A x = b - r
    false = jnp.asarray(False)
    if progress_eps is not None:
        history = jnp.zeros(_progress_history_length(maxiter), gamma0.dtype).at[0].set(phi0)
    else:
        history = None
    if save_gamma is not None:
        schedule = _save_schedule(save_gamma, maxiter)
        slot_of_iteration = _slot_of_iteration(schedule, maxiter)
        saved = jax.tree.map(lambda leaf: jnp.zeros((len(schedule),) + jnp.shape(leaf), leaf.dtype), x0)
    else:
        saved = None
    init = _State(
        x0, r0, z0, gamma0, otu.tree_vdot(r0, r0), jnp.asarray(0, jnp.int32), phi0, false, false, history, saved
    )

    def not_done(s: _State) -> jax.Array:
        return (s.residual_sq > threshold_sq) & (s.k < maxiter) & ~s.negative_curvature & ~s.stalled

    def iteration(s: _State) -> _State:
        ap = matvec(s.p)
        curvature = otu.tree_vdot(s.p, ap)
        negative = _is_nonpositive_curvature(curvature, s.p, ap)
        # Non-positive curvature: stay at the last iterate, or take p_0 = M b from the zero start.
        fallback_alpha = jnp.where((s.k == 0) & cold_start, 1.0, 0.0).astype(curvature.dtype)
        alpha = jnp.where(negative, fallback_alpha, s.gamma / jnp.where(negative, 1.0, curvature))
        x = otu.tree_add_scale(s.x, alpha, s.p)
        r = otu.tree_add_scale(s.r, -alpha, ap)
        phi = s.phi - alpha * s.gamma + 0.5 * alpha**2 * curvature
        z = precondition(r)
        gamma = otu.tree_vdot(r, z)
        p = otu.tree_add_scale(z, gamma / s.gamma, s.p)
        i = s.k + 1

        history, stalled, saved = s.phi_history, s.stalled, s.saved
        if progress_eps is not None:
            history, stalled = _record_progress(history, i, phi, progress_eps)
        if save_gamma is not None:
            saved = _save_iterate(saved, slot_of_iteration[i], x)
        return _State(x, r, p, gamma, otu.tree_vdot(r, r), i, phi, negative, stalled, history, saved)

    final = jax.lax.while_loop(not_done, iteration, init)
    info = CGInfo(
        iterations=final.k,
        residual_norm=jnp.sqrt(final.residual_sq),
        converged=(final.residual_sq <= threshold_sq) & ~final.negative_curvature,
        negative_curvature=final.negative_curvature,
        quadratic_value=final.phi,
        saved_iterates=final.saved,
        saved_iterations=None if save_gamma is None else jnp.asarray(schedule),
    )
    return final.x, info


def dense_matrix(matvec: Callable[[PyTree], PyTree], like: PyTree) -> jax.Array:
    """The linear operator ``v -> A v`` on pytrees as an explicit ``(n, n)`` matrix.

    Rows and columns follow ``jax.flatten_util.ravel_pytree(like)`` order: column ``j`` is
    ``ravel(matvec(unravel(e_j)))``, all ``n`` products in one ``vmap`` (memory ``n^2``, for models small
    enough to factor the matrix). The matrix is in float32 or better.
    """
    flat, unravel = ravel_pytree(like)
    dtype = _compute_dtype(flat.dtype)
    columns = jax.vmap(lambda e: ravel_pytree(matvec(unravel(e)))[0].astype(dtype))(jnp.eye(flat.size, dtype=dtype))
    return columns.T


class DenseSolveInfo(NamedTuple):
    """Which path :func:`dense_solve` took."""

    used_eigh: jax.Array  # bool: solved by the eigendecomposition (Cholesky failed, or saddle_free)
    min_eigenvalue: jax.Array  # smallest eigenvalue of the undamped M where eigh ran, else NaN


def _eigh_solve(matrix: jax.Array, b: jax.Array, damping, saddle_free: bool) -> tuple[jax.Array, jax.Array]:
    """``Q diag(1 / d) Q^T b`` with ``M = Q diag(lambda) Q^T`` and ``d = lambda + damping`` (``|lambda| + damping``
    when ``saddle_free``), and ``lambda_min``.

    Eigenvalues with ``|d_i| <= n eps max|d|`` are left out (pseudo-inverse; the rank cutoff of
    ``numpy.linalg.matrix_rank``), so a singular damped matrix gives the minimum-norm least-squares
    solution instead of an overflow.
    """
    eigenvalues, eigenvectors = jnp.linalg.eigh(matrix, symmetrize_input=False)
    d = (jnp.abs(eigenvalues) if saddle_free else eigenvalues) + damping
    cutoff = matrix.shape[-1] * jnp.finfo(matrix.dtype).eps * jnp.max(jnp.abs(d))
    inverse = jnp.where(jnp.abs(d) > cutoff, 1.0 / jnp.where(d == 0, 1.0, d), 0.0)
    coefficients = jnp.matmul(eigenvectors.T, b, precision=jax.lax.Precision.HIGHEST)
    x = jnp.matmul(eigenvectors, inverse * coefficients, precision=jax.lax.Precision.HIGHEST)
    return x, eigenvalues[0]


def dense_solve(
    matrix: jax.Array, b: PyTree, damping: float | jax.Array = 0.0, *, saddle_free: bool = False
) -> tuple[PyTree, DenseSolveInfo]:
    """``(M + damping I)^{-1} b`` for an explicit symmetric ``(n, n)`` matrix ``M`` (from :func:`dense_matrix`).

    By Cholesky; where that fails (a non-finite solution: ``M + damping I`` is not positive definite at
    working precision, e.g. an indefinite Hessian), by the eigendecomposition ``M = Q diag(lambda) Q^T``
    instead, ``x = Q diag(1 / (lambda + damping)) Q^T b`` (exact for indefinite matrices, a pseudo-inverse
    for singular ones), under ``jax.lax.cond`` so ``eigh`` runs only when needed. ``info.min_eigenvalue``
    (``lambda_min`` of ``M``) then tells a Newton method how far to raise the damping.

    With ``saddle_free=True``, the saddle-free Newton system ``(|M| + damping I) x = b`` with
    ``|M| = Q |diag(lambda)| Q^T`` (Dauphin et al. 2014, "Identifying and attacking the saddle point
    problem in high-dimensional non-convex optimization", NeurIPS): directions of negative
    curvature are followed downhill instead of towards the saddle.

    Args:
      matrix: ``(n, n)`` symmetric matrix over ``ravel_pytree(b)`` order (symmetrized here).
      b: right-hand side, a pytree (a flat vector is one).
      damping: Tikhonov damping ``>= 0`` (scalar, may be traced).
      saddle_free: solve with ``|M|`` (always by ``eigh``).

    Returns:
      ``(x, info)``: ``x`` shaped like ``b`` (in its dtypes), ``info`` a :class:`DenseSolveInfo`. Computed
      in float32 or better.
    """
    if _is_concrete(damping) and not damping >= 0:
        raise ValueError(f"dense_solve: damping must be >= 0, got {damping}")
    flat_b, unravel = ravel_pytree(b)
    dtype = _compute_dtype(matrix.dtype, flat_b.dtype)
    m = symmetrize(matrix.astype(dtype))
    rhs = flat_b.astype(dtype)
    damping = jnp.asarray(damping, dtype)
    if saddle_free:
        x, min_eigenvalue = _eigh_solve(m, rhs, damping, saddle_free=True)
        return unravel(x), DenseSolveInfo(jnp.asarray(True), min_eigenvalue)

    factor = jnp.linalg.cholesky(m + damping * jnp.eye(m.shape[-1], dtype=dtype))
    x = jax.scipy.linalg.cho_solve((factor, True), rhs)
    cholesky_ok = jnp.all(jnp.isfinite(x))
    x, min_eigenvalue = jax.lax.cond(
        cholesky_ok,
        lambda: (x, jnp.asarray(jnp.nan, dtype)),
        lambda: _eigh_solve(m, rhs, damping, saddle_free=False),
    )
    return unravel(x), DenseSolveInfo(~cholesky_ok, min_eigenvalue)


def _columns_as_matrix(factor: PyTree, dtype) -> jax.Array:
    """The ``m`` columns of a pytree with a leading axis ``m`` as an ``(m, n)`` array (leaves concatenated)."""
    leaves = jax.tree.leaves(factor)
    return jnp.concatenate([jnp.reshape(leaf, (leaf.shape[0], -1)).astype(dtype) for leaf in leaves], axis=1)


def low_rank_damped_solve(factor: PyTree, g: PyTree, damping: float | jax.Array) -> PyTree:
    """``(U U^T + damping I)^{-1} g`` by the Woodbury identity, for ``U`` with ``m`` columns (``m < n``).

    .. math::

        (U U^\\top + \\lambda I)^{-1} g = \\frac{1}{\\lambda}\\left(g - U (\\lambda I_m + U^\\top U)^{-1} U^\\top g\\right)

    an ``m x m`` Cholesky solve of the positive-definite ``lambda I + U^T U`` (no inverse of the output-space
    Hessian is formed). This is the row-space ("sample-space", "kernel") form of the damped Gauss-Newton /
    natural-gradient step for a batch with fewer outputs than parameters (Ren & Goldfarb 2019,
    "Efficient subsampled Gauss-Newton and natural gradient methods for training neural networks",
    arXiv:1906.02353). ``U`` comes from :func:`~.products.ggn_factor`
    (``J^T S``, ``S S^T = H_L``), :func:`~.products.fisher_factor` (sampled true Fisher) or
    :func:`~.products.empirical_fisher_factor`. Cost ``O(m^2 n + m^3)``, memory ``O(m n + m^2)``.

    Args:
      factor: ``U`` as a pytree shaped like ``g`` with an extra leading axis of length ``m`` (column ``j`` is
        ``jax.tree.map(lambda u: u[j], factor)``).
      g: right-hand side, a pytree.
      damping: ``lambda > 0`` (scalar, may be traced); the identity is singular at 0 when ``m < n``.

    Returns:
      The solution shaped like ``g`` (in its dtypes), computed in float32 or better.
    """
    if _is_concrete(damping) and not damping > 0:
        raise ValueError(f"low_rank_damped_solve: damping must be > 0, got {damping}")
    flat_g, unravel = ravel_pytree(g)
    dtype = _compute_dtype(flat_g.dtype, *(leaf.dtype for leaf in jax.tree.leaves(factor)))
    u = _columns_as_matrix(factor, dtype)  # (m, n): row j is column j of U
    g_flat = flat_g.astype(dtype)
    damping = jnp.asarray(damping, dtype)
    highest = jax.lax.Precision.HIGHEST
    gram = jnp.matmul(u, u.T, precision=highest)
    kernel = gram + damping * jnp.eye(gram.shape[0], dtype=dtype)
    coefficients = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(kernel), True), jnp.matmul(u, g_flat, precision=highest))
    return unravel((g_flat - jnp.matmul(coefficients, u, precision=highest)) / damping)


def newton_decrement(grads: PyTree, step: PyTree) -> jax.Array:
    """The Newton decrement ``sqrt(g^T M^{-1} g)`` from the gradient ``g`` and a solved ``step = M^{-1} g``.

    Works with any solver's step (:func:`conjugate_gradient`, :func:`dense_solve`,
    :func:`low_rank_damped_solve`) and any positive-definite ``M``; an indefinite ``M`` can make
    ``g^T M^{-1} g`` negative, and the result is then NaN. Half its square is the decrease the quadratic
    model predicts for the full step (Boyd & Vandenberghe 2004, *Convex Optimization*, section 9.5.1).
    For the natural gradient, ``g^T F^{-1} g`` is twice the KL divergence the step causes to second order,
    so the step size that moves the model by ``KL = epsilon`` is ``sqrt(2 epsilon) / newton_decrement``
    (Schulman et al. 2015, "Trust region policy optimization", ICML, appendix C).
    Computed in float32 or better.
    """
    products = jax.tree.map(
        lambda a, b: jnp.vdot(a.astype(_compute_dtype(a.dtype, b.dtype)), b.astype(_compute_dtype(a.dtype, b.dtype))),
        grads,
        step,
    )
    return jnp.sqrt(sum(jax.tree.leaves(products)))
