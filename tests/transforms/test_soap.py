"""SOAP against a NumPy loop implementation of Vyas et al. (2024), Algorithm 3, as the official code runs it.

The loop keeps Adam's first moment in the eigenbasis and moves it when the basis changes (project back
with the old basis, forward with the new one), the way the official code does; the library keeps it in
the original space. Both are the same algorithm, reached by different bookkeeping. The loop applies the library's
tie-break of degenerate eigenspaces (``tie_broken``; docs/optimizers/soap.md, "Rounding and degenerate eigenspaces").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_second_order as oso
from optax_second_order.curvature import quantize as quantize_module
from optax_second_order.transforms import soap as soap_module


@pytest.fixture(scope="module", autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


SHAPES = {"m": (6, 5), "t": (3, 4, 5), "v": (5,)}


def tie_broken(factor):
    """``L + sqrt(d u) max_i L_ii diag(1, (d - 1) / d, ..., 1 / d)``: the library's tie-break, which makes the basis of
    a degenerate eigenspace of ``L`` (its null space, while it has seen few gradients) a continuous function of
    ``L`` instead of ``eigh``'s rounding (soap._tie_broken; docs/optimizers/soap.md). Not in the official code; the
    loop applies it where the library does (every eigenbasis and refresh), so the comparison stays at 1e-8."""
    d = factor.shape[0]
    scale = np.sqrt(d * np.finfo(factor.dtype).eps) * np.max(np.diag(factor))
    return factor + scale * np.diag(np.arange(d, 0, -1) / d)


def project(x, bases, back=False):
    """``x`` rotated into (or, with ``back``, out of) the eigenbasis, mode by mode (None: mode not rotated)."""
    for i, q in enumerate(bases):
        if q is not None:
            x = np.moveaxis(np.tensordot(x, q.T if back else q, axes=([i], [0])), -1, i)
    return x


class NumpySoap:
    """One leaf of SOAP, following the paper's Algorithm 3 and the official code step by step."""

    def __init__(self, shape, b1=0.95, b2=0.95, eps=1e-8, frequency=3, max_dim=10000, normalize=False, bias=True,
                 slots=None, shift=None, one_sided=None, factorized=False):
        self.b1, self.b2, self.eps, self.f, self.normalize, self.bias = b1, b2, eps, frequency, normalize, bias
        self.slots = slots  # staggered: mode -> its refresh slot r, refreshed when (-step) mod f == r
        self.shift = shift  # the refresh orthonormalizes (L / ||L||_F + shift I) Q instead of L Q
        modes = range(len(shape)) if len(shape) > 1 else []
        self.modes = [i for i in modes if shape[i] <= max_dim]
        if one_sided is not None and len(shape) == 2 and len(self.modes) == 2 and max(shape) > one_sided:
            self.modes = [0] if shape[0] <= shape[1] else [1]  # one-sided (the paper's sec. 7): the smaller side only
        # factorized (the paper's sec. 7, Adafactor in the eigenbasis): row and column accumulators instead of v
        self.factorized = factorized and len(shape) == 2 and shape[0] + shape[1] < shape[0] * shape[1]
        self.rows, self.cols = (np.zeros(shape[0]), np.zeros(shape[1])) if self.factorized else (None, None)
        self.GG = {i: np.zeros((shape[i], shape[i])) for i in self.modes}
        self.Q = None
        self.exp_avg = np.zeros(shape)  # in the eigenbasis
        self.exp_avg_sq = np.zeros(shape)
        self.step_count = 0
        self.ndim = len(shape)

    def bases(self):
        return [self.Q.get(i) for i in range(self.ndim)]

    def update_preconditioner(self, g):
        if self.Q is not None:
            self.exp_avg = project(self.exp_avg, self.bases(), back=True)
        for i in self.modes:
            others = [j for j in range(self.ndim) if j != i]
            self.GG[i] = self.b2 * self.GG[i] + (1 - self.b2) * np.tensordot(g, g, axes=(others, others))
        factors = {i: tie_broken(self.GG[i]) for i in self.modes}
        if self.Q is None:
            self.Q = {i: np.linalg.eigh(factors[i])[1][:, ::-1] for i in self.modes}
        for i in self.modes:
            due = self.step_count % self.f == 0 if self.slots is None else (-self.step_count) % self.f == self.slots[i]
            if self.step_count > 0 and due:
                o = self.Q[i]
                est = np.diag(o.T @ factors[i] @ o)
                order = np.argsort(-est, kind="stable")
                self.exp_avg_sq = np.take(self.exp_avg_sq, order, axis=i)
                if self.factorized and i == 0:
                    self.rows = self.rows[order]
                elif self.factorized:
                    self.cols = self.cols[order]
                product = factors[i] @ o[:, order]
                if self.shift is not None:
                    product = product / np.linalg.norm(factors[i]) + self.shift * o[:, order]
                self.Q[i] = np.linalg.qr(product)[0]
        if self.step_count > 0:
            self.exp_avg = project(self.exp_avg, self.bases())

    def step(self, g):
        if self.Q is None:
            self.update_preconditioner(g)
            return np.zeros_like(g)
        gp = project(g, self.bases())
        self.step_count += 1
        self.exp_avg = self.b1 * self.exp_avg + (1 - self.b1) * gp
        self.exp_avg_sq = self.b2 * self.exp_avg_sq + (1 - self.b2) * gp**2
        v = self.exp_avg_sq
        if self.factorized:
            self.rows = self.b2 * self.rows + (1 - self.b2) * np.sum(gp**2, axis=1)
            self.cols = self.b2 * self.cols + (1 - self.b2) * np.sum(gp**2, axis=0)
            v = np.outer(self.rows, self.cols) / np.sum(self.rows)
        denom = np.sqrt(v) + self.eps
        size = 1.0
        if self.bias:
            size = np.sqrt(1 - self.b2**self.step_count) / (1 - self.b1**self.step_count)
        direction = project(self.exp_avg / denom, self.bases(), back=True)
        if self.normalize:
            direction = direction / (1e-30 + np.sqrt(np.mean(direction**2)))
        self.update_preconditioner(g)
        return size * direction


@pytest.mark.parametrize(
    "kwargs", [{}, {"max_precond_dim": 5, "normalize_grads": True, "correct_bias": False}], ids=["default", "options"]
)
def test_matches_numpy_loop(kwargs):
    rng = np.random.default_rng(0)
    grads = [{k: rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(8)]
    lr, wd = 0.01, 0.1
    tx = oso.soap(lr, weight_decay=wd, precondition_frequency=3, **kwargs)
    params = {k: jnp.asarray(rng.standard_normal(s)) for k, s in SHAPES.items()}
    state = tx.init(params)
    update = jax.jit(tx.update)
    loops = {
        k: NumpySoap(s, frequency=3, max_dim=kwargs.get("max_precond_dim", 10000),
                     normalize=kwargs.get("normalize_grads", False), bias=kwargs.get("correct_bias", True))
        for k, s in SHAPES.items()
    }
    for step, g in enumerate(grads):
        u, state = update(jax.tree.map(jnp.asarray, g), state, params)
        for k in g:
            expected = -lr * (loops[k].step(g[k]) + wd * np.asarray(params[k]))
            np.testing.assert_allclose(u[k], expected, rtol=1e-8, atol=1e-12, err_msg=f"step {step}, leaf {k}")
    assert int(state[0].basis_failures) == 0


# 2-D leaves whose factors have no degenerate eigenspace of dimension 2 or more after one gradient (a null space of
# |rows - cols|), where the basis is only resolved to sqrt(d u) = 4e-8 (soap._tie_broken) and 1e-10 would not hold
MEMORY_SHAPES = {"m": (6, 5), "w": (6, 7), "t": (3, 4, 5), "v": (5,), "c": (2, 2)}


@pytest.mark.parametrize(
    "kwargs",
    [{"one_sided": True}, {"factorized_second_moment": True}, {"one_sided": 6, "factorized_second_moment": True}],
    ids=["one_sided", "factorized", "both"],
)
def test_one_sided_and_factorized_match_numpy_loop(kwargs):
    """The paper's memory variants (Vyas et al. 2024, sec. 7) against the loop, float64, 1e-10: one-sided keeps the
    factor and basis of a 2-D leaf's smaller side only (``one_sided=6``: only where the larger side exceeds 6, so
    ``m`` (6 x 5) stays two-sided and ``w`` (6 x 7) is rotated on its rows); factorized keeps Adafactor's row and
    column accumulators in the eigenbasis and permutes the matching one when a refresh re-sorts a basis (the loop
    refreshes at steps 3 and 6). Entries are compared to 1e-10 of the leaf's largest (a rotation's rounding). The 3-D leaf keeps both; ``c`` (2 x 2) is not factored (4 numbers either way)."""
    rng = np.random.default_rng(7)
    grads = [{k: rng.standard_normal(s) for k, s in MEMORY_SHAPES.items()} for _ in range(8)]
    lr, wd = 0.01, 0.1
    tx = oso.soap(lr, weight_decay=wd, precondition_frequency=3, **kwargs)
    params = {k: jnp.asarray(rng.standard_normal(s)) for k, s in MEMORY_SHAPES.items()}
    state, update = tx.init(params), jax.jit(tx.update)
    one_sided = kwargs.get("one_sided")
    loops = {k: NumpySoap(s, frequency=3, one_sided=0 if one_sided is True else one_sided,
                          factorized=kwargs.get("factorized_second_moment", False)) for k, s in MEMORY_SHAPES.items()}
    for step, g in enumerate(grads):
        u, state = update(jax.tree.map(jnp.asarray, g), state, params)
        for k in g:
            expected = -lr * (loops[k].step(g[k]) + wd * np.asarray(params[k]))
            scale = 1e-10 * np.max(np.abs(expected))  # rounding of a rotation: relative to the leaf's largest entry
            np.testing.assert_allclose(u[k], expected, rtol=1e-10, atol=scale, err_msg=f"step {step}, leaf {k}")
    assert int(state[0].basis_failures) == 0 and int(state[0].nonfinite) == 0


def test_one_sided_and_factorized_state_bytes():
    """State bytes from ``jax.eval_shape(tx.init, params)`` for one float32 ``m x n`` matrix (``m < n``): two-sided
    SOAP keeps ``2 (m^2 + n^2) + 2 m n`` numbers (factors, bases, two moments), one-sided ``2 m^2 + 2 m n``,
    factorized ``2 (m^2 + n^2) + m n + m + n``, both ``2 m^2 + m n + m + n``, plus the int32 counters."""
    m, n = 16, 48
    params = {"w": jnp.zeros((m, n), jnp.float32)}

    def state_bytes(**kwargs):
        return quantize_module.nbytes(jax.eval_shape(oso.scale_by_soap(**kwargs).init, params)) - 3 * 4

    assert state_bytes() == 4 * (2 * (m * m + n * n) + 2 * m * n)
    assert state_bytes(one_sided=True) == 4 * (2 * m * m + 2 * m * n)
    assert state_bytes(factorized_second_moment=True) == 4 * (2 * (m * m + n * n) + m * n + m + n)
    assert state_bytes(one_sided=True, factorized_second_moment=True) == 4 * (2 * m * m + m * n + m + n)
    assert state_bytes(one_sided=n) == state_bytes()  # the larger side does not exceed the threshold


def test_one_sided_must_be_a_bool_or_a_size():
    with pytest.raises(ValueError, match="one_sided"):
        oso.soap(1e-2, one_sided=-1)
    with pytest.raises(ValueError, match="one_sided"):
        oso.soap(1e-2, one_sided=2.5)


def _lpt(costs, slots):
    """Longest processing time first: units by decreasing cost (ties by position) to the least loaded slot."""
    loads, out = [0.0] * slots, [0] * len(costs)
    for unit in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        out[unit] = min(range(slots), key=lambda r: (loads[r], r))
        loads[out[unit]] += costs[unit]
    return out


@pytest.mark.parametrize(
    "kwargs", [{"basis_method": "cholesky_qr"}, {"stagger": True}, {"stagger": 2, "basis_method": "cholesky_qr"}],
    ids=["cholesky_qr", "stagger", "both"],
)
def test_refresh_options_match_numpy_loop(kwargs):
    """basis_method="cholesky_qr" is the official refresh with the 1e-5 relative shift (QR up to column signs,
    which the second moments do not see); stagger refreshes each (leaf, mode) factor on its slot's steps, the
    slots a partition of the factors balanced by d^3 (longest processing time first)."""
    rng = np.random.default_rng(4)
    grads = [{k: rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(10)]
    lr, frequency = 0.01, 3
    tx = oso.soap(lr, weight_decay=0.0, precondition_frequency=frequency, **kwargs)
    params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
    state, update = tx.init(params), jax.jit(tx.update)
    stagger = kwargs.get("stagger")
    slots = _lpt([6**3, 5**3, 3**3, 4**3, 5**3], frequency if stagger is True else stagger) if stagger else None
    per_leaf = {"m": slots[:2], "t": slots[2:]} if slots else {}
    shift = 1e-5 if kwargs.get("basis_method") == "cholesky_qr" else None
    loops = {k: NumpySoap(s, frequency=frequency, slots=per_leaf.get(k), shift=shift) for k, s in SHAPES.items()}
    for step, g in enumerate(grads):
        u, state = update(jax.tree.map(jnp.asarray, g), state, params)
        for k in g:
            np.testing.assert_allclose(u[k], -lr * loops[k].step(g[k]), rtol=1e-8, atol=1e-12, err_msg=f"{step} {k}")
    assert int(state[0].basis_failures) == 0


def test_blocks_are_independent_soaps_of_their_blocks():
    """block_size=3 on a 6 x 3 matrix (2 blocks) and a 3 x 6 x 6 tensor (4 blocks of 3 x 3 x 3): each block runs the
    NumPy loop of its own, as a leaf of that shape would (no padding here)."""
    rng = np.random.default_rng(5)
    shapes = {"m": (6, 3), "t": (3, 6, 6), "v": (5,)}
    grads = [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(8)]
    tx = oso.scale_by_soap(precondition_frequency=3, block_size=3)
    params = {k: jnp.zeros(s) for k, s in shapes.items()}
    state, update = tx.init(params), jax.jit(tx.update)
    cuts = {"m": [(slice(0, 3), slice(None)), (slice(3, 6), slice(None))],
            "t": [(slice(None), slice(a, a + 3), slice(b, b + 3)) for a in (0, 3) for b in (0, 3)],
            "v": [(slice(None),)]}
    loops = {k: [NumpySoap(np.zeros(shapes[k])[c].shape, frequency=3) for c in cuts[k]] for k in shapes}
    for step, g in enumerate(grads):
        u, state = update(jax.tree.map(jnp.asarray, g), state, params)
        for k in g:
            expected = np.zeros(shapes[k])
            for c, loop in zip(cuts[k], loops[k]):
                expected[c] = loop.step(g[k][c])
            np.testing.assert_allclose(u[k], expected, rtol=1e-8, atol=1e-12, err_msg=f"step {step}, leaf {k}")
    # the factor bank: m's two 3 x 3 blocks stacked (a stack per mode), t's four 3 x 3 x 3 blocks in a group of
    # their own, whose moments are kept per block; v (a vector) outside the bank, its moments like the leaf
    assert [f.shape for f in state.factors] == [(2, 3, 3)] * 2 + [(4, 3, 3)] * 3
    assert [m.shape for m in state.mu[0]] == [(2, 3, 3), (4, 3, 3, 3)] and state.mu[1][0].shape == (5,)


def test_padded_blocks_train():
    """A 5 x 7 matrix in blocks of 3 (zero-padded to 6 x 9): finite steps that reduce a quadratic."""
    rng = np.random.default_rng(6)
    target = jnp.asarray(rng.standard_normal((5, 7)))
    value_fn = lambda p: 0.5 * jnp.sum((p["w"] - target) ** 2)  # noqa: E731
    tx = oso.soap(0.1, weight_decay=0.0, precondition_frequency=2, block_size=3, stagger=True)
    params = {"w": jnp.zeros((5, 7))}
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(value_fn)(p), s, p))
    for _ in range(30):
        u, state = step(params, state)
        params = optax.apply_updates(params, u)
    assert float(value_fn(params)) < 0.1 * float(value_fn({"w": jnp.zeros((5, 7))}))
    assert int(state[0].basis_failures) == 0


def test_a_corrupt_factor_restarts_and_a_failed_basis_keeps_the_previous_one(monkeypatch):
    rng = np.random.default_rng(1)
    tx = oso.scale_by_soap(precondition_frequency=1)
    params = {"m": jnp.zeros((4, 3))}
    update = jax.jit(tx.update)
    state = tx.init(params)
    for _ in range(2):
        _, state = update({"m": jnp.asarray(rng.standard_normal((4, 3)))}, state, params)
    # a NaN in the stored left factor (a corrupt state): it restarts from this step's (1 - beta) G G^T
    factors = (state.factors[0].at[0, 0, 0].set(jnp.nan), state.factors[1])  # the bank's stacks: left, right
    g = rng.standard_normal((4, 3))
    u, state = update({"m": jnp.asarray(g)}, state._replace(factors=factors), params)
    assert np.all(np.isfinite(u["m"])) and int(state.nonfinite) == 0
    np.testing.assert_allclose(state.factors[0][0], (1 - 0.95) * g @ g.T, rtol=1e-12)

    # a basis that comes out non-finite from finite factors keeps the previous one
    kept = state.bases
    monkeypatch.setattr(soap_module, "_power_qr_refresh", lambda factor, basis, nu, mode: (basis * jnp.nan, nu))
    tx = oso.scale_by_soap(precondition_frequency=1)
    for step in range(1, 4):
        u, state = jax.jit(tx.update)({"m": jnp.asarray(rng.standard_normal((4, 3)))}, state, params)
        assert np.all(np.isfinite(u["m"]))
        assert int(state.basis_failures) == 2 * step  # one per basis: the left and the right one
    for q, old in zip(state.bases, kept):
        np.testing.assert_array_equal(q, old)


def test_an_overflowing_gradient_is_rejected_and_counted():
    rng = np.random.default_rng(3)
    tx = oso.scale_by_soap(precondition_frequency=1)
    params = {"m": jnp.zeros((4, 3), jnp.float32)}
    update = jax.jit(tx.update)
    state = tx.init(params)
    for _ in range(2):
        _, state = update({"m": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}, state, params)
    u, bad = update({"m": jnp.asarray(1e20 * rng.standard_normal((4, 3)), jnp.float32)}, state, params)
    assert np.all(u["m"] == 0) and int(bad.nonfinite) == 1
    jax.tree.map(np.testing.assert_array_equal, bad._replace(nonfinite=state.nonfinite), state)


def test_a_non_finite_direction_is_rejected_but_its_finite_gradient_enters_the_factors():
    """eps = 0 and a zero gradient at the first Adam step: nu = 0, so m / sqrt(nu) = 0 / 0. The step is rejected
    (zero update; count, moments and bases kept, no refresh although one is due every step), while the factors take in
    the (finite, zero) gradient: beta * L."""
    rng = np.random.default_rng(4)
    tx = oso.scale_by_soap(eps=0.0, precondition_frequency=1)
    params = {"m": jnp.zeros((4, 3))}
    update = jax.jit(tx.update)
    _, state = update({"m": jnp.asarray(rng.standard_normal((4, 3)))}, tx.init(params), params)
    u, bad = update({"m": jnp.zeros((4, 3))}, state, params)
    assert np.all(u["m"] == 0) and int(bad.nonfinite) == 1 and int(bad.count) == int(state.count)
    for name in ("mu", "nu", "bases", "basis_failures"):
        jax.tree.map(np.testing.assert_array_equal, getattr(bad, name), getattr(state, name))
    jax.tree.map(lambda new, old: np.testing.assert_allclose(new, 0.95 * old, rtol=1e-12), bad.factors, state.factors)


def test_rank_deficient_factors_stay_finite():
    rng = np.random.default_rng(2)
    tx = oso.scale_by_soap(precondition_frequency=1)
    params = {"m": jnp.zeros((6, 4))}
    state = tx.init(params)
    for _ in range(4):
        g = np.outer(rng.standard_normal(6), rng.standard_normal(4))
        u, state = jax.jit(tx.update)({"m": jnp.asarray(g)}, state, params)
        assert np.all(np.isfinite(u["m"]))
    assert int(state.basis_failures) == 0


@pytest.mark.parametrize(
    "kwargs,name",
    [({"b1": 1.0}, "b1"), ({"shampoo_beta": -0.5}, "shampoo_beta"), ({"max_precond_dim": 0}, "max_precond_dim"),
     ({"basis_method": "householder"}, "basis_method"), ({"stagger": 0}, "stagger"),
     ({"stagger": 4, "precondition_frequency": 3}, "stagger"), ({"block_size": 0}, "block_size")],
)
def test_bad_hyperparameters_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        oso.scale_by_soap(**kwargs)


def _directions(b2, dtype, steps=5):
    """Five directions of ``scale_by_soap(b2=b2)`` on an ``8 x 3`` leaf whose gradients' rows sum to zero (as a softmax
    layer's): the left factor has a null space of dimension 6, then 4, ... (rank 2 per gradient), the right one the
    exact null vector ``(1, 1, 1) / sqrt(3)``, whose rotated gradient is rounding."""
    rng = np.random.default_rng(7)
    tx = oso.scale_by_soap(b2=b2, precondition_frequency=2)
    params = {"w": jnp.zeros((8, 3), dtype)}
    state, update, out = tx.init(params), jax.jit(tx.update), []
    for _ in range(steps):
        g = rng.standard_normal((8, 3))
        u, state = update({"w": jnp.asarray((g - g.mean(axis=1, keepdims=True)).astype(dtype))}, state, params)
        out.append(np.asarray(u["w"], np.float64))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_one_ulp_change_of_b2_moves_the_step_by_rounding(dtype):
    """Issue 23: the eigenbasis of a degenerate eigenspace was eigh's rounding, and Adam's per-coordinate normalization
    is not invariant under rotations within it, so a 1-ulp change of b2 (shampoo_beta follows it) changed the step by
    0.99 of its size in float64, 1.4 in float32. With the tie-break (soap._tie_broken) the basis within such a space
    is resolved to about sqrt(d u) (d = 8); the bound is ten times that, relative to the step's largest entry."""
    b2 = dtype(0.95)
    before, after = _directions(float(b2), dtype), _directions(float(np.nextafter(b2, dtype(1))), dtype)
    size = max(np.max(np.abs(x)) for x in before)
    bound = 10 * np.sqrt(8 * np.finfo(dtype).eps) * size
    for step, (x, y) in enumerate(zip(before, after)):
        assert np.max(np.abs(x - y)) <= bound, (step, np.max(np.abs(x - y)), bound)
