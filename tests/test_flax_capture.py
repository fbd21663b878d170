"""K-FAC capture of unmodified Flax linen and NNX models, against the same model written with plain-JAX tags."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
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
        """The same network, Dense/Conv by ``oso.kronecker`` tags, the rest by the linen submodules."""
        e = nn.Embed(10, 4).apply({"params": p["Embed_0"]}, TOKENS).mean(1)
        h = kronecker.dense(e, p["Dense_0"]["kernel"], p["Dense_0"]["bias"])
        h = nn.LayerNorm().apply({"params": p["LayerNorm_0"]}, h)
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


def test_linen_capture_finds_dense_and_conv_and_falls_back_on_the_rest():
    params, model_fn, reference = _linen_setup()
    layers = oso.flax.find_layers(model_fn, params)
    assert [(l.kind, l.kernel, l.bias) for l in layers.layers] == [
        ("dense", "['Dense_0']['kernel']", "['Dense_0']['bias']"),
        ("conv", "['Conv_0']['kernel']", "['Conv_0']['bias']"),
        ("dense", "['Dense_1']['kernel']", None),
    ]
    assert set(layers.fallback) == {
        "['Embed_0']['embedding']",
        "['LayerNorm_0']['scale']",
        "['LayerNorm_0']['bias']",
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


def test_nnx_capture_finds_linear_and_conv_and_restores_the_classes():
    graphdef, params, rest = nnx.split(NNXNet(nnx.Rngs(0)), nnx.Param, ...)
    original = nnx.Linear.__call__

    def model_fn(p):
        return nnx.merge(graphdef, p, rest)(TOKENS, IMAGES)

    def reference(p):
        return nnx.merge(graphdef, p, rest)(TOKENS, IMAGES, tag=True)

    layers = oso.flax.find_layers(model_fn, params)
    assert nnx.Linear.__call__ is original
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
    tx = oso.kfac(0.05, layers, inverse_frequency=2)
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
