"""Shampoo: one Kronecker factor per tensor mode, inverse roots every few steps, grafted step size.

For a gradient ``G`` of order ``k`` (after merging small dimensions and cutting dimensions above
``block_size`` into blocks, the last one zero-padded, each block with its own factors; see
:mod:`~optax_second_order.transforms.blocking`), Gupta, Koren & Singer (2018, Alg. 2) keep
per mode ``i`` the statistic

    H_i <- beta2 H_i + (1 - beta2) G_(i) G_(i)^T       (beta2 < 1; beta2 = 1: H_i <- H_i + G_(i) G_(i)^T, the paper)

and step along

    P = G x_1 H_1^{-1/p} x_2 ... x_k H_k^{-1/p},        p = 2k (``exponent_override`` replaces it).

Practicalities of Anil et al. (2020) and of the PyTorch Distributed Shampoo (Shi et al. 2023, winner of
the AlgoPerf external-tuning track):

* roots ``(H + delta I)^{-1/p}``, ``delta = eps + relative_eps * lambda_max``, from
  :func:`~optax_second_order.curvature.matrix.inverse_pth_root` (eigh, exact for every ``p``) every
  ``precondition_frequency`` steps from ``start_preconditioning_step``, statistics every
  ``statistics_frequency`` steps, both under ``jax.lax.cond`` inside the compiled step (the statistics
  without one when they are taken every step);
* a root that comes out non-finite keeps the previous one; ``state.root_failures`` counts these;
* grafting: the step keeps Shampoo's direction and takes its norm, block by block, from a diagonal
  method ``D`` (``"sgd"``: ``D = G``; ``"adagrad"``, ``"rmsprop"``, ``"adam"``: ``D = G / (sqrt(v) + eps)``
  with ``v`` the sum / EMA / bias-corrected EMA of ``G^2``): ``P ||D||_F / ||P||_F``; before the first
  root the step is ``D`` itself;
* scalars, vectors and tensors with a (merged) dimension above ``max_preconditioned_dim`` use the
  diagonal method: the graft's, or for ``"sgd"``/``"none"`` the diagonal of Shampoo's own statistic
  (Adagrad with ``beta2``).

Sharding. All factors of the same size and exponent are stacked into one ``[n, d, d]`` array, and with
``mesh`` given the roots of a stack are computed under :func:`jax.shard_map` with the stack laid out
along ``mesh_axes`` (padded with identities to a multiple of the device count): each device computes
``n / devices`` roots, and XLA gathers them where the preconditioned gradient needs them.

Defaults: ``beta2 = 1`` (the paper), ``eps = 1e-12`` (Distributed Shampoo's epsilon),
``relative_eps = 1e-6`` (Anil et al.'s ``matrix_epsilon``, relative to ``lambda_max``), ``block_size =
1024`` (Distributed Shampoo's ``max_preconditioner_dim``), ``max_preconditioned_dim = 4096`` (Anil et
al.'s ``skip_preconditioning_dim_size_gt``), Adam grafting with ``graft_beta2 = 0.999``, ``graft_eps =
1e-8`` (the AlgoPerf submission grafts Adam), start at ``precondition_frequency`` (Distributed Shampoo).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from optax_second_order.curvature.matrix import inverse_pth_root
from optax_second_order.transforms import blocking
from optax_second_order.transforms.common import is_refresh_step, stat_dtype

__all__ = ["ShampooState", "scale_by_shampoo", "GRAFTING_TYPES"]

GRAFTING_TYPES = ("none", "sgd", "adagrad", "rmsprop", "adam")
_ADAPTIVE_GRAFTS = ("adagrad", "rmsprop", "adam")


class ShampooState(NamedTuple):
    """State of :func:`scale_by_shampoo`.

    Attributes:
      count: number of updates done (int32).
      stats: one ``[n, d, d]`` stack of factors ``H`` per (size, exponent) group.
      roots: the matching stacks of ``(H + delta I)^{-1/p}`` (identity until the first root).
      diagonal: per leaf (in ``jax.tree.leaves`` order) the graft's or the diagonal fallback's ``v``,
        a scalar placeholder where neither is needed.
      root_failures: number of roots that came out non-finite and were replaced by the previous one.
    """

    count: jax.Array
    stats: tuple[jax.Array, ...]
    roots: tuple[jax.Array, ...]
    diagonal: tuple[jax.Array, ...]
    root_failures: jax.Array


class _Factor(NamedTuple):
    group: int  # which stack
    offset: int  # the leaf's blocks' factors for this mode are stack[offset : offset + num_blocks]


class _LeafPlan(NamedTuple):
    shape: tuple[int, ...]  # merged shape
    num_blocks: int
    factors: tuple[_Factor, ...]  # one per mode


class _Plan(NamedTuple):
    leaves: tuple[_LeafPlan | None, ...]  # None: diagonal fallback
    groups: tuple[tuple[int, float], ...]  # (d, p) of each stack
    sizes: tuple[int, ...]  # number of factors in each stack


def _make_plan(shapes, block_size, merge_dims, max_dim, exponent_override) -> _Plan:
    """Which leaves are preconditioned, their blocks, and where each block's factors live in the stacks."""
    group_ids: dict[tuple[int, float], int] = {}
    sizes: list[int] = []
    leaves = []
    for shape in shapes:
        merged = blocking.merge_small_dims(shape, block_size) if merge_dims else tuple(d for d in shape if d > 1)
        if len(shape) <= 1 or not merged or max(merged) > max_dim:
            leaves.append(None)
            continue
        p = float(exponent_override or 2 * len(merged))
        counts, block_shape = blocking.block_layout(merged, block_size)
        num_blocks = math.prod(counts)
        factors = []
        for d in block_shape:
            gid = group_ids.setdefault((d, p), len(group_ids))
            if gid == len(sizes):
                sizes.append(0)
            factors.append(_Factor(gid, sizes[gid]))
            sizes[gid] += num_blocks
        leaves.append(_LeafPlan(merged, num_blocks, tuple(factors)))
    return _Plan(tuple(leaves), tuple(group_ids), tuple(sizes))


def _stats_dtype(leaves) -> jnp.dtype:
    return functools.reduce(jnp.promote_types, [stat_dtype(x.dtype) for x in leaves], jnp.float32)


def _factor_statistics(grads, plan: _Plan, block_size: int) -> tuple[jax.Array, ...]:
    """``G_(i) G_(i)^T`` of every block and mode, stacked in plan order."""
    per_group: list[list[jax.Array]] = [[] for _ in plan.groups]
    for g, leaf in zip(grads, plan.leaves):
        if leaf is None:
            continue
        blocks = blocking.to_blocks(g.reshape(leaf.shape), block_size)
        for mode, f in enumerate(leaf.factors):
            per_group[f.group].append(blocking.batched_mode_gram(blocks, mode))
    return tuple(jnp.concatenate(c) for c in per_group)


def _sharded(fn, stack: jax.Array, mesh: Mesh | None, axes: tuple[str, ...]):
    """``fn(stack)`` with the stack's leading axis spread over ``axes`` of ``mesh`` (identity padding)."""
    if mesh is None:
        return fn(stack)
    n, d = stack.shape[0], stack.shape[-1]
    devices = math.prod(mesh.shape[a] for a in axes)
    pad = -n % devices
    if pad:
        stack = jnp.concatenate([stack, jnp.broadcast_to(jnp.eye(d, dtype=stack.dtype), (pad, d, d))])
    spec = PartitionSpec(axes)
    root, ok = jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=(spec, spec))(stack)
    return root[:n], ok[:n]


def _graft(direction: jax.Array, graft: jax.Array) -> jax.Array:
    """Each block of ``direction`` rescaled to the Frobenius norm of the same block of ``graft``
    (Anil et al. 2020, sec. 4.1); blocks along the leading axis."""
    axes = tuple(range(1, direction.ndim))
    norm = lambda x: jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=True))  # noqa: E731
    return direction * (norm(graft) / (norm(direction) + 1e-16))


def scale_by_shampoo(
    beta2: float = 1.0,
    eps: float = 1e-12,
    relative_eps: float = 1e-6,
    exponent_override: float | None = None,
    precondition_frequency: int = 10,
    start_preconditioning_step: int | None = None,
    statistics_frequency: int = 1,
    block_size: int = 1024,
    merge_dims: bool = True,
    max_preconditioned_dim: int = 4096,
    grafting: str = "adam",
    graft_beta2: float = 0.999,
    graft_eps: float = 1e-8,
    mesh: Mesh | None = None,
    mesh_axes: str | tuple[str, ...] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Shampoo preconditioning with blocking, grafting and sharded roots (see the module docstring).

    Args:
      beta2: factor decay; 1 sums ``G G^T`` (Gupta et al.), below 1 an EMA ``beta2 H + (1 - beta2) G G^T``.
      eps, relative_eps: root damping ``delta = eps + relative_eps * lambda_max(H)``.
      exponent_override: use ``H^{-1/exponent_override}`` for every factor instead of ``H^{-1/(2k)}``.
      precondition_frequency: steps between root computations.
      start_preconditioning_step: first step using Shampoo's direction (default ``precondition_frequency``).
      statistics_frequency: steps between statistics updates.
      block_size: dimensions above it are cut into blocks; small dimensions are merged up to it.
      merge_dims: merge consecutive small dimensions (Anil et al.'s best-effort shape interpretation).
      max_preconditioned_dim: leaves with a (merged) dimension above it use the diagonal fallback.
      grafting: one of ``"none", "sgd", "adagrad", "rmsprop", "adam"``.
      graft_beta2, graft_eps: the RMSprop/Adam graft's decay and every adaptive graft's epsilon.
      mesh, mesh_axes: spread the root computations over these mesh axes (default: all of ``mesh``'s).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra arguments are ignored.
    """
    _check(beta2, eps, relative_eps, exponent_override, precondition_frequency, start_preconditioning_step,
           statistics_frequency, block_size, max_preconditioned_dim, grafting, graft_beta2, graft_eps)
    start = precondition_frequency if start_preconditioning_step is None else start_preconditioning_step
    axes = _mesh_axes(mesh, mesh_axes)
    plan_of = functools.partial(
        _make_plan, block_size=block_size, merge_dims=merge_dims, max_dim=max_preconditioned_dim,
        exponent_override=exponent_override,
    )

    def diagonal_rule(leaf: _LeafPlan | None) -> str:
        if grafting in _ADAPTIVE_GRAFTS:
            return grafting
        return "diagonal" if leaf is None else grafting

    def init_fn(params):
        leaves = jax.tree.leaves(params)
        plan, dtype = plan_of([x.shape for x in leaves]), _stats_dtype(leaves)
        stats = tuple(jnp.zeros((n, d, d), dtype) for (d, _), n in zip(plan.groups, plan.sizes))
        roots = tuple(jnp.broadcast_to(jnp.eye(d, dtype=dtype), (n, d, d)) for (d, _), n in zip(plan.groups, plan.sizes))
        diagonal = tuple(
            jnp.zeros(x.shape, dtype) if diagonal_rule(leaf) in (*_ADAPTIVE_GRAFTS, "diagonal") else jnp.zeros((), dtype)
            for x, leaf in zip(leaves, plan.leaves)
        )
        return ShampooState(jnp.zeros((), jnp.int32), stats, roots, diagonal, jnp.zeros((), jnp.int32))

    def accumulate(stats, grads, plan):
        new = _factor_statistics(grads, plan, block_size)
        if beta2 == 1.0:
            return tuple(h + c for h, c in zip(stats, new))
        return tuple(beta2 * h + (1.0 - beta2) * c for h, c in zip(stats, new))

    def inverse_roots(stats, roots, plan):
        new_roots, failures = [], jnp.zeros((), jnp.int32)
        for (_, p), h, old in zip(plan.groups, stats, roots):
            fn = functools.partial(inverse_pth_root, p=p, eps=eps, relative_eps=relative_eps)
            root, ok = _sharded(fn, h, mesh, axes)
            new_roots.append(jnp.where(ok[:, None, None], root, old))
            failures += jnp.sum(~ok, dtype=jnp.int32)
        return tuple(new_roots), failures

    def update_diagonal(v, g, rule):
        if rule == "adagrad" or (rule == "diagonal" and beta2 == 1.0):
            return v + g * g
        if rule == "diagonal":
            return beta2 * v + (1.0 - beta2) * g * g
        if rule in ("rmsprop", "adam"):
            return graft_beta2 * v + (1.0 - graft_beta2) * g * g
        return v

    def diagonal_direction(v, g, rule, t):
        if rule == "adam":
            v = v / (1.0 - graft_beta2**t)
        if rule in ("adagrad", "rmsprop", "adam", "diagonal"):
            return g / (jnp.sqrt(v) + graft_eps)
        return g if rule == "sgd" else None

    def precondition(g, roots, leaf: _LeafPlan, graft):
        blocks = blocking.to_blocks(g.reshape(leaf.shape), block_size)
        for mode, f in enumerate(leaf.factors):
            block_roots = jax.lax.dynamic_slice_in_dim(roots[f.group], f.offset, leaf.num_blocks)
            blocks = blocking.batched_mode_dot(blocks, block_roots, mode)
        if graft is not None:
            blocks = _graft(blocks, blocking.to_blocks(graft.reshape(leaf.shape), block_size))
        return blocking.from_blocks(blocks, leaf.shape, block_size).reshape(g.shape)

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        leaves, treedef = jax.tree.flatten(updates)
        plan, dtype = plan_of([x.shape for x in leaves]), _stats_dtype(leaves)
        grads = [g.astype(dtype) for g in leaves]
        count = state.count

        if statistics_frequency == 1:
            stats = accumulate(state.stats, grads, plan)
        else:
            stats = jax.lax.cond(
                is_refresh_step(count, statistics_frequency),
                lambda s: accumulate(s, grads, plan), lambda s: s, state.stats,
            )
        roots, failures = jax.lax.cond(
            is_refresh_step(count, precondition_frequency, start),
            lambda s, r: inverse_roots(s, r, plan), lambda s, r: (r, jnp.zeros((), jnp.int32)), stats, state.roots,
        )
        rules = [diagonal_rule(leaf) for leaf in plan.leaves]
        diagonal = tuple(update_diagonal(v, g, r) for v, g, r in zip(state.diagonal, grads, rules))
        t = (count + 1).astype(dtype)
        out = []
        for g, v, rule, leaf, orig in zip(grads, diagonal, rules, plan.leaves, leaves):
            d = diagonal_direction(v, g, rule, t)
            if leaf is not None:
                shampoo = precondition(g, roots, leaf, d)
                d = jnp.where(count >= start, shampoo, g if d is None else d)
            out.append(d.astype(orig.dtype))
        new_state = ShampooState(
            optax.safe_int32_increment(count), stats, roots, diagonal, state.root_failures + failures
        )
        return jax.tree.unflatten(treedef, out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _mesh_axes(mesh: Mesh | None, mesh_axes) -> tuple[str, ...]:
    if mesh is None:
        if mesh_axes is not None:
            raise ValueError("scale_by_shampoo: mesh_axes needs a mesh")
        return ()
    axes = tuple(mesh.axis_names) if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
        raise ValueError(f"scale_by_shampoo: mesh_axes {unknown} are not axes of the mesh {mesh.axis_names}")
    return axes


def _check(beta2, eps, relative_eps, exponent_override, precondition_frequency, start, statistics_frequency,
           block_size, max_dim, grafting, graft_beta2, graft_eps) -> None:
    def fail(name, value, want):
        raise ValueError(f"scale_by_shampoo: {name} must be {want}, got {value!r}")

    if not 0.0 < beta2 <= 1.0:
        fail("beta2", beta2, "in (0, 1]")
    for name, value in (("eps", eps), ("relative_eps", relative_eps), ("graft_eps", graft_eps)):
        if not value >= 0.0:
            fail(name, value, ">= 0")
    if exponent_override is not None and not exponent_override > 0:
        fail("exponent_override", exponent_override, "> 0")
    for name, value in (("precondition_frequency", precondition_frequency),
                        ("statistics_frequency", statistics_frequency), ("block_size", block_size),
                        ("max_preconditioned_dim", max_dim)):
        if not (isinstance(value, int) and value >= 1):
            fail(name, value, "an integer >= 1")
    if start is not None and not (isinstance(start, int) and start >= 0):
        fail("start_preconditioning_step", start, "an integer >= 0")
    if grafting not in GRAFTING_TYPES:
        fail("grafting", grafting, f"one of {GRAFTING_TYPES}")
    if not 0.0 <= graft_beta2 < 1.0:
        fail("graft_beta2", graft_beta2, "in [0, 1)")
