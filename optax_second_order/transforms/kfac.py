r"""K-FAC: the natural gradient with a Kronecker-factored Fisher per layer (Martens & Grosse 2015).

Per captured layer (dense, or convolution with KFC, Grosse & Martens 2016) with gradient matrix
``V = dL/dW`` (:func:`~optax_second_order.kronecker.kernel_matrix` order: ``(d_in [+1], d_out)``) the
Fisher block is approximated as ``A (x) G`` (:mod:`optax_second_order.curvature.kronecker`), and the
update is the damped natural gradient

* ``damping_mode="factored"`` (factored Tikhonov, section 6.3 of the paper):
  ``(A + pi sqrt(lambda) I)^{-1} V (G + sqrt(lambda) / pi I)^{-1}`` with
  ``pi = sqrt((tr A / d_A) / (tr G / d_G))``;
* ``damping_mode="exact"``: ``(A (x) G + lambda I)^{-1} vec(V)``, solved in the factors' eigenbases
  ``A = Q_A diag(a) Q_A^T``, ``G = Q_G diag(g) Q_G^T``:
  ``Q_A [(Q_A^T V Q_G) / (a g^T + lambda)] Q_G^T``;
* ``approximation="eigenvalue_corrected"`` (EK-FAC; George, Laurent, Bouthillier, Ballas & Vincent 2018):
  the same eigenbases, but the diagonal ``a g^T`` is replaced by the Fisher's own diagonal in them,
  ``s = E_i[(Q_A^T dl_i/dW Q_G)^2]`` from per-example gradients
  (:func:`~optax_second_order.kronecker.kronecker_factors` with ``eigenbases``):
  ``Q_A [(Q_A^T V Q_G) / (s + lambda)] Q_G^T``. When the eigenbases are recomputed, ``s`` restarts from
  that batch in the new bases (one more forward/backward pass on those steps); on the other statistics
  steps it is averaged like the factors (``decay_k`` counted from the restart).

Every ``precondition_frequency`` steps (optionally spread over devices, and with ``stagger`` over the steps: a
fixed partition of the layers into slots of balanced cost, one slot per step, so no step refreshes every layer) the factored mode inverts the two
damped factors (LU; two matrix products per step), the exact mode eigendecomposes them and keeps
the eigenbases (four products per step; EK-FAC likewise). The factors are exponential moving averages,
``decay_k = min(1 - 1/k, ema_decay)`` at the ``k``-th statistics update (the paper's section 5), refreshed every
``statistics_frequency`` steps from one extra forward/backward pass of ``model_fn`` with targets
sampled from the model (``fisher="true"``, the default) or the data's targets (``"empirical"``).
A stacked layer (``L`` layers under :func:`~optax_second_order.kronecker.scan` or linen's ``nn.scan``, a kernel
leaf ``(L, d_in, d_out)``) is ``L`` layers with factors ``A_l, G_l`` of their own, ``L`` units of the factor bank
(docs/optimizers/kfac.md, "Scanned and stacked layers"): the same steps as the network written layer by layer.
Parameters no layer captured fall back to a diagonal Fisher ``d`` (EMA of the squared gradients of the
same pass): ``v = grad / (d + lambda)``. With sampled targets the square of the batch's summed gradient is an
unbiased estimate of the Fisher diagonal (the cross terms between examples vanish in expectation); with the
data's targets (``fisher="empirical"``) each example's output gradient gets a random sign first, which makes
the square unbiased for the per-example squares (:func:`~optax_second_order.kronecker.fisher_cotangent`).

Embeddings and scale-and-shift layers (``layers.blocks``; :mod:`optax_second_order.curvature.blocks`) get blocks of
their own, outside the factor bank. An embedding ``(V, D)`` is a dense layer on one-hot inputs: ``A = diag(c)``, the
token frequencies, and ``G`` as for a dense layer; factored mode ``v = (V_grad / (c + pi sqrt(lambda))) (G +
sqrt(lambda)/pi I)^{-1}``, exact mode (and EK-FAC, which keeps K-FAC's form for these blocks)
``[(V_grad Q_G) / (c g^T + lambda)] Q_G^T``: the same steps as the dense layer on one-hot inputs, with ``V``
numbers for ``A`` instead of ``V^2`` and no ``V x V`` inverse. A scale-and-shift layer's block is the exact
Fisher diagonal ``d`` from per-example gradients (K-FAC-JAX's default for it): ``v = grad / (d + lambda)``.
Their statistics are averaged like the factors; the embeddings' preconditioners are recomputed every
``precondition_frequency`` steps (all at once, also with ``stagger``); they are stored in float32 (or the
parameters' wider dtype) whatever ``state_dtype``.

KL clipping (Ba, Grosse & Martens 2017): the natural gradient ``v`` is scaled by
``nu = min(1, sqrt(kl_clip / (lr^2 v^T F~ v)))``, ``F~`` the damped Kronecker (and diagonal) approximation
that defines ``v = F~^{-1} grad``, so ``v^T F~ v = v . grad`` costs no matrix product, and
``lr^2 v^T F~ v <= kl_clip``; since ``F~ >= F`` (the undamped approximation) the bound holds for ``F`` too.
A ``v . grad`` that is not positive (a preconditioner that is not positive definite) gives no step
(:func:`~optax_second_order.transforms.damping.kl_clip_scale`).
Momentum and weight decay are applied by
:func:`~optax_second_order.kfac` after this transformation.

Adaptive damping (``adaptive_damping=True``; Levenberg-Marquardt, section 6.5 of the paper): every
``damping_adaptation_interval`` steps (``T_1``) the step ``delta = -lr v`` (after KL clipping, before
momentum) is tested on the current batch by the reduction ratio

    ``rho = (h(theta + delta) - h(theta)) / (grad . delta + 1/2 delta^T (F + lambda I) delta)``,

``h`` = ``value_fn`` and ``F`` the exact Fisher (the Gauss-Newton matrix of the output-space loss, by
:func:`~optax_second_order.gnvp_quadratic_form`: one ``jvp``); then ``lambda <- omega lambda`` if
``rho > 3/4``, ``lambda <- lambda / omega`` if ``rho < 1/4`` (or the new loss is not finite), with
``omega = damping_adaptation_decay ** T_1`` (the paper: ``(19/20)^5``), never below ``min_damping``.
Cost: two ``value_fn`` calls and one ``jvp`` per adaptation. One ``lambda`` serves both the paper's
``lambda`` and its factored damping ``gamma`` (as in K-FAC-JAX); the exact mode and the fallback use a
new value at once, the factored mode at its next inversion.

Non-finite numbers: a statistics or decomposition result that is non-finite is discarded (the previous factors
and preconditioners are kept, still a sound preconditioner) and counted in ``state.nonfinite``; a step whose
gradient or natural gradient is not finite is rejected (zero update) and counted too.

Inside ``optax.masked`` / ``multi_transform`` the transformation is handed the masked params: with the extra
argument ``full_params`` it computes the statistics on the whole model (its state covers every layer
``find_layers`` saw) and returns the natural gradient of the leaves the mask lets through.

Defaults: ``ema_decay=0.95`` (Martens & Grosse 2015, section 5); ``damping=0.1``, ``kl_clip=1e-2`` and
``statistics_frequency=precondition_frequency=10``, measured: on a held-out character LM they matched Adam's
best-of-grid loss (2.04 against 2.02 after 200 steps) at 1.8x its step time, where the K-FAC PyTorch
implementation's ``damping=kl_clip=1e-3`` with statistics every step ended at 2.26, at 3.8x, its learning rate
without effect (the clip bound every step). See docs/optimizers/kfac.md.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from optax_second_order.curvature import blocks as curvature_blocks
from optax_second_order.curvature import kronecker
from optax_second_order.curvature import quantize as storage_codecs
from optax_second_order.curvature.bank import FactorBank, due_slot, update_slot_units
from optax_second_order.curvature.matrix import damped_inverse, eigh_psd
from optax_second_order.curvature.products import gnvp_quadratic_form
from optax_second_order.transforms import damping as damping_rules
from optax_second_order.transforms.common import (
    all_finite,
    computed_once,
    check,
    check_choice,
    check_float_leaves,
    extra_arg,
    finite_ema,
    has_masked_leaves,
    inner_state,
    is_refresh_step,
    require_params,
    stagger_slots,
    stat_dtype,
    tree_stat_dtype,
    update_on_whole_tree,
    value_at,
)

__all__ = ["KFACState", "LayerState", "kfac_layer_states", "scale_by_kfac"]

PyTree = Any
NAME = "scale_by_kfac"


class KFACState(NamedTuple):
    """K-FAC statistics, in the factor bank's layout (:class:`~optax_second_order.curvature.bank.FactorBank`: the
    captured layers grouped by ``(d_in [+1], d_out)``, unit ``j`` of a group's stacks its ``j``-th layer); the
    fallback tuples follow ``layers.fallback`` order. :func:`kfac_layer_states` reads them back per layer."""

    count: jax.Array  # int32, completed updates
    key: jax.Array
    factors: tuple  # per factor stack (group 0's A, G, group 1's A, G, ...): [n, d, d] exponential moving averages
    preconditioners: tuple  # per factor stack: factored, [n, d, d] damped inverses; else ([n, d] eigenvalues, [n, d, d] Q)
    diagonal: tuple  # diagonal Fisher of the fallback parameters
    num_statistics: jax.Array  # int32, statistics updates so far
    nonfinite: jax.Array  # int32, discarded non-finite statistics or decompositions
    damping: jax.Array  # the Tikhonov damping lambda now in use (constant unless adaptive_damping)
    scales: tuple  # EK-FAC: per group, [n, d_in, d_out] the Fisher diagonal in the eigenbasis; K-FAC: ()
    num_scales: Any  # EK-FAC scale updates since the eigenbases were last recomputed: int32, or staggered [n] per group
    previous_step: tuple  # adaptive_momentum: the last step delta, per leaf of params (float32 or better); else ()
    step_coefficients: jax.Array  # adaptive_learning_rate: the last (alpha, mu) of the quadratic model; else zeros
    block_factors: tuple = ()  # per block of layers.blocks: embedding (c, G); scale-and-shift (d_scale[, d_shift])
    block_preconditioners: tuple = ()  # per block: embedding factored (1/(c + a), (G + g I)^{-1}), else (c, g, Q_G)


class LayerState(NamedTuple):
    """One captured layer's part of a :class:`KFACState` (from :func:`kfac_layer_states`); a stacked layer's entries
    have a leading layer axis ``L`` (layer ``l``'s factors at index ``l``)."""

    name: str
    factors: tuple  # (A, G)
    preconditioner: tuple  # factored: (P_A, P_G); else ((a, Q_A), (g, Q_G))
    scales: jax.Array | None  # EK-FAC's (d_in, d_out) diagonal in the eigenbasis
    num_scales: jax.Array | None  # EK-FAC, staggered: this layer's scale count


class _Config(NamedTuple):
    """The static choices of one K-FAC: what the closures of :func:`scale_by_kfac` share."""

    layers: kronecker.Layers
    bank: FactorBank  # where each layer's factors live
    factored: bool  # factored Tikhonov damping with damped factor inverses (else eigenbases)
    corrected: bool  # EK-FAC's eigenbasis scales
    fisher: str
    adaptive_momentum: bool
    slots: int = 1  # refreshes spread over this many steps (stagger)


def _pair(bank: FactorBank, stacks: tuple, group: int) -> tuple:
    """``group``'s ``(A-side, G-side)`` entries of a tuple in factor-stack order."""
    return tuple(stacks[s] for s in bank.stacks_of(group))


def kfac_layer_states(layers: kronecker.Layers, state: Any) -> list[LayerState]:
    """The state of each captured layer (in ``layers.layers`` order), gathered from the bank's stacks: a layer's
    factors, preconditioners and (EK-FAC) scales. ``state``: a :class:`KFACState` or a state holding one (an
    alias's)."""
    state = inner_state(state, KFACState, "kfac_layer_states")
    bank = kronecker.layer_bank(layers)
    fields = ("factors", "preconditioners", "scales", "num_scales")  # split over devices: read on the host
    host = lambda x: x if isinstance(x, jax.core.Tracer) else np.asarray(x)  # noqa: E731
    state = state._replace(**{f: jax.tree.map(host, getattr(state, f)) for f in fields})
    none = [None] * len(layers.layers)
    factors, preconditioners = bank.item_units(state.factors), bank.item_units(state.preconditioners)
    scales = bank.item_units(state.scales, per="group") if state.scales else none
    counts = bank.item_units(state.num_scales, per="group") if isinstance(state.num_scales, tuple) else none
    states = []
    for l, *parts in zip(layers.layers, factors, preconditioners, scales, counts):
        own = (lambda x: x[0]) if l.stack is None else (lambda x: x)  # a layer is one unit; a stack, L of them
        states.append(LayerState(l.name, *(None if x is None else jax.tree.map(own, x) for x in parts)))
    return states


# --- statistics: the factors' moving averages (section 5) ------------------------------------------


def _batch_statistics(config: _Config, params, model_fn, loss, key, preconditioners) -> kronecker.KroneckerStatistics:
    """``(A, G)`` per layer, the fallback gradients and (EK-FAC) the scales in the current eigenbases, one pass."""
    if config.fisher == "true":
        cotangent = kronecker.fisher_cotangent(loss, key)
    else:
        cotangent = kronecker.fisher_cotangent(loss, sign_key=key)
    bases = _eigenbases(config, preconditioners) if config.corrected else None
    return kronecker.kronecker_factors(model_fn, params, config.layers, cotangent, bases)


def _eigenbases(config: _Config, preconditioners) -> dict:
    """``{layer: (Q_A, Q_G)}`` from the bank's stacks (``(L, d, d)`` for a stacked layer)."""
    bases = {}
    for l, units in zip(config.layers.layers, config.bank.item_units(preconditioners)):
        stack = () if l.stack is None else (l.stack,)
        if units is None:  # a layer with no weights (a zero dimension) is not in the bank
            bases[l.name] = tuple(jnp.broadcast_to(jnp.eye(d), (*stack, d, d)) for d in (l.input_dim, l.output_dim))
        else:
            (_, q_a), (_, q_g) = units
            bases[l.name] = (q_a, q_g) if stack else (q_a[0], q_g[0])
    return bases


def _finite_units(stacks: tuple) -> jax.Array:
    """``[n]``: whether every entry of unit ``j`` is finite in every stack (all of one group's)."""
    def per_unit(x):
        return jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)

    return functools.reduce(jnp.logical_and, [per_unit(x) for x in jax.tree.leaves(stacks)])


def _fold_in_units(bank: FactorBank, olds: tuple, news: tuple, decay, per: str) -> tuple[tuple, jax.Array]:
    """``decay * old + (1 - decay) * new`` unit by unit (``decay`` a scalar, or ``[n]`` per group); a unit whose new
    value is not finite in some stack of its group keeps the old one and counts once (a layer's ``(A, G)`` pair
    together); a non-finite old unit restarts from the new one. ``per``: the stacks are in factor-stack order
    (``"factor"``) or one per group (``"group"``)."""
    groups = range(len(bank.groups))
    members = [bank.stacks_of(g) for g in groups] if per == "factor" else [(g,) for g in groups]
    out, bad = list(olds), []
    for g, stacks in enumerate(members):
        ok = _finite_units(tuple(news[s] for s in stacks))
        rate = decay[g] if isinstance(decay, tuple) else decay
        for s in stacks:
            unit = (-1,) + (1,) * (news[s].ndim - 1)
            old = jnp.where(_finite_units((olds[s],)).reshape(unit), olds[s], news[s].astype(olds[s].dtype))
            w = jnp.reshape(rate, unit if jnp.ndim(rate) else ())
            average = (w * old + (1 - w) * news[s].astype(old.dtype)).astype(old.dtype)
            out[s] = jnp.where(ok.reshape(unit), average, old)
        bad.append(~ok)
    return bank.split(tuple(out)), bank.count_real(bad, per="group")


def _scale_decay(num_scales, ema_decay):
    """``min(1 - 1/(k + 1), ema_decay)`` for EK-FAC's scales (per group's units when staggered)."""
    return jax.tree.map(lambda k: jnp.minimum(1.0 - 1.0 / (k + 1), ema_decay), num_scales)


def _update_statistics(config: _Config, state: KFACState, stats, ema_decay):
    """Factors, fallback diagonal and (EK-FAC) scales averaged with ``decay_k = min(1 - 1/k, ema_decay)``."""
    bank = config.bank
    decay = jnp.minimum(1.0 - 1.0 / (state.num_statistics + 1), ema_decay)
    new = bank.stack_items([stats.factors[l.name] for l in config.layers.layers])
    factors, bad = _fold_in_units(bank, state.factors, new, decay, "factor")
    grads = [stats.fallback_grads[name] for name in config.layers.fallback]
    diagonal = []
    for old, g in zip(state.diagonal, grads):
        kept, failed = finite_ema(old, jnp.square(g), decay)
        diagonal.append(kept)
        bad = bad + failed
    scales = state.scales
    if config.corrected:
        new = bank.to_stacks([stats.scales[l.name] for l in config.layers.layers])
        scales, failed = _fold_in_units(bank, scales, new, _scale_decay(state.num_scales, ema_decay), "group")
        bad = bad + failed
    num_scales = jax.tree.map(lambda k: k + 1, state.num_scales)
    block_factors = []
    for b, old in zip(config.layers.blocks, state.block_factors):
        kept, failed = finite_ema(old, stats.blocks[b.name], decay)
        block_factors.append(kept)
        bad = bad + failed
    return (factors, tuple(diagonal), scales, state.num_statistics + 1, num_scales, state.nonfinite + bad,
            tuple(block_factors))


# --- refresh: damped inverses (section 6.3) or eigenbases ------------------------------------------


def _factored_dampings(a: jax.Array, g: jax.Array, damping: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``pi sqrt(lambda)`` and ``sqrt(lambda) / pi`` per unit, ``pi = sqrt((tr A / d_A) / (tr G / d_G))``."""
    def mean_eigenvalue(m):
        return jnp.trace(m, axis1=-2, axis2=-1) / m.shape[-1]

    return _pi_dampings(mean_eigenvalue(a), mean_eigenvalue(g), damping)


def _pi_dampings(mean_a: jax.Array, mean_g: jax.Array, damping: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``pi sqrt(lambda)`` and ``sqrt(lambda) / pi`` from the factors' mean eigenvalues ``tr A / d_A``, ``tr G / d_G``
    (section 6.3)."""
    pi = jnp.sqrt((mean_a + 1e-30) / (mean_g + 1e-30))
    root = jnp.sqrt(damping).astype(mean_a.dtype)
    return pi * root, root / pi


def _decompose(config: _Config, a: jax.Array, g: jax.Array, damping) -> tuple[tuple, jax.Array]:
    """The preconditioner pair of units ``(A, G)``: damped inverses (factored) or eigendecompositions; and ``[n]``
    whether each unit's pair is finite."""
    if config.factored:
        damping_a, damping_g = _factored_dampings(a, g, damping)
        (inverse_a, ok_a), (inverse_g, ok_g) = damped_inverse(a, damping_a), damped_inverse(g, damping_g)
        return (inverse_a, inverse_g), ok_a & ok_g
    pair = (eigh_psd(a), eigh_psd(g))
    return pair, _finite_units(pair)


def _refresh_group(config: _Config, group: int, factors, carry, damping, index=None, restart_scales=False):
    """New preconditioners for units ``index`` of ``group`` (all of them for ``None``), on the units a device holds
    (inside :meth:`~optax_second_order.curvature.bank.FactorBank.on_each_device`); a pair that is not finite keeps
    the old one. ``carry``: ``(preconditioners, scales, num_scales)``, the last two per group (EK-FAC, staggered:
    with ``restart_scales`` a refreshed unit's scales restart from K-FAC's diagonal ``a_i g_j`` in its new basis and
    its scale count from 0; else ``()``). Returns the new carry and the refreshed units' failure flags."""
    at = (lambda x: x) if index is None else (lambda x: x[index])
    put = (lambda x, y: y) if index is None else (lambda x, y: x.at[index].set(y))
    preconditioners, scales, num_scales = (list(c) for c in carry)
    stacks = config.bank.stacks_of(group)
    new, ok = _decompose(config, *(at(factors[s]) for s in stacks), damping)
    for s, pair in zip(stacks, new):
        preconditioners[s] = jax.tree.map(
            lambda old, n: put(old, jnp.where(ok.reshape((-1,) + (1,) * (n.ndim - 1)), n, at(old))),
            preconditioners[s], pair,
        )
    if restart_scales:
        (eig_a, _), (eig_g, _) = (jax.tree.map(at, preconditioners[s]) for s in stacks)
        scales[group] = put(scales[group], (eig_a[:, :, None] * eig_g[:, None, :]).astype(scales[group].dtype))
        num_scales[group] = put(num_scales[group], jnp.zeros_like(at(num_scales[group])))
    return (tuple(preconditioners), tuple(scales), tuple(num_scales)), ~ok


def _refresh_all(config: _Config, factors, carry, damping, restart_scales=False):
    """Every unit of every group refreshed (:func:`_refresh_group`); the failure flags per group."""
    failed = []
    for g in range(len(config.bank.groups)):
        carry, bad = _refresh_group(config, g, factors, carry, damping, restart_scales=restart_scales)
        failed.append(bad)
    return carry, tuple(failed)


def _refresh(config: _Config, factors, preconditioners, nonfinite, damping):
    """Every unit's preconditioners recomputed, each device its own units."""
    def on_device(factors, preconditioners, damping):
        (preconditioners, _, _), failed = _refresh_all(config, factors, (preconditioners, (), ()), damping)
        return preconditioners, failed

    preconditioners, failed = config.bank.on_each_device(on_device, factors, preconditioners, shared=(damping,))
    return preconditioners, nonfinite + config.bank.count_real(failed, per="group")


def _staggered_refresh(config: _Config, count, every, factors, preconditioners, scales, num_scales, nonfinite,
                       damping):
    """The preconditioners of the units whose slot is due (every unit on step 0): slot ``r`` on steps
    ``k * every - r``, a fixed partition of each group's units balanced by ``d_in^3 + d_out^3``
    (:meth:`~optax_second_order.curvature.bank.FactorBank.stagger_tables`).

    EK-FAC: a refreshed layer's scales restart from the eigenvalue products ``a_i g_j`` (K-FAC's diagonal in the new
    eigenbasis) and its scale count from 0, so the next statistics step replaces them by that batch's scales in the
    new basis (decay 0): no extra forward/backward pass on the refresh steps.
    """
    bank, restart = config.bank, config.corrected
    tables = bank.stagger_tables(config.slots, per="group")
    slot = due_slot(count, every)
    due = slot < config.slots

    def on_device(factors, preconditioners, scales, num_scales, slot, due, damping):
        carry = (preconditioners, scales, num_scales)
        failed = [jnp.zeros_like(factors[bank.stacks_of(g)[0]][:, 0, 0], bool) for g in range(len(bank.groups))]
        for g in range(len(bank.groups)):
            def update(index, state, g=g):
                carry, failed = state
                carry, bad = _refresh_group(config, g, factors, carry, damping, index, restart)
                return carry, failed[:g] + [failed[g].at[index].set(bad)] + failed[g + 1:]

            carry, failed = update_slot_units(tables, g, slot, due, update, (carry, failed), bank.device_index())
        return carry, tuple(failed)

    def every_unit(factors, preconditioners, scales, num_scales, slot, due, damping):
        return _refresh_all(config, factors, (preconditioners, scales, num_scales), damping, restart)

    restarted = (scales, num_scales) if restart else ((), ())  # K-FAC: no scales (a scalar count)
    (preconditioners, *restarted), failed = jax.lax.cond(
        count == 0,
        lambda *args: bank.on_each_device(every_unit, *args[:4], shared=args[4:]),
        lambda *args: bank.on_each_device(on_device, *args[:4], shared=args[4:]),
        factors, preconditioners, *restarted, slot, due, damping,
    )
    if restart:
        scales, num_scales = restarted
    return preconditioners, scales, num_scales, nonfinite + bank.count_real(failed, per="group")


# --- embeddings and scale-and-shift layers (curvature/blocks.py) --------------------------------------


def _init_blocks(config: _Config, leaves, dtype) -> tuple[tuple, tuple]:
    """The blocks' initial factors (``c = 1``, ``G = I``; ``d = 1``) and preconditioners (those of ``A = G = I``)."""
    factors, preconditioners = [], []
    for b in config.layers.blocks:
        if b.kind == "embed":
            vocabulary, features = b.kernel_shape
            ones, identity = jnp.ones(vocabulary, dtype), jnp.eye(features, dtype=dtype)
            factors.append((ones, identity))
            exact = (ones + 0, jnp.ones(features, dtype), identity + 0)
            preconditioners.append((ones + 0, identity + 0) if config.factored else exact)
        else:
            indices = (b.kernel_index,) if b.bias_index is None else (b.kernel_index, b.bias_index)
            factors.append(tuple(jnp.ones(jnp.shape(leaves[i]), stat_dtype(leaves[i].dtype)) for i in indices))
            preconditioners.append(())
    return tuple(factors), tuple(preconditioners)


def _embedding_preconditioner(config: _Config, factors: tuple, damping) -> tuple:
    """An embedding's preconditioner from ``(c, G)``: factored, ``(1 / (c + pi sqrt(lambda)), (G + sqrt(lambda) / pi
    I)^{-1})``; else ``(c, g, Q_G)`` with ``G = Q_G diag(g) Q_G^T`` (``A = diag(c)`` is its own eigenbasis)."""
    c, g = factors
    if config.factored:
        damping_a, damping_g = _pi_dampings(jnp.mean(c), jnp.trace(g) / g.shape[-1], damping)
        return 1.0 / (c + damping_a), damped_inverse(g, damping_g)[0]
    return (c, *eigh_psd(g))


def _refresh_blocks(config: _Config, block_factors: tuple, old: tuple, nonfinite, damping) -> tuple[tuple, jax.Array]:
    """The embeddings' preconditioners recomputed (a non-finite one keeps the old and is counted)."""
    new = []
    for b, factors, previous in zip(config.layers.blocks, block_factors, old):
        if b.kind != "embed":
            new.append(previous)
            continue
        fresh = _embedding_preconditioner(config, factors, damping)
        ok = all_finite(fresh)
        new.append(jax.tree.map(lambda n, o: jnp.where(ok, n.astype(o.dtype), o), fresh, previous))
        nonfinite = nonfinite + (~ok).astype(jnp.int32)
    return tuple(new), nonfinite


def _block_directions(config: _Config, leaves: list, block_factors: tuple, block_preconditioners: tuple,
                      damping) -> dict[int, jax.Array]:
    """``{leaf position: v}`` for the blocks' parameters: an embedding's ``(A + a I)^{-1} V (G + g I)^{-1}``
    (factored) or ``[(V Q_G) / (c g^T + lambda)] Q_G^T``; a scale-and-shift layer's ``grad / (d + lambda)``."""
    out = {}
    for b, factors, preconditioner in zip(config.layers.blocks, block_factors, block_preconditioners):
        if b.kind != "embed":
            indices = (b.kernel_index,) if b.bias_index is None else (b.kernel_index, b.bias_index)
            for i, d in zip(indices, factors):
                out[i] = leaves[i].astype(d.dtype) / (d + damping.astype(d.dtype))
            continue
        v = leaves[b.kernel_index].astype(factors[1].dtype)
        if config.factored:
            out[b.kernel_index] = curvature_blocks.embedding_natural_gradient(v, *preconditioner)
        else:
            c, g, q_g = preconditioner
            rotated = v @ q_g
            out[b.kernel_index] = (rotated / (c[:, None] * g[None, :] + damping.astype(g.dtype))) @ q_g.T
    return out


# --- the natural gradient ----------------------------------------------------------------------------


def _transpose(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _precondition_units(config: _Config, v: jax.Array, pair, scale, damping) -> jax.Array:
    """``F~^{-1} vec(V)`` for a ``[n, d_in, d_out]`` stack of gradient matrices ``V`` (module docstring)."""
    if config.factored:
        inverse_a, inverse_g = pair
        return inverse_a @ v.astype(inverse_a.dtype) @ inverse_g
    (a, q_a), (g, q_g) = pair
    diagonal = scale if config.corrected else a[:, :, None] * g[:, None, :]  # the Fisher block's diagonal
    rotated = _transpose(q_a) @ v.astype(q_a.dtype) @ q_g
    return q_a @ (rotated / (diagonal + damping.astype(a.dtype))) @ _transpose(q_g)


def _natural_gradient(config: _Config, grads: PyTree, preconditioners, scales, diagonal, damping,
                      block_factors=(), block_preconditioners=()) -> PyTree:
    """``v = F~^{-1} grad``: Kronecker-factored per layer (one batched product per group of the bank, each device
    its own units), the embeddings' and scale-and-shift layers' blocks, diagonal per fallback parameter (in float32
    or better)."""
    bank = config.bank
    leaves, treedef = jax.tree.flatten(grads)
    out = list(leaves)
    matrices = [
        kronecker.kernel_matrix(l, leaves[l.kernel_index], None if l.bias_index is None else leaves[l.bias_index])
        for l in config.layers.layers
    ]
    if bank.groups:
        blocks = bank.to_stacks(matrices)
        scales = scales or (None,) * len(bank.groups)
        directions = [
            _precondition_units(config, v, _pair(bank, preconditioners, g), scale, damping)
            for g, (v, scale) in enumerate(zip(blocks, scales))
        ]
        for layer, v in zip(config.layers.layers, bank.from_stacks(directions, matrices)):
            if v is None:  # no weights: the zero-size gradient is its own direction
                continue
            out[layer.kernel_index], bias = kronecker.split_kernel_matrix(layer, v)
            if layer.bias_index is not None:
                out[layer.bias_index] = bias
    for i, d in zip(config.layers.fallback_indices, diagonal):
        out[i] = leaves[i].astype(d.dtype) / (d + damping.astype(d.dtype))
    for i, v in _block_directions(config, leaves, block_factors, block_preconditioners, damping).items():
        out[i] = v
    return jax.tree.unflatten(treedef, bank.gathered(out))


def _adapted_damping(damping, v, grads, params, learning_rate, omega, min_damping, value_fn, model_fn, loss):
    """The damping after the reduction-ratio test of the step ``delta = -lr v`` (section 6.5).

    ``rho = (h(theta + delta) - h(theta)) / (grad . delta + 1/2 delta^T (F + lambda I) delta)``, ``F`` the exact
    Fisher (the output loss's Gauss-Newton matrix, one ``jvp``).
    """
    delta = jax.tree.map(lambda x, p: (-learning_rate * x).astype(p.dtype), v, params)
    actual = value_fn(optax.apply_updates(params, delta)) - value_fn(params)
    curvature = gnvp_quadratic_form(model_fn, loss, params, delta) + damping * optax.tree.vdot(delta, delta)
    predicted = optax.tree.vdot(grads, delta) + 0.5 * curvature
    rho = damping_rules.reduction_ratio(actual, predicted)
    return damping_rules.levenberg_marquardt(damping, rho, omega, 1.0 / omega, min_damping)


# --- the step from the quadratic model (section 7) -------------------------------------------------------


def _quadratic_model_step(direction, previous, grads, params, damping, model_fn, loss, with_momentum):
    """``delta = alpha Delta + mu delta_0`` minimizing ``M(delta) = g . delta + 1/2 delta^T (F + lambda I) delta``.

    ``Delta = -F~^{-1} g`` (the K-FAC direction), ``delta_0`` the previous step and ``F`` the exact Fisher (the
    output loss's Gauss-Newton matrix: one ``jvp`` per vector). The 2x2 system

        [Delta^T C Delta, Delta^T C delta_0; delta_0^T C Delta, delta_0^T C delta_0] [alpha; mu] = -[g.Delta; g.delta_0]

    with ``C = F + lambda I`` (Martens & Grosse 2015, section 7) falls back to ``mu = 0``,
    ``alpha = -g.Delta / Delta^T C Delta`` without momentum, on the first step (``delta_0 = 0``) or when it is
    singular, and to ``alpha = mu = 0`` when ``Delta = 0``. Returns ``delta`` and ``(alpha, mu)``.
    """
    # two jvps (XLA shares their forward pass): one jax.linearize with both tangents vmapped measured 10% slower on
    # stdlib-charlm (bench ab, process clock: kfac-auto 2.43x against 2.21x Adam's mean step)
    outputs, j_direction = jax.jvp(model_fn, (params,), (_like(direction, params),))
    if with_momentum:
        _, j_previous = jax.jvp(model_fn, (params,), (_like(previous, params),))
    else:  # delta_0 = 0: J delta_0 = 0
        j_previous = jnp.zeros_like(j_direction)

    def form(u, ju, w, jw):
        # a sum of products over the (possibly batch-split) outputs: gnvp_quadratic_form says why not vdot
        return jnp.sum(ju * loss.output_hvp(outputs, jw)) + damping * optax.tree.vdot(u, w)

    c11 = form(direction, j_direction, direction, j_direction)
    c12 = form(direction, j_direction, previous, j_previous)
    c22 = form(previous, j_previous, previous, j_previous)
    b1, b2 = optax.tree.vdot(grads, direction), optax.tree.vdot(grads, previous)
    # a zero direction (a zero gradient, an empty tree) has c11 = 0: no step, alpha = 0 rather than 0 / 0
    alpha_only = jnp.where(c11 > 0, -b1 / jnp.where(c11 > 0, c11, 1.0), 0.0)
    determinant = c11 * c22 - c12 * c12
    solvable = with_momentum & (determinant > 1e-12 * c11 * c22) & jnp.isfinite(determinant)
    safe = jnp.where(solvable, determinant, 1.0)
    alpha = jnp.where(solvable, (-b1 * c22 + b2 * c12) / safe, alpha_only)
    mu = jnp.where(solvable, (b1 * c12 - b2 * c11) / safe, 0.0)
    alpha, mu = computed_once(jnp.stack([alpha, mu]))  # they scale every leaf
    step = jax.tree.map(lambda d, p: alpha * d + mu * p, direction, previous)
    return step, jnp.stack([alpha, mu])


def _model_chosen_step(v, state: KFACState, grads, params, damping, rate, model_fn, loss, with_momentum):
    """The output (``-delta``, optax's sign) for the quadratic model's step, the new previous step (``rate * delta``,
    per leaf) and ``(alpha, mu)``."""
    if with_momentum:
        previous = jax.tree.unflatten(jax.tree.structure(v), list(state.previous_step))
    else:
        previous = jax.tree.map(jnp.zeros_like, v)
    delta, coefficients = _quadratic_model_step(
        jax.tree.map(jnp.negative, v), previous, grads, params, damping, model_fn, loss, with_momentum
    )
    previous_step = state.previous_step
    if with_momentum:
        previous_step = tuple((rate * d).astype(old.dtype) for d, old in zip(jax.tree.leaves(delta), previous_step))
    return jax.tree.map(jnp.negative, delta), previous_step, coefficients


def _like(tree, params):
    """``tree`` cast leafwise to the params' dtypes (a ``jvp`` tangent must match its primal)."""
    return jax.tree.map(lambda t, p: t.astype(p.dtype), tree, params)


# --- the transformation -------------------------------------------------------------------------------


def _validate(layers, damping, damping_mode, approximation, ema_decay, frequencies, kl_clip, learning_rate, fisher,
              adaptive_damping, decay, min_damping) -> None:
    if not isinstance(layers, kronecker.Layers):
        raise ValueError(
            f"{NAME}: layers must be an optax_second_order.kronecker.Layers (from find_layers), got {layers!r}"
        )
    check(NAME, "damping", damping, lambda x: x > 0, "> 0")
    check(NAME, "min_damping", min_damping, lambda x: x >= 0, ">= 0")
    if isinstance(damping, (int, float)) and isinstance(min_damping, (int, float)) and min_damping > damping:
        raise ValueError(
            f"{NAME}: min_damping must be <= damping, got min_damping={min_damping!r} > damping={damping!r}"
        )
    check_choice(NAME, "damping_mode", damping_mode, ("factored", "exact"))
    check_choice(NAME, "approximation", approximation, ("kronecker", "eigenvalue_corrected"))
    check(NAME, "ema_decay", ema_decay, lambda x: 0 <= x < 1, "in [0, 1)")
    for name, value in frequencies.items():
        check(NAME, name, value, lambda x: x >= 1 and float(x).is_integer(), "an integer >= 1")
    check(NAME, "kl_clip", kl_clip, lambda x: x > 0, "None or > 0")
    check(NAME, "learning_rate", learning_rate, lambda x: x > 0, "> 0")
    if (kl_clip is not None or adaptive_damping) and learning_rate is None:
        raise ValueError(f"{NAME}: learning_rate must be given when kl_clip or adaptive_damping is set")
    check_choice(NAME, "fisher", fisher, ("true", "empirical"))
    check(NAME, "damping_adaptation_decay", decay, lambda x: 0 < x < 1, "in (0, 1)")


def _init(config: _Config, params, damping, seed) -> KFACState:
    if has_masked_leaves(params):  # optax.masked: the whole tree's state, from the shapes find_layers saw
        leaves = config.layers.leaves
    else:
        leaves = config.layers.check_params(params, NAME)
    bank = config.bank
    dtype = tree_stat_dtype([leaves[l.kernel_index] for l in config.layers.layers + config.layers.blocks])
    # fresh arrays each call: a state sharing buffers cannot be donated
    factors = bank.matrices(dtype, identity=True)
    if config.factored:
        preconditioners = bank.matrices(dtype, identity=True)
    else:
        values = [jnp.ones((bank.groups[g].size, d), dtype) for (g, _), d in zip(bank.factor_stacks, bank.factor_dims())]
        preconditioners = tuple(zip(bank.split(tuple(values)), bank.matrices(dtype, identity=True)))
    diagonal = tuple(jnp.ones(jnp.shape(leaves[i]), stat_dtype(leaves[i].dtype)) for i in config.layers.fallback_indices)
    scales = tuple(s + 1 for s in bank.zero_stacks(dtype)) if config.corrected else ()

    def zero():
        return jnp.zeros([], jnp.int32)

    num_scales = zero()
    if config.slots > 1 and config.corrected:
        num_scales = bank.split(tuple(jnp.zeros(g.size, jnp.int32) for g in bank.groups))
    previous = ()
    if config.adaptive_momentum:
        previous = tuple(jnp.zeros(x.shape, stat_dtype(x.dtype)) for x in leaves)
    return KFACState(
        zero(), jax.random.key(seed), factors, preconditioners, diagonal, zero(), zero(),
        jnp.asarray(damping, jnp.result_type(float)), scales, num_scales, previous, jnp.zeros(2, jnp.result_type(float)),
        *_init_blocks(config, leaves, dtype),
    )


def _stored(state: KFACState, dtype: Any) -> KFACState:
    """``state`` with its factors, preconditioners and scales in ``dtype`` (``state_dtype``: stored between steps;
    the compute dtype: for a step; ``None``: as they are)."""
    if dtype is None:
        return state
    cast = lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree)  # noqa: E731
    return state._replace(factors=cast(state.factors), preconditioners=cast(state.preconditioners),
                          scales=cast(state.scales))


def scale_by_kfac(
    layers: kronecker.Layers,
    *,
    damping: float = 0.1,
    damping_mode: str = "factored",
    approximation: str = "kronecker",
    ema_decay: float = 0.95,
    statistics_frequency: int = 10,
    precondition_frequency: int = 10,
    kl_clip: float | None = 1e-2,
    learning_rate: optax.ScalarOrSchedule | None = None,
    fisher: str = "true",
    seed: int = 0,
    precondition_sharding: NamedSharding | None = None,
    adaptive_damping: bool = False,
    damping_adaptation_interval: int = 5,
    damping_adaptation_decay: float = 0.95,
    min_damping: float = 1e-8,
    adaptive_learning_rate: bool = False,
    adaptive_momentum: bool = False,
    stagger: bool | int | None = None,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """K-FAC preconditioning of the gradient (see the module docstring for the math).

    Args:
      layers: the capture found by :func:`optax_second_order.kronecker.find_layers` (plain JAX tags) or
        :func:`optax_second_order.flax.find_layers` (Flax linen / NNX); built once, on the same parameters
        ``init`` and ``update`` get (their leaves are matched by position).
      damping: Tikhonov damping ``lambda``.
      damping_mode: ``"factored"`` (with the pi-adjustment) or ``"exact"`` (eigenbasis solve); applies to
        ``approximation="kronecker"`` (EK-FAC always adds ``lambda`` to its eigenbasis diagonal).
      approximation: ``"kronecker"`` (K-FAC) or ``"eigenvalue_corrected"`` (EK-FAC, George et al. 2018).
      ema_decay: decay of the factors' moving averages.
      statistics_frequency: refresh the factors every this many steps.
      precondition_frequency: recompute the damped inverses (factored) or eigenbases (exact, EK-FAC) every this
        many steps.
      kl_clip: bound on ``lr^2 v^T F v`` (``None`` disables KL clipping).
      learning_rate: the learning rate the update will be scaled by (float or schedule), for KL clipping.
      fisher: ``"true"`` (targets sampled from the model) or ``"empirical"`` (the data's targets).
      seed: PRNG seed for the sampled targets (and the empirical Fisher's random signs).
      precondition_sharding: optional ``NamedSharding(mesh, PartitionSpec(axes))``: the layers' factors,
        preconditioners and (EK-FAC) scales are stored split over those mesh axes (the factor bank's stacks), and
        each device refreshes and applies only its own layers' (docs/scaling.md). The factors are global-batch
        factors under ``jax.jit`` with a sharded batch with or without it: XLA inserts the reductions.
      adaptive_damping: adapt ``damping`` by the Levenberg-Marquardt rule (module docstring); ``damping``
        is then the initial value, and ``update`` also needs ``value_fn``.
      damping_adaptation_interval: adapt every this many steps (``T_1 = 5`` in the paper).
      damping_adaptation_decay: ``omega_1 = decay ** interval`` (``(19/20)^{T_1}`` in the paper).
      min_damping: the adapted damping never goes below this (K-FAC-JAX's default, ``1e-8``).
      adaptive_learning_rate: the step is ``alpha Delta`` with ``alpha`` minimizing the quadratic model with the
        exact Fisher (section 7); the output is then the step itself (negated, as optax expects), and the learning
        rate it is later scaled by is a multiplier (use 1.0). Needs ``kl_clip=None`` (both would choose the size).
      adaptive_momentum: with ``adaptive_learning_rate``, also the momentum: ``alpha Delta + mu delta_0``, both
        from the model (the alias then adds no momentum of its own).
      stagger: spread each refresh over this many steps (``True``: ``precondition_frequency``; ``None``/``False``:
        every layer on one step): a fixed partition of the layers balanced by ``d_in^3 + d_out^3``; every layer is
        refreshed on step 0, then slot ``r`` on steps ``k * precondition_frequency - r``. At most
        ``precondition_frequency``; a shape, so under ``optax.inject_hyperparams`` list it (or, with ``True``,
        ``precondition_frequency``) in ``static_args``. EK-FAC's scales then restart at the next statistics step
        (module docstring).
      state_dtype: the dtype the factors, preconditioners and (EK-FAC) scales are stored in between steps
        (``jnp.bfloat16`` or ``"bfloat16"``: half the state; ``None``: float32, or the parameters' wider dtype); each
        step computes in float32 from them (``docs/memory.md``).

    ``update(grads, state, params, model_fn=..., loss=...)`` needs ``model_fn`` (params -> outputs, the
    same function ``find_layers`` traced, on the current batch) and ``loss``; with ``adaptive_damping`` also
    ``value_fn``.
    """
    frequencies = dict(
        statistics_frequency=statistics_frequency,
        precondition_frequency=precondition_frequency,
        damping_adaptation_interval=damping_adaptation_interval,
    )
    _validate(
        layers, damping, damping_mode, approximation, ema_decay, frequencies, kl_clip, learning_rate, fisher,
        adaptive_damping, damping_adaptation_decay, min_damping,
    )
    if adaptive_learning_rate and kl_clip is not None:
        raise ValueError(
            f"{NAME}: adaptive_learning_rate chooses the step size, so kl_clip must be None, got {kl_clip!r}"
        )
    if adaptive_momentum and not adaptive_learning_rate:
        raise ValueError(f"{NAME}: adaptive_momentum needs adaptive_learning_rate=True")
    corrected = approximation == "eigenvalue_corrected"
    slots = stagger_slots(NAME, stagger, precondition_frequency)
    check(NAME, "stagger", slots, lambda x: not isinstance(precondition_frequency, (int, float)) or x <= precondition_frequency,
          f"at most precondition_frequency ({precondition_frequency})")
    config = _Config(
        layers, kronecker.layer_bank(layers, precondition_sharding), damping_mode == "factored" and not corrected, corrected, fisher,
        adaptive_momentum, slots,
    )
    omega = damping_adaptation_decay**damping_adaptation_interval
    stored_dtype = storage_codecs.as_state_dtype(NAME, state_dtype)
    computed_dtype = tree_stat_dtype([layers.leaves[l.kernel_index] for l in layers.layers + layers.blocks])

    def statistics(state, params, model_fn, loss, key):
        stats = _batch_statistics(config, params, model_fn, loss, key, state.preconditioners)
        return _update_statistics(config, state, stats, ema_decay)

    def refresh(factors, scales, num_scales, old, nonfinite, damping_now, params, model_fn, loss, key):
        """New preconditioners; EK-FAC restarts its scales from this batch in the new eigenbases."""
        preconditioners, nonfinite = _refresh(config, factors, old, nonfinite, damping_now)
        if not corrected:
            return preconditioners, scales, num_scales, nonfinite
        stats = _batch_statistics(config, params, model_fn, loss, key, preconditioners)
        new = config.bank.to_stacks([stats.scales[l.name] for l in layers.layers])
        scales, bad = _fold_in_units(config.bank, scales, new, 0.0, "group")
        return preconditioners, scales, jnp.ones_like(num_scales), nonfinite + bad

    def update_fn(updates, state, params=None, **extra):
        """The K-FAC step; inside ``optax.masked`` it runs on the whole tree (``full_params``, zero gradients
        where masked) and returns the masked part."""
        params = require_params(params, NAME)
        check_float_leaves(updates, NAME)
        if stored_dtype is None:
            return update_on_whole_tree(step, updates, state, params, extra, NAME)
        updates, state = update_on_whole_tree(step, updates, _stored(state, computed_dtype), params, extra, NAME)
        return updates, _stored(state, stored_dtype)

    def step(updates, state, params, **extra):
        layers.check_params(updates, NAME)
        model_fn = extra_arg(extra, "model_fn", NAME)
        loss = extra_arg(extra, "loss", NAME)
        value_fn = extra_arg(extra, "value_fn", NAME) if adaptive_damping else None
        damping_now = state.damping if adaptive_damping else jnp.asarray(damping, state.damping.dtype)
        key, stats_key = jax.random.split(state.key)

        factors, diagonal, scales, num_statistics, num_scales, nonfinite, block_factors = jax.lax.cond(
            is_refresh_step(state.count, statistics_frequency),
            lambda: statistics(state, params, model_fn, loss, stats_key),
            lambda: (state.factors, state.diagonal, state.scales, state.num_statistics, state.num_scales,
                     state.nonfinite, state.block_factors),
        )
        block_preconditioners, nonfinite = jax.lax.cond(
            is_refresh_step(state.count, precondition_frequency),
            lambda: _refresh_blocks(config, block_factors, state.block_preconditioners, nonfinite, damping_now),
            lambda: (state.block_preconditioners, nonfinite),
        )
        if slots == 1:
            preconditioners, scales, num_scales, nonfinite = jax.lax.cond(
                is_refresh_step(state.count, precondition_frequency),
                lambda: refresh(factors, scales, num_scales, state.preconditioners, nonfinite, damping_now, params,
                                model_fn, loss, stats_key),
                lambda: (state.preconditioners, scales, num_scales, nonfinite),
            )
        else:
            preconditioners, scales, num_scales, nonfinite = _staggered_refresh(
                config, state.count, precondition_frequency, factors, state.preconditioners, scales, num_scales,
                nonfinite, damping_now,
            )
        v = _natural_gradient(config, updates, preconditioners, scales, diagonal, damping_now, block_factors,
                              block_preconditioners)
        if kl_clip is not None:
            rate = value_at(learning_rate, state.count)
            nu = damping_rules.kl_clip_scale(v, updates, rate, kl_clip)
            v = jax.tree.map(lambda x: nu * x, v)
        previous_step, coefficients = state.previous_step, state.step_coefficients
        if adaptive_learning_rate:
            rate = 1.0 if learning_rate is None else value_at(learning_rate, state.count)
            v, previous_step, coefficients = _model_chosen_step(
                v, state, updates, params, damping_now, rate, model_fn, loss, adaptive_momentum
            )
        # non-finite policy: the kept factors are still a sound preconditioner, but a step that is not finite
        # (a non-finite gradient) is rejected and counted
        bad = ~all_finite((updates, v))
        v = damping_rules.reject_step(bad, v)
        nonfinite = nonfinite + bad.astype(jnp.int32)
        previous_step, coefficients = jax.tree.map(
            lambda new, old: jnp.where(bad, old, new.astype(old.dtype)),
            (previous_step, coefficients), (state.previous_step, state.step_coefficients),
        )
        new_damping = damping_now
        if adaptive_damping:
            rate = value_at(learning_rate, state.count)
            new_damping = jax.lax.cond(
                is_refresh_step(state.count + 1, damping_adaptation_interval),
                lambda: _adapted_damping(damping_now, v, updates, params, rate, omega, min_damping, value_fn, model_fn, loss),
                lambda: damping_now,
            )
        updates = jax.tree.map(lambda x, g: x.astype(g.dtype), v, updates)
        new_state = KFACState(
            state.count + 1, key, factors, preconditioners, diagonal, num_statistics, nonfinite, new_damping, scales,
            num_scales, previous_step, coefficients, block_factors, block_preconditioners,
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(
        lambda params: _stored(_init(config, params, damping, seed), stored_dtype), update_fn
    )
