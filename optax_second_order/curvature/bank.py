"""The factor bank: one layout for the Kronecker state of every block-structured preconditioner.

Shampoo, SOAP (and in time K-FAC, EK-FAC, K-BFGS) keep one small matrix per mode of each *block*: a tensor
(a parameter after merging small dimensions, or a layer's gradient matrix) is cut into blocks of at most
``block_size`` along every dimension (the last one zero-padded: :mod:`~optax_second_order.curvature.blocking`),
and block ``j`` of shape ``(b_1, ..., b_k)`` owns one ``b_i x b_i`` factor per preconditioned mode ``i``.

The bank is the static plan of where everything lives, fixed by the shapes alone:

* a **group** holds every block of one shape and one set of preconditioned modes, from every item;
  its blocks are the **units** ``0 .. n-1`` of the group, in item order;
* per group, the tensor data is one ``[n, b_1, ..., b_k]`` stack (:meth:`FactorBank.to_stacks`: a gradient, a
  moment kept in the eigenbasis) and the factors are one ``[n, b_i, b_i]`` stack per preconditioned mode
  (:meth:`FactorBank.matrices`), in the flat order ``(group 0, mode ...), (group 1, mode ...), ...``;
* so every per-block operation (a mode Gram matrix, a mode product, a root, a basis refresh) is one batched
  operation per group and mode, unit ``j`` of the data meeting unit ``j`` of each factor stack;
* a *stacked* item (``layers``: the parameters of layers under ``scan``, a leading layer axis) is that many
  independent tensors: each layer's blocks are units of their own, so every layer gets its own factors, and the
  step's program does not grow with the number of layers.

Devices. With a ``sharding`` (``NamedSharding(mesh, PartitionSpec(axes))``; ``axes`` a mesh axis name or a
tuple of them) every stack is **stored** split along its unit axis over those mesh axes: each device holds
``n / d`` units of every group (groups are padded with zero units to a multiple of ``d``; a padded unit's
factors stay zero and its results are ignored: :meth:`FactorBank.real_units`), updates and refreshes only those
(:meth:`FactorBank.on_each_device`), and preconditions only its blocks; the update is gathered once
(:meth:`FactorBank.from_stacks`). Units of one group cost the same, so an equal count per device is an equal
share of the work (the balance Meta's Distributed Shampoo gets from its cost-balanced distributor). This works
inside ``jax.jit`` on a mesh of either axis type (``Explicit`` under ``jax.set_mesh``, or ``Auto``): the layout
is stated with a sharding constraint on ``Auto`` axes and with ``jax.device_put`` (a reshard) on ``Explicit`` ones.

Staggering (:meth:`FactorBank.stagger_tables`): the units of the factor stacks (``b^3`` each) are partitioned into
slots of balanced cost, the same partition on any number of devices (a run's schedule does not depend on the
mesh); each device refreshes its own units of the slot that is due.

References: Anil et al., "Scalable Second Order Optimization for Deep Learning" (2020), sec. 5 (blocks);
Shi et al., "A Distributed Data-Parallel PyTorch Implementation of the Distributed Shampoo Optimizer for
Training Neural Networks At-Scale" (2023), sec. 4 (each worker owns a share of the blocks and all-gathers
the search direction).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from optax_second_order.curvature import blocking

__all__ = [
    "Group", "Place", "FactorBank", "plan_bank", "sharding_axes", "partition_by_cost", "due_slot", "StaggerTables",
    "stagger_tables", "update_slot_units",
]


class Group(NamedTuple):
    """Blocks of one shape whose factors are stacked together."""

    block_shape: tuple[int, ...]
    modes: tuple[int, ...]  # the block's modes that have a factor
    size: int  # units in the stacks: the real ones, then zero padding up to a multiple of the devices
    real: int  # units 0 .. real - 1 are blocks of items


class Place(NamedTuple):
    """Where an item's blocks are: units ``offset .. offset + count - 1`` of group ``group``."""

    group: int
    offset: int
    count: int
    shape: tuple[int, ...]  # the shape of each of the item's layers as it is cut into blocks
    layers: int = 1  # a stacked item (scanned layers): that many independent tensors of ``shape``, layer-major


def sharding_axes(sharding: NamedSharding, what: str = "precondition_sharding") -> tuple[str, ...]:
    """The mesh axes named by the first entry of ``sharding``'s ``PartitionSpec``, or a ``ValueError``."""
    axes = sharding.spec[0] if len(sharding.spec) else None
    if axes is None:
        raise ValueError(f"{what}: its PartitionSpec must name the mesh axes to split over, got {sharding.spec}")
    return (axes,) if isinstance(axes, str) else tuple(axes)


@dataclasses.dataclass(frozen=True)
class FactorBank:
    """The static layout of :func:`plan_bank` (module docstring); its methods move data in and out of it."""

    groups: tuple[Group, ...]
    places: tuple[Place | None, ...]  # per item; None: not in the bank
    block_size: int | None
    sharding: NamedSharding | None

    # --- the plan -----------------------------------------------------------------------------------

    @property
    def devices(self) -> int:
        """How many devices share the units of each group (1 without a sharding)."""
        if self.sharding is None:
            return 1
        return math.prod(self.sharding.mesh.shape[a] for a in sharding_axes(self.sharding))

    @property
    def factor_stacks(self) -> tuple[tuple[int, int], ...]:
        """``(group, mode)`` of each factor stack, in the flat order of :meth:`matrices`."""
        return tuple((g, mode) for g, group in enumerate(self.groups) for mode in group.modes)

    def factor_dims(self) -> tuple[int, ...]:
        """The size ``b_i`` of each factor stack's matrices."""
        return tuple(self.groups[g].block_shape[mode] for g, mode in self.factor_stacks)

    def real_units(self, group: int) -> np.ndarray:
        """``[n]`` bool: which units of ``group`` are blocks of items (the rest is padding)."""
        g = self.groups[group]
        return np.arange(g.size) < g.real

    def count_real(self, flags: Sequence[jax.Array], per: str = "factor") -> jax.Array:
        """How many real units are flagged (``flags``: ``[n]`` bool per factor stack, or per group with
        ``per="group"``, such as failed refreshes; padding units are not counted), int32."""
        groups = [g for g, _ in self.factor_stacks] if per == "factor" else range(len(self.groups))
        counts = [jnp.sum(f & self.real_units(g), dtype=jnp.int32) for f, g in zip(flags, groups)]
        return sum(counts, jnp.zeros((), jnp.int32))

    def stacks_of(self, group: int) -> tuple[int, ...]:
        """The indices (in :attr:`factor_stacks` order) of ``group``'s factor stacks, one per mode."""
        return tuple(s for s, (g, _) in enumerate(self.factor_stacks) if g == group)

    # --- layout on devices ------------------------------------------------------------------------------

    def split(self, tree: Any) -> Any:
        """Every array of ``tree`` laid out with its leading (unit) axis split over the bank's devices."""
        if self.sharding is None:
            return tree
        return self._laid_out(tree, PartitionSpec(sharding_axes(self.sharding)))

    def gathered(self, tree: Any) -> Any:
        """Every array of ``tree`` replicated on the bank's devices (the one gather of the update). A transformation
        states it for its whole update too: on an ``Auto`` mesh XLA would otherwise be free to hand the update, and
        with it the data-parallel parameters, back split like the stacks."""
        if self.sharding is None:
            return tree
        return self._laid_out(tree, PartitionSpec())

    def _laid_out(self, tree: Any, spec: PartitionSpec) -> Any:
        """``tree`` with ``spec`` on the bank's mesh: a sharding constraint on ``Auto`` axes (inside ``jit``,
        ``jax.device_put`` does not bind XLA's choice there), a reshard (``jax.device_put``) on ``Explicit`` ones."""
        sharding = NamedSharding(self.sharding.mesh, spec)
        explicit = all(t == AxisType.Explicit for t in self.sharding.mesh.axis_types)
        put = jax.device_put if explicit else jax.lax.with_sharding_constraint
        return jax.tree.map(lambda x: put(x, sharding), tree)

    def on_each_device(self, fn: Callable, *trees: Any, shared: tuple = ()) -> Any:
        """``fn(*trees, *shared)`` for trees of unit-axis stacks and ``shared`` values every device needs whole (a
        step counter); with a sharding, each device runs ``fn`` on its own units (:func:`jax.shard_map`) and the
        results stay split. ``fn`` must work unit by unit (a refresh)."""
        if self.sharding is None or not jax.tree.leaves(trees):  # no stacks (a bank with no groups): nothing to split
            return fn(*trees, *shared)
        spec = PartitionSpec(sharding_axes(self.sharding))
        in_specs = (spec,) * len(trees) + (PartitionSpec(),) * len(shared)
        mapped = jax.shard_map(fn, mesh=self.sharding.mesh, in_specs=in_specs, out_specs=spec)
        return mapped(*self.split(trees), *self.gathered(shared))

    # --- state ------------------------------------------------------------------------------------------

    def matrices(self, dtype: Any, identity: bool = False) -> tuple[jax.Array, ...]:
        """One ``[n, b, b]`` stack per factor stack (:attr:`factor_stacks`): zeros, or identities. Fresh
        buffers (a donated state must not share them)."""
        def stack(g, mode):
            d, n = self.groups[g].block_shape[mode], self.groups[g].size
            if identity:
                return jnp.broadcast_to(jnp.eye(d, dtype=dtype), (n, d, d)) + jnp.zeros((), dtype)
            return jnp.zeros((n, d, d), dtype)

        return self.split(tuple(stack(g, mode) for g, mode in self.factor_stacks))

    def zero_stacks(self, dtype: Any) -> tuple[jax.Array, ...]:
        """One ``[n, *block_shape]`` stack of zeros per group (moments kept per block)."""
        return self.split(tuple(jnp.zeros((g.size, *g.block_shape), dtype) for g in self.groups))

    # --- data in and out ---------------------------------------------------------------------------------

    def to_stacks(self, items: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        """Every item's blocks in its group's ``[n, *block_shape]`` stack (padding units zero), split over the
        devices. Items outside the bank are ignored."""
        parts: list[list[jax.Array]] = [[] for _ in self.groups]
        for x, place in zip(items, self.places):
            if place is not None:
                parts[place.group].append(self._blocks(x, place))
        stacks = []
        for group, blocks in zip(self.groups, parts):
            pad = group.size - group.real
            if pad:
                blocks.append(jnp.zeros((pad, *group.block_shape), blocks[0].dtype))
            stacks.append(blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks))
        return self.split(tuple(stacks))

    def from_stacks(self, stacks: Sequence[jax.Array], like: Sequence[Any]) -> list[jax.Array | None]:
        """The items back from their groups' stacks (gathered from the devices), reshaped like ``like``; None for
        an item outside the bank."""
        stacks = self.gathered(tuple(stacks))
        out: list[jax.Array | None] = []
        for place, x in zip(self.places, like):
            if place is None:
                out.append(None)
                continue
            blocks = jax.lax.slice_in_dim(stacks[place.group], place.offset, place.offset + place.count)
            out.append(self._unblocks(blocks, place).reshape(jnp.shape(x)))
        return out

    def stack_items(self, per_item: Sequence[Any], per: str = "factor") -> tuple[Any, ...]:
        """One stack per factor stack from each item's own factors (``per_item[i]``: per preconditioned mode, the
        matrices of item ``i``'s units, ``[count, b, b]``, or ``[b, b]`` for an item of one unit), or with
        ``per="group"`` one pytree of stacks per group (``per_item[i]``: a pytree of ``[count, ...]`` arrays, the same
        structure for the items of a group). Items outside the bank are ignored; padding units are zero; the stacks
        are split over the devices. The inverse of :meth:`item_units`."""
        keys = self.factor_stacks if per == "factor" else [(g, None) for g in range(len(self.groups))]
        parts: dict[tuple, list[Any]] = {key: [] for key in keys}
        for units, place in zip(per_item, self.places):
            if place is None:
                continue
            if per == "group":
                parts[place.group, None].append(units)
                continue
            group = self.groups[place.group]
            for mode, m in zip(group.modes, units):
                d = group.block_shape[mode]
                parts[place.group, mode].append(jnp.reshape(m, (place.count, d, d)))
        stacks = []
        for (g, _), items in parts.items():
            pad = self.groups[g].size - self.groups[g].real
            if pad:
                items.append(jax.tree.map(lambda x, p=pad: jnp.zeros((p, *x.shape[1:]), x.dtype), items[0]))
            stacks.append(jax.tree.map(lambda *xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs), *items))
        return self.split(tuple(stacks))

    def item_units(self, stacks: Sequence[Any], per: str = "factor") -> list[Any]:
        """Per item, its units of the stacks, ``[count, ...]`` each, gathered from the devices; None for an item
        outside the bank. ``stacks``: in :attr:`factor_stacks` order (an item gets a tuple, one entry per
        preconditioned mode), or one per group with ``per="group"``; each entry an array or a pytree of arrays with
        the unit axis first."""
        stacks = self.gathered(tuple(stacks))
        out: list[Any] = []
        for place in self.places:
            if place is None:
                out.append(None)
                continue
            units = lambda x, p=place: jax.lax.slice_in_dim(x, p.offset, p.offset + p.count)  # noqa: E731
            if per == "group":
                out.append(jax.tree.map(units, stacks[place.group]))
            else:
                out.append(tuple(jax.tree.map(units, stacks[s]) for s in self.stacks_of(place.group)))
        return out

    def block_norms(self, items: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        """The Frobenius norm of every block, ``[n]`` per group (0 for padding), without gathering the blocks
        (:func:`~optax_second_order.curvature.blocking.block_norms`)."""
        parts: list[list[jax.Array]] = [[] for _ in self.groups]
        def norms(x):
            return blocking.block_norms(x, self.block_size) if self.block_size else jnp.sqrt(jnp.sum(x * x))[None]

        for x, place in zip(items, self.places):
            if place is not None:
                parts[place.group].append(jax.vmap(norms)(x.reshape(place.layers, *place.shape)).reshape(-1))
        for group, norms in zip(self.groups, parts):
            if group.size > group.real:
                norms.append(jnp.zeros(group.size - group.real, norms[0].dtype))
        return self.split(tuple(jnp.concatenate(n) if len(n) > 1 else n[0] for n in parts))

    def _blocks(self, x: jax.Array, place: Place) -> jax.Array:
        """The item's blocks, ``[count, *block_shape]``: each layer's blocks (row-major), layer after layer."""
        layers = x.reshape(place.layers, *place.shape)
        if not self.block_size:
            return layers
        blocks = jax.vmap(lambda y: blocking.to_blocks(y, self.block_size))(layers)
        return blocks.reshape(-1, *blocks.shape[2:])

    def _unblocks(self, blocks: jax.Array, place: Place) -> jax.Array:
        """Inverse of :meth:`_blocks`: ``[layers, *shape]``."""
        if not self.block_size:
            return blocks
        per_layer = blocks.reshape(place.layers, -1, *blocks.shape[1:])
        return jax.vmap(lambda b: blocking.from_blocks(b, place.shape, self.block_size))(per_layer)

    # --- staggered refreshes ---------------------------------------------------------------------------

    def stagger_tables(self, slots: int, per: str = "factor") -> StaggerTables:
        """The slots of a staggered refresh over the factor stacks' real units (``b^3`` each), and which of its
        own units each device refreshes in each slot (:func:`stagger_tables`). With ``per="group"`` the tables are
        per group: a unit's factors of every mode are refreshed together (cost ``sum_i b_i^3``), for a method whose
        refresh of a block needs all of them (EK-FAC's scales restart with the block's eigenbases)."""
        if per == "group":
            dims = [sum(float(g.block_shape[m]) ** 3 for m in g.modes) for g in self.groups]
            return stagger_tables([g.real for g in self.groups], dims, slots,
                                  [g.size // self.devices for g in self.groups])
        stacks = self.factor_stacks
        return stagger_tables([self.groups[g].real for g, _ in stacks], [float(d) ** 3 for d in self.factor_dims()],
                              slots, [self.groups[g].size // self.devices for g, _ in stacks])

    def device_index(self) -> jax.Array | int:
        """Inside :meth:`on_each_device`: which device this is (its share of units), 0 without a sharding."""
        return 0 if self.sharding is None else jax.lax.axis_index(sharding_axes(self.sharding))


def plan_bank(
    shapes: Sequence[tuple[int, ...] | None],
    modes: Callable[[tuple[int, ...]], tuple[int, ...]],
    block_size: int | None = None,
    sharding: NamedSharding | None = None,
    layers: Sequence[int] | None = None,
) -> FactorBank:
    """The bank of items of the given shapes (``None``, or a shape with a zero dimension: not in the bank).

    Args:
      shapes: per item, the shape it is cut into blocks as (after any merging of dimensions); for a stacked item,
        the shape of one of its layers.
      modes: ``block_shape -> modes with a factor``; an item whose blocks have none is not in the bank.
      block_size: dimensions above it are cut into blocks (``None``: each item is one block).
      sharding: ``NamedSharding(mesh, PartitionSpec(axes))``: store the stacks split over those mesh axes.
      layers: per item, how many independent layers of ``shapes[i]`` it stacks (scanned layers: one
        preconditioner per layer, all in the same stacks); default 1.
    """
    keys: dict[tuple, int] = {}
    found: list[list[Any]] = []  # per group: block_shape, modes, units
    places: list[Place | None] = []
    layers = [1] * len(shapes) if layers is None else list(layers)
    for shape, depth in zip(shapes, layers):
        if shape is None or math.prod(shape) * depth == 0:
            places.append(None)
            continue
        shape = tuple(shape)
        if block_size:
            counts, block_shape = blocking.block_layout(shape, block_size)
        else:
            counts, block_shape = (1,), shape
        key = (block_shape, tuple(modes(block_shape)))
        if not key[1]:
            places.append(None)
            continue
        g = keys.setdefault(key, len(keys))
        if g == len(found):
            found.append([block_shape, key[1], 0])
        count = math.prod(counts) * depth
        places.append(Place(g, found[g][2], count, shape, depth))
        found[g][2] += count
    bank = FactorBank((), tuple(places), block_size, sharding)
    devices = bank.devices
    groups = tuple(Group(b, m, -(-n // devices) * devices, n) for b, m, n in found)
    return dataclasses.replace(bank, groups=groups)


# --- staggered refreshes ---------------------------------------------------------------------------------


def partition_by_cost(costs: Any, slots: int) -> tuple[int, ...]:
    """A static partition of refresh units into ``slots`` slots with balanced total cost: the slot of each unit.

    Greedy longest-processing-time: units by decreasing cost (ties by position) each go to the slot with the least
    cost so far (ties: the lowest slot). The most expensive slot costs at most ``4/3`` of the best partition's
    (Graham 1969), and never less than ``max(costs)`` or ``sum(costs) / slots``.
    """
    loads = [0.0] * slots
    slot_of = [0] * len(costs)
    for unit in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        slot = min(range(slots), key=lambda r: (loads[r], r))
        slot_of[unit] = slot
        loads[slot] += costs[unit]
    return tuple(slot_of)


def due_slot(count: jax.Array, every: Any, offset: Any = 0) -> jax.Array:
    """The slot whose refresh falls on step ``count``: ``(offset - count) mod every`` (int32).

    Slot ``r`` is refreshed on steps ``offset - r + k every``: slot 0 on the unstaggered schedule, slot ``r`` that
    many steps earlier, so by step ``offset`` every slot has been refreshed once (where ``offset - r >= 0``). A slot
    index ``>=`` the number of slots means that no slot is due.
    """
    return jnp.mod(jnp.asarray(offset, jnp.int32) - count.astype(jnp.int32), jnp.asarray(every, jnp.int32))


class StaggerTables(NamedTuple):
    """Which units of each stack a refresh slot recomputes on each device (from :func:`stagger_tables`).

    ``counts[s][i, r]``: how many units of stack ``s`` device ``i`` holds in slot ``r``; ``tables[s]``: for each
    distinct nonzero count ``k`` of stack ``s``, ``(k, table)`` with ``table`` a ``[devices, slots, k]`` int32
    array whose row ``[i, r]`` lists those units by their index on device ``i`` (rows of other counts unused).
    """

    counts: tuple[np.ndarray, ...]
    tables: tuple[tuple[tuple[int, np.ndarray], ...], ...]


def stagger_tables(sizes: Sequence[int], costs: Sequence[float], slots: int, local_sizes: Sequence[int] | None = None
                   ) -> StaggerTables:
    """A static partition of the units of stacks (``sizes[s]`` units of cost ``costs[s]`` each, such as a stack of
    ``[n, d, d]`` factors with cost ``d^3``) into ``slots`` slots, balanced by :func:`partition_by_cost`.

    The partition depends on the units alone, not on the devices, so a run refreshes the same factors on the same
    steps on any number of devices. ``local_sizes[s]``: the units of stack ``s`` each device holds (contiguous:
    device ``i`` the units ``i m .. (i + 1) m - 1``; default: all of them, one device); the tables say which of
    its own units each device refreshes in each slot.
    """
    local_sizes = list(sizes) if local_sizes is None else list(local_sizes)
    units = [(s, i) for s, n in enumerate(sizes) for i in range(n)]
    slot_of = partition_by_cost([float(costs[s]) for s, _ in units], slots)
    devices = max([-(-n // max(m, 1)) for n, m in zip(sizes, local_sizes)], default=1)
    members: list[list[list[list[int]]]] = [[[[] for _ in range(slots)] for _ in range(devices)] for _ in sizes]
    for (s, i), r in zip(units, slot_of):
        members[s][i // local_sizes[s]][r].append(i % local_sizes[s])
    counts, tables = [], []
    for per_device in members:
        count = np.array([[len(m) for m in per_slot] for per_slot in per_device], np.int32)
        stack_tables = []
        for k in sorted(set(count.ravel().tolist()) - {0}):
            table = np.zeros((devices, slots, k), np.int32)
            for i, per_slot in enumerate(per_device):
                for r, m in enumerate(per_slot):
                    if len(m) == k:
                        table[i, r] = m
            stack_tables.append((k, table))
        counts.append(count)
        tables.append(tuple(stack_tables))
    return StaggerTables(tuple(counts), tuple(tables))


def update_slot_units(tables: StaggerTables, stack: int, slot: jax.Array, due: jax.Array, update: Callable, carry: Any,
                      device: jax.Array | int = 0):
    """``update(indices, carry)`` with the (int32) indices of stack ``stack``'s units in ``slot`` held by ``device``
    when ``due``, else ``carry``: one ``jax.lax.cond`` per distinct number of units a slot holds, so each compiled
    branch has static shapes and a step pays only for its own slot's units."""
    slot = jnp.minimum(slot, tables.counts[stack].shape[1] - 1)
    for k, table in tables.tables[stack]:
        holds_k = due & (jnp.asarray(tables.counts[stack])[device, slot] == k)
        carry = jax.lax.cond(holds_k, lambda c, t=table: update(jnp.asarray(t)[device, slot], c), lambda c: c, carry)
    return carry
