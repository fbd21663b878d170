"""K-BFGS and K-BFGS(L) against a NumPy loop of the paper's algorithm on a two-layer MLP (float64).

The reference is written from Goldfarb, Ren & Bahamou (2020) and the authors' code, independently of the
library: a hand-written forward and backward pass of a tanh MLP with a softmax cross-entropy (pre-activations
and their gradients), the moving average of ``A``, ``H_a = (A + sqrt(lambda) I)^{-1}`` on the first step,
``D = H_a m H_g``, the second pass at ``theta - lr D`` on the same batch, the averaged pairs, Powell's damping on
``H_g`` then Levenberg-Marquardt damping, BFGS on ``H_g`` (or the L-BFGS two-loop recursion with ``H_0 = I``),
Hessian-action BFGS on ``H_a``, and the diagonal fallback ``m / (d + lambda)`` of the uncaptured ``scale``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_second_order as oso
from optax_second_order.curvature import kronecker

jax.config.update("jax_enable_x64", True)

N, D0, D1, D2 = 8, 4, 4, 4  # both layers' (d_in + 1, d_out) is (5, 4): one group of two units in the bank
LR, LAM, RHO, BETA, DELTA = 0.3, 0.3, 0.9, 0.9, 0.9


def init_params():
    rng = np.random.default_rng(0)
    return {
        "l1": {"b": jnp.asarray(0.1 * rng.normal(size=D1)), "w": jnp.asarray(rng.normal(size=(D0, D1)))},
        "l2": {"b": jnp.zeros(D2), "w": jnp.asarray(0.7 * rng.normal(size=(D1, D2)))},
        "scale": jnp.asarray(1.2),
    }


def batch(step):
    rng = np.random.default_rng(100 + step)
    return rng.normal(size=(N, D0)), rng.integers(0, D2, N)


def model(params, x):
    h = jnp.tanh(kronecker.dense(x, params["l1"]["w"], params["l1"]["b"]))
    return params["scale"] * kronecker.dense(h, params["l2"]["w"], params["l2"]["b"])


# --- the NumPy reference -----------------------------------------------------------------------------------


def kernels(params):
    """The layers' ``W = [w; b]`` and the fallback ``scale``, as NumPy."""
    p = jax.tree.map(np.asarray, params)
    return [np.vstack([p["l1"]["w"], p["l1"]["b"]]), np.vstack([p["l2"]["w"], p["l2"]["b"]])], float(p["scale"])


def forward_backward(ws, scale, x, labels):
    """Gradients of the mean cross-entropy and each layer's ``(a^T a / N, mean a, mean s, sum dL/ds)``."""
    ones = np.ones((len(x), 1))
    a1 = np.hstack([x, ones])
    s1 = a1 @ ws[0]
    a2 = np.hstack([np.tanh(s1), ones])
    s2 = a2 @ ws[1]
    logits = scale * s2
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    dlogits = (probs - np.eye(D2)[labels]) / len(x)
    ds2 = scale * dlogits
    ds1 = (ds2 @ ws[1][:-1].T) * (1 - np.tanh(s1) ** 2)
    grads = [a1.T @ ds1, a2.T @ ds2]
    stats = [(a.T @ a / len(x), a.mean(0), s.mean(0), ds.sum(0)) for a, s, ds in ((a1, s1, ds1), (a2, s2, ds2))]
    return grads, float(np.sum(dlogits * s2)), stats


def bfgs_inverse(h, s, y):
    rho = 1.0 / (s @ y)
    left = np.eye(len(s)) - rho * np.outer(s, y)
    return left @ h @ left.T + rho * np.outer(s, s)


def double_damping(s, y, hy, mu1, mu2):
    """Powell's damping on H (``s^T y >= mu1 y^T H y``), then LM (``s^T y >= mu2 s^T s``), as the authors' code."""
    sy, yhy = s @ y, y @ hy
    if sy < mu1 * yhy:
        theta = (1 - mu1) * yhy / (yhy - sy)
        s = theta * s + (1 - theta) * hy
    ss, sy = s @ s, s @ y
    if sy < mu2 * ss:
        theta = (1 - mu2) * ss / (ss - sy)
        y = theta * y + (1 - theta) * s
    return s, y


def two_loop(pairs, v):
    """N&W Algorithm 7.4 with ``H_0 = I``."""
    q, alphas = v.copy(), []
    for s, y in reversed(pairs):
        alphas.append((s @ q) / (s @ y))
        q = q - alphas[-1] * y
    for (s, y), alpha in zip(pairs, reversed(alphas)):
        q = q + (alpha - (y @ q) / (s @ y)) * s
    return q


class KBFGSReference:
    def __init__(self, params, limited):
        ws, scale = kernels(params)
        self.limited = limited
        self.m = [np.zeros_like(w) for w in ws] + [0.0]
        self.d = 0.0
        self.A = [np.eye(w.shape[0]) for w in ws]
        self.Ha = [np.eye(w.shape[0]) for w in ws]
        self.Hg = [np.eye(w.shape[1]) for w in ws]
        self.memory = [[] for _ in ws]
        self.pairs = [(np.zeros(w.shape[1]), np.zeros(w.shape[1])) for w in ws]
        self.k = 0

    def hg_times(self, layer, v):
        return two_loop(self.memory[layer], v) if self.limited else self.Hg[layer] @ v

    def step(self, params, x, labels):
        """Returns the update ``-lr D`` per layer and for scale."""
        ws, scale = kernels(params)
        grads, gscale, stats = forward_backward(ws, scale, x, labels)
        self.m = [RHO * m + (1 - RHO) * g for m, g in zip(self.m, grads + [gscale])]
        self.d = gscale**2 if self.k == 0 else BETA * self.d + (1 - BETA) * gscale**2
        eps = np.sqrt(LAM)
        for l in range(2):
            aa = stats[l][0]
            self.A[l] = aa if self.k == 0 else BETA * self.A[l] + (1 - BETA) * aa
            if self.k == 0:
                self.Ha[l] = np.linalg.inv(self.A[l] + eps * np.eye(len(aa)))
        directions = []
        for l in range(2):
            left = self.Ha[l] @ self.m[l]
            directions.append(np.stack([self.hg_times(l, row) for row in left]))
        d_scale = self.m[2] / (self.d + LAM)
        new_ws = [w - LR * d for w, d in zip(ws, directions)]
        _, _, stats_next = forward_backward(new_ws, scale - LR * d_scale, x, labels)
        for l in range(2):
            s_avg = DELTA * self.pairs[l][0] + (1 - DELTA) * (stats_next[l][2] - stats[l][2])
            y_avg = DELTA * self.pairs[l][1] + (1 - DELTA) * (stats_next[l][3] - stats[l][3])
            self.pairs[l] = (s_avg, y_avg)
            s, y = double_damping(s_avg, y_avg, self.hg_times(l, y_avg), 0.2, eps)
            if self.limited:
                self.memory[l].append((s, y))
            else:
                self.Hg[l] = bfgs_inverse(self.Hg[l], s, y)
            s_a = self.Ha[l] @ stats[l][1]
            self.Ha[l] = bfgs_inverse(self.Ha[l], s_a, (self.A[l] + eps * np.eye(len(s_a))) @ s_a)
        self.k += 1
        return [-LR * d for d in directions], -LR * d_scale


# --- the tests ---------------------------------------------------------------------------------------------


def run(limited, steps=3):
    params = init_params()
    x0, _ = batch(0)
    layers = oso.kronecker.find_layers(lambda p: model(p, x0), params)
    assert [l.name for l in layers.layers] == ["['l1']['w']", "['l2']['w']"] and layers.fallback == ("['scale']",)
    tx = oso.kbfgs(LR, layers, damping=LAM, momentum=RHO, ema_decay=BETA, pair_decay=DELTA, limited_memory=limited)
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, labels):
        loss = oso.losses.softmax_cross_entropy(labels)
        model_fn = lambda p: model(p, x)  # noqa: E731
        grads = jax.grad(lambda p: loss(model_fn(p)))(params)
        return tx.update(grads, state, params, model_fn=model_fn, loss=loss)

    reference = KBFGSReference(params, limited)
    for k in range(steps):
        x, labels = batch(k)
        updates, state = step(params, state, x, labels)
        want, want_scale = reference.step(params, x, labels)
        got, _ = kernels(updates)
        for l in range(2):
            np.testing.assert_allclose(got[l], want[l], rtol=1e-9, atol=1e-12, err_msg=f"layer {l}, step {k}")
        np.testing.assert_allclose(float(updates["scale"]), want_scale, rtol=1e-9, err_msg=f"scale, step {k}")
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    inner = state[1]
    for l, got in enumerate(oso.kbfgs_layer_states(layers, state)):
        np.testing.assert_allclose(got.factor, reference.A[l], rtol=1e-10)
        np.testing.assert_allclose(got.inverse_factor, reference.Ha[l], rtol=1e-8)
        np.testing.assert_allclose(got.pair[0], reference.pairs[l][0], rtol=1e-9, atol=1e-14)
        if not limited:
            np.testing.assert_allclose(got.curvature, reference.Hg[l], rtol=1e-8)
    assert int(inner.skipped) == 0 and int(inner.nonfinite) == 0 and int(inner.num_statistics) == steps
    return layers, tx, state, params


@pytest.mark.parametrize("limited", [False, True], ids=["kbfgs", "kbfgs_l"])
def test_steps_equal_numpy_loop_of_the_paper(limited):
    run(limited)


def test_nonfinite_gradient_is_not_folded_in_and_errors():
    params = init_params()
    x, labels = batch(0)
    layers = oso.kronecker.find_layers(lambda p: model(p, x), params)
    tx = oso.scale_by_kbfgs(layers, learning_rate=0.1)
    loss = oso.losses.softmax_cross_entropy(labels)
    extra = dict(model_fn=lambda p: model(p, x), loss=loss)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, **extra))
    grads = jax.grad(lambda p: loss(model(p, x)))(params)
    _, state = update(grads, tx.init(params), params)
    bad = jax.tree.map(lambda g: g.at[...].set(jnp.nan) if g.ndim == 0 else g, grads)
    updates, after = update(bad, state, params)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    assert int(after.nonfinite) == 1
    for new, old in zip(jax.tree.leaves(after._replace(nonfinite=0)), jax.tree.leaves(state._replace(nonfinite=0))):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    with pytest.raises(TypeError, match="scale_by_kbfgs.*model_fn"):
        tx.update(grads, state, params, loss=loss)
    with pytest.raises(ValueError, match="learning_rate"):
        oso.scale_by_kbfgs(layers)
    with pytest.raises(ValueError, match="pair_decay"):
        oso.kbfgs(0.1, layers, pair_decay=1.0)
