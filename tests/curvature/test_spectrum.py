"""Spectrum tools against dense float64 references (``eigvalsh`` / ``eigh`` of explicit matrices).

* ``lanczos``: full-dimension runs recover every eigenvalue (indefinite, low-rank with restarts, an
  invariant start vector); short runs satisfy the Gauss-quadrature moment identity
  ``e_1^T T^j e_1 = v^T A^j v`` (``j < 2m``);
* ``hessian_eigenvalues`` (Lanczos, fewer steps than parameters) vs ``eigvalsh(jax.hessian)`` on an
  MLP and a CNN; power iteration on the GGN vs ``eigvalsh`` of explicit ``J^T H_L J``;
* ``hutchinson_trace`` vs ``z^T H z`` of the dense Hessian for the same probes, and statistically vs ``tr(H)``;
* ``spectral_density``: with ``m = #params`` it equals ``(1/P) sum_p v_p^T g_sigma(t - H) v_p`` from the
  dense eigendecomposition; for any ``m`` it integrates to 1 and its mean is the same-probe ``v^T H v``.
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from curvature_models import CASES, dense_ggn, dense_hessian  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import optax_second_order as oso  # noqa: E402
from optax_second_order.curvature.spectrum import (  # noqa: E402
    hessian_eigenvalues,
    hutchinson_trace,
    lanczos,
    spectral_density,
    top_eigenvalues,
)


@pytest.fixture(scope="module")
def mlp():
    case = CASES["mlp-softmax"]()
    return case, np.asarray(dense_hessian(case))


def matrix_operator(a):
    return lambda v: {"x": jnp.asarray(a) @ v["x"]}


def symmetric(seed, eigenvalues):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigenvalues),) * 2))
    return (q * np.asarray(eigenvalues, float)) @ q.T


@pytest.mark.parametrize(
    "a, v0",
    [
        (symmetric(0, np.linspace(-2.0, 3.0, 12)), np.ones(12)),  # indefinite
        (symmetric(1, [4.0, 2.0, 1.0] + [0.0] * 9), np.ones(12)),  # rank 3: Krylov space invariant after 4 steps
        (np.diag(np.arange(1.0, 13.0)), np.eye(12)[0]),  # start vector is an eigenvector
    ],
)
def test_lanczos_full_dimension_recovers_all_eigenvalues(a, v0):
    t = np.asarray(lanczos(matrix_operator(a), {"x": jnp.asarray(v0)}, 12))
    np.testing.assert_allclose(t, np.triu(np.tril(t, 1), -1))  # tridiagonal
    np.testing.assert_allclose(np.linalg.eigvalsh(t), np.linalg.eigvalsh(a), atol=1e-12)


def test_lanczos_moments_match_gauss_quadrature():
    a = symmetric(2, np.linspace(-1.0, 2.0, 30))
    v = np.random.default_rng(3).normal(size=30)
    m = 5
    t = np.asarray(lanczos(matrix_operator(a), {"x": jnp.asarray(v)}, m))
    assert t.shape == (m, m)
    u = v / np.linalg.norm(v)
    for j in range(2 * m):
        np.testing.assert_allclose(
            np.linalg.matrix_power(t, j)[0, 0], u @ np.linalg.matrix_power(a, j) @ u, rtol=1e-9, atol=1e-12
        )


@pytest.mark.parametrize("name, num_iterations", [("mlp-softmax", 32), ("cnn-sigmoid", 48)])
def test_hessian_eigenvalues_lanczos_match_dense(name, num_iterations):
    case = CASES[name]()
    expected = np.linalg.eigvalsh(np.asarray(dense_hessian(case)))[::-1][:5]
    top = jax.jit(lambda p, key: hessian_eigenvalues(case.value_fn, p, key, k=5, num_iterations=num_iterations))(
        case.params, jax.random.key(0)
    )
    assert case.flat.size > num_iterations
    np.testing.assert_allclose(top, expected, rtol=0, atol=1e-8 * abs(expected[0]))


def test_power_iteration_on_gauss_newton_matches_dense():
    case = CASES["mlp-squared"]()
    expected = np.linalg.eigvalsh(np.asarray(dense_ggn(case)))[::-1][:3]

    @jax.jit
    def top(params, key):
        ggn = oso.gnvp_operator(case.model_fn, case.loss, params)
        return top_eigenvalues(ggn, params, key, k=3, method="power")

    top = top(case.params, jax.random.key(1))
    np.testing.assert_allclose(top, expected, rtol=1e-6)


@jax.jit
def flat_probes(params, keys):
    return jax.vmap(lambda k: ravel_pytree(oso.probes(k, params))[0])(keys)


def hessian_quadratic_forms(case, hessian, key, num_probes):
    """``z_k^T H z_k`` for the probes ``hutchinson_trace`` documents: ``probes(split(key, P)[k], params)``."""
    zs = np.asarray(flat_probes(case.params, jax.random.split(key, num_probes)))
    return np.einsum("ki,ij,kj->k", zs, hessian, zs)


def test_hutchinson_trace_same_probes_and_unbiased(mlp):
    case, hessian = mlp
    key = jax.random.key(2)
    forms = hessian_quadratic_forms(case, hessian, key, 100)
    estimate = jax.jit(lambda p, k: hutchinson_trace(case.value_fn, p, k, num_probes=100))(case.params, key)
    np.testing.assert_allclose(estimate, forms.mean(), rtol=1e-10)
    standard_error = forms.std(ddof=1) / np.sqrt(len(forms))
    assert abs(estimate - np.trace(hessian)) < 4 * standard_error


def check_normalized_with_trace_estimate_mean(case, hessian, key, num_probes, grid, density):
    step = grid[1] - grid[0]
    np.testing.assert_allclose(np.sum(density) * step, 1.0, atol=1e-6)
    mean = np.sum(grid * density) * step
    forms = hessian_quadratic_forms(case, hessian, key, num_probes)
    np.testing.assert_allclose(mean, forms.mean() / hessian.shape[0], rtol=1e-6)


def test_spectral_density_full_lanczos_equals_dense_quadrature(mlp):
    case, hessian = mlp
    n = hessian.shape[0]
    key, sigma, num_probes = jax.random.key(3), 0.05, 3
    eigenvalues, q = np.linalg.eigh(hessian)
    grid = np.linspace(eigenvalues[0] - 0.5, eigenvalues[-1] + 0.5, 2048)
    _, density = jax.jit(lambda p, k: spectral_density(case.value_fn, p, k, num_probes, n, jnp.asarray(grid), sigma))(
        case.params, key
    )
    kernel = np.exp(-0.5 * ((grid[:, None] - eigenvalues[None, :]) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
    # The same unit probes: v^T g(t - H) v = sum_i (q_i^T v)^2 g(t - lambda_i), |z|^2 = n for Rademacher z.
    weights = np.square(np.asarray(flat_probes(case.params, jax.random.split(key, num_probes))) @ q) / n
    expected = kernel @ weights.mean(axis=0)
    np.testing.assert_allclose(density, expected, rtol=0, atol=1e-9 * expected.max())
    check_normalized_with_trace_estimate_mean(case, hessian, key, num_probes, grid, np.asarray(density))


def test_short_lanczos_density_normalized_and_mean_is_trace_estimate(mlp):
    case, hessian = mlp
    key, num_probes = jax.random.key(4), 4
    grid, density = jax.jit(lambda p, k: spectral_density(case.value_fn, p, k, num_probes, 8, num_grid=2048))(
        case.params, key
    )
    check_normalized_with_trace_estimate_mean(case, hessian, key, num_probes, np.asarray(grid), np.asarray(density))


def test_bad_arguments_raise(mlp):
    case, _ = mlp
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="method"):
        hessian_eigenvalues(case.value_fn, case.params, key, method="arnoldi")
    with pytest.raises(ValueError, match="k must be"):
        hessian_eigenvalues(case.value_fn, case.params, key, k=0)
    with pytest.raises(ValueError, match="num_probes"):
        spectral_density(case.value_fn, case.params, key, num_probes=0)
