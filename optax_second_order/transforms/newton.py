r"""The solve-based family: Newton, Gauss-Newton / Levenberg-Marquardt, Hessian-free, natural gradient.

Each of these methods takes the step that minimizes a damped quadratic model of the loss ``h`` at ``theta``,

.. math::

    q(\delta) = g^\top \delta + \tfrac12 \delta^\top (C + \lambda I) \delta, \qquad
    \delta = -s\,x, \quad x = (C + \lambda I)^{-1} g,

and they differ only in three choices, which :func:`scale_by_newton` composes:

* the **curvature** ``C`` (``curvature=``): the Hessian ``H`` (``"hessian"``, :func:`~.products.hvp_operator`), the
  generalized Gauss-Newton ``J^T H_L J`` (``"gauss_newton"``, :func:`~.products.gnvp_operator`), the true Fisher with
  targets sampled from the model (``"fisher"``, :func:`~.products.fisher_operator`; its expectation is the GGN for
  the library's losses) or the empirical Fisher ``(1/N) sum_i g_i g_i^T`` (``"empirical_fisher"``);
* the **solver** (``solver=``): ``"dense"`` (the ``n x n`` matrix, Cholesky falling back to ``eigh``,
  :func:`~.solvers.dense_solve`), ``"cg"`` (truncated conjugate gradient, :func:`~.solvers.conjugate_gradient`) or
  ``"row_space"`` (the Woodbury identity on a factor ``C = U U^T`` with one column per output coordinate, sampled
  gradient or example, :func:`~.solvers.low_rank_damped_solve`; GGN and Fishers only);
* the **damping** ``lambda`` (``damping_rule=``): ``"fixed"`` (Tikhonov), ``"levenberg_marquardt"`` or
  ``"trust_region"``. The last two measure the reduction ratio of the step actually taken,
  ``rho = (h(theta + delta) - h(theta)) / q(delta)`` (:func:`~.damping.reduction_ratio`, ``q`` the damped model the
  step minimizes, Martens 2010, section 4.1), then set ``lambda <- decrease * lambda`` if ``rho > 3/4`` and
  ``lambda <- increase * lambda`` if ``rho < 1/4`` (:func:`~.damping.levenberg_marquardt`), and **reject** the step
  (a zero update) unless ``rho > accept_threshold``. Levenberg-Marquardt: Martens' (2010) constants ``2/3``, ``3/2``
  and rejection of ``rho <= 0``, so the loss on the batch never rises because of an accepted step. Trust region:
  the radius rule of Nocedal & Wright (2006), Algorithm 4.1, in damping form (a radius divided by 4 is ``lambda``
  times 4, a radius doubled is ``lambda`` halved), accepting ``rho > 0.15`` (``scipy.optimize``'s trust-region
  ``eta``).

Inside a solver:

* Newton-CG (Hessian + CG) stops CG at the first direction of non-positive curvature and takes the last iterate (the
  steepest-descent direction on the first iteration; Nocedal & Wright 2006, Algorithm 7.1), counted in
  ``state.negative_curvature``. ``tol=None`` uses the inexact-Newton forcing term ``min(0.5, sqrt(||g||))`` as CG's
  relative tolerance (Nocedal & Wright 2006, eq. (7.3)), which gives superlinear convergence for few products.
* A dense Hessian solve on an indefinite ``H + lambda I`` (Cholesky fails and ``lambda_min + lambda <= 0``) raises the
  damping to ``lambda + 2 |lambda_min|`` (Hessian modification ``H + tau I``, ``tau = max(0, delta - lambda_min)``
  with ``delta = |lambda_min|``; Nocedal & Wright 2006, section 3.4): the most negative curvature becomes its
  magnitude, as saddle-free Newton would treat it, the step is a descent direction (counted as negative curvature),
  and, the shift being on the Hessian's own scale, the step does not depend on the scale of the loss.
  ``saddle_free=True`` solves with ``|H|`` instead (Dauphin et al. 2014).
* Hessian-free (Martens 2010): GGN + CG from the previous solution times ``warm_start_decay`` (0.95, section 4.5),
  stopped by Martens' relative-progress rule (``progress_eps = 5e-4``, ``tol = 0``, section 4.4), preconditioned by
  ``(diag(F_emp) + lambda)^-0.75`` (``preconditioner="empirical_fisher"``, section 4.7; here ``diag(F_emp)`` is the
  mean ``(1/N) sum_i g_i * g_i`` over the batch's examples, on the scale of the mean loss's curvature), and
  CG-backtracking (``backtracking=1.3``, section 4.6): the loss is evaluated at the final CG iterate and then at the
  saved iterates ``x_i``, ``i = ceil(1.3^j)``, walking back while it decreases; the last of them is the step.
  The warm start is the final CG iterate, not the backtracked one.
* Natural gradient with a KL budget (``kl_budget=epsilon``): the step is scaled by
  ``eta = sqrt(2 epsilon / g^T x)``, so that ``1/2 delta^T (F + lambda I) delta = epsilon`` for ``delta = -eta x``
  and the second-order KL divergence between the model's predictive distributions before and after the step is at
  most (for small ``lambda``, about) ``epsilon`` (Schulman et al. 2015, appendix C; Martens 2020, section 12).
* The realized KL (``kl_rtol=r``, with a KL budget): the second-order scale is then corrected on the KL divergence
  the step actually makes, ``k(eta) = loss.kl(f(theta), f(theta - eta x))`` (the batch's weighted mean
  ``KL(p(t | f_i(theta)) || p(t | f_i(theta - eta x)))``, one ``model_fn`` evaluation each): starting from the
  second-order ``eta``, ``eta <- eta sqrt(epsilon / k(eta))`` (at most doubling; a quarter where ``k`` is not
  finite) until ``|k(eta) - epsilon| <= r epsilon``, at most ``kl_maxiter`` tries. The step is the last
  ``eta`` found within the band, else the longest one evaluated with ``k <= (1 + r) epsilon``, else none (a zero
  update, counted in ``state.rejected``); a step that does not move the outputs at all (``k = 0``) is kept. So the
  realized KL of the step at learning rate 1 is at most ``(1 + r) epsilon`` on the batch, and within ``r epsilon``
  of the budget when the search converges (the update's KL is ``k``, kept in ``state.realized_kl``, and the search's
  ``model_fn`` evaluations, the outputs before the step included, in ``state.kl_evaluations``). This is the
  line search of TRPO (Schulman et al. 2015, appendix C) on the KL constraint, with a secant-like update in place
  of halving: ``k`` is quadratic in ``eta`` for short steps, so one correction usually lands in the band.

The update this transformation returns is ``u = eta x`` (``eta = 1`` without a KL budget), zero for a rejected
step; the aliases end with ``optax.scale_by_learning_rate``, so ``params <- params - lr u``. The reduction ratio and
CG-backtracking test that step, ``delta = -lr u`` (``learning_rate``, default 1): these methods choose their own step
length, and ``learning_rate=1`` is the one to use unless a schedule is wanted.

Counters in :class:`NewtonState`: the damping in use, CG iterations of the last step, curvature products so far,
steps that met non-positive curvature, steps rejected by the reduction ratio or the realized-KL search, and non-finite
events. A non-finite gradient, curvature product or solution is never folded into the state: that step's update is
zero, the damping and the warm start are kept, and ``state.nonfinite`` counts it. The state also keeps the Newton
decrement ``sqrt(g^T x)`` of the last solve (:func:`~.solvers.newton_decrement`) and, with ``kl_rtol``, the realized
KL of the last update (0 for a zero update) and its search's ``model_fn`` evaluations.

Randomness (sampled Fisher targets, the preconditioner's random signs) comes from the key in the state: at each
update ``key, curvature_key = jax.random.split(state.key)``; the Fisher operator (or factor) draws its targets from
``curvature_key`` and the sign estimate of the preconditioner from ``jax.random.fold_in(curvature_key, 1)``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from optax_second_order.curvature.estimators import empirical_fisher_diagonal_estimate
from optax_second_order.curvature.losses import OutputLoss
from optax_second_order.curvature.products import (
    empirical_fisher_diagonal,
    empirical_fisher_factor,
    empirical_fisher_operator,
    fisher_factor,
    fisher_operator,
    ggn_factor,
    gnvp_operator,
    hvp_operator,
)
from optax_second_order.curvature.solvers import (
    CGInfo,
    conjugate_gradient,
    dense_matrix,
    dense_solve,
    low_rank_damped_solve,
)
from optax_second_order.transforms import damping as damping_rules
from optax_second_order.transforms.common import (
    all_finite,
    check,
    check_choice,
    extra_arg,
    masked_extras,
    require_params,
    stat_dtype,
    static_int,
    value_at,
)

__all__ = ["NewtonState", "scale_by_newton"]

PyTree = Any
NAME = "scale_by_newton"

CURVATURES = ("hessian", "gauss_newton", "fisher", "empirical_fisher")
SOLVERS = ("dense", "cg", "row_space")
DAMPING_RULES = ("fixed", "levenberg_marquardt", "trust_region")
PRECONDITIONERS = (None, "empirical_fisher", "empirical_fisher_estimate")

DEFAULT_MAXITER = 250
"""CG's iteration limit when ``maxiter=None`` (Martens 2010, section 4.4, caps CG at 250 iterations)."""

RULE_DEFAULTS = {
    # (decrease, increase, accept_threshold): Martens 2010, section 4.1; rejection of rho <= 0.
    "levenberg_marquardt": (2.0 / 3.0, 1.5, 0.0),
    # Nocedal & Wright 2006, Algorithm 4.1 (radius / 4, radius * 2) and scipy.optimize's trust-region eta = 0.15.
    "trust_region": (0.5, 4.0, 0.15),
}


class NewtonState(NamedTuple):
    """State of :func:`scale_by_newton`: arrays only (checkpoints, ``lax.scan``, donation)."""

    count: jax.Array  # int32, completed updates
    key: jax.Array  # PRNG key, split at every update
    damping: jax.Array  # the Tikhonov damping lambda of the next step (constant with damping_rule="fixed")
    warm_start: PyTree  # CG's last final iterate x (with warm_start_decay), else ()
    cg_iterations: jax.Array  # int32, CG iterations of the last step (0 for the other solvers)
    products: jax.Array  # int32, curvature-vector products so far (dense: n per step; row_space: m factor columns)
    negative_curvature: jax.Array  # int32, steps whose solve met non-positive curvature
    rejected: jax.Array  # int32, steps rejected by the reduction-ratio test or the realized-KL search (zero update)
    nonfinite: jax.Array  # int32, steps with a non-finite gradient, product or solution (zero update)
    newton_decrement: jax.Array  # sqrt(g^T x) of the last finite solve, x = (C + lambda I)^{-1} g
    realized_kl: jax.Array  # with kl_rtol: the KL the last update made on its batch (learning rate 1; 0 if zero)
    kl_evaluations: jax.Array  # int32, with kl_rtol: model_fn evaluations of the last step's search (tries + 1)


class _Config(NamedTuple):
    """The static choices of one :func:`scale_by_newton`, shared by its closures."""

    curvature: str
    solver: str
    adaptive: bool  # levenberg_marquardt or trust_region
    saddle_free: bool
    preconditioner: str | None
    backtracking: float | None  # Martens' gamma
    warm_start: bool
    kl_step: bool
    kl_search: bool  # kl_rtol is set: correct the KL scale on the realized KL
    progress: bool
    num_samples: int

    @property
    def needs_value_fn(self) -> bool:
        return self.curvature == "hessian" or self.adaptive or self.backtracking is not None

    @property
    def needs_model(self) -> bool:
        return self.curvature != "hessian" or self.preconditioner is not None or self.kl_search


class _Extras(NamedTuple):
    value_fn: Callable | None
    model_fn: Callable | None
    loss: OutputLoss | None

    def per_example(self, params):
        """The batch's per-example losses ``l_i`` (unweighted), for the empirical Fisher."""
        return self.loss.per_example(self.model_fn(params))


class _Solution(NamedTuple):
    """A solve of ``(C + lambda I) x = g``: ``x``, ``x^T (C + lambda' I) x`` for the model, CG's final iterate."""

    x: PyTree
    quadratic: jax.Array  # x^T (C + lambda' I) x, lambda' the damping of the system solved
    final: PyTree  # the iterate to warm-start from (CG), else x
    iterations: jax.Array  # int32, CG iterations
    products: jax.Array  # int32
    negative_curvature: jax.Array  # bool
    info: CGInfo | None


# --- the curvature: operator or factor ------------------------------------------------------------


def _extras(config: _Config, extra: dict, name: str) -> _Extras:
    """The extra arguments this configuration needs (a ``TypeError`` naming ``name`` and a missing one)."""
    value_fn = extra_arg(extra, "value_fn", name) if config.needs_value_fn else None
    model_fn = extra_arg(extra, "model_fn", name) if config.needs_model else None
    loss = extra_arg(extra, "loss", name) if config.needs_model else None
    return _Extras(value_fn, model_fn, loss)


def _curvature_operator(config: _Config, fns: _Extras, params: PyTree, key: jax.Array) -> Callable:
    """``v -> C v``, linearized once at ``params`` (:mod:`~optax_second_order.curvature.products`)."""
    if config.curvature == "hessian":
        return hvp_operator(fns.value_fn, params)
    if config.curvature == "gauss_newton":
        return gnvp_operator(fns.model_fn, fns.loss, params)
    if config.curvature == "fisher":
        return fisher_operator(fns.model_fn, fns.loss, params, key, config.num_samples)
    return empirical_fisher_operator(fns.per_example, params)


def _curvature_factor(config: _Config, fns: _Extras, params: PyTree, key: jax.Array) -> PyTree:
    """``U`` with ``C = U U^T`` (a leading axis of ``m`` columns), for the row-space solve."""
    if config.curvature == "gauss_newton":
        return ggn_factor(fns.model_fn, fns.loss, params)
    if config.curvature == "fisher":
        return fisher_factor(fns.model_fn, fns.loss, params, key, config.num_samples)
    return empirical_fisher_factor(fns.per_example, params)


def _martens_preconditioner(config: _Config, fns: _Extras, params, key, damping, exponent) -> Callable:
    """``r -> (diag(F_emp) + lambda)^-exponent * r`` (Martens 2010, section 4.7), exact or from random signs.

    An entry with ``diag(F_emp) + lambda = 0`` is left unpreconditioned (factor 1).
    """
    if config.preconditioner == "empirical_fisher":
        diagonal = empirical_fisher_diagonal(fns.per_example, params)
    else:
        diagonal = empirical_fisher_diagonal_estimate(fns.per_example, params, jax.random.fold_in(key, 1))

    def scale(d):
        base = d + damping.astype(d.dtype)
        return jnp.where(base > 0, jnp.where(base > 0, base, 1.0) ** -exponent, 1.0)

    scales = jax.tree.map(scale, diagonal)
    return lambda r: jax.tree.map(lambda s, x: (s * x).astype(x.dtype), scales, r)


# --- the solvers -----------------------------------------------------------------------------------


def _damped(operator: Callable, damping: jax.Array) -> Callable:
    """``v -> C v + lambda v`` (in ``v``'s dtypes)."""
    return lambda v: jax.tree.map(lambda cv, x: cv + jnp.asarray(damping, x.dtype) * x, operator(v), v)


def _solve_dense(config: _Config, operator, params, g, damping) -> _Solution:
    """The explicit matrix, Cholesky or ``eigh`` (module docstring: Hessian modification, saddle-free)."""
    matrix = dense_matrix(operator, params)
    x, info = dense_solve(matrix, g, damping, saddle_free=config.saddle_free)
    if config.saddle_free:
        negative = info.min_eigenvalue < 0
    else:
        negative = info.used_eigh & (info.min_eigenvalue + damping <= 0)
        shift = jnp.where(negative, -2.0 * info.min_eigenvalue, 0.0).astype(damping.dtype)
        x = jax.lax.cond(negative, lambda: dense_solve(matrix, g, damping + shift)[0], lambda: x)
    # x solves its system exactly, so x^T (C + lambda' I) x = g^T x (also for the pseudo-inverse of eigh).
    n = matrix.shape[0]
    return _Solution(x, otu.tree_vdot(g, x), x, jnp.zeros([], jnp.int32), jnp.asarray(n, jnp.int32), negative, None)


def _solve_row_space(config: _Config, fns, params, g, damping, key) -> _Solution:
    """The Woodbury identity on ``U`` (``m`` columns, each one ``vjp``)."""
    factor = _curvature_factor(config, fns, params, key)
    x = low_rank_damped_solve(factor, g, damping)
    m = jax.tree.leaves(factor)[0].shape[0]
    false = jnp.asarray(False)
    return _Solution(x, otu.tree_vdot(g, x), x, jnp.zeros([], jnp.int32), jnp.asarray(m, jnp.int32), false, None)


def _forcing_tolerance(g: PyTree) -> jax.Array:
    """The inexact-Newton forcing term ``min(0.5, sqrt(||g||))`` (Nocedal & Wright 2006, eq. (7.3))."""
    return jnp.minimum(0.5, jnp.sqrt(otu.tree_norm(g)))


def _solve_cg(config: _Config, operator, g, damping, x0, tol, maxiter, preconditioner, progress_eps) -> _Solution:
    """Truncated (preconditioned) CG on ``C + lambda I`` with the negative-curvature stop."""
    x, info = conjugate_gradient(
        _damped(operator, damping),
        g,
        x0,
        tol=_forcing_tolerance(g) if tol is None else tol,
        maxiter=maxiter,
        preconditioner=preconditioner,
        progress_eps=progress_eps,
        save_gamma=config.backtracking,
    )
    # CG tracks phi = 1/2 x^T A x - g^T x, so x^T A x = 2 (phi + g^T x) costs no product.
    quadratic = 2.0 * (info.quadratic_value + otu.tree_vdot(g, x))
    products = info.iterations + (0 if x0 is None else 1)
    return _Solution(x, quadratic, x, info.iterations, products, info.negative_curvature, info)


# --- the step: KL scale, backtracking, reduction ratio ------------------------------------------------


def _kl_scale(g_dot_x: jax.Array, kl_budget) -> jax.Array:
    """``eta = sqrt(2 epsilon / g^T x)``; 0 (no step) where ``g^T x`` is not positive and finite."""
    positive = jnp.isfinite(g_dot_x) & (g_dot_x > 0)
    return jnp.where(positive, jnp.sqrt(2.0 * kl_budget / jnp.where(positive, g_dot_x, 1.0)), 0.0)


def _realized_kl_scale(fns: _Extras, params: PyTree, x: PyTree, eta, kl_budget, kl_rtol, kl_maxiter):
    """The KL scale corrected on the realized KL ``k(eta) = loss.kl(f(theta), f(theta - eta x))`` (module docstring).

    Returns ``(eta, k, found, tries)``: the scale to use, its realized KL, whether any scale met
    ``k <= (1 + r) epsilon`` (the step is zero otherwise), and the number of scales tried. ``eta`` starts at the
    second-order scale; ``k = 0`` (the step does not move the outputs, or ``eta = 0``) ends the search with that
    ``eta``.
    """
    dtype = eta.dtype
    budget = jnp.asarray(kl_budget, dtype)
    upper, lower = ((1 + kl_rtol) * budget).astype(dtype), ((1 - kl_rtol) * budget).astype(dtype)
    outputs = fns.model_fn(params)

    def realized(scale):
        kl = fns.loss.kl(outputs, fns.model_fn(_moved(params, x, scale))).astype(dtype)
        return jnp.where(jnp.isnan(kl), jnp.inf, kl)

    def searching(carry):
        evaluations, _, _, _, done = carry
        return (evaluations < kl_maxiter) & ~done

    def evaluate(carry):
        evaluations, scale, best, best_kl, _ = carry
        kl = realized(scale)
        feasible = kl <= upper
        longer = feasible & (scale >= best)
        best, best_kl = jnp.where(longer, scale, best), jnp.where(longer, kl, best_kl)
        done = feasible & ((kl >= lower) | (kl == 0))
        best, best_kl = jnp.where(done, scale, best), jnp.where(done, kl, best_kl)
        ratio = jnp.sqrt(budget / jnp.where(kl > 0, kl, budget))
        factor = jnp.where(jnp.isfinite(kl), jnp.minimum(ratio, 2.0), 0.25)
        return evaluations + 1, (scale * factor).astype(dtype), best, best_kl, done

    zero = jnp.zeros([], dtype)
    init = (jnp.zeros([], jnp.int32), eta, zero, jnp.asarray(jnp.inf, dtype), jnp.asarray(False))
    tries, _, best, best_kl, _ = jax.lax.while_loop(searching, evaluate, init)
    found = jnp.isfinite(best_kl)
    return best, jnp.where(found, best_kl, 0.0).astype(dtype), found, tries


def _moved(params: PyTree, x: PyTree, scale) -> PyTree:
    """``params - scale * x`` in the params' dtypes (the step the update will take)."""
    return jax.tree.map(lambda p, v: p - (scale * v).astype(p.dtype), params, x)


def _loss_at(value_fn, params, x, scale) -> jax.Array:
    """``h(params - scale x)``, NaN read as ``+inf`` (a step to a NaN loss is never better)."""
    value = value_fn(_moved(params, x, scale))
    return jnp.where(jnp.isnan(value), jnp.inf, value)


def _backtrack(value_fn, params, solution: _Solution, scale) -> tuple[jax.Array, jax.Array]:
    """Martens' CG-backtracking (2010, section 4.6): the loss at the final iterate, then at the saved iterates
    before it, latest first, while it decreases strictly. Returns ``(slot, loss)``, slot ``-1`` for the final one."""
    info = solution.info
    start = jnp.sum(info.saved_iterations < info.iterations) - 1  # the latest saved iterate before the final one

    def not_done(carry):
        slot, _, _, stop = carry
        return (slot >= 0) & ~stop

    def walk_back(carry):
        slot, best_value, best_slot, _ = carry
        x = jax.tree.map(lambda saved: saved[slot], info.saved_iterates)
        value = _loss_at(value_fn, params, x, scale)
        better = value < best_value
        return slot - 1, jnp.where(better, value, best_value), jnp.where(better, slot, best_slot), ~better

    final_value = _loss_at(value_fn, params, solution.x, scale)
    init = (start.astype(jnp.int32), final_value, jnp.asarray(-1, jnp.int32), jnp.asarray(False))
    _, best_value, best_slot, _ = jax.lax.while_loop(not_done, walk_back, init)
    return best_slot, best_value


def _backtracked(operator, damping, solution: _Solution, slot) -> _Solution:
    """The solution with ``x`` the saved iterate ``slot`` (``-1``: the final one) and its model curvature."""
    info = solution.info
    saved = jax.tree.map(lambda s: s[jnp.maximum(slot, 0)], info.saved_iterates)
    x = jax.tree.map(lambda final, s: jnp.where(slot < 0, final, s), solution.x, saved)
    quadratic = jax.lax.cond(
        slot < 0, lambda: solution.quadratic, lambda: otu.tree_vdot(x, _damped(operator, damping)(x))
    )
    products = solution.products + (slot >= 0).astype(jnp.int32)
    return solution._replace(x=x, quadratic=quadratic, products=products)


class _Step(NamedTuple):
    """One attempt: the update direction and what goes into the state."""

    update: PyTree  # eta x (not yet scaled by the learning rate), zero if not accepted
    accepted: jax.Array
    finite: jax.Array
    damping: jax.Array
    warm_start: PyTree
    cg_iterations: jax.Array
    products: jax.Array
    negative_curvature: jax.Array
    newton_decrement: jax.Array
    realized_kl: jax.Array
    kl_evaluations: jax.Array


def _validate(name, curvature, solver, damping_rule, preconditioner, damping, min_damping, saddle_free, kl_budget,
              kl_rtol, kl_maxiter, warm_start_decay, progress_eps, backtracking, tol, maxiter, learning_rate, decrease,
              increase, accept_threshold, exponent) -> None:
    check_choice(name, "curvature", curvature, CURVATURES)
    check_choice(name, "solver", solver, SOLVERS)
    check_choice(name, "damping_rule", damping_rule, DAMPING_RULES)
    check_choice(name, "preconditioner", preconditioner, PRECONDITIONERS)
    if solver == "row_space" and curvature == "hessian":
        raise ValueError(f"{name}: solver='row_space' needs a curvature with a factor C = U U^T (gauss_newton, fisher, "
                         "empirical_fisher), not the Hessian; use 'dense' or 'cg'")
    if saddle_free and solver != "dense":
        raise ValueError(f"{name}: saddle_free=True needs solver='dense' (|H| comes from an eigendecomposition)")
    cg_only = dict(preconditioner=preconditioner, warm_start_decay=warm_start_decay, progress_eps=progress_eps,
                   backtracking=backtracking)
    for argument, value in cg_only.items():
        if value is not None and solver != "cg":
            raise ValueError(f"{name}: {argument} applies to solver='cg', got solver={solver!r}")
    check(name, "damping", damping, lambda x: x >= 0, ">= 0")
    if solver == "row_space":
        check(name, "damping", damping, lambda x: x > 0, "> 0 with solver='row_space' (Woodbury divides by it)")
    if damping_rule != "fixed" and isinstance(damping, (int, float)) and isinstance(min_damping, (int, float)):
        if damping <= 0 and min_damping <= 0:
            raise ValueError(f"{name}: damping_rule={damping_rule!r} multiplies the damping, so damping or min_damping "
                             f"must be > 0, got damping={damping!r}, min_damping={min_damping!r}")
    check(name, "min_damping", min_damping, lambda x: x >= 0, ">= 0")
    check(name, "kl_budget", kl_budget, lambda x: x > 0, "None or > 0")
    if kl_rtol is not None and kl_budget is None:
        raise ValueError(f"{name}: kl_rtol={kl_rtol!r} corrects a KL budget's step, so it needs kl_budget (got None)")
    if kl_rtol is not None and backtracking is not None:
        raise ValueError(f"{name}: kl_rtol and backtracking both choose the step: set one of them")
    if kl_rtol is not None and curvature == "hessian":
        raise ValueError(f"{name}: kl_rtol measures the KL between the model's predictive distributions, which needs "
                         "a curvature of the model (gauss_newton, fisher, empirical_fisher), not the Hessian")
    check(name, "kl_rtol", kl_rtol, lambda x: 0 < x < 1, "None or in (0, 1)")
    check(name, "kl_maxiter", kl_maxiter, lambda x: x >= 1 and float(x).is_integer(), "an integer >= 1")
    check(name, "warm_start_decay", warm_start_decay, lambda x: 0 <= x <= 1, "None or in [0, 1]")
    check(name, "progress_eps", progress_eps, lambda x: x > 0, "None or > 0")
    if backtracking is not None and not (isinstance(backtracking, (int, float)) and backtracking > 1):
        raise ValueError(f"{name}: backtracking must be None or a Python number > 1 (Martens' gamma, 1.3; it sets "
                         f"which iterates are saved), got {backtracking!r}")
    check(name, "tol", tol, lambda x: x >= 0, "None or >= 0")
    check(name, "maxiter", maxiter, lambda x: x >= 1 and float(x).is_integer(), "None or an integer >= 1")
    check(name, "learning_rate", learning_rate, lambda x: x > 0, "None or > 0 (or a schedule)")
    check(name, "damping_decrease", decrease, lambda x: 0 < x < 1, "None or in (0, 1)")
    check(name, "damping_increase", increase, lambda x: x > 1, "None or > 1")
    check(name, "accept_threshold", accept_threshold, lambda x: 0 <= x < 0.25, "None or in [0, 1/4)")
    check(name, "preconditioner_exponent", exponent, lambda x: x >= 0, ">= 0")


def _init(config: _Config, params, damping, seed) -> NewtonState:
    def zero():  # fresh arrays each call: a state sharing buffers cannot be donated
        return jnp.zeros([], jnp.int32)

    float_dtype = jnp.result_type(float)
    warm = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), stat_dtype(p.dtype)), params) if config.warm_start else ()
    return NewtonState(
        count=zero(), key=jax.random.key(seed), damping=jnp.asarray(damping, float_dtype), warm_start=warm,
        cg_iterations=zero(), products=zero(), negative_curvature=zero(), rejected=zero(), nonfinite=zero(),
        newton_decrement=jnp.zeros([], float_dtype), realized_kl=jnp.zeros([], float_dtype), kl_evaluations=zero(),
    )


def scale_by_newton(
    curvature: str = "hessian",
    solver: str = "dense",
    *,
    damping: float = 0.0,
    damping_rule: str = "fixed",
    damping_decrease: float | None = None,
    damping_increase: float | None = None,
    min_damping: float = 1e-8,
    accept_threshold: float | None = None,
    saddle_free: bool = False,
    tol: float | None = None,
    maxiter: int | None = None,
    preconditioner: str | None = None,
    preconditioner_exponent: float = 0.75,
    progress_eps: float | None = None,
    backtracking: float | None = None,
    warm_start_decay: float | None = None,
    kl_budget: float | None = None,
    kl_rtol: float | None = None,
    kl_maxiter: int = 10,
    num_samples: int | None = None,
    learning_rate: optax.ScalarOrSchedule | None = None,
    seed: int = 0,
    name: str = NAME,
) -> optax.GradientTransformationExtraArgs:
    """The damped curvature solve ``u = eta (C + lambda I)^{-1} g`` (module docstring for the math).

    Args:
      curvature: ``"hessian"``, ``"gauss_newton"``, ``"fisher"`` (targets sampled from the model) or
        ``"empirical_fisher"`` (the data's targets, unweighted per-example losses).
      solver: ``"dense"``, ``"cg"`` or ``"row_space"`` (not with the Hessian).
      damping: the Tikhonov damping ``lambda``; with an adaptive ``damping_rule``, its initial value (then kept in
        the state, so a value injected later by ``optax.inject_hyperparams`` does not apply).
      damping_rule: ``"fixed"``, ``"levenberg_marquardt"`` or ``"trust_region"`` (module docstring); the adaptive
        rules need ``value_fn``.
      damping_decrease: the factor applied to ``lambda`` when ``rho > 3/4`` (default: the rule's, ``2/3`` or ``1/2``).
      damping_increase: the factor applied when ``rho < 1/4`` (default: the rule's, ``3/2`` or ``4``).
      min_damping: the adapted damping never goes below this (K-FAC-JAX's ``1e-8``).
      accept_threshold: a step is accepted only when ``rho`` exceeds it (default: the rule's, ``0`` or ``0.15``).
      saddle_free: with ``solver="dense"``, solve with ``|C| + lambda I`` (Dauphin et al. 2014).
      tol: CG's tolerance relative to ``||g||``; ``None``: the forcing term ``min(0.5, sqrt(||g||))``.
      maxiter: CG's iteration limit (default 250). It may be traced (``optax.inject_hyperparams``) unless
        ``progress_eps`` or ``backtracking`` is set: those size buffers by it (pass it in ``static_args`` then).
      preconditioner: CG's preconditioner: ``None``, ``"empirical_fisher"`` (``(diag(F_emp) + lambda)^-exponent``
        from per-example gradients, memory ``N x #params``) or ``"empirical_fisher_estimate"`` (the same with
        ``diag(F_emp)`` estimated from random signs, :func:`~optax_second_order.empirical_fisher_diagonal_estimate`:
        one ``vjp``). Needs ``model_fn`` and ``loss``.
      preconditioner_exponent: Martens' ``alpha`` (0.75).
      progress_eps: Martens' relative-progress stop for CG (he uses ``5e-4``); ``None`` disables it.
      backtracking: Martens' ``gamma`` (1.3) for CG-backtracking (a Python number > 1; needs ``value_fn``);
        ``None`` disables it.
      warm_start_decay: start CG from the previous solution times this (Martens: 0.95); ``None`` starts from zero.
      kl_budget: scale the step to a second-order KL change ``epsilon`` (module docstring); ``None`` disables it.
      kl_rtol: with ``kl_budget``, correct the scale until the realized KL of the step (learning rate 1) is within
        ``kl_rtol * kl_budget`` of the budget and never above ``(1 + kl_rtol) kl_budget`` (module docstring; needs
        ``model_fn`` and ``loss``, whose ``kl`` method gives the KL). ``None``: the second-order scale alone.
      kl_maxiter: the most scales that search tries, one ``model_fn`` evaluation each (10).
      num_samples: sampled targets per example for ``curvature="fisher"`` (default 1; sets array shapes).
      learning_rate: the learning rate the update will be scaled by (a float or a schedule, as the alias's), so the
        reduction ratio and backtracking test the step taken; ``None`` tests ``learning_rate = 1``.
      seed: PRNG seed of the key in the state.
      name: the name errors give (an alias's own name).

    ``update(grads, state, params, ...)`` needs ``value_fn`` for the Hessian, the adaptive rules and
    backtracking, and ``model_fn`` and ``loss`` for the other curvatures and the preconditioner. Inside
    ``optax.masked`` / ``multi_transform`` / ``partition`` it also needs ``full_params`` (the whole tree): the
    curvature is then that of the visible leaves, the masked ones held fixed (:func:`~.common.masked_extras`).
    """
    decrease_default, increase_default, threshold_default = RULE_DEFAULTS.get(damping_rule, (None, None, None))
    _validate(name, curvature, solver, damping_rule, preconditioner, damping, min_damping, saddle_free, kl_budget,
              kl_rtol, kl_maxiter, warm_start_decay, progress_eps, backtracking, tol, maxiter, learning_rate,
              damping_decrease, damping_increase, accept_threshold, preconditioner_exponent)
    buffers = progress_eps is not None or backtracking is not None
    if buffers:
        maxiter = static_int(name, "maxiter", maxiter, DEFAULT_MAXITER)
    elif maxiter is None:
        maxiter = DEFAULT_MAXITER
    config = _Config(
        curvature=curvature,
        solver=solver,
        adaptive=damping_rule != "fixed",
        saddle_free=saddle_free,
        preconditioner=preconditioner,
        backtracking=backtracking,
        warm_start=warm_start_decay is not None,
        kl_step=kl_budget is not None,
        kl_search=kl_rtol is not None,
        progress=progress_eps is not None,
        num_samples=static_int(name, "num_samples", num_samples, 1),
    )
    decrease = decrease_default if damping_decrease is None else damping_decrease
    increase = increase_default if damping_increase is None else damping_increase
    threshold = threshold_default if accept_threshold is None else accept_threshold

    def solve(fns, params, g, damping_now, key, warm_start) -> tuple[_Solution, Callable | None]:
        """The solution and the curvature operator (``None`` for the row-space solve, which uses a factor)."""
        if config.solver == "row_space":
            return _solve_row_space(config, fns, params, g, damping_now, key), None
        operator = _curvature_operator(config, fns, params, key)
        if config.solver == "dense":
            return _solve_dense(config, operator, params, g, damping_now), operator
        precondition = None
        if config.preconditioner is not None:
            precondition = _martens_preconditioner(config, fns, params, key, damping_now, preconditioner_exponent)
        x0 = None
        if config.warm_start:
            x0 = jax.tree.map(lambda w: (warm_start_decay * w).astype(w.dtype), warm_start)
        return _solve_cg(config, operator, g, damping_now, x0, tol, maxiter, precondition, progress_eps), operator

    def attempt(fns, params, g, state, damping_now, rate, key) -> _Step:
        compute = jax.tree.map(lambda p: p.astype(stat_dtype(p.dtype)), params)
        dtype = jnp.result_type(*jax.tree.leaves(g))
        solution, operator = solve(fns, compute, g, damping_now.astype(dtype), key, state.warm_start)
        finite = all_finite(solution.x) & jnp.isfinite(solution.quadratic)
        g_dot_x = otu.tree_vdot(g, solution.x)
        eta = _kl_scale(g_dot_x, kl_budget) if config.kl_step else jnp.ones([], g_dot_x.dtype)
        realized_kl, kl_found, kl_evaluations = jnp.zeros([]), jnp.asarray(True), jnp.zeros([], jnp.int32)
        if config.kl_search:
            x_finite = jax.tree.map(lambda v: jnp.where(finite, v, 0.0).astype(v.dtype), solution.x)
            eta, realized_kl, kl_found, tries = _realized_kl_scale(fns, params, x_finite, eta, kl_budget, kl_rtol,
                                                                   kl_maxiter)
            kl_evaluations = tries + 1  # and the outputs before the step
        scale = rate * eta
        chosen, new_value = solution, None
        if config.backtracking is not None:
            slot, new_value = _backtrack(fns.value_fn, params, solution, scale)
            chosen = _backtracked(operator, damping_now, solution, slot)
        accepted, new_damping = finite & kl_found, damping_now
        if config.adaptive:
            if new_value is None:
                new_value = fns.value_fn(_moved(params, chosen.x, scale))
            predicted = -scale * otu.tree_vdot(g, chosen.x) + 0.5 * scale**2 * chosen.quadratic
            rho = damping_rules.reduction_ratio(new_value - fns.value_fn(params), predicted)
            accepted = finite & kl_found & (rho > threshold)
            adapted = damping_rules.levenberg_marquardt(damping_now, rho, decrease, increase, min_damping)
            new_damping = jnp.where(finite, adapted, damping_now).astype(damping_now.dtype)
        update = jax.tree.map(lambda x: jnp.where(accepted, eta * x, 0.0).astype(x.dtype), chosen.x)
        realized_kl = jnp.where(accepted, realized_kl, 0.0).astype(state.realized_kl.dtype)
        warm = ()
        if config.warm_start:
            warm = jax.tree.map(lambda new, old: jnp.where(finite, new, old).astype(old.dtype), chosen.final,
                                state.warm_start)
        decrement = jnp.where(finite, jnp.sqrt(jnp.maximum(g_dot_x, 0.0)), state.newton_decrement)
        return _Step(update, accepted, finite, new_damping, warm, chosen.iterations, chosen.products,
                     finite & chosen.negative_curvature, decrement.astype(state.newton_decrement.dtype), realized_kl,
                     kl_evaluations)

    def skip(g, state, damping_now) -> _Step:
        zero = jnp.zeros([], jnp.int32)
        false = jnp.asarray(False)
        return _Step(jax.tree.map(jnp.zeros_like, g), false, false, damping_now, state.warm_start, zero, zero, false,
                     state.newton_decrement, jnp.zeros_like(state.realized_kl), zero)

    def update_fn(updates, state, params=None, **extra):
        params = require_params(params, name)
        if not jax.tree.leaves(updates):  # an empty tree (as optax takes it): nothing to solve, the step counts
            return updates, state._replace(count=state.count + 1)
        fns = _extras(config, masked_extras(params, extra, name), name)
        key, curvature_key = jax.random.split(state.key)
        damping_now = state.damping if config.adaptive else jnp.asarray(damping, state.damping.dtype)
        rate = 1.0 if learning_rate is None else value_at(learning_rate, state.count)
        g = jax.tree.map(lambda u: u.astype(stat_dtype(u.dtype)), updates)
        step = jax.lax.cond(
            all_finite(g),
            lambda: attempt(fns, params, g, state, damping_now, rate, curvature_key),
            lambda: skip(g, state, damping_now),
        )
        new_state = NewtonState(
            count=state.count + 1,
            key=key,
            damping=step.damping,
            warm_start=step.warm_start,
            cg_iterations=step.cg_iterations,
            products=state.products + step.products,
            negative_curvature=state.negative_curvature + step.negative_curvature.astype(jnp.int32),
            rejected=state.rejected + (step.finite & ~step.accepted).astype(jnp.int32),
            nonfinite=state.nonfinite + (~step.finite).astype(jnp.int32),
            newton_decrement=step.newton_decrement,
            realized_kl=step.realized_kl,
            kl_evaluations=step.kl_evaluations,
        )
        out = jax.tree.map(lambda u, p: u.astype(p.dtype), step.update, updates)
        return out, new_state

    return optax.GradientTransformationExtraArgs(lambda params: _init(config, params, damping, seed), update_fn)
