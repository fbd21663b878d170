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
factors and bases (:mod:`~optax_second_order.transforms.blocking`); the moments of a blocked leaf are kept in the
blocks' eigenbases, ``[blocks, *block_shape]``. A rotation then costs ``2 * sum_i b_i`` flops per entry instead
of ``2 * sum_i d_i`` (a ``1000 x 500`` layer in blocks of 128: 512 instead of 3000, against a forward and
backward pass's ``6 * batch``), and a refresh ``O(b^3)`` per block.

Refreshes: ``basis_method="qr"`` (Householder QR, the official code; the fastest on CPU) or ``"cholesky_qr"``
(:func:`~optax_second_order.curvature.matrix.orthogonal_iteration_step`: products, Cholesky and triangular solves,
for GPU/TPU); ``stagger`` spreads each refresh over that many steps, a fixed partition of the (leaf, mode, block)
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

Defaults are the official code's (github.com/nikhilvyas/SOAP, ``soap.py``): ``lr = 3e-3``, ``betas =
(0.95, 0.95)``, ``shampoo_beta = -1`` meaning ``b2``, ``eps = 1e-8``, ``weight_decay = 0.01`` (in the
alias), ``precondition_frequency = 10``, ``max_precond_dim = 10000``, ``normalize_grads = False``,
``correct_bias = True``, no blocks. Not implemented: ``merge_dims`` (off by default there).

Reference: Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam" (2024), arXiv:2409.11321.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_second_order.curvature.matrix import eigh_psd, one_matrix_at_a_time, orthogonal_iteration_step
from optax_second_order.transforms import blocking
from optax_second_order.transforms.common import (
    all_finite,
    check,
    check_choice,
    check_float_leaves,
    discard_nonfinite,
    discard_nonfinite_matrices,
    due_slot,
    gram_update_finite,
    stagger_slots,
    stagger_tables,
    stat_dtype,
    static_int,
    update_slot_units,
)
from optax_second_order.transforms.damping import reject_step

__all__ = ["SoapState", "scale_by_soap", "BASIS_METHODS"]

BASIS_METHODS = ("qr", "cholesky_qr")
_HIGHEST = jax.lax.Precision.HIGHEST


class SoapState(NamedTuple):
    """State of :func:`scale_by_soap`.

    Attributes:
      count: number of calls so far (the first one only initializes; Adam's step is ``count``).
      mu: first moments, in the eigenbasis: like the params, or ``[blocks, *block_shape]`` for a blocked leaf.
      nu: second moments, in the eigenbasis, shaped as ``mu``.
      factors: per leaf (``jax.tree.leaves`` order) the factors ``L_i`` of its preconditioned modes (``[d, d]``, or
        ``[blocks, b, b]`` for a blocked leaf).
      bases: the matching eigenbases ``Q_i`` (identity until the first call).
      basis_failures: number of bases (one per block and mode) that came out non-finite and were skipped
        (the previous basis and moments are kept).
      nonfinite: number of steps rejected because the gradient could overflow the factors or the moments or the
        direction came out non-finite.
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    factors: tuple[tuple[jax.Array, ...], ...]
    bases: tuple[tuple[jax.Array, ...], ...]
    basis_failures: jax.Array
    nonfinite: jax.Array


class _Layout(NamedTuple):
    """How a leaf is preconditioned: its blocks (``blocked``: cut by ``block_size``; else one block, the leaf) and
    the modes (of a block) with a factor."""

    shape: tuple[int, ...]
    block_shape: tuple[int, ...]
    num_blocks: int
    blocked: bool
    modes: tuple[int, ...]


def _layout(shape: tuple[int, ...], block_size: int | None, max_precond_dim: int) -> _Layout:
    """Modes with their own factor: none for scalars and vectors, else those of (block) size <= max_precond_dim."""
    if len(shape) <= 1:
        return _Layout(tuple(shape), tuple(shape), 1, False, ())
    if block_size is not None and max(shape) > block_size:
        counts, block_shape = blocking.block_layout(shape, block_size)
        blocked, num_blocks = True, math.prod(counts)
    else:
        block_shape, blocked, num_blocks = tuple(shape), False, 1
    modes = tuple(i for i, d in enumerate(block_shape) if d <= max_precond_dim)
    return _Layout(tuple(shape), block_shape, num_blocks, blocked, modes)


def _rotate(x: jax.Array, modes, bases, back: bool = False) -> jax.Array:
    """``x x_i Q_i^T`` over the preconditioned modes of every block of ``x`` (``[blocks, ...]``, ``bases`` ``[blocks,
    d, d]``): into the eigenbasis, or ``x x_i Q_i`` with ``back``."""
    for mode, q in zip(modes, bases):
        x = blocking.batched_mode_dot(x, jnp.swapaxes(q, -1, -2) if back else q, mode)
    return x


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
        every basis on one step): a fixed partition of the (leaf, mode, block) factors balanced by the cost
        ``d^3``, slot ``r`` refreshed ``r`` steps before the unstaggered schedule. At most
        ``precondition_frequency``. The first call still computes every basis (by eigh).
      block_size: cut dimensions above it into blocks with their own factors (``None``: no blocks, the official
        algorithm).

    ``max_precond_dim``, ``stagger`` and ``block_size`` set shapes: under ``optax.inject_hyperparams`` leave them
    ``None`` or list them in ``static_args`` (with ``stagger=True``, list ``precondition_frequency``).
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
    check(name, "stagger", slots, lambda x: not isinstance(precondition_frequency, (int, float)) or x <= precondition_frequency,
          f"at most precondition_frequency ({precondition_frequency})")

    def layout_of(x) -> _Layout:
        return _layout(tuple(x.shape), block_size, max_precond_dim)

    def to_blocks(x, layout: _Layout):
        return blocking.to_blocks(x, block_size) if layout.blocked else x[None]

    def from_blocks(x, layout: _Layout):
        return blocking.from_blocks(x, layout.shape, block_size) if layout.blocked else x[0]

    def load(x, layout: _Layout):  # a stored moment, factor or basis as a stack of blocks
        return x if layout.blocked else x[None]

    def store(x, layout: _Layout):
        return x if layout.blocked else x[0]

    def init_fn(params):
        leaves = jax.tree.leaves(params)
        layouts = [layout_of(x) for x in leaves]

        def moment(x, layout):  # fresh buffers: the state is donatable
            return jnp.zeros(layout.shape if not layout.blocked else (layout.num_blocks, *layout.block_shape),
                             stat_dtype(x.dtype))

        def per_mode(x, layout, make):
            return tuple(store(make(layout.num_blocks, layout.block_shape[i], stat_dtype(x.dtype)), layout) for i in layout.modes)

        zeros = lambda n, d, dtype: jnp.zeros((n, d, d), dtype)  # noqa: E731
        eyes = lambda n, d, dtype: jnp.broadcast_to(jnp.eye(d, dtype=dtype), (n, d, d)) + jnp.zeros((), dtype)  # noqa: E731
        treedef = jax.tree.structure(params)
        mu = jax.tree.unflatten(treedef, [moment(x, l) for x, l in zip(leaves, layouts)])
        nu = jax.tree.unflatten(treedef, [moment(x, l) for x, l in zip(leaves, layouts)])
        factors = tuple(per_mode(x, l, zeros) for x, l in zip(leaves, layouts))
        bases = tuple(per_mode(x, l, eyes) for x, l in zip(leaves, layouts))
        zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
        return SoapState(zero(), mu, nu, factors, bases, zero(), zero())

    def refresh_fn():  # looked up at call time (tests replace it)
        return _power_qr_refresh if basis_method == "qr" else _cholesky_qr_refresh

    def refreshed(f, q, mu, nu, mode):
        """One refresh of the blocks' bases ``q`` (``[n, d, d]``) of ``mode`` from their factors ``f``, with ``mu``
        moved and ``nu`` permuted alike; a block whose new basis is not finite keeps its basis and moments. Also
        the number of such blocks."""
        q_new, nu_new = refresh_fn()(f, q, nu, mode + 1)
        mu_new = _moved(mu, q, q_new, mode + 1)
        ok = _finite_blocks(q_new)
        keep = lambda new, old: jnp.where(ok.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)  # noqa: E731
        return keep(q_new, q), keep(mu_new, mu), keep(nu_new, nu), jnp.sum(~ok, dtype=jnp.int32)

    def first_bases(factors, bases, mu, nu):
        """Every basis from ``eigh`` of its factor (the first call); a block whose basis is not finite keeps I."""
        new, failed = [], jnp.zeros((), jnp.int32)
        for f, q in zip(factors, bases):
            q_new = _eigenbasis(f)
            ok = _finite_blocks(q_new)
            new.append(jnp.where(ok[:, None, None], q_new, q))
            failed += jnp.sum(~ok, dtype=jnp.int32)
        return tuple(new), mu, nu, failed

    def refresh_all(factors, bases, mu, nu, modes):
        """Every factor's basis refreshed."""
        new, failed = [], jnp.zeros((), jnp.int32)
        for f, q, mode in zip(factors, bases, modes):
            q, mu, nu, more = refreshed(f, q, mu, nu, mode)
            new.append(q)
            failed += more
        return tuple(new), mu, nu, failed

    def staggered(factors, bases, mu, nu, modes, tables, first_stack, count, ok):
        """The blocks whose slot is due refreshed (if ``ok``)."""
        slot = due_slot(count, precondition_frequency)
        due = (count > 0) & (slot < slots) & ok
        bases = list(bases)
        failed = jnp.zeros((), jnp.int32)
        for j, (f, mode) in enumerate(zip(factors, modes)):

            def refresh(index, carry, f=f, j=j, mode=mode):
                bases, mu, nu, failed = carry
                q, m, v, more = refreshed(f[index], bases[j][index], mu[index], nu[index], mode)
                bases = list(bases)
                bases[j] = bases[j].at[index].set(q)
                return bases, mu.at[index].set(m), nu.at[index].set(v), failed + more

            bases, mu, nu, failed = update_slot_units(tables, first_stack + j, slot, due, refresh, (bases, mu, nu, failed))
        return tuple(bases), mu, nu, failed

    def adam_in_eigenbasis(g, mu, nu, bases, count, layout: _Layout):
        """``(direction, mu, nu)``: Adam's step in the eigenbasis (none on the first call, where the basis does not
        exist yet), moments as blocks."""
        modes = layout.modes
        t = jnp.maximum(count, 1).astype(g.dtype)
        mu, nu = load(mu, layout), load(nu, layout)
        bases = tuple(load(q, layout) for q in bases)
        rotated = _rotate(to_blocks(g, layout), modes, bases)
        new_mu = b1 * mu + (1.0 - b1) * rotated
        new_nu = b2 * nu + (1.0 - b2) * jnp.square(rotated)
        direction = from_blocks(_rotate(new_mu / (jnp.sqrt(new_nu) + eps), modes, bases, back=True), layout)
        if normalize_grads:
            direction = direction / (1e-30 + jnp.sqrt(jnp.mean(jnp.square(direction))))
        if correct_bias:
            direction = direction * jnp.sqrt(1.0 - b2**t) / (1.0 - b1**t)
        started = count > 0
        return jnp.where(started, direction, 0.0), jnp.where(started, new_mu, mu), jnp.where(started, new_nu, nu)

    def factors_and_bases(g, mu, nu, factors, bases, count, layout: _Layout, tables, first_stack, fresh_ok, ok):
        """Shampoo's factors take in ``G`` (if ``fresh_ok``) after the step; then the bases (if ``ok``): ``eigh`` on
        the first call, power-QR every ``precondition_frequency`` steps (or a slot of them, staggered)."""
        modes = layout.modes
        blocks = to_blocks(g, layout)
        factors = tuple(
            jnp.where(fresh_ok, shampoo_beta * f + (1.0 - shampoo_beta) * blocking.batched_mode_gram(blocks, mode), f)
            for f, mode in zip((load(f, layout) for f in factors), modes)
        )
        bases = tuple(load(q, layout) for q in bases)
        first = (count == 0) & ok
        if slots > 1:
            bases, mu, nu, failed = jax.lax.cond(
                first, first_bases, lambda *a: (*a[1:], jnp.zeros((), jnp.int32)), factors, bases, mu, nu
            )
            bases, mu, nu, more = staggered(factors, bases, mu, nu, modes, tables, first_stack, count, ok)
            failed += more
        else:
            branch = jnp.where(first, 0, jnp.where(ok & (count > 0) & (count % precondition_frequency == 0), 1, 2))
            bases, mu, nu, failed = jax.lax.switch(
                branch,
                (first_bases, lambda f, b, m, v: refresh_all(f, b, m, v, modes),
                 lambda f, b, m, v: (b, m, v, jnp.zeros((), jnp.int32))),
                factors, bases, mu, nu,
            )
        return (store(mu, layout), store(nu, layout), tuple(store(f, layout) for f in factors),
                tuple(store(q, layout) for q in bases), failed)

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        check_float_leaves(updates, name)
        leaves, treedef = jax.tree.flatten(updates)
        layouts = [layout_of(x) for x in leaves]
        # a corrupt stored statistic restarts from zero
        old_mu, old_nu = discard_nonfinite((jax.tree.leaves(state.mu), jax.tree.leaves(state.nu)))
        flat_factors, largest = discard_nonfinite_matrices(tuple(jax.tree.leaves(state.factors)))
        factors = jax.tree.unflatten(jax.tree.structure(state.factors), flat_factors)
        grads = [g.astype(m.dtype) for g, m in zip(leaves, old_mu)]
        # non-finite policy: a step whose gradient could overflow the factors (gram_update_finite, decided from the
        # inputs), or whose moments or direction are not finite, is rejected (zero update, count and moments kept,
        # no refresh). The factors take in G unless it could overflow them. Deciding before the refreshes, which
        # are gated, keeps the large factors and bases out of a whole-state select after the step, which copied
        # them every step.
        narrowest = min((f.dtype for f in flat_factors), key=lambda d: jnp.finfo(d).max, default=jnp.float32)
        fresh_ok = gram_update_finite(grads, largest, shampoo_beta, 1.0 - shampoo_beta, narrowest)
        steps = [adam_in_eigenbasis(g, m, v, q, state.count, layout)
                 for g, m, v, q, layout in zip(grads, old_mu, old_nu, state.bases, layouts)]
        direction, new_mu, new_nu = zip(*steps) if steps else ((),) * 3
        ok = fresh_ok & all_finite((new_mu, new_nu, direction))
        keep = lambda new, old: tuple(jnp.where(ok, n, load(o, l)) for n, o, l in zip(new, old, layouts))  # noqa: E731
        new_mu, new_nu = keep(new_mu, old_mu), keep(new_nu, old_nu)
        # stagger: one stack of units (blocks) per (leaf, mode), costing b^3 each
        stacks = [(l.num_blocks, float(l.block_shape[i]) ** 3) for l in layouts for i in l.modes]
        tables = stagger_tables([n for n, _ in stacks], [c for _, c in stacks], slots) if slots > 1 else None
        first_stacks = [sum(len(l.modes) for l in layouts[:j]) for j in range(len(layouts))]
        results = [
            factors_and_bases(g, m, v, f, q, state.count, layout, tables, first, fresh_ok, ok)
            for g, m, v, f, q, layout, first in zip(grads, new_mu, new_nu, factors, state.bases, layouts, first_stacks)
        ]
        mu, nu, factors, bases, failed = zip(*results) if results else ((),) * 5
        new_state = SoapState(
            jnp.where(ok, optax.safe_int32_increment(state.count), state.count),
            jax.tree.unflatten(treedef, list(mu)),
            jax.tree.unflatten(treedef, list(nu)),
            tuple(factors),
            tuple(bases),
            state.basis_failures + sum(failed, jnp.zeros((), jnp.int32)),
            state.nonfinite + (~ok).astype(jnp.int32),
        )
        out = [d.astype(g.dtype) for d, g in zip(direction, leaves)]
        return jax.tree.unflatten(treedef, reject_step(~ok, out)), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
