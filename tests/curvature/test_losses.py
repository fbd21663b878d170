"""Output-space losses against direct formulas (optax's losses, squared error by hand), ``jax.hessian``
of the weighted mean loss, and the statistics of targets sampled from the model (frequencies,
Gaussian moments, and the exponential-family identity ``E_t[s s^T] = H_L``)."""

import functools

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

import optax_second_order as oso  # noqa: E402

RNG = np.random.default_rng(0)
LOGITS = jnp.asarray(RNG.standard_normal((6, 4)))  # 6 examples, 4 classes / outputs
LABELS = jnp.asarray(RNG.integers(0, 4, 6))
WEIGHTS = jnp.asarray(RNG.uniform(0.5, 2.0, 6))
MASK = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
BINARY = jnp.asarray(RNG.integers(0, 2, (6, 4)), jnp.float64)
REGRESSION = jnp.asarray(RNG.standard_normal((6, 4)))


def weighted_mean(per_example, weights):
    return per_example.mean() if weights is None else jnp.sum(weights * per_example) / jnp.sum(weights)


@pytest.mark.parametrize("weights", [None, WEIGHTS, MASK], ids=["unweighted", "weights", "mask"])
def test_values_match_direct_formulas(weights):
    one_hot = jax.nn.one_hot(LABELS, 4)
    cases = [
        (oso.losses.softmax_cross_entropy(LABELS, weights),
         optax.softmax_cross_entropy_with_integer_labels(LOGITS, LABELS)),
        (oso.losses.softmax_cross_entropy(one_hot, weights), optax.softmax_cross_entropy(LOGITS, one_hot)),
        (oso.losses.sigmoid_binary_cross_entropy(BINARY, weights),
         optax.sigmoid_binary_cross_entropy(LOGITS, BINARY).sum(-1)),
        (oso.losses.squared_error(REGRESSION, weights), 0.5 * np.sum((np.asarray(LOGITS - REGRESSION)) ** 2, -1)),
    ]
    for loss, per_example in cases:
        np.testing.assert_allclose(loss.per_example(LOGITS), per_example, rtol=1e-12)
        np.testing.assert_allclose(loss(LOGITS), weighted_mean(per_example, weights), rtol=1e-12)
        expected_count = 6.0 if weights is None else np.sum(weights)
        np.testing.assert_allclose(loss.num_examples(LOGITS), expected_count)


def test_event_ndim_and_sequence_shapes():
    """``event_ndim`` chooses which axes form one example; a (batch, time) mask weighs token examples."""
    y, t = LOGITS.reshape(2, 3, 4), REGRESSION.reshape(2, 3, 4)
    elementwise = oso.losses.squared_error(t, event_ndim=0)
    np.testing.assert_allclose(elementwise(y), 0.5 * np.mean((np.asarray(y - t)) ** 2), rtol=1e-12)
    per_sequence = oso.losses.squared_error(t, event_ndim=2)
    assert per_sequence.per_example(y).shape == (2,)
    np.testing.assert_allclose(per_sequence(y), 0.5 * np.sum((np.asarray(y - t)) ** 2) / 2, rtol=1e-12)

    mask = MASK.reshape(2, 3)
    tokens = oso.losses.softmax_cross_entropy(LABELS.reshape(2, 3), mask)
    direct = optax.softmax_cross_entropy_with_integer_labels(y, LABELS.reshape(2, 3))
    np.testing.assert_allclose(tokens(y), jnp.sum(mask * direct) / jnp.sum(mask), rtol=1e-12)


def test_leading_axis_is_the_batch():
    """``(N,)`` binary logits and regression outputs are ``N`` examples (the mean, as optax), like ``(N, 1)``."""
    logits, labels = LOGITS[:, 0], BINARY[:, 0]
    binary = oso.losses.sigmoid_binary_cross_entropy(labels)
    np.testing.assert_allclose(binary(logits), optax.sigmoid_binary_cross_entropy(logits, labels).mean(), rtol=1e-12)
    assert binary.num_examples(logits) == 6
    column = oso.losses.sigmoid_binary_cross_entropy(labels[:, None])
    np.testing.assert_allclose(column(logits[:, None]), binary(logits), rtol=1e-12)
    regression = oso.losses.squared_error(REGRESSION[:, 0])
    np.testing.assert_allclose(regression(LOGITS[:, 0]), 0.5 * np.mean((LOGITS[:, 0] - REGRESSION[:, 0]) ** 2), rtol=1e-12)
    hessian = jax.hessian(binary)(logits)
    np.testing.assert_allclose(binary.output_hvp(logits, jnp.eye(6)[2]), hessian[2], rtol=1e-12)
    single = oso.losses.softmax_cross_entropy(LABELS[0])
    assert single.num_examples(LOGITS[0]) == 1


@pytest.mark.parametrize(
    "loss, outputs",
    [
        (oso.losses.sigmoid_binary_cross_entropy(BINARY[:, 0]), LOGITS[:, :1]),  # (N,) targets, (N, 1) logits
        (oso.losses.squared_error(REGRESSION), LOGITS[:5]),  # another batch
        (oso.losses.softmax_cross_entropy(LABELS), LOGITS[:5]),
        (oso.losses.softmax_cross_entropy(jax.nn.one_hot(LABELS, 4)), LOGITS[:, :3]),
    ],
    ids=["binary-column", "regression-batch", "softmax-batch", "one-hot-classes"],
)
def test_outputs_that_do_not_match_the_targets_raise(loss, outputs):
    with pytest.raises(ValueError, match="do not match targets"):
        loss(outputs)
    with pytest.raises(ValueError, match="do not match targets"):
        jax.eval_shape(loss.output_hvp, outputs, outputs)


def test_a_tuple_of_outputs_raises_a_type_error():
    """A linen ``apply(..., mutable=...)`` returns ``(outputs, state)``: say so."""
    with pytest.raises(TypeError, match="mutable"):
        oso.losses.softmax_cross_entropy(LABELS)((LOGITS, {}))


def test_statistics_in_float32_for_low_precision_outputs():
    loss = oso.losses.softmax_cross_entropy(LABELS)
    y = LOGITS.astype(jnp.bfloat16)
    assert loss(y).dtype == jnp.float32
    assert loss.output_hvp(y, y).dtype == jnp.bfloat16


def test_losses_are_pytrees_through_jit():
    loss = oso.losses.softmax_cross_entropy(LABELS, MASK)
    assert len(jax.tree.leaves(loss)) == 2
    np.testing.assert_allclose(jax.jit(lambda loss, y: loss(y))(loss, LOGITS), loss(LOGITS), rtol=1e-12)
    other = loss.with_targets(jnp.zeros_like(LABELS))
    assert other.weights is loss.weights and other(LOGITS) != loss(LOGITS)


LOSSES = {
    "softmax-int": oso.losses.softmax_cross_entropy(LABELS, WEIGHTS),
    "softmax-onehot": oso.losses.softmax_cross_entropy(jax.nn.one_hot(LABELS, 4), MASK),
    "sigmoid": oso.losses.sigmoid_binary_cross_entropy(BINARY, WEIGHTS),
    "squared": oso.losses.squared_error(REGRESSION, MASK),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_output_hvp_matches_jax_hessian(name):
    loss = LOSSES[name]
    hessian = jax.hessian(loss)(LOGITS)  # (6, 4, 6, 4)
    v = jnp.asarray(np.random.default_rng(1).standard_normal(LOGITS.shape))
    np.testing.assert_allclose(loss.output_hvp(LOGITS, v), jnp.tensordot(hessian, v, axes=2), rtol=1e-10, atol=1e-14)


def test_per_example_output_grads_closed_form():
    """``s_i = p_i - onehot(t_i)`` (softmax), ``sigmoid(y_i) - t_i``, ``y_i - t_i``."""
    expected = {
        "softmax-int": jax.nn.softmax(LOGITS) - jax.nn.one_hot(LABELS, 4),
        "softmax-onehot": jax.nn.softmax(LOGITS) - jax.nn.one_hot(LABELS, 4),
        "sigmoid": jax.nn.sigmoid(LOGITS) - BINARY,
        "squared": LOGITS - REGRESSION,
    }
    for name, loss in LOSSES.items():
        np.testing.assert_allclose(loss.per_example_output_grad(LOGITS), expected[name], rtol=1e-12, atol=1e-15)


NUM_DRAWS = 20_000


@functools.cache
def draw_targets(name):
    """``NUM_DRAWS`` target sets sampled at ``LOGITS`` (one compiled call per loss, shared by the tests)."""
    keys = jax.random.split(jax.random.key(0), NUM_DRAWS)
    return np.asarray(jax.jit(jax.vmap(LOSSES[name].sample_targets, in_axes=(0, None)))(keys, LOGITS))


def assert_within_standard_errors(estimate, expected, standard_error, n=4.0):
    z = np.abs(np.asarray(estimate) - np.asarray(expected)) / np.asarray(standard_error)
    assert z.max() <= n, f"max |z| = {z.max():.2f}"


@pytest.mark.parametrize("name", ["softmax-int", "softmax-onehot"])
def test_softmax_samples_follow_softmax_probabilities(name):
    samples = draw_targets(name)
    one_hot = samples if samples.ndim == 3 else np.eye(4)[samples]
    if samples.ndim == 3:
        assert set(np.unique(samples)) <= {0.0, 1.0} and np.all(samples.sum(-1) == 1)
    else:
        assert samples.dtype == LABELS.dtype
    p = np.asarray(jax.nn.softmax(LOGITS))
    assert_within_standard_errors(one_hot.mean(0), p, np.sqrt(p * (1 - p) / NUM_DRAWS))


def test_bernoulli_samples_follow_sigmoid_probabilities():
    samples = draw_targets("sigmoid")
    assert set(np.unique(samples)) == {0.0, 1.0}
    p = np.asarray(jax.nn.sigmoid(LOGITS))
    assert_within_standard_errors(samples.mean(0), p, np.sqrt(p * (1 - p) / NUM_DRAWS))


def test_gaussian_samples_have_mean_outputs_and_unit_variance():
    samples = draw_targets("squared")
    assert_within_standard_errors(samples.mean(0), LOGITS, np.full(LOGITS.shape, 1 / np.sqrt(NUM_DRAWS)))
    variance = samples.var(0, ddof=1)
    assert_within_standard_errors(variance, np.ones(LOGITS.shape), np.full(LOGITS.shape, np.sqrt(2 / NUM_DRAWS)))


@pytest.mark.parametrize("name", list(LOSSES))
def test_true_output_fisher_equals_output_hessian(name):
    """``(w_i / W) E_t[s_i s_i^T]`` (``s_i`` the output gradient at sampled targets) equals the blocks
    of ``output_hvp``'s matrix, and its off-diagonal (cross-example) blocks are zero."""
    loss = LOSSES[name]
    basis = jnp.eye(LOGITS.size).reshape(-1, *LOGITS.shape)
    matrix = jax.vmap(lambda e: loss.output_hvp(LOGITS, e))(basis).reshape(6, 4, 6, 4)
    blocks = np.einsum("iaib->iab", matrix)
    off_diagonal = np.asarray(matrix) * (1 - np.eye(6))[:, None, :, None]
    assert np.all(off_diagonal == 0)

    targets = draw_targets(name)
    output_grad = jax.vmap(lambda t: loss.with_targets(t).per_example_output_grad(LOGITS))
    s = np.asarray(jax.jit(output_grad)(targets))  # (draws, 6, 4)
    w = np.asarray(loss.weights)
    outer = (w / w.sum())[:, None, None] * np.einsum("kia,kib->kiab", s, s)
    standard_error = outer.std(0, ddof=1) / np.sqrt(NUM_DRAWS)
    assert_within_standard_errors(outer.mean(0), blocks, standard_error + 1e-12)


# --- the KL divergence between predictive distributions ---------------------------------------------------------------

NEW_LOGITS = LOGITS + jnp.asarray(np.random.default_rng(2).standard_normal(LOGITS.shape))


def direct_kl(name, y, y_new):
    """``KL(p(t | y_i) || p(t | y'_i))`` per example by the textbook formulas, in float64 NumPy."""
    y, y_new = np.asarray(y, np.float64), np.asarray(y_new, np.float64)
    if name.startswith("softmax"):
        log_p = y - np.log(np.sum(np.exp(y), -1, keepdims=True))
        log_q = y_new - np.log(np.sum(np.exp(y_new), -1, keepdims=True))
        return np.sum(np.exp(log_p) * (log_p - log_q), -1)
    if name == "sigmoid":
        s, s_new = 1 / (1 + np.exp(-y)), 1 / (1 + np.exp(-y_new))
        return np.sum(s * np.log(s / s_new) + (1 - s) * np.log((1 - s) / (1 - s_new)), -1)
    return 0.5 * np.sum((y - y_new) ** 2, -1)


@pytest.mark.parametrize("name", list(LOSSES))
def test_kl_matches_direct_formulas(name):
    loss = LOSSES[name]
    expected = weighted_mean(direct_kl(name, LOGITS, NEW_LOGITS), np.asarray(loss.weights))
    np.testing.assert_allclose(loss.kl(LOGITS, NEW_LOGITS), expected, rtol=1e-10)
    assert float(loss.kl(LOGITS, LOGITS)) == 0.0
    np.testing.assert_allclose(jax.jit(lambda loss, a, b: loss.kl(a, b))(loss, LOGITS, NEW_LOGITS), expected,
                               rtol=1e-10)


def expected_log_likelihood_ratio(name, loss, y, y_new):
    """``E_{t ~ p(t | y)}[l(y', t) - l(y, t)]`` (the definition of the KL, ``l = -log p``) per example, from the
    loss's own per-example values: every class (softmax), all 2^4 target vectors (Bernoulli), or Gauss-Hermite
    quadrature on every coordinate (Gaussian: the log-ratio is a sum over coordinates, each of degree 2)."""
    def ratio(t):
        other = loss.with_targets(t)
        return np.asarray(other.per_example(y_new) - other.per_example(y))

    if name.startswith("softmax"):
        p = np.asarray(jax.nn.softmax(y, -1))
        one_hot = name.endswith("onehot")
        return sum(p[:, k] * ratio(jax.nn.one_hot(jnp.full(6, k), 4) if one_hot else jnp.full(6, k))
                   for k in range(4))
    if name == "sigmoid":
        s = np.asarray(jax.nn.sigmoid(y))
        total = 0.0
        for bits in np.ndindex(*(2,) * 4):
            t = np.broadcast_to(np.asarray(bits, np.float64), (6, 4))
            total = total + np.prod(np.where(t == 1, s, 1 - s), -1) * ratio(jnp.asarray(t))
        return total
    nodes, weights = np.polynomial.hermite_e.hermegauss(5)
    return sum(w / np.sqrt(2 * np.pi) * ratio(y + z) for z, w in zip(nodes, weights))


@pytest.mark.parametrize("name", list(LOSSES))
def test_kl_is_the_expected_log_likelihood_ratio(name):
    loss = LOSSES[name]
    per_example = expected_log_likelihood_ratio(name, loss, LOGITS, NEW_LOGITS)
    np.testing.assert_allclose(loss.kl(LOGITS, NEW_LOGITS), weighted_mean(per_example, np.asarray(loss.weights)),
                               rtol=1e-10)


@pytest.mark.parametrize("name", list(LOSSES))
def test_kl_is_half_the_output_fisher_to_second_order(name):
    """``KL(y, y + h v) = h^2/2 v^T H_L v + O(h^3)``: the output Hessian is the predictive distribution's Fisher."""
    loss = LOSSES[name]
    v = jnp.asarray(np.random.default_rng(3).standard_normal(LOGITS.shape))
    quadratic = 0.5 * float(jnp.vdot(v, loss.output_hvp(LOGITS, v)))
    for h in (1e-2, 1e-3):
        assert float(loss.kl(LOGITS, LOGITS + h * v)) / h**2 == pytest.approx(quadratic, rel=5 * h)


@pytest.mark.parametrize("name", list(LOSSES))
def test_kl_of_a_small_change_in_float32_has_no_cancellation(name):
    """float32 outputs a small step apart (KL about 1e-6): the KL to 1e-4 of the float64 formula on the same numbers,
    where ``sum p (log p - log q)`` in float32 keeps the logits' rounding (about 1e-7 each) in a result of 1e-6."""
    loss = jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.float64 else x, LOSSES[name])
    y = (3 * LOGITS).astype(jnp.float32)
    y_new = y + (1e-3 * jnp.asarray(np.random.default_rng(4).standard_normal(y.shape))).astype(jnp.float32)
    realized = loss.kl(y, y_new)
    assert realized.dtype == jnp.float32
    expected = float(weighted_mean(direct_kl(name, y, y_new), np.asarray(loss.weights, np.float64)))
    assert float(realized) == pytest.approx(expected, rel=1e-4)
