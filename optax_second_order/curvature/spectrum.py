"""Spectrum of a curvature operator: top eigenvalues, trace and spectral density.

* :func:`lanczos`: the Lanczos tridiagonalization ``T = V^T A V`` of a symmetric linear operator on
  pytrees, with full reorthogonalization (Paige 1972; Golub & Van Loan 2013, section 10.1). Its
  Ritz values (eigenvalues of ``T``) approximate the extreme eigenvalues of ``A``;
* :func:`top_eigenvalues` / :func:`hessian_eigenvalues`: the ``k`` largest eigenvalues, by Lanczos
  or by power iteration with deflation (as PyHessian, Yao et al. 2020);
* :func:`hutchinson_trace`: ``tr(H) ~ (1/n) sum_k z_k^T H z_k`` (Hutchinson 1989);
* :func:`operator_spectral_density` / :func:`spectral_density`: stochastic Lanczos quadrature
  (Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019; PyHessian): for a unit probe ``v`` and
  ``T = Y diag(theta) Y^T``, ``v^T f(A) v ~ sum_k tau_k f(theta_k)`` with ``tau_k = Y_{1k}^2``, so the
  eigenvalue density ``(1/N) sum_i delta(t - lambda_i)`` smoothed by a Gaussian of width ``sigma``
  is estimated by ``(1/P) sum_p sum_k tau_pk g_sigma(t - theta_pk)``.

The operator-level functions take any ``matvec`` (``hvp_operator``, ``gnvp_operator`` plus damping,
...) and a ``params`` pytree giving the vectors' structure; the ``hessian_*`` and ``spectral_density``
forms build the Hessian operator of ``value_fn`` for you. Work is in float32 or better; Lanczos keeps
its ``m`` basis vectors (memory ``m x #params``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

from optax_second_order.curvature.estimators import hutchinson_diagonal, probes
from optax_second_order.curvature.products import hvp_operator

__all__ = [
    "lanczos",
    "top_eigenvalues",
    "hessian_eigenvalues",
    "hutchinson_trace",
    "operator_spectral_density",
    "spectral_density",
]

PyTree = Any
_METHODS = ("lanczos", "power")
_DEFAULT_ITERATIONS = {"lanczos": 32, "power": 100}  # PyHessian: 100 power iterations


def _flat_operator(matvec: Callable[[PyTree], PyTree], params: PyTree):
    """``matvec`` on flat vectors in float32 or better, and the flat size and dtype."""
    flat, unravel = ravel_pytree(params)
    dtype = jnp.promote_types(flat.dtype, jnp.float32)
    return lambda x: ravel_pytree(matvec(unravel(x)))[0].astype(dtype), flat.size, dtype


def _project_out(basis: jax.Array, w: jax.Array) -> jax.Array:
    """``w - V^T V w`` done twice (classical Gram-Schmidt, "twice is enough"); rows of ``V`` orthonormal or 0."""
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


def _lanczos_flat(matvec_flat, v0: jax.Array, num_iterations: int) -> jax.Array:
    """Tridiagonal ``T`` (``m x m``) from ``m`` Lanczos steps on flat vectors, started at unit ``v0``.

    Each step: ``w = A v_j``, ``alpha_j = v_j^T w``, ``w`` orthogonalized against all ``v_0..v_j``,
    ``beta_j = ||w||``, ``v_{j+1} = w / beta_j``. If ``w`` vanishes (``beta_j <= 10 eps ||A||``: the
    Krylov space is invariant), ``beta_j = 0`` and the iteration restarts with a pseudo-random vector
    orthogonal to the basis, so ``T`` is block diagonal and every Ritz value stays an eigenvalue estimate.
    """
    n, dtype = v0.size, v0.dtype
    eps = jnp.finfo(dtype).eps

    def step(j, carry):
        basis, v, alphas, betas, norm_a = carry
        basis = basis.at[j].set(v)
        w = matvec_flat(v)
        alphas = alphas.at[j].set(jnp.vdot(v, w))
        norm_a = jnp.maximum(norm_a, jnp.linalg.norm(w))
        w = _project_out(basis, w)
        beta = jnp.linalg.norm(w)
        breakdown = beta <= 10 * eps * norm_a
        restart = _project_out(basis, jax.random.normal(jax.random.fold_in(jax.random.key(0), j), (n,), dtype))
        v_next = jnp.where(breakdown, restart, w)
        v_next = v_next / jnp.maximum(jnp.linalg.norm(v_next), jnp.finfo(dtype).tiny)
        betas = betas.at[j].set(jnp.where(breakdown, 0.0, beta))
        return basis, v_next, alphas, betas, norm_a

    m = num_iterations
    init = (jnp.zeros((m, n), dtype), v0, jnp.zeros(m, dtype), jnp.zeros(m, dtype), jnp.zeros((), dtype))
    _, _, alphas, betas, _ = jax.lax.fori_loop(0, m, step, init)
    off_diagonal = betas[:-1]
    return jnp.diag(alphas) + jnp.diag(off_diagonal, 1) + jnp.diag(off_diagonal, -1)


def lanczos(matvec: Callable[[PyTree], PyTree], v0: PyTree, num_iterations: int) -> jax.Array:
    """The ``m x m`` Lanczos tridiagonal matrix ``T = V^T A V`` of a symmetric operator, started at ``v0``.

    ``V``'s columns are an orthonormal basis of the Krylov space ``span{v0, A v0, ..., A^{m-1} v0}``
    (fully reorthogonalized; restarted if the space becomes invariant), ``v0`` (nonzero) is normalized here,
    and ``m = min(num_iterations, size(v0))``. ``eigvalsh(T)`` are the Ritz values; for unit ``v0``,
    ``v0^T f(A) v0 ~ e_1^T f(T) e_1`` (Gauss quadrature, exact for polynomials of degree < 2m).
    """
    if num_iterations < 1:
        raise ValueError(f"lanczos: num_iterations must be >= 1, got {num_iterations}")
    matvec_flat, n, dtype = _flat_operator(matvec, v0)
    v = ravel_pytree(v0)[0].astype(dtype)
    return _lanczos_flat(matvec_flat, v / jnp.linalg.norm(v), min(num_iterations, n))


def _power_iteration_deflated(matvec_flat, n, dtype, key, k, num_iterations) -> jax.Array:
    """``k`` eigenvalues of largest magnitude, one at a time, each orthogonal to the ones found before."""

    def normalize(w, found):
        w = _project_out(found, w)
        return w / jnp.linalg.norm(w)

    found = jnp.zeros((k, n), dtype)
    values = []
    for i in range(k):
        v0 = normalize(jax.random.normal(jax.random.fold_in(key, i), (n,), dtype), found)
        v = jax.lax.fori_loop(0, num_iterations, lambda _, v, f=found: normalize(matvec_flat(v), f), v0)
        values.append(jnp.vdot(v, matvec_flat(v)))
        found = found.at[i].set(v)
    return jnp.stack(values)


def top_eigenvalues(
    matvec: Callable[[PyTree], PyTree],
    params: PyTree,
    key: jax.Array,
    k: int = 5,
    method: str = "lanczos",
    num_iterations: int | None = None,
) -> jax.Array:
    """The ``k`` top eigenvalues of a symmetric operator on pytrees shaped like ``params``.

    ``method="lanczos"``: the ``k`` largest Ritz values of :func:`lanczos` from a Gaussian start
    drawn from ``key``, in descending order (``num_iterations`` default 32, at most ``#params``,
    at least ``k``). ``method="power"``: power iteration with deflation (PyHessian's method;
    ``num_iterations`` per eigenvalue, default 100), giving the ``k`` eigenvalues of largest
    *magnitude* in the order found; the same as Lanczos's for a PSD operator (GGN, Fisher).
    """
    if method not in _METHODS:
        raise ValueError(f"top_eigenvalues: method must be one of {_METHODS}, got {method!r}")
    matvec_flat, n, dtype = _flat_operator(matvec, params)
    if not 1 <= k <= n:
        raise ValueError(f"top_eigenvalues: k must be in [1, #params={n}], got {k}")
    num_iterations = _DEFAULT_ITERATIONS[method] if num_iterations is None else num_iterations
    if method == "power":
        if num_iterations < 1:
            raise ValueError(f"top_eigenvalues: num_iterations must be >= 1, got {num_iterations}")
        return _power_iteration_deflated(matvec_flat, n, dtype, key, k, num_iterations)
    m = min(max(num_iterations, k), n)
    v0 = jax.random.normal(key, (n,), dtype)
    ritz_values = jnp.linalg.eigvalsh(_lanczos_flat(matvec_flat, v0 / jnp.linalg.norm(v0), m))
    return ritz_values[::-1][:k]


def hessian_eigenvalues(
    value_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    key: jax.Array,
    k: int = 5,
    method: str = "lanczos",
    num_iterations: int | None = None,
) -> jax.Array:
    """The ``k`` top eigenvalues of the Hessian of ``value_fn`` at ``params`` (:func:`top_eigenvalues`)."""
    return top_eigenvalues(hvp_operator(value_fn, params), params, key, k, method, num_iterations)


def hutchinson_trace(
    value_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    key: jax.Array,
    num_probes: int = 1,
    distribution: str = "rademacher",
) -> jax.Array:
    """Hutchinson's estimate ``(1/n) sum_k z_k^T H z_k`` of ``tr(H)``: the sum of :func:`hutchinson_diagonal`.

    Unbiased; with Rademacher probes its variance is ``2 sum_{i != j} H_ij^2 / n`` (zero for diagonal ``H``).
    """
    return otu.tree_sum(hutchinson_diagonal(value_fn, params, key, num_probes, distribution))


def operator_spectral_density(
    matvec: Callable[[PyTree], PyTree],
    params: PyTree,
    key: jax.Array,
    num_probes: int = 1,
    num_iterations: int = 64,
    grid: jax.Array | None = None,
    sigma: float | None = None,
    num_grid: int = 512,
) -> tuple[jax.Array, jax.Array]:
    """Stochastic Lanczos quadrature estimate of the smoothed eigenvalue density of a symmetric operator.

    Probe ``p`` is ``probes(jax.random.split(key, num_probes)[p], params, "rademacher")`` normalized
    to unit length (as PyHessian); each gets ``m = min(num_iterations, #params)`` Lanczos steps
    (PyHessian uses 100) and contributes nodes ``theta_pk`` (Ritz values) with weights ``tau_pk``
    (squared first components of ``T``'s eigenvectors, summing to 1). The density

        phi(t) = (1/P) sum_p sum_k tau_pk exp(-(t - theta_pk)^2 / (2 sigma^2)) / (sigma sqrt(2 pi))

    integrates to 1 and its mean is ``(1/P) sum_p v_p^T A v_p``, an unbiased estimate of ``tr(A)/#params``.

    Args:
      grid: points ``t``; by default ``num_grid`` points over ``[min theta - 5 sigma, max theta + 5 sigma]``.
      sigma: kernel width; by default 1% of ``max theta - min theta``.

    Returns:
      ``(grid, density)``.
    """
    if num_probes < 1 or num_iterations < 1:
        raise ValueError(
            "operator_spectral_density: num_probes and num_iterations must be >= 1, "
            f"got {num_probes} and {num_iterations}"
        )
    matvec_flat, n, dtype = _flat_operator(matvec, params)
    m = min(num_iterations, n)

    def nodes_and_weights(probe_key):
        v = ravel_pytree(probes(probe_key, params, "rademacher"))[0].astype(dtype)
        ritz_values, ritz_vectors = jnp.linalg.eigh(_lanczos_flat(matvec_flat, v / jnp.linalg.norm(v), m))
        return ritz_values, jnp.square(ritz_vectors[0])

    nodes, weights = jax.lax.map(nodes_and_weights, jax.random.split(key, num_probes))
    lo, hi = jnp.min(nodes), jnp.max(nodes)
    if sigma is None:
        sigma = 0.01 * jnp.maximum(hi - lo, jnp.finfo(dtype).eps * jnp.maximum(jnp.abs(hi), 1.0))
    if grid is None:
        grid = jnp.linspace(lo - 5 * sigma, hi + 5 * sigma, num_grid)
    kernel = jnp.exp(-0.5 * jnp.square((grid[:, None] - nodes.ravel()[None, :]) / sigma))
    density = kernel @ weights.ravel() / (num_probes * sigma * jnp.sqrt(2 * jnp.pi))
    return grid, density


def spectral_density(
    value_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    key: jax.Array,
    num_probes: int = 1,
    num_iterations: int = 64,
    grid: jax.Array | None = None,
    sigma: float | None = None,
    num_grid: int = 512,
) -> tuple[jax.Array, jax.Array]:
    """Smoothed Hessian eigenvalue density of ``value_fn`` at ``params`` (:func:`operator_spectral_density`)."""
    return operator_spectral_density(
        hvp_operator(value_fn, params), params, key, num_probes, num_iterations, grid, sigma, num_grid
    )
