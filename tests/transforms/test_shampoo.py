"""Shampoo against a NumPy loop implementation of Gupta et al. (2018) with Anil et al. (2020)'s blocking and grafting.

The loop below is written from the papers, not from the library: statistics from explicit unfoldings
``G_(i) = moveaxis(G, i, 0).reshape(d_i, -1)``, roots from ``numpy.linalg.eigh`` (and, for the p = 6 check,
``scipy.linalg.fractional_matrix_power`` with the dense Kronecker product), one Python loop per block.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import optax_second_order as oso
from optax_second_order.transforms import shampoo as shampoo_module
from optax_second_order.curvature import blocking


@pytest.fixture(scope="module", autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


SHAPES = {"m": (5, 4), "t": (2, 3, 4), "v": (4,)}  # uneven blocks of 3
EVEN_SHAPES = {"m": (6, 3), "t": (3, 3, 6), "v": (4,)}  # blocks of 3 only: fewer root groups to compile
EPS, RELATIVE_EPS, GRAFT_EPS, GRAFT_BETA2 = 1e-3, 1e-2, 1e-6, 0.9


def gradient_sequence(num_steps: int, seed: int = 0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(num_steps)]


# ----------------------------------------------------------------------------- the loop reference


def unfold(x, i):
    return np.moveaxis(x, i, 0).reshape(x.shape[i], -1)


def fold(m, i, shape):
    moved = [shape[i]] + [d for j, d in enumerate(shape) if j != i]
    return np.moveaxis(m.reshape(moved), 0, i)


def numpy_root(h, p):
    w, v = np.linalg.eigh(h)
    w = np.maximum(w, 0.0)
    delta = EPS + RELATIVE_EPS * w.max()  # module globals: a test may patch them
    return (v * (w + delta) ** (-1.0 / p)) @ v.T


def block_index(shape, block_size):
    """Blocks of a tensor as tuples of slices, row-major, every dimension cut every block_size."""
    blocks = [()]
    for d in shape:
        blocks = [b + (slice(s, min(s + block_size, d)),) for b in blocks for s in range(0, d, block_size)]
    return blocks


class NumpyShampoo:
    """One leaf of Shampoo (Gupta et al. 2018, Alg. 2) with blocks, grafting and the diagonal fallback."""

    def __init__(self, shape, block_size, grafting, beta2=1.0, exponent=None, pf=2, start=2, stat_every=1):
        self.shape, self.grafting, self.beta2 = shape, grafting, beta2
        self.pf, self.start, self.stat_every = pf, start, stat_every
        self.diagonal_only = len(shape) <= 1
        self.blocks = [] if self.diagonal_only else block_index(shape, block_size)
        k = len(shape)
        self.p = exponent or 2 * k
        self.H = {(b, i): np.zeros((self.blocks[b][i].stop - self.blocks[b][i].start,) * 2)
                  for b in range(len(self.blocks)) for i in range(k)}
        self.R = {key: np.eye(h.shape[0]) for key, h in self.H.items()}
        self.v = np.zeros(shape)
        self.t = 0

    def graft_direction(self, g):
        rule = self.grafting
        if rule in ("sgd", "none") and self.diagonal_only:
            rule = "diagonal"
        if rule in ("adagrad", "diagonal") and (rule == "adagrad" or self.beta2 == 1.0):
            self.v = self.v + g * g
        elif rule == "diagonal":
            self.v = self.beta2 * self.v + (1 - self.beta2) * g * g
        elif rule in ("rmsprop", "adam"):
            self.v = GRAFT_BETA2 * self.v + (1 - GRAFT_BETA2) * g * g
        if rule == "adam":
            return g / (np.sqrt(self.v / (1 - GRAFT_BETA2 ** (self.t + 1))) + GRAFT_EPS)
        if rule in ("adagrad", "rmsprop", "diagonal"):
            return g / (np.sqrt(self.v) + GRAFT_EPS)
        return g if rule == "sgd" else None

    def step(self, g):
        t = self.t
        if not self.diagonal_only and t % self.stat_every == 0:
            for (b, i), h in self.H.items():
                gi = unfold(g[self.blocks[b]], i)
                self.H[b, i] = h + gi @ gi.T if self.beta2 == 1.0 else self.beta2 * h + (1 - self.beta2) * gi @ gi.T
        if not self.diagonal_only and t >= self.start and (t - self.start) % self.pf == 0:
            self.R = {key: numpy_root(h, self.p) for key, h in self.H.items()}
        d = self.graft_direction(g)
        self.t += 1
        if self.diagonal_only:
            return d
        if t < self.start:
            return g if d is None else d
        out = np.zeros(self.shape)
        for b, index in enumerate(self.blocks):
            x = g[index]
            for i in range(len(self.shape)):
                x = fold(self.R[b, i] @ unfold(x, i), i, x.shape)
            if d is not None:
                x = x * np.linalg.norm(d[index]) / (np.linalg.norm(x) + 1e-16)
            out[index] = x
        return out


def run_library(tx, grads_seq):
    params = {k: jnp.zeros(v.shape) for k, v in grads_seq[0].items()}
    state = tx.init(params)
    update = jax.jit(tx.update)
    outs = []
    for g in grads_seq:
        u, state = update(jax.tree.map(jnp.asarray, g), state, params)
        outs.append(jax.tree.map(np.asarray, u))
    return outs, state


def assert_steps_equal(outs, refs):
    for step, (u, r) in enumerate(zip(outs, refs)):
        for k in r:
            np.testing.assert_allclose(u[k], r[k], rtol=1e-9, atol=1e-12, err_msg=f"step {step}, leaf {k}")


# ----------------------------------------------------------------------------- step-by-step equality


@pytest.mark.parametrize("block_size,grafting", [(3, g) for g in oso.GRAFTING_TYPES] + [(None, "adam")])
def test_matches_numpy_loop(block_size, grafting):
    """Matrix, order-3 tensor (p = 6) and vector (diagonal fallback), blocked (3) or not; uneven blocks below."""
    grads = gradient_sequence(6, shapes=EVEN_SHAPES)
    tx = oso.scale_by_shampoo(
        eps=EPS, relative_eps=RELATIVE_EPS, precondition_frequency=2, start_preconditioning_step=2,
        block_size=block_size or 1024, merge_dims=False, grafting=grafting, graft_b2=GRAFT_BETA2,
        graft_eps=GRAFT_EPS,
    )
    outs, state = run_library(tx, grads)
    loops = {k: NumpyShampoo(s, block_size or 1024, grafting) for k, s in EVEN_SHAPES.items()}
    refs = [{k: loops[k].step(g[k]) for k in g} for g in grads]
    assert_steps_equal(outs, refs)
    assert int(state.root_failures) == 0


def test_ema_exponent_frequencies_and_nesterov_momentum():
    """Uneven blocks, b2 < 1, exponent override, statistics every 2 steps, roots every 3 from step 1, momentum."""
    grads = gradient_sequence(7, seed=1)
    lr, beta1 = 0.1, 0.8
    tx = oso.shampoo(
        lr, b1=beta1, nesterov=True, b2=0.9, exponent_override=2, statistics_frequency=2,
        precondition_frequency=3, start_preconditioning_step=1, eps=EPS, relative_eps=RELATIVE_EPS,
        block_size=3, merge_dims=False, grafting="rmsprop", graft_b2=GRAFT_BETA2, graft_eps=GRAFT_EPS,
    )
    outs, _ = run_library(tx, grads)
    loops = {k: NumpyShampoo(s, 3, "rmsprop", beta2=0.9, exponent=2, pf=3, start=1, stat_every=2)
             for k, s in SHAPES.items()}
    momentum = {k: np.zeros(s) for k, s in SHAPES.items()}
    refs = []
    for g in grads:
        ref = {}
        for k in g:
            u = loops[k].step(g[k])
            momentum[k] = beta1 * momentum[k] + u
            ref[k] = -lr * (1 - beta1) * (u + beta1 * momentum[k])
        refs.append(ref)
    assert_steps_equal(outs, refs)


def test_block_norms_are_the_norms_of_the_stacked_blocks():
    x = np.random.default_rng(3).standard_normal((7, 5, 9))
    expected = [np.linalg.norm(x[i:i + 3, j:j + 3, k:k + 3]) for i in range(0, 7, 3) for j in range(0, 5, 3)
                for k in range(0, 9, 3)]  # row-major block order, the last blocks cut short (their padding is zero)
    np.testing.assert_allclose(blocking.block_norms(jnp.asarray(x), 3), expected, rtol=1e-12)
    np.testing.assert_allclose(
        blocking.block_norms(jnp.asarray(x), 3), jnp.sqrt(jnp.sum(blocking.to_blocks(jnp.asarray(x), 3) ** 2, axis=(1, 2, 3)))
    )


def test_merged_small_dims_match_loop_on_reshaped_tensor():
    assert blocking.merge_small_dims((3, 3, 64, 128), 1024) == (576, 128)
    assert blocking.merge_small_dims((1, 10), 1024) == (10,)
    assert blocking.merge_small_dims((2, 3, 8), 8) == (6, 8)
    # a small matrix keeps its two factors (not one 960 x 960 factor of vec(G)); a rank-4 kernel keeps two too
    assert blocking.merge_small_dims((30, 32), 1024) == (30, 32)
    assert blocking.merge_small_dims((3, 3, 2, 4), 1024) == (18, 4)
    state = oso.scale_by_shampoo().init({"w": jnp.zeros((30, 32))})
    assert sorted(s.shape for s in state.stats) == [(1, 30, 30), (1, 32, 32)]
    shapes = {"k": (2, 3, 8)}
    grads = gradient_sequence(4, seed=2, shapes=shapes)
    tx = oso.scale_by_shampoo(eps=EPS, relative_eps=RELATIVE_EPS, precondition_frequency=2,
                              start_preconditioning_step=2, block_size=8, grafting="none")
    outs, _ = run_library(tx, grads)
    loop = NumpyShampoo((6, 8), 8, "none")
    refs = [{"k": loop.step(g["k"].reshape(6, 8)).reshape(2, 3, 8)} for g in grads]
    assert_steps_equal(outs, refs)


def test_order3_sixth_roots_against_dense_kronecker_product():
    """p = 6: the step equals (H_1^{-1/6} kron H_2^{-1/6} kron H_3^{-1/6}) vec(G) with scipy's fractional power."""
    g = np.random.default_rng(3).standard_normal((2, 3, 4))
    tx = oso.scale_by_shampoo(eps=EPS, relative_eps=RELATIVE_EPS, start_preconditioning_step=0,
                              merge_dims=False, grafting="none")
    (u,), _ = run_library(tx, [{"t": g}])
    factors = []
    for i in range(3):
        h = unfold(g, i) @ unfold(g, i).T
        delta = EPS + RELATIVE_EPS * np.linalg.eigvalsh(h).max()
        factors.append(np.real(scipy.linalg.fractional_matrix_power(h + delta * np.eye(h.shape[0]), -1.0 / 6.0)))
    dense = np.kron(np.kron(factors[0], factors[1]), factors[2])  # row-major vec of a (2, 3, 4) tensor
    np.testing.assert_allclose(u["t"], (dense @ g.reshape(-1)).reshape(g.shape), rtol=1e-9)
    for f, h_root in zip(factors, [unfold(g, i) for i in range(3)]):
        h = h_root @ h_root.T
        delta = EPS + RELATIVE_EPS * np.linalg.eigvalsh(h).max()
        np.testing.assert_allclose(np.linalg.matrix_power(f, 6) @ (h + delta * np.eye(len(h))), np.eye(len(h)), atol=1e-8)


# ----------------------------------------------------------------------------- refresh methods and staggering


@pytest.mark.parametrize("grafting", ["adam", "none"])
def test_newton_roots_match_the_numpy_loop(grafting, monkeypatch):
    """root_method="newton" (coupled Newton, float64) against the eigh loop: the same steps to 1e-7.

    Without relative damping: Newton takes ``lambda_max`` from 20 power-iteration steps, which for these 3 x 3
    factors (close eigenvalues) is a few percent low, so ``relative_eps`` would damp differently (by design)."""
    monkeypatch.setitem(globals(), "RELATIVE_EPS", 0.0)
    grads = gradient_sequence(6, shapes=EVEN_SHAPES)
    tx = oso.scale_by_shampoo(
        eps=EPS, relative_eps=0.0, precondition_frequency=2, start_preconditioning_step=2, block_size=3,
        merge_dims=False, grafting=grafting, graft_b2=GRAFT_BETA2, graft_eps=GRAFT_EPS, root_method="newton",
    )
    outs, state = run_library(tx, grads)
    loops = {k: NumpyShampoo(s, 3, grafting) for k, s in EVEN_SHAPES.items()}
    for step, g in enumerate(grads):
        for k in g:
            np.testing.assert_allclose(outs[step][k], loops[k].step(g[k]), rtol=1e-7, atol=1e-10, err_msg=f"{step} {k}")
    assert int(state.root_failures) == 0


def test_newton_in_float32_is_within_eigh_accuracy_and_a_fractional_exponent_uses_eigh():
    """float32 statistics of condition number up to ~1e4: Newton's roots within 1e-3 of eigh's; p = 2.5 is eigh's."""
    rng = np.random.default_rng(7)
    grads = [{"m": jnp.asarray(rng.standard_normal((40, 24)) * np.logspace(0, -2, 24), jnp.float32)} for _ in range(8)]
    params = {"m": jnp.zeros((40, 24), jnp.float32)}

    def final_roots(**kwargs):
        tx = oso.scale_by_shampoo(precondition_frequency=4, **kwargs)
        state = tx.init(params)
        for g in grads:
            _, state = jax.jit(tx.update)(g, state, params)
        return state.roots, int(state.root_failures)

    eigh, _ = final_roots()
    newton, failures = final_roots(root_method="newton")
    assert failures == 0
    for a, b in zip(newton, eigh):
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 1e-3
    fractional = final_roots(root_method="newton", exponent_override=2.5)[0]
    jax.tree.map(np.testing.assert_array_equal, fractional, final_roots(exponent_override=2.5)[0])


def _stagger_run(stagger, frequency=4, start=4, statistics_frequency=1, steps=12):
    grads = gradient_sequence(steps, seed=8, shapes={"m": (6, 9), "t": (3, 6, 6), "v": (4,)})
    tx = oso.scale_by_shampoo(
        eps=EPS, relative_eps=RELATIVE_EPS, precondition_frequency=frequency, start_preconditioning_step=start,
        statistics_frequency=statistics_frequency, block_size=3, merge_dims=False, stagger=stagger,
    )
    params = {k: jnp.zeros(v.shape) for k, v in grads[0].items()}
    state, update = tx.init(params), jax.jit(tx.update)
    outs, states = [], []
    for g in grads:
        u, state = update(jax.tree.map(jnp.asarray, g), state, params)
        outs.append(u)
        states.append(state)
    return outs, states


def test_unstaggered_options_are_the_default():
    reference, _ = _stagger_run(None)
    for stagger in (False, 1):
        outs, _ = _stagger_run(stagger)
        for a, b in zip(outs, reference):
            jax.tree.map(np.testing.assert_array_equal, a, b)


def test_staggered_roots_follow_a_fixed_balanced_schedule():
    """stagger=True: every factor's root is recomputed from the current statistics exactly on the steps
    ``start - r + k f`` of its slot ``r`` (slot 0 on the unstaggered schedule), each step recomputes
    ``ceil(n / f)`` of the ``n`` equal-sized factors, and the roots between refreshes are kept."""
    frequency, start = 4, 4
    _, states = _stagger_run(True, frequency, start)
    refreshed_at: dict = {}
    previous = None
    for step, state in enumerate(states):
        for group, (stats, roots) in enumerate(zip(state.stats, state.roots)):
            for i in range(stats.shape[0]):
                changed = previous is None or not np.array_equal(roots[i], previous.roots[group][i])
                if changed and not np.array_equal(roots[i], np.eye(stats.shape[-1])):
                    refreshed_at.setdefault((group, i), []).append(step)
        previous = state
    n = sum(s.shape[0] for s in states[0].stats)
    per_step = [sum(step in steps for steps in refreshed_at.values()) for step in range(len(states))]
    assert max(per_step) == -(-n // frequency), per_step
    assert len(refreshed_at) == n  # every factor got a root
    for key, steps in refreshed_at.items():
        slot = (start - steps[0]) % frequency
        expected = [t for t in range(len(states)) if t >= start - slot and (t - start + slot) % frequency == 0]
        assert steps == expected, (key, steps, expected)


def test_staggered_roots_are_roots_of_the_statistics_of_their_step():
    """Every root that changes equals the eigh root (NumPy) of that step's statistics."""
    _, states = _stagger_run(3, frequency=3, start=3)
    for before, after in zip(states, states[1:]):
        for group, (stats, roots) in enumerate(zip(after.stats, after.roots)):
            p = 4 if group < 2 else 6  # the matrix's two factor stacks (3 x 3 blocks), then the order-3 tensor's three
            for i in range(stats.shape[0]):
                if not np.array_equal(roots[i], before.roots[group][i]):
                    np.testing.assert_allclose(roots[i], numpy_root(np.asarray(stats[i]), p), rtol=1e-9, atol=1e-12)


def test_staggered_equals_unstaggered_once_the_statistics_stop_changing():
    """Statistics from step 0 only (statistics_frequency 100): after one window of f steps every staggered root
    is the unstaggered one, and so are the updates."""
    plain, _ = _stagger_run(None, statistics_frequency=100)
    staggered, _ = _stagger_run(True, statistics_frequency=100)
    for step in range(4, 12):
        for k in plain[step]:
            np.testing.assert_allclose(staggered[step][k], plain[step][k], rtol=1e-10, atol=1e-13, err_msg=f"{step} {k}")


# ----------------------------------------------------------------------------- numerical failure


def test_a_corrupt_statistic_restarts_and_a_failed_root_keeps_the_previous_one(monkeypatch):
    grads = gradient_sequence(6, seed=4, shapes={"m": (5, 4)})
    tx = oso.scale_by_shampoo(precondition_frequency=1, start_preconditioning_step=0, merge_dims=False)
    params = {"m": jnp.zeros((5, 4))}
    update = jax.jit(tx.update)
    _, state = update({"m": jnp.asarray(grads[0]["m"])}, tx.init(params), params)
    # A NaN in the stored 5 x 5 left factor (a corrupt state): the factor restarts from this step's G G^T.
    stats = list(state.stats)
    stats[0] = stats[0].at[0, 0, 0].set(jnp.nan)
    g = np.asarray(grads[1]["m"])
    u, state = update({"m": jnp.asarray(g)}, state._replace(stats=tuple(stats)), params)
    assert np.all(np.isfinite(u["m"])) and int(state.nonfinite) == 0
    np.testing.assert_allclose(state.stats[0][0], g @ g.T, rtol=1e-12)

    # A root that comes out non-finite from finite statistics (a failed decomposition) keeps the previous root.
    good_roots = state.roots
    original = shampoo_module.inverse_pth_root

    def failing_left_root(matrix, p, **kwargs):
        root, ok = original(matrix, p, **kwargs)
        fail = matrix.shape[-1] == 5
        return jnp.where(fail, jnp.nan, root), ok & (not fail)

    monkeypatch.setattr(shampoo_module, "inverse_pth_root", failing_left_root)
    tx = oso.scale_by_shampoo(precondition_frequency=1, start_preconditioning_step=0, merge_dims=False)
    for step, g in enumerate(grads[2:], start=1):
        u, state = jax.jit(tx.update)({"m": jnp.asarray(g["m"])}, state, params)
        assert np.all(np.isfinite(u["m"])), step
        assert int(state.root_failures) == step
    np.testing.assert_array_equal(state.roots[0][0], good_roots[0][0])  # the failing factor's root is kept
    assert not np.allclose(state.roots[1], good_roots[1])  # the healthy one kept being refreshed


def test_an_overflowing_gradient_is_rejected_and_counted():
    """Gradients of 1e20 in float32: G G^T overflows. The step is rejected (zero update, state kept), and the
    run continues as if it had not happened."""
    grads = gradient_sequence(4, seed=6, shapes={"m": (5, 4)})
    tx = oso.scale_by_shampoo(precondition_frequency=1, start_preconditioning_step=0)
    params = {"m": jnp.zeros((5, 4), jnp.float32)}
    update = jax.jit(tx.update)
    f32 = lambda g: {"m": jnp.asarray(g["m"], jnp.float32)}  # noqa: E731
    _, state = update(f32(grads[0]), tx.init(params), params)
    u, bad = update({"m": jnp.asarray(1e20 * grads[1]["m"], jnp.float32)}, state, params)
    assert np.all(u["m"] == 0) and int(bad.nonfinite) == 1
    jax.tree.map(np.testing.assert_array_equal, bad._replace(nonfinite=state.nonfinite), state)


def test_a_statistic_that_would_overflow_from_its_stored_factor_is_rejected_and_a_corrupt_one_restarts():
    """b2 = 1 sums G G^T: a stored factor of 3e38 plus G G^T = 6.4e37 (G = 4e18 everywhere, ||G||^2 = 3.2e38 still
    finite in float32) overflows, so the step is rejected with the state kept; a NaN off the diagonal of a stored
    factor makes it restart instead."""
    g = {"m": jnp.asarray(gradient_sequence(1, seed=7, shapes={"m": (5, 4)})[0]["m"], jnp.float32)}
    tx = oso.scale_by_shampoo(precondition_frequency=1, start_preconditioning_step=0)
    params = {"m": jnp.zeros((5, 4), jnp.float32)}
    update = jax.jit(tx.update)
    _, state = update(g, tx.init(params), params)
    huge = state._replace(stats=(jnp.full_like(state.stats[0], 3e38), *state.stats[1:]))
    big = jnp.full((5, 4), 4e18, jnp.float32)
    assert np.isfinite(np.sum(np.square(big))) and not np.all(np.isfinite(3e38 + big @ big.T))
    u, bad = update({"m": big}, huge, params)
    assert np.all(u["m"] == 0) and int(bad.nonfinite) == 1
    jax.tree.map(np.testing.assert_array_equal, bad._replace(nonfinite=huge.nonfinite), huge)

    corrupt = state._replace(stats=(state.stats[0].at[0, 1, 3].set(jnp.nan), *state.stats[1:]))
    u, fresh = update(g, corrupt, params)
    assert np.all(np.isfinite(u["m"])) and int(fresh.nonfinite) == 0
    m = np.asarray(g["m"], np.float64)
    np.testing.assert_allclose(fresh.stats[0][0], m @ m.T, rtol=1e-5)


def test_a_step_without_statistics_rejects_only_a_non_finite_gradient():
    """statistics_frequency = 2: on step 1 no G G^T is taken, so a gradient of 1e19 (squared norm 2e39, beyond
    float32) is used, not rejected; a NaN one is. (No grafting: a graft's norm of it would overflow to a zero step.)"""
    g = jnp.asarray(gradient_sequence(1, seed=8, shapes={"m": (5, 4)})[0]["m"], jnp.float32)
    tx = oso.scale_by_shampoo(
        precondition_frequency=1, start_preconditioning_step=0, statistics_frequency=2, grafting="none"
    )
    params = {"m": jnp.zeros((5, 4), jnp.float32)}
    update = jax.jit(tx.update)
    _, state = update({"m": g}, tx.init(params), params)
    u, after = update({"m": jnp.full((5, 4), 1e19, jnp.float32)}, state, params)
    assert np.all(np.isfinite(u["m"])) and np.any(u["m"] != 0) and int(after.nonfinite) == 0
    jax.tree.map(np.testing.assert_array_equal, after.stats, state.stats)
    u, after = update({"m": g.at[0, 0].set(jnp.nan)}, state, params)
    assert np.all(u["m"] == 0) and int(after.nonfinite) == 1


def test_rank_deficient_statistics_stay_finite():
    """Rank-one gradients u v^T: the factors are rank one; the damped roots stay finite (default eps)."""
    rng = np.random.default_rng(5)
    grads = [{"m": np.outer(rng.standard_normal(6), rng.standard_normal(4))} for _ in range(4)]
    for grafting in ("none", "adam"):
        tx = oso.scale_by_shampoo(precondition_frequency=1, start_preconditioning_step=0, grafting=grafting)
        outs, state = run_library(tx, grads)
        assert all(np.all(np.isfinite(u["m"])) for u in outs)
        assert int(state.root_failures) == 0


@pytest.mark.parametrize(
    "kwargs,name",
    [({"b2": 0.0}, "b2"), ({"grafting": "lamb"}, "grafting"), ({"block_size": 0}, "block_size"),
     ({"precondition_frequency": 0}, "precondition_frequency"), ({"eps": -1.0}, "eps"),
     ({"exponent_override": 0}, "exponent_override"), ({"max_precond_dim": 0}, "max_precond_dim"),
     ({"root_method": "qr"}, "root_method"), ({"stagger": 0}, "stagger"),
     ({"stagger": 11, "precondition_frequency": 10}, "stagger")],
)
def test_bad_hyperparameters_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        oso.scale_by_shampoo(**kwargs)
