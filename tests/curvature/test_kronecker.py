"""Kronecker factors against dense references: exact Fisher blocks, explicit patches, analytic expectations."""

import itertools

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
