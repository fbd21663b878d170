"""K-FAC layer capture for unmodified Flax models: linen ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Conv``, NNX
``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Conv``.

Importing this module registers two hooks with :func:`optax_second_order.kronecker.register_capture_hook`;
they are active only while :func:`~optax_second_order.kronecker.find_layers` or
:func:`~optax_second_order.kronecker.kronecker_factors` traces ``model_fn``, so a model runs untouched
everywhere else.

* linen: ``flax.linen.intercept_methods`` intercepts ``__call__`` of every ``nn.Dense``, ``nn.DenseGeneral``
  and ``nn.Conv``; the interceptor runs the layer unchanged and passes its input, output, ``kernel`` and ``bias``
  (``module.get_variable("params", ...)``, the very arrays of the ``params`` given to ``apply``) to
  :func:`~optax_second_order.kronecker.tag_layer`.
* NNX has no method interception, so for the duration of the trace ``__call__`` of ``nnx.Linear``,
  ``nnx.LinearGeneral`` and ``nnx.Conv`` is wrapped the same way (the class attributes are restored afterwards).

``nn.DenseGeneral`` / ``nnx.LinearGeneral`` is captured where it is a matrix: no batch axes and contracted axes
``axis`` that are the trailing axes of the input, in order (``-1``, ``(-2, -1)``, ...). Its kernel
``(*in_shape, *features)`` is then the dense layer ``W = kernel.reshape(prod(in_shape), prod(features))`` on
the flattened trailing input axes (:func:`~optax_second_order.kronecker.tag_layer` with
``output_ndim = len(features)``).

A layer is captured when its kernel is a leaf of the parameters ``model_fn`` receives: in linen
``model_fn = lambda p: module.apply(p, x)``, in NNX ``model_fn = lambda p: nnx.merge(graphdef, p, rest)(x)``
(or ``nnx.call``). Not captured, so preconditioned by K-FAC's diagonal fallback: convolutions with
``feature_group_count > 1``, a ``mask``, or ``"CIRCULAR"`` / ``"CAUSAL"`` padding; ``nn.DenseGeneral`` /
``nnx.LinearGeneral`` with ``batch_dims`` / ``batch_axis`` or contracted axes that are not the trailing ones;
``nn.Embed`` / ``nnx.Embed``, ``nn.Einsum`` / ``nnx.Einsum``, normalization layers and any other parameter.

Usage::

    layers = oso.flax.find_layers(lambda p: model.apply(p, x), params)
    print(layers.summary())
    tx = oso.kfac(1e-2, layers)
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import flax.linen as nn
from flax import nnx

from optax_second_order.curvature import kronecker
from optax_second_order.curvature.kronecker import find_layers

__all__ = ["find_layers", "linen_capture", "nnx_capture"]


def _conv_config(module: Any) -> kronecker.ConvConfig | None:
    """The layer's :class:`~optax_second_order.kronecker.ConvConfig`, or ``None`` if K-FAC cannot capture it."""
    padding = module.padding
    if isinstance(padding, str) and padding.upper() not in ("SAME", "VALID"):
        return None
    if module.feature_group_count != 1 or module.mask is not None:
        return None
    return kronecker.ConvConfig.make(
        len(module.kernel_size),
        module.strides or 1,
        padding,
        module.input_dilation or 1,
        module.kernel_dilation or 1,
    )


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


def _tag(module: Any, call: Callable[[], Any], x: Any, kernel: Any, bias: Any) -> Any:
    """Run the layer and tag it as dense or conv (or leave it untagged if unsupported)."""
    y = call()
    if isinstance(module, (nn.Conv, nnx.Conv)):
        config = _conv_config(module)
        return y if config is None else kronecker.tag_layer("conv", y, x, kernel, bias, config)
    output_ndim = _dense_output_ndim(module, x)
    return y if output_ndim is None else kronecker.tag_layer("dense", y, x, kernel, bias, output_ndim=output_ndim)


def _linen_interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or type(module) not in (nn.Dense, nn.DenseGeneral, nn.Conv):
        return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    return _tag(module, lambda: next_fun(*args, **kwargs), x, kernel, bias)


def linen_capture() -> contextlib.AbstractContextManager:
    """Context in which linen ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Conv`` calls are tagged."""
    return nn.intercept_methods(_linen_interceptor)


def _wrap_nnx_call(original: Callable) -> Callable:
    def __call__(self, inputs, *args, **kwargs):
        bias = self.bias.get_value() if self.bias is not None else None
        return _tag(self, lambda: original(self, inputs, *args, **kwargs), inputs, self.kernel.get_value(), bias)

    return __call__


@contextlib.contextmanager
def nnx_capture():
    """Context in which ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Conv`` calls are tagged (``__call__`` wrapped)."""
    originals = {cls: cls.__dict__["__call__"] for cls in (nnx.Linear, nnx.LinearGeneral, nnx.Conv)}
    try:
        for cls, original in originals.items():
            cls.__call__ = _wrap_nnx_call(original)
        yield
    finally:
        for cls, original in originals.items():
            cls.__call__ = original


kronecker.register_capture_hook(linen_capture)
kronecker.register_capture_hook(nnx_capture)
