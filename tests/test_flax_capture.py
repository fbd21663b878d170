"""K-FAC capture of unmodified Flax linen and NNX models, against the same model written with plain-JAX tags."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_second_order as oso
from optax_second_order.curvature import kronecker

B = 4
TOKENS = jax.random.randint(jax.random.key(0), (B, 3), 0, 10)
IMAGES = jax.random.normal(jax.random.key(1), (B, 6, 6, 2))
LABELS = jax.random.randint(jax.random.key(2), (B,), 0, 4)
LOSS = oso.losses.softmax_cross_entropy(LABELS)


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, tokens, images):
        h = nn.LayerNorm()(nn.Dense(5)(nn.Embed(10, 4)(tokens).mean(1)))
        c = nn.Conv(3, (3, 3), strides=2, padding="SAME")(images)
        c = jnp.tanh(nn.BatchNorm(use_running_average=True)(c)).mean((1, 2))
        c = c + nn.Conv(3, (2, 2), feature_group_count=3, padding="VALID")(images[..., :1].repeat(3, -1)).mean((1, 2))
        return nn.Dense(4, use_bias=False)(jnp.concatenate([jnp.tanh(h), c], -1))


def _linen_setup():
    net = LinenNet()
    variables = net.init(jax.random.key(3), TOKENS, IMAGES)
    stats = variables["batch_stats"]

    def model_fn(p):
        return net.apply({"params": p, "batch_stats": stats}, TOKENS, IMAGES)

    def reference(p):
        """The same network, Dense/Conv/Embed/LayerNorm by ``oso.kronecker`` tags, the rest by the linen submodules."""
        e = kronecker.embed(TOKENS, p["Embed_0"]["embedding"]).mean(1)
        h = kronecker.dense(e, p["Dense_0"]["kernel"], p["Dense_0"]["bias"])
        mean = h.mean(-1, keepdims=True)
        variance = jnp.maximum(0.0, jnp.square(h).mean(-1, keepdims=True) - jnp.square(mean))  # Flax's fast variance
        normalized = (h - mean) * jax.lax.rsqrt(variance + 1e-6)
        h = kronecker.scale_and_shift(normalized, p["LayerNorm_0"]["scale"], p["LayerNorm_0"]["bias"])
        c = kronecker.conv(IMAGES, p["Conv_0"]["kernel"], p["Conv_0"]["bias"], strides=2, padding="SAME")
        bn = {"params": p["BatchNorm_0"], "batch_stats": stats["BatchNorm_0"]}
        c = jnp.tanh(nn.BatchNorm(use_running_average=True).apply(bn, c)).mean((1, 2))
        grouped = nn.Conv(3, (2, 2), feature_group_count=3, padding="VALID").apply({"params": p["Conv_1"]}, IMAGES[..., :1].repeat(3, -1))
        c = c + grouped.mean((1, 2))
        return kronecker.dense(jnp.concatenate([jnp.tanh(h), c], -1), p["Dense_1"]["kernel"])

    return variables["params"], model_fn, reference


def _assert_same_statistics(params, model_fn, reference, layers):
    cotangent = kronecker.fisher_cotangent(LOSS)
    np.testing.assert_allclose(model_fn(params), reference(params), rtol=1e-6)
    got = jax.jit(lambda p: kronecker.kronecker_factors(model_fn, p, layers, cotangent))(params)
    want = jax.jit(lambda p: kronecker.kronecker_factors(reference, p, layers, cotangent))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)


def test_linen_capture_finds_dense_conv_embed_and_layer_norm_and_falls_back_on_the_rest():
    params, model_fn, reference = _linen_setup()
    layers = oso.flax.find_layers(model_fn, params)
    assert [(l.kind, l.kernel, l.bias) for l in layers.layers] == [
        ("dense", "['Dense_0']['kernel']", "['Dense_0']['bias']"),
        ("conv", "['Conv_0']['kernel']", "['Conv_0']['bias']"),
        ("dense", "['Dense_1']['kernel']", None),
    ]
    assert [(l.kind, l.kernel, l.bias) for l in layers.blocks] == [
        ("embed", "['Embed_0']['embedding']", None),
        ("scale_and_shift", "['LayerNorm_0']['scale']", "['LayerNorm_0']['bias']"),
    ]
    assert set(layers.fallback) == {
        "['BatchNorm_0']['scale']",
        "['BatchNorm_0']['bias']",
        "['Conv_1']['kernel']",  # feature_group_count > 1
        "['Conv_1']['bias']",
    }
    assert layers == kronecker.find_layers(reference, params)
    _assert_same_statistics(params, model_fn, reference, layers)


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(10, 4, rngs=rngs)
        self.linear = nnx.Linear(4, 5, rngs=rngs)
        self.norm = nnx.LayerNorm(5, rngs=rngs)
        self.conv = nnx.Conv(2, 3, (3, 3), strides=2, rngs=rngs)
        self.bn = nnx.BatchNorm(3, use_running_average=True, rngs=rngs)
        self.head = nnx.Linear(8, 4, use_bias=False, rngs=rngs)

    def __call__(self, tokens, images, tag=False):
        if tag:  # the reference: the same computation with plain-JAX tags
            h = kronecker.dense(self.embed(tokens).mean(1), self.linear.kernel.get_value(), self.linear.bias.get_value())
            c = kronecker.conv(images, self.conv.kernel.get_value(), self.conv.bias.get_value(), strides=2)
        else:
            h, c = self.linear(self.embed(tokens).mean(1)), self.conv(images)
        features = jnp.concatenate([jnp.tanh(self.norm(h)), jnp.tanh(self.bn(c)).mean((1, 2))], -1)
        if tag:
            return kronecker.dense(features, self.head.kernel.get_value())
        return self.head(features)


def test_nnx_capture_finds_linear_and_conv_without_patching_classes():
    graphdef, params, rest = nnx.split(NNXNet(nnx.Rngs(0)), nnx.Param, ...)
    original = nnx.Linear.__call__

    def model_fn(p):
        return oso.flax.tag_layers(nnx.merge(graphdef, p, rest))(TOKENS, IMAGES)

    def reference(p):
        return nnx.merge(graphdef, p, rest)(TOKENS, IMAGES, tag=True)

    layers = oso.flax.find_layers(model_fn, params)
    assert nnx.Linear.__call__ is original  # no class is patched, and copies merged outside a capture are untouched
    assert nnx.merge(graphdef, params, rest).linear.dot_general is jax.lax.dot_general
    assert [(l.kind, l.kernel, l.bias) for l in layers.layers] == [
        ("dense", "['linear']['kernel'].value", "['linear']['bias'].value"),
        ("conv", "['conv']['kernel'].value", "['conv']['bias'].value"),
        ("dense", "['head']['kernel'].value", None),
    ]
    assert {name.removesuffix(".value") for name in layers.fallback} == {
        "['embed']['embedding']", "['norm']['scale']", "['norm']['bias']", "['bn']['scale']", "['bn']['bias']"
    }
    assert layers == kronecker.find_layers(reference, params)
    _assert_same_statistics(params, model_fn, reference, layers)


def test_kfac_trains_a_linen_model_in_a_jitted_step():
    params, model_fn, _ = _linen_setup()
    layers = oso.flax.find_layers(model_fn, params)
    tx = oso.kfac(0.05, layers, precondition_frequency=2)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(lambda p: LOSS(model_fn(p)))(params)
        updates, state = tx.update(grads, state, params, model_fn=model_fn, loss=LOSS)
        return optax.apply_updates(params, updates), state, value

    values = []
    for _ in range(6):
        params, state, value = step(params, state)
        values.append(float(value))
    assert values[-1] < values[0] and int(state[0].nonfinite) == 0


# --- DenseGeneral / LinearGeneral: captured where the kernel is a matrix on the trailing axes (float64) ----------

F64 = jnp.float64
BIAS_INIT = nn.initializers.normal(0.5)  # nonzero biases, so their reshape matters
SEQ = jax.random.normal(jax.random.key(4), (B, 3, 2), F64)


class LinenGeneralNet(nn.Module):
    """Two DenseGeneral layers that are matrices, then two that are not (non-trailing axis, batch_dims)."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.DenseGeneral((2, 3), param_dtype=F64, bias_init=BIAS_INIT)(x))  # kernel (2, 2, 3), bias (2, 3)
        h = jnp.tanh(nn.DenseGeneral(4, axis=(-2, -1), param_dtype=F64, bias_init=BIAS_INIT)(h))  # kernel (2, 3, 4)
        h = jnp.tanh(nn.DenseGeneral(2, axis=1, param_dtype=F64)(h))  # contracts the middle axis: (B, 4, 2)
        return nn.DenseGeneral(1, batch_dims=(0,), use_bias=False, param_dtype=F64)(h)[..., 0]  # (B, 4)


def _linen_dense_equivalent(p):
    """``LinenGeneralNet`` with its two matrix layers as ``nn.Dense`` on flattened axes; ``p`` in Dense shapes."""
    h = jnp.tanh(nn.Dense(6, param_dtype=F64).apply({"params": p["DenseGeneral_0"]}, SEQ)).reshape(B, 3, 2, 3)
    h = jnp.tanh(nn.Dense(4, param_dtype=F64).apply({"params": p["DenseGeneral_1"]}, h.reshape(B, 3, 6)))
    h = jnp.tanh(nn.DenseGeneral(2, axis=1, param_dtype=F64).apply({"params": p["DenseGeneral_2"]}, h))
    out = nn.DenseGeneral(1, batch_dims=(0,), use_bias=False, param_dtype=F64)
    return out.apply({"params": p["DenseGeneral_3"]}, h)[..., 0]


def _to_dense_shapes(params):
    """The matrix layers' kernels as ``(prod(in_shape), prod(features))``, biases flat; the rest unchanged."""
    out = dict(params)
    out["DenseGeneral_0"] = {"kernel": params["DenseGeneral_0"]["kernel"].reshape(2, 6), "bias": params["DenseGeneral_0"]["bias"].reshape(6)}
    out["DenseGeneral_1"] = {"kernel": params["DenseGeneral_1"]["kernel"].reshape(6, 4), "bias": params["DenseGeneral_1"]["bias"]}
    return out


def _general_setup():
    net = LinenGeneralNet()
    params = net.init(jax.random.key(5), SEQ)["params"]
    dense_params = _to_dense_shapes(params)
    model_fn = lambda p: net.apply({"params": p}, SEQ)  # noqa: E731
    np.testing.assert_allclose(model_fn(params), _linen_dense_equivalent(dense_params), rtol=1e-13)
    return params, model_fn, dense_params, oso.flax.find_layers(model_fn, params), oso.flax.find_layers(_linen_dense_equivalent, dense_params)


def test_linen_dense_general_is_captured_where_it_is_a_matrix():
    params, _, _, layers, dense_layers = _general_setup()
    assert [(l.kind, l.kernel, l.bias, l.kernel_shape, l.output_ndim) for l in layers.layers] == [
        ("dense", "['DenseGeneral_0']['kernel']", "['DenseGeneral_0']['bias']", (2, 2, 3), 2),
        ("dense", "['DenseGeneral_1']['kernel']", "['DenseGeneral_1']['bias']", (2, 3, 4), 1),
    ]
    assert set(layers.fallback) == {"['DenseGeneral_2']['kernel']", "['DenseGeneral_2']['bias']", "['DenseGeneral_3']['kernel']"}
    assert "diagonal ['DenseGeneral_3']['kernel']" in layers.summary() and "A 7x7, G 4x4" in layers.summary()
    assert [(l.input_dim, l.output_dim) for l in layers.layers] == [(3, 6), (7, 4)]
    assert [(l.name, l.bias, l.input_dim, l.output_dim) for l in layers.layers] == [
        (l.name, l.bias, l.input_dim, l.output_dim) for l in dense_layers.layers
    ]
    assert layers.fallback == dense_layers.fallback
    dense_params = _to_dense_shapes(params)
    for layer, name in zip(layers.layers, ["DenseGeneral_0", "DenseGeneral_1"]):
        # kernel_matrix is the Dense kernel with the bias as last row; split_kernel_matrix undoes it
        kernel, bias = params[name]["kernel"], params[name]["bias"]
        w = kronecker.kernel_matrix(layer, kernel, bias)
        np.testing.assert_array_equal(w, np.concatenate([dense_params[name]["kernel"], dense_params[name]["bias"][None]]))
        jax.tree.map(np.testing.assert_array_equal, kronecker.split_kernel_matrix(layer, w), (kernel, bias))


def _orthogonal_bases(layers, seed):
    rng = np.random.default_rng(seed)

    def orthogonal(n):
        q, r = np.linalg.qr(rng.standard_normal((n, n)))
        return q * np.sign(np.diag(r))

    return {l.name: (orthogonal(l.input_dim), orthogonal(l.output_dim)) for l in layers.layers}


def test_linen_dense_general_statistics_and_ekfac_scales_equal_the_dense_equivalent():
    params, model_fn, dense_params, layers, dense_layers = _general_setup()
    bases = _orthogonal_bases(layers, 6)
    cotangent = kronecker.fisher_cotangent(LOSS)
    got = jax.jit(lambda p: kronecker.kronecker_factors(model_fn, p, layers, cotangent, bases))(params)
    want = jax.jit(lambda p: kronecker.kronecker_factors(_linen_dense_equivalent, p, dense_layers, cotangent, bases))(dense_params)
    assert set(got.scales) == {l.name for l in layers.layers}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15), got, want)

    # A from explicit rows: the flattened trailing input axes of every token, then 1 for the bias
    rows = np.concatenate([np.asarray(SEQ).reshape(-1, 2), np.ones((B * 3, 1))], axis=1)
    np.testing.assert_allclose(got.factors["['DenseGeneral_0']['kernel']"][0], rows.T @ rows / len(rows), rtol=1e-12)


@pytest.mark.parametrize("approximation", ["kronecker", "eigenvalue_corrected"])
def test_kfac_step_on_dense_general_equals_the_dense_equivalent(approximation):
    """``scale_by_kfac`` end to end (kernel_matrix, the preconditioner, split_kernel_matrix with the bias reshape)."""
    params, model_fn, dense_params, layers, dense_layers = _general_setup()

    def two_steps(layers, model_fn, params):
        tx = oso.scale_by_kfac(layers, approximation=approximation, kl_clip=None, precondition_frequency=1, damping=1e-2,
                                statistics_frequency=1)
        state = tx.init(params)
        for _ in range(2):
            grads = jax.grad(lambda p: LOSS(model_fn(p)))(params)
            updates, state = tx.update(grads, state, params, model_fn=model_fn, loss=LOSS)
            params = optax.apply_updates(params, jax.tree.map(lambda u: -0.1 * u, updates))
        return updates

    got = jax.jit(lambda p: two_steps(layers, model_fn, p))(params)
    want = jax.jit(lambda p: two_steps(dense_layers, _linen_dense_equivalent, p))(dense_params)
    assert jax.tree.map(jnp.shape, got) == jax.tree.map(jnp.shape, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12), _to_dense_shapes(got), want)


class NNXGeneralNet(nnx.Module):
    def __init__(self, rngs):
        general = dict(param_dtype=F64, bias_init=BIAS_INIT, rngs=rngs)
        self.split = nnx.LinearGeneral(2, (2, 3), **general)
        self.merge = nnx.LinearGeneral((2, 3), 4, axis=(-2, -1), **general)
        self.middle = nnx.LinearGeneral(3, 2, axis=1, param_dtype=F64, rngs=rngs)  # not trailing: falls back
        self.batched = nnx.LinearGeneral(2, 1, batch_axis={0: B}, use_bias=False, param_dtype=F64, rngs=rngs)

    def __call__(self, x, tag=False):
        if tag:  # the reference: plain-JAX tags with the DenseGeneral kernels
            h = jnp.tanh(kronecker.dense(x, self.split.kernel.get_value(), self.split.bias.get_value(), output_ndim=2))
            h = jnp.tanh(kronecker.dense(h, self.merge.kernel.get_value(), self.merge.bias.get_value()))
        else:
            h = jnp.tanh(self.merge(jnp.tanh(self.split(x))))
        return self.batched(jnp.tanh(self.middle(h)))[..., 0]


def test_nnx_linear_general_is_captured_where_it_is_a_matrix():
    graphdef, params, rest = nnx.split(NNXGeneralNet(nnx.Rngs(0)), nnx.Param, ...)
    original = nnx.LinearGeneral.__call__

    def model_fn(p):
        return oso.flax.tag_layers(nnx.merge(graphdef, p, rest))(SEQ)

    def reference(p):
        return nnx.merge(graphdef, p, rest)(SEQ, tag=True)

    layers = oso.flax.find_layers(model_fn, params)
    assert nnx.LinearGeneral.__call__ is original
    assert [(l.kernel, l.bias, l.kernel_shape, l.output_ndim) for l in layers.layers] == [
        ("['split']['kernel'].value", "['split']['bias'].value", (2, 2, 3), 2),
        ("['merge']['kernel'].value", "['merge']['bias'].value", (2, 3, 4), 1),
    ]
    assert {name.removesuffix(".value") for name in layers.fallback} == {
        "['middle']['kernel']", "['middle']['bias']", "['batched']['kernel']"
    }
    assert layers == kronecker.find_layers(reference, params)
    _assert_same_statistics(params, model_fn, reference, layers)


def test_attention_projections_are_captured():
    """linen / NNX multi-head attention: query, key, value ``(d, heads, head_dim)`` and out ``(heads, head_dim, d)``."""
    x = jax.random.normal(jax.random.key(7), (B, 3, 4), F64)
    attention = nn.MultiHeadDotProductAttention(num_heads=2, param_dtype=F64)
    params = attention.init(jax.random.key(8), x)["params"]
    linen_layers = oso.flax.find_layers(lambda p: attention.apply({"params": p}, x), params)
    graphdef, nnx_params, rest = nnx.split(nnx.MultiHeadAttention(2, 4, decode=False, param_dtype=F64, rngs=nnx.Rngs(0)), nnx.Param, ...)
    nnx_layers = oso.flax.find_layers(lambda p: oso.flax.tag_layers(nnx.merge(graphdef, p, rest))(x), nnx_params)
    for layers in (linen_layers, nnx_layers):
        assert [(l.kernel_shape, l.output_ndim) for l in layers.layers] == [((4, 2, 2), 2)] * 3 + [((2, 2, 4), 1)]
        assert layers.fallback == ()


# --- subclasses, padding the base applies, and parameters that are not the ones find_layers saw --------------


class ScaledDense(nn.Dense):
    """Overrides ``__call__`` and calls the base through ``super()``: the base's call is the layer."""

    def __call__(self, x):
        return 2.0 * super().__call__(x)


class PlainDense(nn.Dense):
    """Inherits ``__call__``."""


class LinenSubclassNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return ScaledDense(3, name="scaled")(jnp.tanh(PlainDense(5, name="plain")(x)))


def test_linen_subclasses_are_captured_at_the_base_call():
    x = jax.random.normal(jax.random.key(9), (B, 4))
    net = LinenSubclassNet()
    params = net.init(jax.random.key(10), x)["params"]

    def reference(p):
        h = jnp.tanh(kronecker.dense(x, p["plain"]["kernel"], p["plain"]["bias"]))
        return 2.0 * kronecker.dense(h, p["scaled"]["kernel"], p["scaled"]["bias"])

    model_fn = lambda p: net.apply({"params": p}, x)  # noqa: E731
    layers = oso.flax.find_layers(model_fn, params)
    assert [l.kernel for l in layers.layers] == ["['plain']['kernel']", "['scaled']['kernel']"] and not layers.fallback
    _assert_same_statistics(params, model_fn, reference, layers)


class ScaledLinear(nnx.Linear):
    def __call__(self, x):
        return 2.0 * super().__call__(x)


class NNXSubclassNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 3, (3, 3), padding="CIRCULAR", rngs=rngs)
        self.head = ScaledLinear(3, 4, rngs=rngs)

    def __call__(self, images, tag=False):
        if tag:
            padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap")
            c = kronecker.conv(padded, self.conv.kernel.get_value(), self.conv.bias.get_value(), padding="VALID")
            return 2.0 * kronecker.dense(jnp.tanh(c).mean((1, 2)), self.head.kernel.get_value(), self.head.bias.get_value())
        return self.head(jnp.tanh(self.conv(images)).mean((1, 2)))


def test_nnx_subclasses_and_circular_padding_are_captured():
    graphdef, params, rest = nnx.split(NNXSubclassNet(nnx.Rngs(11)), nnx.Param, ...)

    def model_fn(p):
        return oso.flax.tag_layers(nnx.merge(graphdef, p, rest))(IMAGES)

    def reference(p):
        return nnx.merge(graphdef, p, rest)(IMAGES, tag=True)

    layers = oso.flax.find_layers(model_fn, params)
    assert [(l.kind, l.kernel_shape) for l in layers.layers] == [("conv", (3, 3, 2, 3)), ("dense", (3, 4))]
    assert not layers.fallback
    _assert_same_statistics(params, model_fn, reference, layers)


def test_an_nnx_model_fn_without_tag_layers_is_explained():
    graphdef, params, rest = nnx.split(NNXSubclassNet(nnx.Rngs(11)), nnx.Param, ...)
    with pytest.raises(ValueError, match="tag_layers"):
        oso.flax.find_layers(lambda p: nnx.merge(graphdef, p, rest)(IMAGES), params)


def test_the_optimizer_must_see_the_parameters_find_layers_saw():
    """Layers found on the linen variables (params and batch_stats) but an optimizer given only params."""
    params, model_fn, _ = _linen_setup()
    net = LinenNet()
    variables = net.init(jax.random.key(3), TOKENS, IMAGES)
    layers = oso.flax.find_layers(lambda v: net.apply(v, TOKENS, IMAGES), variables)
    tx = oso.kfac(0.1, layers)
    with pytest.raises(ValueError, match="same parameters"):
        tx.init(params)
    # the same leaves under another wrapper ({"params": p} versus p) are the same parameters
    only_params = oso.flax.find_layers(lambda v: net.apply({**v, "batch_stats": variables["batch_stats"]}, TOKENS, IMAGES),
                                       {"params": params})
    oso.kfac(0.1, only_params).init(params)
