"""Diagonal estimators: unbiasedness against exact float64 diagonals, and their exact special cases.

* Hutchinson: the mean of many fixed-seed draws is within 4 standard errors of ``diag(H)`` from
  ``jax.hessian`` (Rademacher and Gaussian probes); Rademacher probes are exact on a diagonal quadratic.
* Gauss-Newton-Bartlett: the mean of many draws is within 4 standard errors of ``diag(J^T H_L J)``
  (explicit ``J`` and ``H_L``), for 0/1 masks and token examples.
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from curvature_models import CASES, dense_ggn, dense_hessian  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import optax_second_order as oso  # noqa: E402

NUM_DRAWS = 4000


def flat_problem(name):
    """A case with its parameters flattened to one vector: XLA compiles random draws of one 1-D leaf much
    faster than of several matrices (pytree handling is covered by the quadratic and probe tests)."""
    case = CASES[name]()
    return case, (lambda z: case.value_fn(case.unravel(z))), (lambda z: case.model_fn(case.unravel(z)))


def assert_unbiased(draws, exact, n=4.0):
    """Every coordinate of the mean of ``draws`` (draws, dim) within ``n`` standard errors of ``exact``."""
    draws, exact = np.asarray(draws), np.asarray(exact)
    standard_error = draws.std(0, ddof=1) / np.sqrt(draws.shape[0])
    z = np.abs(draws.mean(0) - exact) / (standard_error + 1e-12 * np.abs(exact).max())
    assert z.max() <= n, f"max |z| = {z.max():.2f}"


def flat_draws(estimator, seed=0):
    """``NUM_DRAWS`` flattened estimates from independent keys, vmapped in one compiled call."""
    keys = jax.random.split(jax.random.key(seed), NUM_DRAWS)
    return jax.jit(jax.vmap(lambda k: ravel_pytree(estimator(k))[0]))(keys)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_for_the_hessian_diagonal(distribution):
    case, value_fn, _ = flat_problem("mlp-softmax")
    draws = flat_draws(lambda k: oso.hutchinson_diagonal(value_fn, case.flat, k, distribution=distribution))
    assert_unbiased(draws, jnp.diag(dense_hessian(case)))


def test_hutchinson_averages_its_probes():
    """``num_probes=n`` is the mean of ``z_k * H z_k`` over the probes ``probes(split(key, n)[k])``,
    with ``H`` the dense Hessian."""
    case, value_fn, _ = flat_problem("mlp-softmax")
    key, n = jax.random.key(3), 5
    hessian = np.asarray(dense_hessian(case))
    zs = np.asarray(jax.jit(jax.vmap(lambda k: oso.probes(k, case.flat)))(jax.random.split(key, n)))
    assert set(np.unique(zs)) == {-1.0, 1.0}
    expected = np.mean(zs * (zs @ hessian), axis=0)
    result = jax.jit(lambda p, k: oso.hutchinson_diagonal(value_fn, p, k, num_probes=n))(case.flat, key)
    np.testing.assert_allclose(ravel_pytree(result)[0], expected, rtol=1e-9, atol=1e-12)


def test_rademacher_hutchinson_is_exact_on_a_diagonal_quadratic():
    """``f(x) = 1/2 sum_j d_j x_j^2`` over a pytree with scalar, vector and matrix leaves: one probe gives ``d``."""
    rng = np.random.default_rng(0)
    d = {"a": jnp.asarray(rng.uniform(-2, 3)), "b": jnp.asarray(rng.uniform(-2, 3, 4)),
         "c": jnp.asarray(rng.uniform(-2, 3, (2, 3)))}
    params = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape)), d)

    def quadratic(x):
        return 0.5 * sum(jnp.sum(dj * xj**2) for dj, xj in zip(jax.tree.leaves(d), jax.tree.leaves(x)))

    estimate = jax.jit(oso.hutchinson_diagonal, static_argnums=(0, 3, 4))
    result = estimate(quadratic, params, jax.random.key(0), 1, "rademacher")
    jax.tree.map(lambda r, e: np.testing.assert_allclose(r, e, rtol=1e-12), result, d)
    gaussian = estimate(quadratic, params, jax.random.key(0), 1, "gaussian")
    assert not np.allclose(ravel_pytree(gaussian)[0], ravel_pytree(d)[0])  # Gaussian probes: z^2 != 1


def test_probes_have_identity_second_moment():
    params = {"w": jnp.zeros((6,)), "b": jnp.zeros((2,))}
    for distribution in ("rademacher", "gaussian"):
        draws = flat_draws(lambda k: oso.probes(k, params, distribution))
        second_moment = np.einsum("ka,kb->kab", draws, draws).reshape(NUM_DRAWS, -1)
        assert_unbiased(second_moment, np.eye(8).reshape(-1))


def test_exact_hessian_diagonal_matches_jax_hessian():
    case = CASES["mlp-softmax"]()
    result = jax.jit(lambda p: oso.exact_hessian_diagonal(case.value_fn, p))(case.params)
    assert jax.tree.structure(result) == jax.tree.structure(case.params)
    np.testing.assert_allclose(ravel_pytree(result)[0], jnp.diag(dense_hessian(case)), rtol=1e-10, atol=1e-14)


def test_bad_arguments_raise_value_error():
    case = CASES["mlp-softmax"]()
    with pytest.raises(ValueError, match="distribution"):
        oso.hutchinson_diagonal(case.value_fn, case.params, jax.random.key(0), distribution="uniform")
    with pytest.raises(ValueError, match="distribution"):
        oso.probes(jax.random.key(0), case.params, "uniform")
    with pytest.raises(ValueError, match="num_probes"):
        oso.hutchinson_diagonal(case.value_fn, case.params, jax.random.key(0), num_probes=0)


@pytest.mark.parametrize("name", ["mlp-squared", "cnn-sigmoid", "attention-softmax"])
def test_gnb_is_unbiased_for_the_ggn_diagonal(name):
    """``B * g_hat^2`` with ``g_hat`` the mean-loss gradient at sampled targets (0/1 weights or none)."""
    case, _, model_fn = flat_problem(name)
    draws = flat_draws(lambda k: oso.gnb_diagonal(model_fn, case.loss, case.flat, k))
    assert_unbiased(draws, jnp.diag(dense_ggn(case)))
