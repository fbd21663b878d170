"""The solve-to-tolerance driver (optax_second_order/driver.py): ``oso.minimize`` and ``oso.least_squares``.

Independent references: a plain Python loop written here that calls the same transformation step by step and counts
evaluations from the line search's state (the driver must take the same iterates, iterations and evaluations,
exactly), and ``scipy.optimize.minimize`` / ``scipy.optimize.least_squares`` for the solutions. float64 where the
comparisons are to rounding (scoped), float32 for one run as users run it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import least_squares as scipy_least_squares
from scipy.optimize import minimize as scipy_minimize

import optax_second_order as oso


def rosenbrock(x):
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def rosenbrock_residuals(x):
    """``rosenbrock = ||r||^2``: ``r = (10 (x_{i+1} - x_i^2), 1 - x_i)``."""
    return jnp.concatenate([10.0 * (x[1:] - x[:-1] ** 2), 1.0 - x[:-1]])


ROSENBROCK_START = np.where(np.arange(10) % 2 == 0, -1.2, 1.0)


def logistic_problem(dtype=np.float64):
    """L2-regularized binary logistic regression on 200 fixed random examples, 5 features and a bias."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)).astype(dtype)
    w_true = np.array([1.5, -2.0, 0.5, 0.0, 1.0], dtype)
    y = (x @ w_true + 0.3 * rng.normal(size=200) > 0).astype(dtype)

    def loss(params):
        logits = x @ params["w"] + params["b"]
        return jnp.mean(jax.nn.softplus(logits) - y * logits) + 0.5e-2 * jnp.sum(params["w"] ** 2)

    return loss, {"w": np.zeros(5, dtype), "b": np.zeros((), dtype)}


def reference_loop(fun, tx, params, gtol, max_iters, extra=None):
    """The straightforward loop: update, apply, read value and gradient from the line search; count."""
    extra = extra or {}
    step = jax.jit(lambda p, s, v, g: tx.update(g, s, p, value=v, grad=g, value_fn=fun, **extra))
    state = tx.init(params)
    value, grad = jax.value_and_grad(fun)(params)
    evaluations, iterations = 1, 0
    while optax.tree.norm(grad) > gtol and iterations < max_iters:
        updates, state = step(params, state, value, grad)
        params = optax.apply_updates(params, updates)
        iterations += 1
        searched = optax.tree.get(state, "num_linesearch_steps")
        if searched is None:
            value, grad = jax.value_and_grad(fun)(params)
            evaluations += 1
        else:
            value, grad = optax.tree.get(state, "value"), optax.tree.get(state, "grad")
            evaluations += int(searched)
    return params, value, iterations, evaluations


def assert_same_run(result, reference, atol=0.0):
    """The same iterations and evaluations, exactly, and the same point: exactly where both ran the same operations
    eagerly (``jax.disable_jit``), else to ``atol`` (a jitted loop body and a jitted step compile apart and round
    apart in the last bits, which 80 quasi-Newton iterations grow to up to about 1e-9 at the end)."""
    params, value, iterations, evaluations = reference
    assert (int(result.num_iters), int(result.num_evals)) == (iterations, evaluations)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=atol), result.params, params)
    np.testing.assert_allclose(result.value, value, rtol=0, atol=atol)


@pytest.mark.parametrize("make", [oso.bfgs, oso.lbfgs], ids=["bfgs", "lbfgs"])
def test_rosenbrock_equals_the_plain_loop_and_scipy(make):
    with jax.enable_x64(True):
        x0 = jnp.asarray(ROSENBROCK_START)
        result = jax.jit(lambda x: oso.minimize(rosenbrock, make(), x, gtol=1e-6))(x0)
        assert result.reason == "gtol" and result.success and float(result.grad_norm) <= 1e-6
        assert_same_run(result, reference_loop(rosenbrock, make(), x0, 1e-6, 1000), atol=1e-8)
        # scipy's L-BFGS-B (scipy's BFGS ends at the other local minimum from this start, f = 3.987)
        scipy = scipy_minimize(lambda x: float(rosenbrock(x)), ROSENBROCK_START, jac=jax.grad(rosenbrock),
                               method="L-BFGS-B", options=dict(gtol=1e-9, ftol=0.0))
        np.testing.assert_allclose(result.params, scipy.x, atol=1e-6)
        np.testing.assert_allclose(result.params, np.ones(10), atol=1e-6)


def test_logistic_regression_equals_the_plain_loop_and_scipy():
    with jax.enable_x64(True):
        loss, p0 = logistic_problem()
        result = jax.jit(lambda p: oso.minimize(loss, oso.lbfgs(), p, gtol=1e-8))(p0)
        assert result.reason == "gtol"
        assert_same_run(result, reference_loop(loss, oso.lbfgs(), p0, 1e-8, 1000), atol=1e-9)
        flat = lambda z: loss({"w": z[:5], "b": z[5]})  # noqa: E731
        scipy = scipy_minimize(lambda z: float(flat(z)), np.zeros(6), jac=jax.grad(flat), method="L-BFGS-B",
                               options=dict(gtol=1e-10, ftol=0.0))
        np.testing.assert_allclose(result.params["w"], scipy.x[:5], atol=1e-6)
        np.testing.assert_allclose(result.params["b"], scipy.x[5], atol=1e-6)


def test_float32_logistic_regression_as_users_run_it():
    with jax.enable_x64(False):
        loss, p0 = logistic_problem(np.float32)
        result = jax.jit(lambda p: oso.minimize(loss, oso.bfgs(), p, gtol=1e-5))(p0)
        assert result.success and result.value.dtype == jnp.float32 and result.params["w"].dtype == jnp.float32
    with jax.enable_x64(True):
        loss64, _ = logistic_problem()
        reference = oso.minimize(loss64, oso.bfgs(), jax.tree.map(np.float64, p0), gtol=1e-10)
    np.testing.assert_allclose(result.params["w"], reference.params["w"], atol=1e-4)


def test_least_squares_levenberg_marquardt_equals_the_plain_loop_and_scipy():
    with jax.enable_x64(True):
        x0 = jnp.asarray(ROSENBROCK_START)
        make = lambda: oso.levenberg_marquardt(solver="dense")  # noqa: E731
        result = jax.jit(lambda x: oso.least_squares(rosenbrock_residuals, make(), x, gtol=1e-8))(x0)
        assert result.reason == "gtol"
        np.testing.assert_allclose(float(result.value), 0.5 * float(jnp.sum(rosenbrock_residuals(result.params) ** 2)))
        model_fn = lambda x: rosenbrock_residuals(x)[None]  # noqa: E731
        extra = dict(model_fn=model_fn, loss=oso.losses.squared_error(jnp.zeros((1, 18))))
        value_fn = lambda x: 0.5 * jnp.sum(model_fn(x) ** 2)  # noqa: E731
        params, value, iterations, _ = reference_loop(value_fn, make(), x0, 1e-8, 1000, extra)
        assert int(result.num_iters) == iterations
        np.testing.assert_allclose(result.params, params, rtol=0, atol=1e-12)
        rejected = int(optax.tree.get(result.state, "rejected"))
        assert int(result.num_evals) == 1 + iterations - rejected  # one value-and-gradient per step that moved
        scipy = scipy_least_squares(rosenbrock_residuals, ROSENBROCK_START, jac=jax.jacobian(rosenbrock_residuals),
                                    method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15)
        np.testing.assert_allclose(result.params, scipy.x, atol=1e-7)


def test_termination_reasons():
    with jax.enable_x64(True):
        x0 = jnp.asarray(ROSENBROCK_START)
        solve = jax.jit(oso.minimize, static_argnums=(0, 1), static_argnames=("max_iters", "max_evals"))
        limited = solve(rosenbrock, oso.bfgs(), x0, max_iters=5)
        assert limited.reason == "max_iters" and int(limited.num_iters) == 5 and not limited.success
        with jax.disable_jit():  # the same operations, run eagerly by both: the same numbers, exactly
            eager = oso.minimize(rosenbrock, oso.bfgs(), x0, max_iters=3)
            assert eager.reason == "max_iters"
            assert_same_run(eager, reference_loop(rosenbrock, oso.bfgs(), x0, 1e-6, 3))
        assert_same_run(limited, reference_loop(rosenbrock, oso.bfgs(), x0, 1e-6, 5), atol=1e-12)
        budget = solve(rosenbrock, oso.bfgs(), x0, max_evals=20)
        assert budget.reason == "max_evals" and int(budget.num_evals) >= 20
        assert int(solve(rosenbrock, oso.bfgs(), x0, max_evals=int(budget.num_evals) - 1).num_iters) < int(
            budget.num_iters) + 1
        at_minimum = solve(rosenbrock, oso.bfgs(), jnp.ones(10))
        assert at_minimum.reason == "gtol" and (int(at_minimum.num_iters), int(at_minimum.num_evals)) == (0, 1)
        target = solve(rosenbrock, oso.bfgs(), x0, target_value=1.0)
        assert target.reason == "target_value" and float(target.value) <= 1.0 < float(
            oso.minimize(rosenbrock, oso.bfgs(), x0, max_iters=int(target.num_iters) - 1).value)
        loose = oso.minimize(rosenbrock, oso.bfgs(), x0, ftol=1e-3)
        assert loose.reason == "ftol" and 0 < int(loose.num_iters) < 88


def test_nonfinite_keeps_the_last_finite_iterate():
    with jax.enable_x64(True):
        # a fixed step that overshoots into overflow: f(x) = exp(x^2) from x = 3 with learning rate 1
        fun = lambda x: jnp.sum(jnp.exp(x**2))  # noqa: E731
        result = oso.minimize(fun, optax.sgd(1.0), jnp.array([3.0]))
        assert result.reason == "nonfinite" and int(result.num_iters) == 1
        np.testing.assert_array_equal(result.params, [3.0])
        assert np.isfinite(float(result.value))


def test_the_whole_solve_compiles_once():
    traces = []

    def counted(x):
        traces.append(1)
        return rosenbrock(x)

    with jax.enable_x64(True):
        solve = jax.jit(lambda x: oso.minimize(counted, oso.bfgs(), x))
        first = solve(jnp.asarray(ROSENBROCK_START))
        traced = len(traces)
        second = solve(jnp.asarray(ROSENBROCK_START) + 0.1)
        assert len(traces) == traced < 10  # traced a few times (start, loop body, line search), never per iteration
        assert int(first.num_iters) > 50 and int(second.num_iters) > 10
        jaxpr = jax.make_jaxpr(lambda x: oso.minimize(rosenbrock, oso.bfgs(), x))(jnp.asarray(ROSENBROCK_START))
        assert "while" in str(jaxpr)
