r"""The Moré-Thuente line search (MINPACK-2 ``dcsrch`` / ``dcstep``) as a jittable optax transformation.

Along a descent direction ``u`` at ``x`` the search looks for a step ``a > 0`` of ``phi(a) = f(x + a u)`` that
satisfies the strong Wolfe conditions

.. math::

    \phi(a) \le \phi(0) + \mu\, a\, \phi'(0), \qquad |\phi'(a)| \le \eta\, |\phi'(0)|

(``mu = ftol``, ``slope_rtol``; ``eta = gtol``, ``curv_rtol``). It keeps an interval ``I`` with ends
``a_l`` (``stx``: the best step so far) and ``a_u`` (``sty``) and a trial ``a_t``, and updates them by the
paper's rules (Moré & Thuente 1994, section 2, "Updating Algorithm"): with ``psi`` the function in use,

* case U1, ``psi(a_t) > psi(a_l)``: ``a_u = a_t`` (a minimizer is bracketed);
* case U2, ``psi(a_t) <= psi(a_l)`` and ``psi'(a_t) (a_l - a_t) > 0``: ``a_l = a_t``;
* case U3, ``psi(a_t) <= psi(a_l)`` and ``psi'(a_t) (a_l - a_t) < 0``: ``a_u = a_l``, ``a_l = a_t`` (bracketed).

Stage 1 uses the auxiliary function

.. math::

    \psi(a) = \phi(a) - \phi(0) - \mu\, a\, \phi'(0),

stage 2 (from the first trial with ``psi(a_t) <= 0`` and ``phi'(a_t) >= 0``) ``phi`` itself; in stage 1 a
trial with ``phi(a_t) <= phi(a_l)`` but ``psi(a_t) > 0`` is handed to the step with ``psi``'s values
(MINPACK-2's "modified function"), every other one with ``phi``'s.

The next trial (section 4, :func:`more_thuente_step`) comes from the cubic ``c`` that interpolates
``psi`` and ``psi'`` at ``a_l`` and ``a_t``, the quadratic ``q`` that interpolates ``psi(a_l)``,
``psi'(a_l)``, ``psi(a_t)`` and the secant ``s`` of ``psi'`` through the two points; with ``f_l, f_t`` and
``g_l, g_t`` the values and derivatives:

1. ``f_t > f_l``: ``a_c`` if it is closer to ``a_l`` than ``a_q``, else ``(a_c + a_q) / 2``;
2. ``f_t <= f_l``, ``g_t g_l < 0``: ``a_c`` if it is farther from ``a_t`` than ``a_s``, else ``a_s``;
3. ``f_t <= f_l``, ``g_t g_l >= 0``, ``|g_t| < |g_l|``: the cubic's minimizer if the cubic tends to infinity
   in the step's direction (or it lies beyond ``a_t``), else the interval's end, compared with ``a_s``:
   bracketed, the one closer to ``a_t``, cut to ``a_t + 0.66 (a_u - a_t)``; not bracketed, the one farther;
4. ``f_t <= f_l``, ``g_t g_l >= 0``, ``|g_t| >= |g_l|``: bracketed, the minimizer of the cubic through
   ``a_t`` and ``a_u``; otherwise the interval's far end (extrapolation).

Safeguards: until a minimizer is bracketed a trial lies in ``[a_t + 1.1 (a_t - a_l), a_t + 4 (a_t - a_l)]``
(``xtrapl``, ``xtrapu``); once bracketed, a step that does not shrink the interval by 0.66 in two trials is
replaced by bisection; all trials lie in ``[min_learning_rate, max_learning_rate]``. The search ends with
``CONVERGED`` when both conditions hold, or with a warning when the interval is below ``xtol`` relative to its
upper end, when rounding errors prevent progress, or at a bound of the step (as ``dcsrch``): then the step is the
better (in ``phi``) of the last trial and ``a_l``.

Departures from ``dcsrch``: a trial where ``phi`` or ``phi'`` is not finite (an overflow) is not folded in; the next
trial halves the distance from ``a_l`` and no later trial goes beyond it; the square roots of the cubic's
discriminant are taken of ``max(0, .)`` in all four cases (``dcstep`` guards case 3 only; a negative
discriminant there gives a NaN step, which scipy reports as a failure).

Approximate decrease (``approx_dec_rtol``, on by default in the transformation): near a minimizer in low precision
the decrease ``mu a phi'(0)`` that the first condition asks for falls below the rounding error of ``phi`` (in float32,
``f = 7.9`` is known to about ``1e-6``), no trial can show it, and every search ends at ``max_linesearch_steps`` with a
step that does not move the parameters: the iteration stalls (L-BFGS on Wood's function in float32 did, at
``f = 7.88``). As in optax's zoom search, a trial that meets the curvature condition is then also accepted when
``phi(a) <= phi(0) + eps |phi(0)|`` (Hager & Zhang 2005, "approximate Wolfe conditions", ``eps = 1e-6``). The
curvature condition still gives ``s^T y >= (1 - eta) a |phi'(0)| > 0``.

The first trial (``initial_guess_strategy``): ``"one"`` (the default; L-BFGS-B's choice after its first
iteration), or ``"interpolated"``, scipy's choice for its BFGS, ``a_0 = min(1, 1.01 * 2 (f_k - f_{k-1}) /
phi'(0))`` (the minimizer of the quadratic through ``f_{k-1}``, ``f_k`` and ``phi'(0)`` if the decrease repeats,
N&W eq. 3.60), 1 when that is not positive, and 1 on the first search. The interpolation serves scipy's BFGS,
whose ``H_0 = I`` has no scale; this library's quasi-Newton methods scale ``H_0`` by ``s^T y / y^T y`` (N&W eq.
6.20), so their step of 1 has the right length, and ``"one"`` takes fewer evaluations: 96 against 102 for BFGS on
Rosenbrock-10 (with ``H_0 = I`` the interpolated trial gives scipy's 84; see docs/benchmark.md).

References: J. J. Moré & D. J. Thuente, "Line search algorithms with guaranteed sufficient decrease", ACM TOMS
20(3), 286-307, 1994; MINPACK-2 ``dcsrch`` / ``dcstep`` (B. M. Averick, R. G. Carter & J. J. Moré, 1993);
J. Nocedal & S. J. Wright, *Numerical Optimization*, 2nd ed., 2006, section 3.5; W. W. Hager & H. Zhang, "A new
conjugate gradient method with guaranteed descent and an efficient line search", SIAM J. Optim. 16(1), 2005.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_second_order.transforms.common import check, check_choice

__all__ = [
    "MoreThuenteInfo",
    "ScaleByMoreThuenteLinesearchState",
    "MoreThuenteResult",
    "MORE_THUENTE_STATUS",
    "more_thuente_step",
    "more_thuente_search",
    "scale_by_more_thuente_linesearch",
]

PyTree = Any

XTRAPL = 1.1  # dcsrch's lower extrapolation factor
XTRAPU = 4.0  # dcsrch's upper extrapolation factor
_SHRINK = 0.66  # the interval must shrink by this factor in two trials, or the next is a bisection
_RUNNING, _CONVERGED, _ROUNDING, _XTOL, _AT_MAX, _AT_MIN, _MAX_STEPS, _NOT_DESCENT = range(8)
MORE_THUENTE_STATUS = (
    "running", "converged", "rounding errors prevent progress", "xtol test satisfied", "step at max_learning_rate",
    "step at min_learning_rate", "max_linesearch_steps reached", "not a descent direction",
)
"""The meaning of :attr:`MoreThuenteInfo.status` (an index into this tuple); 1 is success."""


# --- the safeguarded step (dcstep) ------------------------------------------------------------------------


def _gamma(theta, d1, d2, sign):
    """``sign * s * sqrt((theta/s)^2 - (d1/s)(d2/s))``, ``s = max(|theta|, |d1|, |d2|)`` (against overflow): the
    square root in the minimizer of the cubic with ``theta = 3 (f_1 - f_2) / (a_2 - a_1) + d_1 + d_2``."""
    s = jnp.maximum(jnp.maximum(jnp.abs(theta), jnp.abs(d1)), jnp.abs(d2))
    return sign * s * jnp.sqrt(jnp.maximum(0.0, (theta / s) ** 2 - (d1 / s) * (d2 / s)))


def more_thuente_step(stx, fx, dx, sty, fy, dy, stp, fp, dp, brackt, stpmin, stpmax):
    """One safeguarded step (MINPACK-2 ``dcstep``; Moré & Thuente 1994, section 4, cases 1-4) and the interval
    update (section 2's rules U1-U3).

    ``stx`` is the best step so far (with value ``fx`` and derivative ``dx``, ``dx (stp - stx) < 0``), ``sty`` the
    other end, ``stp`` the trial just evaluated; ``stpmin``, ``stpmax`` bound the new step when not bracketed.
    Returns ``(stx, fx, dx, sty, fy, dy, stp, brackt, moved)``, ``stp`` the new trial (before the search's
    bisection and bounds) and ``moved`` whether ``stx`` became the old trial. The cubic's minimizer is written as
    ``a + r (b - a)``, ``r = p / q``, with ``p`` and ``q`` from ``theta`` and ``gamma`` (:func:`_gamma`).
    """
    sgnd = jnp.sign(dp) * jnp.sign(dx)
    higher = fp > fx
    opposite = ~higher & (sgnd < 0)
    smaller = ~higher & ~opposite & (jnp.abs(dp) < jnp.abs(dx))
    theta = 3.0 * (fx - fp) / (stp - stx) + dx + dp  # the cubic through stx and stp (cases 1-3)
    # Case 1: a higher value. The cubic's step if it is closer to stx than the quadratic's, else their mean.
    gamma = _gamma(theta, dx, dp, jnp.where(stp < stx, -1.0, 1.0))
    stpc = stx + (((gamma - dx) + theta) / (((gamma - dx) + gamma) + dp)) * (stp - stx)
    stpq = stx + ((dx / ((fx - fp) / (stp - stx) + dx)) / 2.0) * (stp - stx)
    step1 = jnp.where(jnp.abs(stpc - stx) <= jnp.abs(stpq - stx), stpc, stpc + (stpq - stpc) / 2.0)
    # Cases 2 and 3 write the cubic from stp and compare it with the secant step of the derivative.
    secant = stp + (dp / (dp - dx)) * (stx - stp)
    # Case 2: derivatives of opposite signs. The cubic's step if it is farther from stp than the secant's.
    gamma = _gamma(theta, dx, dp, jnp.where(stp > stx, -1.0, 1.0))
    stpc = stp + (((gamma - dp) + theta) / (((gamma - dp) + gamma) + dx)) * (stx - stp)
    step2 = jnp.where(jnp.abs(stpc - stp) > jnp.abs(secant - stp), stpc, secant)
    # Case 3: same signs, |derivative| decreases. The cubic's minimizer if the cubic tends to infinity in the
    # step's direction or its minimizer lies beyond stp (gamma = 0: it does not), else the bound in that direction.
    r = ((gamma - dp) + theta) / ((gamma + (dx - dp)) + gamma)
    stpc = jnp.where((r < 0) & (gamma != 0), stp + r * (stx - stp), jnp.where(stp > stx, stpmax, stpmin))
    closer = jnp.where(jnp.abs(stpc - stp) < jnp.abs(secant - stp), stpc, secant)
    cap = stp + _SHRINK * (sty - stp)
    farther = jnp.where(jnp.abs(stpc - stp) > jnp.abs(secant - stp), stpc, secant)
    step3 = jnp.where(
        brackt,
        jnp.where(stp > stx, jnp.minimum(cap, closer), jnp.maximum(cap, closer)),
        jnp.clip(farther, stpmin, stpmax),
    )
    # Case 4: same signs, |derivative| does not decrease: the cubic through stp and sty, or the bound (extrapolation).
    theta = 3.0 * (fp - fy) / (sty - stp) + dy + dp
    gamma = _gamma(theta, dy, dp, jnp.where(stp > sty, -1.0, 1.0))
    stpc = stp + (((gamma - dp) + theta) / (((gamma - dp) + gamma) + dy)) * (sty - stp)
    step4 = jnp.where(brackt, stpc, jnp.where(stp > stx, stpmax, stpmin))

    new_stp = jnp.where(higher, step1, jnp.where(opposite, step2, jnp.where(smaller, step3, step4)))
    # U1: the trial becomes the upper end. U3: the old best does. U2 and U3: the trial becomes the best.
    sty, fy, dy = (jnp.where(higher, t, jnp.where(opposite, x, y)) for t, x, y in
                   ((stp, stx, sty), (fp, fx, fy), (dp, dx, dy)))
    moved = ~higher
    stx, fx, dx = (jnp.where(moved, t, x) for t, x in ((stp, stx), (fp, fx), (dp, dx)))
    return stx, fx, dx, sty, fy, dy, new_stp, brackt | higher | opposite, moved


# --- the search (dcsrch) ------------------------------------------------------------------------------------


class MoreThuenteResult(NamedTuple):
    """The end of :func:`more_thuente_search`."""

    step: jax.Array  # the accepted step
    value: jax.Array  # phi(step)
    slope: jax.Array  # phi'(step)
    aux: Any  # what the function returned beside its value and slope at the accepted step
    num_steps: jax.Array  # int32, evaluations of the function
    status: jax.Array  # int32, an index into MORE_THUENTE_STATUS
    trial: jax.Array  # the next trial it would evaluate (after max_steps), else the last trial it evaluated


class _Search(NamedTuple):
    stp: jax.Array  # the trial to evaluate next
    stx: jax.Array
    fx: jax.Array
    gx: jax.Array
    sty: jax.Array
    fy: jax.Array
    gy: jax.Array
    stmin: jax.Array
    stmax: jax.Array
    width: jax.Array
    width1: jax.Array
    brackt: jax.Array
    stage: jax.Array  # 1 or 2
    upper: jax.Array  # the step bound: max_step, lowered to the smallest trial with a non-finite value
    aux_x: Any  # aux at stx
    last: jax.Array  # the last trial evaluated, its value, slope and aux
    f: jax.Array
    g: jax.Array
    aux: Any
    count: jax.Array
    status: jax.Array


def more_thuente_search(
    fun: Callable[[jax.Array], tuple[jax.Array, jax.Array, Any]],
    step: jax.Array,
    value: jax.Array,
    slope: jax.Array,
    aux: Any = None,
    *,
    ftol: float = 1e-4,
    gtol: float = 0.9,
    xtol: float = 1e-14,
    min_step: float = 0.0,
    max_step: float = 1e10,
    max_steps: int = 20,
    approx_dec_rtol: float | None = None,
) -> MoreThuenteResult:
    """Moré-Thuente search on ``fun(a) -> (phi(a), phi'(a), aux)`` from the first trial ``step``.

    ``value``, ``slope`` and ``aux`` are ``phi(0)``, ``phi'(0) < 0`` and ``aux`` at 0 (the module docstring has the
    algorithm). Runs on ``jax.lax.while_loop``: at most ``max_steps`` evaluations of ``fun``. Ends with status 1
    (``CONVERGED``: both Wolfe conditions hold at the step) or a warning (``MORE_THUENTE_STATUS``), where the step
    is the better of the last trial and the best step so far; ``slope >= 0`` gives status 7 and step 0 without
    evaluating ``fun``. With ``approx_dec_rtol`` (``eps``) a trial that meets the curvature condition also converges
    when ``phi(a) <= phi(0) + eps |phi(0)|`` (Hager & Zhang's approximate decrease, module docstring); ``None``:
    ``dcsrch``'s test alone.
    """
    dtype = jnp.result_type(value)
    value, slope, step = (jnp.asarray(v, dtype) for v in (value, slope, step))
    ftol, gtol, xtol, min_step, max_step = (jnp.asarray(v, dtype) for v in (ftol, gtol, xtol, min_step, max_step))
    gtest = ftol * slope
    zero = jnp.zeros([], dtype)
    init = _Search(
        stp=step, stx=zero, fx=value, gx=slope, sty=zero, fy=value, gy=slope, stmin=zero,
        stmax=step + XTRAPU * step, width=max_step - min_step, width1=(max_step - min_step) / 0.5,
        brackt=jnp.asarray(False), stage=jnp.asarray(1, jnp.int32), upper=max_step, aux_x=aux, last=zero, f=value,
        g=slope, aux=aux, count=jnp.asarray(0, jnp.int32),
        status=jnp.where(slope < 0, _RUNNING, _NOT_DESCENT).astype(jnp.int32),
    )

    def cond(s: _Search):
        return (s.status == _RUNNING) & (s.count < max_steps)

    def body(s: _Search):
        stp = s.stp
        f, g, aux_t = fun(stp)
        f, g = jnp.asarray(f, dtype), jnp.asarray(g, dtype)
        s = s._replace(last=stp, f=f, g=g, aux=aux_t, count=s.count + 1)
        finite = jnp.isfinite(f) & jnp.isfinite(g)
        tested = _tests(s, stp, f, g)
        updated = _update(tested, stp, f, g, aux_t)
        # a non-finite trial: halve the distance from the best step, never go beyond it again
        halved = s._replace(stp=s.stx + 0.5 * (stp - s.stx), upper=jnp.minimum(s.upper, stp))
        return jax.tree.map(lambda a, b: jnp.where(finite, a, b), updated, halved)

    def _tests(s: _Search, stp, f, g):
        ftest = value + stp * gtest
        stage = jnp.where((s.stage == 1) & (f <= ftest) & (g >= 0), 2, s.stage)
        status = jnp.asarray(_RUNNING, jnp.int32)
        status = jnp.where(s.brackt & ((stp <= s.stmin) | (stp >= s.stmax)), _ROUNDING, status)
        status = jnp.where(s.brackt & (s.stmax - s.stmin <= xtol * s.stmax), _XTOL, status)
        status = jnp.where((stp == max_step) & (f <= ftest) & (g <= gtest), _AT_MAX, status)
        status = jnp.where((stp == min_step) & ((f > ftest) | (g >= gtest)), _AT_MIN, status)
        decrease = f <= ftest
        if approx_dec_rtol is not None:
            decrease = decrease | (f <= value + approx_dec_rtol * jnp.abs(value))
        status = jnp.where(decrease & (jnp.abs(g) <= gtol * -slope), _CONVERGED, status)
        return s._replace(stage=stage, status=status.astype(jnp.int32))

    def _update(s: _Search, stp, f, g, aux_t):
        ftest = value + stp * gtest
        # stage 1, a lower value that is not a sufficient decrease: the step sees psi (shift by ftol * phi'(0))
        shift = jnp.where((s.stage == 1) & (f <= s.fx) & (f > ftest), gtest, zero)
        stx, fxm, gxm, sty, fym, gym, new, brackt, moved = more_thuente_step(
            s.stx, s.fx - s.stx * shift, s.gx - shift, s.sty, s.fy - s.sty * shift, s.gy - shift,
            stp, f - stp * shift, g - shift, s.brackt, s.stmin, s.stmax,
        )
        fx, fy, gx, gy = fxm + stx * shift, fym + sty * shift, gxm + shift, gym + shift
        bisect = brackt & (jnp.abs(sty - stx) >= _SHRINK * s.width1)
        new = jnp.where(bisect, stx + 0.5 * (sty - stx), new)
        width1 = jnp.where(brackt, s.width, s.width1)
        width = jnp.where(brackt, jnp.abs(sty - stx), s.width)
        stmin = jnp.where(brackt, jnp.minimum(stx, sty), new + XTRAPL * (new - stx))
        stmax = jnp.where(brackt, jnp.maximum(stx, sty), new + XTRAPU * (new - stx))
        new = jnp.clip(new, min_step, s.upper)
        stuck = brackt & ((new <= stmin) | (new >= stmax) | (stmax - stmin <= xtol * stmax))
        new = jnp.where(stuck, stx, new)
        aux_x = jax.tree.map(lambda a, b: jnp.where(moved, a, b), aux_t, s.aux_x)
        updated = s._replace(stp=new, stx=stx, fx=fx, gx=gx, sty=sty, fy=fy, gy=gy, stmin=stmin, stmax=stmax,
                             width=width, width1=width1, brackt=brackt, aux_x=aux_x)
        running = s.status == _RUNNING
        return jax.tree.map(lambda a, b: jnp.where(running, a, b), updated, s)

    end = jax.lax.while_loop(cond, body, init)
    status = jnp.where(end.status == _RUNNING, _MAX_STEPS, end.status).astype(jnp.int32)
    # success: the last trial; otherwise the better of it and the best step so far (0 if nothing decreased)
    take_last = (status == _CONVERGED) | ((end.count > 0) & (end.f <= end.fx))
    pick = lambda a, b: jax.tree.map(lambda u, v: jnp.where(take_last, u, v), a, b)  # noqa: E731
    trial = jnp.where(end.status == _RUNNING, end.stp, end.last)
    return MoreThuenteResult(
        step=pick(end.last, end.stx), value=pick(end.f, end.fx), slope=pick(end.g, end.gx),
        aux=pick(end.aux, end.aux_x), num_steps=end.count, status=status, trial=trial,
    )


# --- the transformation -------------------------------------------------------------------------------------


class MoreThuenteInfo(NamedTuple):
    """What one search did: evaluations (``num_linesearch_steps``, as optax's zoom search names them) and its
    ``status`` (an index into :data:`MORE_THUENTE_STATUS`; 1: the strong Wolfe conditions hold)."""

    num_linesearch_steps: jax.Array  # int32
    status: jax.Array  # int32


class ScaleByMoreThuenteLinesearchState(NamedTuple):
    """State of :func:`scale_by_more_thuente_linesearch`: the accepted step size, the value and gradient there
    (reused by ``optax.value_and_grad_from_state``), the value at the search's start (for the interpolated first
    trial of the next search) and the search's info."""

    learning_rate: jax.Array
    value: jax.Array
    grad: PyTree
    previous_value: jax.Array  # f at the start of the last search: f_{k-1} of the next one's first trial
    info: MoreThuenteInfo


def interpolated_initial_step(value: jax.Array, previous_value: jax.Array, slope: jax.Array) -> jax.Array:
    """``min(1, 1.01 * 2 (f_k - f_{k-1}) / phi'(0))``, or 1 where that is not a positive finite number (scipy's
    ``scalar_search_wolfe1``; N&W eq. 3.60 with scipy's factor 1.01 and cap 1)."""
    guess = jnp.minimum(1.0, 1.01 * 2.0 * (value - previous_value) / slope)
    return jnp.where((guess > 0) & jnp.isfinite(guess), guess, jnp.ones_like(guess))


def scale_by_more_thuente_linesearch(
    max_linesearch_steps: int = 20,
    *,
    slope_rtol: float = 1e-4,
    curv_rtol: float = 0.9,
    xtol: float = 1e-14,
    min_learning_rate: float = 0.0,
    max_learning_rate: float = 1e10,
    initial_guess_strategy: str = "one",
    approx_dec_rtol: float | None = 1e-6,
) -> optax.GradientTransformationExtraArgs:
    """The Moré-Thuente line search (module docstring) on the incoming descent direction ``u``: ``u -> a u``.

    The same protocol as ``optax.scale_by_zoom_linesearch``: ``update(updates, state, params, *, value, grad,
    value_fn, **extra)`` with ``value`` and ``grad`` the loss and its gradient at ``params`` and ``value_fn``
    called with ``params`` and the extra arguments it accepts; the state stores ``value`` and ``grad`` at the
    accepted point for ``optax.value_and_grad_from_state``, and ``info.num_linesearch_steps`` counts the
    evaluations (each of the value and the gradient).

    Args:
      max_linesearch_steps: the most evaluations of one search (MINPACK-2's drivers: 20 in L-BFGS-B, 100 in
        scipy's ``line_search_wolfe1``).
      slope_rtol: ``ftol`` (``mu``), the sufficient-decrease constant (scipy's BFGS: 1e-4; L-BFGS-B: 1e-3).
      curv_rtol: ``gtol`` (``eta``), the curvature constant (0.9 in both).
      xtol: the relative width of the bracketing interval at which the search stops with a warning (scipy's
        BFGS: 1e-14; L-BFGS-B: 0.1).
      min_learning_rate: the smallest step (``stpmin``).
      max_learning_rate: the largest step (``stpmax``; L-BFGS-B's 1e10 without bounds).
      initial_guess_strategy: ``"one"`` or ``"interpolated"`` (scipy's BFGS, :func:`interpolated_initial_step`).
      approx_dec_rtol: ``eps`` of the approximate decrease ``phi(a) <= phi(0) + eps |phi(0)|`` accepted with the
        curvature condition (module docstring; 1e-6, optax's zoom search and Hager & Zhang's default), or ``None``
        for ``dcsrch``'s sufficient decrease alone.

    A search that ends with a warning takes the better of its last trial and its best step (possibly 0);
    ``info.status`` says why it ended.
    """
    name = "scale_by_more_thuente_linesearch"
    check_choice(name, "initial_guess_strategy", initial_guess_strategy, ("one", "interpolated"))
    check(name, "max_linesearch_steps", max_linesearch_steps, lambda v: v >= 1 and float(v).is_integer(),
          "an integer >= 1")
    check(name, "slope_rtol", slope_rtol, lambda v: 0 < v < 1, "in (0, 1)")
    check(name, "curv_rtol", curv_rtol, lambda v: 0 < v < 1, "in (0, 1)")
    check(name, "xtol", xtol, lambda v: v >= 0, ">= 0")
    check(name, "min_learning_rate", min_learning_rate, lambda v: v >= 0, ">= 0")
    check(name, "max_learning_rate", max_learning_rate, lambda v: v > 0, "> 0")
    if approx_dec_rtol is not None:
        check(name, "approx_dec_rtol", approx_dec_rtol, lambda v: v >= 0, ">= 0 (or None)")

    def init_fn(params):
        leaves = jax.tree.leaves(params)
        dtype = jnp.real(jnp.empty((), leaves[0].dtype)).dtype if leaves else jnp.float32
        return ScaleByMoreThuenteLinesearchState(
            learning_rate=jnp.asarray(1.0, dtype), value=jnp.asarray(jnp.inf, dtype),
            grad=optax.tree.zeros_like(params), previous_value=jnp.asarray(jnp.inf, dtype),
            info=MoreThuenteInfo(jnp.asarray(0, jnp.int32), jnp.asarray(_RUNNING, jnp.int32)),
        )

    def update_fn(updates, state, params, *, value, grad, value_fn, **extra):
        fn_kwargs = _kwargs_for(value_fn, extra, name)
        dtype = state.value.dtype
        value = jnp.asarray(value, dtype)
        grad = jax.tree.map(lambda g, p: jnp.asarray(g, jnp.result_type(p)), grad, params)  # the loop's carry
        slope = jnp.asarray(optax.tree.vdot(updates, grad), dtype)

        def phi(step):
            point = jax.tree.map(lambda p, u: p + (step * u).astype(jnp.result_type(p)), params, updates)
            f, g = jax.value_and_grad(value_fn)(point, **fn_kwargs)
            return f, optax.tree.vdot(updates, g), g

        if initial_guess_strategy == "interpolated":
            first = interpolated_initial_step(value, state.previous_value, slope)
        else:
            first = jnp.ones([], dtype)
        first = jnp.clip(first, min_learning_rate, max_learning_rate).astype(dtype)
        result = more_thuente_search(
            phi, first, value, slope, grad, ftol=slope_rtol, gtol=curv_rtol, xtol=xtol, min_step=min_learning_rate,
            max_step=max_learning_rate, max_steps=max_linesearch_steps, approx_dec_rtol=approx_dec_rtol,
        )
        new_state = ScaleByMoreThuenteLinesearchState(
            learning_rate=result.step, value=result.value, grad=result.aux, previous_value=value,
            info=MoreThuenteInfo(result.num_steps, result.status),
        )
        return optax.tree.scale(result.step, updates), optax.tree.cast_like(new_state, other_tree=state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _kwargs_for(value_fn: Callable, extra: dict, name: str) -> dict:
    """The extra arguments ``value_fn`` takes (by name, or all of them if it takes ``**kwargs``); any other is a
    ``TypeError``, as in optax's line searches."""
    import inspect

    try:
        parameters = inspect.signature(value_fn).parameters
    except (TypeError, ValueError):
        return dict(extra)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(extra)
    unknown = sorted(set(extra) - set(parameters))
    if unknown:
        raise TypeError(f"{name}: value_fn does not take the extra arguments {unknown}")
    return dict(extra)
