"""``bench newton-rosenbrock`` and ``bench newton-cost``: the solve-based family beside scipy, and what a CG step costs.

``newton-rosenbrock`` minimizes the Rosenbrock function (``rosenbrock-2`` and ``rosenbrock-10``, float64, from
``(-1.2, 1, -1.2, 1, ...)``) to ``||g|| < 1e-6`` with this library's Newton methods and with ``scipy.optimize``'s
``Newton-CG`` and ``trust-ncg``, and counts per method:

* ``iterations``: outer iterations (steps, accepted or rejected);
* ``f``: loss evaluations. scipy: its ``nfev``. Here: two per step with a reduction-ratio test (``h(theta)`` and
  ``h(theta + delta)``), none with fixed damping;
* ``g``: gradient evaluations, one per step (the Hessian-vector operator is ``jax.linearize`` of the gradient, which
  evaluates it once more, in the same compiled step);
* ``products``: curvature-vector products (``state.products``: CG iterations plus one for a warm start's initial
  residual; for the dense solvers the ``n`` columns of the matrix). scipy: its ``nhev`` (calls of ``hessp``).

scipy's Newton-CG stops on a step-size tolerance, not on the gradient, so its run is stopped from its callback when
``||g|| < 1e-6`` (the counts are taken at that point); trust-ncg gets ``gtol=1e-6``.

``newton-grid`` runs the registry's Newton-family methods on ``digits-mlp`` for every learning rate of their grid and
every damping in ``1e-4, 1e-2, 1`` (the initial damping of the adaptive rules, with the aliases' floor ``1e-8``) and reports each run's final loss,
non-finite events (``state.nonfinite``), rejected steps and CG iterations: the robustness the step-count table does not
show.

``newton-kl`` takes one step of ``oso.natural_gradient`` on ``digits-mlp`` (float32, batch 128) from five
initializations and batches (seeds 0-4) and reports the realized KL divergence between the batch's predictive
distributions before and after the step, in float64 from the outputs, as a multiple of ``kl_budget`` (``1e-3``,
``1e-2`` and ``1e-1``), for the default (exact Fisher, realized-KL correction) beside the second-order scale alone with
the exact and the sampled Fisher, with CG's iterations and the search's forward passes. (The step's time is ``bench ab``'s to measure: round-robin
against another revision, so the load of a shared machine cancels.)

``newton-cost`` times one CG iteration on ``digits-autoencoder`` (batch 512) as a ratio to one gradient: CG on the
linearized GGN operator with ``tol=0`` for ``k`` and ``k + 20`` iterations, the difference divided by 20 (so the
linearization and the loop's setup cancel), against the median of ``jax.grad``; and likewise one product of the
linearized GGN and Hessian operators in a loop (the Hessian is indefinite: CG would stop at negative curvature).
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_second_order as oso
from optax_second_order.bench.tasks import digits_autoencoder, rosenbrock

__all__ = [
    "NEWTON_METHODS",
    "minimize",
    "scipy_minimize",
    "rosenbrock_table",
    "cg_iteration_cost",
    "GRID_METHODS",
    "nonfinite_grid",
    "KL_METHODS",
    "natural_gradient_kl",
    "main",
]

NEWTON_METHODS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "oso.newton_cg (Levenberg-Marquardt)": lambda: oso.newton_cg(1.0),
    "oso.newton_cg (trust region)": lambda: oso.newton_cg(1.0, damping_rule="trust_region"),
    "oso.newton (dense, Levenberg-Marquardt)": lambda: oso.newton(1.0, 1.0, damping_rule="levenberg_marquardt"),
    "oso.newton (dense, saddle-free, LM)": lambda: oso.newton(
        1.0, 1.0, saddle_free=True, damping_rule="levenberg_marquardt"
    ),
    "oso.levenberg_marquardt (GGN + CG)": lambda: oso.levenberg_marquardt(1.0),
}
"""The library's methods on Rosenbrock, each with learning rate 1 (they choose their steps)."""

_VALUE_EVALUATIONS = {  # loss evaluations per step
    "oso.newton_cg (Levenberg-Marquardt)": 2,
    "oso.newton_cg (trust region)": 2,
    "oso.newton (dense, Levenberg-Marquardt)": 2,
    "oso.newton (dense, saddle-free, LM)": 2,
    "oso.levenberg_marquardt (GGN + CG)": 2,
}


def minimize(tx: optax.GradientTransformation, n: int, gtol: float = 1e-6, max_iterations: int = 2000) -> dict:
    """Runs ``tx`` on Rosenbrock in ``n`` dimensions until ``||g|| < gtol``: iterations and the state's counters."""
    task = rosenbrock(n)
    with jax.enable_x64(True):
        params = task.init(jax.random.key(0))
        loss = task.loss(jnp.asarray(task.eval_batch[1]))

        def model_fn(p):
            return task.apply(p, None)

        def value_fn(p):
            return loss(model_fn(p))

        @jax.jit
        def step(params, state):
            grads = jax.grad(value_fn)(params)
            updates, state = tx.update(grads, state, params, value_fn=value_fn, model_fn=model_fn, loss=loss)
            return optax.apply_updates(params, updates), state

        gradient_norm = jax.jit(lambda p: jnp.linalg.norm(jax.grad(value_fn)(p)["x"]))
        state = tx.init(params)
        iterations = 0
        while float(gradient_norm(params)) >= gtol and iterations < max_iterations:
            params, state = step(params, state)
            iterations += 1
        newton_state = state[0]
        return {
            "iterations": iterations,
            "products": int(newton_state.products),
            "rejected": int(newton_state.rejected),
            "negative_curvature": int(newton_state.negative_curvature),
            "nonfinite": int(newton_state.nonfinite),
            "converged": bool(float(gradient_norm(params)) < gtol),
            "loss": float(value_fn(params)),
        }


class _Counted:
    """scipy's Rosenbrock function, gradient and Hessian-vector product, counting calls."""

    def __init__(self):
        from scipy.optimize import rosen, rosen_der, rosen_hess_prod

        self.counts = {"f": 0, "g": 0, "products": 0}
        self._f, self._g, self._hp = rosen, rosen_der, rosen_hess_prod

    def f(self, x):
        self.counts["f"] += 1
        return self._f(x)

    def g(self, x):
        self.counts["g"] += 1
        return self._g(x)

    def hessp(self, x, p):
        self.counts["products"] += 1
        return self._hp(x, p)


def scipy_minimize(method: str, n: int, gtol: float = 1e-6) -> dict:
    """``scipy.optimize.minimize`` with ``method`` from the same start, stopped at ``||g|| < gtol``."""
    from scipy.optimize import minimize as scipy_minimize_, rosen_der

    counted = _Counted()
    start = np.where(np.arange(n) % 2 == 0, -1.2, 1.0)
    record = {"iterations": 0}

    def callback(intermediate_result):
        record["iterations"] += 1
        if np.linalg.norm(rosen_der(intermediate_result.x)) < gtol:
            record.update(counted.counts)
            raise StopIteration

    options = {"gtol": gtol} if method == "trust-ncg" else {"xtol": 1e-14}
    result = scipy_minimize_(counted.f, start, method=method, jac=counted.g, hessp=counted.hessp, callback=callback,
                             options={**options, "maxiter": 2000})
    if "f" not in record:
        record.update(counted.counts)
    record["converged"] = bool(np.linalg.norm(rosen_der(result.x)) < gtol)
    record["loss"] = float(result.fun)
    return record


def rosenbrock_table(dimensions=(2, 10), gtol: float = 1e-6) -> str:
    """The markdown table of every method on Rosenbrock in each dimension."""
    lines = ["| n | method | iterations | f | g | products | rejected | neg. curvature | converged |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n in dimensions:
        for method in ("Newton-CG", "trust-ncg"):
            r = scipy_minimize(method, n, gtol)
            lines.append(f"| {n} | scipy {method} | {r['iterations']} | {r['f']} | {r['g']} | {r['products']} | | | "
                         f"{r['converged']} |")
        for name, make in NEWTON_METHODS.items():
            r = minimize(make(), n, gtol)
            f = _VALUE_EVALUATIONS[name] * r["iterations"]
            lines.append(f"| {n} | {name} | {r['iterations']} | {f} | {r['iterations']} | {r['products']} | "
                         f"{r['rejected']} | {r['negative_curvature']} | {r['converged']} |")
    return "\n".join(lines)


def _median_time(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def cg_iteration_cost(repeats: int = 5, iterations: int = 5, extra: int = 20, seed: int = 0) -> dict[str, float]:
    """Seconds per CG iteration (GGN) and per product in a loop (GGN and Hessian) on ``digits-autoencoder``, and their
    ratios to ``grad``.

    CG runs with ``tol=0`` for ``iterations`` and ``iterations + extra`` iterations on ``G + 1e-3 I``; the products
    run ``v <- C v / ||C v||`` as many times (the Hessian is indefinite, so CG would stop at negative curvature).
    The difference of the two times divided by ``extra`` cancels the linearization and the setup.
    """
    task = digits_autoencoder()
    params = task.init(jax.random.key(seed))
    inputs, targets = next(task.batches(seed))
    loss = task.loss(targets)

    def model_fn(p):
        return task.apply(p, inputs)

    def value_fn(p):
        return loss(model_fn(p))

    grads = jax.grad(value_fn)(params)
    out = {"grad_s": _median_time(jax.jit(jax.grad(value_fn)), (params,), repeats)}
    operators = {
        "gnvp (GGN)": lambda p: oso.gnvp_operator(model_fn, loss, p),
        "hvp (Hessian)": lambda p: oso.hvp_operator(value_fn, p),
    }

    def cg(p, g, k):
        matvec = operators["gnvp (GGN)"](p)
        damped = lambda v: jax.tree.map(lambda a, b: a + 1e-3 * b, matvec(v), v)  # noqa: E731
        return oso.conjugate_gradient(damped, g, tol=0.0, maxiter=k)[0]

    def products(p, g, k, name):
        matvec = operators[name](p)

        def body(_, v):
            w = matvec(v)
            return jax.tree.map(lambda x: x / optax.tree_utils.tree_norm(w), w)

        return jax.lax.fori_loop(0, k, body, g)

    def per_iteration(fn):
        short = _median_time(jax.jit(lambda p, g: fn(p, g, iterations)), (params, grads), repeats)
        long = _median_time(jax.jit(lambda p, g: fn(p, g, iterations + extra)), (params, grads), repeats)
        return max(long - short, 0.0) / extra

    timed = {"CG iteration, gnvp (GGN)": cg}
    for name in operators:
        timed[f"product in a loop, {name}"] = lambda p, g, k, name=name: products(p, g, k, name)
    for label, fn in timed.items():
        seconds = per_iteration(fn)
        out[f"{label}_s"] = seconds
        out[f"{label}_ratio"] = seconds / out["grad_s"]
    return out


GRID_METHODS: dict[str, Callable[[float, float], optax.GradientTransformation]] = {
    "newton-cg": lambda lr, damping: oso.newton_cg(lr, damping, maxiter=20),
    "levenberg-marquardt": lambda lr, damping: oso.levenberg_marquardt(lr, damping, maxiter=20),
    "hessian-free": lambda lr, damping: oso.hessian_free(
        lr, damping, maxiter=50, preconditioner="empirical_fisher_estimate"
    ),
    "natural-gradient": lambda lr, damping: oso.natural_gradient(lr, 1e-2, damping, maxiter=20),
}
"""The ``bench`` registry's Newton-family entries as functions of the learning rate and the (initial) damping, with the
aliases' ``min_damping=1e-8`` (the registry's LM entries keep 0.1): the most aggressive damping for the non-finite
count."""


def nonfinite_grid(task_name: str = "digits-mlp", steps: int | None = None, dampings=(1e-4, 1e-2, 1.0),
                   learning_rates=(1.0, 0.3, 0.1)) -> list[dict]:
    """Every method of :data:`GRID_METHODS` x learning rate x damping under the runner's step (seed 0)."""
    from optax_second_order.bench.runner import make_step
    from optax_second_order.bench.tasks import get_task

    task = get_task(task_name)
    rows = []
    with jax.enable_x64(task.x64):
        evaluate = jax.jit(task.batch_loss)
        for name, make in GRID_METHODS.items():
            for lr in learning_rates:
                for damping in dampings:
                    tx = make(lr, damping)
                    step = make_step(task, tx)
                    params = task.init(jax.random.key(0))
                    state = jax.tree.map(jnp.copy, tx.init(params))
                    batches = task.batches(0)
                    iterations = 0
                    for _ in range(steps or task.steps):
                        params, state, _ = step(params, state, next(batches))
                        iterations += int(state[0].cg_iterations)
                    inner = state[0]
                    rows.append({
                        "method": name, "learning_rate": lr, "damping": damping,
                        "final_loss": float(evaluate(params, task.eval_batch)),
                        "nonfinite": int(inner.nonfinite), "rejected": int(inner.rejected),
                        "cg_iterations": iterations,
                    })
    return rows


KL_METHODS: dict[str, dict] = {
    "default (exact Fisher, realized-KL correction)": {},
    "exact Fisher, second order only": {"kl_rtol": None},
    "sampled Fisher (1 sample), second order only: the former default": {"fisher": "true", "kl_rtol": None},
    "sampled Fisher (1 sample), realized-KL correction": {"fisher": "true"},
    "sampled Fisher (16 samples), second order only": {"fisher": "true", "num_samples": 16, "kl_rtol": None},
}
"""``oso.natural_gradient`` keyword arguments of the ``newton-kl`` rows (beside ``kl_budget``)."""


def natural_gradient_kl(budgets=(1e-3, 1e-2, 1e-1), seeds=range(5)) -> list[dict]:
    """Every :data:`KL_METHODS` row x budget: the realized KL of one step over ``kl_budget`` per seed (init and batch
    of ``digits-mlp``), CG's iterations and the realized-KL search's ``model_fn`` evaluations per seed."""
    from optax_second_order.bench.tasks import get_task

    task = get_task("digits-mlp")
    problems = []
    for seed in seeds:
        inputs, targets = next(task.batches(seed))
        problems.append((task.init(jax.random.key(seed)), inputs, targets))

    def kl64(y, y_new):
        y, y_new = np.asarray(y, np.float64), np.asarray(y_new, np.float64)
        log_p = y - np.log(np.sum(np.exp(y - y.max(-1, keepdims=True)), -1, keepdims=True)) - y.max(-1, keepdims=True)
        log_q = y_new - np.log(np.sum(np.exp(y_new - y_new.max(-1, keepdims=True)), -1, keepdims=True)) \
            - y_new.max(-1, keepdims=True)
        return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), -1)))

    rows = []
    for budget in budgets:
        for name, kwargs in KL_METHODS.items():
            tx = oso.natural_gradient(kl_budget=budget, **kwargs)

            @jax.jit
            def step(params, inputs, targets, tx=tx):
                loss = task.loss(targets)
                model_fn = lambda p: task.apply(p, inputs)  # noqa: E731
                grads = jax.grad(lambda p: loss(model_fn(p)))(params)
                updates, state = tx.update(grads, tx.init(params), params, model_fn=model_fn, loss=loss)
                return optax.apply_updates(params, updates), state[0].cg_iterations, state[0].kl_evaluations

            ratios, iterations, evaluations = [], [], []
            for params, inputs, targets in problems:
                moved, cg_iterations, kl_evaluations = step(params, inputs, targets)
                ratios.append(kl64(task.apply(params, inputs), task.apply(moved, inputs)) / budget)
                iterations.append(int(cg_iterations))
                evaluations.append(int(kl_evaluations))
            rows.append({"budget": budget, "method": name, "ratios": ratios, "cg_iterations": iterations,
                         "kl_evaluations": evaluations})
    return rows


def main(command: str, repeats: int = 5) -> str:
    """Prints and returns the table of ``command`` (``newton-rosenbrock``, ``newton-grid`` or ``newton-cost``)."""
    if command == "newton-rosenbrock":
        text = rosenbrock_table()
    elif command == "newton-grid":
        lines = ["digits-mlp, 100 steps, seed 0: every learning rate x (initial) damping", "",
                 "| method | lr | damping | final loss | non-finite | rejected | CG iterations |",
                 "|---|---|---|---|---|---|---|"]
        for r in nonfinite_grid():
            lines.append(f"| {r['method']} | {r['learning_rate']:g} | {r['damping']:g} | {r['final_loss']:.4g} | "
                         f"{r['nonfinite']} | {r['rejected']} | {r['cg_iterations']} |")
        text = "\n".join(lines)
    elif command == "newton-kl":
        title = "digits-mlp (float32, batch 128), one oso.natural_gradient step, seeds 0-4: realized KL / kl_budget"
        lines = [title, "",
                 "| kl_budget | method | realized KL / budget (seeds 0-4) | CG iterations | search's forward passes |",
                 "|---|---|---|---|---|"]
        for r in natural_gradient_kl():
            ratios = " ".join(f"{x:.3g}" for x in r["ratios"])
            cg = " ".join(str(i) for i in r["cg_iterations"])
            passes = " ".join(str(i) for i in r["kl_evaluations"])
            lines.append(f"| {r['budget']:g} | {r['method']} | {ratios} | {cg} | {passes} |")
        text = "\n".join(lines)
    else:
        cost = cg_iteration_cost(repeats)
        lines = ["digits-autoencoder (1.4M params), batch 512: one CG iteration vs one gradient", "",
                 "| what | ms | x grad |", "|---|---|---|",
                 f"| grad | {1e3 * cost['grad_s']:.1f} | 1.00 |"]
        for name in [k[:-2] for k in cost if k.endswith("_s") and k != "grad_s"]:
            lines.append(f"| {name} | {1e3 * cost[name + '_s']:.1f} | {cost[name + '_ratio']:.2f} |")
        text = "\n".join(lines)
    print(text)
    return text
