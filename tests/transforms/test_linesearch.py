"""The Moré-Thuente line search against scipy's MINPACK-2 translation (``scipy.optimize._dcsrch``), in float64.

Independent reference: scipy's ``dcstep`` (the safeguarded step) on random inputs, and its ``DCSRCH`` on the test
functions of Moré & Thuente (1994, section 5: ``phi(a) = -a / (a^2 + beta)``, ``(a + 0.004)^5 - 2 (a + 0.004)^4``,
a wiggly function with ``l = 39``, and Yanai, Ozawa & Kaneko's functions), from the paper's four first trials:
the same trial steps one by one, the same accepted step, the same number of evaluations. Then the transformation:
strong Wolfe steps in an ``optax.chain``, the value and gradient it stores, and BFGS / L-BFGS with it against
scipy's BFGS line search and L-BFGS-B iteration for iteration (evaluations included) on Rosenbrock.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import rosen, rosen_der
from scipy.optimize._dcsrch import DCSRCH, dcstep
from scipy.optimize._linesearch import line_search_wolfe1

import optax_second_order as oso
from optax_second_order.transforms import linesearch as mt


@pytest.fixture(scope="module", autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


# --- the paper's test functions (Moré & Thuente 1994, section 5) ---------------------------------------------


def rational(a):  # function (5.1), beta = 2
    return -a / (a**2 + 2.0)


def quintic(a):  # function (5.2), beta = 0.004
    return (a + 0.004) ** 5 - 2.0 * (a + 0.004) ** 4


def wiggly(a, beta=0.01, l=39):  # function (5.3)
    base = jnp.where(a <= 1 - beta, 1 - a, jnp.where(a >= 1 + beta, a - 1, (a - 1) ** 2 / (2 * beta) + beta / 2))
    return base + 2 * (1 - beta) / (l * jnp.pi) * jnp.sin(l * jnp.pi / 2 * a)


def yanai(b1, b2):  # functions (5.4)
    def gamma(b):
        return jnp.sqrt(1 + b**2) - b

    return lambda a: gamma(b1) * jnp.sqrt((1 - a) ** 2 + b2**2) + gamma(b2) * jnp.sqrt(a**2 + b1**2)


PAPER = [  # (function, ftol, gtol) as in the paper's tables 1-6
    (rational, 1e-3, 0.1),
    (quintic, 0.1, 0.1),
    (wiggly, 0.1, 0.1),
    (yanai(0.001, 0.001), 0.001, 0.001),
    (yanai(0.01, 0.001), 0.001, 0.001),
    (yanai(0.001, 0.01), 0.001, 0.001),
]
FIRST = (1e-3, 1e-1, 1e1, 1e3)


def scipy_search(fn, first, ftol, gtol, xtol=1e-10, stpmin=0.0, stpmax=1e10, maxiter=30):
    """scipy's DCSRCH on ``fn``: (step or None, task, the trials it evaluated in order)."""
    value_and_grad = jax.jit(jax.value_and_grad(fn))
    trials = []

    def phi(a):
        trials.append(float(a))
        return float(value_and_grad(jnp.asarray(a, jnp.float64))[0])

    def derphi(a):
        return float(value_and_grad(jnp.asarray(a, jnp.float64))[1])

    f0, g0 = map(float, value_and_grad(jnp.asarray(0.0, jnp.float64)))
    step, _, _, task = DCSRCH(phi, derphi, ftol, gtol, xtol, stpmin, stpmax)(first, f0, g0, maxiter=maxiter)
    return step, task, trials, (f0, g0)


_SEARCHES = {}


def ours(fn, first, ftol, gtol, xtol=1e-10, stpmin=0.0, stpmax=1e10, max_steps=30):
    """:func:`more_thuente_search` on ``fn``, compiled once per function (the numbers are traced)."""
    if fn not in _SEARCHES:
        value_and_grad = jax.value_and_grad(fn)

        def search(first, ftol, gtol, xtol, stpmin, stpmax, max_steps):
            f0, g0 = value_and_grad(jnp.zeros([], jnp.float64))
            return mt.more_thuente_search(lambda a: (*value_and_grad(a), None), first, f0, g0, ftol=ftol, gtol=gtol,
                                          xtol=xtol, min_step=stpmin, max_step=stpmax, max_steps=max_steps)

        _SEARCHES[fn] = jax.jit(search)
    numbers = (jnp.asarray(v, jnp.float64) for v in (first, ftol, gtol, xtol, stpmin, stpmax))
    return _SEARCHES[fn](*numbers, jnp.asarray(max_steps, jnp.int32))


# --- dcstep ---------------------------------------------------------------------------------------------------


def test_step_equals_dcstep():
    """Cases 1-4 and the interval update, on random points (the best point's derivative points to the trial), all
    at once (the step is elementwise); scipy's NaN steps (a negative discriminant under its unguarded square roots)
    are finite here."""
    rng = np.random.default_rng(0)
    stx, stp, sty, fx, fp, fy, dx, dp, dy = rng.normal(size=(9, 2000))
    dx = -np.abs(dx) * np.sign(stp - stx)
    brackt = rng.integers(2, size=2000).astype(bool)
    lo, hi = np.minimum(stx, stp) - 2.0, np.maximum(stx, stp) + 5.0
    inputs = (stx, fx, dx, sty, fy, dy, stp, fp, dp, brackt, lo, hi)
    with np.errstate(all="ignore"):
        ref = np.array([dcstep(*(float(v[i]) if v.dtype != bool else bool(v[i]) for v in inputs)) for i in range(2000)],
                       float)
    out = mt.more_thuente_step(*(jnp.asarray(v) for v in inputs))
    got = np.stack([np.asarray(v, float) for v in out[:8]], axis=1)
    np.testing.assert_array_equal(np.asarray(out[8]), fp <= fx)
    case = np.where(fp > fx, 1, np.where(dp * dx < 0, 2, np.where(np.abs(dp) < np.abs(dx), 3, 4)))
    assert len(set(zip(case, brackt))) == 8  # every case, bracketed or not
    nan = np.isnan(ref[:, 6])
    assert nan.sum() < 20 and np.all(np.isfinite(got[nan, 6]))
    ref[nan, 6] = got[nan, 6]
    np.testing.assert_allclose(got, ref, rtol=1e-13, atol=1e-15)


# --- the search -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn, ftol, gtol", PAPER, ids=["rational", "quintic", "wiggly", "yanai1", "yanai2", "yanai3"])
def test_search_equals_dcsrch(fn, ftol, gtol):
    """From each first trial: the same trials one by one (``trial`` after ``k`` evaluations is scipy's
    ``(k+1)``-th), the same accepted step, the same number of evaluations, CONVERGENCE."""
    for first in FIRST:
        step, task, trials, _ = scipy_search(fn, first, ftol, gtol)
        assert task == b"CONVERGENCE"
        result = ours(fn, first, ftol, gtol)
        assert int(result.status) == 1, mt.MORE_THUENTE_STATUS[int(result.status)]
        assert int(result.num_steps) == len(trials)
        np.testing.assert_allclose(float(result.step), step, rtol=1e-12)
        for k in range(1, len(trials)):
            partial = ours(fn, first, ftol, gtol, max_steps=k)
            assert int(partial.status) == 6  # max_linesearch_steps reached
            np.testing.assert_allclose(float(partial.trial), trials[k], rtol=1e-12)


def test_paper_table_one():
    """Table 1 of the paper (function 5.1, ftol 1e-3, gtol 0.1): evaluations 6, 3, 1, 4 and the final steps."""
    evaluations, steps = [], []
    for first in FIRST:
        result = ours(rational, first, 1e-3, 0.1)
        evaluations.append(int(result.num_steps))
        steps.append(float(result.step))
    assert evaluations == [6, 3, 1, 4]
    np.testing.assert_allclose(steps, [1.4, 1.4, 10.0, 37.0], rtol=0.03)


def test_warnings_follow_dcsrch():
    """A step bound below the minimizer (STP = STPMAX) and a coarse xtol end as scipy's do, after as many
    evaluations; the step is then the best point found."""
    step, task, trials, _ = scipy_search(rational, 0.1, 1e-3, 0.1, stpmax=0.5)
    assert task.startswith(b"WARNING: STP = STPMAX") and step is None
    result = ours(rational, 0.1, 1e-3, 0.1, stpmax=0.5)
    assert int(result.status) == 4 and int(result.num_steps) == len(trials)
    assert float(result.step) == 0.5
    step, task, trials, _ = scipy_search(quintic, 0.1, 0.1, 0.1, xtol=0.1)
    assert task.startswith(b"WARNING: XTOL") and step is None
    result = ours(quintic, 0.1, 0.1, 0.1, xtol=0.1)
    assert int(result.status) == 3 and int(result.num_steps) == len(trials)
    assert float(result.step) in trials  # an evaluated point, no worse than the start
    assert float(result.value) == float(quintic(result.step)) <= float(quintic(0.0))


def test_nonfinite_trial_is_halved_and_never_exceeded():
    """``phi`` overflows beyond 2: the trial at 1000 is not folded in, the search halves back and converges."""

    def cliff(a):
        return jnp.where(a > 2.0, jnp.inf, rational(a))

    result = ours(cliff, 1e3, 1e-3, 0.1)
    assert int(result.status) == 1
    assert np.isfinite(float(result.value)) and 0 < float(result.step) <= 2.0


def test_not_a_descent_direction():
    result = ours(lambda a: (a - 1.0) ** 2 * -1.0 + 2 * a, 1.0, 1e-4, 0.9)
    assert int(result.status) == 7 and int(result.num_steps) == 0 and float(result.step) == 0.0


# --- the transformation ----------------------------------------------------------------------------------------


def quadratic(x):
    return 0.5 * jnp.sum(jnp.arange(1.0, 5.0) * x**2) + jnp.sum(jnp.sin(x))


def test_transformation_gives_strong_wolfe_steps_and_stores_value_and_grad():
    tx = optax.chain(optax.sgd(1.0), oso.scale_by_more_thuente_linesearch(20))
    x = jnp.asarray([1.0, -2.0, 0.5, 3.0])
    state = tx.init(x)
    value_and_grad = optax.value_and_grad_from_state(quadratic)
    step = jax.jit(lambda x, s: tx.update(value_and_grad(x, state=s)[1], s, x, value=value_and_grad(x, state=s)[0],
                                          grad=value_and_grad(x, state=s)[1], value_fn=quadratic))
    for _ in range(4):
        f0, g0 = jax.value_and_grad(quadratic)(x)
        updates, state = step(x, state)
        ls = state[1]
        direction = -g0
        a = float(ls.learning_rate)
        new = x + updates
        f1, g1 = jax.value_and_grad(quadratic)(new)
        assert int(ls.info.status) == 1 and a > 0
        assert float(f1) <= float(f0) + 1e-4 * a * float(g0 @ direction)
        assert abs(float(g1 @ direction)) <= 0.9 * abs(float(g0 @ direction))
        np.testing.assert_allclose(float(ls.value), float(f1), rtol=1e-14)
        np.testing.assert_allclose(np.asarray(ls.grad), np.asarray(g1), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(updates), a * np.asarray(direction), rtol=1e-14)
        np.testing.assert_allclose(float(ls.previous_value), float(f0), rtol=1e-14)
        x = new


def test_interpolated_first_trial():
    """scipy's ``min(1, 1.01 * 2 (f_k - f_{k-1}) / phi'(0))``, 1 where it is not positive or on the first search."""
    np.testing.assert_allclose(float(mt.interpolated_initial_step(jnp.asarray(1.0), jnp.asarray(1.5), -4.0)), 0.2525)
    assert float(mt.interpolated_initial_step(jnp.asarray(1.0), jnp.asarray(1.5), -0.5)) == 1.0
    assert float(mt.interpolated_initial_step(jnp.asarray(1.0), jnp.asarray(jnp.inf), -0.5)) == 1.0
    assert float(mt.interpolated_initial_step(jnp.asarray(2.0), jnp.asarray(1.0), -0.5)) == 1.0


def test_extra_arguments_reach_value_fn():
    def fn(x, scale):
        return scale * jnp.sum(x**2)

    tx = oso.scale_by_more_thuente_linesearch(10)
    x = jnp.asarray([1.0, 2.0])
    value, grad = jax.value_and_grad(fn)(x, 3.0)
    updates, state = tx.update(-grad, tx.init(x), x, value=value, grad=grad, value_fn=fn, scale=3.0)
    np.testing.assert_allclose(np.asarray(x + updates), 0.0, atol=1e-12)  # a quadratic: the cubic step is exact
    with pytest.raises(TypeError, match="model_fn"):
        tx.update(-grad, tx.init(x), x, value=value, grad=grad, value_fn=fn, scale=3.0, model_fn=None)


def test_bad_arguments_fail_at_construction():
    for kwargs, word in [(dict(slope_rtol=0.0), "slope_rtol"), (dict(curv_rtol=1.0), "curv_rtol"),
                         (dict(xtol=-1.0), "xtol"), (dict(initial_guess_strategy="two"), "initial_guess_strategy"),
                         (dict(max_linesearch_steps=0), "max_linesearch_steps")]:
        with pytest.raises(ValueError, match=word):
            oso.scale_by_more_thuente_linesearch(**kwargs)
    with pytest.raises(ValueError, match="linesearch"):
        oso.bfgs(linesearch="more-thuente")


def test_float32_state_and_step():
    tx = oso.lbfgs(linesearch="more_thuente")
    x = jnp.asarray([-1.2, 1.0], jnp.float32)
    state = tx.init(x)
    fn = lambda z: jnp.sum(100.0 * (z[1:] - z[:-1] ** 2) ** 2 + (1.0 - z[:-1]) ** 2)  # noqa: E731
    step = jax.jit(lambda grad, state, x: tx.update(grad, state, x, value_fn=fn))
    for _ in range(3):
        updates, state = step(jax.grad(fn)(x), state, x)
        x = optax.apply_updates(x, updates)
    assert x.dtype == jnp.float32 and float(fn(x)) < 24.2
    assert optax.tree.get(state, "value").dtype == jnp.float32


# --- BFGS and L-BFGS with it, against scipy ------------------------------------------------------------------


def run(tx, fn, x0, gtol=1e-6):
    x = jnp.asarray(x0)
    state = tx.init(x)
    value_and_grad = optax.value_and_grad_from_state(fn)

    @jax.jit
    def step(x, state):
        value, grad = value_and_grad(x, state=state)
        updates, state = tx.update(grad, state, x, value=value, grad=grad, value_fn=fn)
        return optax.apply_updates(x, updates), state, jnp.linalg.norm(grad)

    evaluations = 1
    for iteration in range(300):
        new, new_state, norm = step(x, state)
        if norm < gtol:
            return iteration, evaluations
        x, state = new, new_state
        evaluations += int(optax.tree.get(state, "num_linesearch_steps"))
    raise AssertionError("no convergence")


ROSEN10 = np.where(np.arange(10) % 2 == 0, -1.2, 1.0)


def rosenbrock(x):
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def test_lbfgs_equals_scipy_lbfgsb_on_rosenbrock():
    """L-BFGS (m = 10) with this search takes L-BFGS-B's iterations and evaluations (75 / 93 on Rosenbrock-10, 37 / 45
    on Rosenbrock-2): the same first step ``g / ||g||``, the same stp = 1 afterwards, the same dcsrch."""
    from scipy.optimize import minimize

    for x0 in (ROSEN10, np.array([-1.2, 1.0])):
        ref = minimize(rosen, x0, jac=rosen_der, method="L-BFGS-B", options=dict(gtol=1e-6, ftol=0.0, maxcor=10))
        iterations, evaluations = run(oso.lbfgs(linesearch="more_thuente"), rosenbrock, x0)
        assert (iterations, evaluations) == (ref.nit, ref.nfev)


def numpy_bfgs(x0, interpolated):
    """BFGS on ``H`` with ``H_0 = gamma I`` after the first (capped-gradient) step, as ``scale_by_quasi_newton``,
    each search scipy's ``line_search_wolfe1`` (dcsrch, xtol 1e-14): (iterations, evaluations)."""
    x, n = x0.copy(), len(x0)
    f, g, H = rosen(x), rosen_der(x), None
    f_previous, evaluations, iterations = None, 1, 0
    while np.linalg.norm(g) >= 1e-6:
        p = -min(1.0, 1.0 / np.linalg.norm(g)) * g if H is None else -H @ g
        a, fc, _, f_new, f_old, g_new = line_search_wolfe1(
            rosen, rosen_der, x, p, g, f, f_previous if interpolated else None, amin=0.0, amax=1e10
        )
        evaluations += fc
        s, y = a * p, g_new - g
        x, g, f_previous, f = x + s, g_new, f, f_new
        iterations += 1
        if H is None:
            H = (s @ y) / (y @ y) * np.eye(n)
        if s @ y > 1e-8 * np.linalg.norm(s) * np.linalg.norm(y):
            left = np.eye(n) - np.outer(s, y) / (s @ y)
            H = left @ H @ left.T + np.outer(s, s) / (s @ y)
    return iterations, evaluations


@pytest.mark.parametrize("strategy", ["one", "interpolated"])
def test_bfgs_equals_numpy_bfgs_with_scipys_search(strategy):
    tx = oso.bfgs(linesearch=oso.scale_by_more_thuente_linesearch(100, initial_guess_strategy=strategy))
    assert run(tx, rosenbrock, ROSEN10) == numpy_bfgs(ROSEN10, strategy == "interpolated")


def test_approximate_decrease_accepts_what_rounding_hides():
    """A value that rounding keeps at ``phi(0)`` while the slope says the step descends (float32 near a minimizer):
    ``dcsrch``'s test never holds, the approximate decrease accepts the first trial that meets the curvature
    condition."""

    def flat(a):
        return jnp.asarray(7.88, jnp.float64), a - 1.0, None

    exact = mt.more_thuente_search(flat, 1.0, 7.88, -1.0, max_steps=20)
    assert int(exact.status) == 6 and float(exact.step) < 1e-10  # shrinks to nothing: no step shows a decrease
    approximate = mt.more_thuente_search(flat, 1.0, 7.88, -1.0, max_steps=20, approx_dec_rtol=1e-6)
    assert int(approximate.status) == 1 and float(approximate.step) == 1.0 and int(approximate.num_steps) == 1


def test_float32_lbfgs_converges_on_wood():
    """L-BFGS with this search on Wood's function in float32 (where, on one build, ``dcsrch``'s test alone stalled
    at f = 7.88: every search at its step limit without moving the parameters)."""
    with jax.enable_x64(False):

        def wood(x):
            x1, x2, x3, x4 = x[0], x[1], x[2], x[3]
            return (100.0 * (x2 - x1**2) ** 2 + (1.0 - x1) ** 2 + 90.0 * (x4 - x3**2) ** 2 + (1.0 - x3) ** 2
                    + 10.0 * (x2 + x4 - 2.0) ** 2 + 0.1 * (x2 - x4) ** 2)

        tx = oso.lbfgs(linesearch="more_thuente")
        x = jnp.asarray([-3.0, -1.0, -3.0, -1.0], jnp.float32)
        state, value_and_grad = tx.init(x), optax.value_and_grad_from_state(wood)

        @jax.jit
        def step(x, state):
            value, grad = value_and_grad(x, state=state)
            updates, state = tx.update(grad, state, x, value=value, grad=grad, value_fn=wood)
            return optax.apply_updates(x, updates), state

        for _ in range(120):
            x, state = step(x, state)
        assert float(wood(x)) < 1e-6
