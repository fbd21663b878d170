r"""Quasi-Newton transformations: dense SR1 / BFGS / DFP over the flattened parameters, L-BFGS, line searches.

A quasi-Newton method keeps an approximation ``B_k`` of the Hessian (or ``H_k = B_k^{-1}``) built from the
pairs ``s_k = x_{k+1} - x_k``, ``y_k = g_{k+1} - g_k`` by a secant update
(:mod:`optax_second_order.curvature.secant`; Nocedal & Wright 2006, chapters 6-7, "N&W"), and steps along

.. math::

    d_k = -H_k g_k = -B_k^{-1} g_k .

:func:`scale_by_quasi_newton` returns ``+H_k g_k`` (the chain negates it, as for every ``scale_by_*``); at
step ``k`` it first forms the pair from the parameters and gradient it saw at step ``k - 1`` and updates the
matrix, then preconditions the new gradient. Its ``method`` chooses the update:

* ``"bfgs"``: BFGS on ``H`` (N&W eq. 6.17), ``d = H g``, ``O(n^2)`` per step;
* ``"bfgs_cholesky"``: BFGS on ``B = L L^T`` through the Cholesky factor (Dennis & Schnabel 1983, section 9.2),
  ``d`` by two triangular solves, ``O(n^2)``;
* ``"dfp"``: DFP on ``H`` (N&W eq. 6.15);
* ``"sr1"``: SR1 on ``B`` (N&W eq. 6.24), ``d`` by an LU solve, ``O(n^3)``;
* ``"sr1_inverse"``: SR1 on ``H`` (N&W eq. 6.25, Sherman-Morrison), ``O(n^2)``.

The matrices are dense over the flattened parameters (``n`` = their total size, in float32 or better): meant
for up to a few thousand parameters (``n = 4000`` is 128 MB in float64). :func:`scale_by_lbfgs` keeps the
last ``m`` pairs instead (N&W Algorithm 7.4, ``O(m n)``), as pytrees shaped like the parameters.

Safeguards (sources in :mod:`~optax_second_order.curvature.secant`):

* a pair is skipped unless ``s^T y > min_cosine ||s|| ||y||`` (BFGS, DFP, L-BFGS) or
  ``|s^T (y - B s)| > min_cosine ||s|| ||y - B s||`` (SR1; on ``H`` its dual), ``min_cosine = 1e-8``; with
  ``damp=True`` BFGS and DFP use Powell's damped pair instead (N&W Procedure 18.2);
* the first finite pair sets the scale of the initial matrix, ``H_0 = gamma I``,
  ``gamma = s^T y / y^T y`` (N&W eq. 6.20; scipy's ``init_scale='auto'``); BFGS and DFP then fold that pair in,
  SR1 does not: it counts it in ``state.skipped`` and its next step is ``gamma g``. For ``s^T y > 0`` the SR1 update
  of ``B_0 = c I``, ``c = 1 / gamma``, by the same pair is exactly singular: with ``u = y - c s``,
  ``det(c I + u u^T / u^T s) = c^{n-1} (c u^T s + u^T u) / u^T s`` and ``c u^T s + u^T u = y^T y - c s^T y = 0``,
  so ``B_1^{-1} g`` would be rounding noise (a step of 1e17 or a fallback, by the sign of an ulp). On ``H`` the
  dual denominator ``(s - gamma y)^T y`` is exactly zero, so that form skips the pair by its own test;
* before any pair is accepted the step is the gradient scaled by ``min(1, 1 / ||g||)`` (optax's ``lbfgs``:
  a first step no longer than 1 times the learning rate or the line search's step);
* a direction that is not a descent direction (``g^T H g <= 0`` or not finite: SR1's ``B`` may be indefinite
  or singular) is replaced by that scaled gradient and counted in ``state.fallbacks``;
* a non-finite gradient is never folded into the state: the update is zero, the state is kept and
  ``state.nonfinite`` counts the step (the next finite step forms its pair with the last finite step's point,
  the step that was actually taken). A pair whose squared norms or update overflow (a finite gradient near
  overflow, a loss spike) is not folded in either: ``state.nonfinite`` counts it and the step is the scaled
  gradient. A finite pair that fails its test is counted in ``state.skipped``.

Pairs. By default (``same_batch_pairs=False``) ``y_k = g_{k+1} - g_k`` comes from the gradients ``update``
receives, the full-batch setting of the textbooks, where a line search (:func:`scale_by_linesearch`) chooses the
step. On minibatches the two gradients come from different batches and their difference is mostly noise;
``same_batch_pairs=True`` (the stochastic mode: a fixed learning rate, no line search) evaluates the gradient
at the previous point on the *current* batch, ``y_k = g_{k+1}(x_{k+1}) - g_{k+1}(x_k)``, one extra gradient of
``value_fn`` per step (Schraudolph, Yu & Günter 2007; Byrd, Hansen, Nocedal & Singer 2016 use the same idea
with separate Hessian-vector products).

:func:`scale_by_linesearch` composes a line search with this library's extra-argument protocol, as
``optax.lbfgs`` chains them: the Moré-Thuente search (strong Wolfe conditions, Moré & Thuente 1994;
:mod:`optax_second_order.transforms.linesearch`), optax's own ``scale_by_zoom_linesearch`` (strong Wolfe, N&W
Algorithms 3.5-3.6) or ``scale_by_backtracking_linesearch`` (Armijo); see its docstring.

References: J. Nocedal & S. J. Wright, *Numerical Optimization*, 2nd ed., 2006; J. E. Dennis & R. B. Schnabel,
*Numerical Methods for Unconstrained Optimization and Nonlinear Equations*, 1983; N. N. Schraudolph, J. Yu &
S. Günter, "A stochastic quasi-Newton method for online convex optimization", AISTATS 2007; R. H. Byrd, S. L.
Hansen, J. Nocedal & Y. Singer, "A stochastic quasi-Newton method for large-scale optimization", SIAM J.
Optim. 2016.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_second_order.curvature import secant
from optax_second_order.transforms.linesearch import scale_by_more_thuente_linesearch
from optax_second_order.transforms.common import (
    all_finite,
    check,
    check_choice,
    extra_arg,
    has_masked_leaves,
    masked_extras,
    masked_view,
    require_params,
    stat_dtype,
    static_int,
    value_at,
)

__all__ = [
    "QuasiNewtonState",
    "LBFGSState",
    "LinesearchState",
    "scale_by_quasi_newton",
    "scale_by_lbfgs",
    "scale_by_linesearch",
    "QUASI_NEWTON_METHODS",
    "LINESEARCHES",
]

PyTree = Any

QUASI_NEWTON_METHODS = ("bfgs", "bfgs_cholesky", "dfp", "sr1", "sr1_inverse")
"""The update rules of :func:`scale_by_quasi_newton`."""

LINESEARCHES = ("zoom", "more_thuente", "backtracking")
"""The line searches :func:`scale_by_linesearch` builds by name."""

_ON_B = ("bfgs_cholesky", "sr1")  # the matrix kept approximates the Hessian (as L or B), not its inverse


class QuasiNewtonState(NamedTuple):
    """State of :func:`scale_by_quasi_newton`: one dense matrix and the last finite step's point and gradient."""

    count: jax.Array  # int32, finite steps taken (the pair needs count > 0)
    matrix: jax.Array  # (n, n): H ("bfgs", "dfp", "sr1_inverse"), B ("sr1") or the Cholesky factor L of B
    params: jax.Array  # (n,): the flattened parameters of the last finite step
    grads: jax.Array  # (n,): the flattened gradient of the last finite step (zeros with same_batch_pairs)
    num_pairs: jax.Array  # int32, pairs accepted into the matrix
    skipped: jax.Array  # int32, finite pairs that failed the update's test
    fallbacks: jax.Array  # int32, directions that were not descent directions, replaced by the scaled gradient
    nonfinite: jax.Array  # int32, steps with non-finite gradients or pairs (not folded in)


class LBFGSState(NamedTuple):
    """State of :func:`scale_by_lbfgs`: the pair memory and the last finite step's point and gradient."""

    count: jax.Array  # int32, finite steps taken
    memory: secant.LBFGSMemory
    params: PyTree  # the parameters of the last finite step (float32 or better)
    grads: PyTree  # the gradient of the last finite step (zeros with same_batch_pairs)
    skipped: jax.Array  # int32
    fallbacks: jax.Array  # int32
    nonfinite: jax.Array  # int32


# --- flattening ------------------------------------------------------------------------------------------


def _dtype(tree: PyTree) -> jnp.dtype:
    leaves = jax.tree.leaves(tree)
    return stat_dtype(jnp.result_type(*leaves)) if leaves else jnp.dtype(jnp.float32)


def _flatten(tree: PyTree, dtype) -> jax.Array:
    """The leaves of ``tree`` raveled and concatenated, in ``dtype``."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((0,), dtype)
    return jnp.concatenate([jnp.ravel(x).astype(dtype) for x in leaves])


def _unflatten(vector: jax.Array, like: PyTree) -> PyTree:
    """``vector`` cut into ``like``'s leaves, in their shapes and dtypes."""
    leaves, treedef = jax.tree.flatten(like)
    out, start = [], 0
    for leaf in leaves:
        size = math.prod(jnp.shape(leaf))
        out.append(vector[start : start + size].reshape(jnp.shape(leaf)).astype(jnp.result_type(leaf)))
        start += size
    return jax.tree.unflatten(treedef, out)


# --- shared pieces of the two transformations -------------------------------------------------------------


def _capped_gradient(g: jax.Array) -> jax.Array:
    """``min(1, 1 / ||g||) g``: the step before any pair (optax's ``lbfgs``) and the safe fallback."""
    norm = jnp.linalg.norm(g)
    return jnp.minimum(1.0, 1.0 / jnp.where(norm > 0, norm, 1.0)) * g


def _is_descent(direction_dot_grad: jax.Array, direction_finite: jax.Array, grad_norm: jax.Array) -> jax.Array:
    """Whether ``-d`` descends: ``d . g > 0`` and ``d`` finite (a zero gradient needs no fallback)."""
    return direction_finite & ((direction_dot_grad > 0) | (grad_norm == 0))


def _count(flag: jax.Array) -> jax.Array:
    return flag.astype(jnp.int32)


def _pair_finite(s: PyTree, y: PyTree) -> jax.Array:
    """Whether ``s``, ``y`` and their squared norms are finite: a gradient near overflow (a loss spike) is finite
    while ``y^T y`` is not, and such a pair would put infinities into the matrix or the memory."""
    return all_finite((s, y)) & jnp.isfinite(optax.tree.vdot(s, s) + optax.tree.vdot(y, y))


def _keep_state_if(ok: jax.Array, new: NamedTuple, old: NamedTuple) -> NamedTuple:
    """``new`` where ``ok``, else ``old`` (leafwise)."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def _previous_gradient(value_fn: Callable, previous: PyTree, count: jax.Array) -> PyTree:
    """``grad value_fn(previous)`` on the current batch (zeros on the first step, where there is no pair)."""
    return jax.lax.cond(
        count > 0,
        lambda: jax.tree.map(lambda g, p: g.astype(p.dtype), jax.grad(value_fn)(previous), previous),
        lambda: jax.tree.map(jnp.zeros_like, previous),
    )


# --- dense quasi-Newton ----------------------------------------------------------------------------------


def _initial_matrix(method: str, gamma: jax.Array, n: int, dtype) -> jax.Array:
    """``H_0 = gamma I``, ``B_0 = I / gamma`` or its Cholesky factor ``I / sqrt(gamma)`` (N&W eq. 6.20)."""
    eye = jnp.eye(n, dtype=dtype)
    if method == "sr1":
        return eye / gamma
    if method == "bfgs_cholesky":
        return eye / jnp.sqrt(gamma)
    return gamma * eye


def _secant_update(method: str, matrix, s, y, min_cosine, damp: bool):
    """The chosen secant update: ``(new_matrix, used)``."""
    if method == "bfgs":
        return secant.bfgs_inverse_update(matrix, s, y, min_cosine, damp=damp)
    if method == "bfgs_cholesky":
        return secant.bfgs_cholesky_update(matrix, s, y, min_cosine, damp=damp)
    if method == "dfp":
        return secant.dfp_inverse_update(matrix, s, y, min_cosine, damp=damp)
    if method == "sr1":
        return secant.sr1_update(matrix, s, y, min_cosine)
    return secant.sr1_inverse_update(matrix, s, y, min_cosine)


def _precondition(method: str, matrix: jax.Array, g: jax.Array) -> jax.Array:
    """``H g``: a product with ``H``, an LU solve with ``B`` or two triangular solves with ``L``."""
    highest = jax.lax.Precision.HIGHEST
    if method == "sr1":
        return jnp.linalg.solve(matrix, g)
    if method == "bfgs_cholesky":
        return jax.scipy.linalg.cho_solve((matrix, True), g)
    return jnp.matmul(matrix, g, precision=highest)


def _dense_step(method, state: QuasiNewtonState, x, g, g_previous, min_cosine, damp):
    """Pair, update, direction: the new state (before the non-finite guard) and ``+H g``.

    A pair that is not finite, or whose update (or first scaling) is not, is not folded in: it is counted in
    ``nonfinite`` and the step falls back to the capped gradient (the kept matrix does not fit such a gradient).
    """
    n = x.shape[0]
    has_pair = state.count > 0
    s, y = x - state.params, g - g_previous
    # The first finite pair scales the initial matrix (N&W eq. 6.20), once, whether or not the update then
    # takes it (scipy's HessianUpdateStrategy does the same). SR1 does not fold that pair in: the module docstring
    # shows that the update would make B_1 exactly singular.
    first = has_pair & (state.num_pairs + state.skipped == 0)
    start = _initial_matrix(method, secant.initial_inverse_scale(s, y), n, state.matrix.dtype)
    current = jnp.where(first, start, state.matrix)
    updated, used = _secant_update(method, current, s, y, min_cosine, damp)
    if method in ("sr1", "sr1_inverse"):
        used = used & ~first
    candidate = jnp.where(used, updated, current)
    pair_finite = _pair_finite(s, y) & all_finite(candidate)
    taken = has_pair & pair_finite
    matrix = jnp.where(taken, candidate, state.matrix)
    used = taken & used
    num_pairs = state.num_pairs + _count(used)
    skipped = state.skipped + _count(taken & ~used)

    direction = _precondition(method, matrix, g)
    safe = _capped_gradient(g)
    descent = _is_descent(jnp.dot(direction, g), jnp.all(jnp.isfinite(direction)), jnp.linalg.norm(g))
    scaled = num_pairs + skipped > 0  # H_0 has its scale: from now on H g
    fallback = scaled & ~descent
    overflow = has_pair & ~pair_finite
    direction = jnp.where(~scaled | fallback | overflow, safe, direction)
    new_state = QuasiNewtonState(
        count=state.count + 1,
        matrix=matrix,
        params=x,
        grads=g,
        num_pairs=num_pairs,
        skipped=skipped,
        fallbacks=state.fallbacks + _count(fallback),
        nonfinite=state.nonfinite + _count(overflow),
    )
    return new_state, direction


def scale_by_quasi_newton(
    method: str = "bfgs",
    *,
    min_cosine: float = 1e-8,
    damp: bool = False,
    same_batch_pairs: bool = False,
    max_precond_dim: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Dense quasi-Newton preconditioning ``g -> H g`` over the flattened parameters (module docstring).

    Args:
      method: the secant update, one of :data:`QUASI_NEWTON_METHODS`: ``"bfgs"`` (on ``H``),
        ``"bfgs_cholesky"`` (on ``B = L L^T``), ``"dfp"`` (on ``H``), ``"sr1"`` (on ``B``), ``"sr1_inverse"``
        (on ``H``).
      min_cosine: the skip threshold of the pair test (``1e-8``, scipy's ``min_curvature`` for skipping).
      damp: Powell-damp BFGS and DFP pairs instead of skipping them (ignored by SR1).
      same_batch_pairs: form ``y`` from two gradients of the current batch (one extra gradient of
        ``value_fn`` per step; ``update`` then needs ``value_fn``): the stochastic mode.
      max_precond_dim: the largest number of parameters accepted (default 10000: the ``n x n`` matrix);
        larger models raise a ``ValueError`` at ``init`` (use :func:`scale_by_lbfgs`).

    ``update(grads, state, params, ...)`` needs ``params``; returns ``+H g`` in the gradient's dtypes.
    """
    name = f"scale_by_quasi_newton(method={method!r})"
    check_choice("scale_by_quasi_newton", "method", method, QUASI_NEWTON_METHODS)
    check(name, "min_cosine", min_cosine, lambda v: 0 <= v < 1, "in [0, 1)")
    limit = static_int(name, "max_precond_dim", max_precond_dim, 10_000)

    def init_fn(params):
        dtype = _dtype(params)
        n = sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(params))
        if n > limit:
            raise ValueError(
                f"{name}: the parameters have {n} entries, more than max_precond_dim={limit}: a dense {n} x {n} "
                "matrix is too large; use scale_by_lbfgs (oso.lbfgs), or raise max_precond_dim"
            )

        def zero():
            return jnp.zeros([], jnp.int32)

        return QuasiNewtonState(
            zero(), jnp.eye(n, dtype=dtype), jnp.zeros((n,), dtype), jnp.zeros((n,), dtype), zero(), zero(), zero(),
            zero(),
        )

    def update_fn(updates, state, params=None, **extra):
        params = require_params(params, name)
        if not jax.tree.leaves(updates):  # an empty tree (as optax takes it): no pair, no direction; the step counts
            return updates, state._replace(count=state.count + 1)
        extra = masked_extras(params, extra, name)
        value_fn = extra_arg(extra, "value_fn", name) if same_batch_pairs else None
        dtype = state.matrix.dtype
        g, x = _flatten(updates, dtype), _flatten(params, dtype)
        if same_batch_pairs:
            previous = _unflatten(state.params, params)
            g_previous = _flatten(_previous_gradient(value_fn, previous, state.count), dtype)
        else:
            g_previous = state.grads
        new_state, direction = _dense_step(method, state, x, g, g_previous, min_cosine, damp)
        if same_batch_pairs:
            new_state = new_state._replace(grads=jnp.zeros_like(g))
        finite = jnp.all(jnp.isfinite(g)) & jnp.all(jnp.isfinite(x))
        new_state = _keep_state_if(finite, new_state, state._replace(nonfinite=state.nonfinite + 1))
        direction = jnp.where(finite & jnp.all(jnp.isfinite(direction)), direction, 0.0)
        return _unflatten(direction, updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --- L-BFGS ----------------------------------------------------------------------------------------------


def _lbfgs_step(state: LBFGSState, x, g, g_previous, min_cosine):
    """Pair into the memory, then the two-loop direction: the new state and ``+H g``. A pair that is not finite
    (or whose squared norms overflow) is counted in ``nonfinite``, and the step is the capped gradient."""
    has_pair = state.count > 0
    s = jax.tree.map(jnp.subtract, x, state.params)
    y = jax.tree.map(jnp.subtract, g, g_previous)
    pair_finite = _pair_finite(s, y)
    memory, used = secant.lbfgs_update_memory(state.memory, s, y, min_cosine)
    used = has_pair & pair_finite & used
    memory = jax.tree.map(lambda new, old: jnp.where(used, new, old), memory, state.memory)

    direction = secant.lbfgs_two_loop(memory, g)
    flat_g = jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(g)]) if jax.tree.leaves(g) else jnp.zeros(0)
    grad_norm = jnp.linalg.norm(flat_g)
    descent = _is_descent(optax.tree.vdot(direction, g), all_finite(direction), grad_norm)
    fallback = (memory.count > 0) & ~descent
    scale = jnp.minimum(1.0, 1.0 / jnp.where(grad_norm > 0, grad_norm, 1.0))
    use_safe = (memory.count == 0) | fallback | (has_pair & ~pair_finite)
    direction = jax.tree.map(lambda d, gi: jnp.where(use_safe, scale * gi, d), direction, g)
    new_state = LBFGSState(
        count=state.count + 1,
        memory=memory,
        params=x,
        grads=g,
        skipped=state.skipped + _count(has_pair & pair_finite & ~used),
        fallbacks=state.fallbacks + _count(fallback),
        nonfinite=state.nonfinite + _count(has_pair & ~pair_finite),
    )
    return new_state, direction


def scale_by_lbfgs(
    memory_size: int | None = None,
    *,
    min_cosine: float = 1e-8,
    same_batch_pairs: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """L-BFGS preconditioning ``g -> H g`` by the two-loop recursion over the last ``m`` accepted pairs.

    ``H`` is BFGS applied to ``H_0 = gamma I`` with the stored pairs, ``gamma = s^T y / y^T y`` of the newest
    (N&W Algorithm 7.4, eq. 7.20). Before the first accepted pair the step is ``min(1, 1 / ||g||) g``, as in
    ``optax.scale_by_lbfgs``; unlike it, pairs failing ``s^T y > min_cosine ||s|| ||y||`` are skipped (so
    ``H`` stays positive definite without a Wolfe line search) and non-finite gradients are never stored.

    Args:
      memory_size: ``m`` (default 10, as ``optax.lbfgs``; N&W suggest 3 to 20). It sets array shapes: with
        ``optax.inject_hyperparams`` list it in ``static_args``.
      min_cosine: the curvature test's threshold.
      same_batch_pairs: form ``y`` from two gradients of the current batch (one extra gradient of ``value_fn``
        per step; ``update`` then needs ``value_fn``): the stochastic mode.

    ``update(grads, state, params, ...)`` needs ``params``; returns ``+H g`` in the gradient's dtypes.
    """
    name = "scale_by_lbfgs"
    m = static_int(name, "memory_size", memory_size, 10)
    check(name, "min_cosine", min_cosine, lambda v: 0 <= v < 1, "in [0, 1)")

    def init_fn(params):
        def zeros(p):
            return jnp.zeros(jnp.shape(p), stat_dtype(jnp.result_type(p)))

        def zero():
            return jnp.zeros([], jnp.int32)

        return LBFGSState(
            zero(), secant.lbfgs_init_memory(params, m), jax.tree.map(zeros, params), jax.tree.map(zeros, params),
            zero(), zero(), zero(),
        )

    def update_fn(updates, state, params=None, **extra):
        params = require_params(params, name)
        if not jax.tree.leaves(updates):  # an empty tree (as optax takes it): no pair, no direction; the step counts
            return updates, state._replace(count=state.count + 1)
        extra = masked_extras(params, extra, name)
        value_fn = extra_arg(extra, "value_fn", name) if same_batch_pairs else None
        g = jax.tree.map(lambda u, p: u.astype(p.dtype), updates, state.params)
        x = jax.tree.map(lambda v, p: v.astype(p.dtype), params, state.params)
        if same_batch_pairs:
            previous = jax.tree.map(lambda p, like: p.astype(jnp.result_type(like)), state.params, params)
            g_previous = jax.tree.map(
                lambda v, p: v.astype(p.dtype), _previous_gradient(value_fn, previous, state.count), state.params
            )
        else:
            g_previous = state.grads
        new_state, direction = _lbfgs_step(state, x, g, g_previous, min_cosine)
        if same_batch_pairs:
            new_state = new_state._replace(grads=jax.tree.map(jnp.zeros_like, g))
        finite = all_finite((g, x))
        new_state = _keep_state_if(finite, new_state, state._replace(nonfinite=state.nonfinite + 1))
        ok = finite & all_finite(direction)
        direction = jax.tree.map(lambda d, u: jnp.where(ok, d, 0.0).astype(u.dtype), direction, updates)
        return direction, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --- line searches ---------------------------------------------------------------------------------------


class LinesearchState(NamedTuple):
    """State of :func:`scale_by_linesearch`: optax's line-search state and a step counter (for schedules)."""

    count: jax.Array  # int32
    linesearch: Any  # ScaleByZoomLinesearchState, ScaleByMoreThuenteLinesearchState, ... (or the given one's)
    nonfinite: jax.Array  # int32, searches that gave a non-finite step (zero update, state kept)


def _default_float_value(value_fn: Callable) -> Callable:
    """``value_fn`` returning its value in the default float type (float64 under ``jax_enable_x64``)."""
    return lambda params: jnp.asarray(value_fn(params), jnp.result_type(float))


def _restore_evaluation(inner_state, stale: jax.Array, value_fn: Callable, params: PyTree, step: PyTree):
    """The line-search state with the value and gradient at ``params + step`` when ``stale`` (a learning rate that
    is not 1 moved the parameters elsewhere than the accepted point): one more evaluation of ``value_fn`` and its
    gradient, so that ``optax.value_and_grad_from_state`` reuses correct (and finite) ones."""

    def evaluate():
        value, grad = jax.value_and_grad(value_fn)(optax.apply_updates(params, step))
        cast = jax.tree.map(lambda new, old: new.astype(jnp.result_type(old)), grad, inner_state.grad)
        return jnp.asarray(value, jnp.result_type(inner_state.value)), cast

    value, grad = jax.lax.cond(stale, evaluate, lambda: (inner_state.value, inner_state.grad))
    return inner_state._replace(value=value, grad=grad)


def _optax_linesearch(kind, max_linesearch_steps, slope_rtol, curv_rtol):
    if kind == "more_thuente":
        # first trial 1 (L-BFGS-B's driver of dcsrch; the module docstring of transforms/linesearch.py says why not
        # scipy BFGS's interpolated one), xtol 1e-14 (scipy's BFGS driver)
        return scale_by_more_thuente_linesearch(max_linesearch_steps, slope_rtol=slope_rtol, curv_rtol=curv_rtol)
    if kind == "zoom":
        # initial_guess_strategy="one": a quasi-Newton step has the right length near the solution (optax.lbfgs).
        return optax.scale_by_zoom_linesearch(
            max_linesearch_steps=max_linesearch_steps, slope_rtol=slope_rtol, curv_rtol=curv_rtol,
            initial_guess_strategy="one",
        )
    # increase_factor=inf: every search starts from the full step (max_learning_rate=1), as N&W Algorithm 3.1.
    return optax.scale_by_backtracking_linesearch(
        max_backtracking_steps=max_linesearch_steps, slope_rtol=slope_rtol, increase_factor=math.inf, store_grad=True
    )


def scale_by_linesearch(
    linesearch: str | optax.GradientTransformation = "zoom",
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    max_linesearch_steps: int = 20,
    slope_rtol: float = 1e-4,
    curv_rtol: float = 0.9,
    name: str = "scale_by_linesearch",
) -> optax.GradientTransformationExtraArgs:
    """optax's line search on a descent direction, adapted to this library's extra-argument protocol.

    The step is ``learning_rate * eta * u`` for the incoming descent direction ``u`` (e.g. ``-H g``) and the
    step size ``eta`` that optax's line search accepts:

    * ``"zoom"``: ``optax.scale_by_zoom_linesearch`` (strong Wolfe conditions with ``slope_rtol = c_1`` and
      ``curv_rtol = c_2``, N&W Algorithms 3.5-3.6, first trial step 1, as ``optax.lbfgs``); Wolfe steps give
      pairs with ``s^T y > 0``;
    * ``"more_thuente"``: :func:`~optax_second_order.scale_by_more_thuente_linesearch` (the same strong Wolfe
      conditions by Moré & Thuente's safeguarded cubic interpolation, MINPACK-2's ``dcsrch`` as in scipy's BFGS
      and L-BFGS-B, first trial 1, ``xtol = 1e-14``);
    * ``"backtracking"``: ``optax.scale_by_backtracking_linesearch`` (Armijo with ``c_1 = slope_rtol``, from the
      full step each time, gradient stored for reuse);
    * an optax line-search transformation of the same protocol, used as given.

    optax's line searches forward every keyword they do not know to ``value_fn``; this one hands them only
    ``value_fn``, ``value`` and ``grad``, so ``model_fn``, ``loss`` and the rest of a chain's extras are
    harmless. ``value`` and ``grad`` (the loss and gradient at ``params``) are computed from ``value_fn`` when
    not given (one more evaluation per step): pass them, e.g. from ``optax.value_and_grad_from_state``, which
    reuses the line search's last evaluation. ``learning_rate`` (default 1) multiplies the accepted step,
    after the search (``optax.lbfgs`` scales the direction before it instead), so the update is linear in it;
    where it is not 1 the value and gradient the search stored are not those at the new parameters, and they are
    evaluated there (one more evaluation of ``value_fn`` and its gradient per step), so that
    ``optax.value_and_grad_from_state`` reuses correct ones.

    Inside ``optax.masked`` (with the extra argument ``full_params``) the search runs on the visible leaves, the
    masked ones held fixed; a given ``grad`` of the whole tree is cut to the visible leaves. A search whose step
    or state is not finite (a non-finite direction or loss) is rejected: zero update, the previous search's state
    kept, counted in ``nonfinite``.

    Args:
      linesearch: one of :data:`LINESEARCHES` or a line-search transformation of optax's protocol.
      learning_rate: a factor (or schedule) on the accepted step.
      max_linesearch_steps: the most function evaluations of one search.
      slope_rtol: ``c_1`` of the sufficient-decrease condition.
      curv_rtol: ``c_2`` of the curvature condition (zoom and Moré-Thuente).
      name: the optimizer named in errors.
    """
    if isinstance(linesearch, str):
        check_choice(name, "linesearch", linesearch, LINESEARCHES)
        check(name, "max_linesearch_steps", max_linesearch_steps, lambda v: v >= 1 and float(v).is_integer(),
              "an integer >= 1")
        check(name, "slope_rtol", slope_rtol, lambda v: 0 < v < 1, "in (0, 1)")
        check(name, "curv_rtol", curv_rtol, lambda v: 0 < v < 1, "in (0, 1)")
        if isinstance(slope_rtol, (int, float)) and isinstance(curv_rtol, (int, float)) and slope_rtol >= curv_rtol:
            raise ValueError(f"{name}: slope_rtol must be < curv_rtol, got {slope_rtol!r} >= {curv_rtol!r}")
        inner = _optax_linesearch(linesearch, max_linesearch_steps, slope_rtol, curv_rtol)
    else:
        inner = linesearch
    backtracking = linesearch == "backtracking"
    inner = optax.with_extra_args_support(inner)
    check(name, "learning_rate", learning_rate, lambda v: v > 0, "> 0 (or a schedule)")

    def init_fn(params):
        # optax's searches fail to initialize on an empty tree, which has nothing to search along
        inner_state = inner.init(params) if jax.tree.leaves(params) else optax.EmptyState()
        return LinesearchState(jnp.zeros([], jnp.int32), inner_state, jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, **extra):
        params = require_params(params, name)
        if not jax.tree.leaves(updates):  # an empty tree: an empty step; the step counts
            return updates, state._replace(count=state.count + 1)
        extra = masked_extras(params, extra, name)
        value_fn = extra_arg(extra, "value_fn", name)
        value, grad = extra.get("value"), extra.get("grad")
        if value is None or grad is None:
            value, grad = jax.value_and_grad(value_fn)(params)
        elif has_masked_leaves(params):  # the whole tree's gradient, cut to the leaves the mask lets through
            grad = masked_view(params, extra, name).restrict(grad)
        if backtracking:
            # optax's backtracking search with store_grad transposes the value's jvp against the Python float 1.0,
            # which under jax_enable_x64 is float64: a float32 loss fails there. The default float type matches it.
            value_fn = _default_float_value(value_fn)
        step, inner_state = inner.update(updates, state.linesearch, params, value=value, grad=grad, value_fn=value_fn)
        factor = value_at(learning_rate, state.count)
        step = jax.tree.map(lambda u: (factor * u).astype(u.dtype), step)
        if getattr(inner_state, "value", None) is not None and getattr(inner_state, "grad", None) is not None:
            inner_state = _restore_evaluation(inner_state, jnp.asarray(factor) != 1, value_fn, params, step)
        # a search that gave a non-finite step or state is rejected: zero update, the previous search's state kept
        ok = all_finite((step, inner_state))
        step = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), step)
        inner_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), inner_state, state.linesearch)
        return step, LinesearchState(state.count + _count(ok), inner_state, state.nonfinite + _count(~ok))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
