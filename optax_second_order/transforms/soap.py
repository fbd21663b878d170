"""SOAP: Adam run in the eigenbasis of Shampoo's Kronecker factors (Vyas et al. 2024, Alg. 3).

For each mode ``i`` of a gradient ``G`` with ``d_i <= max_precond_dim`` SOAP keeps Shampoo's factor
``L_i <- shampoo_beta L_i + (1 - shampoo_beta) G_(i) G_(i)^T`` and an orthogonal basis ``Q_i`` of its
eigenvectors (eigenvalues descending). With ``rotate(X) = X x_1 Q_1^T ... x_k Q_k^T`` (modes above
``max_precond_dim`` are left alone), each step is

    m <- b1 m + (1 - b1) rotate(G)             (kept in the eigenbasis, as the official code)
    v <- b2 v + (1 - b2) rotate(G)^2           (kept in the eigenbasis)
    N = rotate^{-1}( m / (sqrt(v) + eps) ),   [N <- N / RMS(N) if normalize_grads]
    update = N sqrt(1 - b2^t) / (1 - b1^t)     (bias correction as in the official code, if correct_bias)

after which the factors take in ``G`` and, every ``precondition_frequency`` Adam steps, the basis is
refreshed by one step of power iteration with QR: the columns of ``Q_i`` are sorted by the estimated
eigenvalues ``diag(Q_i^T L_i Q_i)`` (descending), ``v`` is permuted the same way along mode ``i`` (so
each second moment follows its eigenvector), ``Q_i' = qr(L_i Q_i).Q``, and ``m`` moves to the new basis,
``m <- m x_i (Q_i'^T Q_i)`` (the official code projects it back and forth). Keeping ``m`` in the eigenbasis
costs two rotations per step (``G`` in, the direction out) where keeping it in the original space costs three.

The first call only builds the factors from ``G`` and the basis from ``eigh`` and returns a zero update
("so that we never use the current gradients in the projection", official code). 1-D leaves run plain
Adam (the official ``precondition_1d=False``).

Blocks (``block_size``, not in the official code; Distributed Shampoo's blocking, Anil et al. 2020): dimensions
above ``block_size`` are cut into blocks of ``block_size`` (the last one zero-padded), and every block has its own
factors and bases (:mod:`~optax_second_order.curvature.blocking`). Blocks of one shape, from every leaf, share the
stacks of the factor bank (:mod:`~optax_second_order.curvature.bank`), ``[n, b, b]`` per mode for the factors and
bases and ``[n, *block_shape]`` for the moments in the eigenbases, which ``precondition_sharding`` stores split over
a mesh and ``layer_axes`` extends to every layer of a stacked leaf. A rotation then costs ``2 * sum_i b_i`` flops per entry instead
of ``2 * sum_i d_i`` (a ``1000 x 500`` layer in blocks of 128: 512 instead of 3000, against a forward and
backward pass's ``6 * batch``), and a refresh ``O(b^3)`` per block.

Refreshes: ``basis_method="qr"`` (Householder QR, the official code; the fastest on CPU) or ``"cholesky_qr"``
(:func:`~optax_second_order.curvature.matrix.orthogonal_iteration_step`: products, Cholesky and triangular solves,
for GPU/TPU); ``stagger`` spreads each refresh over that many steps, a fixed partition of the (block, mode)
factors into slots of balanced cost (``b^3``), slot ``r`` refreshed ``r`` steps before the unstaggered schedule.

Non-finite numbers: a step whose factors could overflow (the gradient is not finite, or a bound from its squared
norm and the largest stored factor entry overflows: :func:`~optax_second_order.transforms.common.gram_update_finite`)
is rejected as a whole (zero update,
state kept) and counted in ``state.nonfinite``; so is a step whose moments or direction come out non-finite, except
that its factors take in ``G`` (finite). Both are decided before the refreshes, which are skipped on a rejected
step, so the factors and bases never pass through a select of the whole state after the step (a copy of both every
step: SOAP's step on the autoencoder benchmark took 82 ms with it, 60 ms without). A stored moment or factor that
is not finite (a corrupt state) restarts from zero; a block whose basis comes out non-finite from finite factors
keeps the previous one (``state.basis_failures`` counts such bases).

Rounding (not in the official code; docs/optimizers/soap.md, "Rounding and degenerate eigenspaces"): the bases are
those of ``L_i + sqrt(d u) max_j (L_i)_jj diag(1, ..., 1/d)`` (:func:`_tie_broken`), so that within a degenerate
eigenspace of ``L_i`` (its null space while it has seen few gradients) they are a continuous function of ``L_i``
rather than ``eigh``'s rounding; and in the eigenbases Adam's ``eps`` has ``100 u sqrt(sum v)`` per block added
(:func:`_rounding_floor`), so that a rotated gradient that is rounding does not become a step.

Storage (``docs/memory.md``): ``state_dtype`` stores the factors, bases and moments in another dtype (bfloat16),
computing in float32; ``quantize`` stores the bases block-wise in 4 or 8 bits
(:mod:`~optax_second_order.curvature.quantize`, the quantizer of 4-bit Shampoo), used after ``rectify`` Björck steps.
The paper's own two (Vyas et al. 2024, sec. 7; not in the official code): ``one_sided`` keeps the factor and basis of a
2-D block's smaller side only (``Q = I`` on the larger: :func:`_rotated_modes`), and ``factorized_second_moment`` keeps
``v`` of each 2-D block in the eigenbasis as Adafactor's row and column accumulators, ``v = r c^T / (1^T r)``
(:func:`_factored_estimate`), a refresh's re-sort permuting the accumulator of its mode.

Defaults are the official code's (github.com/nikhilvyas/SOAP, ``soap.py``): ``lr = 3e-3``, ``betas =
(0.95, 0.95)``, ``shampoo_beta = -1`` meaning ``b2``, ``eps = 1e-8``, ``weight_decay = 0.01`` (in the
alias), ``precondition_frequency = 10``, ``max_precond_dim = 10000``, ``normalize_grads = False``,
``correct_bias = True``, no blocks. Not implemented: ``merge_dims`` (off by default there).

Reference: Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam" (2024), arXiv:2409.11321.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from optax_second_order.curvature.bank import FactorBank, due_slot, plan_bank, update_slot_units
from optax_second_order.curvature import quantize as storage_codecs
from optax_second_order.curvature.quantize import FactorStorage, select_units
from optax_second_order.curvature.matrix import eigh_psd, one_matrix_at_a_time, orthogonal_iteration_step
from optax_second_order.curvature import blocking
from optax_second_order.transforms.common import (
    all_finite,
    check,
    check_choice,
    check_float_leaves,
    discard_nonfinite,
    discard_nonfinite_matrices,
    gram_update_finite,
    layer_axes as common_layer_axes,
    layers_back,
    layers_first,
    stagger_slots,
    stat_dtype,
    tree_stat_dtype,
    static_int,
)
from optax_second_order.transforms.damping import reject_step

__all__ = ["SoapState", "scale_by_soap", "BASIS_METHODS"]

BASIS_METHODS = ("qr", "cholesky_qr")
_HIGHEST = jax.lax.Precision.HIGHEST


class SoapState(NamedTuple):
    """State of :func:`scale_by_soap`.

    Attributes:
      count: number of calls so far (the first one only initializes; Adam's step is ``count``).
      mu: first moments, ``(blocks, leaves)``: per group of the factor bank the moments of its blocks in their
        eigenbases, ``[n, *block_shape]`` (:class:`~optax_second_order.curvature.bank.FactorBank`); per leaf outside
        the bank (scalars, vectors, leaves with no mode of at most ``max_precond_dim``) its moment, shaped as the
        leaf (plain Adam).
      nu: second moments, laid out as ``mu``.
      factors: the factors ``L_i``, one ``[n, b, b]`` stack per (block shape, mode) of the bank.
      bases: the matching eigenbases ``Q_i`` (identity until the first call).
      basis_failures: number of bases (one per block and mode) that came out non-finite and were skipped
        (the previous basis and moments are kept).
      nonfinite: number of steps rejected because the gradient could overflow the factors or the moments or the
        direction came out non-finite.
    """

    count: jax.Array
    mu: tuple
    nu: tuple
    factors: tuple[jax.Array, ...]
    bases: tuple[jax.Array, ...]
    basis_failures: jax.Array
    nonfinite: jax.Array


def _bank(shapes, axes, block_size: int | None, max_precond_dim: int, sharding, one_sided: int | None = None
          ) -> FactorBank:
    """The factor bank of SOAP's leaves (each layer of a stacked leaf: ``axes``, its layer axes): blocks (cut by
    ``block_size``, else the layer itself) with a factor for each mode of size <= ``max_precond_dim`` (one-sided:
    :func:`_rotated_modes`); scalars and vectors are not in it (plain Adam)."""
    layer_shapes = [tuple(d for i, d in enumerate(shape) if i not in a) for shape, a in zip(shapes, axes)]
    layers = [math.prod(shape[i] for i in a) for shape, a in zip(shapes, axes)]
    modes = functools.partial(_rotated_modes, max_precond_dim=max_precond_dim, one_sided=one_sided)
    return plan_bank([s if len(s) > 1 else None for s in layer_shapes], modes, block_size, sharding, layers)


def _rotated_modes(block_shape, max_precond_dim: int, one_sided: int | None) -> tuple[int, ...]:
    """The modes of a block that get a factor and an eigenbasis: those of size <= ``max_precond_dim``; one-sided
    (Vyas et al. 2024, sec. 7: for an ``m x n`` matrix with ``m < n`` only ``Q_L`` is kept and ``Q_R = I``), a 2-D
    block whose larger side exceeds ``one_sided`` keeps only its smaller side's (the rows' on a tie)."""
    modes = tuple(i for i, d in enumerate(block_shape) if d <= max_precond_dim)
    if one_sided is None or len(block_shape) != 2 or len(modes) != 2 or max(block_shape) <= one_sided:
        return modes
    return (0,) if block_shape[0] <= block_shape[1] else (1,)


def _factored(block_shape) -> bool:
    """Whether a block's second moment is factored (``factorized_second_moment``): 2-D blocks where the row and
    column accumulators (``m + n`` numbers) are smaller than ``v`` (``m n``)."""
    return len(block_shape) == 2 and sum(block_shape) < math.prod(block_shape)


def _row_col_sums(squares: jax.Array) -> jax.Array:
    """``[n, m + k]``: per block (axis 0) of ``squares`` (``[n, m, k]``) its row sums ``G'^2 1`` then its column sums
    ``1^T G'^2`` (Adafactor's accumulators, Shazeer & Stern 2018, Alg. 4, without its ``eps_1``)."""
    return jnp.concatenate([jnp.sum(squares, axis=2), jnp.sum(squares, axis=1)], axis=1)


def _factored_estimate(nu: jax.Array, rows: int) -> jax.Array:
    """Adafactor's rank-1 second moment ``V = r c^T / (1^T r)`` of each block from its accumulators ``nu = [r, c]``
    (``[n, rows + cols]``; Shazeer & Stern 2018, eq. 6, the I-divergence's minimizer); 0 where ``1^T r = 0`` (then
    ``r = c = 0``)."""
    r, c = nu[:, :rows], nu[:, rows:]
    total = jnp.sum(r, axis=1)[:, None, None]
    estimate = r[:, :, None] * c[:, None, :] / jnp.where(total > 0, total, 1.0)
    return jnp.where(total > 0, estimate, 0.0)


def _accumulator(nu: jax.Array, mode: int, rows: int) -> jax.Array:
    """The accumulator of a factored ``nu = [r, c]`` along ``mode`` as a ``[n, rows, 1]`` (``r``) or ``[n, 1, cols]``
    (``c``) array, so that a permutation of ``v`` along ``mode`` is the same permutation of it."""
    return nu[:, :rows, None] if mode == 0 else nu[:, None, rows:]


def _with_accumulator(nu: jax.Array, accumulator: jax.Array, mode: int, rows: int) -> jax.Array:
    """``nu = [r, c]`` with the accumulator of ``mode`` replaced (the inverse of :func:`_accumulator`)."""
    r, c = nu[:, :rows], nu[:, rows:]
    return jnp.concatenate([accumulator[:, :, 0], c] if mode == 0 else [r, accumulator[:, 0, :]], axis=1)


def _rotate(x: jax.Array, modes, bases, back: bool = False) -> jax.Array:
    """``x x_i Q_i^T`` over the preconditioned modes of every block of ``x`` (``[blocks, ...]``, ``bases`` ``[blocks,
    d, d]``): into the eigenbasis, or ``x x_i Q_i`` with ``back``."""
    for mode, q in zip(modes, bases):
        x = blocking.batched_mode_dot(x, jnp.swapaxes(q, -1, -2) if back else q, mode)
    return x


def _tie_broken(factor: jax.Array) -> jax.Array:
    """Each ``L`` (``[blocks, d, d]``) plus ``tau * diag(1, (d - 1) / d, ..., 1 / d)`` with ``tau = sqrt(d u) max_i
    L_ii`` (``u`` the unit roundoff of ``L``'s dtype): the matrix whose eigenvectors SOAP uses.

    Within an eigenspace of ``L`` of dimension 2 or more -- above all its null space, most of the space while ``L``
    has seen fewer gradients than its dimension (a ``d x d`` factor has rank at most ``min(d, other dims)`` after one
    gradient) -- every orthonormal basis is one of eigenvectors, and ``eigh`` (or the power-QR refresh, whose ``L Q``
    is rounding there) picks one by rounding. Adam's per-coordinate normalization is not invariant under rotations
    within that space, so the step depended on the pick: a 1-ulp change of ``b2`` (which enters ``L`` through
    ``shampoo_beta``) moved a small MLP's parameters by more than a learning rate after one step, in float64 as in
    float32 (docs/optimizers/soap.md, "Rounding and degenerate eigenspaces"). The ramp makes the pick a continuous
    function of ``L``: within such a space the eigenvectors are those of the ramp restricted to it (coordinate vectors
    where the space contains them: Adam's own coordinates, e.g. a block's zero padding).

    ``tau`` balances two errors: eigenvectors of ``L`` whose eigenvalues are ``gap`` apart move by about ``tau /
    gap``, and the pick within a degenerate space is decided by the ramp (spacing ``tau / d``) against ``eigh``'s
    rounding (about ``u ||L||``) up to about ``d u ||L|| / tau``; the geometric mean ``sqrt(d u) ||L||`` makes both
    ``sqrt(d u)`` (``2e-3`` for a float32 ``32 x 32`` factor, ``4e-8`` in float64). Not in the paper or the official
    code, which run ``eigh(L + 1e-30 I)``: a shift breaks no tie.
    """
    d = factor.shape[-1]
    relative = math.sqrt(d * float(jnp.finfo(factor.dtype).eps))
    scale = relative * jnp.max(jnp.diagonal(factor, axis1=-2, axis2=-1), axis=-1)
    ramp = jnp.arange(d, 0, -1, dtype=factor.dtype) / d
    return factor + scale[..., None, None] * (jnp.eye(d, dtype=factor.dtype) * ramp)


ROUNDING_FLOOR = 100.0


def _rounding_floor(nu: jax.Array) -> jax.Array:
    """Per block (axis 0 of ``nu``, the second moments in the eigenbasis): ``ROUNDING_FLOOR * u * sqrt(sum(v))``, added
    to Adam's ``eps``.

    ``sqrt(sum(v))`` is the (moving) Frobenius norm of the block's gradients, which the rotation keeps, and ``u *``
    that norm is the size of the rounding of one rotated entry: along a direction in which every gradient is exactly
    zero (a factor's null vector that all gradients share, e.g. the sum over a softmax layer's outputs) the rotated
    gradient is that rounding, about ``1e-9`` to ``1e-7`` in float32, which ``eps = 1e-8`` alone turned into steps of
    up to a learning rate along a direction with no gradient. With the floor such a step is at most about
    ``1 / ROUNDING_FLOOR`` of one; entries below ``ROUNDING_FLOOR * u`` of the block's norm (``1.2e-5`` in float32,
    ``2e-14`` in float64) are damped, whose float32 values carry a relative rounding error of 1% or more.
    """
    total = jnp.sum(nu, axis=tuple(range(1, nu.ndim)), keepdims=True)
    return ROUNDING_FLOOR * jnp.finfo(nu.dtype).eps * jnp.sqrt(total)


def _eigenbasis(factor: jax.Array) -> jax.Array:
    """Eigenvectors of each ``L`` (``[blocks, d, d]``) as columns, eigenvalues descending."""
    return eigh_psd(factor)[1][..., ::-1]


def _sorted_basis(factor, basis, nu, axis):
    """The columns of each ``Q`` sorted by decreasing ``diag(Q^T L Q)``, and ``nu`` permuted alike along ``axis``
    (its axis 0 the blocks)."""
    estimated = jnp.einsum("nij,nik,nkj->nj", basis, factor, basis, precision=_HIGHEST)
    order = jnp.argsort(-estimated, axis=-1, stable=True)
    basis = jnp.take_along_axis(basis, order[:, None, :], axis=2)
    shape = [order.shape[0]] + [1] * (nu.ndim - 1)
    shape[axis] = order.shape[1]
    return basis, jnp.take_along_axis(nu, order.reshape(shape), axis=axis)


def _power_qr_refresh(factor, basis, nu, axis):
    """One power-iteration step with Householder QR (the official code) for each block; ``nu`` follows the sorted
    eigenvectors along ``axis``."""
    basis, nu = _sorted_basis(factor, basis, nu, axis)
    q = one_matrix_at_a_time(lambda m: jnp.linalg.qr(m)[0], jnp.matmul(factor, basis, precision=_HIGHEST))
    return q, nu


def _cholesky_qr_refresh(factor, basis, nu, axis):
    """The same step with :func:`~optax_second_order.curvature.matrix.orthogonal_iteration_step` (shifted
    CholeskyQR3 of ``(L / ||L||_F + 1e-5 I) Q``: products, a Cholesky factorization and triangular solves); a
    basis that fails comes back non-finite, so the caller keeps the previous one."""
    basis, nu = _sorted_basis(factor, basis, nu, axis)
    q, ok = orthogonal_iteration_step(factor, basis)
    return jnp.where(ok[:, None, None], q, jnp.nan), nu


def _moved(mu, old, new, axis):
    """The first moment in the new basis: ``mu x_i (Q'^T Q)``, i.e. back with ``Q`` and forward with ``Q'``."""
    change = jnp.matmul(jnp.swapaxes(old, -1, -2), new, precision=_HIGHEST)  # Q^T Q'
    return blocking.batched_mode_dot(mu, change, axis - 1)


def _finite_blocks(x: jax.Array) -> jax.Array:
    """Per block (axis 0): whether every entry is finite."""
    return jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))


def _discard_nonfinite_blocks(stacks: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """Each block (axis 0) of each stack with a non-finite entry replaced by zeros (a corrupt moment restarts)."""
    return tuple(jnp.where(_finite_blocks(x).reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0) for x in stacks)



def _one_sided_threshold(name: str, one_sided: Any) -> int | None:
    """``one_sided`` as the side a 2-D block's larger side must exceed to be rotated on one side only: ``None`` for
    ``False`` (two-sided), 0 for ``True`` (every 2-D block), else the integer itself (a structural one)."""
    if one_sided is False:
        return None
    return 0 if one_sided is True else static_int(name, "one_sided", one_sided, 0, minimum=0)

def scale_by_soap(
    b1: float = 0.95,
    b2: float = 0.95,
    shampoo_beta: float | None = None,
    eps: float = 1e-8,
    precondition_frequency: int = 10,
    max_precond_dim: int | None = None,
    normalize_grads: bool = False,
    correct_bias: bool = True,
    basis_method: str = "qr",
    stagger: bool | int | None = None,
    block_size: int | None = None,
    precondition_sharding: NamedSharding | None = None,
    layer_axes: Any = None,
    state_dtype: Any = None,
    quantize: Any = None,
    one_sided: bool | int = False,
    factorized_second_moment: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """SOAP's update direction (see the module docstring); chain with the learning rate (:func:`soap`).

    Args:
      b1: Adam's first-moment decay (official default 0.95).
      b2: Adam's second-moment decay (official default 0.95).
      shampoo_beta: the factors' decay; ``None`` uses ``b2`` (official ``shampoo_beta=-1``).
      eps: Adam's epsilon, added to ``sqrt(v)``.
      precondition_frequency: Adam steps between eigenbasis refreshes.
      max_precond_dim: modes (of a block) larger than this are not rotated (``None``: 10000).
      normalize_grads: divide each leaf's direction by its RMS (official option, helps at frequency ~100).
      correct_bias: Adam's bias correction.
      basis_method: the orthonormalization of the refresh ``L Q``: ``"qr"`` (Householder, the official code's;
        fastest on CPU) or ``"cholesky_qr"`` (shifted CholeskyQR3 with a relative shift of ``1e-5``: products,
        Cholesky and triangular solves, for GPU/TPU).
      stagger: spread each refresh over this many steps (``True``: ``precondition_frequency``; ``None``/``False``:
        every basis on one step): a fixed partition of the (block, mode) factors balanced by the cost
        ``d^3``, slot ``r`` refreshed ``r`` steps before the unstaggered schedule. At most
        ``precondition_frequency``. The first call still computes every basis (by eigh).
      block_size: cut dimensions above it into blocks with their own factors (``None``: no blocks, the official
        algorithm).
      precondition_sharding: ``NamedSharding(mesh, PartitionSpec(axes))``: store the factors, bases and moments of
        the blocks split over those mesh axes, each device updating, refreshing and rotating only its own blocks
        (:mod:`~optax_second_order.curvature.bank`); the direction is gathered once.
      layer_axes: the axes of stacked leaves that index independent layers (scanned layers): each layer gets its
        own factors, bases and moments, as the unrolled model's would (see :func:`~optax_second_order.scale_by_shampoo`).
      state_dtype: the dtype the factors, the bases and the moments are stored in (``None``: float32, or the
        parameters' wider dtype); ``jnp.bfloat16`` halves them, computing in float32 (SOAP's decays of 0.95 leave
        each update 5% of the value, well above bfloat16's resolution of 0.4%).
      quantize: ``None``, 4, 8 or a :class:`~optax_second_order.curvature.quantize.Quantizer`: store every eigenbasis
        ``Q_i`` with ``d_i^2 >= 4096`` block-wise quantized (Wang et al. 2024's quantizer), used after one Björck step
        (``rectify``) and refreshed from the rectified basis; the first moment moves between the bases as they are
        used. Smaller bases follow ``state_dtype``.
      one_sided: rotate only the smaller side of 2-D blocks (Vyas et al. 2024, sec. 7, "one-sided eigenbasis", after
        GaLore): ``True`` for every 2-D block, an integer ``d`` for those whose larger side exceeds ``d``; such a block
        keeps one factor and one eigenbasis, of its smaller side (its rows on a tie), and the other side is not
        rotated. ``False`` (default): both sides, the official code. Blocks of other ranks are unchanged.
      factorized_second_moment: keep Adam's second moment of each 2-D block in the eigenbasis factored as Adafactor
        does (Vyas et al. 2024, sec. 7; Shazeer & Stern 2018): row and column accumulators ``r <- b2 r + (1 - b2)
        G'^2 1`` and ``c <- b2 c + (1 - b2) 1^T G'^2`` of the rotated gradient ``G'``, and ``v = r c^T / (1^T r)``
        in place of the full ``v`` (``m + n`` numbers instead of ``m n``). Where a refresh sorts ``Q_i`` and
        permutes ``v`` along mode ``i``, it permutes that mode's accumulator (``r`` for the rows, ``c`` for the
        columns), which is exactly the factorization of the permuted ``v``. Leaves outside the bank and blocks of
        other ranks keep the full ``v``.

    ``max_precond_dim``, ``stagger``, ``block_size`` and ``layer_axes`` set shapes: under ``optax.inject_hyperparams`` leave them
    ``None`` or list them in ``static_args`` (with ``stagger=True``, list ``precondition_frequency``); so do
    ``one_sided`` (booleans are static under ``inject_hyperparams``; list an integer in ``static_args``) and
    ``factorized_second_moment``.
    """
    name = "scale_by_soap"
    shampoo_beta = b2 if shampoo_beta is None else shampoo_beta
    for argument, value in (("b1", b1), ("b2", b2), ("shampoo_beta", shampoo_beta)):
        check(name, argument, value, lambda x: 0 <= x < 1, "in [0, 1)")
    check(name, "eps", eps, lambda x: x >= 0, ">= 0")
    check(name, "precondition_frequency", precondition_frequency, lambda x: x >= 1 and float(x).is_integer(), "an integer >= 1")
    max_precond_dim = static_int(name, "max_precond_dim", max_precond_dim, 10000)
    block_size = None if block_size is None else static_int(name, "block_size", block_size, 0)
    check_choice(name, "basis_method", basis_method, BASIS_METHODS)
    slots = stagger_slots(name, stagger, precondition_frequency)
    quantizer = storage_codecs.as_quantizer(name, quantize)
    state_dtype = storage_codecs.as_state_dtype(name, state_dtype)
    one_sided = _one_sided_threshold(name, one_sided)

    def storage_of(dtype) -> FactorStorage:
        """How the factors, bases and block moments are stored (computing in ``dtype``)."""
        return FactorStorage(dtype if state_dtype is None else state_dtype, dtype, quantizer)

    def leaf_dtype(x) -> Any:
        """The stored dtype of a moment of a leaf outside the bank."""
        return stat_dtype(x.dtype) if state_dtype is None else state_dtype

    check(name, "stagger", slots, lambda x: not isinstance(precondition_frequency, (int, float)) or x <= precondition_frequency,
          f"at most precondition_frequency ({precondition_frequency})")

    def bank_of(tree) -> tuple[FactorBank, list[tuple[int, ...]]]:
        axes, leaves = common_layer_axes(name, layer_axes, tree), jax.tree.leaves(tree)
        return _bank([x.shape for x in leaves], axes, block_size, max_precond_dim, precondition_sharding,
                     one_sided), axes

    def factored_rows(group) -> int | None:
        """The rows of a group's blocks if their second moment is factored, else ``None``."""
        return group.block_shape[0] if factorized_second_moment and _factored(group.block_shape) else None

    def second_moments(bank: FactorBank, dtype) -> tuple[jax.Array, ...]:
        """Zero second moments per group: ``[n, *block_shape]``, or ``[n, rows + cols]`` (``[r, c]``) factored."""
        return bank.split(tuple(
            jnp.zeros((g.size, sum(g.block_shape)) if factored_rows(g) else (g.size, *g.block_shape), dtype)
            for g in bank.groups
        ))

    def init_fn(params):
        leaves = jax.tree.leaves(params)
        (bank, _), dtype = bank_of(params), tree_stat_dtype(leaves)
        storage = storage_of(dtype)
        outside = [x for x, place in zip(leaves, bank.places) if place is None]

        def moments(blocks):  # fresh buffers: the state is donatable
            return blocks(storage.dtype), tuple(jnp.zeros(x.shape, leaf_dtype(x)) for x in outside)

        zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
        bases = bank.split(tuple(storage.store_basis(q) for q in bank.matrices(dtype, identity=True)))
        return SoapState(zero(), moments(bank.zero_stacks), moments(functools.partial(second_moments, bank)),
                         bank.matrices(storage.dtype), bases, zero(), zero())

    def refresh_fn():  # looked up at call time (tests replace it)
        return _power_qr_refresh if basis_method == "qr" else _cholesky_qr_refresh

    def refreshed(storage: FactorStorage, f, q, mu, nu, mode, rows=None):
        """One refresh of the blocks' bases ``q`` (``[n, d, d]``, as stored) of ``mode`` from their factors ``f``,
        with ``mu`` moved and ``nu`` permuted alike (factored, ``rows`` not ``None``: its accumulator of ``mode``);
        a block whose new basis is not finite keeps its basis and moments. Also which blocks those were. ``mu``
        moves from the basis as it was used to the new one as it will be (a quantized basis: after its round trip
        through storage)."""
        q_used = storage.load_basis(q)
        permuted = nu if rows is None else _accumulator(nu, mode, rows)
        q_new, nu_new = refresh_fn()(_tie_broken(f), q_used, permuted, mode + 1)
        nu_new = nu_new if rows is None else _with_accumulator(nu, nu_new, mode, rows)
        ok = _finite_blocks(q_new)
        if storage.quantized(q_new.shape[-1]):  # quantize finite bases only; mu moves to the basis as it will be used
            stored = storage.store_basis(jnp.where(ok[:, None, None], q_new, q_used))
            mu_new = _moved(mu, q_used, storage.load_basis(stored), mode + 1)
        else:
            stored, mu_new = storage.store(q_new), _moved(mu, q_used, q_new, mode + 1)
        return select_units(ok, stored, q), select_units(ok, mu_new, mu), select_units(ok, nu_new, nu), ~ok

    def first_bases(bank: FactorBank, storage: FactorStorage, factors, bases, mu, nu):
        """Every basis from ``eigh`` of its factor (the first call); a block whose basis is not finite keeps I."""

        def on_device(factors, bases):
            new = [_eigenbasis(_tie_broken(f)) for f in factors]
            ok = [_finite_blocks(q) for q in new]
            stored = [storage.store_basis(jnp.where(k[:, None, None], q, 0.0)) if storage.quantized(q.shape[-1])
                      else storage.store(q) for q, k in zip(new, ok)]
            return tuple(select_units(k, q, old) for q, k, old in zip(stored, ok, bases)), tuple(~k for k in ok)

        bases, failed = bank.on_each_device(on_device, factors, bases)
        return bases, mu, nu, failed

    def refresh_all(bank: FactorBank, storage: FactorStorage, factors, bases, mu, nu):
        """Every factor's basis refreshed (each device its own blocks')."""

        def on_device(factors, bases, mu, nu):
            bases, mu, nu, failed = list(bases), list(mu), list(nu), []
            for s, (g, mode) in enumerate(bank.factor_stacks):
                bases[s], mu[g], nu[g], bad = refreshed(storage, factors[s], bases[s], mu[g], nu[g], mode,
                                                        factored_rows(bank.groups[g]))
                failed.append(bad)
            return tuple(bases), tuple(mu), tuple(nu), tuple(failed)

        return bank.on_each_device(on_device, factors, bases, mu, nu)

    def staggered(bank: FactorBank, storage: FactorStorage, factors, bases, mu, nu, count, ok):
        """The blocks whose slot is due refreshed (if ``ok``), each device its own."""
        tables = bank.stagger_tables(slots)
        slot = due_slot(count, precondition_frequency)
        due = (count > 0) & (slot < slots) & ok

        def on_device(factors, bases, mu, nu, slot, due):
            failed = tuple(jnp.zeros_like(f[:, 0, 0], bool) for f in factors)  # (varying over the devices, as f)
            carry = (bases, mu, nu, failed)
            for s, (g, mode) in enumerate(bank.factor_stacks):

                def refresh(index, carry, s=s, g=g, mode=mode):
                    bases, mu, nu, failed = (list(c) for c in carry)
                    q, m, v, bad = refreshed(storage, factors[s][index], jax.tree.map(lambda x: x[index], bases[s]),
                                             mu[g][index], nu[g][index], mode, factored_rows(bank.groups[g]))
                    bases[s] = jax.tree.map(lambda x, new: x.at[index].set(new), bases[s], q)
                    failed[s] = failed[s].at[index].set(bad)
                    mu[g], nu[g] = mu[g].at[index].set(m), nu[g].at[index].set(v)
                    return tuple(bases), tuple(mu), tuple(nu), tuple(failed)

                carry = update_slot_units(tables, s, slot, due, refresh, carry, bank.device_index())
            return carry

        return bank.on_each_device(on_device, factors, bases, mu, nu, shared=(slot, due))

    def adam_step(g, mu, nu, rotated=False, rows=None):
        """Adam's moments and normalized direction ``m / (sqrt(v) + eps)`` (in whatever basis ``g`` is given; in the
        eigenbases, ``rotated``, ``eps`` has the rotation's rounding floor of :func:`_rounding_floor` added). With
        ``rows`` (a factored group) ``nu`` holds the accumulators ``[r, c]`` and ``v = r c^T / (1^T r)``."""
        new_mu = b1 * mu + (1.0 - b1) * g
        squares = jnp.square(g)
        new_nu = b2 * nu + (1.0 - b2) * (squares if rows is None else _row_col_sums(squares))
        v = new_nu if rows is None else _factored_estimate(new_nu, rows)
        floor = _rounding_floor(v) if rotated else 0.0
        return new_mu / (jnp.sqrt(v) + (eps + floor)), new_mu, new_nu

    def adam_in_eigenbases(bank: FactorBank, blocks, grads, stacked, axes, mu, nu, bases, count):
        """``(directions, mu, nu)``: Adam's step in the eigenbases, each device on its own blocks (none on the first
        call, where the bases do not exist yet), and plain Adam for the leaves outside the bank."""
        stack_of = {key: s for s, key in enumerate(bank.factor_stacks)}
        block_mu, block_nu, rotated_back = [], [], []
        for g, (group, x, m, v) in enumerate(zip(bank.groups, blocks, mu[0], nu[0])):
            group_bases = [bases[stack_of[g, mode]] for mode in group.modes]
            direction, m, v = adam_step(_rotate(x, group.modes, group_bases), m, v, True, factored_rows(group))
            rotated_back.append(_rotate(direction, group.modes, group_bases, back=True))
            block_mu.append(m)
            block_nu.append(v)
        directions = bank.from_stacks(rotated_back, stacked) if bank.groups else [None] * len(grads)
        directions = [d if d is None else layers_back(d, a, g.shape) for d, a, g in zip(directions, axes, grads)]
        outside = [i for i, place in enumerate(bank.places) if place is None]
        leaf_mu, leaf_nu = [], []
        for i, m, v in zip(outside, mu[1], nu[1]):
            directions[i], m, v = adam_step(grads[i].astype(m.dtype), m, v)
            leaf_mu.append(m)
            leaf_nu.append(v)
        t = jnp.maximum(count, 1)
        out = []
        for d in directions:
            if normalize_grads:
                d = d / (1e-30 + jnp.sqrt(jnp.mean(jnp.square(d))))
            if correct_bias:
                d = d * jnp.sqrt(1.0 - b2 ** t.astype(d.dtype)) / (1.0 - b1 ** t.astype(d.dtype))
            out.append(jnp.where(count > 0, d, 0.0))
        started = lambda new, old: tuple(jnp.where(count > 0, n, o) for n, o in zip(new, old))  # noqa: E731
        new_mu = (started(block_mu, mu[0]), started(leaf_mu, mu[1]))
        new_nu = (started(block_nu, nu[0]), started(leaf_nu, nu[1]))
        return out, new_mu, new_nu

    def factors_and_bases(bank: FactorBank, storage: FactorStorage, blocks, mu, nu, factors, bases, count, fresh_ok,
                          ok):
        """Shampoo's factors take in ``G`` (if ``fresh_ok``) after the step; then the bases (if ``ok``): ``eigh`` on
        the first call, power-QR every ``precondition_frequency`` steps (or a slot of them, staggered)."""
        factors = bank.split(tuple(
            jnp.where(fresh_ok, shampoo_beta * f + (1.0 - shampoo_beta) * blocking.batched_mode_gram(blocks[g], mode), f)
            for f, (g, mode) in zip(factors, bank.factor_stacks)
        ))
        first = (count == 0) & ok
        no_refresh = bank.split(tuple(jnp.zeros(f.shape[0], bool) for f in factors))
        if slots > 1:
            bases, mu, nu, failed = jax.lax.cond(
                first, functools.partial(first_bases, bank, storage), lambda f, b, m, v: (b, m, v, no_refresh),
                factors, bases, mu, nu,
            )
            bases, mu, nu, more = staggered(bank, storage, factors, bases, mu, nu, count, ok)
            failed = tuple(a | b for a, b in zip(failed, more))
        else:
            branch = jnp.where(first, 0, jnp.where(ok & (count > 0) & (count % precondition_frequency == 0), 1, 2))
            bases, mu, nu, failed = jax.lax.switch(
                branch,
                (functools.partial(first_bases, bank, storage), functools.partial(refresh_all, bank, storage),
                 lambda f, b, m, v: (b, m, v, no_refresh)),
                factors, bases, mu, nu,
            )
        return factors, bases, mu, nu, bank.count_real(failed)

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        check_float_leaves(updates, name)
        leaves, treedef = jax.tree.flatten(updates)
        (bank, axes), dtype = bank_of(updates), tree_stat_dtype(leaves)
        storage = storage_of(dtype)
        # laid out as planned; a corrupt stored statistic restarts from zero (a moment per block or leaf); the
        # moments and factors computed in float32 (or better) whatever their stored dtype
        outside = [x for x, place in zip(leaves, bank.places) if place is None]
        old_mu, old_nu = ((
            tuple(storage.load(x) for x in _discard_nonfinite_blocks(bank.split(m[0]))),
            tuple(x.astype(stat_dtype(g.dtype)) for x, g in zip(discard_nonfinite(m[1]), outside)),
        ) for m in (state.mu, state.nu))
        factors, largest = discard_nonfinite_matrices(bank.split(state.factors))
        factors = tuple(storage.load(f) for f in factors)
        state = state._replace(bases=bank.split(state.bases))
        used_bases = tuple(storage.load_basis(q) for q in state.bases)
        grads = [g.astype(dtype if place is not None else stat_dtype(g.dtype)) for g, place in zip(leaves, bank.places)]
        stacked = [layers_first(g, a) for g, a in zip(grads, axes)]  # each layer of a stacked leaf on its own
        blocks = bank.to_stacks(stacked)
        # non-finite policy: a step whose gradient could overflow the factors (gram_update_finite, decided from the
        # inputs), or whose moments or direction are not finite, is rejected (zero update, count and moments kept,
        # no refresh). The factors take in G unless it could overflow them. Deciding before the refreshes, which
        # are gated, keeps the large factors and bases out of a whole-state select after the step, which copied
        # them every step.
        fresh_ok = gram_update_finite(grads, largest, shampoo_beta, 1.0 - shampoo_beta, dtype)
        direction, new_mu, new_nu = adam_in_eigenbases(bank, blocks, grads, stacked, axes, old_mu, old_nu, used_bases,
                                                       state.count)
        ok = fresh_ok & all_finite((new_mu, new_nu, direction))
        new_mu, new_nu = jax.tree.map(lambda new, old: jnp.where(ok, new, old), (new_mu, new_nu), (old_mu, old_nu))
        factors, bases, mu_blocks, nu_blocks, failed = factors_and_bases(
            bank, storage, blocks, new_mu[0], new_nu[0], factors, state.bases, state.count, fresh_ok, ok
        )
        stored = lambda xs: tuple(storage.store(x) for x in xs)  # noqa: E731
        leaf_moments = lambda xs: tuple(x.astype(leaf_dtype(g)) for x, g in zip(xs, outside))  # noqa: E731
        new_state = SoapState(
            jnp.where(ok, optax.safe_int32_increment(state.count), state.count),
            (stored(mu_blocks), leaf_moments(new_mu[1])),
            (stored(nu_blocks), leaf_moments(new_nu[1])),
            stored(factors),
            bases,
            state.basis_failures + failed,
            state.nonfinite + (~ok).astype(jnp.int32),
        )
        out = [d.astype(g.dtype) for d, g in zip(direction, leaves)]
        return jax.tree.unflatten(treedef, bank.gathered(reject_step(~ok, out))), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
