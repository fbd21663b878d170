"""Curvature-vector products against dense float64 references on an MLP, a small CNN and an attention block.

* ``hvp`` / ``hvp_operator``   vs ``jax.hessian`` of the flattened parameters;
* ``gnvp`` / ``gnvp_operator`` vs explicit ``J^T H_L J`` (``J`` from jax.jacobian, ``H_L`` from jax.hessian);
* ``fisher_vp``                vs the explicit sampled Fisher ``(1/W) sum_i w_i g_i g_i^T`` built from
  per-example gradients at the same sampled targets (the key splitting of ``fisher_vp`` reproduced),
  and, averaged over many draws, vs the GGN (statistically);
* ``empirical_fisher_vp`` / ``empirical_fisher_diagonal`` vs explicit per-example gradients.
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from curvature_models import (  # noqa: E402
    CASES,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    dense_sampled_fisher,
    per_example_gradients,
)
from jax.flatten_util import ravel_pytree  # noqa: E402

import optax_second_order as oso  # noqa: E402

RTOL = 1e-6


def assert_relative_close(actual, expected, rtol=RTOL):
    """``||actual - expected|| <= rtol ||expected||`` on flattened pytrees."""
    actual, expected = np.asarray(ravel_pytree(actual)[0]), np.asarray(ravel_pytree(expected)[0])
    assert actual.shape == expected.shape
    error = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
    assert error <= rtol, f"relative error {error:.2e} > {rtol:.0e}"


@pytest.fixture(scope="module", params=["mlp-softmax", "cnn-sigmoid", "attention-softmax"])
def case(request):
    """The three models (squared error enters through ``test_fisher_vp_averages_to_gnvp`` and the GNB test)."""
    return CASES[request.param]()


@pytest.fixture(scope="module")
def vectors(case):
    """Two random parameter-space directions, as pytrees."""
    rng = np.random.default_rng(42)
    return [case.unravel(jnp.asarray(rng.standard_normal(case.flat.shape))) for _ in range(2)]


@pytest.fixture(scope="module")
def hessian(case):
    return dense_hessian(case)


@pytest.fixture(scope="module")
def ggn(case):
    return dense_ggn(case)


def flat(tree):
    return ravel_pytree(tree)[0]


def test_hvp_matches_dense_hessian(case, vectors, hessian):
    @jax.jit
    def products(params, v0, v1):
        hessian_vp = oso.hvp_operator(case.value_fn, params)
        return oso.hvp(case.value_fn, params, v0), hessian_vp(v0), hessian_vp(v1)

    direct, *operator = products(case.params, *vectors)
    assert jax.tree.structure(direct) == jax.tree.structure(case.params)
    assert_relative_close(flat(direct), hessian @ flat(vectors[0]))
    for result, v in zip(operator, vectors):
        assert_relative_close(flat(result), hessian @ flat(v))


def test_grad_and_hvp_fn_matches_grad_and_dense_hessian(case, vectors, hessian):
    @jax.jit
    def products(params, v0):
        grads, hvp_fn = oso.grad_and_hvp_fn(case.value_fn, params)
        value, grads2, hvp_fn2 = oso.grad_and_hvp_fn(case.value_fn, params, return_value=True)
        return grads, hvp_fn(v0), value, grads2, hvp_fn2(v0)

    grads, product, value, grads2, product2 = products(case.params, vectors[0])
    reference = jax.grad(case.value_fn)(case.params)
    assert_relative_close(flat(grads), flat(reference))
    assert_relative_close(flat(grads2), flat(reference))
    assert_relative_close(jnp.atleast_1d(value), jnp.atleast_1d(case.value_fn(case.params)))
    for result in (product, product2):
        assert_relative_close(flat(result), hessian @ flat(vectors[0]))


def test_gnvp_matches_explicit_ggn(case, vectors, ggn):
    @jax.jit
    def products(loss, params, v0, v1):
        ggn_vp = oso.gnvp_operator(case.model_fn, loss, params)
        return oso.gnvp(case.model_fn, loss, params, v0), ggn_vp(v0), ggn_vp(v1)

    direct, *operator = products(case.loss, case.params, *vectors)
    assert jax.tree.structure(direct) == jax.tree.structure(case.params)
    assert_relative_close(flat(direct), ggn @ flat(vectors[0]))
    for result, v in zip(operator, vectors):
        assert_relative_close(flat(result), ggn @ flat(v))


def test_gnvp_quadratic_form_matches_explicit_ggn(case, vectors, ggn):
    quadratic = jax.jit(lambda loss, params, v: oso.gnvp_quadratic_form(case.model_fn, loss, params, v))
    for v in vectors:
        np.testing.assert_allclose(quadratic(case.loss, case.params, v), flat(v) @ ggn @ flat(v), rtol=1e-8)


def test_ggn_differs_from_hessian(hessian, ggn):
    """Guards the references above: on these non-linear models ``H != J^T H_L J`` (residual term)."""
    assert np.linalg.norm(hessian - ggn) > 1e-3 * np.linalg.norm(ggn)


def test_fisher_vp_matches_explicit_sampled_fisher(case, vectors):
    """``(1/W) sum_i w_i (1/S) sum_k g_ik g_ik^T v``, ``g_ik`` the gradient of ``l_i`` at target draw ``k``.

    The targets are drawn as ``fisher_vp`` draws them: ``sample_targets(k, outputs)`` for
    ``k in jax.random.split(key, num_samples)``.
    """
    key, num_samples, v = jax.random.key(7), 3, vectors[0]
    draw = jax.vmap(case.loss.sample_targets, in_axes=(0, None))
    sampled = jax.jit(lambda p: draw(jax.random.split(key, num_samples), case.model_fn(p)))(case.params)
    grads = np.asarray(per_example_gradients(case, sampled))  # (draws, examples, params)
    w = np.asarray(case.example_weights).reshape(-1)
    fisher = np.einsum("kip,i,kiq->pq", grads, w, grads) / (num_samples * np.sum(w))

    product = jax.jit(lambda loss, p, v, k: oso.fisher_vp(case.model_fn, loss, p, v, k, num_samples=num_samples))
    result = product(case.loss, case.params, v, key)
    assert jax.tree.structure(result) == jax.tree.structure(case.params)
    assert_relative_close(flat(result), fisher @ flat(v))


@pytest.mark.parametrize("name", ["mlp-softmax", "mlp-squared"])
def test_fisher_vp_averages_to_gnvp(name):
    """``E_t[F v] = G v`` (exponential family): the mean of 2000 single-draw products lies within 4
    standard errors of the exact GGN product in every coordinate (softmax and Gaussian sampling; the
    Bernoulli sampling's Fisher identity is checked in test_losses)."""
    case = CASES[name]()
    ggn = dense_ggn(case)
    v = case.unravel(jnp.asarray(np.random.default_rng(42).standard_normal(case.flat.shape)))
    draws = jax.jit(
        jax.vmap(lambda k: flat(oso.fisher_vp(case.model_fn, case.loss, case.params, v, k)))
    )(jax.random.split(jax.random.key(11), 2000))
    draws = np.asarray(draws)
    mean = np.mean(draws, axis=0)
    standard_error = np.std(draws, axis=0, ddof=1) / np.sqrt(draws.shape[0])
    exact = np.asarray(ggn @ flat(v))
    z = np.abs(mean - exact) / (standard_error + 1e-12 * np.abs(exact).max())
    assert z.max() <= 4.0, f"max |z| = {z.max():.2f}"


def test_empirical_fisher_matches_per_example_gradients(case, vectors):
    """``(1/N) sum_i g_i g_i^T v`` and ``(1/N) sum_i g_i^2`` at the data's targets, ``N`` every example
    (weights are not used)."""
    grads = np.asarray(per_example_gradients(case, case.loss.targets))
    empirical_fisher = grads.T @ grads / grads.shape[0]

    @jax.jit
    def products(params, v0, v1):
        vp = lambda v: oso.empirical_fisher_vp(case.per_example_value_fn, params, v)
        return vp(v0), vp(v1), oso.empirical_fisher_diagonal(case.per_example_value_fn, params)

    *results, diagonal = products(case.params, *vectors)
    for result, v in zip(results, vectors):
        assert_relative_close(flat(result), empirical_fisher @ flat(v))
    assert jax.tree.structure(diagonal) == jax.tree.structure(case.params)
    assert_relative_close(flat(diagonal), np.mean(np.square(grads), axis=0))


# --- Square roots of the output Hessian, factor forms and the new operator forms -------------------------


def columns(factor):
    """A factor pytree with a leading axis ``m`` as the ``(#params, m)`` matrix ``U``."""
    return np.asarray(jax.vmap(lambda column: ravel_pytree(column)[0])(factor)).T


@pytest.mark.parametrize("name", ["mlp-softmax", "mlp-squared", "mlp-sigmoid", "cnn-sigmoid", "attention-softmax"])
def test_output_hessian_square_root(name):
    """``S S^T = H_L`` (jax.hessian of the weighted mean loss w.r.t. the flattened outputs) and
    ``output_hessian_sqrt_transpose_vp`` is the transpose of ``output_hessian_sqrt_vp``, with weights and masks."""
    case = CASES[name]()
    outputs = case.model_fn(case.params)
    size = outputs.size
    basis = jnp.eye(size, dtype=outputs.dtype).reshape((size,) + outputs.shape)

    @jax.jit
    def explicit(outputs):
        root = jax.vmap(lambda e: case.loss.output_hessian_sqrt_vp(outputs, e).reshape(-1))(basis).T
        root_t = jax.vmap(lambda e: case.loss.output_hessian_sqrt_transpose_vp(outputs, e).reshape(-1))(basis).T
        hessian = jax.hessian(lambda y: case.loss(y.reshape(outputs.shape)))(outputs.reshape(-1))
        return root, root_t, hessian

    root, root_t, hessian = map(np.asarray, explicit(outputs))
    np.testing.assert_allclose(root @ root.T, hessian, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(root_t, root.T, rtol=1e-12, atol=1e-15)
    masked = np.asarray(case.example_weights).reshape(-1) == 0  # masked examples get a zero block
    if masked.any():
        assert np.all(root.reshape(len(masked), -1, size)[masked] == 0)


def test_ggn_factor_matches_explicit_ggn(case, ggn):
    factor = jax.jit(lambda p: oso.ggn_factor(case.model_fn, case.loss, p))(case.params)
    u = columns(factor)
    assert u.shape == (case.flat.size, case.model_fn(case.params).size)
    np.testing.assert_allclose(u @ u.T, ggn, rtol=1e-10, atol=1e-13)


FACTOR_CASES = ["mlp-softmax", "mlp-sigmoid", "attention-softmax"]  # weights, a zero weight, tokens with a mask


def random_vectors(case):
    rng = np.random.default_rng(42)
    return [case.unravel(jnp.asarray(rng.standard_normal(case.flat.shape))) for _ in range(2)]


@pytest.mark.parametrize("name", FACTOR_CASES)
def test_fisher_factor_and_operator_match_explicit_sampled_fisher(name):
    """Same key, same draws: ``U U^T`` of ``fisher_factor``, every product of ``fisher_operator`` (one fixed
    matrix) and ``fisher_vp`` all equal the sampled Fisher built from per-example gradients."""
    case = CASES[name]()
    vectors = random_vectors(case)
    key, num_samples = jax.random.key(5), 2
    fisher = dense_sampled_fisher(case, key, num_samples)

    @jax.jit
    def compute(params, v0, v1, key):
        operator = oso.fisher_operator(case.model_fn, case.loss, params, key, num_samples)
        factor = oso.fisher_factor(case.model_fn, case.loss, params, key, num_samples)
        direct = oso.fisher_vp(case.model_fn, case.loss, params, v0, key, num_samples)
        return factor, operator(v0), operator(v1), direct

    factor, *products, direct = compute(case.params, *vectors, key)
    u = columns(factor)
    examples = np.asarray(case.example_weights).size
    assert u.shape == (case.flat.size, num_samples * examples)
    np.testing.assert_allclose(u @ u.T, fisher, rtol=1e-10, atol=1e-13)
    for result, v in zip(products, vectors):
        assert_relative_close(flat(result), fisher @ flat(v))
    assert_relative_close(flat(direct), flat(products[0]), rtol=1e-12)


@pytest.mark.parametrize("name", FACTOR_CASES)
def test_empirical_fisher_factor_and_operator_match_per_example_gradients(name):
    case = CASES[name]()
    vectors = random_vectors(case)
    empirical = dense_empirical_fisher(case)

    @jax.jit
    def compute(params, v0, v1):
        operator = oso.empirical_fisher_operator(case.per_example_value_fn, params)
        return oso.empirical_fisher_factor(case.per_example_value_fn, params), operator(v0), operator(v1)

    factor, *products = compute(case.params, *vectors)
    u = columns(factor)
    np.testing.assert_allclose(u @ u.T, empirical, rtol=1e-10, atol=1e-13)
    for result, v in zip(products, vectors):
        assert_relative_close(flat(result), empirical @ flat(v))


def test_num_samples_must_be_positive():
    case = CASES["mlp-softmax"]()
    with pytest.raises(ValueError, match="num_samples"):
        oso.fisher_operator(case.model_fn, case.loss, case.params, jax.random.key(0), num_samples=0)
