"""Quasi-Newton (secant) pair updates: SR1, BFGS, DFP, and the L-BFGS two-loop recursion.

A pair ``s = x_{k+1} - x_k``, ``y = g_{k+1} - g_k`` updates a Hessian approximation ``B`` or its inverse
``H = B^{-1}`` so that the new one satisfies the secant condition ``B_{k+1} s = y`` (``H_{k+1} y = s``)
(Nocedal & Wright 2006, ch. 6-7; "N&W" below).

Dense updates (flat vectors ``s, y`` of length ``n``, an ``n x n`` matrix), each returning
``(new_matrix, used)``:

* :func:`sr1_update` / :func:`sr1_inverse_update`: symmetric rank one on ``B`` / on ``H`` (N&W eq. 6.24 /
  6.25, the same update through Sherman-Morrison);
* :func:`bfgs_update` / :func:`bfgs_inverse_update` / :func:`bfgs_cholesky_update`: BFGS on ``B``
  (eq. 6.19), on ``H`` (eq. 6.17), and on the Cholesky factor ``L`` of ``B = L L^T`` in ``O(n^2)``
  (Dennis & Schnabel 1983, section 9.2);
* :func:`dfp_inverse_update`: DFP on ``H`` (eq. 6.15).

L-BFGS (pairs are pytrees shaped like the parameters): :class:`LBFGSMemory`, a ring buffer of the last
``m`` accepted pairs; :func:`lbfgs_init_memory`, :func:`lbfgs_update_memory` and
:func:`lbfgs_two_loop` (N&W Algorithm 7.4).

Safeguards. ``used`` is False, and the matrix comes back unchanged, when a pair fails its test or
the new matrix is not finite (so NaN or overflowing gradients never poison the state; tests are
written so that NaN fails them):

* BFGS, DFP and L-BFGS take a pair only if ``s^T y > min_cosine ||s|| ||y||`` (the curvature
  condition, N&W eq. 6.7, with a relative margin: the cosine of the angle between ``s`` and ``y``);
  ``min_cosine = 1e-8``, the value of scipy's ``min_curvature`` for ``exception_strategy='skip_update'``.
  The test does not involve the current matrix, so the ``B``, ``H`` and Cholesky forms skip exactly
  the same pairs; scipy instead skips when ``s^T y <= 1e-8 s^T B s`` (``'hess'``) or
  ``<= 1e-8 y^T H y`` (``'inv_hess'``). Both skip every pair with ``s^T y <= 0``. In float32 the
  rounding error of ``s^T y`` is about ``sqrt(n) 6e-8 ||s|| ||y||``, so callers working in float32
  may want ``min_cosine`` near ``1e-6`` or above.
* ``damp=True`` first replaces the pair by Powell's damped pair (N&W Procedure 18.2,
  :func:`powell_damping` on ``B``; its dual :func:`powell_damping_inverse` on ``H``), which is
  scipy's ``exception_strategy='damp_update'`` with ``min_curvature=0.2``.
* SR1 takes a pair only if ``|s^T (y - B s)| > min_cosine ||s|| ||y - B s||`` (N&W eq. 6.26,
  ``r = 1e-8``; skipping at equality, as scipy, so ``y = B s`` is skipped rather than divided by 0),
  on ``H`` the dual ``|y^T (s - H y)| > min_cosine ||y|| ||s - H y||`` (scipy's ``'inv_hess'``),
  and, as scipy, never a pair with ``s = 0`` or ``y = 0``.
* The first pair sets the scale of ``H_0 = gamma I`` (``B_0 = I / gamma``) by
  :func:`initial_inverse_scale`, ``gamma = s^T y / y^T y`` (N&W eq. 6.20).

K-BFGS (Goldfarb, Ren & Bahamou 2020) damps each pair twice before a BFGS or L-BFGS update of the
inverse factor ``H_g``: :func:`double_damping` = :func:`powell_damping_inverse` then
:func:`levenberg_marquardt_pair_damping`.

Computation is in float32 or better (the inputs' dtype promoted to at least float32), with
full-precision matrix products; results come back in that dtype. Every function is pure and jittable
(hyperparameters may be traced), and works under ``jax.vmap`` (e.g. K-BFGS's per-layer matrices).

References: J. Nocedal & S. J. Wright, *Numerical Optimization*, 2nd ed., Springer 2006; J. E. Dennis &
R. B. Schnabel, *Numerical Methods for Unconstrained Optimization and Nonlinear Equations*, 1983;
G. H. Golub & C. F. Van Loan, *Matrix Computations*, 4th ed. 2013, section 6.5; D. Goldfarb, Y. Ren &
A. Bahamou, "Practical quasi-Newton methods for training deep neural networks", NeurIPS 2020.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

__all__ = [
    "initial_inverse_scale",
    "powell_damping",
    "powell_damping_inverse",
    "levenberg_marquardt_pair_damping",
    "double_damping",
    "sr1_update",
    "sr1_inverse_update",
    "bfgs_update",
    "bfgs_inverse_update",
    "bfgs_cholesky_update",
    "dfp_inverse_update",
    "LBFGSMemory",
    "lbfgs_init_memory",
    "lbfgs_update_memory",
    "lbfgs_two_loop",
]

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# Validation and small helpers
# ----------------------------------------------------------------------------------------------


def _check_in(fn: str, name: str, value, low: float, high: float, low_open: bool, high_open: bool):
    """ValueError unless a concrete Python number lies in the interval (traced values pass)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{fn}: {name} must be in {interval}, got {value}")


def _check_min_cosine(fn: str, min_cosine) -> None:
    _check_in(fn, "min_cosine", min_cosine, 0.0, 1.0, low_open=False, high_open=True)


def _check_min_curvature(fn: str, min_curvature) -> None:
    _check_in(fn, "min_curvature", min_curvature, 0.0, 1.0, low_open=True, high_open=True)


def _check_pair(fn: str, matrix_name: str, matrix, s, y) -> None:
    shape = jnp.shape(matrix)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"{fn}: {matrix_name} must be a square matrix, got shape {shape}")
    for name, v in (("s", s), ("y", y)):
        if jnp.shape(v) != (shape[0],):
            raise ValueError(
                f"{fn}: {name} must have shape ({shape[0]},) to match {matrix_name}, got {jnp.shape(v)}"
            )


def _check_vectors(fn: str, **vectors) -> None:
    shapes = {name: jnp.shape(v) for name, v in vectors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(shape != first for shape in shapes.values()):
        raise ValueError(f"{fn}: expected vectors of one shape (n,), got shapes {shapes}")


def _compute(*arrays):
    """The arrays in their common dtype promoted to at least float32."""
    dtype = jnp.promote_types(jnp.result_type(*arrays), jnp.float32)
    return tuple(jnp.asarray(a, dtype) for a in arrays)


def _mv(matrix: jax.Array, v: jax.Array) -> jax.Array:
    """``M v`` at full precision (accelerators otherwise multiply float32 in bfloat16 passes)."""
    return jnp.matmul(matrix, v, precision=_HIGHEST)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, precision=_HIGHEST)


def _keep_if(ok: jax.Array, new: jax.Array, old: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(new, True)`` where the test passed and ``new`` is finite, else ``(old, False)``."""
    used = ok & jnp.all(jnp.isfinite(new))
    return jnp.where(used, new, old), used


def _curvature_ok(s: jax.Array, y: jax.Array, sy: jax.Array, min_cosine) -> jax.Array:
    """The curvature condition with a margin, ``s^T y > min_cosine ||s|| ||y||`` (False on NaN)."""
    return sy > min_cosine * jnp.linalg.norm(s) * jnp.linalg.norm(y)


def _interpolate(theta: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    return theta * a + (1.0 - theta) * b


# ----------------------------------------------------------------------------------------------
# Initial scaling and damping of a pair
# ----------------------------------------------------------------------------------------------


def initial_inverse_scale(s: jax.Array, y: jax.Array) -> jax.Array:
    """``gamma = |s^T y| / y^T y`` for ``H_0 = gamma I`` (and ``B_0 = I / gamma``), or 1 if undefined.

    N&W eq. 6.20 (``s^T y / y^T y``, applied before the first update), with scipy's conventions
    (``init_scale='auto'``): the absolute value of ``s^T y``, and ``gamma = 1`` when ``s^T y = 0``
    (which covers ``s = 0`` or ``y = 0``; here also when ``gamma`` is not finite). So it equals
    eq. 6.20 whenever ``s^T y > 0``. On flat vectors; :func:`lbfgs_two_loop` scales pytrees itself.
    """
    _check_vectors("initial_inverse_scale", s=s, y=y)
    s, y = _compute(s, y)
    sy = jnp.abs(_dot(s, y))
    gamma = sy / _dot(y, y)
    return jnp.where((sy > 0) & jnp.isfinite(gamma), gamma, 1.0)


def powell_damping(
    s: jax.Array,
    y: jax.Array,
    bs: jax.Array,
    min_curvature: float | jax.Array = 0.2,
) -> tuple[jax.Array, jax.Array]:
    """Powell's damped ``r = theta y + (1 - theta) B s``, so that ``s^T r >= min_curvature s^T B s``.

    N&W Procedure 18.2 (Powell 1978): ``theta = 1`` if ``s^T y >= 0.2 s^T B s``, else
    ``theta = 0.8 s^T B s / (s^T B s - s^T y)``, which makes ``s^T r = 0.2 s^T B s``; ``0.2`` is
    ``min_curvature`` (scipy's ``BFGS(exception_strategy='damp_update')`` default). BFGS on ``B`` with
    ``(s, r)`` stays positive definite.

    Args:
      s: the step ``x_{k+1} - x_k`` (a flat vector).
      y: the change of gradient ``g_{k+1} - g_k``.
      bs: ``B s`` with the current approximation ``B``.
      min_curvature: ``mu`` in ``(0, 1)``; ``theta = (1 - mu) s^T B s / (s^T B s - s^T y)``.

    Returns:
      ``(r, damped)``: the damped ``y`` and whether ``theta < 1`` (``s^T y < mu s^T B s``).
    """
    _check_min_curvature("powell_damping", min_curvature)
    _check_vectors("powell_damping", s=s, y=y, bs=bs)
    s, y, bs = _compute(s, y, bs)
    sy, sbs = _dot(s, y), _dot(s, bs)
    damped = sy < min_curvature * sbs
    theta = jnp.where(damped, (1.0 - min_curvature) * sbs / jnp.where(damped, sbs - sy, 1.0), 1.0)
    return _interpolate(theta, y, bs), damped


def powell_damping_inverse(
    s: jax.Array, y: jax.Array, hy: jax.Array, min_curvature: float | jax.Array = 0.2
) -> tuple[jax.Array, jax.Array]:
    """Powell damping on ``H``: ``s~ = theta s + (1 - theta) H y``, so ``s~^T y >= min_curvature y^T H y``.

    :func:`powell_damping` with the roles of ``(s, B)`` and ``(y, H)`` exchanged:
    ``theta = 1`` if ``s^T y >= mu y^T H y``, else ``theta = (1 - mu) y^T H y / (y^T H y - s^T y)``.
    It is K-BFGS's "Powell's damping on H" (Goldfarb, Ren & Bahamou 2020, first half of the double
    damping procedure, ``mu_1 = 0.2``) and what scipy's ``damp_update`` does for ``approx_type='inv_hess'``.

    Args:
      s: the step ``x_{k+1} - x_k`` (a flat vector).
      y: the change of gradient ``g_{k+1} - g_k``.
      hy: ``H y`` with the current inverse approximation ``H`` (dense, or :func:`lbfgs_two_loop`).
      min_curvature: ``mu`` in ``(0, 1)``.

    Returns:
      ``(s_damped, damped)``.
    """
    _check_min_curvature("powell_damping_inverse", min_curvature)
    _check_vectors("powell_damping_inverse", s=s, y=y, hy=hy)
    return powell_damping(y, s, hy, min_curvature)


def levenberg_marquardt_pair_damping(
    s: jax.Array,
    y: jax.Array,
    damping: float | jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """K-BFGS's Levenberg-Marquardt damping: ``y~ = theta y + (1 - theta) s`` with ``s^T y~ >= damping s^T s``.

    ``theta = 1`` if ``s^T y >= mu_2 s^T s``, else ``theta = (1 - mu_2) s^T s / (s^T s - s^T y)``, which
    makes ``s^T y~ = mu_2 s^T s``: a floor ``mu_2`` on the curvature ``s^T y / s^T s`` that the BFGS
    update builds into ``B = H^{-1}``, in the spirit of Levenberg-Marquardt's ``B + mu_2 I`` (Goldfarb,
    Ren & Bahamou 2020, second half of the double damping procedure; the authors' code,
    ``get_BFGS_ModifiedDamping``, sets ``mu_2 = sqrt(lambda)`` for the overall damping ``lambda``).
    For ``mu_2 > 1``, ``theta`` leaves ``[0, 1]`` (extrapolation) and the identity still holds, except
    at ``s^T y = s^T s`` exactly, where ``y~`` is not finite and a following update skips the pair.

    Args:
      s: the step ``x_{k+1} - x_k`` (a flat vector).
      y: the change of gradient ``g_{k+1} - g_k``.
      damping: ``mu_2 > 0``.

    Returns:
      ``(y_damped, damped)``, ``damped`` where ``s^T y < mu_2 s^T s``.
    """
    _check_in("levenberg_marquardt_pair_damping", "damping", damping, 0.0, float("inf"), True, True)
    _check_vectors("levenberg_marquardt_pair_damping", s=s, y=y)
    s, y = _compute(s, y)
    sy, ss = _dot(s, y), _dot(s, s)
    damped = sy < damping * ss
    theta = jnp.where(damped, (1.0 - damping) * ss / jnp.where(damped, ss - sy, 1.0), 1.0)
    return _interpolate(theta, y, s), damped


def double_damping(
    s: jax.Array,
    y: jax.Array,
    hy: jax.Array,
    damping: float | jax.Array,
    min_curvature: float | jax.Array = 0.2,
) -> tuple[jax.Array, jax.Array]:
    """K-BFGS's double damping (DD) of a pair before a BFGS / L-BFGS update of ``H_g``.

    Goldfarb, Ren & Bahamou (2020), "double damping" (Powell's damping on ``H`` followed by
    Levenberg-Marquardt damping):

        s~ = theta_1 s + (1 - theta_1) H y,   theta_1 from  s^T y  >= mu_1 y^T H y   (mu_1 = 0.2)
        y~ = theta_2 y + (1 - theta_2) s~,    theta_2 from  s~^T y >= mu_2 s~^T s~

    i.e. :func:`powell_damping_inverse` then :func:`levenberg_marquardt_pair_damping` on ``(s~, y)``.
    Afterwards ``s~^T y~ >= mu_2 s~^T s~ > 0``, so the BFGS update accepts the pair and the
    eigenvalues of the new ``H`` stay bounded (the paper's motivation). ``hy = H y`` uses the ``H``
    before the update (``H_g`` dense, or :func:`lbfgs_two_loop` for K-BFGS(L)).

    Args:
      s: the step ``x_{k+1} - x_k`` (a flat vector).
      y: the change of gradient ``g_{k+1} - g_k``.
      hy: ``H y``.
      damping: ``mu_2 > 0`` (the authors' code: ``sqrt(lambda)``).
      min_curvature: ``mu_1`` in ``(0, 1)``, 0.2 in the paper.

    Returns:
      ``(s~, y~)``.
    """
    s_damped, _ = powell_damping_inverse(s, y, hy, min_curvature)
    y_damped, _ = levenberg_marquardt_pair_damping(s_damped, y, damping)
    return s_damped, y_damped


# ----------------------------------------------------------------------------------------------
# Dense updates
# ----------------------------------------------------------------------------------------------


def _sr1(matrix: jax.Array, w: jax.Array, z: jax.Array, min_cosine) -> tuple[jax.Array, jax.Array]:
    """``M + u u^T / (w^T u)``, ``u = z - M w`` (``M = B, w = s, z = y`` or ``M = H, w = y, z = s``)."""
    u = z - _mv(matrix, w)
    denominator = _dot(w, u)
    nonzero = (jnp.linalg.norm(w) > 0) & (jnp.linalg.norm(z) > 0)
    ok = nonzero & (jnp.abs(denominator) > min_cosine * jnp.linalg.norm(w) * jnp.linalg.norm(u))
    return _keep_if(ok, matrix + jnp.outer(u, u) / denominator, matrix)


def sr1_update(
    b: jax.Array,
    s: jax.Array,
    y: jax.Array,
    min_cosine: float | jax.Array = 1e-8,
) -> tuple[jax.Array, jax.Array]:
    """Symmetric rank-one update of ``B``: ``B+ = B + (y - B s)(y - B s)^T / ((y - B s)^T s)``.

    N&W eq. 6.24, skipped unless ``|s^T (y - B s)| > min_cosine ||s|| ||y - B s||`` (eq. 6.26,
    ``r = 1e-8``) and ``s, y != 0``. ``B+`` need not be positive definite.

    Returns:
      ``(B+, used)``; ``B+ = B`` where ``used`` is False.
    """
    _check_min_cosine("sr1_update", min_cosine)
    _check_pair("sr1_update", "b", b, s, y)
    b, s, y = _compute(b, s, y)
    return _sr1(b, s, y, min_cosine)


def sr1_inverse_update(
    h: jax.Array,
    s: jax.Array,
    y: jax.Array,
    min_cosine: float | jax.Array = 1e-8,
) -> tuple[jax.Array, jax.Array]:
    """SR1 on ``H = B^{-1}``: ``H+ = H + (s - H y)(s - H y)^T / ((s - H y)^T y)``.

    N&W eq. 6.25, the inverse of :func:`sr1_update`'s ``B+`` by Sherman-Morrison. Skipped unless
    ``|y^T (s - H y)| > min_cosine ||y|| ||s - H y||`` (the dual of eq. 6.26, as scipy's
    ``SR1`` with ``approx_type='inv_hess'``) and ``s, y != 0``.

    Returns:
      ``(H+, used)``.
    """
    _check_min_cosine("sr1_inverse_update", min_cosine)
    _check_pair("sr1_inverse_update", "h", h, s, y)
    h, s, y = _compute(h, s, y)
    return _sr1(h, y, s, min_cosine)


def bfgs_update(
    b: jax.Array,
    s: jax.Array,
    y: jax.Array,
    min_cosine: float | jax.Array = 1e-8,
    damp: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """BFGS update of ``B``: ``B+ = B - B s s^T B / (s^T B s) + y y^T / (y^T s)`` (N&W eq. 6.19).

    Skipped unless ``s^T y > min_cosine ||s|| ||y||``. With ``damp=True``, ``y`` is first replaced by
    Powell's ``r`` (:func:`powell_damping`, N&W Procedure 18.2), so ``B+`` stays positive definite
    for any pair.

    Returns:
      ``(B+, used)``.
    """
    _check_min_cosine("bfgs_update", min_cosine)
    _check_pair("bfgs_update", "b", b, s, y)
    b, s, y = _compute(b, s, y)
    bs = _mv(b, s)
    if damp:
        y, _ = powell_damping(s, y, bs)
    sy = _dot(s, y)
    new = b - jnp.outer(bs, bs) / _dot(s, bs) + jnp.outer(y, y) / sy
    return _keep_if(_curvature_ok(s, y, sy, min_cosine), new, b)


def bfgs_inverse_update(
    h: jax.Array,
    s: jax.Array,
    y: jax.Array,
    min_cosine: float | jax.Array = 1e-8,
    damp: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """BFGS update of ``H = B^{-1}``: ``H+ = (I - rho s y^T) H (I - rho y s^T) + rho s s^T``, ``rho = 1 / y^T s``.

    N&W eq. 6.17, computed as ``H + (rho^2 y^T H y + rho) s s^T - rho (H y s^T + s y^T H)``
    (``O(n^2)``, as scipy). Skipped unless ``s^T y > min_cosine ||s|| ||y||``. With ``damp=True``,
    ``s`` is first replaced by :func:`powell_damping_inverse` (scipy's ``damp_update`` for
    ``'inv_hess'``; not the inverse of :func:`bfgs_update`'s damped ``B+``, which damps ``y``).

    Returns:
      ``(H+, used)``.
    """
    _check_min_cosine("bfgs_inverse_update", min_cosine)
    _check_pair("bfgs_inverse_update", "h", h, s, y)
    h, s, y = _compute(h, s, y)
    hy = _mv(h, y)
    if damp:
        s, _ = powell_damping_inverse(s, y, hy)
    sy = _dot(s, y)
    rho = 1.0 / sy
    new = h + (rho**2 * _dot(y, hy) + rho) * jnp.outer(s, s) - rho * (jnp.outer(hy, s) + jnp.outer(s, hy))
    return _keep_if(_curvature_ok(s, y, sy, min_cosine), new, h)


def dfp_inverse_update(
    h: jax.Array,
    s: jax.Array,
    y: jax.Array,
    min_cosine: float | jax.Array = 1e-8,
    damp: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """DFP update of ``H``: ``H+ = H - H y y^T H / (y^T H y) + s s^T / (y^T s)`` (N&W eq. 6.15).

    The dual of BFGS on ``B`` (exchange ``s <-> y``, ``B <-> H``). Skipped unless
    ``s^T y > min_cosine ||s|| ||y||``; ``damp=True`` first applies :func:`powell_damping_inverse`
    (the dual of N&W Procedure 18.2).

    Returns:
      ``(H+, used)``.
    """
    _check_min_cosine("dfp_inverse_update", min_cosine)
    _check_pair("dfp_inverse_update", "h", h, s, y)
    h, s, y = _compute(h, s, y)
    hy = _mv(h, y)
    if damp:
        s, _ = powell_damping_inverse(s, y, hy)
    sy = _dot(s, y)
    new = h - jnp.outer(hy, hy) / _dot(y, hy) + jnp.outer(s, s) / sy
    return _keep_if(_curvature_ok(s, y, sy, min_cosine), new, h)


def _givens(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(c, s)`` with ``[[c, s], [-s, c]] @ [a, b] = [hypot(a, b), 0]`` (identity when ``a = b = 0``)."""
    r = jnp.hypot(a, b)
    safe = jnp.where(r > 0, r, 1.0)
    return jnp.where(r > 0, a / safe, 1.0), b / safe


def _rotate_rows(m: jax.Array, k: jax.Array, c: jax.Array, s: jax.Array) -> jax.Array:
    """Apply the rotation ``[[c, s], [-s, c]]`` to rows ``k, k + 1`` of ``m``."""
    top, bottom = m[k], m[k + 1]
    m = m.at[k].set(c * top + s * bottom)
    return m.at[k + 1].set(c * bottom - s * top)


def _triangular_plus_rank_one_qr(r: jax.Array, u: jax.Array, v: jax.Array) -> jax.Array:
    """Upper triangular ``R+`` with ``R+^T R+ = (R + u v^T)^T (R + u v^T)``, in ``O(n^2)``.

    Golub & Van Loan (2013), section 6.5.1: rotations in planes ``(k, k+1)``, ``k = n-2, ..., 0``,
    reduce ``u`` to ``||u|| e_1`` and make ``R`` upper Hessenberg; add ``||u|| e_1 v^T``; rotations
    ``k = 0, ..., n-2`` make it triangular again (Dennis & Schnabel 1983, Appendix A, ``QRUPDATE``).
    """
    n = r.shape[0]

    def reduce_u(i, carry):
        r, u = carry
        k = n - 2 - i
        c, s = _givens(u[k], u[k + 1])
        u = u.at[k].set(jnp.hypot(u[k], u[k + 1]))  # u[k + 1] is now 0 and not read again
        return _rotate_rows(r, k, c, s), u

    def retriangularize(k, r):
        c, s = _givens(r[k, k], r[k + 1, k])
        return _rotate_rows(r, k, c, s).at[k + 1, k].set(0.0)  # exactly, not to round-off

    r, u = jax.lax.fori_loop(0, n - 1, reduce_u, (r, u))
    r = r.at[0].add(u[0] * v)
    return jax.lax.fori_loop(0, n - 1, retriangularize, r)


def bfgs_cholesky_update(
    l: jax.Array,
    s: jax.Array,
    y: jax.Array,
    min_cosine: float | jax.Array = 1e-8,
    damp: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """BFGS on the Cholesky factor: ``L+`` lower triangular with ``L+ L+^T`` = :func:`bfgs_update`'s ``B+``.

    Dennis & Schnabel (1983), section 9.2 and Appendix A (``BFGSFAC``): with ``v = L^T s`` and
    ``a = sqrt(s^T y / v^T v)``, ``J = L + (y - a L v) v^T / (a v^T v)`` satisfies ``J J^T = B+``
    (``J^T s = a v``, ``J v = y / a``); ``L+`` comes from the QR factorization of ``J^T``, an upper
    triangular matrix plus a rank-one term, by ``2 (n - 1)`` Givens rotations (``O(n^2)``,
    orthogonal transformations only, so no downdate and no loss of positive definiteness). ``L+``
    is *the* Cholesky factor of ``B+`` (positive diagonal): each rotation that zeroes an entry puts
    ``hypot >= 0`` on the diagonal, so the first ``n - 1`` diagonal entries are ``>= 0``, and the
    last is positive because the rotations have determinant 1 and ``det J = a det L > 0``. Same skip
    test and ``damp`` option as :func:`bfgs_update`. Solves with ``B`` are two triangular solves.

    The rotations run as a sequential ``fori_loop`` of ``2 (n - 1)`` row operations of length ``n``:
    ``O(n^2)`` work but ``O(n)`` latency, which on accelerators can cost more than
    ``jnp.linalg.cholesky(B+)`` for small ``n``.

    Returns:
      ``(L+, used)``.
    """
    _check_min_cosine("bfgs_cholesky_update", min_cosine)
    _check_pair("bfgs_cholesky_update", "l", l, s, y)
    l, s, y = _compute(l, s, y)
    v = _mv(l.T, s)
    bs = _mv(l, v)
    if damp:
        y, _ = powell_damping(s, y, bs)
    sy, vv = _dot(s, y), _dot(v, v)
    a = jnp.sqrt(sy / vv)
    r = _triangular_plus_rank_one_qr(l.T, v, (y - a * bs) / (a * vv))
    return _keep_if(_curvature_ok(s, y, sy, min_cosine), r.T, l)


# ----------------------------------------------------------------------------------------------
# L-BFGS
# ----------------------------------------------------------------------------------------------


class LBFGSMemory(NamedTuple):
    """The last ``m`` accepted pairs, a ring buffer that lives in an optax state (jit, checkpoint).

    Slot ``i`` of every leaf holds one pair; the newest pair is in slot ``(count - 1) % m`` and the
    memory holds ``min(count, m)`` pairs. Empty slots have ``s = y = 0`` and ``rho = 0``, which make
    them no-ops in :func:`lbfgs_two_loop`.
    """

    s: PyTree  # steps, leaves [m, *param.shape] in float32 or better
    y: PyTree  # gradient differences, same shapes
    rho: jax.Array  # [m]: 1 / (s_i^T y_i); 0 in empty slots
    count: jax.Array  # int32: pairs accepted so far (skipped pairs are not counted)


def _memory_dtype(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def lbfgs_init_memory(params: PyTree, memory_size: int) -> LBFGSMemory:
    """An empty :class:`LBFGSMemory` for pairs shaped like ``params`` (arrays or ``ShapeDtypeStruct``).

    ``memory_size`` is ``m`` (N&W section 7.2 suggest ``3 <= m <= 20``; optax's ``lbfgs`` uses 10).
    The buffers are in the parameters' dtype promoted to at least float32.
    """
    if not isinstance(memory_size, int) or isinstance(memory_size, bool) or memory_size < 1:
        raise ValueError(f"lbfgs_init_memory: memory_size must be an integer >= 1, got {memory_size!r}")
    leaves = jax.tree.leaves(params)
    rho_dtype = jnp.result_type(jnp.float32, *[_memory_dtype(p.dtype) for p in leaves])

    def zeros(p):
        return jnp.zeros((memory_size, *jnp.shape(p)), _memory_dtype(p.dtype))

    return LBFGSMemory(
        s=jax.tree.map(zeros, params),
        y=jax.tree.map(zeros, params),
        rho=jnp.zeros((memory_size,), rho_dtype),
        count=jnp.zeros((), jnp.int32),
    )


def _like_memory(tree: PyTree, buffers: PyTree) -> PyTree:
    return jax.tree.map(lambda x, buffer: jnp.asarray(x, buffer.dtype), tree, buffers)


def _add_scale(x: PyTree, a: jax.Array, y: PyTree) -> PyTree:
    """``x + a y`` leafwise, in ``x``'s dtypes (a scan carry keeps its dtypes)."""
    return jax.tree.map(lambda xi, yi: (xi + a * yi).astype(xi.dtype), x, y)


def _slot(buffers: PyTree, i: jax.Array) -> PyTree:
    return jax.tree.map(lambda buffer: buffer[i], buffers)


def lbfgs_update_memory(
    memory: LBFGSMemory, s: PyTree, y: PyTree, min_cosine: float | jax.Array = 1e-8
) -> tuple[LBFGSMemory, jax.Array]:
    """Add the pair ``(s, y)`` (pytrees shaped like the parameters), overwriting the oldest when full.

    The pair is skipped (memory unchanged) unless ``s^T y > min_cosine ||s|| ||y||`` and ``s, y`` and
    ``rho = 1 / s^T y`` are finite: L-BFGS needs ``s_i^T y_i > 0`` for every stored pair (N&W
    section 7.2), and a skipped pair does not enter the ring.

    Returns:
      ``(memory, used)``.
    """
    _check_min_cosine("lbfgs_update_memory", min_cosine)
    s, y = _like_memory(s, memory.s), _like_memory(y, memory.y)
    sy = otu.tree_vdot(s, y)
    norms = otu.tree_norm(s) * otu.tree_norm(y)
    rho = 1.0 / sy
    # NaN or infinite entries fail the comparison; rho overflows for a subnormal s^T y where the
    # backend does not flush subnormals to zero.
    used = (sy > min_cosine * norms) & jnp.isfinite(rho)
    slot = memory.count % memory.rho.shape[0]

    def write(buffer, new):
        return buffer.at[slot].set(jnp.where(used, new, buffer[slot]))

    memory = LBFGSMemory(
        s=jax.tree.map(write, memory.s, s),
        y=jax.tree.map(write, memory.y, y),
        rho=write(memory.rho, rho.astype(memory.rho.dtype)),
        count=memory.count + used.astype(jnp.int32),
    )
    return memory, used


def lbfgs_two_loop(
    memory: LBFGSMemory, v: PyTree, initial_scale: float | jax.Array | None = None
) -> PyTree:
    """``H v`` for the L-BFGS inverse Hessian approximation, by the two-loop recursion (N&W Algorithm 7.4).

    ``H`` is BFGS (N&W eq. 6.17) applied to ``H_0 = gamma I`` with the stored pairs, oldest first
    (N&W eq. 7.19). ``gamma = s^T y / y^T y`` of the newest pair (N&W eq. 7.20), 1 while the memory
    is empty, unless ``initial_scale`` is given (K-BFGS(L) keeps ``H_0 = I``). The L-BFGS direction
    is ``-lbfgs_two_loop(memory, grads)``. Cost ``O(m n)``; the loops are ``lax.scan`` s over the ring
    in age order (empty slots are no-ops), one compilation for any fill level.

    Returns:
      ``H v``, a pytree like ``v`` in the memory's dtypes.
    """
    m = memory.rho.shape[0]
    order = (memory.count + jnp.arange(m)) % m  # oldest (or empty) first, newest last

    def newest_first(q, i):
        alpha = memory.rho[i] * otu.tree_vdot(_slot(memory.s, i), q)
        return _add_scale(q, -alpha, _slot(memory.y, i)), alpha

    def oldest_first(r, i_alpha):
        i, alpha = i_alpha
        beta = memory.rho[i] * otu.tree_vdot(_slot(memory.y, i), r)
        return _add_scale(r, alpha - beta, _slot(memory.s, i)), None

    q, alphas = jax.lax.scan(newest_first, _like_memory(v, memory.s), order, reverse=True)
    if initial_scale is None:
        y_newest = _slot(memory.y, order[-1])
        rho_yy = memory.rho[order[-1]] * otu.tree_vdot(y_newest, y_newest)  # y^T y / s^T y; 0 if empty
        gamma = jnp.where(rho_yy > 0, 1.0 / jnp.where(rho_yy > 0, rho_yy, 1.0), 1.0)
    else:
        gamma = initial_scale
    r = jax.tree.map(lambda x: (gamma * x).astype(x.dtype), q)
    r, _ = jax.lax.scan(oldest_first, r, (order, alphas))
    return r
