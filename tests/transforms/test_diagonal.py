"""Diagonal preconditioners against independent references (float64).

* ``adam`` / ``adagrad`` aliases against ``optax.adam`` / ``optax.adagrad`` over 100 steps;
* AdaHessian against a NumPy loop of the official PyTorch ``Adahessian.step`` (amirgholami/adahessian,
  ``optim_adahessian.py``), its Hessian-vector products from a dense ``jax.hessian`` of a loss written
  here, fed the same Rademacher probes (the key splitting of ``oso.probes`` reproduced);
* Sophia-G against a NumPy loop of the official ``SophiaG`` (Liuhong99/Sophia, ``sophia.py`` and
  ``train_sophiag.py``) on a tanh MLP with hand-written backprop, fed the same sampled labels;
* Sophia-H against ``optax.contrib.scale_by_sophia`` step by step;
* clipping under negative and zero curvature, skipped non-finite estimates, bad hyperparameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import optax_second_order as oso


@pytest.fixture(autouse=True, scope="module")
def float64():
    with jax.enable_x64(True):
        yield


def _tree_allclose(a, b, tol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# Adam and Adagrad as diagonal-Fisher preconditioners.


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda: oso.adam(3e-2), lambda: optax.adam(3e-2)),
        (lambda: oso.adam(1e-2, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-9),
         lambda: optax.adam(1e-2, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-9)),
        (lambda: oso.adagrad(0.1), lambda: optax.adagrad(0.1)),
    ],
    ids=["adam", "adam-options", "adagrad"],
)
def test_alias_equals_optax_over_100_steps(ours, theirs):
    target = jax.random.normal(jax.random.PRNGKey(1), (5, 3))

    def value_fn(p):
        return jnp.sum(jnp.log(jnp.cosh(p["w"] - target))) + jnp.sum(p["b"] ** 4)

    params0 = {"w": jnp.zeros((5, 3)), "b": jnp.ones(3)}
    runs = []
    for tx in (ours(), theirs()):
        @jax.jit
        def run(params):
            def step(carry, _):
                params, state = carry
                updates, state = tx.update(jax.grad(value_fn)(params), state, params)
                params = optax.apply_updates(params, updates)
                return (params, state), params

            return jax.lax.scan(step, (params, tx.init(params)), length=100)[1]

        runs.append(run(params0))
    _tree_allclose(*runs)
    assert float(jnp.abs(runs[0]["w"][-1] - runs[0]["w"][0]).max()) > 0.1  # it moved


@pytest.mark.parametrize(
    "ours, theirs",
    [(lambda: oso.adam(3e-2), lambda: optax.adam(3e-2)), (lambda: oso.adagrad(0.1), lambda: optax.adagrad(0.1))],
    ids=["adam", "adagrad"],
)
def test_alias_in_optax_masked_needs_no_full_params(ours, theirs):
    """Inside ``optax.masked``, a step given ``value_fn`` (as a chain with a curvature method hands every child) but
    no ``full_params``: Adam and Adagrad call no extra function, so they take ``optax.adam`` / ``optax.adagrad``'s
    masked steps; a transformation that does call ``value_fn`` there still asks for ``full_params``."""
    target = jax.random.normal(jax.random.PRNGKey(1), (5, 3))

    def value_fn(p):
        return jnp.sum(jnp.log(jnp.cosh(p["w"] - target))) + jnp.sum(p["b"] ** 4) + jnp.sum(p["frozen"] ** 2)

    params0 = {"w": jnp.zeros((5, 3)), "b": jnp.ones(3), "frozen": jnp.ones(2)}
    mask = {"w": True, "b": True, "frozen": False}
    runs = []
    for tx in (optax.masked(ours(), mask), optax.masked(theirs(), mask)):
        params, state, trajectory = params0, tx.init(params0), []
        update = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p, value_fn=value_fn))
        for _ in range(5):
            updates, state = update(jax.grad(value_fn)(params), state, params)
            params = optax.apply_updates(params, updates)
            trajectory.append(params)
        runs.append(trajectory)
    for a, b in zip(*runs):
        _tree_allclose(a, b, tol=1e-12)
    assert float(jnp.abs(runs[0][-1]["w"]).max()) > 0.01  # it moved

    hutchinson = optax.masked(oso.adahessian(0.1), mask)
    with pytest.raises(TypeError, match="full_params"):
        hutchinson.update(params0, hutchinson.init(params0), params0, value_fn=value_fn)


# ---------------------------------------------------------------------------------------------
# AdaHessian against the official algorithm.


def _rademacher_probe(key, params):
    """The probe ``oso.hutchinson_diagonal(value_fn, params, key, num_probes=1)`` draws."""
    (probe_key,) = jax.random.split(key, 1)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(probe_key, len(leaves))
    return treedef.unflatten([oso.rademacher(k, p.shape, p.dtype) for k, p in zip(keys, leaves)])


@pytest.fixture(scope="module")
def conv_problem():
    """A conv net: 5x5x1 images -> 3x3 conv (2 channels, VALID) -> tanh -> dense -> 3 classes."""
    k = jax.random.split(jax.random.PRNGKey(2), 5)
    images = jax.random.normal(k[0], (6, 5, 5, 1))
    labels = jax.random.randint(k[1], (6,), 0, 3)
    params = {
        "kernel": 0.5 * jax.random.normal(k[2], (3, 3, 1, 2)),
        "dense": 0.5 * jax.random.normal(k[3], (18, 3)),
        "bias": 0.1 * jax.random.normal(k[4], (3,)),
    }

    def value_fn(p):
        h = jax.lax.conv_general_dilated(images, p["kernel"], (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        logits = jnp.tanh(h).reshape(6, 18) @ p["dense"] + p["bias"]
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[:, None], 1)[:, 0])

    return params, value_fn


def _official_adahessian(params, value_fn, steps, lr, b1, b2, eps, wd, k, statistics_frequency, seed):
    """NumPy loop of the official ``Adahessian.step`` (+ a refresh-every-N Hessian, bias-corrected per refresh).

    ``D = |Hv|`` (``= |v * Hv|``) with the 4-D kernel's ``|Hv|`` averaged over its spatial axes;
    ``v <- b2 v + (1 - b2) D^2``; ``denom = sqrt(v)^k / sqrt(1 - b2^n)^k + eps``;
    ``p <- p - lr * (m / (1 - b1^t) / denom + wd * p)``.
    """
    flat0, unravel = ravel_pytree(params)
    hessian = jax.jit(jax.hessian(lambda x: value_fn(unravel(x))))
    grad = jax.jit(jax.grad(value_fn))
    p = {name: np.asarray(x) for name, x in params.items()}
    m = {name: np.zeros_like(x) for name, x in p.items()}
    v = {name: np.zeros_like(x) for name, x in p.items()}
    key, n = jax.random.PRNGKey(seed), 0
    trajectory = []
    for t in range(1, steps + 1):
        g = {name: np.asarray(x) for name, x in grad(p).items()}
        if (t - 1) % statistics_frequency == 0:
            key, subkey = jax.random.split(key)
            z = _rademacher_probe(subkey, p)
            flat_z = np.asarray(ravel_pytree(z)[0])
            hz = unravel(jnp.asarray(np.asarray(hessian(ravel_pytree(p)[0])) @ flat_z))
            n += 1
            for name in p:
                d = np.abs(np.asarray(hz[name]) * np.asarray(z[name]))
                if d.ndim == 4:  # conv kernel (h, w, in, out): mean over the spatial dims
                    d = np.broadcast_to(d.mean(axis=(0, 1), keepdims=True), d.shape)
                v[name] = b2 * v[name] + (1 - b2) * d * d
        for name in p:
            m[name] = b1 * m[name] + (1 - b1) * g[name]
            denom = np.sqrt(v[name]) ** k / np.sqrt(1 - b2**n) ** k + eps
            p[name] = p[name] - lr * (m[name] / (1 - b1**t) / denom + wd * p[name])
        trajectory.append({name: x.copy() for name, x in p.items()})
    return trajectory


@pytest.mark.parametrize("hessian_power, statistics_frequency", [(1.0, 1), (0.5, 3)])
def test_adahessian_matches_official_loop(conv_problem, hessian_power, statistics_frequency):
    params, value_fn = conv_problem
    hyper = dict(lr=0.05, b1=0.9, b2=0.999, eps=1e-4, wd=1e-2)
    tx = oso.adahessian(hyper["lr"], b1=hyper["b1"], b2=hyper["b2"], eps=hyper["eps"], weight_decay=hyper["wd"],
                        hessian_power=hessian_power, statistics_frequency=statistics_frequency, seed=3)
    step = jax.jit(lambda p, s: tx.update(jax.grad(value_fn)(p), s, p, value_fn=value_fn))
    expected = _official_adahessian(params, value_fn, 8, k=hessian_power, statistics_frequency=statistics_frequency, seed=3,
                                    **hyper)
    state, p = tx.init(params), params
    for want in expected:
        updates, state = step(p, state)
        p = optax.apply_updates(p, updates)
        _tree_allclose(p, want)
    assert int(state[0].estimates) == len(range(0, 8, statistics_frequency))
    # the conv kernel's statistic holds one value per (in, out) pair, not one per kernel entry
    assert state[0].curvature["kernel"].shape == (1, 1) + params["kernel"].shape[2:]


@pytest.mark.parametrize(
    "make",
    [lambda: oso.adahessian(0.05, weight_decay=1e-2, seed=3),
     lambda: oso.sophia(0.01, estimator="hutchinson", statistics_frequency=2, seed=3)],
    ids=["adahessian", "sophia-h"],
)
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_hvp_fn_of_the_training_step_gives_the_same_steps(conv_problem, make, masked):
    """``oso.grad_and_hvp_fn`` (one linearization for the gradient and H z) against differentiating ``value_fn``
    again: the same probes and steps (also inside ``optax.masked``, with ``full_params``)."""
    params, value_fn = conv_problem
    tx = make()
    if masked:
        tx = optax.masked(tx, {name: name != "dense" for name in params})

    def step(p, s, with_hvp_fn):
        extra = dict(full_params=p) if masked else {}
        if with_hvp_fn:
            value, grads, hvp_fn = oso.grad_and_hvp_fn(value_fn, p, return_value=True)
            np.testing.assert_equal(np.ndim(value), 0)
            return tx.update(grads, s, p, value_fn=value_fn, hvp_fn=hvp_fn, **extra)
        return tx.update(jax.grad(value_fn)(p), s, p, value_fn=value_fn, **extra)

    runs = []
    for with_hvp_fn in (False, True):
        update = jax.jit(lambda p, s: step(p, s, with_hvp_fn))
        p, state, trajectory = params, tx.init(params), []
        for _ in range(4):
            updates, state = update(p, state)
            p = optax.apply_updates(p, updates)
            trajectory.append(p)
        runs.append(trajectory)
    for a, b in zip(*runs):
        _tree_allclose(a, b, tol=1e-12)


def test_hutchinson_needs_value_fn_or_hvp_fn():
    tx = oso.scale_by_adahessian()
    params = {"w": jnp.ones(3)}
    with pytest.raises(TypeError, match="value_fn"):
        tx.update(params, tx.init(params), params)
    hvp_fn = lambda v: jax.tree.map(lambda x: 2.0 * x, v)  # noqa: E731 (H = 2 I)
    updates, state = tx.update(params, tx.init(params), params, hvp_fn=hvp_fn)
    np.testing.assert_allclose(state.curvature["w"], (1 - 0.999) * 4.0 * np.ones(3))


# ---------------------------------------------------------------------------------------------
# Sophia-G against the official algorithm.


@pytest.fixture(scope="module")
def mlp_problem():
    """A tanh MLP 4 -> 5 -> 3 on 16 examples, softmax cross-entropy."""
    k = jax.random.split(jax.random.PRNGKey(4), 4)
    x = np.asarray(jax.random.normal(k[0], (16, 4)))
    y = np.asarray(jax.random.randint(k[1], (16,), 0, 3))
    params = {
        "w1": np.asarray(0.7 * jax.random.normal(k[2], (4, 5))), "b1": np.zeros(5),
        "w2": np.asarray(0.7 * jax.random.normal(k[3], (5, 3))), "b2": np.zeros(3),
    }
    return params, x, y


def _mlp_logits(p, x):
    return np.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _mlp_mean_ce_grad(p, x, labels):
    """Hand-written backprop of the mean softmax cross-entropy of the MLP."""
    a = np.tanh(x @ p["w1"] + p["b1"])
    logits = a @ p["w2"] + p["b2"]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    delta = (probs - np.eye(3)[labels]) / len(x)
    dz = (delta @ p["w2"].T) * (1 - a * a)
    return {"w1": x.T @ dz, "b1": dz.sum(0), "w2": a.T @ delta, "b2": delta.sum(0)}


def _official_sophia_g(params, x, y, steps, lr, b1, b2, rho, wd, k, seed, bias_correction=None):
    """NumPy loop of the official SophiaG: every ``k`` steps ``h <- b2 h + (1 - b2) g_hat^2`` (``g_hat``:
    mean-loss gradient at labels sampled from the model); each step ``p <- p (1 - lr wd)``,
    ``m <- b1 m + (1 - b1) g``, ``p <- p - lr sign(m) min(|m| / (rho bs h + 1e-15), 1)``, ``bs`` = batch size.

    One deliberate change from the official training loop: the first estimate is taken at step 1
    (the paper's Algorithm 3, ``t mod k = 1``), not after step ``k``. ``bias_correction="momentum"`` uses
    ``m / (1 - b1^t)`` inside the clip (optax.contrib), ``"step"`` divides the clipped step by ``1 - b1^t``
    (the original Sophia-H code's ``lr / bias_correction1``).
    """
    p = {n: v.copy() for n, v in params.items()}
    m = {n: np.zeros_like(v) for n, v in p.items()}
    h = {n: np.zeros_like(v) for n, v in p.items()}
    key, bs = jax.random.PRNGKey(seed), len(x)
    trajectory = []
    for t in range(steps):
        g = _mlp_mean_ce_grad(p, x, y)
        if t % k == 0:
            key, subkey = jax.random.split(key)
            sampled = np.asarray(jax.random.categorical(subkey, jnp.asarray(_mlp_logits(p, x)), axis=-1))
            g_hat = _mlp_mean_ce_grad(p, x, sampled)
            h = {n: b2 * h[n] + (1 - b2) * g_hat[n] ** 2 for n in p}
        correction = 1 - b1 ** (t + 1)
        for n in p:
            p[n] = p[n] * (1 - lr * wd)
            m[n] = b1 * m[n] + (1 - b1) * g[n]
            m_used = m[n] / correction if bias_correction == "momentum" else m[n]
            ratio = np.minimum(np.abs(m_used) / (rho * bs * h[n] + 1e-15), 1)
            step_size = lr / correction if bias_correction == "step" else lr
            p[n] = p[n] - step_size * np.sign(m_used) * ratio
        trajectory.append({n: v.copy() for n, v in p.items()})
    return trajectory


@pytest.mark.parametrize("bias_correction", [None, "momentum", "step"])
def test_sophia_g_matches_official_loop(mlp_problem, bias_correction):
    params, x, y = mlp_problem
    hyper = dict(lr=0.05, b1=0.965, b2=0.99, rho=0.04, wd=0.1, k=3)
    expected = _official_sophia_g(params, x, y, 10, seed=5, bias_correction=bias_correction, **hyper)

    loss = oso.losses.softmax_cross_entropy(jnp.asarray(y))
    xj = jnp.asarray(x)

    def model_fn(p):
        return jnp.tanh(xj @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    tx = oso.sophia(hyper["lr"], estimator="gnb", b1=hyper["b1"], b2=hyper["b2"], rho=hyper["rho"],
                    weight_decay=hyper["wd"], statistics_frequency=hyper["k"], seed=5, bias_correction=bias_correction)
    step = jax.jit(lambda p, s: tx.update(jax.grad(lambda q: loss(model_fn(q)))(p), s, p,
                                          model_fn=model_fn, loss=loss))
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    clipped = 0
    for want in expected:
        updates, state = step(p, state)
        clipped += sum(int(jnp.sum(jnp.abs(u) >= hyper["lr"] * 0.999)) for u in jax.tree.leaves(updates))
        p = optax.apply_updates(p, updates)
        _tree_allclose(p, want)
    assert 0 < clipped < 10 * 43  # both branches of the clip were exercised


# ---------------------------------------------------------------------------------------------
# Sophia-H against optax.contrib.


def test_sophia_h_equals_optax_contrib_once_aligned(conv_problem):
    """Ours and ``optax.contrib.scale_by_sophia`` with mapped hyperparameters (``gamma = rho``,
    ``update_interval = statistics_frequency``, momentum bias correction on, the same probes).

    The one intended difference: on a refresh step ours uses the new estimate in that step's update
    (the paper's Algorithm 3); optax computes the update with the previous estimate and refreshes
    after it. Both are driven from our state at every step: momentum, curvature EMA and key agree
    after every step, the updates agree on non-refresh steps, and on refresh steps ours equals
    optax's update computed with the refreshed estimate.
    """
    from optax.contrib._sophia import HutchinsonState, SophiaState, scale_by_sophia

    params, value_fn = conv_problem
    b1, b2, rho, eps, k = 0.9, 0.99, 0.05, 1e-12, 3

    def same_probe_hutchinson():
        def update(updates, state, params=None, obj_fn=None, **_):
            key, subkey = jax.random.split(state.key)
            z = _rademacher_probe(subkey, params)
            hz = jax.jvp(jax.grad(obj_fn), (params,), (z,))[1]
            return jax.tree.map(jnp.multiply, z, hz), HutchinsonState(key)

        return optax.GradientTransformationExtraArgs(lambda p: HutchinsonState(jax.random.PRNGKey(0)), update)

    ours = oso.scale_by_sophia("hutchinson", b1=b1, b2=b2, rho=rho, eps=eps, statistics_frequency=k,
                               bias_correction="momentum", seed=7)
    theirs = scale_by_sophia(b1=b1, b2=b2, eps=eps, gamma=rho, clip_threshold=1.0,
                             update_interval=k, hessian_diagonal_fn=same_probe_hutchinson())

    def as_theirs(state, curvature=None):
        return SophiaState(state.count, state.momentum,
                           state.curvature if curvature is None else curvature, HutchinsonState(state.key))

    @jax.jit
    def step(p, state):
        g = jax.grad(value_fn)(p)
        u, new = ours.update(g, state, p, value_fn=value_fn)
        u_theirs, new_theirs = theirs.update(g, as_theirs(state), p, obj_fn=value_fn)
        u_theirs_fresh, _ = theirs.update(g, as_theirs(state, new.curvature), p, obj_fn=value_fn)
        return u, new, u_theirs, new_theirs, u_theirs_fresh

    state, p, negative = ours.init(params), params, 0
    for t in range(7):
        u, new, u_theirs, new_theirs, u_theirs_fresh = step(p, state)
        _tree_allclose(new.momentum, new_theirs.mu)
        _tree_allclose(new.curvature, new_theirs.nu)
        np.testing.assert_array_equal(new.key, new_theirs.hessian_fn_state.key)
        _tree_allclose(u, u_theirs_fresh if t % k == 0 else u_theirs)
        negative += sum(int(jnp.sum(c < 0)) for c in jax.tree.leaves(new.curvature))
        state, p = new, optax.apply_updates(p, jax.tree.map(lambda x: -0.05 * x, u))
    assert negative > 0  # the negative-curvature branch (max(h, 0)) was exercised


# ---------------------------------------------------------------------------------------------
# Clipping, degenerate curvature, failures.


def test_negative_curvature_never_exceeds_the_clip():
    """On a saddle, Sophia-H's steps stay within ``lr * clip`` and move down the negative directions."""
    a = jnp.array([2.0, -1.0, 0.5, -3.0])

    def value_fn(p):
        return 0.5 * jnp.sum(a * p["x"] ** 2)

    tx = oso.sophia(0.1, estimator="hutchinson", rho=0.5, weight_decay=0.0, statistics_frequency=2)
    step = jax.jit(lambda p, s: tx.update(jax.grad(value_fn)(p), s, p, value_fn=value_fn))
    p = {"x": jnp.array([0.3, 0.2, -0.1, 0.05])}
    state = tx.init(p)
    for _ in range(20):
        updates, state = step(p, state)
        assert bool(jnp.all(jnp.isfinite(updates["x"])))
        assert float(jnp.max(jnp.abs(updates["x"]))) <= 0.1 + 1e-12
        p = optax.apply_updates(p, updates)
    assert float(jnp.abs(p["x"][3])) > 1.0  # escaped along the most negative direction


@pytest.mark.parametrize("name", ["sophia-h", "adahessian"])
def test_zero_curvature_gives_a_finite_step(name):
    c = jnp.array([1.0, -2.0, 0.0])

    def value_fn(p):
        return jnp.sum(c * p["x"])  # Hessian = 0

    tx = (oso.sophia(0.1, estimator="hutchinson", weight_decay=0.0) if name == "sophia-h"
          else oso.adahessian(0.1))
    p = {"x": jnp.ones(3)}
    updates, _ = tx.update(jax.grad(value_fn)(p), tx.init(p), p, value_fn=value_fn)
    assert bool(jnp.all(jnp.isfinite(updates["x"])))
    if name == "sophia-h":  # m / eps clipped: a full step of size lr against the gradient's sign
        np.testing.assert_allclose(updates["x"], -0.1 * jnp.sign(c))


def test_nonfinite_estimate_is_skipped_and_counted():
    def value_fn(p):
        return jnp.sum(jnp.sqrt(p["x"]))  # Hessian -inf at 0

    tx = oso.scale_by_diagonal_curvature("hutchinson", b1=0.0)
    p = {"x": jnp.array([0.0, 1.0])}
    updates, state = tx.update({"x": jnp.ones(2)}, tx.init(p), p, value_fn=value_fn)
    assert int(state.nonfinite) == 1 and int(state.estimates) == 0
    np.testing.assert_array_equal(state.curvature["x"], 0.0)
    assert bool(jnp.all(jnp.isfinite(updates["x"])))


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: oso.scale_by_sophia(rho=0.0), "rho"),
        (lambda: oso.scale_by_sophia(estimator="exact"), "estimator"),
        (lambda: oso.scale_by_adahessian(hessian_power=2.0), "hessian_power"),
        (lambda: oso.scale_by_diagonal_curvature(averaging="median"), "averaging"),
        (lambda: oso.scale_by_diagonal_curvature(statistics_frequency=0), "statistics_frequency"),
        (lambda: oso.adam(1e-3, b1=1.0), "b1"),
    ],
)
def test_bad_hyperparameters_name_the_argument(make, argument):
    with pytest.raises(ValueError, match=f"{argument} must be .*got"):
        make()


# ---------------------------------------------------------------------------------------------
# Non-finite numbers: the reproducers of the robustness review, each a run that used to go wrong.


def test_sophia_h_keeps_walking_to_the_optimum_after_an_inf_gradient():
    """One +Inf gradient used to leave the momentum at Inf for good (a constant +-lr step away from the optimum)."""
    value_fn = lambda p: jnp.sum((p["w"] - 2.0) ** 2)  # noqa: E731
    tx = oso.sophia(1e-2, estimator="hutchinson", weight_decay=0.0)
    params, state = {"w": jnp.zeros(3)}, None
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=value_fn))
    for t in range(60):
        g = {"w": jnp.full(3, jnp.inf)} if t == 5 else jax.grad(value_fn)(params)
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
    assert int(state[0].nonfinite) == 1
    np.testing.assert_allclose(params["w"], 0.01 * 59, rtol=1e-5)  # 59 clipped steps of lr toward 2


@pytest.mark.parametrize("make", [lambda: oso.adam(1e-2), lambda: oso.adagrad(0.1), lambda: oso.adahessian(0.1)],
                         ids=["adam", "adagrad", "adahessian"])
def test_an_overflowing_loss_does_not_blow_up_the_parameters(make):
    """The loss scaled by 1e20 in float32: gradients finite, squares (and AdaHessian's D^2) not. The parameters
    used to reach 1e25 and then NaN; now those steps are rejected and counted, and a normal loss resumes."""
    value_fn = lambda p: jnp.sum((p["w"] - 2.0) ** 2)  # noqa: E731
    tx = make()
    params = {"w": jnp.zeros(3, jnp.float32)}
    state = tx.init(params)

    def step(params, state, scale):
        scaled = lambda p: scale * value_fn(p)  # noqa: E731
        updates, state = tx.update(jax.grad(scaled)(params), state, params, value_fn=scaled)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step)
    for _ in range(5):
        params, state = step(params, state, jnp.float32(1e20))
    assert int(state[0].nonfinite) == 5 and np.all(params["w"] == 0)
    for _ in range(5):
        params, state = step(params, state, jnp.float32(1.0))
    assert np.all(np.isfinite(params["w"])) and np.all(params["w"] > 0)


def test_a_corrupt_stored_entry_restarts_by_itself_and_the_step_goes_on():
    """A NaN in one momentum entry and an inf in one curvature entry (a corrupt state): those entries restart (from
    0 and from the initial curvature), the others keep their values, and the step is not rejected."""
    tx = oso.scale_by_diagonal_curvature("squared_gradient", b1=0.5, b2=0.5, initial_curvature=0.25)
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    state = state._replace(momentum={"w": jnp.array([jnp.nan, 1.0, 2.0])},
                           curvature={"w": jnp.array([1.0, jnp.inf, 1.0])})
    g = {"w": jnp.array([1.0, 1.0, 1.0])}
    updates, new = jax.jit(tx.update)(g, state, params)
    assert int(new.nonfinite) == 0 and int(new.count) == 1
    np.testing.assert_allclose(new.momentum["w"], [0.5 * 0.0 + 0.5, 0.5 * 1.0 + 0.5, 0.5 * 2.0 + 0.5])
    np.testing.assert_allclose(new.curvature["w"], [0.5 * 1.0 + 0.5, 0.5 * 0.25 + 0.5, 0.5 * 1.0 + 0.5])
    assert bool(jnp.all(jnp.isfinite(updates["w"])))


def test_a_zero_denominator_gives_a_zero_update_entry_not_a_nan():
    """eps = eps_root = 0 and a coordinate whose gradients were all zero: 0 / 0 there; that entry moves by 0, the
    others as Adam, and the step counts as a normal one."""
    tx = oso.scale_by_diagonal_curvature("squared_gradient", eps=0.0)
    params = {"w": jnp.zeros(2)}
    updates, state = tx.update({"w": jnp.array([0.0, 3.0])}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [0.0, 1.0], rtol=1e-6)
    assert int(state.nonfinite) == 0 and int(state.count) == 1
