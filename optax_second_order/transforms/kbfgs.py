r"""K-BFGS and K-BFGS(L): Kronecker-factored BFGS for networks (Goldfarb, Ren & Bahamou 2020).

Per captured layer with pre-activations ``s = W^T a`` (``W`` in :func:`~optax_second_order.kronecker.kernel_matrix`
order ``(d_in [+1], d_out)``, the bias as the last row and a homogeneous ``1`` appended to ``a``), the block of
the inverse Hessian is approximated by a Kronecker product ``H_a (x) H_g`` and the layer's step direction is

.. math::

    D = H_a \, \hat V \, H_g ,

``\hat V`` the gradient momentum ``m <- rho m + (1 - rho) g`` (``rho = 0.9``) in the kernel-matrix layout. At every
statistics step (``statistics_frequency``, 1 in the paper):

1. One forward/backward pass of ``model_fn`` at ``theta_k`` on the current batch (output gradient at the data's
   targets, :func:`~optax_second_order.kronecker.layer_rows`) gives each layer's input rows ``a`` and
   pre-activation gradient rows ``p``: ``A <- beta A + (1 - beta) a^T a / R`` (``beta = 0.9``; the first batch sets
   ``A``), the mean input ``h = mean_r a_r``, the mean pre-activation ``s = W^T h`` and the mean pre-activation
   gradient ``g = (N / R) sum_r p_r`` (``R`` rows of ``N`` examples: for a dense layer on vectors,
   ``sum_i dL/ds_i``, the authors' ``mean_i(N dL/ds_i)``). On the first step ``H_a = (A + sqrt(lambda) I)^{-1}``.
2. The direction above (with ``H_a``, ``H_g`` from before this step's updates), and the step
   ``theta_{k+1} = theta_k - lr D`` (``lr`` = ``learning_rate``, which must be the one the chain applies).
3. A second pass at ``theta_{k+1}`` on the *same* batch gives ``s^+``, ``g^+``; the pair
   ``(s_g, y_g) = (s^+ - s, g^+ - g)`` is averaged, ``s_g <- delta s_g + (1 - delta)(s^+ - s)`` and likewise
   ``y_g`` (``delta = 0.9``, the authors' code; 0 for full batches), then double-damped
   (:func:`~optax_second_order.double_damping`: Powell's damping on ``H_g`` with ``mu_1 = 0.2``, then
   Levenberg-Marquardt with ``mu_2 = sqrt(lambda)``) and ``H_g`` is updated by BFGS (K-BFGS) or the pair enters
   an L-BFGS memory with ``H_0 = I`` (K-BFGS(L), ``memory_size = 100``).
4. ``H_a`` is updated by "Hessian-action BFGS": ``s_a = H_a h``, ``y_a = (A + sqrt(lambda) I) s_a``, so ``H_a``
   tracks ``(A + sqrt(lambda) I)^{-1}`` with one BFGS update (``O(d_in^2)``) instead of an inversion.

Parameters no layer captured fall back to a diagonal preconditioner as in K-FAC: ``v = m / (d + lambda)`` with
``d`` the moving average (decay ``beta``) of the squared gradients ``update`` receives.

Deviations from the paper (also in the docs):

* The gradient arrives from outside (``update``'s ``grads``), so a statistics step costs two passes of
  ``model_fn`` besides it (three in all; the paper reuses the gradient pass for step 1: two in all).
* Convolutions (and dense layers applied at several locations, and shared layers) are handled by the rows of
  :func:`~optax_second_order.kronecker.layer_rows`: ``A`` is K-FAC's ``KFC`` factor and ``h``, ``s``, ``g`` are
  means over locations; the paper treats dense layers only (the authors' later CNN code also averages over
  locations).
* Pair tests: the library's (``s^T y > min_cosine ||s|| ||y||``, skipping non-finite pairs) instead of the
  authors' ``s^T y > 1e-4 ||g|| s^T s``; after double damping both accept every finite pair.
* Gradient momentum and the fallback are inside the transformation; weight decay (the paper's L2 term
  ``tau = 1e-5``, added to the gradient) is :func:`~optax_second_order.kbfgs`'s ``weight_decay`` (default 0).

A non-finite gradient, or a finite one whose squares overflow (a loss spike: its momentum would meet the kept
factors in a huge step), is never folded in (zero update, state kept, ``state.nonfinite`` counts it); a pass whose
statistics are not finite leaves the factors unchanged and is counted; a pair an update rejects is counted in
``state.skipped``. Inside ``optax.masked`` (with the extra argument ``full_params``) the step runs on the whole
tree with zero gradients where masked, as K-FAC's, and returns the visible leaves' part; the state covers every
layer.

Defaults (the authors' ``train_model``): ``learning_rate = 0.3`` in the alias docs, ``damping`` ``lambda = 0.3``,
``momentum = 0.9``, ``ema_decay = 0.9``, ``pair_decay = 0.9``, ``memory_size = 100``.

Reference: D. Goldfarb, Y. Ren & A. Bahamou, "Practical quasi-Newton methods for training deep neural
networks", NeurIPS 2020 (arXiv:2006.08877), and the authors' code (``kbfgs_neurips2020_public``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from optax_second_order.curvature import kronecker, secant
from optax_second_order.curvature.bank import FactorBank
from optax_second_order.transforms.common import (
    all_finite,
    check,
    extra_arg,
    has_masked_leaves,
    inner_state,
    is_refresh_step,
    require_params,
    stat_dtype,
    static_int,
    tree_stat_dtype,
    update_on_whole_tree,
    value_at,
)

__all__ = ["KBFGSState", "KBFGSLayerState", "kbfgs_layer_states", "scale_by_kbfgs"]

PyTree = Any
NAME = "scale_by_kbfgs"
_HIGHEST = jax.lax.Precision.HIGHEST


class KBFGSState(NamedTuple):
    """K-BFGS state. The per-layer matrices live in the factor bank's stacks (:func:`~optax_second_order.kronecker.\
layer_bank`: layers of one shape ``(d_in [+1], d_out)`` share a group, one unit each), one entry per group; read
    one layer's with :func:`kbfgs_layer_states`."""

    count: jax.Array  # int32, finite steps taken
    momentum: tuple  # gradient momentum m per leaf of the parameters (float32 or better), in jax.tree.leaves order
    factors: tuple  # A per group, [n, d_in, d_in]
    inverse_factors: tuple  # H_a per group, [n, d_in, d_in]
    curvature: tuple  # H_g per group, [n, d_out, d_out]; K-BFGS(L): an LBFGSMemory of (d_out,) pairs, leaves [n, ...]
    pairs: tuple  # per group (s_g, y_g), [n, d_out] each: the moving averages of the pre-activation pairs
    diagonal: tuple  # the fallback parameters' moving average of squared gradients
    num_statistics: jax.Array  # int32, statistics steps so far
    skipped: jax.Array  # int32, H_g or H_a updates of a layer that rejected their pair
    nonfinite: jax.Array  # int32, non-finite gradients or statistics (not folded in)


class KBFGSLayerState(NamedTuple):
    """One layer's part of a :class:`KBFGSState` (:func:`kbfgs_layer_states`)."""

    name: str
    factor: Any  # A, (d_in, d_in)
    inverse_factor: Any  # H_a, (d_in, d_in)
    curvature: Any  # H_g, (d_out, d_out), or K-BFGS(L)'s LBFGSMemory
    pair: tuple  # (s_g, y_g)


def kbfgs_layer_states(layers: kronecker.Layers, state: Any) -> list[KBFGSLayerState]:
    """Each captured layer's state (in ``layers.layers`` order; a stacked layer's with a leading layer axis ``L``), gathered from the bank's stacks to the host, to
    inspect. ``state``: a :class:`KBFGSState` or a state holding one (an alias's)."""
    state = inner_state(state, KBFGSState, "kbfgs_layer_states")
    layers = layers.without_blocks()  # as scale_by_kbfgs: embeddings and scale-and-shift layers on the fallback
    fields = ("factors", "inverse_factors", "curvature", "pairs")
    host = jax.tree.map(lambda x: x if isinstance(x, jax.core.Tracer) else np.asarray(x), [getattr(state, f) for f in fields])
    per_layer = [kronecker.layer_bank(layers).item_units(stacks, per="group") for stacks in host]
    def own(layer, tree):  # a layer is one unit; a stack, L of them
        return tree if layer.stack is not None else jax.tree.map(lambda x: x[0], tree)

    return [KBFGSLayerState(l.name, *(own(l, f[i]) for f in per_layer)) for i, l in enumerate(layers.layers)]


class _Means(NamedTuple):
    """One layer's statistics from one pass: ``a^T a / R``, the mean input ``h``, the mean pre-activation ``s``
    and the mean pre-activation gradient ``g``."""

    aa: jax.Array
    h: jax.Array
    s: jax.Array
    g: jax.Array


# --- statistics from one pass ---------------------------------------------------------------------------


def _cotangent(loss):
    """``outputs -> dL/d outputs`` at the data's targets: the pass's pre-activation gradients are the loss's."""

    def cotangent(outputs):
        outputs = jax.lax.stop_gradient(outputs)
        return jax.grad(lambda o: loss(o))(outputs).astype(outputs.dtype)

    return cotangent


def _layer_means(layer, calls, kernel: jax.Array, bias) -> _Means:
    """:class:`_Means` of one layer from its rows (all calls), with ``s = W^T h`` for the current ``W``; a stacked
    layer's (``L`` layers under a scan) per layer, with a leading axis ``L``."""
    a = jnp.concatenate([c.inputs for c in calls], axis=-2)
    p = jnp.concatenate([c.output_grads for c in calls], axis=-2)
    rows, examples = a.shape[-2], calls[0].num_examples
    h = jnp.mean(a, axis=-2)
    w = kronecker.kernel_matrix(layer, kernel, bias).astype(a.dtype)
    return _Means(
        aa=kronecker.sum_over_rows(a, a) / rows,
        h=h,
        s=jnp.matmul(h[..., None, :], w, precision=_HIGHEST)[..., 0, :],
        g=jnp.sum(p, axis=-2) * (examples / rows),
    )


def _pass_means(layers: kronecker.Layers, bank: FactorBank, model_fn, loss, params, dtype) -> tuple[_Means, ...]:
    """Every layer's :class:`_Means` at ``params``, from one forward/backward pass, stacked per group of the bank
    (``[n, ...]`` in ``dtype``: the rows follow the model's activations, the stacks the kernels)."""
    if not bank.groups:
        return ()
    captured = kronecker.layer_rows(model_fn, params, layers, _cotangent(loss))
    leaves = jax.tree.leaves(params)
    per_layer = []
    for layer, calls in zip(layers.layers, captured.rows):
        bias = leaves[layer.bias_index] if layer.bias_index is not None else None
        means = _layer_means(layer, calls, leaves[layer.kernel_index], bias)
        units = (lambda x: x[None]) if layer.stack is None else (lambda x: x)  # a layer is one unit, a stack L
        per_layer.append(_Means(*(units(x.astype(dtype)) for x in means)))
    return bank.stack_items(per_layer, per="group")


# --- H_g: BFGS or L-BFGS on double-damped pairs ---------------------------------------------------------


def _h_g_times(curvature, v: jax.Array) -> jax.Array:
    """``H_g v`` for one vector: a product with the dense ``H_g`` or the two-loop recursion with ``H_0 = I``."""
    if isinstance(curvature, secant.LBFGSMemory):
        return secant.lbfgs_two_loop(curvature, v, initial_scale=1.0)
    return jnp.matmul(curvature, v, precision=_HIGHEST)


def _update_h_g(curvature, s, y, damping, min_cosine):
    """Double damping (``mu_1 = 0.2``, ``mu_2 = sqrt(lambda)``), then BFGS on ``H_g`` or into the memory."""
    s_damped, y_damped = secant.double_damping(s, y, _h_g_times(curvature, y), jnp.sqrt(damping))
    if isinstance(curvature, secant.LBFGSMemory):
        return secant.lbfgs_update_memory(curvature, s_damped, y_damped, min_cosine)
    return secant.bfgs_inverse_update(curvature, s_damped, y_damped, min_cosine)


def _update_h_a(h_a, aa_damped, h, min_cosine):
    """Hessian-action BFGS on the pair ``(H_a h, (A + sqrt(lambda) I) H_a h)``: ``H_a`` tracks the damped inverse."""
    s_a = jnp.matmul(h_a, h, precision=_HIGHEST)
    return secant.bfgs_inverse_update(h_a, s_a, jnp.matmul(aa_damped, s_a, precision=_HIGHEST), min_cosine)


def _damped(a: jax.Array, damping) -> jax.Array:
    """``A + sqrt(lambda) I`` (for a stack of ``A``, each)."""
    return a + jnp.sqrt(damping).astype(a.dtype) * jnp.eye(a.shape[-1], dtype=a.dtype)


def _update_units(curvature, s, y, h_a, a, h, damping, min_cosine):
    """Each unit's ``H_g`` from its pair and ``H_a`` by Hessian-action BFGS (one group's stacks): the new ones and
    whether each used its pair."""
    def unit(curvature, s, y, h_a, a, h):
        new_h_g, used_g = _update_h_g(curvature, s, y, damping, min_cosine)
        new_h_a, used_a = _update_h_a(h_a, _damped(a, damping), h, min_cosine)
        return new_h_g, used_g, new_h_a, used_a

    return jax.vmap(unit)(curvature, s, y, h_a, a, h)


# --- the direction ----------------------------------------------------------------------------------------


def _layer_direction(h_a, v, curvature) -> jax.Array:
    """``H_a V H_g`` (``H_g`` symmetric: each row of ``H_a V`` times ``H_g``)."""
    left = jnp.matmul(h_a, v.astype(h_a.dtype), precision=_HIGHEST)
    if isinstance(curvature, secant.LBFGSMemory):
        return jax.vmap(lambda row: _h_g_times(curvature, row))(left)
    return jnp.matmul(left, curvature, precision=_HIGHEST)


def _direction(layers: kronecker.Layers, bank: FactorBank, leaves, inverse_factors, curvature, diagonal, damping):
    """Each leaf's direction from the momentum's leaves: ``H_a V H_g`` per layer (one batched product per group of
    the bank, each device its own units, gathered), ``m / (d + lambda)`` else."""
    out = list(leaves)
    if bank.groups:
        matrices = [
            kronecker.kernel_matrix(l, leaves[l.kernel_index], None if l.bias_index is None else leaves[l.bias_index])
            for l in layers.layers
        ]
        blocks = bank.to_stacks(matrices)
        directions = [jax.vmap(_layer_direction)(*group) for group in zip(inverse_factors, blocks, curvature)]
        for layer, v in zip(layers.layers, bank.from_stacks(directions, matrices)):
            if v is not None:  # a layer with a zero dimension is not in the bank: its (empty) leaves stay
                out[layer.kernel_index], bias = kronecker.split_kernel_matrix(layer, v)
                if layer.bias_index is not None:
                    out[layer.bias_index] = bias
    for i, d in zip(layers.fallback_indices, diagonal):
        out[i] = leaves[i] / (d + jnp.asarray(damping, d.dtype))
    return bank.gathered(out)


def _squares_finite(leaves: list) -> jax.Array:
    """Whether the gradient's squared norm is finite: false for a non-finite gradient and for a finite one whose
    squares overflow (the fallback's statistic ``d``, and a momentum too large for the kept factors)."""
    return jnp.isfinite(sum(jnp.sum(jnp.square(g)) for g in leaves)) if leaves else jnp.asarray(True)


# --- the transformation -----------------------------------------------------------------------------------


def _validate(layers, learning_rate, damping, momentum, ema_decay, pair_decay, statistics_frequency, min_cosine):
    if not isinstance(layers, kronecker.Layers):
        raise ValueError(
            f"{NAME}: layers must be an optax_second_order.kronecker.Layers (from find_layers), got {layers!r}"
        )
    if learning_rate is None:
        raise ValueError(f"{NAME}: learning_rate must be given (the pairs are formed at theta - learning_rate * D)")
    check(NAME, "learning_rate", learning_rate, lambda v: v > 0, "> 0 (or a schedule)")
    check(NAME, "damping", damping, lambda v: v > 0, "> 0")
    for name, value in (("momentum", momentum), ("ema_decay", ema_decay), ("pair_decay", pair_decay)):
        check(NAME, name, value, lambda v: 0 <= v < 1, "in [0, 1)")
    check(NAME, "statistics_frequency", statistics_frequency, lambda v: v >= 1 and float(v).is_integer(),
          "an integer >= 1")
    check(NAME, "min_cosine", min_cosine, lambda v: 0 <= v < 1, "in [0, 1)")


def _stack_dtype(stacks: tuple) -> Any:
    """The dtype of the bank's stacks (all share one; float32 when there are none)."""
    return stacks[0].dtype if stacks else jnp.float32


def _side(bank: FactorBank, stacks: tuple, mode: int) -> tuple:
    """The stacks of one side (mode 0: over the inputs, 1: over the output gradients), one per group."""
    return tuple(x for x, (_, m) in zip(stacks, bank.factor_stacks) if m == mode)


def _init(layers: kronecker.Layers, bank: FactorBank, params, limited_memory: bool, memory_size: int) -> KBFGSState:
    if has_masked_leaves(params):  # optax.masked: the whole tree's state, from the shapes find_layers saw
        leaves = list(layers.leaves)
    else:
        leaves = layers.check_params(params, NAME)
    dtype = tree_stat_dtype([leaves[l.kernel_index] for l in layers.layers])

    def eye(mode):  # fresh arrays each call: a state sharing buffers cannot be donated
        return _side(bank, bank.matrices(dtype, identity=True), mode)

    def memory(group):
        one = secant.lbfgs_init_memory(jax.ShapeDtypeStruct(group.block_shape[1:], dtype), memory_size)
        return jax.tree.map(lambda x: jnp.zeros((group.size, *x.shape), x.dtype), one)

    def vectors():
        return bank.split(tuple(jnp.zeros((g.size, g.block_shape[1]), dtype) for g in bank.groups))

    def zero():
        return jnp.zeros([], jnp.int32)

    return KBFGSState(
        count=zero(),
        momentum=tuple(jnp.zeros(jnp.shape(p), stat_dtype(jnp.result_type(p))) for p in leaves),
        factors=eye(0),
        inverse_factors=eye(0),
        curvature=bank.split(tuple(memory(g) for g in bank.groups)) if limited_memory else eye(1),
        pairs=tuple(zip(vectors(), vectors())),
        diagonal=tuple(jnp.zeros(jnp.shape(leaves[i]), stat_dtype(jnp.result_type(leaves[i])))
                       for i in layers.fallback_indices),
        num_statistics=zero(),
        skipped=zero(),
        nonfinite=zero(),
    )


def scale_by_kbfgs(
    layers: kronecker.Layers,
    *,
    learning_rate: optax.ScalarOrSchedule | None = None,
    damping: float = 0.3,
    momentum: float = 0.9,
    ema_decay: float = 0.9,
    pair_decay: float = 0.9,
    limited_memory: bool = False,
    memory_size: int | None = None,
    statistics_frequency: int = 1,
    min_cosine: float = 1e-8,
    precondition_sharding: NamedSharding | None = None,
) -> optax.GradientTransformationExtraArgs:
    """K-BFGS (``limited_memory=False``) or K-BFGS(L) preconditioning (see the module docstring for the math).

    Args:
      layers: the capture found by :func:`optax_second_order.kronecker.find_layers` or
        :func:`optax_second_order.flax.find_layers`, on the same parameters ``init`` and ``update`` get. A stacked
        layer (``L`` layers under :func:`~optax_second_order.kronecker.scan` or linen's ``nn.scan``) is ``L`` layers
        with ``A``, ``H_a``, ``H_g`` and pairs of their own (``L`` units of the factor bank).
      learning_rate: the learning rate the chain applies after this transformation (float or schedule): the
        pairs are formed at ``theta - learning_rate * D``.
      damping: ``lambda``: ``A + sqrt(lambda) I`` for ``H_a``, ``mu_2 = sqrt(lambda)`` in the double damping of
        ``H_g``'s pairs, and the fallback's ``d + lambda``.
      momentum: ``rho`` of the gradient momentum ``m <- rho m + (1 - rho) g``.
      ema_decay: ``beta`` of ``A``'s (and the fallback diagonal's) moving average.
      pair_decay: the moving average of the pre-activation pairs (0 for full-batch training).
      limited_memory: K-BFGS(L): ``H_g`` as an L-BFGS memory with ``H_0 = I``.
      memory_size: K-BFGS(L)'s pairs per layer (default 100); it sets array shapes, so with
        ``optax.inject_hyperparams`` list it in ``static_args``.
      statistics_frequency: the two passes and the ``H_a``, ``H_g`` updates run every this many steps.
      min_cosine: the BFGS updates' skip threshold.
      precondition_sharding: ``NamedSharding(mesh, PartitionSpec(axes))``: store the per-layer matrices (``A``,
        ``H_a``, ``H_g``, the pairs) split over those mesh axes, each device updating and applying only its layers'
        (:mod:`~optax_second_order.curvature.bank`; ``docs/scaling.md``).

    ``update(grads, state, params, model_fn=..., loss=...)`` needs ``model_fn`` (the function ``find_layers``
    traced, on the current batch) and ``loss`` (bound to the batch's targets).
    """
    _validate(layers, learning_rate, damping, momentum, ema_decay, pair_decay, statistics_frequency, min_cosine)
    layers = layers.without_blocks()  # embeddings and scale-and-shift layers: the diagonal fallback
    m = static_int(NAME, "memory_size", memory_size, 100)
    bank = kronecker.layer_bank(layers, precondition_sharding)

    def statistics_step(state, params, model_fn, loss):
        """Pass at theta_k: A's moving average (the first batch sets it), the means, H_a on the first step."""
        means = _pass_means(layers, bank, model_fn, loss, params, _stack_dtype(state.factors))
        ok = all_finite(means)
        decay = jnp.where(state.num_statistics == 0, 0.0, ema_decay)
        factors = tuple(
            jnp.where(ok, (decay * a + (1 - decay) * mean.aa).astype(a.dtype), a) for a, mean in zip(state.factors, means)
        )

        def inverses(a, lam):
            return tuple(jnp.linalg.inv(_damped(x, lam)) for x in a)

        first = ok & (state.num_statistics == 0)
        inverse_factors = jax.lax.cond(
            first, lambda: bank.on_each_device(inverses, factors, shared=(damping,)), lambda: state.inverse_factors
        )
        return factors, inverse_factors, means, ok

    def pair_step(state, factors, inverse_factors, means, ok, params_next, model_fn, loss):
        """Pass at theta_{k+1} on the same batch: the averaged, double-damped pairs into H_g, then H_a (each device
        its own units)."""
        means_next = _pass_means(layers, bank, model_fn, loss, params_next, _stack_dtype(factors))
        ok = ok & all_finite(means_next)
        pairs = tuple(
            (pair_decay * s_avg + (1 - pair_decay) * (nxt.s - mean.s),
             pair_decay * y_avg + (1 - pair_decay) * (nxt.g - mean.g))
            for (s_avg, y_avg), mean, nxt in zip(state.pairs, means, means_next)
        )

        def on_device(curvature, pairs, inverse_factors, factors, h, lam):
            return tuple(
                _update_units(c, s_avg, y_avg, h_a, a, h_j, lam, min_cosine)
                for c, (s_avg, y_avg), h_a, a, h_j in zip(curvature, pairs, inverse_factors, factors, h)
            )

        h = tuple(mean.h for mean in means)
        updated = bank.on_each_device(on_device, state.curvature, pairs, inverse_factors, factors, h, shared=(damping,))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        rejected = [(ok & ~used_g, ok & ~used_a) for _, used_g, _, used_a in updated]
        skipped = (state.skipped + bank.count_real([g for g, _ in rejected], per="group")
                   + bank.count_real([a for _, a in rejected], per="group"))
        return (
            keep(tuple(u[0] for u in updated), state.curvature),
            keep(pairs, state.pairs),
            keep(tuple(u[2] for u in updated), inverse_factors),
            skipped,
            (~ok).astype(jnp.int32),
        )

    def update_fn(updates, state, params=None, **extra):
        """The K-BFGS step; inside ``optax.masked`` it runs on the whole tree (``full_params``, zero gradients
        where masked) and returns the masked part."""
        params = require_params(params, NAME)
        return update_on_whole_tree(step, updates, state, params, extra, NAME)

    def step(updates, state, params, **extra):
        layers.check_params(updates, NAME)
        model_fn = extra_arg(extra, "model_fn", NAME)
        loss = extra_arg(extra, "loss", NAME)
        rate = value_at(learning_rate, state.count)
        refresh = is_refresh_step(state.count, statistics_frequency)

        leaves, treedef = jax.tree.flatten(updates)
        leaves = [g.astype(m0.dtype) for g, m0 in zip(leaves, state.momentum)]
        moment = tuple(momentum * m0 + (1 - momentum) * g for m0, g in zip(state.momentum, leaves))
        diagonal_decay = jnp.where(state.count == 0, 0.0, ema_decay)  # the first gradient sets d
        diagonal = tuple(
            (diagonal_decay * d + (1 - diagonal_decay) * leaves[i] ** 2).astype(d.dtype)
            for i, d in zip(layers.fallback_indices, state.diagonal)
        )

        def no_statistics():
            zeros = tuple(
                _Means(jnp.zeros_like(a), jnp.zeros_like(a[..., 0]), jnp.zeros_like(p[0]), jnp.zeros_like(p[1]))
                for a, p in zip(state.factors, state.pairs)
            )
            return state.factors, state.inverse_factors, zeros, jnp.asarray(True)

        factors, inverse_factors, means, stats_ok = jax.lax.cond(
            refresh, lambda: statistics_step(state, params, model_fn, loss), no_statistics
        )
        direction = jax.tree.unflatten(
            treedef, _direction(layers, bank, moment, inverse_factors, state.curvature, diagonal, damping)
        )
        params_next = jax.tree.map(lambda p, d: (p - rate * d).astype(jnp.result_type(p)), params, direction)

        curvature, pairs, inverse_factors, skipped, bad = jax.lax.cond(
            refresh,
            lambda: pair_step(state, factors, inverse_factors, means, stats_ok, params_next, model_fn, loss),
            lambda: (state.curvature, state.pairs, inverse_factors, state.skipped, jnp.zeros([], jnp.int32)),
        )
        new_state = KBFGSState(
            count=state.count + 1,
            momentum=moment,
            factors=factors,
            inverse_factors=inverse_factors,
            curvature=curvature,
            pairs=pairs,
            diagonal=diagonal,
            num_statistics=state.num_statistics + (refresh & stats_ok).astype(jnp.int32),
            skipped=skipped,
            nonfinite=state.nonfinite + bad,
        )
        # A gradient whose squares overflow (a loss spike) would enter the momentum while the factors, from
        # model_fn and loss, are kept: a huge step. It is rejected as a whole, as a non-finite one.
        finite = _squares_finite(leaves) & all_finite(direction)
        new_state = jax.tree.map(
            lambda n, o: jnp.where(finite, n, o), new_state, state._replace(nonfinite=state.nonfinite + 1)
        )
        updates = jax.tree.map(lambda d, g: jnp.where(finite, d, 0.0).astype(g.dtype), direction, updates)
        return updates, new_state

    return optax.GradientTransformationExtraArgs(
        lambda params: _init(layers, bank, params, limited_memory, m), update_fn
    )
