"""K-FAC transformation against dense solves with explicit Kronecker products (float64)."""

import os
import subprocess
import sys

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

import optax_second_order as oso
from optax_second_order.curvature import kronecker

jax.config.update("jax_enable_x64", True)

N, D_IN, D_HID, D_OUT = 6, 3, 4, 3
LAM = 0.1


def _params():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return {
        "l1": {"w": jax.random.normal(k1, (D_IN, D_HID)), "b": jnp.zeros(D_HID)},
        "l2": {"w": jax.random.normal(k2, (D_HID, D_OUT)) / 2},
        "scale": jnp.ones(()),
        "shift": 0.1 * jax.random.normal(k3, (D_OUT,)),
    }


def _batch(seed):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (N, D_IN)), jax.random.randint(ky, (N,), 0, D_OUT)


def _model(params, x):
    h = jnp.tanh(kronecker.dense(x, params["l1"]["w"], params["l1"]["b"]))
    return params["scale"] * kronecker.dense(h, params["l2"]["w"]) + params["shift"]


def _problem(seed):
    x, y = _batch(seed)
    loss = oso.losses.softmax_cross_entropy(y)
    model_fn = lambda p: _model(p, x)  # noqa: E731
    return model_fn, loss, jax.grad(lambda p: loss(model_fn(p)))


LAYERS = kronecker.find_layers(_problem(1)[0], _params())


def _factors_of(state):
    """Per layer ``(A, G)``, read from the state's factor bank."""
    return [l.factors for l in oso.kfac_layer_states(LAYERS, state)]


def _preconditioners_of(state):
    return [l.preconditioner for l in oso.kfac_layer_states(LAYERS, state)]


def _scales_of(state):
    return [l.scales for l in oso.kfac_layer_states(LAYERS, state)]


def _jit_update(tx):
    """One compilation per transformation: the batch is an argument, not a constant."""

    def update(grads, state, params, x, y):
        return tx.update(grads, state, params, model_fn=lambda p: _model(p, x), loss=oso.losses.softmax_cross_entropy(y))

    return jax.jit(update)


def _step(tx, state, params, seed, update=None):
    grads = _problem(seed)[2](params)
    updates, state = (update or _jit_update(tx))(grads, state, params, *_batch(seed))
    return grads, updates, state


@jax.jit
def _factors(params, x, y, key):
    loss = oso.losses.softmax_cross_entropy(y)
    return kronecker.kronecker_factors(lambda p: _model(p, x), params, LAYERS, kronecker.fisher_cotangent(loss, key))


def _batch_factors(params, seed, key):
    return _factors(params, *_batch(seed), key)


def _dense_damped(a, g, mode):
    """The damped Kronecker block: A (x) G + lambda I, or the factored (A + pi sqrt(l) I) (x) (G + sqrt(l)/pi I)."""
    a, g = np.asarray(a), np.asarray(g)
    if mode == "exact":
        return np.kron(a, g) + LAM * np.eye(a.shape[0] * g.shape[0])
    pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
    return np.kron(a + pi * np.sqrt(LAM) * np.eye(len(a)), g + np.sqrt(LAM) / pi * np.eye(len(g)))


def _dense_direction(a, g, grad_matrix, mode):
    """(A (x) G + damping)^{-1} vec(V) by a dense solve (row-major vec of V (d_a, d_g))."""
    return scipy.linalg.solve(_dense_damped(a, g, mode), np.asarray(grad_matrix).reshape(-1)).reshape(grad_matrix.shape)


def _check_direction(updates, grads, factors, diagonal, mode):
    for layer, (a, g) in zip(LAYERS.layers, factors):
        path = "l1" if layer.kernel.startswith("['l1']") else "l2"
        v = kronecker.kernel_matrix(layer, grads[path]["w"], grads[path].get("b"))
        got = kronecker.kernel_matrix(layer, updates[path]["w"], updates[path].get("b"))
        np.testing.assert_allclose(got, _dense_direction(a, g, v, mode), rtol=1e-9, atol=1e-12)
    for name, d in zip(LAYERS.fallback, diagonal):
        key = name.strip("[]'")
        np.testing.assert_allclose(updates[key], grads[key] / (d + LAM), rtol=1e-12)


@pytest.mark.parametrize("mode", ["factored", "exact"])
def test_direction_equals_dense_solve_and_inverses_are_amortized(mode):
    assert [l.kernel for l in LAYERS.layers] == ["['l1']['w']", "['l2']['w']"]
    assert LAYERS.fallback == ("['scale']", "['shift']")
    tx = oso.scale_by_kfac(LAYERS, damping=LAM, damping_mode=mode, kl_clip=None, precondition_frequency=2, statistics_frequency=1)
    params = _params()
    update = _jit_update(tx)
    grads, updates, state0 = _step(tx, tx.init(params), params, 1, update)
    # first statistics update: the factors are the batch's (decay min(1 - 1/1, 0.95) = 0)
    batch = _batch_factors(params, 1, jax.random.split(jax.random.key(0))[1])
    for (a, g), layer in zip(_factors_of(state0), LAYERS.layers):
        np.testing.assert_allclose(a, batch.factors[layer.name][0], rtol=1e-12)
        np.testing.assert_allclose(g, batch.factors[layer.name][1], rtol=1e-12)
    _check_direction(updates, grads, _factors_of(state0), state0.diagonal, mode)

    # step 2: factors are EMAs (decay min(1 - 1/2, 0.95) = 1/2) but the preconditioners stay step 1's
    grads, updates, state1 = _step(tx, state0, params, 2, update)
    batch = _batch_factors(params, 2, jax.random.split(state0.key)[1])
    for (a0, _), (a1, _), layer in zip(_factors_of(state0), _factors_of(state1), LAYERS.layers):
        np.testing.assert_allclose(a1, 0.5 * a0 + 0.5 * batch.factors[layer.name][0], rtol=1e-12)
    _check_direction(updates, grads, _factors_of(state0), state1.diagonal, mode)

    # step 3 recomputes the preconditioners from the EMA factors
    grads, updates, state2 = _step(tx, state1, params, 3, update)
    _check_direction(updates, grads, _factors_of(state2), state2.diagonal, mode)
    assert int(state2.nonfinite) == 0


def _per_example_kernel_gradients(params, seed):
    """``{layer: (N, d_in, d_out)}`` per-example gradients of ``l_i`` (not divided by N), by vmap(grad)."""
    x, y = _batch(seed)

    def example_loss(p, xi, yi):
        return oso.losses.softmax_cross_entropy(yi[None])(_model(p, xi[None]))

    grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(params, x, y)
    out = {}
    for layer in LAYERS.layers:
        path = "l1" if layer.kernel.startswith("['l1']") else "l2"
        out[layer.name] = jax.vmap(lambda w, b: kronecker.kernel_matrix(layer, w, b))(grads[path]["w"], grads[path].get("b"))
    return out


def _ekfac_scales(params, seed, state):
    """George et al.'s diagonal, written out: mean_i (Q_A^T dl_i/dW Q_G)^2 in the state's eigenbases."""
    per_example = _per_example_kernel_gradients(params, seed)
    out = []
    for layer, ((_, q_a), (_, q_g)) in zip(LAYERS.layers, _preconditioners_of(state)):
        q_a, q_g = np.asarray(q_a), np.asarray(q_g)
        out.append(np.mean([(q_a.T @ np.asarray(d) @ q_g) ** 2 for d in per_example[layer.name]], axis=0))
    return out


def _check_ekfac_direction(updates, grads, state, scales):
    """``vec(v) = (Q_A (x) Q_G) diag(s + lambda)^{-1} (Q_A (x) Q_G)^T vec(V)`` with ``np.kron`` and a solve."""
    for layer, ((a, q_a), (g, q_g)), s in zip(LAYERS.layers, _preconditioners_of(state), scales):
        path = "l1" if layer.kernel.startswith("['l1']") else "l2"
        q = np.kron(np.asarray(q_a), np.asarray(q_g))
        damped = q @ np.diag(np.asarray(s).reshape(-1) + LAM) @ q.T
        v = np.asarray(kronecker.kernel_matrix(layer, grads[path]["w"], grads[path].get("b"))).reshape(-1)
        got = kronecker.kernel_matrix(layer, updates[path]["w"], updates[path].get("b"))
        np.testing.assert_allclose(got, scipy.linalg.solve(damped, v).reshape(got.shape), rtol=1e-8, atol=1e-12)


def test_eigenvalue_corrected_kfac_matches_the_papers_diagonal_and_a_dense_solve():
    params = _params()
    tx = oso.scale_by_kfac(
        LAYERS, damping=LAM, approximation="eigenvalue_corrected", fisher="empirical", kl_clip=None, precondition_frequency=3,
        statistics_frequency=1,
    )
    update = _jit_update(tx)
    grads, updates, state0 = _step(tx, tx.init(params), params, 1, update)
    # step 1 recomputes the eigenbases (of this batch's factors) and restarts the scales from this batch in them
    for layer, (a, g), ((ea, q_a), (eg, q_g)) in zip(LAYERS.layers, _factors_of(state0), _preconditioners_of(state0)):
        np.testing.assert_allclose(q_a @ np.diag(ea) @ q_a.T, a, atol=1e-10)
        np.testing.assert_allclose(q_g @ np.diag(eg) @ q_g.T, g, atol=1e-10)
    expected0 = _ekfac_scales(params, 1, state0)
    for got, want in zip(_scales_of(state0), expected0):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
    _check_ekfac_direction(updates, grads, state0, _scales_of(state0))
    # K-FAC's own diagonal in that basis, outer(eig A, eig G), differs: the correction is not a no-op
    assert not np.allclose(_scales_of(state0)[0], np.outer(_preconditioners_of(state0)[0][0][0], _preconditioners_of(state0)[0][1][0]))

    # step 2 keeps the eigenbases and averages the scales: decay min(1 - 1/2, 0.95) = 1/2
    grads, updates, state1 = _step(tx, state0, params, 2, update)
    jax.tree.map(np.testing.assert_array_equal, _preconditioners_of(state1), _preconditioners_of(state0))
    expected1 = [0.5 * s0 + 0.5 * s for s0, s in zip(expected0, _ekfac_scales(params, 2, state0))]
    for got, want in zip(_scales_of(state1), expected1):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
    _check_ekfac_direction(updates, grads, state1, expected1)


def _layer_matrices(tree, index):
    layer = LAYERS.layers[index]
    path = "l1" if layer.kernel.startswith("['l1']") else "l2"
    return kronecker.kernel_matrix(layer, tree[path]["w"], tree[path].get("b"))


@pytest.mark.parametrize("mode", ["factored", "exact"])
def test_staggered_refreshes_follow_the_layer_schedule(mode):
    """stagger=2, inverses every 2 steps: both layers on step 0, then the costlier l1 (4 x 4 factors, slot 0) on
    steps 2, 4 and l2 (4 x 4 and 3 x 3, slot 1) on steps 1, 3; each layer's step is the dense solve with the
    factors of its last refresh."""
    tx = oso.scale_by_kfac(LAYERS, damping=LAM, damping_mode=mode, kl_clip=None, precondition_frequency=2, stagger=2)
    params, state = _params(), None
    update = _jit_update(tx)
    state = tx.init(params)
    history = []
    last_refresh = {0: [0, 0, 2, 2, 4], 1: [0, 1, 1, 3, 3]}
    for step in range(5):
        grads, updates, state = _step(tx, state, params, step + 1, update)
        history.append(state)
        for index in (0, 1):
            a, g = _factors_of(history[last_refresh[index][step]])[index]
            want = _dense_direction(a, g, _layer_matrices(grads, index), mode)
            np.testing.assert_allclose(_layer_matrices(updates, index), want, rtol=1e-9, atol=1e-12, err_msg=f"{step}")
    assert int(state.nonfinite) == 0


def test_staggered_ekfac_restarts_a_refreshed_layers_scales_at_the_next_statistics_step():
    """A layer refreshed on its slot's step takes K-FAC's diagonal outer(a, g) in its new eigenbasis, and on the
    next statistics step the batch's own scales in that basis (decay 0)."""
    params = _params()
    tx = oso.scale_by_kfac(
        LAYERS, damping=LAM, approximation="eigenvalue_corrected", fisher="empirical", kl_clip=None,
        statistics_frequency=1, precondition_frequency=2, stagger=True,
    )
    update = _jit_update(tx)
    _, _, state0 = _step(tx, tx.init(params), params, 1, update)
    grads, updates, state1 = _step(tx, state0, params, 2, update)  # step 1: l2's slot
    (a, _), (g, _) = _preconditioners_of(state1)[1]
    np.testing.assert_allclose(_scales_of(state1)[1], np.outer(a, g), rtol=1e-12)
    _check_ekfac_direction(updates, grads, state1, _scales_of(state1))
    # l1, refreshed on step 0 with every layer, restarted from this batch's scales in its basis
    np.testing.assert_allclose(_scales_of(state1)[0], _ekfac_scales(params, 2, state0)[0], rtol=1e-10, atol=1e-14)
    np.testing.assert_array_equal([int(l.num_scales) for l in oso.kfac_layer_states(LAYERS, state1)], [1, 0])
    _, _, state2 = _step(tx, state1, params, 3, update)  # step 2: statistics first (l2 restarts), then l1's slot
    np.testing.assert_allclose(_scales_of(state2)[1], _ekfac_scales(params, 3, state1)[1], rtol=1e-10, atol=1e-14)
    (a, _), (g, _) = _preconditioners_of(state2)[0]
    np.testing.assert_allclose(_scales_of(state2)[0], np.outer(a, g), rtol=1e-12)
    np.testing.assert_array_equal([int(l.num_scales) for l in oso.kfac_layer_states(LAYERS, state2)], [0, 1])


def _dense_fisher(factors, diagonal, damped):
    """Block-diagonal Kronecker (+ diagonal) Fisher over [layer vecs..., fallback leaves...], damped or not."""
    blocks = []
    for a, g in factors:
        blocks.append(_dense_damped(a, g, "factored") if damped else np.kron(a, g))
    blocks.extend(np.diag(np.asarray(d).reshape(-1) + (LAM if damped else 0.0)) for d in diagonal)
    return scipy.linalg.block_diag(*blocks)


def _as_vector(v):
    parts = []
    for layer in LAYERS.layers:
        path = "l1" if layer.kernel.startswith("['l1']") else "l2"
        parts.append(np.asarray(kronecker.kernel_matrix(layer, v[path]["w"], v[path].get("b"))).reshape(-1))
    parts.extend(np.asarray(v[name.strip("[]'")]).reshape(-1) for name in LAYERS.fallback)
    return np.concatenate(parts)


def test_kl_clipping_bounds_the_step():
    params = _params()
    lr, kl_clip = 0.5, 1e-4
    unclipped = oso.scale_by_kfac(LAYERS, damping=LAM, kl_clip=None, statistics_frequency=1)
    clipped = oso.scale_by_kfac(LAYERS, damping=LAM, kl_clip=kl_clip, learning_rate=lr, statistics_frequency=1)
    _, v, state = _step(unclipped, unclipped.init(params), params, seed=1)
    _, v_clipped, _ = _step(clipped, clipped.init(params), params, seed=1)
    damped = _dense_fisher(_factors_of(state), state.diagonal, damped=True)
    quadratic = lr**2 * _as_vector(v) @ damped @ _as_vector(v)
    assert quadratic > kl_clip  # the clip is active here
    w = _as_vector(v_clipped)
    np.testing.assert_allclose(lr**2 * w @ damped @ w, kl_clip, rtol=1e-8)
    assert lr**2 * w @ _dense_fisher(_factors_of(state), state.diagonal, damped=False) @ w <= kl_clip
    nu = np.sqrt(kl_clip / quadratic)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, nu * b, rtol=1e-10), v_clipped, v)


def test_nonfinite_factors_keep_previous_inverses():
    params = _params()
    tx = oso.scale_by_kfac(LAYERS, damping=LAM, kl_clip=None, precondition_frequency=1, statistics_frequency=1)
    _, _, state = _step(tx, tx.init(params), params, seed=1)
    x, y = _batch(2)
    x = x.at[0, 0].set(jnp.nan)
    loss = oso.losses.softmax_cross_entropy(y)
    grads = jax.grad(lambda p: loss(_model(p, _batch(2)[0])))(params)
    _, bad = _jit_update(tx)(grads, state, params, x, y)
    assert int(bad.nonfinite) == len(LAYERS.layers) + len(LAYERS.fallback)
    jax.tree.map(np.testing.assert_array_equal, _factors_of(bad), _factors_of(state))
    jax.tree.map(np.testing.assert_array_equal, _preconditioners_of(bad), _preconditioners_of(state))


def _dense_ggn(params, seed):
    """``J^T H_L J`` over the flattened parameters, ``J`` by jax.jacobian and ``H_L`` by jax.hessian."""
    model_fn, loss, _ = _problem(seed)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    outputs = model_fn(params)
    jac = jax.jacobian(lambda f: model_fn(unravel(f)))(flat).reshape(outputs.size, -1)
    h_out = jax.hessian(lambda y: loss(y.reshape(outputs.shape)))(outputs.reshape(-1))
    return np.asarray(jac.T @ h_out @ jac)


def _levenberg_marquardt_reference(damping, v, params, seed, lr, omega):
    """Section 6.5 written out: rho = (h(theta + delta) - h(theta)) / (g.delta + delta^T (G + lambda I) delta / 2)."""
    model_fn, loss, grad_fn = _problem(seed)
    value = lambda p: float(loss(model_fn(p)))  # noqa: E731
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    delta = -lr * np.asarray(jax.flatten_util.ravel_pytree(v)[0])
    g = np.asarray(jax.flatten_util.ravel_pytree(grad_fn(params))[0])
    predicted = g @ delta + 0.5 * (delta @ _dense_ggn(params, seed) @ delta + damping * delta @ delta)
    actual = value(unravel(flat + delta)) - value(params)
    rho = actual / predicted if predicted < 0 else -np.inf  # a model that predicts no decrease: a failed step
    return damping * omega if rho > 0.75 else damping / omega if rho < 0.25 else damping


@pytest.mark.parametrize("lr", [0.5, 100.0])
def test_adaptive_damping_follows_the_levenberg_marquardt_rule(lr):
    """Every step (interval 1) the damping moves as the dense reference says; the next step uses it."""
    params, omega = _params(), 0.9
    tx = oso.scale_by_kfac(
        LAYERS, damping=LAM, damping_mode="exact", kl_clip=None, precondition_frequency=1, learning_rate=lr,
        adaptive_damping=True, damping_adaptation_interval=1, damping_adaptation_decay=omega, statistics_frequency=1,
    )

    @jax.jit
    def update(grads, state, params, x, y):
        loss = oso.losses.softmax_cross_entropy(y)
        model_fn = lambda p: _model(p, x)  # noqa: E731
        return tx.update(grads, state, params, model_fn=model_fn, loss=loss, value_fn=lambda p: loss(model_fn(p)))

    state, moves = tx.init(params), set()
    for seed in range(1, 5):
        grads = _problem(seed)[2](params)
        v, new_state = update(grads, state, params, *_batch(seed))
        expected = _levenberg_marquardt_reference(float(state.damping), v, params, seed, lr, omega)
        np.testing.assert_allclose(float(new_state.damping), expected, rtol=1e-12)
        moves.add(np.sign(expected - float(state.damping)))
        params = optax.apply_updates(params, jax.tree.map(lambda x: -lr * x, v))
        state = new_state
    # the two rates exercise both branches: a small step is trusted (damping falls), a huge one is not
    direction = -1.0 if lr < 1 else 1.0
    assert direction in moves, moves


def test_alias_runs_in_jit_with_momentum_and_weight_decay():
    params = _params()
    tx = oso.kfac(0.1, LAYERS, momentum=0.5, weight_decay=1e-2)
    state = tx.init(params)
    model_fn, loss, grad_fn = _problem(1)
    update = _jit_update(tx)
    losses = []
    for _ in range(5):
        updates, state = update(grad_fn(params), state, params, *_batch(1))
        params = optax.apply_updates(params, updates)
        losses.append(float(loss(model_fn(params))))
    assert losses[-1] < losses[0]


def test_errors():
    with pytest.raises(ValueError, match="damping"):
        oso.scale_by_kfac(LAYERS, damping=-1.0)
    with pytest.raises(ValueError, match="damping_mode"):
        oso.scale_by_kfac(LAYERS, damping_mode="nope")
    with pytest.raises(ValueError, match="approximation"):
        oso.scale_by_kfac(LAYERS, approximation="diagonal", kl_clip=None)
    with pytest.raises(ValueError, match="learning_rate"):
        oso.scale_by_kfac(LAYERS)
    with pytest.raises(ValueError, match="layers"):
        oso.scale_by_kfac({"not": "layers"}, kl_clip=None)
    tx = oso.scale_by_kfac(LAYERS, kl_clip=None)
    params = _params()
    with pytest.raises(TypeError, match="model_fn"):
        tx.update(params, tx.init(params), params, loss=_problem(1)[1])
    with pytest.raises(ValueError, match="learning_rate"):
        oso.scale_by_kfac(LAYERS, kl_clip=None, adaptive_damping=True)
    with pytest.raises(ValueError, match="damping_adaptation_interval"):
        oso.scale_by_kfac(LAYERS, kl_clip=None, damping_adaptation_interval=0)
    adaptive = oso.scale_by_kfac(LAYERS, learning_rate=0.1, adaptive_damping=True)
    model_fn, loss, _ = _problem(1)
    with pytest.raises(TypeError, match="value_fn"):
        adaptive.update(params, adaptive.init(params), params, model_fn=model_fn, loss=loss)


DEVICES_SCRIPT = r'''
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
import re
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import optax_second_order as oso
from optax_second_order.curvature import kronecker

assert jax.device_count() == 4
k = jax.random.split(jax.random.key(0), 8)
init = {f"l{i}": {"w": jax.random.normal(k[i], (6, 6)) / 3, "b": jnp.zeros(6)} for i in range(3)}
init["out"] = {"w": jax.random.normal(k[5], (6, 3))}
x = jax.random.normal(k[6], (32, 6)); y = jax.random.randint(k[7], (32,), 0, 3)

def model(p, x):
    for i in range(3):
        x = jnp.tanh(kronecker.dense(x, p[f"l{i}"]["w"], p[f"l{i}"]["b"]))
    return kronecker.dense(x, p["out"]["w"])

layers = kronecker.find_layers(lambda p: model(p, x), init)
kfac_stacks = lambda st: (st.factors, st.preconditioners, st.scales)
kbfgs_stacks = lambda st: (st.factors, st.inverse_factors, st.curvature, st.pairs)
makers = {  # name: (transformation with precondition_sharding s, the bank's stacks of its state)
    "kfac": (lambda s: oso.scale_by_kfac(layers, kl_clip=None, damping=1e-2, statistics_frequency=1,
                                         precondition_frequency=2, precondition_sharding=s), kfac_stacks),
    "ekfac-stagger": (lambda s: oso.scale_by_kfac(layers, kl_clip=None, damping=1e-2, statistics_frequency=1,
                                                  approximation="eigenvalue_corrected", precondition_frequency=2,
                                                  stagger=True, precondition_sharding=s), kfac_stacks),
    "kbfgs": (lambda s: oso.scale_by_kbfgs(layers, learning_rate=0.1, precondition_sharding=s), kbfgs_stacks),
    "kbfgs-l": (lambda s: oso.scale_by_kbfgs(layers, learning_rate=0.1, limited_memory=True, memory_size=4,
                                             precondition_sharding=s), kbfgs_stacks),
}

def run(name, mesh, hlo=False):
    tx = makers[name][0](None if mesh is None else NamedSharding(mesh, P("data")))
    params, xs, ys = init, x, y
    if mesh is not None:  # data parallel: the batch split over the devices, the params replicated
        xs, ys = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, y))
        params = jax.device_put(params, NamedSharding(mesh, P()))

    @jax.jit
    def step(params, state, xs, ys):
        loss = oso.losses.softmax_cross_entropy(ys)
        grads = jax.grad(lambda p: loss(model(p, xs)))(params)
        u, state = tx.update(grads, state, params, model_fn=lambda p: model(p, xs), loss=loss)
        return optax.apply_updates(params, jax.tree.map(lambda u: -0.1 * u, u)), state

    state = tx.init(params)
    for _ in range(6):
        params, state = step(params, state, xs, ys)
    return params, state, (step.lower(params, state, xs, ys).compile().as_text() if hlo else None)

for name in makers:
    single, single_state, _ = run(name, None)
    for types in (AxisType.Explicit, AxisType.Auto):
        mesh = jax.make_mesh((4,), ("data",), axis_types=(types,))
        with jax.set_mesh(mesh):
            sharded, state, hlo = run(name, mesh, hlo=types == AxisType.Auto)
        # float32 (as users run): the global batch's factors, to the rounding of the all-reduce over devices
        for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=f"{name} {types}")
        for a, b in zip(jax.tree.leaves(makers[name][1](single_state)), jax.tree.leaves(makers[name][1](state))):
            # the real units (a mesh pads each group to a multiple of its devices), to float32 rounding in norm
            error = np.linalg.norm(np.asarray(b)[:len(a)] - a) / max(np.linalg.norm(a), 1e-30)
            assert error <= 1e-4, (name, types, a.shape, error)
        assert all(a.sharding.is_fully_replicated for a in jax.tree.leaves(sharded)), (name, types)
        # the bank's stacks (factors, preconditioners, EK-FAC's scales; K-BFGS's H_a, H_g, pairs) are stored split:
        # device 0 holds a quarter
        stacks = jax.tree.leaves(makers[name][1](state))
        total = sum(a.nbytes for a in stacks)
        on_0 = sum(s.data.nbytes for a in stacks for s in a.addressable_shards if s.device == jax.devices()[0])
        assert on_0 <= 1.25 / 4 * total and all(a.sharding.spec[0] == "data" for a in stacks), (name, types, on_0)
        print(name, types, "device 0 holds", on_0, "of", total, "stack bytes")
        if hlo is not None and name == "kfac":
            # l0..l2 (7 x 7 and 6 x 6 factors, 3 units padded to 4) and out (6 x 6, 3 x 3; 1 unit padded to 4): each
            # device inverts one matrix of each of the four stacks
            calls = [l for l in hlo.splitlines() if "custom-call" in l and "getrf" in l]
            assert len(calls) == 4 and all(re.search(r"= \(f32\[(1,)?\d+,\d+\]", c) for c in calls), calls
print("OK")
'''


def test_sharded_batch_gives_global_factors_and_spreads_inverses_over_devices():
    """4 host devices, Explicit and Auto meshes, K-FAC, staggered EK-FAC, K-BFGS and K-BFGS(L): 6 sharded steps equal
    one device's (parameters and every stack of the state), the bank's stacks are stored split (a quarter on each
    device), and for K-FAC each device decomposes 1 matrix per stack."""
    env = dict(os.environ, JAX_ENABLE_X64="0")  # the script adds the device count to the suite's XLA_FLAGS
    result = subprocess.run([sys.executable, "-c", DEVICES_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    print(result.stdout)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("options", [{}, {"approximation": "eigenvalue_corrected"}, {"adaptive_damping": True}],
                         ids=["kfac", "ekfac", "adaptive"])
def test_a_loss_scaled_by_1e20_trains_with_bounded_steps(options):
    """float32, the loss (value_fn and its gradient) scaled by 1e20: v . grad overflows. The KL clip used to turn
    that into NaN parameters; now it is formed without overflow and the step stays bounded by the clip."""
    params = jax.tree.map(lambda x: x.astype(jnp.float32), _params())
    x, y = (a.astype(jnp.float32) if a.dtype == jnp.float64 else a for a in _batch(1))
    loss = oso.losses.softmax_cross_entropy(y)
    model_fn = lambda p: _model(p, x)  # noqa: E731
    value_fn = lambda p: 1e20 * loss(model_fn(p))  # noqa: E731
    lr, kl_clip = 0.1, 1e-2
    tx = oso.kfac(lr, LAYERS, damping=0.1, kl_clip=kl_clip, momentum=0.0, **options)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(value_fn)(params), state, params, model_fn=model_fn, loss=loss,
                                   value_fn=value_fn)
        return optax.apply_updates(params, updates), state, updates

    state, start = tx.init(params), float(loss(model_fn(params)))
    for _ in range(10):
        params, state, updates = step(params, state)
        assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
        # lr^2 nu^2 v^T F~ v <= kl_clip and F~ >= damping I: ||step||^2 <= kl_clip / damping
        assert float(optax.tree.norm(updates)) <= np.sqrt(kl_clip / 0.1) * (1 + 1e-3)
    assert float(loss(model_fn(params))) < start


def test_quadratic_model_chooses_the_learning_rate_and_momentum():
    """Section 7: alpha, mu minimize M(alpha Delta + mu delta_0) with the exact Fisher + damping; a NumPy 2x2 solve
    with the dense GGN (jax.jacobian, jax.hessian) predicts both, step by step, and the step itself."""
    tx = oso.kfac(1.0, LAYERS, damping=LAM, damping_mode="exact", kl_clip=None, precondition_frequency=1, statistics_frequency=1,
                  adaptive_learning_rate=True, adaptive_momentum=True)
    plain = oso.scale_by_kfac(LAYERS, damping=LAM, damping_mode="exact", kl_clip=None, precondition_frequency=1, statistics_frequency=1)

    def update(tx):
        return jax.jit(lambda g, s, p, x, y: tx.update(g, s, p, model_fn=lambda q: _model(q, x),
                                                       loss=oso.losses.softmax_cross_entropy(y)))

    step, natural = update(tx), update(plain)
    params, state, plain_state, previous = _params(), tx.init(_params()), plain.init(_params()), None
    flat = lambda t: np.asarray(jax.flatten_util.ravel_pytree(t)[0])  # noqa: E731
    for seed in range(1, 4):
        grads = _problem(seed)[2](params)
        v, plain_state = natural(grads, plain_state, params, *_batch(seed))  # the same statistics: F~^{-1} g
        updates, state = step(grads, state, params, *_batch(seed))
        c = _dense_ggn(params, seed) + LAM * np.eye(len(flat(grads)))
        d, g = -flat(v), flat(grads)
        if previous is None:
            alpha, mu = -(g @ d) / (d @ c @ d), 0.0
        else:
            a = np.array([[d @ c @ d, d @ c @ previous], [previous @ c @ d, previous @ c @ previous]])
            alpha, mu = np.linalg.solve(a, -np.array([g @ d, g @ previous]))
        np.testing.assert_allclose(np.asarray(state[0].step_coefficients), [alpha, mu], rtol=1e-8, atol=1e-12)
        delta = alpha * d + (0.0 if previous is None else mu * previous)
        np.testing.assert_allclose(flat(updates), delta, rtol=1e-8, atol=1e-12)  # lr 1: the update is the step
        params, previous = optax.apply_updates(params, updates), delta
    assert len(tx.init(params)) == 3  # scale_by_kfac, add_decayed_weights, scale_by_learning_rate: no trace


def test_quadratic_model_on_a_zero_gradient_takes_no_step():
    """A zero gradient gives the direction ``Delta = 0`` and ``Delta^T C Delta = 0``: the model's step is
    ``alpha = mu = 0`` (not 0 / 0), a zero update that is not counted as non-finite."""
    tx = oso.scale_by_kfac(LAYERS, kl_clip=None, learning_rate=1.0, adaptive_learning_rate=True)
    params = _params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, state = _jit_update(tx)(zeros, tx.init(params), params, *_batch(1))
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    np.testing.assert_array_equal(np.asarray(state.step_coefficients), [0.0, 0.0])
    assert int(state.nonfinite) == 0
