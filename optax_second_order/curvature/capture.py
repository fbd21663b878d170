"""Layer capture: which dense and convolutional layers a forward function calls, and their inputs and outputs.

Methods that keep curvature per layer (K-FAC, EK-FAC, K-BFGS) need, for every dense or convolutional layer
``s = W^T a`` of ``model_fn(params)``, the layer's input ``a`` and the gradient of the loss with respect to its
output ``s``; K-FAC also has blocks for embeddings (:func:`embed`) and scale-and-shift layers
(:func:`scale_and_shift`), kept apart in :attr:`Layers.blocks`. This module finds them without JAX internals:

* A forward function marks a layer by calling :func:`dense` / :func:`conv` / :func:`embed` /
  :func:`scale_and_shift` (or :func:`tag_layer` on a layer it computed itself); :mod:`optax_second_order.flax`
  marks unmodified Flax layers. Outside a capture a tag does nothing but return the layer's output.
* A capture (:func:`find_layers` once, then :func:`trace_calls` inside each statistics pass) sets a recorder in a
  :class:`contextvars.ContextVar` for the duration of one trace of ``model_fn``, so two models traced at the same
  time in two threads (each thread has its own context) never see each other's layers. While it is set, a tag
  records the call and adds a perturbation (zero) to the layer's output, so that ``d L / d perturbation = d L / d s``
  comes out of the same backward pass.
* A layer is identified by the parameter leaf its ``kernel`` is: its position in ``jax.tree.leaves(params)`` (and
  its path, for display). The recorder knows the leaves of the ``params`` it traces ``model_fn`` with, and a tag
  looks its kernel up among them by identity (the tracers of one trace are distinct objects, kept alive by the
  recorder for the whole trace). So ``kernel`` must be that leaf itself, not a cast or reshaped copy; an array
  that is no leaf (a constant) is not a layer. Positions, not path strings, are what optimizer states use: the
  same parameters seen as an ``nnx.State`` of variables (paths ending in ``.value``) and as the pure dictionaries
  ``nnx.Optimizer`` passes to ``update`` have the same leaves in the same order.

Tags work under ``jit``, ``grad`` and ``vmap`` of the whole forward function. Inside a loop body the tracers cannot
leave the body, so a stack of layers under a scan is run with :func:`scan`, the drop-in ``jax.lax.scan`` that
carries the capture through the body:

* before the loop it finds the leaves of ``xs`` that are parameter leaves (by identity, as a tag finds a kernel):
  the *stacked* parameters, ``(L, *shape)``, whose slice ``l`` is layer ``l``'s parameter;
* the body runs with a recorder of its own, which knows those slices: a tag whose kernel is one of them is layer
  ``l`` of a *stacked* :class:`Layer` (``stack = L``, ``kernel_shape`` the slice's shape, ``kernel_index`` the
  stacked leaf's position);
* the body returns the tagged layers' inputs as extra scanned outputs, ``(L, *input_shape)``, and takes their
  perturbations as extra scanned inputs, ``(L, *output_shape)``, so the gradient of a perturbation is every layer's
  ``dL/ds`` at once; the outer recorder gets one :class:`LayerCall` per tag of the body with these stacked arrays.

The program and its compile time stay those of the loop: nothing is unrolled. Not captured (the parameters fall
back): a tag in the body whose kernel is not a slice of ``xs`` (a parameter closed over and shared by every
iteration), tags in a scan nested in a scanned body, and tags in ``lax.cond`` / ``lax.while_loop`` bodies.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Callable, ContextManager, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp

__all__ = [
    "ConvConfig",
    "Layer",
    "Layers",
    "LayerCall",
    "dense",
    "conv",
    "embed",
    "scale_and_shift",
    "tag_layer",
    "capturing",
    "scan",
    "find_layers",
    "trace_calls",
]

PyTree = Any
CaptureContext = Callable[[], ContextManager]
KRONECKER_KINDS = ("dense", "conv")  # layers in the factor bank (K-FAC, EK-FAC, K-BFGS)
BLOCK_KINDS = ("embed", "scale_and_shift")  # K-FAC's other curvature blocks (Layers.blocks)


@dataclasses.dataclass(frozen=True)
class ConvConfig:
    """A channels-last convolution: ``x (N, *spatial, C_in)``, kernel ``(*window, C_in, C_out)``."""

    strides: tuple[int, ...]
    padding: str | tuple[tuple[int, int], ...]
    input_dilation: tuple[int, ...]
    kernel_dilation: tuple[int, ...]

    @classmethod
    def make(cls, ndim: int, strides=1, padding="SAME", input_dilation=1, kernel_dilation=1) -> "ConvConfig":
        """Canonical form: ints broadcast to every spatial axis, int padding to ``(p, p)`` pairs."""

        def per_axis(v):
            return (int(v),) * ndim if isinstance(v, int) else tuple(int(i) for i in v)

        if isinstance(padding, str):
            padding = padding.upper()
        elif isinstance(padding, int):
            padding = ((padding, padding),) * ndim
        else:
            padding = tuple((p, p) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in padding)
        return cls(per_axis(strides), padding, per_axis(input_dilation), per_axis(kernel_dilation))

    def dimension_numbers(self) -> tuple[str, str, str]:
        spatial = "DHW"[3 - len(self.strides):] if len(self.strides) <= 3 else None
        if spatial is None:
            raise ValueError("conv: at most 3 spatial dimensions are supported")
        return ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")


@dataclasses.dataclass(frozen=True)
class Layer:
    """A captured layer: its kind, its parameters (paths for display, leaf positions for access) and kernel shape.

    ``output_ndim``: how many trailing kernel axes are output features (a dense kernel
    ``(*in_shape, *out_shape)`` with several of either, as Flax's ``DenseGeneral`` has, is the matrix
    ``(prod(in_shape), prod(out_shape))``; a conv's is always 1). ``kernel_index`` / ``bias_index``: the positions
    of the kernel and bias in ``jax.tree.leaves(params)``. ``stack``: for the layers of a stack run by :func:`scan`,
    their number ``L``: the kernel leaf is ``(L, *kernel_shape)`` (the bias ``(L, *out_shape)``) and each layer has
    its own ``kernel_shape`` kernel; ``None`` for a single layer.

    ``kind`` is ``"dense"`` or ``"conv"`` (Kronecker-factored layers), ``"embed"`` (``kernel`` the table
    ``(vocabulary, features)``, no bias) or ``"scale_and_shift"`` (``kernel`` the scale, ``bias`` the shift, both
    the shape of the trailing ``output_ndim`` input axes).
    """

    kind: str
    kernel: str
    bias: str | None
    kernel_shape: tuple[int, ...]
    output_ndim: int = 1
    kernel_index: int = -1
    bias_index: int | None = None
    stack: int | None = None

    @property
    def name(self) -> str:
        return self.kernel

    @property
    def leaf_shape(self) -> tuple[int, ...]:
        """The kernel leaf's shape: ``kernel_shape``, after the layer axis ``(stack,)`` for a stacked layer."""
        return self.kernel_shape if self.stack is None else (self.stack, *self.kernel_shape)

    def one_layer(self) -> "Layer":
        """The layer as one of its stack (``stack=None``): what each of a stacked layer's ``L`` layers is."""
        return dataclasses.replace(self, stack=None)

    @property
    def fan_in(self) -> int:
        """The kernel's input size: ``prod(in_shape)`` for a dense layer, the patch size for a conv."""
        return math.prod(self.kernel_shape[: -self.output_ndim])

    @property
    def input_dim(self) -> int:
        """``d_in`` of ``A``: fan-in plus one for the bias."""
        return self.fan_in + (self.bias is not None)

    @property
    def output_dim(self) -> int:
        """``d_out`` of ``G``: the number of output features, ``prod(out_shape)``."""
        return math.prod(self.kernel_shape[-self.output_ndim:])


@dataclasses.dataclass(frozen=True)
class Layers:
    """What a capture found: the layers preconditioned per layer and the parameters that fall back.

    Attributes:
      layers: the captured layers, in the order of their first call.
      fallback: paths of the parameters no layer covers (preconditioned by a diagonal method).
      fallback_indices: their positions in ``jax.tree.leaves(params)``.
      num_leaves: the number of leaves of the parameters ``find_layers`` traced.
      leaves: their shapes and dtypes (what an optimizer needs to build its state when it is handed a masked
        tree, as ``optax.masked`` does).
      capture: the context (e.g. Flax's method interception) entered around every capturing trace of
        ``model_fn``; ``None`` for plain-JAX tags. Not part of equality.
      blocks: the captured embeddings and scale-and-shift layers (kinds ``"embed"`` / ``"scale_and_shift"``), which
        K-FAC preconditions with blocks of their own; a method that has none moves them to the fallback
        (:meth:`without_blocks`).
    """

    layers: tuple[Layer, ...]
    fallback: tuple[str, ...]
    fallback_indices: tuple[int, ...] = ()
    num_leaves: int = 0
    leaves: tuple[jax.ShapeDtypeStruct, ...] = dataclasses.field(default=(), compare=False)
    capture: CaptureContext | None = dataclasses.field(default=None, compare=False)
    blocks: tuple[Layer, ...] = ()

    def summary(self) -> str:
        """A printable table: the block each parameter got (Kronecker, embedding, scale-and-shift, or diagonal)."""
        lines = [f"capture: {len(self.layers) + len(self.blocks)} layers preconditioned, "
                 f"{len(self.fallback)} params fall back"]
        for layer in self.layers + self.blocks:
            bias = f" + {layer.bias}" if layer.bias else ""
            stack = "" if layer.stack is None else f"  stacked: {layer.stack} layers, each"
            lines.append(f"  {layer.kind:5s} {layer.kernel}{bias}{stack}  {_block_shape(layer)}")
        lines.extend(f"  diagonal {name}" for name in self.fallback)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def without_blocks(self) -> "Layers":
        """These layers with the embeddings' and scale-and-shift layers' parameters moved to the fallback, for a
        method that has no such blocks (K-BFGS)."""
        return self._fall_back(list(self.blocks))

    def _fall_back(self, moved: Sequence[Layer]) -> "Layers":
        """``moved`` (some of ``layers`` and ``blocks``) taken out, their parameters added to the fallback."""
        if not moved:
            return self
        paths = dict(zip(self.fallback_indices, self.fallback))
        for l in moved:
            paths[l.kernel_index] = l.kernel
            if l.bias_index is not None:
                paths[l.bias_index] = l.bias
        fallback = sorted(paths)
        return dataclasses.replace(self, layers=tuple(l for l in self.layers if l not in moved),
                                   blocks=tuple(l for l in self.blocks if l not in moved),
                                   fallback=tuple(paths[i] for i in fallback), fallback_indices=tuple(fallback))

    def check_params(self, params: PyTree, where: str) -> list[Any]:
        """The leaves of ``params``, or a ``ValueError`` if they are not the parameters the layers were found on."""
        leaves = jax.tree.leaves(params)
        if len(leaves) != self.num_leaves:
            raise ValueError(
                f"{where}: params have {len(leaves)} leaves but the layers were found on parameters with "
                f"{self.num_leaves}; find_layers and the optimizer must see the same parameters (for example both the "
                "linen `params` collection, not one of them the {'params': ...} variables dict)"
            )
        for layer in self.layers + self.blocks:
            shape = tuple(jnp.shape(leaves[layer.kernel_index]))
            if shape != layer.leaf_shape:
                raise ValueError(
                    f"{where}: leaf {layer.kernel_index} of params has shape {shape}, but the layer found there "
                    f"({layer.kernel}) has kernel shape {layer.leaf_shape}; find_layers and the optimizer must see "
                    "the same parameters"
                )
        return leaves


def _block_shape(layer: Layer) -> str:
    """What :meth:`Layers.summary` says of a layer's block."""
    if layer.kind == "embed":
        return f"A diagonal {layer.input_dim} (token frequencies), G {layer.output_dim}x{layer.output_dim}"
    if layer.kind == "scale_and_shift":
        return f"exact Fisher diagonal, {layer.output_dim} features"
    return f"A {layer.input_dim}x{layer.input_dim}, G {layer.output_dim}x{layer.output_dim}"


class LayerCall(NamedTuple):
    """One recorded call of a layer: the layer, its input ``x`` as passed, its conv config and output shape (for a
    stacked layer's call under :func:`scan`: every layer's input and output, stacked on a leading layer axis)."""

    layer: Layer
    inputs: jax.Array | None
    config: ConvConfig | None
    output: jax.ShapeDtypeStruct


class _Recorder:
    """Collects the tagged calls of one trace of ``model_fn`` (and perturbs their outputs, if given).

    In the body of a :func:`scan`, ``leaves`` are the slices of the stacked parameters, ``indices`` their
    parameter leaves' positions and ``stack`` the number of layers.
    """

    def __init__(self, paths: Sequence[str], leaves: Sequence[Any], perturbations: Sequence[jax.Array] | None,
                 indices: Sequence[int] | None = None, stack: int | None = None):
        self.paths = list(paths)
        self.leaves = list(leaves)  # keeps the traced leaves alive, so their ids are unique for the whole trace
        indices = range(len(self.leaves)) if indices is None else indices
        self.positions = {id(leaf): i for leaf, i in zip(self.leaves, indices)}
        self.perturbations = perturbations
        self.stack = stack
        self.calls: list[LayerCall] = []

    def layer(self, kind, kernel, bias, output_ndim) -> Layer | None:
        kernel_index = self.positions.get(id(kernel))
        if kernel_index is None:
            return None  # not a parameter leaf of this model_fn: cannot be preconditioned
        if kind == "embed" and self.stack is not None:
            return None  # a stacked embedding table: no per-layer embedding blocks (the diagonal fallback)
        bias_index = self.positions.get(id(bias)) if bias is not None else None
        bias_path = self.paths[bias_index] if bias_index is not None else None
        return Layer(kind, self.paths[kernel_index], bias_path, tuple(kernel.shape), output_ndim, kernel_index,
                     bias_index, self.stack)

    def record(self, kind, outputs, inputs, kernel, bias, config, output_ndim):
        layer = self.layer(kind, kernel, bias, output_ndim)
        if layer is None:
            return outputs
        if self.perturbations is not None:
            outputs = outputs + self.perturbations[len(self.calls)].astype(outputs.dtype)
        self.calls.append(LayerCall(layer, inputs, config, jax.ShapeDtypeStruct(outputs.shape, outputs.dtype)))
        return outputs


_RECORDER: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar("oso_capture_recorder", default=None)


def capturing() -> bool:
    """Whether a capture is tracing ``model_fn`` in this context (layer wrappers use it to stay inert otherwise)."""
    return _RECORDER.get() is not None


@contextlib.contextmanager
def _recording(recorder: _Recorder | None, capture: CaptureContext | None) -> Iterator[_Recorder]:
    token = _RECORDER.set(recorder)
    try:
        with capture() if capture is not None else contextlib.nullcontext():
            yield recorder
    finally:
        _RECORDER.reset(token)


def scan(f: Callable, init: Any, xs: Any = None, length: int | None = None, reverse: bool = False,
         unroll: int | bool = 1, _split_transpose: bool = False) -> tuple[Any, Any]:
    """``jax.lax.scan(f, init, xs, ...)``, through which a capture sees the tagged layers of ``f``.

    Outside a capture it is exactly ``jax.lax.scan``. Inside one, a tag in ``f`` whose kernel is the slice of a
    parameter leaf scanned in ``xs`` is a layer of a stacked :class:`Layer` (one layer per iteration; module
    docstring). Example, a stack of ``L`` dense layers with kernels ``(L, d, d)`` and biases ``(L, d)``::

        def model_fn(params):
            def block(h, p):
                return jnp.tanh(oso.kronecker.dense(h, p["w"], p["b"])), None
            return oso.kronecker.scan(block, x, params["blocks"])[0]
    """
    outer = _RECORDER.get()
    if outer is None or outer.stack is not None:  # no capture, or nested in a scanned body: the plain loop
        with _recording(None, None):
            return jax.lax.scan(f, init, xs, length=length, reverse=reverse, unroll=unroll,
                                _split_transpose=_split_transpose)
    leaves = jax.tree.leaves(xs)
    stacked = {j: outer.positions[id(x)] for j, x in enumerate(leaves) if id(x) in outer.positions}
    steps = length if length is not None or not leaves else jnp.shape(leaves[0])[0]
    perturbations = None
    if outer.perturbations is not None:  # the body's number of tags, from an abstract trace of it
        one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)), xs)
        found: list[LayerCall] = []
        jax.eval_shape(_scanned_body(f, outer.paths, stacked, steps, found), init, (one, None))
        start = len(outer.calls)
        perturbations = list(outer.perturbations[start:start + len(found)])
    calls: list[LayerCall] = []
    body = _scanned_body(f, outer.paths, stacked, steps, calls)
    carry, (ys, inputs) = jax.lax.scan(body, init, (xs, perturbations), length=length, reverse=reverse, unroll=unroll,
                                       _split_transpose=_split_transpose)
    for call, x in zip(calls, inputs):
        output = jax.ShapeDtypeStruct((steps, *call.output.shape), call.output.dtype)
        outer.calls.append(LayerCall(call.layer, x, call.config, output))
    return carry, ys


def _scanned_body(f: Callable, paths: Sequence[str], stacked: dict[int, int], steps: int, calls: list[LayerCall]):
    """``f`` as a scan body that records its tagged calls (into ``calls``) and returns their inputs as extra outputs.

    ``stacked``: which leaves of ``xs`` (by position) are which parameter leaves. The body's ``xs`` are
    ``(xs, perturbations)``: the perturbations of its tagged outputs, one per tag, or ``None``.
    """

    def body(carry, packed):
        x, perturbations = packed
        leaves = jax.tree.leaves(x)
        recorder = _Recorder(paths, [leaves[j] for j in stacked], perturbations, list(stacked.values()), steps)
        with _recording(recorder, None):
            carry, y = f(carry, x)
        calls[:] = recorder.calls  # the last trace's (lax.scan may trace the body again)
        return carry, (y, [call.inputs for call in recorder.calls])

    return body


def tag_layer(
    kind: str,
    outputs: jax.Array,
    inputs: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    config: ConvConfig | None = None,
    output_ndim: int = 1,
) -> jax.Array:
    """Mark ``outputs = layer(inputs; kernel, bias)`` as a ``"dense"``, ``"conv"``, ``"embed"`` or
    ``"scale_and_shift"`` layer.

    A dense kernel ``(*in_shape, *out_shape)`` has ``output_ndim = len(out_shape)`` and maps the trailing
    axes ``in_shape`` of ``inputs`` to the trailing axes ``out_shape`` of ``outputs`` (bias ``out_shape``).
    An embedding: ``inputs`` integer ids, ``kernel`` the table ``(vocabulary, features)``, ``outputs
    (*ids.shape, features)``. A scale-and-shift layer: ``outputs = inputs * kernel + bias``, ``kernel`` (and
    ``bias``) the shape of the trailing ``output_ndim`` axes of ``inputs``.
    Returns ``outputs`` unchanged unless a capture is running (then with a zero perturbation added).
    """
    recorder = _RECORDER.get()
    if recorder is None:
        return outputs
    if kind == "dense":
        _check_dense_shapes(inputs.shape, outputs.shape, kernel.shape, output_ndim)
    elif kind == "embed":
        _check_embed_shapes(inputs, outputs.shape, kernel.shape, bias)
    elif kind == "scale_and_shift":
        _check_scale_and_shift_shapes(inputs.shape, outputs.shape, kernel.shape, bias, output_ndim)
    elif kind != "conv":
        raise ValueError(f"tag_layer: kind must be one of {KRONECKER_KINDS + BLOCK_KINDS}, got {kind!r}")
    elif output_ndim != 1:
        raise ValueError(f"tag_layer: a {kind!r} layer has output_ndim 1, got {output_ndim}")
    return recorder.record(kind, outputs, inputs, kernel, bias, config, output_ndim)


def _check_embed_shapes(ids, outputs, table, bias) -> None:
    if not (jnp.issubdtype(jnp.result_type(ids), jnp.integer) and len(table) == 2 and bias is None
            and tuple(outputs) == (*jnp.shape(ids), table[1])):
        raise ValueError(
            f"tag_layer: an embedding maps integer ids (...) through a table (vocabulary, features) to outputs "
            f"(..., features), with no bias; got ids {jnp.shape(ids)} of {jnp.result_type(ids)}, table {tuple(table)}, "
            f"outputs {tuple(outputs)}"
        )


def _check_scale_and_shift_shapes(inputs, outputs, scale, shift, output_ndim: int) -> None:
    if not (output_ndim == len(scale) and tuple(inputs) == tuple(outputs)
            and tuple(inputs[len(inputs) - output_ndim:]) == tuple(scale)
            and (shift is None or tuple(jnp.shape(shift)) == tuple(scale))):
        raise ValueError(
            f"tag_layer: scale-and-shift outputs = inputs * scale + shift with scale and shift the shape of the "
            f"trailing output_ndim axes of inputs; got inputs {tuple(inputs)}, outputs {tuple(outputs)}, scale "
            f"{tuple(scale)}, shift {None if shift is None else tuple(jnp.shape(shift))}, output_ndim {output_ndim}"
        )


def _check_dense_shapes(inputs, outputs, kernel, output_ndim: int) -> None:
    in_ndim = len(kernel) - output_ndim
    if not (
        1 <= output_ndim < len(kernel)
        and tuple(inputs[len(inputs) - in_ndim:]) == tuple(kernel[:in_ndim])
        and tuple(outputs[len(outputs) - output_ndim:]) == tuple(kernel[in_ndim:])
    ):
        raise ValueError(
            f"tag_layer: a dense kernel {tuple(kernel)} with output_ndim {output_ndim} must map inputs (..., "
            f"*kernel[:-output_ndim]) to outputs (..., *kernel[-output_ndim:]), got inputs {tuple(inputs)} "
            f"and outputs {tuple(outputs)}"
        )


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, output_ndim: int = 1) -> jax.Array:
    """Tagged dense layer ``x . kernel + bias`` over the trailing axes of ``x``, any leading axes.

    Kernel ``(*in_shape, *out_shape)`` with ``output_ndim = len(out_shape)`` (``(d_in, d_out)`` by
    default), ``x`` of shape ``(..., *in_shape)``, bias ``out_shape``: the contraction
    ``jnp.tensordot(x, kernel, len(in_shape))``, as Flax's ``DenseGeneral`` on trailing axes computes it.
    """
    y = jnp.tensordot(x, kernel, kernel.ndim - output_ndim)
    if bias is not None:
        y = y + bias
    return tag_layer("dense", y, x, kernel, bias, output_ndim=output_ndim)


def embed(ids: jax.Array, table: jax.Array) -> jax.Array:
    """Tagged embedding lookup ``table[ids]``: ``ids`` integers of any shape, ``table (vocabulary, features)``.

    The lookup is the dense layer ``onehot(ids) . table`` (no bias), so K-FAC's block is ``A (x) G`` with
    ``A = E[onehot onehot^T]`` diagonal (the token frequencies). A learned positional table looked up with the
    positions, ``embed(jnp.arange(T), table)``, is the same block (``A`` then ``1/T`` on the rows ``0..T-1``).
    """
    return tag_layer("embed", jnp.take(table, ids, axis=0), ids, table)


def scale_and_shift(x: jax.Array, scale: jax.Array, shift: jax.Array | None = None) -> jax.Array:
    """Tagged ``x * scale + shift`` over the trailing axes of ``x`` (the affine part of LayerNorm / RMSNorm):
    ``scale`` (and ``shift``) the shape of the trailing ``scale.ndim`` axes of ``x``, any leading axes."""
    y = x * scale
    if shift is not None:
        y = y + shift
    return tag_layer("scale_and_shift", y, x, scale, shift, output_ndim=jnp.ndim(scale))


def conv(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    strides: int | Sequence[int] = 1,
    padding: str | int | Sequence = "SAME",
    input_dilation: int | Sequence[int] = 1,
    kernel_dilation: int | Sequence[int] = 1,
) -> jax.Array:
    """Tagged channels-last convolution: ``x (N, *spatial, C_in)``, kernel ``(*window, C_in, C_out)``.

    Mixed dtypes are promoted as ``jnp.dot`` promotes them in :func:`dense` (and ``nn.Conv`` in Flax).
    """
    config = ConvConfig.make(kernel.ndim - 2, strides, padding, input_dilation, kernel_dilation)
    dtype = jnp.result_type(x, kernel)
    y = jax.lax.conv_general_dilated(
        x.astype(dtype),
        kernel.astype(dtype),
        config.strides,
        config.padding,
        config.input_dilation,
        config.kernel_dilation,
        dimension_numbers=config.dimension_numbers(),
    )
    if bias is not None:
        y = y + bias
    return tag_layer("conv", y, x, kernel, bias, config)


def _paths_and_leaves(params: PyTree) -> tuple[list[str], list[Any], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    return [jax.tree_util.keystr(path) for path, _ in flat], [leaf for _, leaf in flat], treedef


def trace_calls(
    model_fn: Callable[[PyTree], Any],
    params: PyTree,
    perturbations: Sequence[jax.Array] | None = None,
    capture: CaptureContext | None = None,
) -> tuple[Any, list[LayerCall]]:
    """``model_fn(params)`` and the layer calls it made, in order.

    With ``perturbations`` (one array per call, shaped like its output), each tagged output has its
    perturbation added, so differentiating through them gives the layers' output gradients. ``capture`` is
    entered around the call (:attr:`Layers.capture`). Call it inside the function being traced.
    """
    paths, leaves, treedef = _paths_and_leaves(params)
    with _recording(_Recorder(paths, leaves, perturbations), capture) as recorder:
        outputs = model_fn(jax.tree_util.tree_unflatten(treedef, leaves))
    return outputs, recorder.calls


def find_layers(
    model_fn: Callable[[PyTree], Any], params: PyTree, capture: CaptureContext | None = None
) -> Layers:
    """The layers ``model_fn(params)`` tags, and the parameters that fall back.

    Traces ``model_fn`` once without running it (``jax.eval_shape``). Build this once, at construction, and
    pass it to the optimizer; print it to see what is preconditioned. ``capture``: a context entered around
    the trace (and kept in the result for every later one), as :func:`optax_second_order.flax.find_layers`
    does for Flax layers.
    """
    found: list[LayerCall] = []

    def trace(p):
        outputs, calls = trace_calls(model_fn, p, capture=capture)
        found.extend(calls)
        return outputs

    jax.eval_shape(trace, params)
    layers: dict[int, Layer] = {}
    for call in found:
        layers.setdefault(call.layer.kernel_index, call.layer)
    covered = {i for layer in layers.values() for i in (layer.kernel_index, layer.bias_index) if i is not None}
    paths, leaves, _ = _paths_and_leaves(params)
    fallback = [i for i in range(len(leaves)) if i not in covered]
    abstract = tuple(jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in leaves)
    kronecker = tuple(l for l in layers.values() if l.kind not in BLOCK_KINDS)
    blocks = tuple(l for l in layers.values() if l.kind in BLOCK_KINDS)
    return Layers(kronecker, tuple(paths[i] for i in fallback), tuple(fallback), len(leaves), abstract, capture,
                  blocks)
