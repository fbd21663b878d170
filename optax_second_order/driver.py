r"""Solve to a tolerance: a jitted driver for full-batch (deterministic) problems.

Users of L-BFGS, BFGS and Levenberg-Marquardt on deterministic problems (curve fitting, logistic regression,
scientific ML) want ``scipy.optimize.minimize``'s loop: iterate until the gradient is small, and report what it
cost. :func:`minimize` runs any transformation of this library (or of optax) that takes the extra arguments
``value``, ``grad`` and ``value_fn`` on one ``jax.lax.while_loop``, so the whole solve is one compiled program
(call it inside ``jax.jit``); :func:`least_squares` does the same for a residual function
``r(params)``, minimizing ``f = 1/2 ||r||^2`` with the ``model_fn`` / ``loss`` pair the Gauss-Newton family takes.

Each iteration ``k`` (from ``x_0 = params``, ``f_0 = f(x_0)``, ``g_0 = grad f(x_0)``) calls
``u, state = tx.update(g_k, state, x_k, value=f_k, grad=g_k, value_fn=f)``, sets ``x_{k+1} = x_k + u`` and gets
``f_{k+1}``, ``g_{k+1}``: from the line search's state where there is one (``optax.value_and_grad_from_state``: the
search already evaluated them at the accepted point), else by one evaluation of ``jax.value_and_grad(f)`` (none when
the update is zero, as for a step that Levenberg-Marquardt rejected). It stops, in this order of precedence, at the
first of (:data:`TERMINATION_REASONS`):

1. ``nonfinite``: ``f_{k+1}`` or ``g_{k+1}`` is not finite; the result is the last finite iterate ``x_k``;
2. ``gtol``: ``||g_{k+1}||_2 <= gtol`` (scipy BFGS's test with ``norm=2``; optax's L-BFGS guide stops on the
   same norm);
3. ``target_value``: ``f_{k+1} <= target_value`` (a known optimum: the benchmarks' "evaluations to a target");
4. ``ftol``: the relative decrease of a step that moved ``(f_k - f_{k+1}) / max(|f_k|, |f_{k+1}|, 1) <= ftol``
   (L-BFGS-B's ``factr`` test, Zhu, Byrd, Lu & Nocedal 1997, as scipy's ``ftol``);
5. ``no_progress``: a zero update that the transformation did not count as a rejected step (a line search that found
   no decrease: scipy's "ABNORMAL_TERMINATION_IN_LNSRCH");
6. ``max_iters``: ``k + 1 = max_iters``;
7. ``max_evals``: ``num_evals >= max_evals`` (checked after an iteration, as scipy checks ``maxfun``).

The tests run before the first iteration too (``x_0`` may already satisfy ``gtol``: zero iterations).

Evaluations (:func:`evaluations_of_step`): value-and-gradient evaluations of ``f``, each counted once whether it
returns the value, the gradient or both, as scipy's ``nfev`` with ``jac=True``: one at ``x_0``, then the line
search's ``num_linesearch_steps`` per iteration (the state of ``optax.scale_by_zoom_linesearch`` and of
:func:`~optax_second_order.scale_by_more_thuente_linesearch` records them), or one per iteration that moved without a
line search. Evaluations a transformation makes on its own outside a line search (Levenberg-Marquardt's value at the
trial point for the reduction ratio, the Gauss-Newton products of CG) are not in the count; see ``num_iters``.

Names follow the peers: ``minimize(fun, ...)`` as ``scipy.optimize.minimize(fun, x0, ...)`` and
``jax.scipy.optimize.minimize``; the argument order ``(fun, solver, initial point)`` of optimistix's
``optx.minimise(fn, solver, y0)`` and ``optx.least_squares(fn, solver, y0)``; ``gtol``, ``ftol`` and the counts
``num_iters`` / ``num_evals`` as scipy's ``gtol``, ``ftol``, ``nit``, ``nfev``. The loop is optax's "L-BFGS" guide's
``run_opt`` (``jax.lax.while_loop`` over ``tx.update`` with ``optax.value_and_grad_from_state``), with the counts
and the termination reason added.

References: J. Nocedal & S. J. Wright, *Numerical Optimization*, 2nd ed., 2006, chapter 6; C. Zhu, R. H. Byrd,
P. Lu & J. Nocedal, "Algorithm 778: L-BFGS-B", ACM TOMS 23(4), 1997; ``scipy.optimize.minimize``; optimistix
(P. Rader, T. Lyons & P. Kidger, "Optimistix: modular optimisation in JAX and Equinox", 2024).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from optax_second_order.curvature.losses import squared_error
from optax_second_order.transforms.common import all_finite

__all__ = ["MinimizeResult", "TERMINATION_REASONS", "minimize", "least_squares", "evaluations_of_step"]

PyTree = Any

TERMINATION_REASONS = ("running", "gtol", "target_value", "ftol", "no_progress", "max_iters", "max_evals",
                       "nonfinite")
"""The meaning of :attr:`MinimizeResult.status`, an index into this tuple: ``gtol``, ``target_value`` and ``ftol``
are success; the others say why a run stopped short."""
_RUNNING, _GTOL, _TARGET, _FTOL, _NO_PROGRESS, _MAX_ITERS, _MAX_EVALS, _NONFINITE = range(len(TERMINATION_REASONS))


class MinimizeResult(NamedTuple):
    """The end of :func:`minimize` or :func:`least_squares` (arrays: it comes out of ``jax.jit``)."""

    params: PyTree  # the solution (scipy's x, optimistix's Solution.value)
    value: jax.Array  # f(params) (scipy's fun); 1/2 ||r||^2 for least_squares
    grad_norm: jax.Array  # ||grad f(params)||_2
    num_iters: jax.Array  # int32, iterations (updates applied; scipy's nit)
    num_evals: jax.Array  # int32, value-and-gradient evaluations (scipy's nfev; module docstring)
    status: jax.Array  # int32, an index into TERMINATION_REASONS
    state: PyTree  # the transformation's final state (damping, counters, the line search's info)

    @property
    def reason(self) -> str:
        """The termination reason as a word of :data:`TERMINATION_REASONS` (outside ``jit`` only)."""
        return TERMINATION_REASONS[int(self.status)]

    @property
    def success(self) -> bool:
        """Whether a tolerance (``gtol``, ``target_value`` or ``ftol``) was met (outside ``jit`` only)."""
        return int(self.status) in (_GTOL, _TARGET, _FTOL)


class _Carry(NamedTuple):
    params: PyTree
    state: PyTree
    value: jax.Array
    grad: PyTree
    num_iters: jax.Array
    num_evals: jax.Array
    status: jax.Array


def evaluations_of_step(state: PyTree) -> jax.Array | int:
    """Evaluations of ``f`` one update of a transformation with this state made: its line search's
    ``num_linesearch_steps`` (optax's zoom search and this library's Moré-Thuente search record them), or 1 where
    the state has no line search (the driver's evaluation at the new point)."""
    searched = optax.tree.get(state, "num_linesearch_steps")
    return 1 if searched is None else searched


def _moved(updates: PyTree) -> jax.Array:
    """Whether any coordinate of the update is nonzero."""
    return jnp.any(jnp.stack([jnp.any(u != 0) for u in jax.tree.leaves(updates)] or [jnp.asarray(False)]))


def _relative_decrease(old: jax.Array, new: jax.Array) -> jax.Array:
    """``(f_k - f_{k+1}) / max(|f_k|, |f_{k+1}|, 1)``, L-BFGS-B's ``factr`` quantity."""
    return (old - new) / jnp.maximum(jnp.maximum(jnp.abs(old), jnp.abs(new)), 1.0)


def _termination(value, grad, num_iters, num_evals, *, gtol, target_value, max_iters, max_evals,
                 decrease=None, ftol=None, stalled=None) -> jax.Array:
    """The first reason that holds, in the module docstring's order (``_RUNNING`` if none)."""
    tests = [(~(jnp.isfinite(value) & all_finite(grad)), _NONFINITE), (optax.tree.norm(grad) <= gtol, _GTOL)]
    if target_value is not None:
        tests.append((value <= target_value, _TARGET))
    if ftol is not None and decrease is not None:
        tests.append((decrease <= ftol, _FTOL))
    if stalled is not None:
        tests.append((stalled, _NO_PROGRESS))
    tests.append((num_iters >= max_iters, _MAX_ITERS))
    if max_evals is not None:
        tests.append((num_evals >= max_evals, _MAX_EVALS))
    status = jnp.asarray(_RUNNING, jnp.int32)
    for holds, reason in reversed(tests):
        status = jnp.where(holds, reason, status)
    return status.astype(jnp.int32)


def _solve(fun, tx, params, extra, *, gtol, ftol, max_iters, max_evals, target_value) -> MinimizeResult:
    """The loop of the module docstring; ``extra`` are further extra arguments of ``tx.update``."""
    tx = optax.with_extra_args_support(tx)
    value_and_grad = jax.value_and_grad(fun)
    from_state = optax.value_and_grad_from_state(fun)
    state = tx.init(params)
    searches = optax.tree.get(state, "num_linesearch_steps") is not None
    value, grad = value_and_grad(params)
    limits = dict(gtol=gtol, target_value=target_value, max_iters=max_iters, max_evals=max_evals)
    zero = jnp.zeros([], jnp.int32)
    start = _Carry(params, state, value, grad, zero, zero + 1, _termination(value, grad, zero, zero + 1, **limits))

    def body(c: _Carry) -> _Carry:
        updates, state = tx.update(c.grad, c.state, c.params, value=c.value, grad=c.grad, value_fn=fun, **extra)
        params = optax.apply_updates(c.params, updates)
        moved = _moved(updates)
        if searches:
            value, grad = from_state(params, state=state)
        else:
            value, grad = jax.lax.cond(moved, lambda: value_and_grad(params), lambda: (c.value, c.grad))
        num_evals = c.num_evals + jnp.where(searches | moved, evaluations_of_step(state), 0).astype(jnp.int32)
        rejected = optax.tree.get(state, "rejected")
        stalled = ~moved if rejected is None else ~moved & (rejected == optax.tree.get(c.state, "rejected"))
        status = _termination(value, grad, c.num_iters + 1, num_evals, decrease=_relative_decrease(c.value, value),
                              ftol=ftol, stalled=stalled, **limits)
        status = jnp.where(moved | (status != _FTOL), status, _RUNNING)  # ftol judges steps that moved
        # a non-finite point is not taken: the result is the last finite iterate
        point = optax.tree.where(status == _NONFINITE, (c.params, c.state, c.value, c.grad),
                                 (params, state, value, grad))
        return _Carry(*point, c.num_iters + 1, num_evals, status)

    end = jax.lax.while_loop(lambda c: c.status == _RUNNING, body, start)
    return MinimizeResult(end.params, end.value, optax.tree.norm(end.grad), end.num_iters, end.num_evals,
                          end.status, end.state)


def minimize(
    fun: Callable[[PyTree], jax.Array],
    tx: optax.GradientTransformation,
    params: PyTree,
    *,
    gtol: float = 1e-6,
    ftol: float | None = None,
    max_iters: int = 1000,
    max_evals: int | None = None,
    target_value: float | None = None,
) -> MinimizeResult:
    """Minimize ``fun`` from ``params`` with ``tx`` until a tolerance or a limit (module docstring).

    ``tx`` is any transformation taking the extra arguments ``value``, ``grad``, ``value_fn`` (the quasi-Newton
    aliases with their line searches, ``optax.lbfgs``, Newton) or none (a fixed-step method). The whole solve is one
    ``jax.lax.while_loop``: call it inside ``jax.jit`` (pass the data as arguments of the jitted function, not as
    constants closed over) and it compiles once.

    Args:
      fun: ``params -> scalar``, the full-batch loss.
      tx: the transformation; its ``update`` gets ``value``, ``grad`` and ``value_fn=fun``.
      params: the starting point (any pytree).
      gtol: stop when ``||grad f||_2 <= gtol`` (scipy BFGS's ``gtol`` with ``norm=2``).
      ftol: stop when the relative decrease of a step is ``<= ftol`` (scipy L-BFGS-B's ``ftol``); ``None``: off.
      max_iters: the most iterations (scipy's ``maxiter``).
      max_evals: the most evaluations, checked after each iteration (scipy's ``maxfun``); ``None``: no limit.
      target_value: stop when ``f <= target_value``; ``None``: off.

    Returns:
      A :class:`MinimizeResult`: ``params``, ``value``, ``grad_norm``, ``num_iters``, ``num_evals``, ``status``
      (``result.reason`` names it) and the final ``state``.

    Example::

        result = jax.jit(lambda x0: oso.minimize(f, oso.bfgs(), x0, gtol=1e-6))(x0)
        result.params, result.num_iters, result.num_evals, result.reason
    """
    return _solve(fun, tx, params, {}, gtol=gtol, ftol=ftol, max_iters=max_iters, max_evals=max_evals,
                  target_value=target_value)


def least_squares(
    residual_fn: Callable[[PyTree], PyTree],
    tx: optax.GradientTransformation,
    params: PyTree,
    *,
    gtol: float = 1e-6,
    ftol: float | None = None,
    max_iters: int = 1000,
    max_evals: int | None = None,
    target_value: float | None = None,
) -> MinimizeResult:
    """Minimize ``f = 1/2 ||r(params)||^2`` (``r`` any pytree of residuals) with ``tx``, as :func:`minimize`.

    ``tx.update`` gets, beside :func:`minimize`'s ``value``, ``grad`` and ``value_fn = f``, the Gauss-Newton
    family's ``model_fn = params -> r`` flattened to one example of shape ``(1, m)`` and
    ``loss = oso.losses.squared_error(zeros((1, m)))``, whose ``1/2 ||y - 0||^2`` makes ``J^T H_L J = J^T J``: so
    ``oso.levenberg_marquardt`` and ``oso.gauss_newton`` take it as scipy's and optimistix's ``least_squares`` do
    (``1/2 ||r||^2`` is also their objective), and the other methods minimize ``f`` itself. ``num_evals`` counts
    evaluations of ``f`` and its gradient (one ``r`` and one ``J^T r`` each); Levenberg-Marquardt's own evaluation of
    ``r`` at each trial point is not in it (module docstring): its ``num_iters`` is optimistix's ``num_steps``.
    """

    def model_fn(p):
        return ravel_pytree(residual_fn(p))[0][None]

    def value_fn(p):
        return 0.5 * jnp.sum(jnp.square(model_fn(p)))

    residuals = jax.eval_shape(model_fn, params)
    loss = squared_error(jnp.zeros(residuals.shape, residuals.dtype))
    return _solve(value_fn, tx, params, dict(model_fn=model_fn, loss=loss), gtol=gtol, ftol=ftol,
                  max_iters=max_iters, max_evals=max_evals, target_value=target_value)
