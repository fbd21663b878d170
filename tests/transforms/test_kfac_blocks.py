"""K-FAC's curvature blocks for embeddings and scale-and-shift layers (issue 21), against Fisher blocks built
explicitly here from per-example gradients (float64, the empirical Fisher: deterministic)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_second_order as oso
from optax_second_order.curvature import kronecker

jax.config.update("jax_enable_x64", True)

N, T, V, D, C = 5, 3, 7, 4, 3
IDS = jax.random.randint(jax.random.key(0), (N, T), 0, V).at[0, 0].set(V - 1)
LABELS = jax.random.randint(jax.random.key(1), (N,), 0, C)
LOSS = oso.losses.softmax_cross_entropy(LABELS)
EMPIRICAL = kronecker.fisher_cotangent(LOSS)  # u_i = (1/N) ... without random signs: deterministic


def _params():
    keys = jax.random.split(jax.random.key(2), 4)
    return {"table": jax.random.normal(keys[0], (V, D)), "positions": jax.random.normal(keys[1], (T, D)) / 2,
            "scale": 1 + 0.3 * jax.random.normal(keys[2], (D,)), "shift": 0.1 * jnp.arange(D, dtype=float),
            "head": jax.random.normal(keys[3], (D, C)) / 2}


def _normalized(h):
    mean = h.mean(-1, keepdims=True)
    return (h - mean) / jnp.sqrt(((h - mean) ** 2).mean(-1, keepdims=True) + 1e-5)


def _model(params, ids=IDS, tagged=True):
    """embedding + learned positions -> LayerNorm (scale-and-shift) -> tanh -> mean over positions -> dense."""
    if tagged:
        h = kronecker.embed(ids, params["table"]) + kronecker.embed(jnp.arange(ids.shape[-1]), params["positions"])
        h = kronecker.scale_and_shift(_normalized(h), params["scale"], params["shift"])
    else:
        h = params["table"][ids] + params["positions"]
        h = _normalized(h) * params["scale"] + params["shift"]
    return kronecker.dense(jnp.tanh(h).mean(-2), params["head"])


def _per_example_grads(params, name):
    """``d l_i / d params[name]`` for each example, weighted by ``sqrt(1/N)``: the rows of the empirical Fisher."""
    def loss_i(p, ids, label):
        logits = _model(p, ids[None], tagged=False)
        return oso.losses.softmax_cross_entropy(label[None])(logits)

    grads = jax.vmap(jax.grad(loss_i), in_axes=(None, 0, 0))(params, IDS, LABELS)[name]
    return grads.reshape(N, -1) / np.sqrt(N)


def test_capture_reports_the_blocks():
    layers = kronecker.find_layers(_model, _params())
    assert [(b.kind, b.kernel, b.bias) for b in layers.blocks] == [
        ("embed", "['table']", None), ("embed", "['positions']", None), ("scale_and_shift", "['scale']", "['shift']"),
    ]
    assert not layers.fallback
    summary = layers.summary()
    assert "embed ['table']  A diagonal 7 (token frequencies), G 4x4" in summary
    assert "scale_and_shift ['scale'] + ['shift']  exact Fisher diagonal" in summary
    assert "diagonal" not in summary.replace("A diagonal", "").replace("Fisher diagonal", "")
    assert layers.without_blocks().fallback == ("['positions']", "['scale']", "['shift']", "['table']")


def test_scale_and_shift_block_is_the_exact_fisher_diagonal():
    params = _params()
    layers = kronecker.find_layers(_model, params)
    stats = kronecker.kronecker_factors(_model, params, layers, EMPIRICAL)
    d_scale, d_shift = stats.blocks["['scale']"]
    for name, d in (("scale", d_scale), ("shift", d_shift)):
        rows = _per_example_grads(params, name)
        fisher = rows.T @ rows  # the dense empirical Fisher block of this parameter
        np.testing.assert_allclose(d, np.diag(fisher), rtol=1e-10, atol=1e-14)


def test_embedding_factors_are_the_dense_layer_factors_on_one_hot_inputs():
    params = _params()
    layers = kronecker.find_layers(_model, params)
    stats = kronecker.kronecker_factors(_model, params, layers, EMPIRICAL)
    c, g = stats.blocks["['table']"]
    one_hot = jax.nn.one_hot(IDS.reshape(-1), V)
    np.testing.assert_allclose(np.diag(c), one_hot.T @ one_hot / (N * T), rtol=1e-12, atol=1e-15)
    # G = sum_{i,t} p p^T with p_{i,t} = (1/sqrt N) d l_i / d y_{i,t}, from the Jacobian of the per-example losses
    def losses(embedded):
        h = _normalized(embedded + params["positions"]) * params["scale"] + params["shift"]
        logits = jnp.tanh(h).mean(-2) @ params["head"]
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), LABELS[:, None], -1)[:, 0]

    jac = jax.jacobian(losses)(params["table"][IDS])  # (N, N, T, D)
    p = jnp.stack([jac[i, i] for i in range(N)]).reshape(-1, D) / np.sqrt(N)
    np.testing.assert_allclose(g, p.T @ p, rtol=1e-10, atol=1e-14)
    c_pos, _ = stats.blocks["['positions']"]
    np.testing.assert_allclose(c_pos, np.full(T, 1 / T), rtol=1e-14)


def test_embedding_block_is_the_fisher_block_for_one_example_and_one_token():
    """With one example and one token K-FAC's ``A (x) G`` is exact: the Fisher block ``vec(grad) vec(grad)^T``."""
    params = _params()
    ids, labels = IDS[:1, :1], LABELS[:1]
    loss = oso.losses.softmax_cross_entropy(labels)
    model_fn = lambda p: _model(p, ids)  # noqa: E731
    layers = kronecker.find_layers(model_fn, params)
    stats = kronecker.kronecker_factors(model_fn, params, layers, kronecker.fisher_cotangent(loss))
    c, g = stats.blocks["['table']"]
    grad = jax.grad(lambda p: loss(model_fn(p)))(params)["table"].reshape(-1)
    np.testing.assert_allclose(np.kron(np.diag(c), g), np.outer(grad, grad), rtol=1e-10, atol=1e-14)


def _one_hot_model(params):
    """The same network with the embeddings written as dense layers on one-hot inputs."""
    h = kronecker.dense(jax.nn.one_hot(IDS, V), params["table"])
    h = h + kronecker.dense(jnp.eye(T), params["positions"])
    h = _normalized(h) * params["scale"] + params["shift"]  # untagged: compared on the embeddings only
    return kronecker.dense(jnp.tanh(h).mean(-2), params["head"])


def _steps(model_fn, mode, steps=3):
    params = _params()
    layers = kronecker.find_layers(model_fn, params)
    tx = oso.scale_by_kfac(layers, damping=1e-2, damping_mode=mode, kl_clip=None, fisher="empirical",
                           statistics_frequency=1, precondition_frequency=2)
    state = tx.init(params)
    out = []
    for _ in range(steps):
        grads = jax.grad(lambda p: LOSS(model_fn(p)))(params)
        v, state = tx.update(grads, state, params, model_fn=model_fn, loss=LOSS)
        params = jax.tree.map(lambda p, u: p - 0.1 * u, params, v)
        out.append(v)
    return out, state


@pytest.mark.parametrize("mode", ["factored", "exact"])
def test_embedding_steps_equal_kfac_on_one_hot_dense_layers(mode):
    def half_tagged(p):  # embeddings tagged, scale-and-shift not: it falls back as in the one-hot model
        h = kronecker.embed(IDS, p["table"]) + kronecker.embed(jnp.arange(T), p["positions"])
        h = _normalized(h) * p["scale"] + p["shift"]
        return kronecker.dense(jnp.tanh(h).mean(-2), p["head"])

    got, _ = _steps(half_tagged, mode)
    want, _ = _steps(_one_hot_model, mode)
    for a, b in zip(got, want):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12), a, b)


def test_scale_and_shift_step_divides_by_the_fisher_diagonal():
    lam = 1e-2
    params = _params()
    layers = kronecker.find_layers(_model, params)
    tx = oso.scale_by_kfac(layers, damping=lam, kl_clip=None, fisher="empirical", statistics_frequency=1)
    grads = jax.grad(lambda p: LOSS(_model(p)))(params)
    v, state = tx.update(grads, tx.init(params), params, model_fn=_model, loss=LOSS)
    for name in ("scale", "shift"):
        rows = _per_example_grads(params, name)
        np.testing.assert_allclose(v[name], grads[name] / (np.diag(rows.T @ rows) + lam), rtol=1e-10)
    assert int(state.nonfinite) == 0


class Transformerish(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(V, D)(ids) + nn.Embed(T, D)(jnp.arange(ids.shape[-1]))
        h = nn.LayerNorm()(h)
        h = h + nn.Dense(D)(jax.nn.gelu(nn.Dense(2 * D)(h)))
        h = nn.RMSNorm()(h)
        return nn.Dense(C)(h.mean(-2))


@pytest.mark.parametrize("approximation", ["kronecker", "eigenvalue_corrected"])
def test_linen_transformerish_model_gets_no_fallback_and_steps(approximation):
    net = Transformerish()
    params = net.init(jax.random.key(3), IDS)["params"]
    model_fn = lambda p: net.apply({"params": p}, IDS)  # noqa: E731
    layers = oso.flax.find_layers(model_fn, params)
    assert not layers.fallback, layers.summary()
    assert sorted(b.kind for b in layers.blocks) == ["embed", "embed", "scale_and_shift", "scale_and_shift"]
    tx = oso.kfac(1e-2, layers, approximation=approximation)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: LOSS(model_fn(p)))(params)
        updates, state = tx.update(grads, state, params, model_fn=model_fn, loss=LOSS)
        return jax.tree.map(jnp.add, params, updates), state

    for _ in range(3):
        params, state = step(params, state)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


def test_linen_layer_norm_rows_match_the_tagged_model():
    """The rows the linen capture records for nn.Embed / nn.LayerNorm / nn.RMSNorm give the statistics of the same
    model written with tags."""
    class Net(nn.Module):
        @nn.compact
        def __call__(self, ids):
            h = nn.LayerNorm(epsilon=1e-5)(nn.Embed(V, D)(ids))
            h = nn.RMSNorm(epsilon=1e-5)(jnp.tanh(h))
            return nn.Dense(C, use_bias=False)(h.mean(-2))

    net = Net()
    params = jax.tree.map(lambda x: x.astype(jnp.float64), net.init(jax.random.key(4), IDS)["params"])

    def tagged(p):
        h = kronecker.embed(IDS, p["Embed_0"]["embedding"])
        h = jnp.tanh(kronecker.scale_and_shift(_normalized(h), p["LayerNorm_0"]["scale"], p["LayerNorm_0"]["bias"]))
        h = kronecker.scale_and_shift(h / jnp.sqrt(jnp.mean(h**2, -1, keepdims=True) + 1e-5), p["RMSNorm_0"]["scale"])
        return kronecker.dense(h.mean(-2), p["Dense_0"]["kernel"])

    model_fn = lambda p: net.apply({"params": p}, IDS)  # noqa: E731
    layers = oso.flax.find_layers(model_fn, params)
    assert layers == kronecker.find_layers(tagged, params)
    got = kronecker.kronecker_factors(model_fn, params, layers, EMPIRICAL)
    want = kronecker.kronecker_factors(tagged, params, layers, EMPIRICAL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12), got, want)


def test_scanned_scale_and_shift_steps_as_the_unrolled_network():
    """LayerNorm-like scale-and-shift in a stack run by ``oso.kronecker.scan``: per-layer diagonals, the same steps
    as the network written layer by layer."""
    depth = 3
    keys = jax.random.split(jax.random.key(5), 2)
    x = jax.random.normal(keys[0], (N, T, D))
    unrolled = {"head": jax.random.normal(keys[1], (D, C)) / 2}
    for l in range(depth):
        unrolled[f"norm{l}"] = {"scale": 1 + 0.1 * l + 0.05 * jnp.arange(D), "shift": 0.1 * l * jnp.ones(D)}

    def block(h, p):
        return jnp.tanh(kronecker.scale_and_shift(_normalized(h), p["scale"], p["shift"])) + h, None

    def unrolled_model(p):
        h = x
        for l in range(depth):
            h, _ = block(h, p[f"norm{l}"])
        return kronecker.dense(h.mean(-2), p["head"])

    def scanned_model(p):
        return kronecker.dense(kronecker.scan(block, x, p["norms"])[0].mean(-2), p["head"])

    stacked = {"head": unrolled["head"],
               "norms": jax.tree.map(lambda *xs: jnp.stack(xs), *[unrolled[f"norm{l}"] for l in range(depth)])}
    layers = kronecker.find_layers(scanned_model, stacked)
    assert [(b.kind, b.stack) for b in layers.blocks] == [("scale_and_shift", depth)] and not layers.fallback

    def run(model_fn, params):
        tx = oso.scale_by_kfac(kronecker.find_layers(model_fn, params), damping=1e-2, kl_clip=None,
                               fisher="empirical", statistics_frequency=1)
        state, out = tx.init(params), []
        for _ in range(3):
            grads = jax.grad(lambda p: LOSS(model_fn(p)))(params)
            v, state = tx.update(grads, state, params, model_fn=model_fn, loss=LOSS)
            params = jax.tree.map(lambda p, u: p - 0.1 * u, params, v)
            out.append(v)
        return out

    for got, want in zip(run(scanned_model, stacked), run(unrolled_model, unrolled)):
        for l in range(depth):
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a[l], b, rtol=1e-10, atol=1e-13),
                         got["norms"], want[f"norm{l}"])
        np.testing.assert_allclose(got["head"], want["head"], rtol=1e-10, atol=1e-13)
