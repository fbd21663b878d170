"""Functions of symmetric positive semi-definite matrices, via the eigendecomposition.

For ``M = Q diag(lambda) Q^T`` (``lambda`` clipped at 0, so round-off cannot make it indefinite),

* :func:`inverse_pth_root`: ``(M + delta I)^{-1/p} = Q diag((lambda + delta)^{-1/p}) Q^T`` for any real
  ``p > 0`` (Shampoo's ``p = 4`` or ``2``, SOAP/Adam-in-the-eigenbasis, ...), with damping
  ``delta = eps + relative_eps * lambda_max`` and an optional pseudo-inverse cutoff;
* :func:`damped_inverse`: ``(M + damping I)^{-1}`` (K-FAC's factors) by LU, not eigh: the ``p = 1`` root
  without the eigendecomposition, several times faster on XLA:CPU and on accelerators;
* :func:`eigh_psd`: the eigendecomposition itself (SOAP's eigenbases, EKFAC).

Every function works on a batch of matrices (leading dimensions are blocks), symmetrizes its input
``(M + M^T) / 2``, computes in float32 or better whatever the input dtype, and returns the result in
that dtype: ``float32`` for ``bfloat16``/``float16`` input, the input's dtype otherwise.

Why not ``optax.matrix_inverse_pth_root``: its coupled Newton iteration (Higham 2008, eq. 7.18) raises
the iterate to the power ``2 ** round(log2(p))`` instead of ``p``, so for ``p = 3`` it returns a
multiple of ``M^{-1/4}`` and for ``p = 6`` a multiple of ``M^{-1/8}``, while its reported error
``max|M_k - I|`` is tiny (the iteration converges, to the wrong root). Eigendecomposition has no such
restriction on ``p`` and no convergence tolerance to tune.

Accuracy (``tests/curvature/test_matrix.py``). Metric: ``||R - R_ref||_F / ||R_ref||_F`` with
``R_ref`` computed in float64 from the *same* (float32-rounded) input with the same damping. In
float64 the error is ``<= 1e-9`` up to condition number 1e4. In float32 any algorithm's error is
of order ``cond(M) * u / p`` (``u = 2^-24``): the small eigenvalues of a float32 matrix are only
determined to about ``u * lambda_max``. Eigenvalues taken as Rayleigh quotients (:func:`eigh_psd`)
cut the CPU ``eigh`` error up to 10x; measured at ``n = 32`` (geometric, linear and two-cluster
spectra): ``<= 2e-5`` for all ``p`` at condition number 1e3; at 1e4, ``<= 8e-5`` for ``p >= 2``
but ``1.5e-4`` for ``p = 1``, and the error grows with ``n`` (``n = 128``, geometric spectrum,
cond 1e4: ``1.5e-3`` for ``p = 1``, ``2.2e-4`` for ``p = 4``). A float32 Newton step
``X (p + 1 - X^p M) / p`` did not help (its residual is itself rounded at ``cond * u``). Damp
(``eps``, ``relative_eps``) or use float64 input where that matters.

References: Higham, *Functions of Matrices* (2008), ch. 6-7; Gupta, Koren & Singer, "Shampoo" (2018);
Anil et al., "Scalable second order optimization for deep learning" (2020).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["symmetrize", "eigh_psd", "inverse_pth_root", "damped_inverse"]


def _compute_dtype(dtype) -> jnp.dtype:
    """float32 or better: the input's floating dtype promoted to at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def symmetrize(matrix: jax.Array) -> jax.Array:
    """``(M + M^T) / 2`` over the last two axes."""
    return 0.5 * (matrix + jnp.swapaxes(matrix, -1, -2))


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` at full precision (accelerators otherwise multiply float32 in bfloat16 passes)."""
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def eigh_psd(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues (clipped at 0) and eigenvectors (columns, ascending order) of the symmetrized ``M``.

    The eigenvalues are the Rayleigh quotients ``lambda_i = q_i^T M q_i`` of the computed
    eigenvectors rather than ``eigh``'s own: their error is second order in the eigenvector error
    plus the rounding of one product, which in float32 is up to 10x smaller than ``eigh``'s backward
    error for the small eigenvalues that dominate an inverse root (measured in the tests). Computed
    in float32 or better; batched over leading dimensions.
    """
    m = symmetrize(matrix.astype(_compute_dtype(matrix.dtype)))
    _, eigenvectors = jnp.linalg.eigh(m, symmetrize_input=False)
    eigenvalues = jnp.sum(eigenvectors * _matmul(m, eigenvectors), axis=-2)
    return jnp.maximum(eigenvalues, 0.0), eigenvectors


def _check_nonnegative(name: str, value, fn: str) -> None:
    if isinstance(value, (int, float)) and not value >= 0:
        raise ValueError(f"{fn}: {name} must be >= 0, got {value}")


def _finite_per_matrix(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x), axis=(-2, -1))


def inverse_pth_root(
    matrix: jax.Array,
    p: float,
    eps: float | jax.Array = 1e-6,
    relative_eps: float | jax.Array = 0.0,
    cutoff: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Damped inverse ``p``-th root ``(M + delta I)^{-1/p}`` of symmetric PSD matrices, and a success flag.

    With ``M = Q diag(lambda) Q^T`` (``lambda`` clipped at 0) the root is
    ``Q diag((lambda_i + delta)^{-1/p}) Q^T`` with ``delta = eps + relative_eps * lambda_max``.
    With ``cutoff`` set, eigenvalues ``lambda_i <= cutoff * lambda_max`` get 0 instead
    (a pseudo-inverse root: directions without curvature are left out, not amplified).

    Args:
      matrix: ``[..., n, n]`` symmetric PSD matrices (symmetrized here); leading dimensions are blocks.
      p: the root, any real ``p > 0`` (Shampoo: 4 for a 2-D layer, 2 for one-sided).
      eps: absolute damping (default ``1e-6``, Shampoo's ``epsilon``); scalar or one per block.
      relative_eps: damping relative to the largest eigenvalue (as ``ridge_epsilon`` in Anil et al. 2020).
      cutoff: optional relative eigenvalue threshold in ``[0, 1)`` for the pseudo-inverse.

    Returns:
      ``(root, ok)``: ``root`` of shape ``[..., n, n]`` in float32 or better (the input dtype, or
      float32 for 16-bit input) and ``ok`` of shape ``[...]``, False where the input or the root is
      not finite. A failed block's root is all NaN, so callers keep their previous root with
      ``jnp.where(ok[..., None, None], root, previous)``.
    """
    if isinstance(p, (int, float)) and not p > 0:
        raise ValueError(f"inverse_pth_root: p must be > 0, got {p}")
    _check_nonnegative("eps", eps, "inverse_pth_root")
    _check_nonnegative("relative_eps", relative_eps, "inverse_pth_root")
    if cutoff is not None and not 0.0 <= cutoff < 1.0:
        raise ValueError(f"inverse_pth_root: cutoff must be in [0, 1), got {cutoff}")

    dtype = _compute_dtype(matrix.dtype)
    matrix = matrix.astype(dtype)
    input_ok = _finite_per_matrix(matrix)
    # A non-finite block is replaced by I before eigh (LAPACK on NaN input is undefined) and flagged.
    eye = jnp.eye(matrix.shape[-1], dtype=dtype)
    safe = jnp.where(input_ok[..., None, None], matrix, eye)

    eigenvalues, eigenvectors = eigh_psd(safe)
    lambda_max = jnp.max(eigenvalues, axis=-1, keepdims=True)
    delta = jnp.asarray(eps, dtype)[..., None] + jnp.asarray(relative_eps, dtype)[..., None] * lambda_max
    root_eigenvalues = jnp.power(eigenvalues + delta, -1.0 / jnp.asarray(p, dtype))
    if cutoff is not None:
        root_eigenvalues = jnp.where(eigenvalues > cutoff * lambda_max, root_eigenvalues, 0.0)
    root = _matmul(eigenvectors * root_eigenvalues[..., None, :], jnp.swapaxes(eigenvectors, -1, -2))

    ok = input_ok & _finite_per_matrix(root)
    return jnp.where(ok[..., None, None], root, jnp.nan), ok


def damped_inverse(matrix: jax.Array, damping: float | jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(M + damping I)^{-1}`` of symmetric PSD matrices by LU, and a success flag.

    For ``damping > 0`` the damped matrix is positive definite, so the LU factorization (partial pivoting) of
    ``jnp.linalg.inv`` is stable; it is several times faster than :func:`inverse_pth_root`'s ``eigh`` on
    XLA:CPU (and faster than Cholesky there), the cost of K-FAC's factor inverses
    ``(A + pi sqrt(lambda) I)^{-1}`` (Martens & Grosse 2015, section 6.3).

    Args:
      matrix: ``[..., n, n]`` symmetric PSD matrices (symmetrized here); leading dimensions are blocks.
      damping: scalar or one per block, ``> 0``.

    Returns:
      ``(inverse, ok)``: the inverse in float32 or better and ``ok`` of shape ``[...]``, False where the input
      or the inverse is not finite (callers keep their previous inverse there).
    """
    _check_nonnegative("damping", damping, "damped_inverse")
    dtype = _compute_dtype(matrix.dtype)
    m = symmetrize(matrix.astype(dtype))
    damping = jnp.asarray(damping, dtype)[..., None, None]
    inverse = jnp.linalg.inv(m + damping * jnp.eye(m.shape[-1], dtype=dtype))
    ok = _finite_per_matrix(m) & _finite_per_matrix(inverse)
    return inverse, ok
