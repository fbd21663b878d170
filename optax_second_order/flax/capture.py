"""Layer capture for unmodified Flax models: linen ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Conv``, ``nn.Embed``,
``nn.LayerNorm`` / ``nn.RMSNorm`` (and their subclasses), NNX ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Conv``
(and theirs).

Nothing happens outside a capture (:func:`~optax_second_order.curvature.capture.find_layers` once, then each
statistics pass of K-FAC), which runs in its own :class:`contextvars.ContextVar` context, so two models traced in two
threads stay apart.

* linen: :func:`find_layers` stores :func:`linen_capture` in the :class:`~optax_second_order.curvature.capture.Layers`
  it returns, and every capturing trace enters it: ``flax.linen.intercept_methods`` (Flax's own, thread-local
  method interception) sees each call of the original ``__call__`` of ``nn.Dense``, ``nn.DenseGeneral`` and
  ``nn.Conv`` -- also when a subclass inherits it or calls it through ``super().__call__`` -- runs it unchanged
  and tags it with its input, output, ``kernel`` and ``bias`` (``module.get_variable("params", ...)``, the very
  arrays of the ``params`` given to ``apply``). ``nn.Embed`` is tagged as an embedding
  (:func:`~optax_second_order.kronecker.embed`: its ids and table); ``nn.LayerNorm`` / ``nn.RMSNorm`` with a
  scale, normalizing over the last axis only (the default; no ``axis_name``, no ``mask``) as a scale-and-shift
  layer whose input is the normalized ``x``, recomputed here as Flax computes it (mean and variance over the last
  axis in float32 or better, ``use_fast_variance`` honoured, ``(x - mean) / sqrt(var + epsilon)``; RMSNorm
  without the mean). Other normalizations (other axes, ``use_scale=False``, ``nn.GroupNorm``, ``nn.BatchNorm``)
  fall back.
* linen ``nn.scan``: Flax's lifted scan (``flax.core.axes_scan``) runs ``jax.lax.scan`` on the scanned variable
  collections, the very leaves of ``params`` (``(L, ...)``), so a Dense inside sees a slice of them as its kernel.
  For the duration of a capture, :func:`linen_capture` has that module's ``lax.scan`` be
  :func:`~optax_second_order.curvature.capture.scan` (the one module attribute swapped, under a lock, and restored
  when the last capture ends; ``jax.lax.scan`` itself is untouched, and in any thread not capturing the swapped
  name is exactly ``jax.lax.scan``): the scanned Dense / Conv layers are then stacked layers, one per iteration.
  This relies on Flax calling ``lax.scan`` through that module attribute (flax 0.8 to 0.12 do); where it does
  not, the scanned layers fall back to the diagonal, as they did before.
* NNX has no method interception, so capture is opt-in per model copy: :func:`tag_layers` marks the layers of
  the module that ``model_fn`` builds with ``nnx.merge`` (a copy of the model used once), by giving each
  ``nnx.Linear`` / ``nnx.LinearGeneral`` its own ``dot_general`` and each ``nnx.Conv`` its own
  ``conv_general_dilated`` that records the layer. Only the instances of that copy change, and only while a
  capture runs: elsewhere :func:`tag_layers` returns the module untouched. :func:`~optax_second_order.flax.nnx_extra_args`
  builds such a ``model_fn``; by hand::

      def model_fn(params):
          return oso.flax.tag_layers(nnx.merge(graphdef, params, rest))(x)

  Since the product itself is intercepted, subclasses that call the base ``__call__`` are captured, and so are
  convolutions with ``"CIRCULAR"``, ``"REFLECT"`` or ``"CAUSAL"`` padding (the base pads the input first).

``nn.DenseGeneral`` / ``nnx.LinearGeneral`` is captured where it is a matrix: no batch axes and contracted axes
``axis`` that are the trailing axes of the input, in order (``-1``, ``(-2, -1)``, ...). Its kernel
``(*in_shape, *features)`` is then the dense layer ``W = kernel.reshape(prod(in_shape), prod(features))`` on
the flattened trailing input axes (:func:`~optax_second_order.kronecker.tag_layer` with
``output_ndim = len(features)``).

A layer is captured when its kernel is a leaf of the parameters ``model_fn`` receives: in linen
``model_fn = lambda p: module.apply({"params": p}, x)``, in NNX as above. Not captured, so preconditioned by the
diagonal fallback: convolutions with ``feature_group_count > 1`` or a ``mask`` (and, in linen,
``"CIRCULAR"`` / ``"CAUSAL"`` padding); ``DenseGeneral`` / ``LinearGeneral`` with batch axes or contracted axes
that are not the trailing ones, or (NNX) a ``dot_general_cls``; NNX's embeddings and normalization layers (no
product to intercept: tag them with :func:`~optax_second_order.kronecker.embed` /
:func:`~optax_second_order.kronecker.scale_and_shift` in a model of one's own), ``Einsum``, and any other
parameter. A table also used by ``nn.Embed.attend`` (tied output weights) keeps its embedding block, whose
statistics see only the lookups.

Usage::

    layers = oso.flax.find_layers(lambda p: model.apply({"params": p}, x), params)
    print(layers.summary())
    tx = oso.kfac(1e-2, layers)
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import threading

from flax import nnx
from flax.core import axes_scan

from optax_second_order.curvature import capture as _capture
from optax_second_order.curvature.capture import ConvConfig, Layers

__all__ = ["find_layers", "tag_layers", "linen_capture"]

PyTree = Any

_LINEN_CALLS = tuple(cls.__call__.__wrapped__ for cls in (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Embed, nn.LayerNorm,
                                                            nn.RMSNorm))


def find_layers(model_fn: Callable[[PyTree], Any], params: PyTree) -> Layers:
    """The Flax (or tagged) dense and conv layers ``model_fn(params)`` calls, and the parameters that fall back.

    :func:`optax_second_order.kronecker.find_layers` with :func:`linen_capture`; an NNX ``model_fn`` marks its
    model copy with :func:`tag_layers`. Raises a ``ValueError`` when no layer is found.
    """
    layers = _capture.find_layers(model_fn, params, capture=linen_capture)
    if not layers.layers and not layers.blocks:
        raise ValueError(
            "find_layers: model_fn calls no dense or conv layer that can be captured. A linen model_fn is "
            "`lambda p: module.apply({'params': p}, x)` with the same `p` the optimizer gets; an NNX model_fn must "
            "mark its copy of the model: `lambda p: oso.flax.tag_layers(nnx.merge(graphdef, p, rest))(x)` (or use "
            "oso.flax.nnx_extra_args); plain JAX code tags its layers with oso.kronecker.dense / conv."
        )
    return layers


def _as_tuple(v: int | Sequence[int]) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, Sequence) else (v,)


def _dense_output_ndim(module: Any, x: Any) -> int | None:
    """``len(features)`` of a dense layer that is a matrix on the trailing axes of ``x``, else ``None``.

    ``nn.Dense`` / ``nnx.Linear``: 1. ``nn.DenseGeneral`` / ``nnx.LinearGeneral``: ``len(features)`` when it
    has no batch axes and contracts the trailing axes of ``x`` in order, so its kernel
    ``(*x.shape[-len(axis):], *features)`` is the matrix ``(prod(in_shape), prod(features))``.
    """
    if isinstance(module, (nn.Dense, nnx.Linear)):
        return 1
    if isinstance(module, nn.DenseGeneral):
        features, axis, batch = module.features, module.axis, module.batch_dims
    else:
        features, axis, batch = module.out_features, module.axis, module.batch_axis
    axis = tuple(a % x.ndim for a in _as_tuple(axis))
    trailing = axis == tuple(range(x.ndim - len(axis), x.ndim))
    return len(_as_tuple(features)) if trailing and not batch else None


def _tag_dense(module: Any, y, x, kernel, bias):
    output_ndim = _dense_output_ndim(module, x)
    return y if output_ndim is None else _capture.tag_layer("dense", y, x, kernel, bias, output_ndim=output_ndim)


# --- linen: Flax's method interception -------------------------------------------------------------


def _linen_conv_config(module: nn.Conv) -> ConvConfig | None:
    """The conv's :class:`~optax_second_order.kronecker.ConvConfig`, or ``None`` if it cannot be captured."""
    padding = module.padding
    if isinstance(padding, str) and padding.upper() not in ("SAME", "VALID"):
        return None
    if module.feature_group_count != 1 or module.mask is not None:
        return None
    return ConvConfig.make(
        len(module.kernel_size), module.strides or 1, padding, module.input_dilation or 1, module.kernel_dilation or 1
    )


def _normalized_input(module: nn.LayerNorm | nn.RMSNorm, x: jax.Array) -> jax.Array | None:
    """``x_hat``, the input of a linen LayerNorm's (RMSNorm's) scale-and-shift: ``(x - mean) / sqrt(var + eps)``
    over the last axis as Flax computes it; ``None`` where it is not captured (module docstring)."""
    last = (x.ndim - 1,)
    axes = [tuple(a % x.ndim for a in _as_tuple(v)) for v in (module.reduction_axes, module.feature_axes)]
    if not module.use_scale or axes != [last, last] or module.axis_name is not None:
        return None
    dtype = jnp.promote_types(module.dtype or x.dtype, jnp.float32) if module.force_float32_reductions else x.dtype
    x = x.astype(dtype)
    if isinstance(module, nn.RMSNorm):
        mean, var = 0.0, jnp.mean(jnp.square(x), -1, keepdims=True)
    elif module.use_fast_variance:
        mean = jnp.mean(x, -1, keepdims=True)
        var = jnp.maximum(0.0, jnp.mean(jnp.square(x), -1, keepdims=True) - jnp.square(mean))
    else:
        mean = jnp.mean(x, -1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + module.epsilon)


def _tag_linen_block(module, y, args, kwargs):
    """Tag a linen ``nn.Embed`` or ``nn.LayerNorm`` / ``nn.RMSNorm`` call (module docstring)."""
    if isinstance(module, nn.Embed):
        return _capture.tag_layer("embed", y, args[0] if args else kwargs["inputs"],
                                  module.get_variable("params", "embedding"))
    x_hat = None if kwargs.get("mask") is not None else _normalized_input(module, args[0] if args else kwargs["x"])
    if x_hat is None:
        return y
    shift = module.get_variable("params", "bias") if isinstance(module, nn.LayerNorm) and module.use_bias else None
    return _capture.tag_layer("scale_and_shift", y, x_hat, module.get_variable("params", "scale"), shift)


def _linen_interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__" or getattr(context.orig_method, "func", None) not in _LINEN_CALLS:
        return next_fun(*args, **kwargs)
    module = context.module
    if isinstance(module, (nn.Embed, nn.LayerNorm, nn.RMSNorm)):
        return _tag_linen_block(module, next_fun(*args, **kwargs), args, kwargs)
    x = args[0] if args else kwargs["inputs"]
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    y = next_fun(*args, **kwargs)
    if isinstance(module, nn.Conv):
        config = _linen_conv_config(module)
        return y if config is None else _capture.tag_layer("conv", y, x, kernel, bias, config)
    return _tag_dense(module, y, x, kernel, bias)


class _LaxWithCapturingScan:
    """``jax.lax`` as Flax's lifted scan sees it during a capture: ``scan`` is the capture's own."""

    scan = staticmethod(_capture.scan)

    def __init__(self, lax):
        self._lax = lax

    def __getattr__(self, name):
        return getattr(self._lax, name)


_SWAP_LOCK = threading.Lock()
_SWAP = {"captures": 0, "lax": None}  # captures running (any thread), and the lifted scan's own ``lax``


@contextlib.contextmanager
def _lifted_scan_captured():
    """Flax's lifted scan runs :func:`~optax_second_order.curvature.capture.scan` while a capture is running."""
    with _SWAP_LOCK:
        if _SWAP["captures"] == 0 and hasattr(axes_scan, "lax"):
            _SWAP["lax"] = axes_scan.lax
            axes_scan.lax = _LaxWithCapturingScan(axes_scan.lax)
        _SWAP["captures"] += 1
    try:
        yield
    finally:
        with _SWAP_LOCK:
            _SWAP["captures"] -= 1
            if _SWAP["captures"] == 0 and _SWAP["lax"] is not None:
                axes_scan.lax, _SWAP["lax"] = _SWAP["lax"], None


@contextlib.contextmanager
def linen_capture():
    """Context in which calls of linen ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Conv`` are tagged, also inside
    ``nn.scan`` (module docstring)."""
    with nn.intercept_methods(_linen_interceptor), _lifted_scan_captured():
        yield


# --- NNX: per-instance products on the copy model_fn merges ---------------------------------------


def _variable(module: Any, name: str):
    variable = getattr(module, name, None)
    return None if variable is None else variable.get_value()


def _tagging_dot_general(module: nnx.Module, original: Callable) -> Callable:
    def dot_general(inputs, kernel, *args, **kwargs):
        y = original(inputs, kernel, *args, **kwargs)
        return _tag_dense(module, y, inputs, _variable(module, "kernel"), _variable(module, "bias"))

    dot_general.oso_original = original
    return dot_general


def _tagging_conv(module: nnx.Conv, original: Callable) -> Callable:
    def conv_general_dilated(inputs, kernel, strides, padding, *args, **kwargs):
        y = original(inputs, kernel, strides, padding, *args, **kwargs)
        if kwargs.get("feature_group_count", 1) != 1 or module.mask is not None or args:
            return y
        ndim = kernel.ndim - 2
        config = ConvConfig.make(
            ndim, strides, padding, kwargs.get("lhs_dilation") or 1, kwargs.get("rhs_dilation") or 1
        )
        return _capture.tag_layer("conv", y, inputs, _variable(module, "kernel"), _variable(module, "bias"), config)

    conv_general_dilated.oso_original = original
    return conv_general_dilated


def _tag_nnx_layer(module: Any) -> None:
    if isinstance(module, nnx.Conv):
        if not hasattr(module.conv_general_dilated, "oso_original"):
            module.conv_general_dilated = _tagging_conv(module, module.conv_general_dilated)
    elif isinstance(module, nnx.Linear) or (isinstance(module, nnx.LinearGeneral) and module.dot_general_cls is None):
        current = module.dot_general or jax.lax.dot_general
        if not hasattr(current, "oso_original"):
            module.dot_general = _tagging_dot_general(module, current)


def tag_layers(module: nnx.Module) -> nnx.Module:
    """Mark the ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Conv`` layers of ``module`` for capture; return it.

    Call it on the copy ``model_fn`` builds, ``tag_layers(nnx.merge(graphdef, params, rest))(x)``: while a capture
    traces ``model_fn`` each such layer gets its own product function that records the call; at any other time
    the module is returned untouched (so the copy runs exactly as the model does).
    """
    if _capture.capturing():
        for _, node in nnx.iter_graph(module):
            _tag_nnx_layer(node)
    return module
