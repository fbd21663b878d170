"""Quasi-Newton methods on deterministic problems: ``python -m optax_second_order.bench quasi-newton``.

The runner counts steps; a line-search method is judged by its value-and-gradient evaluations. This module
runs each method to a gradient-norm tolerance and counts both, beside scipy and ``optax.lbfgs``:

* test functions, float64, to ``||g||_2 < 1e-6``: the chained Rosenbrock function (scipy's ``rosen``) for ``n = 2``
  (Moré, Garbow & Hillstrom's #1) and ``10`` from ``(-1.2, 1, ...)``, and, from Moré, Garbow & Hillstrom (1981),
  the helical valley (#7, ``n = 3``, from ``(-1, 0, 0)``) and Wood's function (#14, ``n = 4``, from
  ``(-3, -1, -3, -1)``). (MGH's #21, the *extended* Rosenbrock function, is another function for ``n > 2``:
  ``n / 2`` decoupled pairs ``100 (x_{2i} - x_{2i-1}^2)^2 + (1 - x_{2i-1})^2``.);
* full-batch L2-regularized multinomial logistic regression on scikit-learn's digits (650 parameters):
  evaluations until the loss is within ``1e-8`` of the final loss of scipy's L-BFGS-B run to convergence.

This library's methods and ``optax.lbfgs`` take ``value`` and ``grad`` from ``optax.value_and_grad_from_state``
(the line search's last evaluation), so an iteration costs the line search's evaluations; the count is
``1 + sum of num_linesearch_steps``. scipy's counts are its ``nfev`` (each evaluation returns both). Stopping:
ours and optax's when the gradient at the current iterate is below the tolerance (the iteration count is the
number of steps taken); scipy's BFGS with ``gtol=1e-6, norm=2``; L-BFGS-B with ``gtol=1e-6`` (its projected
gradient in the max norm) and ``ftol=0``; the tables show the final ``||g||_2`` of each.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_second_order as oso

__all__ = ["FUNCTIONS", "RESIDUALS", "METHODS", "LEAST_SQUARES", "optimistix_solvers", "run_method", "run_optimistix", "run_scipy", "test_functions", "logistic_regression", "main"]

GTOL = 1e-6


# --- the test functions (scipy's Rosenbrock; Moré, Garbow & Hillstrom 1981) -----------------------------


def rosenbrock(x):
    """The chained Rosenbrock function ``sum_{i<n} 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2``, scipy's ``rosen``.

    For ``n = 2`` it is Moré, Garbow & Hillstrom's #1 (Rosenbrock's function). For ``n > 2`` it is not their #21,
    the extended Rosenbrock function, whose ``n / 2`` pairs ``(x_{2i-1}, x_{2i})`` do not interact.
    """
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def helical_valley(x):
    """MGH #7: ``100 (x3 - 10 theta)^2 + 100 (r - 1)^2 + x3^2``, ``r = |(x1, x2)|``, ``theta = atan(x2/x1)/2pi``
    (``+ 1/2`` for ``x1 < 0``); minimum 0 at ``(1, 0, 0)``."""
    theta = jnp.arctan(x[1] / x[0]) / (2 * jnp.pi) + jnp.where(x[0] < 0, 0.5, 0.0)
    return 100.0 * (x[2] - 10.0 * theta) ** 2 + 100.0 * (jnp.hypot(x[0], x[1]) - 1.0) ** 2 + x[2] ** 2


def wood(x):
    """MGH #14 (Wood's function); minimum 0 at ``(1, 1, 1, 1)``."""
    x1, x2, x3, x4 = x
    return (
        100.0 * (x2 - x1**2) ** 2 + (1.0 - x1) ** 2 + 90.0 * (x4 - x3**2) ** 2 + (1.0 - x3) ** 2
        + 10.0 * (x2 + x4 - 2.0) ** 2 + 0.1 * (x2 - x4) ** 2
    )


FUNCTIONS: dict[str, tuple[Callable, np.ndarray]] = {
    "rosenbrock-2": (rosenbrock, np.array([-1.2, 1.0])),
    "rosenbrock-10": (rosenbrock, np.where(np.arange(10) % 2 == 0, -1.2, 1.0)),
    "helical-valley": (helical_valley, np.array([-1.0, 0.0, 0.0])),
    "wood": (wood, np.array([-3.0, -1.0, -3.0, -1.0])),
}
"""Name -> (function of a flat float64 vector, starting point)."""


def rosenbrock_residuals(x):
    """``r = (10 (x_{i+1} - x_i^2), 1 - x_i)_{i<n}``: :func:`rosenbrock` is ``||r||^2`` (MGH #1's residuals)."""
    return jnp.concatenate([10.0 * (x[1:] - x[:-1] ** 2), 1.0 - x[:-1]])


def helical_valley_residuals(x):
    """MGH #7's residuals ``(10 (x3 - 10 theta), 10 (r - 1), x3)``: :func:`helical_valley` is ``||r||^2``."""
    theta = jnp.arctan(x[1] / x[0]) / (2 * jnp.pi) + jnp.where(x[0] < 0, 0.5, 0.0)
    return jnp.stack([10.0 * (x[2] - 10.0 * theta), 10.0 * (jnp.hypot(x[0], x[1]) - 1.0), x[2]])


def wood_residuals(x):
    """MGH #14's six residuals: :func:`wood` is ``||r||^2``."""
    x1, x2, x3, x4 = x
    return jnp.stack([10.0 * (x2 - x1**2), 1.0 - x1, jnp.sqrt(90.0) * (x4 - x3**2), 1.0 - x3,
                      jnp.sqrt(10.0) * (x2 + x4 - 2.0), (x2 - x4) / jnp.sqrt(10.0)])


RESIDUALS: dict[str, Callable] = {
    "rosenbrock-2": rosenbrock_residuals,
    "rosenbrock-10": rosenbrock_residuals,
    "helical-valley": helical_valley_residuals,
    "wood": wood_residuals,
}
"""Name -> the residuals ``r`` of :data:`FUNCTIONS`' function (``f = ||r||^2``), for the least-squares solvers, which
minimize ``1/2 ||r||^2 = f / 2``: they stop at ``||grad (f / 2)|| <= GTOL / 2``, the same points."""

def _more_thuente(strategy: str) -> optax.GradientTransformation:
    return oso.scale_by_more_thuente_linesearch(20, initial_guess_strategy=strategy)


METHODS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "oso.bfgs": oso.bfgs,
    "oso.bfgs(zoom)": lambda: oso.bfgs(linesearch="zoom"),
    "oso.bfgs(more_thuente, interpolated)": lambda: oso.bfgs(linesearch=_more_thuente("interpolated")),
    "oso.bfgs(cholesky)": lambda: oso.bfgs(cholesky=True),
    "oso.sr1": oso.sr1,
    "oso.dfp": oso.dfp,
    "oso.lbfgs": oso.lbfgs,
    "oso.lbfgs(more_thuente)": lambda: oso.lbfgs(linesearch="more_thuente"),
    "oso.lbfgs(more_thuente, interpolated)": lambda: oso.lbfgs(linesearch=_more_thuente("interpolated")),
    "optax.lbfgs": optax.lbfgs,
}
"""This library's line-search aliases with their defaults (BFGS: Moré-Thuente; SR1, DFP, L-BFGS: zoom), the other
line search for BFGS and L-BFGS (zoom; Moré-Thuente from 1 and from scipy BFGS's interpolated first trial), and
``optax.lbfgs`` (memory 10, zoom)."""


def optimistix_solvers() -> dict[str, tuple[Any, bool]]:
    """optimistix's solvers beside scipy (Rader, Lyons & Kidger 2024), name -> (solver, on the residuals):
    ``optx.BFGS`` (its defaults: a backtracking Armijo search) on ``f``, ``optx.LevenbergMarquardt`` and
    ``optx.Dogleg`` on the residuals (:data:`RESIDUALS`); each stepped by :func:`run_optimistix`."""
    import optimistix as optx

    tol = dict(rtol=1e-8, atol=1e-8)  # unused: run_optimistix stops on the gradient norm
    return {"optx.BFGS": (optx.BFGS(**tol), False), "optx.LevenbergMarquardt": (optx.LevenbergMarquardt(**tol), True),
            "optx.Dogleg": (optx.Dogleg(**tol), True)}

LEAST_SQUARES: dict[str, Callable[[], optax.GradientTransformation]] = {
    "oso.levenberg_marquardt": lambda: oso.levenberg_marquardt(solver="dense"),
}
"""This library's least-squares rows: ``oso.least_squares`` on the residuals with a dense solve (the problems have
at most 10 parameters)."""


# --- runs ---------------------------------------------------------------------------------------------------


def _timed(solve: Callable, x0, repeats: int = 3) -> tuple[Any, float]:
    """``solve(x0)`` compiled by a first call, then timed: the least seconds of ``repeats`` calls (to the result)."""
    out, best = jax.block_until_ready(solve(x0)), float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(solve(x0))
        best = min(best, time.perf_counter() - start)
    return out, best


def run_method(tx: optax.GradientTransformation, fn: Callable, x0: np.ndarray, gtol: float = GTOL,
               target: float | None = None, max_iterations: int = 2000, residuals: Callable | None = None) -> dict:
    """Iterate ``tx`` from ``x0`` until ``||g||_2 <= gtol`` (or ``fn <= target``) with :func:`oso.minimize` (with
    ``residuals``, :func:`oso.least_squares` on them, ``fn`` then unused): iterations, evaluations and seconds.

    The counts are the driver's (``num_evals``: 1 + the line searches' ``num_linesearch_steps``, or one per
    iteration that moved without a line search); on ``residuals``, plus one evaluation of ``r`` per iteration at the
    trial point (Levenberg-Marquardt's reduction ratio, outside the driver's count). ``seconds``: the compiled solve
    (:func:`_timed`).
    """
    limits = dict(gtol=0.0 if target is not None else gtol, target_value=target, max_iters=max_iterations)
    if residuals is None:
        solve = jax.jit(lambda x: oso.minimize(fn, tx, x, **limits))
    else:
        solve = jax.jit(lambda x: oso.least_squares(residuals, tx, x, **limits))
    result, seconds = _timed(solve, jnp.asarray(x0, jnp.float64))
    evaluations = int(result.num_evals) + (0 if residuals is None else int(result.num_iters))
    return dict(iterations=int(result.num_iters), evaluations=evaluations, value=float(result.value),
                grad_norm=float(result.grad_norm), converged=bool(result.success), seconds=seconds)


def run_optimistix(solver, fn: Callable, x0: np.ndarray, gtol: float = GTOL, target: float | None = None,
                   max_steps: int = 5000) -> dict:
    """An optimistix solver stepped with its own ``init`` / ``step`` on one ``jax.lax.while_loop`` until the gradient
    at its last accepted point is ``<= gtol`` (or its value ``<= target``): the stopping rule of the other rows
    (``optx.minimise`` stops on its Cauchy test of ``rtol`` / ``atol`` on the changes of ``y`` and ``f`` instead).

    ``fn`` is ``x -> f`` for a minimiser, ``x -> r`` for a least-squares solver (``f = 1/2 ||r||^2``). Every
    optimistix step evaluates ``fn`` once (with its linearization) at a trial point, line-search trials included:
    ``evaluations`` is the number of steps, ``iterations`` the accepted steps after the first (which accepts ``x0``).
    """
    import equinox as eqx
    import optimistix as optx

    x0 = jnp.asarray(x0, jnp.float64)
    f = lambda y, args: (fn(y), None)  # noqa: E731  (optx.minimise's wrapping: the value and no aux)
    least_squares = isinstance(solver, optx.AbstractLeastSquaresSolver)

    def solve(y0):
        out, aux = jax.eval_shape(lambda y: f(y, None), y0)
        # the state holds non-arrays (a linear operator's jaxpr): the loop carries its arrays, as optx.minimise does
        dynamic, static = eqx.partition(solver.init(f, y0, None, {}, out, aux, frozenset()), eqx.is_array)

        def info(state):
            grad = state.f_info.compute_grad() if least_squares else state.f_info.grad
            return state.f_info.as_min(), jnp.linalg.norm(grad)

        def running(carry):
            _, dynamic, steps = carry
            state = eqx.combine(dynamic, static)
            value, grad_norm = info(state)
            done = (grad_norm <= gtol) if target is None else (value <= target)
            return (state.first_step | ~done) & (steps < max_steps)

        def step(carry):
            y, dynamic, steps = carry
            y, state, _ = solver.step(f, y, None, {}, eqx.combine(dynamic, static), frozenset())
            return y, eqx.filter(state, eqx.is_array), steps + 1

        _, dynamic, steps = jax.lax.while_loop(running, step, (y0, dynamic, jnp.asarray(0)))
        state = eqx.combine(dynamic, static)
        return (steps, state.num_accepted_steps - 1, *info(state))

    (steps, accepted, value, grad_norm), seconds = _timed(jax.jit(solve), x0)
    converged = grad_norm <= gtol if target is None else value <= target
    return dict(iterations=int(accepted), evaluations=int(steps), value=float(value), grad_norm=float(grad_norm),
                converged=bool(converged), seconds=seconds)


def run_scipy(method: str, fn: Callable, x0: np.ndarray, gtol: float = GTOL, target: float | None = None) -> dict:
    """scipy's BFGS or L-BFGS-B; with ``target``, the evaluations when an iterate first reaches it."""
    from scipy.optimize import minimize

    value_and_grad = jax.jit(jax.value_and_grad(fn))
    calls, reached = [0], []

    def fun(x):
        calls[0] += 1
        value, grad = value_and_grad(jnp.asarray(x))
        return float(value), np.asarray(grad)

    def callback(intermediate_result):
        if target is not None and not reached and intermediate_result.fun <= target:
            reached.append((calls[0], len(reached_iterations), float(intermediate_result.fun)))
        reached_iterations.append(1)

    reached_iterations: list = []
    jax.block_until_ready(value_and_grad(jnp.asarray(x0, jnp.float64)))  # compiled before the clock starts
    options = dict(gtol=gtol, norm=2) if method == "BFGS" else dict(gtol=gtol, ftol=0.0, maxiter=10_000)
    start = time.perf_counter()
    result = minimize(fun, np.asarray(x0, np.float64), jac=True, method=method, options=options, callback=callback)
    out = dict(iterations=int(result.nit), evaluations=int(result.nfev), value=float(result.fun),
               grad_norm=float(np.linalg.norm(result.jac)), converged=bool(result.success),
               seconds=time.perf_counter() - start)
    if target is not None:
        out["converged"] = bool(reached)
        if reached:
            out["evaluations"], out["iterations"], out["value"] = reached[0][0], reached[0][1] + 1, reached[0][2]
    return out


def test_functions(methods: dict | None = None, functions: dict | None = None, least_squares: dict | None = None,
                   optimistix: bool = True) -> dict:
    """Every method on every test function (:data:`FUNCTIONS`), the least-squares ones (:data:`LEAST_SQUARES`) and
    optimistix's (:func:`optimistix_solvers`) on its residuals (:data:`RESIDUALS`): ``{function: {method: record}}``.
    """
    methods = METHODS if methods is None else methods
    functions = FUNCTIONS if functions is None else functions
    least_squares = LEAST_SQUARES if least_squares is None else least_squares
    peers = optimistix_solvers() if optimistix else {}
    results = {}
    with jax.enable_x64(True):
        for name, (fn, x0) in functions.items():
            rows = {"scipy BFGS": run_scipy("BFGS", fn, x0), "scipy L-BFGS-B": run_scipy("L-BFGS-B", fn, x0)}
            for method, make in methods.items():
                rows[method] = run_method(make(), fn, x0)
            for method, make in least_squares.items():
                rows[method] = _on_f(run_method(make(), fn, x0, gtol=GTOL / 2, residuals=RESIDUALS[name]))
            for method, (solver, on_residuals) in peers.items():
                rows[method] = (_on_f(run_optimistix(solver, RESIDUALS[name], x0, gtol=GTOL / 2)) if on_residuals
                                else run_optimistix(solver, fn, x0))
            for method, row in rows.items():
                _progress(name, method, row)
            results[name] = rows
    return results


def _on_f(record: dict) -> dict:
    """A least-squares record (of ``1/2 ||r||^2``) in terms of ``f = ||r||^2``: value and gradient norm doubled."""
    return {**record, "value": 2.0 * record["value"], "grad_norm": 2.0 * record["grad_norm"]}


def _digits_logistic(l2: float):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.data / 16.0
    labels = data.target
    onehot = np.eye(10)[labels]

    def fn(z):
        w, b = z[:640].reshape(64, 10), z[640:]
        logits = x @ w + b
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.sum(onehot * logits, axis=1)) + 0.5 * l2 * jnp.sum(w**2)

    return fn, np.zeros(650)


def logistic_regression(methods: dict | None = None, l2: float = 1e-3, tolerance: float = 1e-8,
                        optimistix: bool = True) -> dict:
    """Full-batch L2-regularized softmax regression on digits: evaluations to scipy L-BFGS-B's final loss + tol."""
    methods = METHODS if methods is None else {k: v for k, v in methods.items()}
    with jax.enable_x64(True):
        fn, x0 = _digits_logistic(l2)
        final = run_scipy("L-BFGS-B", fn, x0, gtol=1e-12)
        target = final["value"] + tolerance
        rows = {"scipy L-BFGS-B (to convergence)": final}
        rows["scipy L-BFGS-B"] = run_scipy("L-BFGS-B", fn, x0, gtol=1e-12, target=target)
        rows["scipy BFGS"] = run_scipy("BFGS", fn, x0, gtol=1e-12, target=target)
        for method, make in methods.items():
            if method == "oso.dfp":
                continue  # DFP does not reach the target in the budget (see the Rosenbrock rows)
            rows[method] = run_method(make(), fn, x0, target=target, max_iterations=1000)
            _progress("digits logistic regression", method, rows[method])
        if optimistix:
            rows["optx.BFGS"] = run_optimistix(optimistix_solvers()["optx.BFGS"][0], fn, x0, target=target)
    return {"target": target, "rows": rows}


def _progress(problem: str, method: str, record: dict) -> None:
    print(f"{problem}: {method}: {record['iterations']} iterations, {record['evaluations']} evaluations", flush=True)


def markdown(functions: dict, logistic: dict | None) -> str:
    lines = ["# Quasi-Newton: iterations / value-and-gradient evaluations", ""]
    for name, rows in functions.items():
        lines += [f"## {name} (to ||g|| <= {GTOL:g})", "",
                  "| method | iterations | evaluations | ms | final f | final ||g|| | converged |",
                  "|---|---:|---:|---:|---:|---:|:-:|"]
        for method, r in rows.items():
            lines.append(f"| {method} | {r['iterations']} | {r['evaluations']} | {1e3 * r['seconds']:.1f} | "
                         f"{r['value']:.3g} | {r['grad_norm']:.1e} | {'yes' if r['converged'] else 'no'} |")
        lines.append("")
    if logistic is not None:
        lines += [f"## digits logistic regression (to loss <= {logistic['target']:.10f})", "",
                  "| method | iterations | evaluations | ms | loss | reached |", "|---|---:|---:|---:|---:|:-:|"]
        for method, r in logistic["rows"].items():
            lines.append(f"| {method} | {r['iterations']} | {r['evaluations']} | {1e3 * r['seconds']:.1f} | "
                         f"{r['value']:.10f} | "
                         f"{'yes' if r['converged'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)


def main(out: str = "bench_results", logistic: bool = True) -> str:
    """Runs both benchmarks, writes ``quasi_newton.json`` and ``quasi_newton.md`` under ``out``, prints the table."""
    functions = test_functions()
    regression = logistic_regression() if logistic else None
    table = markdown(functions, regression)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "quasi_newton.json"), "w") as f:
        json.dump({"functions": functions, "logistic_regression": regression}, f, indent=1)
    path = os.path.join(out, "quasi_newton.md")
    with open(path, "w") as f:
        f.write(table)
    print(table)
    print(f"wrote {path}")
    return path
