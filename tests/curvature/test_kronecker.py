"""Kronecker factors against dense references: exact Fisher blocks, explicit patches, analytic expectations."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_second_order as oso
from optax_second_order.curvature import kronecker

jax.config.update("jax_enable_x64", True)

D_IN, D_HID, D_OUT = 3, 4, 3


def _mlp_params(key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "l1": {"w": jax.random.normal(k1, (D_IN, D_HID)), "b": 0.1 * jax.random.normal(k2, (D_HID,))},
        "l2": {"w": jax.random.normal(k3, (D_HID, D_OUT)) / 2, "b": 0.1 * jax.random.normal(k4, (D_OUT,))},
        "scale": jnp.ones(()),
    }


def _mlp(params, x, pre=None):
    """Tagged two-layer MLP; ``pre`` (optional) is added to the first pre-activation (reference Jacobians)."""
    s = kronecker.dense(x, params["l1"]["w"], params["l1"]["b"])
    if pre is not None:
        s = s + pre
    return params["scale"] * kronecker.dense(jnp.tanh(s), params["l2"]["w"], params["l2"]["b"])


def _vec_w(w, b):
    """Row-major vec of ``[w; b]`` (the ordering A (x) G refers to)."""
    return jnp.concatenate([w.reshape(-1), b.reshape(-1)])


def test_find_layers_reports_layers_and_fallback():
    params = _mlp_params(jax.random.key(0))
    layers = kronecker.find_layers(lambda p: _mlp(p, jnp.ones((2, D_IN))), params)
    assert [(l.kernel, l.bias) for l in layers.layers] == [("['l1']['w']", "['l1']['b']"), ("['l2']['w']", "['l2']['b']")]
    assert layers.fallback == ("['scale']",)
    assert "diagonal ['scale']" in layers.summary() and "A 4x4, G 4x4" in layers.summary()


@pytest.mark.parametrize("layer", ["l1", "l2"])
def test_exact_fisher_block_of_one_example_is_kronecker_product(layer):
    """One example: F_W = E_t[vec(dW) vec(dW)^T] = J^T H_L J restricted to W equals A (x) E_t[g g^T]."""
    params = _mlp_params(jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (1, D_IN))
    loss = oso.losses.softmax_cross_entropy(jnp.array([1]))
    layers = kronecker.find_layers(lambda p: _mlp(p, x), params)

    def outputs_of_layer(w, b):
        p = {**params, layer: {"w": w, "b": b}}
        return _mlp(p, x)[0]

    jac = jnp.concatenate(
        [j.reshape(D_OUT, -1) for j in jax.jacobian(outputs_of_layer, argnums=(0, 1))(params[layer]["w"], params[layer]["b"])],
        axis=1,
    )
    logits = _mlp(params, x)
    p = jax.nn.softmax(logits[0])
    h_out = jnp.diag(p) - jnp.outer(p, p)
    exact = jac.T @ h_out @ jac  # true Fisher = GGN block, rows in row-major vec([w; b]) order

    # analytic E_t[g g^T] with g = J_s^T s, E[s s^T] = H_L: J_s of the outputs w.r.t. the layer's pre-activation
    if layer == "l1":
        j_s = jax.jacobian(lambda pre: _mlp(params, x, pre)[0])(jnp.zeros((1, D_HID)))[:, 0, :]
    else:
        j_s = params["scale"] * jnp.eye(D_OUT)
    g_expected = j_s.T @ h_out @ j_s
    stats = kronecker.kronecker_factors(lambda p: _mlp(p, x), params, layers, kronecker.fisher_cotangent(loss))
    a_factor = stats.factors[f"['{layer}']['w']"][0]
    a = jnp.append(jnp.tanh(x[0] @ params["l1"]["w"] + params["l1"]["b"]) if layer == "l2" else x[0], 1.0)
    np.testing.assert_allclose(a_factor, jnp.outer(a, a), rtol=1e-12)
    np.testing.assert_allclose(jnp.kron(a_factor, g_expected), exact, rtol=1e-10, atol=1e-12)

    # empirical Fisher of one example: vec(grad) vec(grad)^T == A (x) G exactly, G from the capture pass
    grad = jax.grad(lambda w, b: loss(outputs_of_layer(w, b)[None]), argnums=(0, 1))(params[layer]["w"], params[layer]["b"])
    v = _vec_w(*grad)
    g_factor = stats.factors[f"['{layer}']['w']"][1]
    np.testing.assert_allclose(jnp.kron(a_factor, g_factor), jnp.outer(v, v), rtol=1e-10, atol=1e-12)


def test_kernel_matrix_round_trip_and_fallback_grads():
    params = _mlp_params(jax.random.key(3))
    x = jax.random.normal(jax.random.key(4), (5, D_IN))
    loss = oso.losses.squared_error(jnp.zeros((5, D_OUT)))
    layers = kronecker.find_layers(lambda p: _mlp(p, x), params)
    layer = layers.layers[0]
    w = kronecker.kernel_matrix(layer, params["l1"]["w"], params["l1"]["b"])
    np.testing.assert_array_equal(w, jnp.concatenate([params["l1"]["w"], params["l1"]["b"][None]]))
    for got, want in zip(kronecker.split_kernel_matrix(layer, w), (params["l1"]["w"], params["l1"]["b"])):
        np.testing.assert_array_equal(got, want)
    stats = kronecker.kronecker_factors(lambda p: _mlp(p, x), params, layers, kronecker.fisher_cotangent(loss))
    # empirical cotangent sqrt(1/N) s_i: the fallback gradient is sqrt(N) times the data gradient
    grad = jax.grad(lambda p: loss(_mlp(p, x)))(params)
    np.testing.assert_allclose(stats.fallback_grads["['scale']"], jnp.sqrt(5.0) * grad["scale"], rtol=1e-10)


def test_random_signs_make_the_fallback_square_the_per_example_squares_and_leave_the_factors():
    """``fisher_cotangent(loss, sign_key=k)``: E_k[fallback grad^2] = sum_i (w_i / W) (d l_i / d scale)^2 (the
    empirical Fisher diagonal from per-example gradients, by ``jax.jacrev`` of the per-example losses), and the
    factors unchanged."""
    params = _mlp_params(jax.random.key(13))
    n = 6
    x = jax.random.normal(jax.random.key(14), (n, D_IN))
    labels = jax.random.randint(jax.random.key(15), (n,), 0, D_OUT)
    weights = jnp.array([1.0, 0.5, 2.0, 1.0, 0.0, 1.5])
    loss = oso.losses.softmax_cross_entropy(labels, weights)
    layers = kronecker.find_layers(lambda p: _mlp(p, x), params)

    per_example = jax.jacrev(lambda p: loss.per_example(_mlp(p, x)))(params)["scale"]  # d l_i / d scale, (n,)
    expected = float(jnp.sum(weights / jnp.sum(weights) * per_example**2))

    @jax.jit
    def statistics(key):
        return kronecker.kronecker_factors(lambda p: _mlp(p, x), params, layers, kronecker.fisher_cotangent(loss, sign_key=key))

    plain = kronecker.kronecker_factors(lambda p: _mlp(p, x), params, layers, kronecker.fisher_cotangent(loss))
    draws = jax.vmap(statistics)(jax.random.split(jax.random.key(16), 4000))
    for name in plain.factors:
        for got, want in zip(draws.factors[name], plain.factors[name]):
            np.testing.assert_allclose(got, jnp.broadcast_to(want, got.shape), rtol=1e-10, atol=1e-14)
    samples = np.asarray(draws.fallback_grads["['scale']"]) ** 2
    error = samples.std() / np.sqrt(len(samples))
    assert abs(samples.mean() - expected) < 4 * error, (samples.mean(), expected, error)
    # without signs the square is the squared batch gradient, which differs (the cross terms stay)
    assert abs(float(plain.fallback_grads["['scale']"]) ** 2 - expected) > 10 * error


def _patches_loop(x, window, strides, padding, dilation):
    """Explicit patches: for every output location, the (C_in, kh, kw)-ordered input window (numpy loops)."""
    x = np.asarray(x)
    n, h, w, c = x.shape
    (pt, pb), (pl, pr) = padding
    xp = np.zeros((n, h + pt + pb, w + pl + pr, c))
    xp[:, pt:pt + h, pl:pl + w] = x
    kh, kw = window
    eh, ew = (kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1
    rows = []
    for i in range(n):
        for r in range(0, xp.shape[1] - eh + 1, strides[0]):
            for q in range(0, xp.shape[2] - ew + 1, strides[1]):
                patch = xp[i, r:r + eh:dilation[0], q:q + ew:dilation[1], :]  # (kh, kw, c)
                rows.append(np.transpose(patch, (2, 0, 1)).reshape(-1))
    return np.array(rows)


@pytest.mark.parametrize(
    "strides,padding,dilation",
    [((1, 1), ((1, 1), (1, 1)), (1, 1)), ((2, 1), ((0, 1), (2, 0)), (1, 2)), ((2, 2), ((0, 0), (0, 0)), (2, 1))],
)
def test_conv_factors_equal_explicit_patches(strides, padding, dilation):
    key = jax.random.key(5)
    x = jax.random.normal(key, (2, 6, 7, 2))
    params = {"k": jax.random.normal(jax.random.key(6), (3, 2, 2, 3)), "b": jnp.arange(3.0)}

    def model(p, delta=None):
        y = kronecker.conv(x, p["k"], p["b"], strides=strides, padding=padding, kernel_dilation=dilation)
        y = y if delta is None else y + delta
        return jnp.sum(jnp.sin(y), axis=(1, 2))

    targets = jax.random.normal(jax.random.key(7), (2, 3))
    loss = oso.losses.squared_error(targets)
    layers = kronecker.find_layers(model, params)
    stats = kronecker.kronecker_factors(model, params, layers, kronecker.fisher_cotangent(loss))
    a_factor, g_factor = stats.factors["['k']"]

    patches = _patches_loop(x, (3, 2), strides, padding, dilation)
    rows = np.concatenate([patches, np.ones((len(patches), 1))], axis=1)
    np.testing.assert_allclose(a_factor, rows.T @ rows / len(rows), rtol=1e-10)

    # the conv output is patches @ W in the kernel_matrix ordering
    out_shape = jax.eval_shape(lambda: kronecker.conv(x, params["k"], params["b"], strides=strides, padding=padding, kernel_dilation=dilation)).shape
    w = kronecker.kernel_matrix(layers.layers[0], params["k"], params["b"])
    y = kronecker.conv(x, params["k"], params["b"], strides=strides, padding=padding, kernel_dilation=dilation)
    np.testing.assert_allclose((rows @ np.asarray(w)).reshape(out_shape), y, rtol=1e-10, atol=1e-12)

    # G = 1/N sum_{i,t} g g^T with g the per-example gradient w.r.t. the conv output (reference perturbation)
    def per_example_loss_sum(delta):
        return jnp.sum(loss.per_example(model(params, delta)))

    g = jax.grad(per_example_loss_sum)(jnp.zeros(out_shape)).reshape(-1, 3)
    np.testing.assert_allclose(g_factor, g.T @ g / 2, rtol=1e-10)


def _expected_g(params, x, loss_name, outputs):
    """(1/N) sum_i J_s,i^T H_i J_s,i for the first layer's pre-activation (analytic true-Fisher G)."""
    def out_i(pre, i):
        return _mlp(params, x[i:i + 1], pre[None])[0]

    total = 0.0
    for i in range(x.shape[0]):
        j_s = jax.jacobian(out_i)(jnp.zeros(D_HID), i)
        y = outputs[i]
        if loss_name == "softmax":
            p = jax.nn.softmax(y)
            h = jnp.diag(p) - jnp.outer(p, p)
        elif loss_name == "sigmoid":
            s = jax.nn.sigmoid(y)
            h = jnp.diag(s * (1 - s))
        else:
            h = jnp.eye(D_OUT)
        total = total + j_s.T @ h @ j_s
    return total / x.shape[0]


@pytest.mark.parametrize("loss_name", ["softmax", "sigmoid", "mse"])
def test_true_fisher_g_matches_analytic_expectation(loss_name):
    params = _mlp_params(jax.random.key(8))
    x = jax.random.normal(jax.random.key(9), (4, D_IN))
    loss = {
        "softmax": oso.losses.softmax_cross_entropy(jnp.zeros(4, jnp.int32)),
        "sigmoid": oso.losses.sigmoid_binary_cross_entropy(jnp.zeros((4, D_OUT))),
        "mse": oso.losses.squared_error(jnp.zeros((4, D_OUT))),
    }[loss_name]
    model = lambda p: _mlp(p, x)  # noqa: E731
    layers = kronecker.find_layers(model, params)

    def sample_g(key):
        return kronecker.kronecker_factors(model, params, layers, kronecker.fisher_cotangent(loss, key)).factors["['l1']['w']"][1]

    samples = jax.jit(jax.vmap(sample_g))(jax.random.split(jax.random.key(10), 2000))
    mean, se = samples.mean(0), samples.std(0) / np.sqrt(len(samples))
    expected = _expected_g(params, x, loss_name, model(params))
    assert np.all(np.abs(mean - expected) <= 4 * se + 1e-12), (mean, expected, se)


# --- EK-FAC: the Fisher's diagonal in the Kronecker-factored eigenbasis -------------------------------------------


def _orthogonal(rng, n):
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def _leaf(tree, name):
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}[name]


def _reference_scales(per_example_grads, q_a, q_g):
    """``s = sum_i (Q_A^T D_i Q_G)**2`` by a loop over the (already ``sqrt(w_i / W)``-scaled) ``D_i``."""
    s = np.zeros((q_a.shape[0], q_g.shape[0]))
    for d in np.asarray(per_example_grads):
        s += (q_a.T @ d @ q_g) ** 2
    return s


def _check_scales(forward, params, make_loss, x, targets, weights, bases=None, rng=None):
    """``kronecker_factors``' scales (empirical Fisher, under jit) against per-example gradients by vmap(grad).

    ``forward(params, x)`` maps a batch (leading axis: examples) to outputs; ``make_loss(targets, weights)``
    builds the output loss. Example ``i``'s objective is ``sum sqrt(w / W) l`` over its loss terms.
    """
    model = lambda p: forward(p, x)  # noqa: E731
    layers = kronecker.find_layers(model, params)
    if bases is None:
        bases = {l.name: (_orthogonal(rng, l.input_dim), _orthogonal(rng, l.output_dim)) for l in layers.layers}
    cotangent = kronecker.fisher_cotangent(make_loss(targets, weights))
    stats = jax.jit(lambda p, b: kronecker.kronecker_factors(model, p, layers, cotangent, b))(params, bases)

    coefficients = jnp.sqrt(weights / jnp.sum(weights))

    def objective(p, x_i, t_i, c_i):
        return jnp.sum(c_i * make_loss(t_i[None]).per_example(forward(p, x_i[None]))[0])

    grads = jax.vmap(jax.grad(objective), in_axes=(None, 0, 0, 0))(params, x, targets, coefficients)
    assert set(stats.scales) == set(bases)
    for layer in layers.layers:
        bias = _leaf(grads, layer.bias) if layer.bias else None
        d = jax.vmap(lambda k, b: kronecker.kernel_matrix(layer, k, b))(_leaf(grads, layer.kernel), bias)
        want = _reference_scales(d, *bases[layer.name])
        np.testing.assert_allclose(stats.scales[layer.name], want, rtol=1e-10, atol=1e-14 * want.max())
    return stats, layers


_LOSSES = {
    # name: (loss, targets of n examples, weights of 6 examples)
    "softmax-weights": (oso.losses.softmax_cross_entropy, lambda rng, n: rng.integers(0, D_OUT, n), [0.5, 2, 1, 0, 1, 0.7]),
    "squared-mask": (oso.losses.squared_error, lambda rng, n: rng.standard_normal((n, D_OUT)), [1, 1, 0, 1, 0, 1]),
    "sigmoid": (oso.losses.sigmoid_binary_cross_entropy, lambda rng, n: rng.integers(0, 2, (n, D_OUT)) * 1.0, [1] * 6),
}


@pytest.mark.parametrize("loss_name", list(_LOSSES))
def test_eigenbasis_scales_of_mlp_equal_per_example_gradients(loss_name):
    """Dense layers, one row per example (the rank-one product path), weights and masks."""
    rng = np.random.default_rng(11)
    make_loss, draw_targets, weights = _LOSSES[loss_name]
    x = jnp.asarray(rng.standard_normal((6, D_IN)))
    targets, weights = jnp.asarray(draw_targets(rng, 6)), jnp.asarray(weights, float)
    _check_scales(_mlp, _mlp_params(jax.random.key(12)), make_loss, x, targets, weights, rng=rng)


def test_eigenbasis_scales_of_conv_net_equal_per_example_gradients():
    """Strided, padded, dilated conv (T locations per example), a conv without bias, then a dense head."""
    rng = np.random.default_rng(13)
    params = {
        "c1": {"k": jnp.asarray(rng.standard_normal((3, 2, 2, 3)) / 3), "b": jnp.asarray(rng.standard_normal(3) / 10)},
        "c2": jnp.asarray(rng.standard_normal((2, 2, 3, 2)) / 3),
        "head": {"w": jnp.asarray(rng.standard_normal((2, D_OUT))), "b": jnp.zeros(D_OUT)},
    }

    def forward(p, x):
        c1 = dict(strides=(2, 1), padding=((0, 1), (2, 0)), kernel_dilation=(1, 2))
        h = jnp.tanh(kronecker.conv(x, p["c1"]["k"], p["c1"]["b"], **c1))
        h = jnp.tanh(kronecker.conv(h, p["c2"], padding=((1, 0), (0, 1)), input_dilation=(1, 2)))
        return kronecker.dense(h.mean((1, 2)), p["head"]["w"], p["head"]["b"])

    x = jnp.asarray(rng.standard_normal((4, 6, 7, 2)))
    labels, weights = jnp.asarray(rng.integers(0, D_OUT, 4)), jnp.array([1.0, 0.3, 2.0, 1.0])
    _, layers = _check_scales(forward, params, oso.losses.softmax_cross_entropy, x, labels, weights, rng=rng)
    assert [l.kind for l in layers.layers] == ["conv", "conv", "dense"]


def test_eigenbasis_scales_of_dense_layers_on_sequences_group_tokens_by_sequence():
    """Dense layers on ``(N, T, d)``; the loss's examples are tokens (masked), grouped by sequence for ``s``."""
    rng = np.random.default_rng(14)
    x = jnp.asarray(rng.standard_normal((3, 4, D_IN)))
    labels = jnp.asarray(rng.integers(0, D_OUT, (3, 4)))
    mask = jnp.array([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 1.0]])
    _check_scales(_mlp, _mlp_params(jax.random.key(15)), oso.losses.softmax_cross_entropy, x, labels, mask, rng=rng)


def _shared(params, x):
    """One square dense layer applied twice (weight sharing), then an output layer."""
    h = jnp.tanh(kronecker.dense(x, params["shared"]["w"], params["shared"]["b"]))
    h = jnp.tanh(kronecker.dense(h, params["shared"]["w"], params["shared"]["b"]))
    return kronecker.dense(h, params["out"])


def test_eigenbasis_scales_of_shared_layer_add_calls_before_squaring():
    rng = np.random.default_rng(16)
    params = {
        "shared": {"w": jnp.asarray(rng.standard_normal((D_IN, D_IN)) / 2), "b": jnp.asarray(rng.standard_normal(D_IN))},
        "out": jnp.asarray(rng.standard_normal((D_IN, D_OUT))),
    }
    x, targets = jnp.asarray(rng.standard_normal((5, D_IN))), jnp.asarray(rng.standard_normal((5, D_OUT)))
    _check_scales(_shared, params, oso.losses.squared_error, x, targets, jnp.ones(5), rng=rng)

    # calls with different numbers of examples cannot be grouped
    layers = kronecker.find_layers(lambda p: _shared(p, x), params)
    two_batches = lambda p: _shared(p, x) + _shared(p, x[:1]).sum(0)  # noqa: E731
    bases = {"['shared']['w']": (jnp.eye(D_IN + 1), jnp.eye(D_IN))}
    cotangent = kronecker.fisher_cotangent(oso.losses.squared_error(targets))
    with pytest.raises(ValueError, match="same number of examples"):
        kronecker.kronecker_factors(two_batches, params, layers, cotangent, bases)


def test_eigenbasis_scales_of_unbatched_dense_input_count_one_example():
    rng = np.random.default_rng(17)
    params = _mlp_params(jax.random.key(18))
    x, targets = jnp.asarray(rng.standard_normal(D_IN)), jnp.asarray(rng.standard_normal((1, D_OUT)))
    model = lambda p: _mlp(p, x)[None]  # noqa: E731
    layers = kronecker.find_layers(model, params)
    bases = {l.name: (_orthogonal(rng, l.input_dim), _orthogonal(rng, l.output_dim)) for l in layers.layers}
    loss = oso.losses.squared_error(targets)
    stats = kronecker.kronecker_factors(model, params, layers, kronecker.fisher_cotangent(loss), bases)
    grads = jax.grad(lambda p: loss(model(p)))(params)
    for name in ("l1", "l2"):
        d = jnp.concatenate([grads[name]["w"], grads[name]["b"][None]])
        want = _reference_scales(d[None], *bases[f"['{name}']['w']"])
        np.testing.assert_allclose(stats.scales[f"['{name}']['w']"], want, rtol=1e-10, atol=1e-14 * want.max())


def test_eigenbasis_scales_of_one_example_are_kfac_eigenvalues():
    """One example's Fisher block is exactly A (x) G: in the eigenbases of A and G, s = outer(eig(A), eig(G))."""
    params = _mlp_params(jax.random.key(19))
    x = jax.random.normal(jax.random.key(20), (1, D_IN))
    loss = oso.losses.softmax_cross_entropy(jnp.array([2]))
    model = lambda p: _mlp(p, x)  # noqa: E731
    layers = kronecker.find_layers(model, params)
    cotangent = kronecker.fisher_cotangent(loss)
    factors = kronecker.kronecker_factors(model, params, layers, cotangent).factors
    eigh = {name: (np.linalg.eigh(a), np.linalg.eigh(g)) for name, (a, g) in factors.items()}
    bases = {name: (ea[1], eg[1]) for name, (ea, eg) in eigh.items()}
    stats, _ = _check_scales(_mlp, params, oso.losses.softmax_cross_entropy, x, jnp.array([2]), jnp.ones(1), bases=bases)
    for name, (ea, eg) in eigh.items():
        np.testing.assert_allclose(stats.scales[name], np.outer(ea[0], eg[0]), rtol=1e-8, atol=1e-12)


def test_without_eigenbases_statistics_are_unchanged():
    params = _mlp_params(jax.random.key(21))
    x = jax.random.normal(jax.random.key(22), (5, D_IN))
    loss = oso.losses.softmax_cross_entropy(jnp.arange(5) % D_OUT)
    model = lambda p: _mlp(p, x)  # noqa: E731
    layers = kronecker.find_layers(model, params)
    cotangent = kronecker.fisher_cotangent(loss)
    bases = {"['l2']['w']": (jnp.eye(D_HID + 1), jnp.eye(D_OUT))}
    plain = kronecker.kronecker_factors(model, params, layers, cotangent)
    with_scales = kronecker.kronecker_factors(model, params, layers, cotangent, bases)
    assert plain.scales == {} and set(with_scales.scales) == {"['l2']['w']"}
    jax.tree.map(
        np.testing.assert_array_equal, (plain.factors, plain.fallback_grads), (with_scales.factors, with_scales.fallback_grads)
    )


def test_eigenbases_are_validated():
    params = _mlp_params(jax.random.key(23))
    model = lambda p: _mlp(p, jnp.ones((2, D_IN)))  # noqa: E731
    layers = kronecker.find_layers(model, params)
    cotangent = kronecker.fisher_cotangent(oso.losses.squared_error(jnp.zeros((2, D_OUT))))
    not_a_layer = {"['scale']": (jnp.eye(1), jnp.eye(1))}
    with pytest.raises(ValueError, match="kronecker_factors: eigenbases names \\['scale'\\]"):
        kronecker.kronecker_factors(model, params, layers, cotangent, not_a_layer)
    with pytest.raises(ValueError, match="must have shapes"):
        kronecker.kronecker_factors(model, params, layers, cotangent, {"['l1']['w']": (jnp.eye(D_IN), jnp.eye(D_HID))})


# --- Dense layers with several input / output axes (Flax's DenseGeneral on trailing axes) ------------------------


def _general_params(key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "g1": {"w": jax.random.normal(k1, (2, 3, 2, 2)) / 2, "b": 0.5 * jax.random.normal(k2, (2, 2))},
        "g2": {"w": jax.random.normal(k3, (2, 2, D_OUT)) / 2, "b": 0.5 * jax.random.normal(k4, (D_OUT,))},
    }


def _general(params, x, pre=None):
    """``x (..., 2, 3)`` -> kernel ``(2, 3, 2, 2)`` -> ``(..., 2, 2)`` -> kernel ``(2, 2, D_OUT)`` -> ``(..., D_OUT)``."""
    s = kronecker.dense(x, params["g1"]["w"], params["g1"]["b"], output_ndim=2)
    if pre is not None:
        s = s + pre
    return kronecker.dense(jnp.tanh(s), params["g2"]["w"], params["g2"]["b"])


def test_dense_with_several_axes_is_the_flattened_matrix_layer():
    params = _general_params(jax.random.key(24))
    x = jax.random.normal(jax.random.key(25), (5, 2, 3))
    layers = kronecker.find_layers(lambda p: _general(p, x), params)
    assert [(l.kernel_shape, l.output_ndim, l.input_dim, l.output_dim) for l in layers.layers] == [
        ((2, 3, 2, 2), 2, 7, 4), ((2, 2, D_OUT), 1, 5, D_OUT)
    ]
    layer, (w, b) = layers.layers[0], (params["g1"]["w"], params["g1"]["b"])
    matrix = kronecker.kernel_matrix(layer, w, b)
    np.testing.assert_array_equal(matrix, np.concatenate([np.reshape(w, (6, 4)), np.reshape(b, (1, 4))]))
    jax.tree.map(np.testing.assert_array_equal, kronecker.split_kernel_matrix(layer, matrix), (w, b))
    rows = kronecker.layer_inputs(layer, x)
    want = np.einsum("nij,ijkl->nkl", x, w) + b  # the layer by an explicit contraction
    np.testing.assert_allclose((rows @ matrix).reshape(5, 2, 2), want, rtol=1e-12)


@pytest.mark.parametrize("layer", ["g1", "g2"])
def test_exact_fisher_block_of_one_example_of_a_dense_general_layer_is_kronecker_product(layer):
    """As for the MLP: the true Fisher block of vec([W; b]) (W = kernel.reshape(d_in, d_out)) is A (x) E_t[g g^T]."""
    params = _general_params(jax.random.key(26))
    x = jax.random.normal(jax.random.key(27), (1, 2, 3))
    loss = oso.losses.softmax_cross_entropy(jnp.array([1]))
    layers = kronecker.find_layers(lambda p: _general(p, x), params)

    def outputs_of_layer(w, b):
        return _general({**params, layer: {"w": w, "b": b}}, x)[0]

    jac = jax.jacobian(outputs_of_layer, argnums=(0, 1))(params[layer]["w"], params[layer]["b"])
    jac = jnp.concatenate([j.reshape(D_OUT, -1) for j in jac], axis=1)  # row-major kernel, then bias
    p = jax.nn.softmax(_general(params, x)[0])
    h_out = jnp.diag(p) - jnp.outer(p, p)
    exact = jac.T @ h_out @ jac

    s1 = jnp.einsum("ij,ijkl->kl", x[0], params["g1"]["w"]) + params["g1"]["b"]
    if layer == "g1":
        j_s = jax.jacobian(lambda pre: _general(params, x, pre)[0])(jnp.zeros((1, 2, 2))).reshape(D_OUT, 4)
        a = jnp.append(x[0].reshape(-1), 1.0)
    else:
        j_s, a = jnp.eye(D_OUT), jnp.append(jnp.tanh(s1).reshape(-1), 1.0)
    stats = kronecker.kronecker_factors(lambda p: _general(p, x), params, layers, kronecker.fisher_cotangent(loss))
    a_factor, g_factor = stats.factors[f"['{layer}']['w']"]
    np.testing.assert_allclose(a_factor, jnp.outer(a, a), rtol=1e-12)
    np.testing.assert_allclose(jnp.kron(a_factor, j_s.T @ h_out @ j_s), exact, rtol=1e-10, atol=1e-12)

    grad = jax.grad(lambda w, b: loss(outputs_of_layer(w, b)[None]), argnums=(0, 1))(params[layer]["w"], params[layer]["b"])
    v = _vec_w(*grad)
    np.testing.assert_allclose(jnp.kron(a_factor, g_factor), jnp.outer(v, v), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(6, 2, 3), (3, 4, 2, 3)])
def test_eigenbasis_scales_of_dense_general_layers_equal_per_example_gradients(shape):
    """One location per example, and sequences (T = 4 tokens per example, per-token masked loss)."""
    rng = np.random.default_rng(28)
    x = jnp.asarray(rng.standard_normal(shape))
    labels = jnp.asarray(rng.integers(0, D_OUT, shape[:-2]))
    weights = jnp.asarray(rng.uniform(0.2, 2.0, shape[:-2]))
    _check_scales(_general, _general_params(jax.random.key(29)), oso.losses.softmax_cross_entropy, x, labels, weights, rng=rng)


def test_eigenbasis_scales_of_unbatched_dense_general_input_count_one_example():
    rng = np.random.default_rng(30)
    params = _general_params(jax.random.key(31))
    x, targets = jnp.asarray(rng.standard_normal((2, 3))), jnp.asarray(rng.standard_normal((1, D_OUT)))
    model = lambda p: _general(p, x)[None]  # noqa: E731
    layers = kronecker.find_layers(model, params)
    bases = {l.name: (_orthogonal(rng, l.input_dim), _orthogonal(rng, l.output_dim)) for l in layers.layers}
    loss = oso.losses.squared_error(targets)
    stats = kronecker.kronecker_factors(model, params, layers, kronecker.fisher_cotangent(loss), bases)
    grads = jax.grad(lambda p: loss(model(p)))(params)
    for layer, name in zip(layers.layers, ("g1", "g2")):
        d = kronecker.kernel_matrix(layer, grads[name]["w"], grads[name]["b"])
        want = _reference_scales(d[None], *bases[layer.name])
        np.testing.assert_allclose(stats.scales[layer.name], want, rtol=1e-10, atol=1e-14 * want.max())


def test_tag_layer_checks_dense_shapes():
    kernel = jnp.ones((2, 3, 4))
    model = lambda k, x, n: kronecker.dense(x, k, output_ndim=n)  # noqa: E731
    assert kronecker.find_layers(lambda k: model(k, jnp.ones((5, 2, 3)), 1), kernel).layers[0].output_dim == 4
    assert kronecker.find_layers(lambda k: model(k, jnp.ones((5, 2)), 2), kernel).layers[0].output_dim == 12
    with pytest.raises(ValueError, match="tag_layer: a dense kernel \\(2, 3, 4\\) with output_ndim 1"):
        kronecker.find_layers(lambda k: kronecker.tag_layer("dense", jnp.ones((5, 4)), jnp.ones((5, 3)), k), kernel)
    with pytest.raises(ValueError, match="tag_layer: a 'conv' layer has output_ndim 1, got 2"):
        kronecker.find_layers(lambda k: kronecker.tag_layer("conv", jnp.ones((5, 4)), jnp.ones((5, 3)), k, output_ndim=2), kernel)


def test_dense_layer_without_inputs_has_empty_a_factor_and_the_usual_g_and_scales():
    """A dense kernel of shape ``(0, d_out)`` (zero input features): ``A`` is ``(0, 0)`` (``(1, 1)``, the bias's
    ``mean 1 * 1``, with a bias), ``G`` and the EK-FAC scales of the bias row are those of a layer with inputs."""
    rng = np.random.default_rng(5)
    x, targets = jnp.asarray(rng.standard_normal((6, 0))), jnp.asarray(rng.standard_normal((6, D_OUT)))
    loss = oso.losses.squared_error(targets)
    for bias in (None, jnp.asarray(rng.standard_normal(D_OUT))):
        params = {"w": jnp.zeros((0, D_OUT)), **({} if bias is None else {"b": bias})}
        model = lambda p: kronecker.dense(x, p["w"], p.get("b"))  # noqa: E731
        layers = kronecker.find_layers(model, params)
        (layer,) = layers.layers
        d_in = 0 if bias is None else 1
        bases = {layer.name: (jnp.eye(d_in), jnp.eye(D_OUT))}
        stats = kronecker.kronecker_factors(model, params, layers, kronecker.fisher_cotangent(loss), bases)
        a, g = stats.factors[layer.name]
        assert a.shape == (d_in, d_in) and g.shape == (D_OUT, D_OUT)
        np.testing.assert_allclose(a, np.ones((d_in, d_in)))  # the bias column is all ones
        assert np.all(np.isfinite(g)) and np.all(np.linalg.eigvalsh(np.asarray(g)) >= -1e-12)
        assert stats.scales[layer.name].shape == (d_in, D_OUT)
