"""Quasi-Newton transformations against NumPy loops of the textbook algorithms, optax.lbfgs and scipy (float64).

Independent references: the dense SR1 / BFGS / DFP iterations (N&W eqs. 6.15, 6.17, 6.19, 6.24, 6.25, 6.20)
and the L-BFGS two-loop recursion (N&W Algorithm 7.4) written out in NumPy here, step by step, directions and
matrices; the quadratic-termination property of BFGS and DFP with exact line searches (the minimizer in ``n``
steps and ``H_n = A^{-1}``); ``optax.lbfgs`` iterate for iterate; the minimizer of scipy's L-BFGS-B and BFGS;
scripted pairs for the skip, fallback and non-finite counters.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import minimize

import optax_second_order as oso

jax.config.update("jax_enable_x64", True)

METHODS = ("bfgs", "bfgs_cholesky", "dfp", "sr1", "sr1_inverse")


def rosenbrock(params):
    x = params["x"]
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2) + jnp.sum(params["y"] ** 2)


def start():
    return {"x": jnp.asarray([-1.2, 1.0, -1.2, 1.0]), "y": jnp.asarray([[0.5, -0.3]])}


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


# --- a NumPy loop of the textbook dense methods ---------------------------------------------------------


class Reference:
    """Dense quasi-Newton on flat NumPy vectors, the rules of the module docstring written out."""

    def __init__(self, method, n, min_cosine=1e-8):
        self.method, self.r = method, min_cosine
        self.matrix = np.eye(n)
        self.x = self.g = None
        self.seen = 0  # finite pairs seen (accepted or skipped)
        self.skipped = self.fallbacks = 0

    def _update(self, m, s, y):
        if self.method in ("bfgs", "bfgs_cholesky", "dfp"):
            if not s @ y > self.r * np.linalg.norm(s) * np.linalg.norm(y):
                return None
            if self.method == "bfgs":  # eq. 6.17
                rho = 1.0 / (y @ s)
                left = np.eye(len(s)) - rho * np.outer(s, y)
                return left @ m @ left.T + rho * np.outer(s, s)
            if self.method == "dfp":  # eq. 6.15
                hy = m @ y
                return m - np.outer(hy, hy) / (y @ hy) + np.outer(s, s) / (y @ s)
            b = m @ m.T  # eq. 6.19 on B = L L^T, then its Cholesky factor
            bs = b @ s
            return np.linalg.cholesky(b - np.outer(bs, bs) / (s @ bs) + np.outer(y, y) / (y @ s))
        if self.method == "sr1":  # eq. 6.24 and the test 6.26
            u = y - m @ s
            if not abs(s @ u) > self.r * np.linalg.norm(s) * np.linalg.norm(u):
                return None
            return m + np.outer(u, u) / (u @ s)
        u = s - m @ y  # eq. 6.25, the dual test
        if not abs(y @ u) > self.r * np.linalg.norm(y) * np.linalg.norm(u):
            return None
        return m + np.outer(u, u) / (u @ y)

    def step(self, x, g):
        if self.x is not None:
            s, y = x - self.x, g - self.g
            m = self.matrix
            if self.seen == 0:  # eq. 6.20, once
                gamma = abs(s @ y) / (y @ y) if s @ y != 0 else 1.0
                m = {"sr1": np.eye(len(s)) / gamma, "bfgs_cholesky": np.eye(len(s)) / np.sqrt(gamma)}.get(
                    self.method, gamma * np.eye(len(s))
                )
            # SR1 takes only its scale from the first pair (its update of that B_0 is exactly singular)
            new = None if self.seen == 0 and self.method.startswith("sr1") else self._update(m, s, y)
            self.seen += 1
            self.skipped += new is None
            self.matrix = m if new is None else new
        self.x, self.g = x, g
        norm = np.linalg.norm(g)
        safe = min(1.0, 1.0 / norm) * g if norm > 0 else g
        if self.seen == 0:
            return safe
        if self.method == "sr1":
            d = np.linalg.solve(self.matrix, g)
        elif self.method == "bfgs_cholesky":
            d = np.linalg.solve(self.matrix.T, np.linalg.solve(self.matrix, g))
        else:
            d = self.matrix @ g
        if not d @ g > 0:
            self.fallbacks += 1
            return safe
        return d


@pytest.mark.parametrize("method", METHODS)
def test_directions_and_matrices_match_numpy_loop(method):
    """Fixed learning rate 0.05, 12 steps on Rosenbrock plus a quadratic: every direction and matrix."""
    tx = oso.scale_by_quasi_newton(method)
    params = start()
    state = tx.init(params)
    reference = Reference(method, 6)
    update = jax.jit(tx.update)
    grad = jax.jit(jax.grad(rosenbrock))
    for step in range(12):
        g = grad(params)
        d, state = update(g, state, params)
        want = reference.step(flat(params), flat(g))
        np.testing.assert_allclose(flat(d), want, rtol=1e-9, atol=1e-12, err_msg=f"direction, step {step}")
        np.testing.assert_allclose(np.asarray(state.matrix), reference.matrix, rtol=1e-8, atol=1e-10,
                                   err_msg=f"matrix, step {step}")
        params = jax.tree.map(lambda p, u: p - 0.05 * u, params, d)
    assert int(state.skipped) == reference.skipped and int(state.fallbacks) == reference.fallbacks
    assert int(state.num_pairs) + int(state.skipped) == 11


@pytest.mark.parametrize("method", ("bfgs", "bfgs_cholesky", "dfp"))
def test_quadratic_termination_with_exact_line_search(method):
    """On ``1/2 x^T A x - b^T x`` with exact steps, BFGS and DFP stop within n steps and ``H_n = A^{-1}``."""
    n = 5
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = (q * np.linspace(1.0, 20.0, n)) @ q.T
    b = rng.normal(size=n)
    tx = oso.scale_by_quasi_newton(method)
    x = jnp.zeros(n)
    state = tx.init(x)
    update = jax.jit(tx.update)
    for _ in range(n):
        g = a @ np.asarray(x) - b
        d, state = update(jnp.asarray(g), state, x)
        d = np.asarray(d)
        x = x - (g @ d) / (d @ a @ d) * d  # the exact minimizer along -d
    g = a @ np.asarray(x) - b
    d, state = update(jnp.asarray(g), state, x)  # forms the n-th pair
    assert np.linalg.norm(g) < 1e-9 * np.linalg.norm(b)
    np.testing.assert_allclose(np.asarray(x), np.linalg.solve(a, b), rtol=1e-9)
    matrix = np.asarray(state.matrix)
    inverse = np.linalg.inv(matrix @ matrix.T) if method == "bfgs_cholesky" else matrix
    np.testing.assert_allclose(inverse, np.linalg.inv(a), rtol=1e-6, atol=1e-9)


# --- counters on scripted pairs -------------------------------------------------------------------------


def scripted(tx, points):
    """``tx.update`` at the given ``(x, g)`` pairs: the directions and the last state."""
    state = tx.init(jnp.asarray(points[0][0]))
    directions, update = [], jax.jit(tx.update)
    for x, g in points:
        d, state = update(jnp.asarray(g), state, jnp.asarray(x))
        directions.append(np.asarray(d))
    return directions, state


@pytest.mark.parametrize("method", ("bfgs", "bfgs_cholesky", "dfp"))
def test_negative_curvature_pair_is_skipped_or_damped(method):
    x0, g0 = np.array([0.0, 0.0]), np.array([1.0, 2.0])
    x1, g1 = np.array([1.0, 0.5]), np.array([0.0, 1.0])  # s = (1, 0.5), y = (-1, -1): s^T y = -1.5 < 0
    _, state = scripted(oso.scale_by_quasi_newton(method), [(x0, g0), (x1, g1)])
    assert (int(state.skipped), int(state.num_pairs)) == (1, 0)
    gamma = 1.5 / 2.0  # |s^T y| / y^T y: the first pair still scales H_0
    want = {"bfgs_cholesky": np.eye(2) / np.sqrt(gamma)}.get(method, gamma * np.eye(2))
    np.testing.assert_allclose(np.asarray(state.matrix), want)
    _, damped = scripted(oso.scale_by_quasi_newton(method, damp=True), [(x0, g0), (x1, g1)])
    assert (int(damped.skipped), int(damped.num_pairs)) == (0, 1)


def test_sr1_ascent_direction_falls_back_to_the_scaled_gradient():
    """First pair s = y = e1: only the scale, B_0 = I. Second s = e1, y = -e1: B = I - 2 e1 e1^T (indefinite), and
    B^{-1} g is an ascent direction for g = -e1."""
    points = [(np.zeros(2), np.array([-1.0, 0.0])), (np.array([1.0, 0.0]), np.zeros(2)),
              (np.array([2.0, 0.0]), np.array([-1.0, 0.0]))]
    for method in ("sr1", "sr1_inverse"):
        directions, state = scripted(oso.scale_by_quasi_newton(method), points)
        assert (int(state.skipped), int(state.num_pairs), int(state.fallbacks)) == (1, 1, 1), method
        np.testing.assert_allclose(np.asarray(state.matrix), np.diag([-1.0, 1.0]), atol=1e-15)
        np.testing.assert_allclose(directions[2], [-1.0, 0.0])  # min(1, 1/||g||) g


@pytest.mark.parametrize("seed", range(3))
def test_sr1_takes_only_the_scale_from_the_first_pair(seed):
    """The SR1 update of B_0 = (y^T y / s^T y) I by the pair that scaled it is singular (NumPy: its smallest singular
    value is rounding, 1e-12 of the largest), so both SR1 forms skip that pair and step with gamma g."""
    rng = np.random.default_rng(seed)
    n = 6
    s = rng.normal(size=n)
    y = s + 0.3 * rng.normal(size=n)  # s^T y > 0
    c = (y @ y) / (s @ y)
    u = y - c * s
    singular_values = np.linalg.svd(c * np.eye(n) + np.outer(u, u) / (u @ s), compute_uv=False)
    assert singular_values[-1] < 1e-12 * singular_values[0]
    g = rng.normal(size=n)
    points = [(np.zeros(n), g - y), (s, g)]
    for method in ("sr1", "sr1_inverse"):
        directions, state = scripted(oso.scale_by_quasi_newton(method), points)
        assert (int(state.skipped), int(state.num_pairs)) == (1, 0), method
        np.testing.assert_allclose(directions[1], g / c, rtol=1e-12, err_msg=method)


def test_nonfinite_gradient_gives_zero_update_and_keeps_the_state():
    for tx in (oso.scale_by_quasi_newton("bfgs"), oso.scale_by_lbfgs(3)):
        x = jnp.asarray([1.0, 2.0])
        state, update = tx.init(x), jax.jit(tx.update)
        _, state = update(jnp.asarray([0.5, 1.0]), state, x)
        bad, after = update(jnp.asarray([np.nan, 1.0]), state, x + 0.1)
        np.testing.assert_array_equal(np.asarray(bad), 0.0)
        assert int(after.nonfinite) == 1
        for new, old in zip(jax.tree.leaves(after._replace(nonfinite=0)), jax.tree.leaves(state._replace(nonfinite=0))):
            np.testing.assert_array_equal(np.asarray(new), np.asarray(old))


def test_same_batch_pairs_take_both_gradients_on_the_current_batch():
    """``y = grad f_k(x_k) - grad f_k(x_{k-1})``: the second batch's function at both points."""
    def batch_fn(c):
        return lambda x: jnp.sum(c * x**2) + jnp.sum(x**4)

    fns = [batch_fn(np.array([1.0, 3.0])), batch_fn(np.array([2.0, 0.5]))]
    tx = oso.scale_by_quasi_newton("bfgs", same_batch_pairs=True)
    x0 = jnp.asarray([1.0, -0.5])
    state = tx.init(x0)
    d0, state = tx.update(jax.grad(fns[0])(x0), state, x0, value_fn=fns[0])
    x1 = x0 - 0.1 * d0
    _, state = tx.update(jax.grad(fns[1])(x1), state, x1, value_fn=fns[1])
    y = np.asarray(jax.grad(fns[1])(x1) - jax.grad(fns[1])(x0))
    reference = Reference("bfgs", 2)
    reference.step(np.asarray(x0), np.zeros(2))
    reference.step(np.asarray(x1), y)  # the pair (x1 - x0, y): y from a zero "previous gradient"
    np.testing.assert_allclose(np.asarray(state.matrix), reference.matrix, rtol=1e-12)
    consecutive = Reference("bfgs", 2)  # y from two batches: another matrix
    consecutive.step(np.asarray(x0), np.asarray(jax.grad(fns[0])(x0)))
    consecutive.step(np.asarray(x1), np.asarray(jax.grad(fns[1])(x1)))
    assert not np.allclose(consecutive.matrix, reference.matrix, rtol=1e-3)
    with pytest.raises(TypeError, match="value_fn"):
        tx.update(jax.grad(fns[1])(x1), state, x1)


# --- L-BFGS ------------------------------------------------------------------------------------------------


def numpy_lbfgs_directions(points, m):
    """N&W Algorithm 7.4 with the last m accepted pairs, gamma of the newest, capped first step."""
    pairs, out, previous = [], [], None
    for x, g in points:
        if previous is not None:
            s, y = x - previous[0], g - previous[1]
            if s @ y > 1e-8 * np.linalg.norm(s) * np.linalg.norm(y):
                pairs = (pairs + [(s, y)])[-m:]
        previous = (x, g)
        if not pairs:
            out.append(min(1.0, 1.0 / np.linalg.norm(g)) * g)
            continue
        q, alphas = g.copy(), []
        for s, y in reversed(pairs):
            alpha = (s @ q) / (s @ y)
            q -= alpha * y
            alphas.append(alpha)
        s, y = pairs[-1]
        r = (s @ y) / (y @ y) * q
        for (s, y), alpha in zip(pairs, reversed(alphas)):
            r += (alpha - (y @ r) / (s @ y)) * s
        out.append(r)
    return out


def test_lbfgs_directions_match_numpy_two_loop_after_the_ring_wraps():
    tx = oso.scale_by_lbfgs(3)
    params = start()
    state = tx.init(params)
    grad, update = jax.jit(jax.grad(rosenbrock)), jax.jit(tx.update)
    points, directions = [], []
    for _ in range(10):
        g = grad(params)
        d, state = update(g, state, params)
        points.append((flat(params), flat(g)))
        directions.append(flat(d))
        params = jax.tree.map(lambda p, u: p - 0.02 * u, params, d)
    for step, (got, want) in enumerate(zip(directions, numpy_lbfgs_directions(points, 3))):
        np.testing.assert_allclose(got, want, rtol=1e-9, err_msg=f"step {step}")


def logistic_problem():
    """L2-regularized logistic regression on 40 random points, 5 features: strictly convex, float64."""
    rng = np.random.default_rng(1)
    features = rng.normal(size=(40, 5))
    labels = (features @ rng.normal(size=5) + 0.5 * rng.normal(size=40) > 0).astype(np.float64)

    def value_fn(params):
        logits = features @ params["w"] + params["b"]
        return jnp.mean(jnp.logaddexp(0.0, logits) - labels * logits) + 0.01 * jnp.sum(params["w"] ** 2)

    return value_fn, {"w": jnp.zeros(5), "b": jnp.zeros(())}


def run(tx, value_fn, params, steps):
    """``steps`` iterations reusing the line search's value and gradient: the params after each."""
    value_and_grad = optax.value_and_grad_from_state(value_fn)

    @jax.jit
    def step(params, state):
        value, grad = value_and_grad(params, state=state)
        updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=value_fn)
        return optax.apply_updates(params, updates), state

    state, out = tx.init(params), []
    for _ in range(steps):
        params, state = step(params, state)
        out.append(params)
    return out, state


@functools.cache
def logistic_runs():
    """oso.lbfgs (40 iterations) and optax.lbfgs (12) on the logistic problem (each zoom search compiled once)."""
    value_fn, params = logistic_problem()
    return {"lbfgs": run(oso.lbfgs(), value_fn, params, 40)[0], "optax": run(optax.lbfgs(), value_fn, params, 12)[0]}


def test_lbfgs_equals_optax_lbfgs_iterate_for_iterate():
    """Same composition (zoom line search, capped first step, gamma of the newest pair): same iterates."""
    runs = logistic_runs()
    for step, (a, b) in enumerate(zip(runs["lbfgs"], runs["optax"])):
        np.testing.assert_allclose(flat(a), flat(b), rtol=1e-9, atol=1e-12, err_msg=f"step {step}")


def test_lbfgs_reaches_the_scipy_minimizer():
    value_fn, _ = logistic_problem()
    flat_fn = jax.jit(jax.value_and_grad(lambda z: value_fn({"b": z[0], "w": z[1:]})))  # the leaves' order: b, w
    scipy = minimize(flat_fn, np.zeros(6), jac=True, method="L-BFGS-B", options=dict(gtol=1e-10, ftol=0.0))
    scipy_bfgs = minimize(flat_fn, np.zeros(6), jac=True, method="BFGS", options=dict(gtol=1e-10))
    np.testing.assert_allclose(scipy_bfgs.x, scipy.x, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(flat(logistic_runs()["lbfgs"][-1]), scipy.x, rtol=1e-6, atol=1e-8)


# --- the line search adapter -------------------------------------------------------------------------------


def test_linesearch_learning_rate_scales_the_accepted_step_and_stores_the_value_it_reaches():
    value_fn, params = logistic_problem()
    grad = jax.grad(value_fn)(params)
    extra = dict(value_fn=value_fn, model_fn=lambda p: p, loss=object())  # model_fn, loss: not forwarded
    full = oso.bfgs(linesearch="backtracking")  # the adapter is the same for both searches; this one compiles faster
    half = oso.bfgs(learning_rate=0.5, linesearch="backtracking")
    u1, s1 = jax.jit(lambda s: full.update(grad, s, params, **extra))(full.init(params))
    u2, s2 = jax.jit(lambda s: half.update(grad, s, params, **extra))(half.init(params))
    np.testing.assert_allclose(flat(u2), 0.5 * flat(u1), rtol=1e-12)
    assert np.isfinite(float(optax.tree.get(s1, "value")))
    # where the learning rate is not 1, the stored value and gradient are those at the parameters the step reaches
    reached = optax.apply_updates(params, u2)
    np.testing.assert_allclose(float(optax.tree.get(s2, "value")), float(value_fn(reached)), rtol=1e-12)
    np.testing.assert_allclose(flat(optax.tree.get(s2, "grad")), flat(jax.grad(value_fn)(reached)), rtol=1e-12)
    # value and grad computed from value_fn when absent are those given
    u3, _ = jax.jit(lambda s: full.update(grad, s, params, value=value_fn(params), grad=grad, value_fn=value_fn))(
        full.init(params)
    )
    np.testing.assert_allclose(flat(u3), flat(u1), rtol=1e-12)


def test_errors():
    params = {"x": jnp.zeros(3)}
    tx = oso.bfgs()
    with pytest.raises(TypeError, match="bfgs.*value_fn"):
        tx.update(params, tx.init(params), params)
    with pytest.raises(ValueError, match="max_precond_dim"):
        oso.scale_by_quasi_newton("bfgs", max_precond_dim=2).init(params)
    with pytest.raises(ValueError, match="method"):
        oso.scale_by_quasi_newton("broyden")
    with pytest.raises(ValueError, match="min_cosine"):
        oso.sr1(min_cosine=1.5)
    with pytest.raises(ValueError, match="slope_rtol"):
        oso.lbfgs(slope_rtol=0.95)
    with pytest.raises(ValueError, match="linesearch"):
        oso.lbfgs(linesearch="wolfe")
    with pytest.raises(ValueError, match="memory_size"):
        oso.lbfgs(memory_size=0)
