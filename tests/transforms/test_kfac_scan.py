"""K-FAC and EK-FAC on layers under a scan (issue 21): a stack of dense layers run by ``oso.kronecker.scan`` (tags,
plain JAX) or linen's ``nn.scan`` steps exactly as the same network written layer by layer (float64)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_second_order as oso
from optax_second_order.curvature import kronecker

jax.config.update("jax_enable_x64", True)

N, D_IN, D, D_OUT, DEPTH = 8, 3, 4, 3, 4


def _unrolled_params():
    keys = jax.random.split(jax.random.key(0), DEPTH + 2)
    params = {"embed": {"w": jax.random.normal(keys[0], (D_IN, D)), "b": jnp.zeros(D)},
              "head": {"w": jax.random.normal(keys[1], (D, D_OUT)) / 2}, "shift": jnp.zeros(D_OUT)}
    for l in range(DEPTH):
        params[f"block{l}"] = {"w": jax.random.normal(keys[l + 2], (D, D)) / 2, "b": 0.1 * jnp.ones(D) * l}
    return params


def _stacked(params):
    """The unrolled params with the blocks' leaves stacked on a leading layer axis."""
    blocks = [params.pop(f"block{l}") for l in range(DEPTH)]
    return {**params, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def _unstacked(tree):
    tree = dict(tree)
    blocks = tree.pop("blocks")
    return {**tree, **{f"block{l}": jax.tree.map(lambda x: x[l], blocks) for l in range(DEPTH)}}


def _block(h, p):
    return jnp.tanh(kronecker.dense(h, p["w"], p["b"])), None


def _head(params, h):
    return kronecker.dense(h, params["head"]["w"]) + params["shift"]


def _unrolled_model(params, x):
    h = jnp.tanh(kronecker.dense(x, params["embed"]["w"], params["embed"]["b"]))
    for l in range(DEPTH):
        h, _ = _block(h, params[f"block{l}"])
    return _head(params, h)


def _scanned_model(params, x):
    h = jnp.tanh(kronecker.dense(x, params["embed"]["w"], params["embed"]["b"]))
    h, _ = kronecker.scan(_block, h, params["blocks"])
    return _head(params, h)


def _batch(seed):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (N, D_IN)), jax.random.randint(ky, (N,), 0, D_OUT)


def _run(model, params, steps, find_layers=kronecker.find_layers, optimizer=None, **options):
    """``steps`` steps of ``optimizer(layers)`` (default: the K-FAC alias with ``options``, with momentum); the
    layers, the updates of each step and the final state."""
    x, _ = _batch(0)
    layers = find_layers(lambda p: model(p, x), params)
    if optimizer is None:
        tx = oso.kfac(0.1, layers, statistics_frequency=1, precondition_frequency=2, **options)
    else:
        tx = optimizer(layers)

    @jax.jit
    def step(params, state, x, y):
        loss = oso.losses.softmax_cross_entropy(y)
        grads = jax.grad(lambda p: loss(model(p, x)))(params)
        updates, state = tx.update(grads, state, params, model_fn=lambda p: model(p, x), loss=loss)
        return jax.tree.map(lambda p, u: p + u, params, updates), state, updates

    state, history = tx.init(params), []
    for seed in range(steps):
        params, state, updates = step(params, state, *_batch(seed))
        history.append(updates)
    return layers, history, state


def test_scan_finds_one_stacked_layer_per_scanned_kernel():
    params = _stacked(_unrolled_params())
    layers = kronecker.find_layers(lambda p: _scanned_model(p, _batch(0)[0]), params)
    stacked = [l for l in layers.layers if l.stack is not None]
    assert [(l.kernel, l.bias, l.stack, l.kernel_shape) for l in stacked] == [
        ("['blocks']['w']", "['blocks']['b']", DEPTH, (D, D))
    ]
    assert layers.fallback == ("['shift']",)
    assert f"['blocks']['w'] + ['blocks']['b']  stacked: {DEPTH} layers, each  A {D + 1}x{D + 1}" in layers.summary()


def test_scan_outside_a_capture_is_lax_scan():
    params = _stacked(_unrolled_params())
    x = _batch(0)[0]
    np.testing.assert_array_equal(_scanned_model(params, x), _unrolled_model(_unstacked(params), x))


@pytest.mark.parametrize("options", [
    dict(damping_mode="factored"),
    dict(damping_mode="exact"),
    dict(approximation="eigenvalue_corrected"),
    dict(approximation="eigenvalue_corrected", stagger=2),
], ids=["kfac-factored", "kfac-exact", "ekfac", "ekfac-staggered"])
def test_scanned_layers_step_as_the_unrolled_network(options):
    """4 steps, float64 rtol 1e-10: per-layer factors of a stacked layer are those of the unrolled layers."""
    unrolled = _unrolled_params()
    layers_u, updates_u, state_u = _run(_unrolled_model, unrolled, 4, **options)
    layers_s, updates_s, state_s = _run(_scanned_model, _stacked(dict(unrolled)), 4, **options)
    assert len(layers_u.layers) == DEPTH + 2 and layers_u.fallback == layers_s.fallback == ("['shift']",)
    for u, s in zip(updates_u, updates_s):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), u, _unstacked(s))
    per_layer_u = {l.name: l for l in oso.kfac_layer_states(layers_u, state_u)}
    (blocks,) = [l for l in oso.kfac_layer_states(layers_s, state_s) if l.name == "['blocks']['w']"]
    for l in range(DEPTH):
        mine = per_layer_u[f"['block{l}']['w']"]
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b[l], rtol=1e-10, atol=1e-14),
                     (mine.factors, mine.scales), (blocks.factors, blocks.scales))


# --- linen: nn.scan against the unrolled linen network --------------------------------------------------------


class _Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return jnp.tanh(nn.Dense(D)(h)), None


class _LinenNet(nn.Module):
    scanned: bool

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(D)(x))
        if self.scanned:
            stack = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=DEPTH)
            h, _ = stack(name="blocks")(h, None)
        else:
            for l in range(DEPTH):
                h, _ = _Block(name=f"block{l}")(h, None)
        return nn.Dense(D_OUT, use_bias=False, name="head")(h)


def _linen_params():
    """The unrolled linen network's params (their block biases made nonzero), and the scanned one's: restacked."""
    unrolled = _LinenNet(False).init(jax.random.key(0), _batch(0)[0])["params"]
    unrolled = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 if "bias" in jax.tree_util.keystr(path) else x, unrolled)
    blocks = [unrolled[f"block{l}"] for l in range(DEPTH)]
    scanned = {k: v for k, v in unrolled.items() if not k.startswith("block")}
    scanned["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    return unrolled, scanned


def _linen_model(scanned):
    return lambda params, x: _LinenNet(scanned).apply({"params": params}, x)


def test_nn_scan_layers_are_stacked_layers():
    _, params = _linen_params()
    layers = oso.flax.find_layers(lambda p: _linen_model(True)(p, _batch(0)[0]), params)
    assert layers.fallback == ()
    assert [(l.kernel, l.stack) for l in layers.layers if l.stack] == [("['blocks']['Dense_0']['kernel']", DEPTH)]


@pytest.mark.parametrize("options", [dict(damping_mode="exact"), dict(approximation="eigenvalue_corrected")],
                         ids=["kfac-exact", "ekfac"])
def test_nn_scan_steps_as_the_unrolled_linen_network(options):
    unrolled, scanned = _linen_params()
    _, updates_u, _ = _run(_linen_model(False), unrolled, 4, oso.flax.find_layers, **options)
    _, updates_s, _ = _run(_linen_model(True), scanned, 4, oso.flax.find_layers, **options)
    for u, s in zip(updates_u, updates_s):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), u, _unstacked(s))


@pytest.mark.parametrize("limited", [False, True], ids=["kbfgs", "kbfgs-l"])
def test_kbfgs_on_scanned_layers_steps_as_the_unrolled_network(limited):
    """K-BFGS and K-BFGS(L), 4 steps, float64 rtol 1e-10: a stacked layer's A, H_a, H_g and pairs per layer are those
    of the unrolled layers (L units of the factor bank)."""
    def run(model, params):
        kbfgs = lambda layers: oso.kbfgs(0.1, layers, limited_memory=limited, memory_size=3)  # noqa: E731
        layers, history, state = _run(model, params, 4, optimizer=kbfgs)
        return oso.kbfgs_layer_states(layers, state), history

    unrolled = _unrolled_params()
    states_u, updates_u = run(_unrolled_model, unrolled)
    states_s, updates_s = run(_scanned_model, _stacked(dict(unrolled)))
    for u, s in zip(updates_u, updates_s):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), u, _unstacked(s))
    per_layer_u = {l.name: l for l in states_u}
    (blocks,) = [l for l in states_s if l.name == "['blocks']['w']"]
    for l in range(DEPTH):
        mine = per_layer_u[f"['block{l}']['w']"]._replace(name=None)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b[l], rtol=1e-10, atol=1e-14),
                     mine, blocks._replace(name=None))
