"""The quasi-Newton evaluation benchmark (bench/quasi_newton.py): its counts, against scipy and optax run here.

Independent references: ``scipy.optimize.minimize`` called directly (its ``nit`` and ``nfev``); scipy's ``rosen``
and the Moré-Garbow-Hillstrom minima (0 at ``(1, 0, 0)`` and ``(1, 1, 1, 1)``); ``optax.lbfgs``, whose
composition ``oso.lbfgs`` repeats, so both must count the same iterations and evaluations.
"""

import jax
import numpy as np
import optax
from scipy.optimize import minimize, rosen, rosen_der

import optax_second_order as oso
from optax_second_order.bench import quasi_newton


def test_test_functions_and_their_minima():
    with jax.enable_x64(True):
        x = np.array([0.3, -0.7, 1.1, 0.2])
        np.testing.assert_allclose(float(quasi_newton.rosenbrock(x)), rosen(x), rtol=1e-12)
        assert float(quasi_newton.helical_valley(np.array([1.0, 0.0, 0.0]))) == 0.0
        assert float(quasi_newton.wood(np.ones(4))) == 0.0
        # the helical valley's theta jumps by 1/2 across x1 = 0, as MGH define it
        assert float(quasi_newton.helical_valley(np.array([-1.0, 1e-9, 0.0]))) > 100.0


def test_counts_against_scipy_and_optax():
    methods = {"oso.lbfgs": oso.lbfgs, "optax.lbfgs": optax.lbfgs}
    results = quasi_newton.test_functions(methods, {"rosenbrock-2": quasi_newton.FUNCTIONS["rosenbrock-2"]})
    rows = results["rosenbrock-2"]
    scipy = minimize(rosen, np.array([-1.2, 1.0]), jac=rosen_der, method="BFGS", options=dict(gtol=1e-6, norm=2))
    assert (rows["scipy BFGS"]["iterations"], rows["scipy BFGS"]["evaluations"]) == (scipy.nit, scipy.nfev)
    ours, theirs = rows["oso.lbfgs"], rows["optax.lbfgs"]
    assert ours["converged"] and ours["grad_norm"] < 1e-6
    assert (ours["iterations"], ours["evaluations"]) == (theirs["iterations"], theirs["evaluations"])
    assert ours["evaluations"] > ours["iterations"] > 10
    assert "| oso.lbfgs |" in quasi_newton.markdown(results, None)


def test_target_mode_counts_evaluations_to_the_first_iterate_below_it():
    with jax.enable_x64(True):
        fn, x0 = quasi_newton.FUNCTIONS["rosenbrock-2"]
        full = quasi_newton.run_scipy("L-BFGS-B", fn, x0)
        reached = quasi_newton.run_scipy("L-BFGS-B", fn, x0, target=1e-3)
        assert reached["converged"] and reached["value"] <= 1e-3 and reached["evaluations"] < full["evaluations"]
        ours = quasi_newton.run_method(oso.bfgs(linesearch=None, learning_rate=1e-3), fn, x0, target=1e3)
        assert ours["converged"] and (ours["iterations"], ours["evaluations"]) == (0, 1)  # the start is below 1e3
        logistic, z0 = quasi_newton._digits_logistic(1e-3)
        np.testing.assert_allclose(float(logistic(z0)), np.log(10.0), rtol=1e-12)  # uniform over 10 classes


def test_residuals_square_to_the_test_functions():
    with jax.enable_x64(True):
        for name, (fn, x0) in quasi_newton.FUNCTIONS.items():
            x = np.asarray(x0) + 0.3
            r = quasi_newton.RESIDUALS[name](x)
            np.testing.assert_allclose(float(np.sum(np.square(r))), float(fn(x)), rtol=1e-12)


def test_optimistix_rows_count_every_evaluation_and_stop_at_the_tolerance():
    """The evaluations of an optimistix row are the calls of the function, counted by a host callback."""
    import optimistix as optx

    with jax.enable_x64(True):
        fn, x0 = quasi_newton.FUNCTIONS["rosenbrock-2"]
        calls = []

        def counted(x):
            jax.debug.callback(lambda: calls.append(1))
            return fn(x)

        row = quasi_newton.run_optimistix(optx.BFGS(rtol=1e-8, atol=1e-8), counted, x0)
        assert row["converged"] and row["grad_norm"] <= 1e-6 and row["evaluations"] > row["iterations"] > 10
        assert len(calls) == 4 * row["evaluations"]  # one evaluation per step, in each of the 4 runs (_timed)
        residuals = quasi_newton.RESIDUALS["rosenbrock-2"]
        lm = quasi_newton.run_optimistix(optx.LevenbergMarquardt(rtol=1e-8, atol=1e-8), residuals, x0, gtol=5e-7)
        ours = quasi_newton.run_method(oso.levenberg_marquardt(solver="dense"), fn, x0, gtol=5e-7, residuals=residuals)
        assert lm["converged"] and ours["converged"] and abs(ours["value"]) < 1e-12 and abs(lm["value"]) < 1e-12
