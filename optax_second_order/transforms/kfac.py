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

Every ``inverse_frequency`` steps (optionally spread over devices) the factored mode inverts the two
damped factors (LU; two matrix products per step), the exact mode eigendecomposes them and keeps
the eigenbases (four products per step; EK-FAC likewise). The factors are exponential moving averages, ``decay_k = min(1 - 1/k,
ema_decay)`` at the ``k``-th statistics update (the paper's section 5), refreshed every
``statistics_frequency`` steps from one extra forward/backward pass of ``model_fn`` with targets
sampled from the model (``fisher="true"``, the default) or the data's targets (``"empirical"``).
Parameters no layer captured fall back to a diagonal Fisher ``d`` (EMA of the squared gradients of the
same pass): ``v = grad / (d + lambda)``.

KL clipping (Ba, Grosse & Martens 2017): the natural gradient ``v`` is scaled by
``nu = min(1, sqrt(kl_clip / (lr^2 v^T F~ v)))``, ``F~`` the damped Kronecker (and diagonal) approximation
that defines ``v = F~^{-1} grad``, so ``v^T F~ v = v . grad`` costs no matrix product, and
``lr^2 v^T F~ v <= kl_clip``; since ``F~ >= F`` (the undamped approximation) the bound holds for ``F`` too.
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

A statistics or decomposition result that is non-finite is discarded (the previous factors and
preconditioners are kept) and counted in ``state.nonfinite``.

Defaults: ``ema_decay=0.95`` (Martens & Grosse 2015, section 5), ``damping=1e-3`` and
``kl_clip=1e-3`` (the K-FAC PyTorch implementation of Wang et al. used by many follow-ups),
``inverse_frequency=10`` (amortization; the paper uses 20).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_second_order.curvature import kronecker
from optax_second_order.curvature.matrix import eigh_psd
from optax_second_order.curvature.products import gnvp_quadratic_form
from optax_second_order.transforms.common import extra_arg, is_refresh_step, require_params, stat_dtype

__all__ = ["KFACState", "scale_by_kfac"]

PyTree = Any
NAME = "scale_by_kfac"


class KFACState(NamedTuple):
    """K-FAC statistics; tuples follow ``layers.layers`` / ``layers.fallback`` order."""

    count: jax.Array  # int32, completed updates
    key: jax.Array
    factors: tuple  # ((A, G), ...) exponential moving averages
    preconditioners: tuple  # factored: ((P_A, P_G), ...) damped factor inverses; else (((a, Q_A), (g, Q_G)), ...)
    diagonal: tuple  # diagonal Fisher of the fallback parameters
    num_statistics: jax.Array  # int32, statistics updates so far
    nonfinite: jax.Array  # int32, discarded non-finite statistics or decompositions
    damping: jax.Array  # the Tikhonov damping lambda now in use (constant unless adaptive_damping)
    scales: tuple  # EK-FAC: per layer, the (d_in, d_out) Fisher diagonal in the eigenbasis; K-FAC: ()
    num_scales: jax.Array  # int32, EK-FAC scale updates since the eigenbases were last recomputed


def _check(name: str, ok: bool, requirement: str) -> None:
    if not ok:
        raise ValueError(f"{NAME}: {name} must be {requirement}")


def _validate(
    layers, damping, damping_mode, approximation, ema_decay, frequencies, kl_clip, learning_rate, fisher, adaptive_damping, decay
):
    _check("layers", isinstance(layers, kronecker.Layers), "an optax_second_order.kronecker.Layers (from find_layers)")
    if isinstance(damping, (int, float)):  # a traced damping (optax.inject_hyperparams) is not checked
        _check("damping", damping > 0, "> 0")
    _check("damping_mode", damping_mode in ("factored", "exact"), '"factored" or "exact"')
    _check("approximation", approximation in ("kronecker", "eigenvalue_corrected"), '"kronecker" or "eigenvalue_corrected"')
    _check("ema_decay", 0.0 <= ema_decay < 1.0, "in [0, 1)")
    for name, value in frequencies.items():
        _check(name, isinstance(value, int) and value >= 1, "an int >= 1")
    _check("kl_clip", kl_clip is None or kl_clip > 0, "None or > 0")
    needs_rate = kl_clip is not None or adaptive_damping
    _check("learning_rate", not needs_rate or learning_rate is not None, "given when kl_clip or adaptive_damping is set")
    _check("fisher", fisher in ("true", "empirical"), '"true" or "empirical"')
    _check("damping_adaptation_decay", 0.0 < decay < 1.0, "in (0, 1)")


def _leaves_by_name(tree: PyTree) -> tuple[dict[str, Any], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in flat}, treedef


def _ema(old, new, decay):
    return jax.tree.map(lambda o, n: (decay * o + (1 - decay) * n).astype(o.dtype), old, new)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _dot(x, y) -> jax.Array:
    """``sum_leaves <x, y>`` in ``x``'s dtypes."""
    return sum(jnp.vdot(a, b.astype(a.dtype)) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))


def _ema_unless_nonfinite(olds, news, decay, bad):
    """The EMA of each ``(old, new)`` pair; a pair whose result is non-finite keeps ``old`` and adds to ``bad``."""
    out = []
    for old, new in zip(olds, news):
        kept, was_bad = _keep_if_bad(old, _ema(old, new, decay))
        out.append(kept)
        bad = bad + was_bad
    return tuple(out), bad


def _keep_if_bad(old, new):
    """``new`` if it is all finite, else ``old``; and whether ``new`` was bad."""
    ok = _all_finite(new)
    return jax.tree.map(lambda o, n: jnp.where(ok, n, o), old, new), (~ok).astype(jnp.int32)


def _damped_inverse(matrix: jax.Array, damping: jax.Array) -> jax.Array:
    """``(M + damping I)^{-1}`` by LU (on XLA:CPU faster than Cholesky, and several times faster than ``eigh``)."""
    return jnp.linalg.inv(matrix + damping[..., None, None] * jnp.eye(matrix.shape[-1], dtype=matrix.dtype))


def _spread(fn: Callable, matrices: list[jax.Array], dampings: list[jax.Array], sharding) -> list:
    """``fn(matrix, damping)`` of every matrix; with ``sharding``, spread over its devices.

    Without ``sharding`` each matrix is handled on its own (XLA:CPU's batched ``eigh`` is far slower than a
    loop). With it, matrices of equal shape are stacked, padded with identities to a multiple of the
    number of devices and constrained to ``sharding`` (leading axis split), so that each device works
    on its share of the layers' factors only.
    """
    if sharding is None:
        return [fn(m, d) for m, d in zip(matrices, dampings)]
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(matrices):
        groups.setdefault((m.shape, m.dtype), []).append(i)
    results: list = [None] * len(matrices)
    for (shape, dtype), indices in groups.items():
        padding = -len(indices) % len(sharding.device_set)
        stack = jnp.stack([matrices[i] for i in indices] + [jnp.eye(shape[0], dtype=dtype)] * padding)
        damping = jnp.stack([dampings[i] for i in indices] + [jnp.ones_like(dampings[indices[0]])] * padding)
        out = fn(jax.lax.with_sharding_constraint(stack, sharding), damping)
        for j, i in enumerate(indices):
            results[i] = jax.tree.map(lambda x: x[j], out)
    return results


def scale_by_kfac(
    layers: kronecker.Layers,
    *,
    damping: float = 1e-3,
    damping_mode: str = "factored",
    approximation: str = "kronecker",
    ema_decay: float = 0.95,
    statistics_frequency: int = 1,
    inverse_frequency: int = 10,
    kl_clip: float | None = 1e-3,
    learning_rate: optax.ScalarOrSchedule | None = None,
    fisher: str = "true",
    seed: int = 0,
    inverse_sharding: jax.sharding.Sharding | None = None,
    adaptive_damping: bool = False,
    damping_adaptation_interval: int = 5,
    damping_adaptation_decay: float = 0.95,
    min_damping: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    """K-FAC preconditioning of the gradient (see the module docstring for the math).

    Args:
      layers: the capture found by :func:`optax_second_order.kronecker.find_layers` (plain JAX tags) or
        :func:`optax_second_order.flax.capture.find_layers` (Flax linen / NNX); built once.
      damping: Tikhonov damping ``lambda``.
      damping_mode: ``"factored"`` (with the pi-adjustment) or ``"exact"`` (eigenbasis solve); applies to
        ``approximation="kronecker"`` (EK-FAC always adds ``lambda`` to its eigenbasis diagonal).
      approximation: ``"kronecker"`` (K-FAC) or ``"eigenvalue_corrected"`` (EK-FAC, George et al. 2018).
      ema_decay: decay of the factors' moving averages.
      statistics_frequency: refresh the factors every this many steps.
      inverse_frequency: recompute the damped inverses (factored) or eigenbases (exact, EK-FAC) every this
        many steps.
      kl_clip: bound on ``lr^2 v^T F v`` (``None`` disables KL clipping).
      learning_rate: the learning rate the update will be scaled by (float or schedule), for KL clipping.
      fisher: ``"true"`` (targets sampled from the model) or ``"empirical"`` (the data's targets).
      seed: PRNG seed for the sampled targets.
      inverse_sharding: optional sharding of a stack of factors along its leading (layer) axis, e.g.
        ``NamedSharding(mesh, PartitionSpec("data"))``: the eigendecompositions are then spread over its
        devices instead of all running on each one. (The factors themselves are global-batch factors
        under ``jax.jit`` with a sharded batch without any option: XLA inserts the reductions.)
      adaptive_damping: adapt ``damping`` by the Levenberg-Marquardt rule (module docstring); ``damping``
        is then the initial value, and ``update`` also needs ``value_fn``.
      damping_adaptation_interval: adapt every this many steps (``T_1 = 5`` in the paper).
      damping_adaptation_decay: ``omega_1 = decay ** interval`` (``(19/20)^{T_1}`` in the paper).
      min_damping: the adapted damping never goes below this (K-FAC-JAX's default, ``1e-8``).

    ``update(grads, state, params, model_fn=..., loss=...)`` needs ``model_fn`` (params -> outputs, the
    same function ``find_layers`` traced, on the current batch) and ``loss``; with ``adaptive_damping`` also
    ``value_fn``.
    """
    frequencies = dict(
        statistics_frequency=statistics_frequency,
        inverse_frequency=inverse_frequency,
        damping_adaptation_interval=damping_adaptation_interval,
    )
    _validate(
        layers, damping, damping_mode, approximation, ema_decay, frequencies, kl_clip, learning_rate, fisher,
        adaptive_damping, damping_adaptation_decay,
    )
    omega = damping_adaptation_decay**damping_adaptation_interval
    corrected = approximation == "eigenvalue_corrected"
    factored = damping_mode == "factored" and not corrected  # else the preconditioners are eigenbases

    def init_fn(params):
        leaves, _ = _leaves_by_name(params)

        def identity(n, name):
            return jnp.eye(n, dtype=stat_dtype(leaves[name].dtype))

        def eigen_identity(n, name):
            return jnp.ones(n, stat_dtype(leaves[name].dtype)), identity(n, name)

        def identities():  # fresh arrays each call: a state sharing buffers cannot be donated
            return tuple((identity(l.input_dim, l.kernel), identity(l.output_dim, l.kernel)) for l in layers.layers)

        factors = identities()
        if factored:
            preconditioners = identities()
        else:
            preconditioners = tuple(
                (eigen_identity(l.input_dim, l.kernel), eigen_identity(l.output_dim, l.kernel)) for l in layers.layers
            )
        diagonal = tuple(jnp.ones(jnp.shape(leaves[name]), stat_dtype(leaves[name].dtype)) for name in layers.fallback)
        scales = tuple(jnp.ones((l.input_dim, l.output_dim), stat_dtype(leaves[l.kernel].dtype)) for l in layers.layers)

        def zero():
            return jnp.zeros([], jnp.int32)

        initial_damping = jnp.asarray(damping, jnp.result_type(float))
        return KFACState(
            zero(), jax.random.key(seed), factors, preconditioners, diagonal, zero(), zero(), initial_damping,
            scales if corrected else (), zero(),
        )

    def by_layer(mapping):
        return [mapping[l.name] for l in layers.layers]

    def eigenbases(preconditioners):
        return {l.name: (q_a, q_g) for l, ((_, q_a), (_, q_g)) in zip(layers.layers, preconditioners)}

    def batch_statistics(params, model_fn, loss, key, preconditioners):
        cotangent = kronecker.fisher_cotangent(loss, key if fisher == "true" else None)
        bases = eigenbases(preconditioners) if corrected else None
        return kronecker.kronecker_factors(model_fn, params, layers, cotangent, bases)

    def update_statistics(state, params, model_fn, loss, key):
        """EMAs of the factors, the fallback diagonal and (EK-FAC) the scales in the current eigenbases."""
        stats = batch_statistics(params, model_fn, loss, key, state.preconditioners)
        decay = jnp.minimum(1.0 - 1.0 / (state.num_statistics + 1), ema_decay)
        factors, bad = _ema_unless_nonfinite(state.factors, by_layer(stats.factors), decay, state.nonfinite)
        squares = [jnp.square(stats.fallback_grads[n].astype(d.dtype)) for n, d in zip(layers.fallback, state.diagonal)]
        diagonal, bad = _ema_unless_nonfinite(state.diagonal, squares, decay, bad)
        scale_decay = jnp.minimum(1.0 - 1.0 / (state.num_scales + 1), ema_decay)
        scales, bad = _ema_unless_nonfinite(state.scales, by_layer(stats.scales) if corrected else [], scale_decay, bad)
        return factors, diagonal, scales, state.num_statistics + 1, state.num_scales + 1, bad

    def refresh(factors, scales, num_scales, old, nonfinite, damping, params, model_fn, loss, key):
        """New preconditioners; EK-FAC restarts its scales from this batch in the new eigenbases."""
        preconditioners, bad = update_preconditioners(factors, old, nonfinite, damping)
        if not corrected:
            return preconditioners, scales, num_scales, bad
        stats = batch_statistics(params, model_fn, loss, key, preconditioners)
        scales, bad = _ema_unless_nonfinite(scales, by_layer(stats.scales), 0.0, bad)
        return preconditioners, scales, jnp.ones_like(num_scales), bad

    def update_preconditioners(factors, preconditioners, nonfinite, damping):
        matrices = [m for pair in factors for m in pair]
        if factored:
            dampings = []
            for a, g in factors:
                pi = jnp.sqrt((jnp.trace(a) / a.shape[0] + 1e-30) / (jnp.trace(g) / g.shape[0] + 1e-30))
                root = jnp.sqrt(damping).astype(a.dtype)
                dampings += [pi * root, root / pi]
            results = _spread(_damped_inverse, matrices, dampings, inverse_sharding)
        else:
            zeros = [jnp.zeros([], m.dtype) for m in matrices]
            results = _spread(lambda m, _: eigh_psd(m), matrices, zeros, inverse_sharding)
        new, bad = [], nonfinite
        for i, old in enumerate(preconditioners):
            preconditioner, was_bad = _keep_if_bad(old, (results[2 * i], results[2 * i + 1]))
            new.append(preconditioner)
            bad = bad + was_bad
        return tuple(new), bad

    def precondition_layer(v, preconditioner, scale, damping):
        if factored:
            inverse_a, inverse_g = preconditioner
            return inverse_a @ v.astype(inverse_a.dtype) @ inverse_g
        (a, q_a), (g, q_g) = preconditioner
        diagonal = scale if corrected else jnp.outer(a, g)  # the Fisher block's diagonal in the eigenbasis
        rotated = q_a.T @ v.astype(q_a.dtype) @ q_g
        return q_a @ (rotated / (diagonal + damping.astype(a.dtype))) @ q_g.T

    def natural_gradient(grads, preconditioners, scales, diagonal, damping):
        """``v = F~^{-1} grad`` per layer (Kronecker) and per fallback parameter (diagonal)."""
        leaves, treedef = _leaves_by_name(grads)
        out = dict(leaves)
        for layer, preconditioner, scale in zip(layers.layers, preconditioners, scales or (None,) * len(preconditioners)):
            bias = leaves[layer.bias] if layer.bias else None
            matrix = kronecker.kernel_matrix(layer, leaves[layer.kernel], bias)
            v = precondition_layer(matrix, preconditioner, scale, damping)
            out[layer.kernel], bias = kronecker.split_kernel_matrix(layer, v)
            if layer.bias:
                out[layer.bias] = bias
        for name, d in zip(layers.fallback, diagonal):
            out[name] = leaves[name].astype(d.dtype) / (d + damping.astype(d.dtype))
        flat = [out[jax.tree_util.keystr(path)] for path, _ in jax.tree_util.tree_flatten_with_path(grads)[0]]
        return jax.tree_util.tree_unflatten(treedef, flat)

    def rate(count):
        return learning_rate(count) if callable(learning_rate) else learning_rate

    def kl_scale(v, grads, count):
        """``min(1, sqrt(kl_clip / (lr^2 v^T F~ v)))`` with ``v^T F~ v = v . grad`` since ``F~ v = grad``."""
        return jnp.minimum(1.0, jnp.sqrt(kl_clip / (jnp.square(rate(count)) * jnp.maximum(_dot(v, grads), 0.0) + 1e-30)))

    def levenberg_marquardt(damping, v, grads, params, count, value_fn, model_fn, loss):
        """The damping after the reduction-ratio test of the step ``delta = -lr v`` (section 6.5)."""
        delta = jax.tree.map(lambda x, p: (-rate(count) * x).astype(p.dtype), v, params)
        actual = value_fn(optax.apply_updates(params, delta)) - value_fn(params)
        curvature = gnvp_quadratic_form(model_fn, loss, params, delta) + damping * _dot(delta, delta)
        predicted = _dot(grads, delta) + 0.5 * curvature
        rho = jnp.where(jnp.isfinite(actual), actual / predicted, -jnp.inf)
        new = jnp.where(rho > 0.75, damping * omega, jnp.where(rho < 0.25, damping / omega, damping))
        return jnp.maximum(new, min_damping).astype(damping.dtype)

    def update_fn(updates, state, params=None, **extra):
        params = require_params(params, NAME)
        model_fn = extra_arg(extra, "model_fn", NAME)
        loss = extra_arg(extra, "loss", NAME)
        value_fn = extra_arg(extra, "value_fn", NAME) if adaptive_damping else None
        damping_now = state.damping if adaptive_damping else jnp.asarray(damping, state.damping.dtype)
        key, stats_key = jax.random.split(state.key)

        factors, diagonal, scales, num_statistics, num_scales, nonfinite = jax.lax.cond(
            is_refresh_step(state.count, statistics_frequency),
            lambda: update_statistics(state, params, model_fn, loss, stats_key),
            lambda: (state.factors, state.diagonal, state.scales, state.num_statistics, state.num_scales, state.nonfinite),
        )
        preconditioners, scales, num_scales, nonfinite = jax.lax.cond(
            is_refresh_step(state.count, inverse_frequency),
            lambda: refresh(
                factors, scales, num_scales, state.preconditioners, nonfinite, damping_now, params, model_fn, loss, stats_key
            ),
            lambda: (state.preconditioners, scales, num_scales, nonfinite),
        )
        v = natural_gradient(updates, preconditioners, scales, diagonal, damping_now)
        if kl_clip is not None:
            nu = kl_scale(v, updates, state.count)
            v = jax.tree.map(lambda x: nu * x, v)
        new_damping = damping_now
        if adaptive_damping:
            new_damping = jax.lax.cond(
                is_refresh_step(state.count + 1, damping_adaptation_interval),
                lambda: levenberg_marquardt(damping_now, v, updates, params, state.count, value_fn, model_fn, loss),
                lambda: damping_now,
            )
        updates = jax.tree.map(lambda x, g: x.astype(g.dtype), v, updates)
        new_state = KFACState(
            state.count + 1, key, factors, preconditioners, diagonal, num_statistics, nonfinite, new_damping, scales, num_scales
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
