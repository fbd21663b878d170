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
import optax

from optax_second_order.curvature import kronecker, secant
from optax_second_order.transforms.common import (
    all_finite,
    check,
    extra_arg,
    has_masked_leaves,
    is_refresh_step,
    require_params,
    stat_dtype,
    static_int,
    update_on_whole_tree,
    value_at,
)

__all__ = ["KBFGSState", "scale_by_kbfgs"]

PyTree = Any
NAME = "scale_by_kbfgs"
_HIGHEST = jax.lax.Precision.HIGHEST


class KBFGSState(NamedTuple):
    """K-BFGS state; tuples follow ``layers.layers`` / ``layers.fallback`` order."""

    count: jax.Array  # int32, finite steps taken
    momentum: tuple  # gradient momentum m per leaf of the parameters (float32 or better), in jax.tree.leaves order
    factors: tuple  # A per layer, (d_in, d_in)
    inverse_factors: tuple  # H_a per layer, (d_in, d_in)
    curvature: tuple  # H_g per layer, (d_out, d_out); K-BFGS(L): an LBFGSMemory of (d_out,) pairs
    pairs: tuple  # ((s_g, y_g), ...): the moving averages of the pre-activation pairs
    diagonal: tuple  # the fallback parameters' moving average of squared gradients
    num_statistics: jax.Array  # int32, statistics steps so far
    skipped: jax.Array  # int32, H_g or H_a updates that rejected their pair
    nonfinite: jax.Array  # int32, non-finite gradients or statistics (not folded in)


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
    """:class:`_Means` of one layer from its rows (all calls), with ``s = W^T h`` for the current ``W``."""
    a = jnp.concatenate([c.inputs for c in calls])
    p = jnp.concatenate([c.output_grads for c in calls])
    rows, examples = a.shape[0], calls[0].num_examples
    h = jnp.mean(a, axis=0)
    w = kronecker.kernel_matrix(layer, kernel, bias).astype(a.dtype)
    return _Means(
        aa=kronecker.sum_over_rows(a, a) / rows,
        h=h,
        s=jnp.matmul(h, w, precision=_HIGHEST),
        g=jnp.sum(p, axis=0) * (examples / rows),
    )


def _in_dtypes(means: list[_Means], factors) -> list[_Means]:
    """Each layer's means in its factor's dtype (the rows follow the model's activations, not the kernels)."""
    return [_Means(*(x.astype(a.dtype) for x in mean)) for a, mean in zip(factors, means)]


def _pass_means(layers: kronecker.Layers, model_fn, loss, params) -> list[_Means]:
    """Every layer's :class:`_Means` at ``params``, from one forward/backward pass."""
    captured = kronecker.layer_rows(model_fn, params, layers, _cotangent(loss))
    leaves = jax.tree.leaves(params)
    out = []
    for layer, calls in zip(layers.layers, captured.rows):
        bias = leaves[layer.bias_index] if layer.bias_index is not None else None
        out.append(_layer_means(layer, calls, leaves[layer.kernel_index], bias))
    return out


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
    return a + jnp.sqrt(damping).astype(a.dtype) * jnp.eye(a.shape[0], dtype=a.dtype)


# --- the direction ----------------------------------------------------------------------------------------


def _layer_direction(h_a, v, curvature) -> jax.Array:
    """``H_a V H_g`` (``H_g`` symmetric: each row of ``H_a V`` times ``H_g``)."""
    left = jnp.matmul(h_a, v.astype(h_a.dtype), precision=_HIGHEST)
    if isinstance(curvature, secant.LBFGSMemory):
        return jax.vmap(lambda row: _h_g_times(curvature, row))(left)
    return jnp.matmul(left, curvature, precision=_HIGHEST)


def _direction(layers: kronecker.Layers, leaves, inverse_factors, curvature, diagonal, damping) -> list:
    """Each leaf's direction from the momentum's leaves: ``H_a V H_g`` per layer, ``m / (d + lambda)`` else."""
    out = list(leaves)
    for layer, h_a, h_g in zip(layers.layers, inverse_factors, curvature):
        bias = leaves[layer.bias_index] if layer.bias_index is not None else None
        v = _layer_direction(h_a, kronecker.kernel_matrix(layer, leaves[layer.kernel_index], bias), h_g)
        out[layer.kernel_index], bias = kronecker.split_kernel_matrix(layer, v)
        if layer.bias_index is not None:
            out[layer.bias_index] = bias
    for i, d in zip(layers.fallback_indices, diagonal):
        out[i] = leaves[i] / (d + jnp.asarray(damping, d.dtype))
    return out


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


def _init(layers: kronecker.Layers, params, limited_memory: bool, memory_size: int) -> KBFGSState:
    if has_masked_leaves(params):  # optax.masked: the whole tree's state, from the shapes find_layers saw
        leaves = list(layers.leaves)
    else:
        leaves = layers.check_params(params, NAME)

    def dtype(index):
        return stat_dtype(jnp.result_type(leaves[index]))

    def eye(n, index):  # fresh arrays each call: a state sharing buffers cannot be donated
        return jnp.eye(n, dtype=dtype(index))

    def zeros(shape, index):
        return jnp.zeros(shape, dtype(index))

    def curvature(layer):
        if limited_memory:
            shape = jax.ShapeDtypeStruct((layer.output_dim,), dtype(layer.kernel_index))
            return secant.lbfgs_init_memory(shape, memory_size)
        return eye(layer.output_dim, layer.kernel_index)

    def zero():
        return jnp.zeros([], jnp.int32)

    return KBFGSState(
        count=zero(),
        momentum=tuple(zeros(jnp.shape(p), i) for i, p in enumerate(leaves)),
        factors=tuple(eye(l.input_dim, l.kernel_index) for l in layers.layers),
        inverse_factors=tuple(eye(l.input_dim, l.kernel_index) for l in layers.layers),
        curvature=tuple(curvature(l) for l in layers.layers),
        pairs=tuple((zeros(l.output_dim, l.kernel_index), zeros(l.output_dim, l.kernel_index)) for l in layers.layers),
        diagonal=tuple(zeros(jnp.shape(leaves[i]), i) for i in layers.fallback_indices),
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
) -> optax.GradientTransformationExtraArgs:
    """K-BFGS (``limited_memory=False``) or K-BFGS(L) preconditioning (see the module docstring for the math).

    Args:
      layers: the capture found by :func:`optax_second_order.kronecker.find_layers` or
        :func:`optax_second_order.flax.find_layers`, on the same parameters ``init`` and ``update`` get. Stacked
        (scanned) layers are not K-BFGS layers yet: their parameters get the diagonal fallback.
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

    ``update(grads, state, params, model_fn=..., loss=...)`` needs ``model_fn`` (the function ``find_layers``
    traced, on the current batch) and ``loss`` (bound to the batch's targets).
    """
    _validate(layers, learning_rate, damping, momentum, ema_decay, pair_decay, statistics_frequency, min_cosine)
    layers = layers.without_stacks()  # scanned layers: the diagonal fallback (one K-BFGS layer per kernel leaf)
    m = static_int(NAME, "memory_size", memory_size, 100)

    def statistics_step(state, params, model_fn, loss):
        """Pass at theta_k: A's moving average (the first batch sets it), the means, H_a on the first step."""
        means = _in_dtypes(_pass_means(layers, model_fn, loss, params), state.factors)
        ok = all_finite(means)
        decay = jnp.where(state.num_statistics == 0, 0.0, ema_decay)
        factors = tuple(
            jnp.where(ok, (decay * a + (1 - decay) * mean.aa).astype(a.dtype), a) for a, mean in zip(state.factors, means)
        )
        first = ok & (state.num_statistics == 0)
        inverse_factors = tuple(
            jax.lax.cond(first, lambda a=a: jnp.linalg.inv(_damped(a, damping)), lambda h=h: h)
            for a, h in zip(factors, state.inverse_factors)
        )
        return factors, inverse_factors, means, ok

    def pair_step(state, factors, inverse_factors, means, ok, params_next, model_fn, loss):
        """Pass at theta_{k+1} on the same batch: the averaged, double-damped pairs into H_g, then H_a."""
        means_next = _in_dtypes(_pass_means(layers, model_fn, loss, params_next), factors)
        ok = ok & all_finite(means_next)
        curvature, pairs, inverse_out, skipped = [], [], [], state.skipped
        for i, (mean, nxt) in enumerate(zip(means, means_next)):
            s_avg, y_avg = state.pairs[i]
            s_avg = pair_decay * s_avg + (1 - pair_decay) * (nxt.s - mean.s).astype(s_avg.dtype)
            y_avg = pair_decay * y_avg + (1 - pair_decay) * (nxt.g - mean.g).astype(y_avg.dtype)
            new_h_g, used_g = _update_h_g(state.curvature[i], s_avg, y_avg, damping, min_cosine)
            new_h_a, used_a = _update_h_a(inverse_factors[i], _damped(factors[i], damping), mean.h, min_cosine)
            curvature.append(jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_h_g, state.curvature[i]))
            pairs.append((jnp.where(ok, s_avg, state.pairs[i][0]), jnp.where(ok, y_avg, state.pairs[i][1])))
            inverse_out.append(jnp.where(ok, new_h_a, inverse_factors[i]))
            skipped = skipped + (ok & ~used_g).astype(jnp.int32) + (ok & ~used_a).astype(jnp.int32)
        return tuple(curvature), tuple(pairs), tuple(inverse_out), skipped, (~ok).astype(jnp.int32)

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
            zeros = [
                _Means(jnp.zeros_like(a), jnp.zeros(a.shape[0], a.dtype), jnp.zeros_like(p[0]), jnp.zeros_like(p[1]))
                for a, p in zip(state.factors, state.pairs)
            ]
            return state.factors, state.inverse_factors, zeros, jnp.asarray(True)

        factors, inverse_factors, means, stats_ok = jax.lax.cond(
            refresh, lambda: statistics_step(state, params, model_fn, loss), no_statistics
        )
        direction = jax.tree.unflatten(
            treedef, _direction(layers, moment, inverse_factors, state.curvature, diagonal, damping)
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
        lambda params: _init(layers, params, limited_memory, m), update_fn
    )
