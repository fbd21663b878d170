"""Shampoo: one Kronecker factor per tensor mode, inverse roots every few steps, grafted step size.

For a gradient ``G`` of order ``k`` (after merging small dimensions and cutting dimensions above
``block_size`` into blocks, the last one zero-padded, each block with its own factors; see
:mod:`~optax_second_order.curvature.blocking`), Gupta, Koren & Singer (2018, Alg. 2) keep
per mode ``i`` the statistic

    H_i <- b2 H_i + (1 - b2) G_(i) G_(i)^T       (b2 < 1; b2 = 1: H_i <- H_i + G_(i) G_(i)^T, the paper)

and step along

    P = G x_1 H_1^{-1/p} x_2 ... x_k H_k^{-1/p},        p = 2k (``exponent_override`` replaces it).

Practicalities of Anil et al. (2020) and of the PyTorch Distributed Shampoo (Shi et al. 2023, winner of
the AlgoPerf external-tuning track):

* roots ``(H + delta I)^{-1/p}``, ``delta = eps + relative_eps * lambda_max``, from
  :func:`~optax_second_order.curvature.matrix.inverse_pth_root` (eigh, exact for every ``p``) every
  ``precondition_frequency`` steps from ``start_preconditioning_step``, statistics every
  ``statistics_frequency`` steps, both under ``jax.lax.cond`` inside the compiled step (the statistics
  without one when they are taken every step);
* a root that comes out non-finite keeps the previous one; ``state.root_failures`` counts these; a step whose
  gradient is not finite or could overflow the statistics (by a bound from ``||G||_F^2`` and the largest stored
  entry: :func:`~optax_second_order.transforms.common.gram_update_finite`; on a step that takes no statistics, only a
  non-finite gradient) is rejected (zero update, state kept) and
  counted in ``state.nonfinite``; a stored factor that is not finite (a corrupt state) restarts from zero;
* grafting: the step keeps Shampoo's direction and takes its norm, block by block, from a diagonal
  method ``D`` (``"sgd"``: ``D = G``; ``"adagrad"``, ``"rmsprop"``, ``"adam"``: ``D = G / (sqrt(v) + eps)``
  with ``v`` the sum / EMA / bias-corrected EMA of ``G^2``): ``P ||D||_F / ||P||_F``; before the first
  root the step is ``D`` itself;
* scalars, vectors and tensors with a (merged) dimension above ``max_precond_dim`` use the
  diagonal method: the graft's, or for ``"sgd"``/``"none"`` the diagonal of Shampoo's own statistic
  (Adagrad with ``b2``).

Refreshes. ``root_method="eigh"`` (the default) computes the roots by
:func:`~optax_second_order.curvature.matrix.inverse_pth_root`; ``"newton"`` by the coupled Newton iteration
:func:`~optax_second_order.curvature.matrix.inverse_pth_root_newton` (matrix products only: the fast form on
GPU/TPU), for integer exponents given as Python numbers (``2k``, or an integer ``exponent_override``), with eigh
for the blocks where it does not converge and for every other exponent. On CPU eigh is faster (``docs/api/matrix.md``;
run with ``OPENBLAS_NUM_THREADS=1``). ``stagger=S`` spreads each refresh over ``S`` steps: the factors are split
once into ``S`` slots of balanced cost (``d^3`` per root; :func:`~optax_second_order.curvature.bank.partition_by_cost`)
and slot ``r`` is refreshed on steps ``start - r + k * precondition_frequency``, so every step recomputes about
``n / S`` of the ``n`` roots and no step all of them, and by ``start`` every factor has a root. The roots are then
up to ``precondition_frequency`` steps old, as without staggering.

Sharding. The factors live in a factor bank (:mod:`~optax_second_order.curvature.bank`): the blocks of one shape,
from every leaf, are stacked, ``[n, b_1, ..., b_k]`` for the gradient's blocks and ``[n, b_i, b_i]`` per mode for the
statistics and roots. With ``precondition_sharding = NamedSharding(mesh, PartitionSpec(axes))`` every stack is
stored split over those mesh axes: each device keeps the statistics and roots of ``n / devices`` blocks, updates
them, computes their roots (:func:`jax.shard_map`) and preconditions only its blocks; the preconditioned gradient
is gathered once. This runs inside ``jax.jit`` on meshes of either axis type (``Explicit`` under
``jax.set_mesh``, or ``Auto``).

Storage (``docs/memory.md``). ``state_dtype`` stores the statistics and roots in another dtype (bfloat16), computing
in float32. ``quantize`` is 4-bit Shampoo (Wang, Zhou, Li & Huang, NeurIPS 2024): a statistic ``H = U diag(lambda) U^T``
is kept as float32 ``lambda`` and a block-wise 4- or 8-bit ``U``
(:mod:`~optax_second_order.curvature.quantize`); a statistics step rebuilds ``H`` (one Björck step on the dequantized
``U``), updates it and decomposes it again (eigh); a root is ``V diag((lambda + delta)^{-1/p}) V^T`` with ``V``
rectified by 4 Björck steps, stored quantized with a float32 diagonal.

Defaults: ``b2 = 1`` (the paper), ``eps = 1e-12`` (Distributed Shampoo's epsilon),
``relative_eps = 1e-6`` (Anil et al.'s ``matrix_epsilon``, relative to ``lambda_max``), ``block_size =
1024`` (Distributed Shampoo's ``max_preconditioner_dim``), ``max_precond_dim = 4096`` (Anil et
al.'s ``skip_preconditioning_dim_size_gt``), Adam grafting with ``graft_b2 = 0.999``, ``graft_eps =
1e-8`` (the AlgoPerf submission grafts Adam), start at ``precondition_frequency`` (Distributed Shampoo).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from optax_second_order.curvature.matrix import inverse_pth_root, inverse_pth_root_newton
from optax_second_order.curvature import blocking
from optax_second_order.curvature.bank import FactorBank, due_slot, plan_bank, update_slot_units
from optax_second_order.curvature import quantize as storage_codecs
from optax_second_order.curvature.quantize import Eigenpairs, FactorStorage, select_units, units_finite
from optax_second_order.transforms.damping import reject_step
from optax_second_order.transforms.common import (
    all_finite,
    check,
    check_float_leaves,
    check_choice,
    discard_nonfinite,
    discard_nonfinite_matrices,
    gram_update_finite,
    is_refresh_step,
    layer_axes as common_layer_axes,
    layers_back,
    layers_first,
    stagger_slots,
    tree_stat_dtype,
    static_int,
)

__all__ = ["ShampooState", "scale_by_shampoo", "GRAFTING_TYPES", "ROOT_METHODS"]

NAME = "scale_by_shampoo"
GRAFTING_TYPES = ("none", "sgd", "adagrad", "rmsprop", "adam")
ROOT_METHODS = ("eigh", "newton")
_ADAPTIVE_GRAFTS = ("adagrad", "rmsprop", "adam")


class ShampooState(NamedTuple):
    """State of :func:`scale_by_shampoo`.

    Attributes:
      count: number of updates done (int32).
      stats: the factors ``H`` in the factor bank's layout: one ``[n, d, d]`` stack per (block shape, mode), unit
        ``j`` of every stack of a block shape belonging to its ``j``-th block
        (:class:`~optax_second_order.curvature.bank.FactorBank`).
      roots: the matching stacks of ``(H + delta I)^{-1/p}`` (identity until the first root).
      diagonal: per leaf (in ``jax.tree.leaves`` order) the graft's or the diagonal fallback's ``v``,
        a scalar placeholder where neither is needed.
      root_failures: number of roots that came out non-finite and were replaced by the previous one.
      nonfinite: number of steps rejected because a gradient or a new statistic was not finite.
    """

    count: jax.Array
    stats: tuple[jax.Array, ...]
    roots: tuple[jax.Array, ...]
    diagonal: tuple[jax.Array, ...]
    root_failures: jax.Array
    nonfinite: jax.Array


def _bank(shapes, axes, block_size, merge_dims, max_dim, sharding) -> FactorBank:
    """The factor bank of Shampoo's leaves: each leaf (each layer of a stacked leaf: ``axes``, its layer axes) with its
    small dimensions merged, cut into blocks, one factor per mode of each block; scalars, vectors and leaves with a
    (merged) dimension above ``max_dim`` use the diagonal fallback (not in the bank)."""
    merged_shapes, layers = [], []
    for shape, layer_axes_ in zip(shapes, axes):
        layer = tuple(d for i, d in enumerate(shape) if i not in layer_axes_)
        merged = blocking.merge_small_dims(layer, block_size) if merge_dims else tuple(d for d in layer if d > 1)
        fallback = len(layer) <= 1 or not merged or max(merged) > max_dim or math.prod(shape) == 0
        merged_shapes.append(None if fallback else merged)
        layers.append(math.prod(shape[i] for i in layer_axes_))
    return plan_bank(merged_shapes, lambda block_shape: tuple(range(len(block_shape))), block_size, sharding, layers)


def _graft(direction: jax.Array, graft_norms: jax.Array) -> jax.Array:
    """Each block of ``direction`` (blocks along the leading axis) rescaled to the Frobenius norm of the same block
    of the graft (``graft_norms``, ``[n]``; Anil et al. 2020, sec. 4.1)."""
    axes = tuple(range(1, direction.ndim))
    norms = jnp.sqrt(jnp.sum(jnp.square(direction), axis=axes))
    return direction * (graft_norms / (norms + 1e-16)).reshape((-1,) + (1,) * len(axes))


def _sum_weight(decay):
    """The weight of a new statistic in ``decay * old + weight * new``: ``1 - decay``, or 1 for ``decay = 1`` (a sum)."""
    return jnp.where(decay == 1.0, 1.0, 1.0 - decay)


def scale_by_shampoo(
    b2: float = 1.0,
    eps: float = 1e-12,
    relative_eps: float = 1e-6,
    exponent_override: float | None = None,
    precondition_frequency: int = 10,
    start_preconditioning_step: int | None = None,
    statistics_frequency: int = 1,
    block_size: int | None = None,
    merge_dims: bool = True,
    max_precond_dim: int | None = None,
    grafting: str = "adam",
    graft_b2: float = 0.999,
    graft_eps: float = 1e-8,
    precondition_sharding: NamedSharding | None = None,
    root_method: str = "eigh",
    stagger: bool | int | None = None,
    layer_axes: Any = None,
    state_dtype: Any = None,
    quantize: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Shampoo preconditioning with blocking, grafting and sharded roots (see the module docstring).

    Args:
      b2: factor decay; 1 sums ``G G^T`` (Gupta et al.), below 1 an EMA ``b2 H + (1 - b2) G G^T``.
      eps: absolute root damping, ``delta = eps + relative_eps * lambda_max(H)``.
      relative_eps: root damping relative to the largest eigenvalue of ``H``.
      exponent_override: use ``H^{-1/exponent_override}`` for every factor instead of ``H^{-1/(2k)}``.
      precondition_frequency: steps between root computations.
      start_preconditioning_step: first step using Shampoo's direction (default ``precondition_frequency``).
      statistics_frequency: steps between statistics updates.
      block_size: dimensions above it are cut into blocks; small dimensions are merged up to it (``None``: 1024).
      merge_dims: merge consecutive small dimensions (Anil et al.'s best-effort shape interpretation).
      max_precond_dim: leaves with a (merged) dimension above it use the diagonal fallback (``None``: 4096).
      grafting: one of ``"none", "sgd", "adagrad", "rmsprop", "adam"``.
      graft_b2: the RMSprop/Adam graft's decay.
      graft_eps: every adaptive graft's epsilon.
      precondition_sharding: ``NamedSharding(mesh, PartitionSpec(axes))``: spread the roots over those mesh axes.
      root_method: ``"eigh"`` (the default, exact for every exponent) or ``"newton"`` (the coupled Newton
        iteration, matrix products only, for GPU/TPU; used where the exponent is a Python integer, with eigh for
        the blocks where it does not converge and for every other exponent).
      stagger: spread each refresh over this many steps (``True``: ``precondition_frequency``; ``None``/``False``:
        all roots on one step): a fixed partition of the factors, balanced by the cost ``d^3`` of their roots,
        whose slot ``r`` is refreshed ``r`` steps before the unstaggered schedule. At most
        ``precondition_frequency``.
      layer_axes: the axes of stacked leaves that index independent layers (the parameters of layers under
        ``nn.scan`` / ``nnx.scan`` / ``lax.scan``: a leading layer axis): each layer gets its own factors, as the
        unrolled model's would, all in the same stacks (one batched operation, whatever the number of layers).
        ``None`` (no stacked leaves), or a pytree prefix of the params with an axis, a tuple of axes or ``None`` at
        each leaf, or a callable ``params -> such a pytree`` (as optax's Muon takes its dimension numbers).
      state_dtype: the dtype the statistics and roots are stored in (``None``: float32, or the parameters' wider
        dtype); ``jnp.bfloat16`` halves them, computing in float32. With ``b2 = 1`` (a sum) or ``b2`` near 1, a
        bfloat16 statistic stops taking in small gradients (8 bits of mantissa): prefer ``quantize`` there.
      quantize: ``None``, 4, 8 or a :class:`~optax_second_order.curvature.quantize.Quantizer`: 4-bit Shampoo (Wang
        et al. 2024): every ``d x d`` factor with ``d^2 >= 4096`` keeps its statistic as float32 eigenvalues and a
        block-wise quantized eigenbasis (rebuilt with one Björck step, updated, and decomposed again by ``eigh`` on
        each statistics step) and its root quantized with a float32 diagonal (rebuilt from the eigenpairs after 4
        Björck steps, matrix products only). The eigendecomposition on each statistics step is the price: pair it
        with ``statistics_frequency`` (the paper gathers statistics every 100 steps). Smaller factors follow
        ``state_dtype``.

    ``block_size``, ``max_precond_dim``, ``stagger`` and ``layer_axes`` set shapes: under
    ``optax.inject_hyperparams`` leave them ``None`` or list them in ``static_args`` (with ``stagger=True``, list
    ``precondition_frequency``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra arguments are ignored.
    """
    _validate(b2, eps, relative_eps, exponent_override, precondition_frequency, start_preconditioning_step,
              statistics_frequency, grafting, graft_b2, graft_eps)
    check_choice(NAME, "root_method", root_method, ROOT_METHODS)
    block_size = static_int(NAME, "block_size", block_size, 1024)
    max_precond_dim = static_int(NAME, "max_precond_dim", max_precond_dim, 4096)
    slots = stagger_slots(NAME, stagger, precondition_frequency)
    check(NAME, "stagger", slots, lambda x: not isinstance(precondition_frequency, (int, float)) or x <= precondition_frequency,
          f"at most precondition_frequency ({precondition_frequency})")
    start = precondition_frequency if start_preconditioning_step is None else start_preconditioning_step
    quantizer = storage_codecs.as_quantizer(NAME, quantize)
    state_dtype = storage_codecs.as_state_dtype(NAME, state_dtype)

    def storage_of(dtype) -> FactorStorage:
        """How the factors are stored (computing in ``dtype``, the statistics' dtype)."""
        return FactorStorage(dtype if state_dtype is None else state_dtype, dtype, quantizer)

    def bank_of(tree) -> tuple[FactorBank, list[tuple[int, ...]]]:
        axes, leaves = common_layer_axes(NAME, layer_axes, tree), jax.tree.leaves(tree)
        bank = _bank([x.shape for x in leaves], axes, block_size, merge_dims, max_precond_dim, precondition_sharding)
        return bank, axes

    def diagonal_rule(place) -> str:
        if grafting in _ADAPTIVE_GRAFTS:
            return grafting
        return "diagonal" if place is None else grafting

    def init_fn(params):
        leaves = jax.tree.leaves(params)
        (bank, _), dtype = bank_of(params), tree_stat_dtype(leaves)
        diagonal = tuple(
            jnp.zeros(x.shape, dtype) if diagonal_rule(place) in (*_ADAPTIVE_GRAFTS, "diagonal") else jnp.zeros((), dtype)
            for x, place in zip(leaves, bank.places)
        )
        zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731 (fresh buffers: the state is donatable)
        storage = storage_of(dtype)
        sizes = [(bank.groups[g].size, d) for (g, _), d in zip(bank.factor_stacks, bank.factor_dims())]
        stats = bank.split(tuple(storage.zero_psd(n, d) for n, d in sizes))
        roots = bank.split(tuple(storage.identity_symmetric(n, d) for n, d in sizes))
        return ShampooState(zero(), stats, roots, diagonal, zero(), zero())

    def accumulate(bank: FactorBank, storage: FactorStorage, stats, blocks, fresh_ok):
        """``b2 H + w G_(i) G_(i)^T`` for every block and mode (``H`` if not ``fresh_ok``): one batched Gram
        product per factor stack, on each device's own blocks. A quantized statistic is rebuilt from its eigenpairs,
        updated and decomposed again (each device its own blocks; a block whose decomposition is not finite keeps
        its statistic)."""
        dense = bank.split(tuple(
            h if isinstance(h, Eigenpairs) else storage.store(jnp.where(
                fresh_ok, b2 * storage.load(h) + _sum_weight(b2) * blocking.batched_mode_gram(blocks[g], mode),
                storage.load(h)))
            for h, (g, mode) in zip(stats, bank.factor_stacks)
        ))
        quantized = [s for s, h in enumerate(stats) if isinstance(h, Eigenpairs)]
        if not quantized:
            return dense

        def on_device(stats, blocks):
            out = []
            for s in quantized:
                g, mode = bank.factor_stacks[s]
                new = b2 * storage.load_psd(stats[s]) + _sum_weight(b2) * blocking.batched_mode_gram(blocks[g], mode)
                stored = storage.store_psd(new)
                out.append(select_units(units_finite(stored), stored, stats[s]))
            return tuple(out)

        kept = tuple(stats[s] for s in quantized)
        updated = jax.lax.cond(fresh_ok, lambda st, bl: bank.on_each_device(on_device, st, bl),
                               lambda st, bl: bank.split(kept), stats, blocks)
        out = list(dense)
        for s, stored in zip(quantized, updated):
            out[s] = stored
        return tuple(out)

    def eigenpair_root(order):
        """``stored -> (root, ok)`` for statistics kept as quantized eigenpairs: ``V diag((lambda + delta)^{-1/p})
        V^T`` with ``V`` rectified by ``root_rectify`` Björck steps (matrix products only)."""
        p = 2.0 * order if exponent_override is None else exponent_override

        def root(stored: Eigenpairs, storage: FactorStorage):
            v = storage.load_basis(stored.vectors, root=True)
            values = stored.values.astype(v.dtype)
            delta = eps + relative_eps * jnp.max(values, axis=-1, keepdims=True)
            scaled = v * jnp.power(values + delta, -1.0 / jnp.asarray(p, v.dtype))[..., None, :]
            r = jnp.matmul(scaled, jnp.swapaxes(v, -1, -2), precision=jax.lax.Precision.HIGHEST)
            return r, jnp.all(jnp.isfinite(r), axis=(-2, -1))

        return root

    def any_root(order, storage: FactorStorage, h):
        """``(stored root, ok)`` of a stored statistic ``h`` (dense or eigenpairs)."""
        if isinstance(h, Eigenpairs):
            root, ok = eigenpair_root(order)(h, storage)
        else:
            root, ok = root_fn(order)(storage.load(h))
        if isinstance(h, Eigenpairs) or storage.quantized(root.shape[-1]):  # quantize finite roots only
            root = jnp.where(ok[:, None, None], root, 0.0)
        return storage.store_symmetric(root), ok

    def root_fn(order):
        """``h -> (root, ok)`` for a ``[n, d, d]`` stack of factors of tensor order ``order``."""
        p = 2.0 * order if exponent_override is None else exponent_override
        integer_p = int(p) if isinstance(p, (int, float)) and float(p).is_integer() else None
        eigh_root = functools.partial(inverse_pth_root, p=p, eps=eps, relative_eps=relative_eps)
        if root_method == "eigh" or integer_p is None:
            return eigh_root

        def newton_root(h):
            root, ok, _ = inverse_pth_root_newton(h, integer_p, eps=eps, relative_eps=relative_eps)

            def with_eigh(args):  # the blocks where the iteration did not converge (rare: see matrix.md)
                root, ok = args
                fallback, fallback_ok = eigh_root(h)
                return jnp.where(ok[:, None, None], root, fallback), ok | fallback_ok

            return jax.lax.cond(jnp.all(ok), lambda args: args, with_eigh, (root, ok))

        return newton_root

    def inverse_roots(bank: FactorBank, storage: FactorStorage, stats, roots):
        """Every root recomputed (each device its own blocks'); a non-finite one keeps the previous root."""
        orders = [len(bank.groups[g].block_shape) for g, _ in bank.factor_stacks]

        def on_device(stats, roots):
            results = [any_root(order, storage, h) for order, h in zip(orders, stats)]
            new = tuple(select_units(ok, root, old) for (root, ok), old in zip(results, roots))
            return new, tuple(~ok for _, ok in results)

        roots, failed = bank.on_each_device(on_device, stats, roots)
        return roots, bank.count_real(failed)

    def staggered_roots(bank: FactorBank, storage: FactorStorage, stats, roots, count, fresh_ok):
        """The roots of the slot due at ``count`` (if any, and if ``fresh_ok``); the others keep theirs."""
        tables = bank.stagger_tables(slots)
        orders = [len(bank.groups[g].block_shape) for g, _ in bank.factor_stacks]
        slot = due_slot(count, precondition_frequency, start)
        due = (slot < slots) & (count >= start - slot) & fresh_ok

        def on_device(stats, roots, slot, due):
            # (varying over the devices, as h)
            failed = [jnp.zeros_like(_unit_column(h), bool) for h in stats]
            carry = (list(roots), failed)
            for stack, (order, h) in enumerate(zip(orders, stats)):

                def refresh(index, carry, order=order, h=h, stack=stack):
                    roots, failed = list(carry[0]), list(carry[1])
                    root, ok = any_root(order, storage, jax.tree.map(lambda x: x[index], h))
                    old = jax.tree.map(lambda x: x[index], roots[stack])
                    roots[stack] = jax.tree.map(lambda x, new: x.at[index].set(new), roots[stack],
                                                select_units(ok, root, old))
                    failed[stack] = failed[stack].at[index].set(~ok)
                    return roots, failed

                carry = update_slot_units(tables, stack, slot, due, refresh, carry, bank.device_index())
            return tuple(carry[0]), tuple(carry[1])

        roots, failed = bank.on_each_device(on_device, stats, roots, shared=(slot, due))
        return roots, bank.count_real(failed)

    def update_diagonal(v, g, rule):
        if rule == "adagrad":
            return v + g * g
        if rule == "diagonal":
            return b2 * v + _sum_weight(b2) * g * g
        if rule in ("rmsprop", "adam"):
            return graft_b2 * v + (1.0 - graft_b2) * g * g
        return v

    def diagonal_direction(v, g, rule, t):
        if rule == "adam":
            v = v / (1.0 - graft_b2**t)
        if rule in ("adagrad", "rmsprop", "adam", "diagonal"):
            return g / (jnp.sqrt(v) + graft_eps)
        return g if rule == "sgd" else None

    def precondition(bank: FactorBank, storage: FactorStorage, blocks, roots, grafts):
        """``G x_1 R_1 ... x_k R_k`` for every block (each device its own), rescaled to the block norms of the graft
        (``grafts``: per leaf, the diagonal method's direction)."""
        stack_of = {key: s for s, key in enumerate(bank.factor_stacks)}
        norms = None if grafting == "none" else bank.block_norms(grafts)
        out = []
        for g, (group, x) in enumerate(zip(bank.groups, blocks)):
            for mode in group.modes:
                x = blocking.batched_mode_dot(x, storage.load_symmetric(roots[stack_of[g, mode]]), mode)
            out.append(x if norms is None else _graft(x, norms[g]))
        return out

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        check_float_leaves(updates, NAME)
        leaves, treedef = jax.tree.flatten(updates)
        (bank, axes), dtype = bank_of(updates), tree_stat_dtype(leaves)
        storage = storage_of(dtype)
        state = state._replace(stats=bank.split(state.stats), roots=bank.split(state.roots))  # laid out as planned
        grads = [g.astype(dtype) for g in leaves]
        stacked = [layers_first(g, a) for g, a in zip(grads, axes)]  # each layer of a stacked leaf on its own
        blocks = bank.to_stacks(stacked)
        count = state.count

        old_stats, largest = _discard_corrupt(storage, state.stats)  # a corrupt factor restarts (per block)
        # non-finite policy: a gradient that is not finite, or whose statistic could overflow (its squared norm
        # does; gram_update_finite), is not folded in, refreshes no root, and the step is rejected (the kept graft
        # statistic would pair with the fresh gradient into a huge step). Deciding this from the inputs lets the
        # select fuse with the statistics' update, and gating the refresh keeps the statistics and roots out of
        # the whole-state select below, which would copy both every step. A step rejected only for a non-finite
        # direction keeps its finite statistics and roots.
        fresh_ok = gram_update_finite(grads, largest, b2, _sum_weight(b2), dtype)
        if isinstance(statistics_frequency, int) and statistics_frequency == 1:
            stats = accumulate(bank, storage, old_stats, blocks, fresh_ok)
        else:
            statistics_step = is_refresh_step(count, statistics_frequency)
            fresh_ok = jnp.where(statistics_step, fresh_ok, all_finite(grads))  # no statistic to overflow
            stats = jax.lax.cond(
                statistics_step, lambda s: accumulate(bank, storage, s, blocks, fresh_ok), lambda s: s, old_stats,
            )
        if slots == 1:
            roots, failures = jax.lax.cond(
                is_refresh_step(count, precondition_frequency, start) & fresh_ok,
                lambda s, r: inverse_roots(bank, storage, s, r), lambda s, r: (r, jnp.zeros((), jnp.int32)), stats,
                state.roots,
            )
        else:
            roots, failures = staggered_roots(bank, storage, stats, state.roots, count, fresh_ok)
        rules = [diagonal_rule(place) for place in bank.places]
        diagonal = tuple(update_diagonal(v, g, r) for v, g, r in zip(discard_nonfinite(state.diagonal), grads, rules))
        t = (count + 1).astype(dtype)
        directions = [diagonal_direction(v, g, rule, t) for g, v, rule in zip(grads, diagonal, rules)]
        if bank.groups:
            grafts = [d if d is None else layers_first(d, a) for d, a in zip(directions, axes)]
            shampoo = bank.from_stacks(precondition(bank, storage, blocks, roots, grafts), stacked)
            shampoo = [s if s is None else layers_back(s, a, g.shape) for s, a, g in zip(shampoo, axes, grads)]
        else:
            shampoo = [None] * len(grads)
        out = []
        for g, d, s, orig in zip(grads, directions, shampoo, leaves):
            if s is not None:
                d = jnp.where(count >= start, s, g if d is None else d)
            out.append(d.astype(orig.dtype))
        new_state = ShampooState(
            optax.safe_int32_increment(count), stats, roots, diagonal, state.root_failures + failures, state.nonfinite
        )
        ok = fresh_ok & all_finite((diagonal, out))
        kept = state._replace(stats=stats, roots=roots, nonfinite=state.nonfinite + 1)
        new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, kept)
        return jax.tree.unflatten(treedef, bank.gathered(reject_step(~ok, out))), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _unit_column(stored) -> jax.Array:
    """One entry per unit (leading axis) of a stored stack, ``[n]`` (a template for per-unit flags)."""
    leaf = jax.tree.leaves(stored)[0]
    return leaf.reshape(leaf.shape[0], -1)[:, 0]


def _discard_corrupt(storage: FactorStorage, stats):
    """The stored statistics with every unit that holds a non-finite number restarted from zero (dense stacks:
    :func:`~optax_second_order.transforms.common.discard_nonfinite_matrices`; eigenpairs: zero eigenvalues, the
    identity basis), and the largest ``|entry|`` kept (for eigenpairs, the largest eigenvalue, which bounds them)."""
    dense = [s for s, h in enumerate(stats) if not isinstance(h, Eigenpairs)]
    cleaned, largest = discard_nonfinite_matrices(tuple(stats[s] for s in dense))
    out = list(stats)
    for s, h in zip(dense, cleaned):
        out[s] = h
    for s, h in enumerate(stats):
        if isinstance(h, Eigenpairs):
            ok = units_finite(h)
            zero = storage.zero_psd(h.values.shape[0], h.values.shape[1])
            out[s] = select_units(ok, h, zero)
            largest = jnp.maximum(largest, jnp.max(jnp.where(ok[:, None], jnp.abs(h.values), 0.0)))
    return tuple(out), largest


def _validate(b2, eps, relative_eps, exponent_override, precondition_frequency, start, statistics_frequency,
              grafting, graft_b2, graft_eps) -> None:
    check(NAME, "b2", b2, lambda x: 0 < x <= 1, "in (0, 1]")
    for name, value in (("eps", eps), ("relative_eps", relative_eps), ("graft_eps", graft_eps)):
        check(NAME, name, value, lambda x: x >= 0, ">= 0")
    check(NAME, "exponent_override", exponent_override, lambda x: x > 0, "None or > 0")
    for name, value in (("precondition_frequency", precondition_frequency), ("statistics_frequency", statistics_frequency)):
        check(NAME, name, value, lambda x: x >= 1 and float(x).is_integer(), "an integer >= 1")
    check(NAME, "start_preconditioning_step", start, lambda x: x >= 0 and float(x).is_integer(), "None or an integer >= 0")
    check_choice(NAME, "grafting", grafting, GRAFTING_TYPES)
    check(NAME, "graft_b2", graft_b2, lambda x: 0 <= x < 1, "in [0, 1)")
