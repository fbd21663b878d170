"""Functions of symmetric positive semi-definite matrices, via the eigendecomposition.

For ``M = Q diag(lambda) Q^T`` (``lambda`` clipped at 0, so round-off cannot make it indefinite),

* :func:`inverse_pth_root`: ``(M + delta I)^{-1/p} = Q diag((lambda + delta)^{-1/p}) Q^T`` for any real
  ``p > 0`` (Shampoo's ``p = 4`` or ``2``, SOAP/Adam-in-the-eigenbasis, ...), with damping
  ``delta = eps + relative_eps * lambda_max`` and an optional pseudo-inverse cutoff;
* :func:`damped_inverse`: ``(M + damping I)^{-1}`` (K-FAC's factors) by LU, not eigh: the ``p = 1`` root
  without the eigendecomposition, several times faster on XLA:CPU and on accelerators;
* :func:`eigh_psd`: the eigendecomposition itself (SOAP's eigenbases, EKFAC);
* :func:`one_matrix_at_a_time`: how every batched factorization here runs on CPU (one matrix per LAPACK call,
  which avoids a deadlock of jaxlib 0.10's batched CPU kernels); its first call limits the OpenBLAS behind those
  kernels to one thread (:func:`~optax_second_order.curvature.threads.one_lapack_thread`).

Every function works on a batch of matrices (leading dimensions are blocks), symmetrizes its input
``(M + M^T) / 2``, computes in float32 or better whatever the input dtype, and returns the result in
that dtype: ``float32`` for ``bfloat16``/``float16`` input, the input's dtype otherwise.

Matmul-only refreshes (no eigh, no Householder QR: the forms that suit accelerators), batched likewise:

* :func:`inverse_pth_root_newton`: the damped root for integer ``p`` by the coupled Newton iteration
  (Guo & Higham 2006), with a convergence residual; cold-started, as it must be;
* :func:`inverse_pth_root_in_basis`: the root from an approximate eigenbasis and its Rayleigh quotients,
  the sound warm start (the basis kept between refreshes);
* :func:`orthonormalize`: QR's ``Q`` by shifted CholeskyQR3, and :func:`orthogonal_iteration_step`, one
  step ``qr((M / ||M||_F + shift I) Q)`` with it (SOAP's eigenbasis refresh).

Which is faster depends on the backend; ``docs/api/matrix.md`` has measurements (on a 2-core CPU with one
OpenBLAS thread, eigh and Householder QR are faster than these).

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

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from optax_second_order.curvature.threads import one_lapack_thread

__all__ = [
    "symmetrize", "one_matrix_at_a_time", "eigh_psd", "inverse_pth_root", "damped_inverse",
    "inverse_pth_root_newton", "inverse_pth_root_in_basis", "orthonormalize", "orthogonal_iteration_step",
]


def _compute_dtype(dtype) -> jnp.dtype:
    """float32 or better: the input's floating dtype promoted to at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def symmetrize(matrix: jax.Array) -> jax.Array:
    """``(M + M^T) / 2`` over the last two axes."""
    return 0.5 * (matrix + jnp.swapaxes(matrix, -1, -2))


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` at full precision (accelerators otherwise multiply float32 in bfloat16 passes)."""
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def one_matrix_at_a_time(fn: Callable[..., Any], *matrices: jax.Array) -> Any:
    """``fn(*matrices)`` for a factorization ``fn`` batched over the leading axes; on CPU, one matrix per call.

    jaxlib 0.10's CPU LAPACK kernels (``eigh``, ``cholesky``, ``qr``, ``inv``, ...) split a batch into tasks on
    XLA:CPU's intra-op thread pool and block their own pool thread until those finish. When as many batched calls
    run at once as the pool has threads (independent calls in one jitted step, which XLA runs concurrently: two on
    a 2-core machine), every thread waits for tasks no thread is left to run, and the step never returns (seen
    with SOAP's staggered refreshes; ``docs/api/matrix.md`` has a reproducer with plain ``jnp.linalg.qr``).
    A single matrix makes no such tasks, so on CPU the batch goes through
    :func:`jax.lax.map`, one matrix per call (measured on 2 cores: the same time for a stack of 128 x 128
    ``eigh``, 1.5x longer for two 1000 x 1000). Other backends get the batched call
    (:func:`jax.lax.platform_dependent`).

    Args:
      fn: ``fn(*matrices) -> pytree`` on ``[..., m, n]`` arrays, batched over the leading axes like
        ``jnp.linalg.eigh``; every output leaf has those leading axes.
      matrices: ``[..., m_i, n_i]`` arrays with the same leading axes.
    """
    one_lapack_thread()  # on CPU, once per process: LAPACK with one OpenBLAS thread (curvature/threads.py)
    batch = matrices[0].shape[:-2]
    if math.prod(batch) <= 1:
        return fn(*matrices)
    flat = tuple(m.reshape((-1, *m.shape[len(batch):])) for m in matrices)
    out = jax.lax.platform_dependent(*flat, cpu=lambda *ms: jax.lax.map(lambda one: fn(*one), ms), default=fn)
    return jax.tree.map(lambda x: x.reshape((*batch, *x.shape[1:])), out)


def eigh_psd(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues (clipped at 0) and eigenvectors (columns, ascending order) of the symmetrized ``M``.

    The eigenvalues are the Rayleigh quotients ``lambda_i = q_i^T M q_i`` of the computed
    eigenvectors rather than ``eigh``'s own: their error is second order in the eigenvector error
    plus the rounding of one product, which in float32 is up to 10x smaller than ``eigh``'s backward
    error for the small eigenvalues that dominate an inverse root (measured in the tests). Computed
    in float32 or better; batched over leading dimensions.
    """
    m = symmetrize(matrix.astype(_compute_dtype(matrix.dtype)))
    eigenvectors = one_matrix_at_a_time(lambda x: jnp.linalg.eigh(x, symmetrize_input=False)[1], m)
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
    XLA:CPU, the cost of K-FAC's factor inverses ``(A + pi sqrt(lambda) I)^{-1}`` (Martens & Grosse 2015,
    section 6.3). ``L^{-T} L^{-1}`` from a Cholesky factorization (one triangular solve against ``I`` and a product)
    took 37 ms for a 1000 x 1000 matrix against LU's 50 ms alone (one OpenBLAS thread), but K-FAC's benchmark step
    on the autoencoder did not move (91.3 against 92.8 ms mean, 8 rounds of ``python -m optax_second_order.bench
    ab``), and in float32 it fails outright on a factor whose damping is below about ``1e-7`` of its norm, where LU
    still returns a usable inverse: LU stays.

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
    inverse = one_matrix_at_a_time(jnp.linalg.inv, m + damping * jnp.eye(m.shape[-1], dtype=dtype))
    ok = _finite_per_matrix(m) & _finite_per_matrix(inverse)
    return inverse, ok


# Matmul-only refreshes: inverse roots by the coupled Newton iteration, eigenbases by orthogonal
# iteration with Cholesky-based QR. No eigh and no Householder QR, which are slow on accelerators (and on
# CPU when OpenBLAS's threads compete with XLA's; docs/api/matrix.md has timings).

_POWER_ITERATIONS = 20


def _integer_root(p, fn: str) -> int:
    """``p`` as a Python int; it fixes the number of products per Newton step, so it must be static."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or p != int(p) or p < 1:
        raise ValueError(f"{fn}: p must be an integer >= 1 (a Python number), got {p!r}")
    return int(p)


def _matrix_power(t: jax.Array, p: int) -> jax.Array:
    """``T^p`` for a static integer ``p >= 1`` by repeated squaring (at most ``2 log2 p`` products)."""
    result, base = None, t
    while True:
        if p & 1:
            result = base if result is None else _matmul(result, base)
        p >>= 1
        if not p:
            return result
        base = _matmul(base, base)


def _max_eigenvalue(matrix: jax.Array, iterations: int = _POWER_ITERATIONS) -> jax.Array:
    """``lambda_max`` of PSD matrices from the Rayleigh quotient ``v^T M v`` after ``iterations`` power steps.

    ``v <- M v / ||M v||`` from a fixed pseudo-random start, as Anil et al. (2020): matrix-vector
    products only, and never above the true ``lambda_max``. 20 steps: the estimate's relative error is
    ``O((lambda_2 / lambda_1)^40)``, and it only sets the relative damping.
    """
    n = matrix.shape[-1]
    start = np.random.default_rng(1729).uniform(-1.0, 1.0, n)
    # shaped (and, inside shard_map, varying over the devices) like the matrices' columns
    vector = jnp.zeros_like(matrix[..., 0]) + jnp.asarray(start, matrix.dtype)
    tiny = jnp.finfo(matrix.dtype).tiny

    def power_step(_, v):
        w = jnp.einsum("...ij,...j->...i", matrix, v, precision=jax.lax.Precision.HIGHEST)
        return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), tiny)

    vector = jax.lax.fori_loop(0, iterations, power_step, vector)
    return jnp.einsum("...i,...ij,...j->...", vector, matrix, vector, precision=jax.lax.Precision.HIGHEST)


def _coupled_newton(m: jax.Array, x: jax.Array, p: int, tolerance: float, max_iterations: int):
    """Iterate ``T = ((p + 1) I - M) / p; X <- X T; M <- T^p M`` until ``||M - I||_F <= tolerance``.

    The scalar map ``m -> m ((p + 1 - m) / p)^p`` brings every eigenvalue in ``(0, (p + 1) / 2]`` closer
    to 1, so the residual ``||M - I||_F`` decreases until round-off. Per block, a step that does not lower
    it is rejected and the block stops there (its round-off level, or eigenvalues of ``M`` lost in
    round-off when the condition number nears ``1 / u``). Returns ``(X, residual)``.
    """
    eye = jnp.eye(m.shape[-1], dtype=m.dtype)

    def residual(m):
        return jnp.linalg.norm(m - eye, axis=(-2, -1))

    def keep_going(state):
        k, _, _, _, done = state
        return (k < max_iterations) & ~jnp.all(done)

    def newton_step(state):
        k, x, m, error, done = state
        t = ((p + 1) * eye - m) / p
        new_x, new_m = _matmul(x, t), symmetrize(_matmul(_matrix_power(t, p), m))
        new_error = residual(new_m)
        accept = ~done & (new_error < error)
        x = jnp.where(accept[..., None, None], new_x, x)
        m = jnp.where(accept[..., None, None], new_m, m)
        error = jnp.where(accept, new_error, error)
        return k + 1, x, m, error, done | ~accept | (error <= tolerance)

    error = residual(m)
    state = (jnp.zeros((), jnp.int32), x, m, error, ~(error > tolerance))
    _, x, _, error, _ = jax.lax.while_loop(keep_going, newton_step, state)
    return x, error


def inverse_pth_root_newton(
    matrix: jax.Array,
    p: int,
    eps: float | jax.Array = 1e-6,
    relative_eps: float | jax.Array = 0.0,
    max_iterations: int = 100,
    tolerance: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Damped inverse ``p``-th root ``(M + delta I)^{-1/p}`` by the coupled Newton iteration (matmuls only).

    With ``A = M + delta I``, ``delta = eps + relative_eps * lambda_max`` (``lambda_max`` from 20
    power-iteration steps) and ``z = (p + 1) / (2 ||A||_F)``, the coupled iteration of Guo & Higham
    (2006), Higham (2008, eq. 7.18)

        X_0 = z^{1/p} I,   M_0 = z A,   T_k = ((p + 1) I - M_k) / p,
        X_{k+1} = X_k T_k,   M_{k+1} = T_k^p M_k

    keeps ``M_k = X_k^p A`` (every iterate is a polynomial in ``A``, so they commute) and converges
    quadratically to ``X = A^{-1/p}``, ``M = I``, for every integer ``p >= 1`` (``T_k^p`` by repeated
    squaring). ``z`` puts the spectrum of ``M_0`` in ``(0, (p + 1) / 2]``, inside the scalar iteration's
    region of convergence ``(0, p + 1)``; small eigenvalues first grow by a factor of about
    ``((p + 1) / p)^p`` (2 to ``e``) per step, so the number of steps grows with ``log(cond(A))``: for
    ``p = 4`` and ``n = 64 .. 512``, 9 to 10 at condition number 1e2, 14 at 1e4, 19 at 1e6. It is *not* warm-started from a
    previous root: the iteration needs a start that commutes with ``A``, and the uncoupled correction
    ``X <- X ((p + 1) I - X^p A) / p`` from a previous root diverges (the tests show it at condition
    number 1e2 with statistics changed by 1e-3). :func:`inverse_pth_root_in_basis` is the sound warm start.

    The loop stops per block once ``||M_k - I||_F <= tolerance`` or the residual stops decreasing (its
    round-off level in float32 is about ``p sqrt(n) eps / 4``); default ``tolerance = 4 p sqrt(n) eps``
    (``eps`` the machine epsilon of the compute dtype), about 16 times that level. In float32 keep the
    damped condition number below about 1e6 (``relative_eps >= 1e-6``): beyond it no float32 root
    (eigh's neither) is accurate to better than a few percent, and the iteration may stop short (``ok``
    False).

    Accuracy (``tests/curvature/test_matrix.py``; ``||R - R_ref||_F / ||R_ref||_F`` against float64
    eigh on the same input, ``n = 32``, ``p`` in 1..8): float64 ``<= 2e-12`` up to condition number
    1e4; float32 ``0.5 to 1.1 u cond / p`` (``u = 2^-24``) for condition numbers 1e2 to 1e4, one to
    four times :func:`inverse_pth_root`'s error (``5.5e-4`` for ``p = 1``, ``1.1e-4`` for ``p = 4`` at 1e4).
    Cost: ``floor(log2 p) + popcount(p) + 1`` products per step (4 for ``p = 4``, 3 for ``p = 2``),
    14 steps at condition number 1e4.

    Args:
      matrix: ``[..., n, n]`` symmetric PSD matrices (symmetrized here); leading dimensions are blocks.
      p: the root, an integer ``>= 1`` (a Python number: it sets the products per step).
      eps: absolute damping (default ``1e-6`` as :func:`inverse_pth_root`); scalar or one per block.
      relative_eps: damping relative to ``lambda_max`` (Anil et al.'s ``matrix_epsilon``).
      max_iterations: most Newton steps (default 100, Anil et al.'s); reached only when not converging.
      tolerance: stop once ``||M_k - I||_F`` is at most this (default ``4 p sqrt(n) eps``).

    Returns:
      ``(root, ok, error)``: ``root`` ``[..., n, n]`` in float32 or better; ``error`` ``[...]`` the final
      ``||M_k - I||_F``, an upper bound on ``max_i |m_i - 1|`` over the eigenvalues of ``M_k``, so the
      root's relative error from stopping is about ``error / p`` in every eigendirection; ``ok`` ``[...]``
      True where the input is finite and ``error <= tolerance``. A failed block's root is all NaN, so
      callers keep their previous root with ``jnp.where(ok[..., None, None], root, previous)``.

    References: Guo & Higham, "A Schur-Newton method for the matrix p-th root and its inverse", SIAM J.
    Matrix Anal. Appl. 28 (2006); Higham, *Functions of Matrices* (2008), sec. 7.3; Anil et al. (2020).
    """
    fn = "inverse_pth_root_newton"
    p = _integer_root(p, fn)
    _check_nonnegative("eps", eps, fn)
    _check_nonnegative("relative_eps", relative_eps, fn)
    if not (isinstance(max_iterations, int) and max_iterations >= 1):
        raise ValueError(f"{fn}: max_iterations must be an integer >= 1, got {max_iterations!r}")
    _check_nonnegative("tolerance", 0.0 if tolerance is None else tolerance, fn)

    dtype = _compute_dtype(matrix.dtype)
    n = matrix.shape[-1]
    if tolerance is None:
        tolerance = 4.0 * p * np.sqrt(n) * float(jnp.finfo(dtype).eps)
    matrix = symmetrize(matrix.astype(dtype))
    input_ok = _finite_per_matrix(matrix)
    eye = jnp.eye(n, dtype=dtype)
    safe = jnp.where(input_ok[..., None, None], matrix, eye)

    delta = jnp.asarray(eps, dtype) + jnp.asarray(relative_eps, dtype) * _max_eigenvalue(safe)
    damped = safe + delta[..., None, None] * eye
    z = (p + 1) / (2 * jnp.linalg.norm(damped, axis=(-2, -1)))
    start = jnp.broadcast_to(jnp.power(z, 1.0 / p)[..., None, None] * eye, damped.shape)
    root, error = _coupled_newton(z[..., None, None] * damped, start, p, tolerance, max_iterations)
    root = symmetrize(root)

    ok = input_ok & _finite_per_matrix(root) & (error <= tolerance)
    return jnp.where(ok[..., None, None], root, jnp.nan), ok, error


def inverse_pth_root_in_basis(
    matrix: jax.Array,
    basis: jax.Array,
    p: float,
    eps: float | jax.Array = 1e-6,
    relative_eps: float | jax.Array = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(M + delta I)^{-1/p}`` from an approximate orthonormal eigenbasis ``Q`` of ``M`` (matmuls only).

    With the Rayleigh quotients ``lambda_i = q_i^T M q_i`` (clipped at 0) and ``delta = eps +
    relative_eps * max_i lambda_i``, the root is ``Q diag((lambda_i + delta)^{-1/p}) Q^T``: exact when
    ``Q`` is an eigenbasis (as :func:`inverse_pth_root`, which takes ``Q`` from eigh), else the root of
    the matrix ``M`` would be if ``Q`` were its eigenbasis. This is the sound way to warm-start a refresh:
    keep ``Q`` between refreshes and update it with :func:`orthogonal_iteration_step` (the warm-started
    QR iteration of Shi et al. 2023 and Eschenhagen et al. 2025, who refresh from eigh only when
    ``error`` is large). Any real ``p > 0``.

    Returns:
      ``(root, ok, error)``: ``ok`` False where the root is not finite (its root is all NaN), and
      ``error = ||offdiag(Q^T M Q)||_F / ||Q^T M Q||_F``, 0 for an exact eigenbasis (Eschenhagen et al.'s
      criterion for recomputing the basis).
    """
    fn = "inverse_pth_root_in_basis"
    if isinstance(p, (int, float)) and not p > 0:
        raise ValueError(f"{fn}: p must be > 0, got {p}")
    _check_nonnegative("eps", eps, fn)
    _check_nonnegative("relative_eps", relative_eps, fn)

    dtype = jnp.promote_types(_compute_dtype(matrix.dtype), basis.dtype)
    matrix, basis = symmetrize(matrix.astype(dtype)), basis.astype(dtype)
    rotated = _matmul(jnp.swapaxes(basis, -1, -2), _matmul(matrix, basis))
    diagonal = jnp.diagonal(rotated, axis1=-2, axis2=-1)
    off_diagonal = rotated - diagonal[..., None] * jnp.eye(rotated.shape[-1], dtype=dtype)
    norm = functools.partial(jnp.linalg.norm, axis=(-2, -1))
    error = norm(off_diagonal) / jnp.maximum(norm(rotated), jnp.finfo(dtype).tiny)

    eigenvalues = jnp.maximum(diagonal, 0.0)
    lambda_max = jnp.max(eigenvalues, axis=-1, keepdims=True)
    delta = jnp.asarray(eps, dtype)[..., None] + jnp.asarray(relative_eps, dtype)[..., None] * lambda_max
    root_eigenvalues = jnp.power(eigenvalues + delta, -1.0 / jnp.asarray(p, dtype))
    root = _matmul(basis * root_eigenvalues[..., None, :], jnp.swapaxes(basis, -1, -2))
    ok = _finite_per_matrix(root)
    return jnp.where(ok[..., None, None], root, jnp.nan), ok, error


def _cholesky_qr_pass(a: jax.Array, shift: float) -> tuple[jax.Array, jax.Array]:
    """One Cholesky QR pass ``G = A^T A + shift I = R^T R``, ``Q = A R^{-1}``; returns ``(Q, G)``."""
    gram = _matmul(jnp.swapaxes(a, -1, -2), a)
    if shift:
        gram = gram + shift * jnp.eye(a.shape[-1], dtype=a.dtype)
    q = one_matrix_at_a_time(_divide_by_cholesky_factor, gram, a)
    return q, gram


def _divide_by_cholesky_factor(gram: jax.Array, a: jax.Array) -> jax.Array:
    """``A R^{-1}`` for ``G = R^T R`` (Cholesky)."""
    lower = jnp.linalg.cholesky(gram)
    return jax.lax.linalg.triangular_solve(lower, a, left_side=False, lower=True, transpose_a=True)


def orthonormalize(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The ``Q`` of ``A = QR`` (``R`` upper triangular with a positive diagonal) by shifted CholeskyQR3.

    Columns are first scaled to unit norm (``Q`` does not change under positive column scaling), then

        G = A^T A + s I = R^T R,   Q_1 = A R^{-1},        s = m eps  (``A`` is ``m x k``),

    a shifted pass that cannot break down for numerically rank-deficient ``A`` (Fukaya et al. 2020; their
    worst-case shift is larger, and a larger shift makes ``Q_1`` less orthogonal), followed by two plain
    passes (CholeskyQR2, Fukaya et al. 2014) that make ``Q`` orthonormal to working precision. Every pass
    divides by an upper-triangular ``R``, so ``Q``'s first ``j`` columns span ``A``'s first ``j`` columns,
    exactly as Householder QR: orthogonal iteration (SOAP's eigenbasis refresh) needs that nesting, which
    a polar factor (Newton-Schulz) lacks. Three ``k x k`` Gram products, Cholesky factorizations and
    triangular solves; no Householder QR.

    Measured in float32 (``n = 64 .. 1024``): orthonormal to ``||Q^T Q - I||_F <= 1e-5`` and the same
    columns as Householder QR (up to sign) for condition numbers up to 1e6 after column scaling. A
    numerically rank-deficient ``A`` either fails (``ok`` False) or, as with Householder QR, gets
    round-off directions for its dependent columns; :func:`orthogonal_iteration_step`'s shift avoids both.

    Args:
      a: ``[..., m, k]`` with ``m >= k``; leading dimensions are a batch. Computed in float32 or better.

    Returns:
      ``(q, ok)``: ``q`` ``[..., m, k]``; ``ok`` ``[...]`` True where ``A`` and ``Q`` are finite and the last
      pass's input was nearly orthonormal (``||Q_2^T Q_2 - I||_F <= 1/2``, which makes the last pass
      exact to working precision). Callers keep their previous basis where ``ok`` is False.

    References: Fukaya, Nakatsukasa, Yanagisawa & Yamamoto, "CholeskyQR2: a simple and communication-avoiding
    algorithm for computing a tall-skinny QR factorization on a large-scale parallel system" (2014);
    Fukaya, Kannan, Nakatsukasa, Yamamoto & Yanagisawa, "Shifted Cholesky QR for computing the QR
    factorization of ill-conditioned matrices", SIAM J. Sci. Comput. 42 (2020).
    """
    dtype = _compute_dtype(a.dtype)
    a = a.astype(dtype)
    m, k = a.shape[-2:]
    if m < k:
        raise ValueError(f"orthonormalize: a must have at least as many rows as columns, got shape {a.shape}")
    scaled = a / jnp.linalg.norm(a, axis=-2, keepdims=True)
    q, _ = _cholesky_qr_pass(scaled, m * float(jnp.finfo(dtype).eps))
    q, _ = _cholesky_qr_pass(q, 0.0)
    q, gram = _cholesky_qr_pass(q, 0.0)
    nearly_orthonormal = jnp.linalg.norm(gram - jnp.eye(k, dtype=dtype), axis=(-2, -1)) <= 0.5
    ok = _finite_per_matrix(a) & _finite_per_matrix(q) & nearly_orthonormal
    return q, ok


def orthogonal_iteration_step(
    matrix: jax.Array, basis: jax.Array, shift: float = 1e-5
) -> tuple[jax.Array, jax.Array]:
    """One step of orthogonal (subspace) iteration: ``Q' R = (M / ||M||_F + shift I) Q`` (Golub & Van Loan 8.2.4).

    SOAP's eigenbasis refresh (Vyas et al. 2024, the official code's ``qr(L Q)``) with
    :func:`orthonormalize` in place of Householder QR: with the columns of ``Q`` sorted by decreasing
    ``q_i^T M q_i``, the first columns of ``Q'`` move towards the leading eigenvectors. ``Q'`` is QR's
    ``Q`` up to column signs (``R`` has a positive diagonal here), which SOAP's second moments do not see
    (they are of squared coordinates).

    The shift (relative to ``||M||_F >= lambda_max``) leaves the eigenvectors and their order as they are
    and bounds the condition number of the product by ``1 + 1 / shift``, so a rank-deficient or zero
    ``M`` (a young Kronecker factor) still gives a basis (a zero ``M`` returns ``Q``). Default ``1e-5``:
    directions with eigenvalues below about ``1e-5 ||M||_F`` are no longer separated, which float32
    products of ``M`` (relative error about ``n u``) cannot resolve anyway; measured, ``1e-6`` is the
    smallest that works for rank-deficient ``M`` up to ``n = 1024``.

    Args:
      matrix: ``[..., n, n]`` symmetric PSD (a Kronecker factor ``L``).
      basis: ``[..., n, k]`` orthonormal columns (the previous eigenbasis, columns sorted as wanted).
      shift: relative shift, a Python number ``>= 0``.

    Returns:
      ``(q, ok)`` as :func:`orthonormalize`.
    """
    _check_nonnegative("shift", shift, "orthogonal_iteration_step")
    dtype = jnp.promote_types(_compute_dtype(matrix.dtype), basis.dtype)
    matrix, basis = matrix.astype(dtype), basis.astype(dtype)
    scale = jnp.maximum(jnp.linalg.norm(matrix, axis=(-2, -1), keepdims=True), jnp.finfo(dtype).tiny)
    return orthonormalize(_matmul(matrix / scale, basis) + shift * basis)
