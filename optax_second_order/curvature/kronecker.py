"""Kronecker-factored Fisher blocks of dense and convolutional layers, and the layer capture they need.

For a layer with pre-activations ``s = W^T a`` (weights ``W`` of shape ``(d_in [+1], d_out)``, the bias
as the last row and a homogeneous coordinate ``1`` appended to ``a``) and per-example pre-activation
gradients ``g = d l / d s``, the Fisher block of ``vec(W)`` (row-major vectorization, the order of
``W.reshape(-1)``) is ``E[(a a^T) (x) (g g^T)]``, which K-FAC approximates by (Martens & Grosse 2015)

.. math::

    F_W \\approx A \\otimes G, \\qquad A = E[a a^T], \\quad G = E[g g^T].

A layer applied at ``T`` locations per example (the spatial positions of a convolution, whose inputs
``a_t`` are image patches, or the tokens of a dense layer on a sequence) contributes
``sum_t a_t g_t^T`` to its gradient; assuming spatially uncorrelated derivatives (KFC, Grosse & Martens
2016) its block is ``T E_t[a a^T] (x) E_t[g g^T]``, computed here as

.. math::

    A = \\frac{1}{N T} \\sum_{i,t} a_{i,t} a_{i,t}^T, \\qquad
    G = \\frac{1}{N} \\sum_{i,t} g_{i,t} g_{i,t}^T ,

which is exactly the dense-layer formula when ``T = 1``. A layer called several times (weight sharing)
counts its calls as further locations. A dense kernel with several input and output axes
``(*in_shape, *out_shape)`` (Flax's ``DenseGeneral`` on trailing axes) is the matrix
``W = kernel.reshape(prod(in_shape), prod(out_shape))``, with rows ``a`` the flattened trailing input
axes and ``g`` the flattened output features.

Eigenvalue correction (EK-FAC, George et al. 2018). With orthogonal eigenvectors ``A = Q_A diag(l_A) Q_A^T``
and ``G = Q_G diag(l_G) Q_G^T``, the K-FAC block is diagonal in the Kronecker-factored eigenbasis
``Q_A (x) Q_G``, with eigenvalues ``outer(l_A, l_G)`` (row-major, as ``vec(W)``). EK-FAC keeps the basis
and replaces these eigenvalues by the Fisher's own diagonal in it, the second moments of the
per-example gradients ``D_i = d l_i / d W`` (``W`` in :func:`kernel_matrix` order) expressed there,

.. math::

    s = \\sum_i \\frac{w_i}{\\sum_j w_j} \\left(Q_A^T D_i Q_G\\right)^{\\circ 2}
      = \\sum_i \\Big(\\sum_t \\tilde a_{i,t} \\tilde p_{i,t}^T\\Big)^{\\circ 2},
    \\qquad \\tilde a = Q_A^T a, \\quad \\tilde p = Q_G^T p ,

the diagonal that, as the paper shows, minimizes the Frobenius error among all matrices diagonal in
that basis, so EK-FAC's block is never further (in Frobenius norm) from the Fisher block than K-FAC's.
The second form, with the perturbation gradients ``p`` of :func:`kronecker_factors`, follows from
``sum_t a_{i,t} p_{i,t}^T = sqrt(w_i / sum_j w_j) D_i``: the rotated rows are grouped by example
(``N`` examples, ``T`` rows each), so for ``T = 1`` ``s`` is one matrix product of the squared rotated
rows and otherwise needs the ``N`` per-example matrices. With sampled targets ``s`` is the diagonal of
the true Fisher in that basis; with the data's, of the empirical Fisher.

Capture, without JAX internals. A forward function marks its layers by calling :func:`dense` /
:func:`conv` (or :func:`tag_layer` on a layer it computed itself); Flax models are captured by
:mod:`optax_second_order.flax.capture`, which registers hooks here. Outside :func:`find_layers` and
:func:`kronecker_factors` a tag does nothing but return the layer's output. Inside, it records the
layer's input ``a`` and adds a zero perturbation ``p`` to its output ``s``, so ``d L / d p = d L / d s``
gives ``g`` in the same backward pass. A layer is identified by its kernel: the array passed as ``kernel``
must be a leaf of the parameters handed to ``model_fn`` (not a cast or reshaped copy). Tags work under
``jit``, ``grad`` and ``vmap`` of the whole forward function, but not inside ``lax.scan`` / ``lax.cond``
bodies (their tracers cannot leave the body).

References: Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate
curvature", ICML 2015; Grosse & Martens, "A Kronecker-factored approximate Fisher matrix for
convolution layers", ICML 2016; George, Laurent, Bouthillier, Ballas & Vincent, "Fast approximate
natural gradient descent in a Kronecker-factored eigenbasis", NeurIPS 2018.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, ContextManager, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from optax_second_order.curvature.losses import OutputLoss

__all__ = [
    "ConvConfig",
    "Layer",
    "Layers",
    "KroneckerStatistics",
    "dense",
    "conv",
    "tag_layer",
    "register_capture_hook",
    "find_layers",
    "layer_inputs",
    "kernel_matrix",
    "split_kernel_matrix",
    "fisher_cotangent",
    "kronecker_factors",
]

PyTree = Any

_ACTIVE: list["_Recorder"] = []
_CAPTURE_HOOKS: list[Callable[[], ContextManager]] = []


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
    """A captured layer: its kind, its parameters (``jax.tree_util.keystr`` paths) and kernel shape.

    ``output_ndim``: how many trailing kernel axes are output features (a dense kernel
    ``(*in_shape, *out_shape)`` with several of either, as Flax's ``DenseGeneral`` has, is the matrix
    ``(prod(in_shape), prod(out_shape))``; a conv's is always 1).
    """

    kind: str
    kernel: str
    bias: str | None
    kernel_shape: tuple[int, ...]
    output_ndim: int = 1

    @property
    def name(self) -> str:
        return self.kernel

    @property
    def fan_in(self) -> int:
        """The kernel's input size: ``prod(in_shape)`` for a dense layer, the patch size for a conv."""
        return math.prod(self.kernel_shape[:-self.output_ndim])

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
    """What capture found: the layers K-FAC preconditions and the parameters that fall back."""

    layers: tuple[Layer, ...]
    fallback: tuple[str, ...]

    def summary(self) -> str:
        """A printable table of preconditioned layers and fallback parameters."""
        lines = [f"K-FAC capture: {len(self.layers)} layers preconditioned, {len(self.fallback)} params fall back"]
        for layer in self.layers:
            bias = f" + {layer.bias}" if layer.bias else ""
            lines.append(
                f"  {layer.kind:5s} {layer.kernel}{bias}  A {layer.input_dim}x{layer.input_dim}, "
                f"G {layer.output_dim}x{layer.output_dim}"
            )
        lines.extend(f"  diagonal {name}" for name in self.fallback)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


class KroneckerStatistics(NamedTuple):
    """``factors``: ``{layer name: (A, G)}``; ``fallback_grads``: the fallback parameters' gradients;
    ``scales``: ``{layer name: s}``, EK-FAC's ``(d_in, d_out)`` diagonal in the eigenbases asked for
    (empty when none were)."""

    factors: dict[str, tuple[jax.Array, jax.Array]]
    fallback_grads: dict[str, jax.Array]
    scales: dict[str, jax.Array]


@dataclasses.dataclass
class _Call:
    layer: Layer
    output: jax.ShapeDtypeStruct
    inputs: jax.Array | None


class _Recorder:
    """Collects the tagged calls of one trace of ``model_fn`` and perturbs their outputs."""

    def __init__(self, perturbations: Sequence[jax.Array] | None = None):
        self.perturbations = perturbations
        self.names: dict[int, str] = {}
        self.calls: list[_Call] = []

    def watch(self, keys: Sequence[str], leaves: Sequence[Any]) -> None:
        self.names = {id(leaf): key for key, leaf in zip(keys, leaves)}

    def record(self, kind, outputs, inputs, kernel, bias, config, output_ndim):
        kernel_name = self.names.get(id(kernel))
        if kernel_name is None:
            return outputs  # not a parameter leaf of this model_fn: cannot be preconditioned
        bias_name = self.names.get(id(bias)) if bias is not None else None
        layer = Layer(kind, kernel_name, bias_name, tuple(kernel.shape), output_ndim)
        rows = None
        if self.perturbations is not None:
            rows = layer_inputs(layer, inputs, config)
            outputs = outputs + self.perturbations[len(self.calls)].astype(outputs.dtype)
        self.calls.append(_Call(layer, jax.ShapeDtypeStruct(outputs.shape, outputs.dtype), rows))
        return outputs


def register_capture_hook(hook: Callable[[], ContextManager]) -> None:
    """Register ``hook() -> context manager`` entered around every capturing trace (Flax uses this)."""
    if hook not in _CAPTURE_HOOKS:
        _CAPTURE_HOOKS.append(hook)


@contextlib.contextmanager
def _recording(recorder: _Recorder):
    with contextlib.ExitStack() as stack:
        for hook in _CAPTURE_HOOKS:
            stack.enter_context(hook())
        _ACTIVE.append(recorder)
        try:
            yield recorder
        finally:
            _ACTIVE.pop()


def tag_layer(
    kind: str,
    outputs: jax.Array,
    inputs: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    config: ConvConfig | None = None,
    output_ndim: int = 1,
) -> jax.Array:
    """Mark ``outputs = layer(inputs; kernel, bias)`` as a ``"dense"`` or ``"conv"`` layer for K-FAC.

    A dense kernel ``(*in_shape, *out_shape)`` has ``output_ndim = len(out_shape)`` and maps the trailing
    axes ``in_shape`` of ``inputs`` to the trailing axes ``out_shape`` of ``outputs`` (bias ``out_shape``).
    Returns ``outputs`` unchanged unless a capture is running (then with a zero perturbation added).
    """
    if not _ACTIVE:
        return outputs
    if kind == "dense":
        _check_dense_shapes(inputs.shape, outputs.shape, kernel.shape, output_ndim)
    elif output_ndim != 1:
        raise ValueError(f"tag_layer: a {kind!r} layer has output_ndim 1, got {output_ndim}")
    return _ACTIVE[-1].record(kind, outputs, inputs, kernel, bias, config, output_ndim)


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


def layer_inputs(layer: Layer, x: jax.Array, config: ConvConfig | None = None) -> jax.Array:
    """The rows ``a`` of ``A`` (one per example and location), with a trailing ``1`` for the bias.

    Dense: ``x (..., *in_shape)`` flattened to ``(-1, prod(in_shape))``. Conv: image patches from
    ``jax.lax.conv_general_dilated_patches`` (features ordered ``(C_in, *window)``, see
    :func:`kernel_matrix`), one row per example and output location.
    """
    if layer.kind == "conv":
        window = layer.kernel_shape[:-2]
        x = x.reshape((-1,) + x.shape[x.ndim - len(window) - 1:])
        x = jax.lax.conv_general_dilated_patches(
            x,
            window,
            config.strides,
            config.padding,
            config.input_dilation,
            config.kernel_dilation,
            dimension_numbers=config.dimension_numbers(),
        )
    rows = x.reshape(-1, layer.fan_in)
    if layer.bias is not None:
        rows = jnp.concatenate([rows, jnp.ones((rows.shape[0], 1), rows.dtype)], axis=1)
    return rows


def kernel_matrix(layer: Layer, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """The ``(d_in [+1], d_out)`` matrix ``W`` whose rows match :func:`layer_inputs` (bias last).

    A dense kernel ``(*in_shape, *out_shape)`` becomes ``(prod(in_shape), prod(out_shape))`` row-major,
    its bias ``out_shape`` the row ``prod(out_shape)``.
    """
    if layer.kind == "conv":
        kernel = jnp.moveaxis(kernel, -2, 0)  # (*window, C_in, C_out) -> (C_in, *window, C_out)
    w = kernel.reshape(-1, layer.output_dim)
    if layer.bias is not None:
        w = jnp.concatenate([w, bias.reshape(1, -1).astype(w.dtype)], axis=0)
    return w


def split_kernel_matrix(layer: Layer, w: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Inverse of :func:`kernel_matrix`: ``(kernel, bias)`` in the parameters' shapes."""
    bias = w[-1].reshape(layer.kernel_shape[-layer.output_ndim:]) if layer.bias is not None else None
    w = w[:-1] if layer.bias is not None else w
    if layer.kind == "conv":
        shape = layer.kernel_shape
        kernel = jnp.moveaxis(w.reshape((shape[-2],) + shape[:-2] + (shape[-1],)), 0, -2)
    else:
        kernel = w.reshape(layer.kernel_shape)
    return kernel, bias


def _flatten(params: PyTree) -> tuple[list[str], list[Any], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    return [jax.tree_util.keystr(path) for path, _ in flat], [leaf for _, leaf in flat], treedef


def _trace_calls(model_fn, params) -> list[_Call]:
    """The tagged calls of ``model_fn(params)``, found by tracing it once (``jax.eval_shape``)."""
    keys, leaves, treedef = _flatten(params)
    recorder = _Recorder()

    def run(leaves):
        recorder.watch(keys, leaves)
        with _recording(recorder):
            return model_fn(jax.tree_util.tree_unflatten(treedef, leaves))

    jax.eval_shape(run, leaves)
    return recorder.calls


def find_layers(model_fn: Callable[[PyTree], Any], params: PyTree) -> Layers:
    """The layers ``model_fn(params)`` tags (or Flax capture finds), and the parameters that fall back.

    Traces ``model_fn`` once without running it. Build this once, at construction, and pass it to
    :func:`optax_second_order.scale_by_kfac`; print it to see what is preconditioned.
    """
    layers: dict[str, Layer] = {}
    for call in _trace_calls(model_fn, params):
        layers.setdefault(call.layer.name, call.layer)
    covered = {p for layer in layers.values() for p in (layer.kernel, layer.bias) if p is not None}
    keys, _, _ = _flatten(params)
    return Layers(tuple(layers.values()), tuple(k for k in keys if k not in covered))


def fisher_cotangent(loss: OutputLoss, key: jax.Array | None = None) -> Callable[[jax.Array], jax.Array]:
    """``outputs -> u`` with ``u_i = sqrt(w_i / sum_j w_j) d l(y_i, t_i) / d y_i`` for :func:`kronecker_factors`.

    ``t_i ~ p(t | y_i)`` sampled with ``key`` gives the true Fisher (K-FAC's default); ``key=None`` uses
    the data's targets bound to ``loss`` (the empirical Fisher).
    """

    def cotangent(outputs):
        outputs = jax.lax.stop_gradient(outputs)
        bound = loss if key is None else loss.with_targets(loss.sample_targets(key, outputs))
        scale = jnp.sqrt(loss.example_scale(outputs))
        return (scale * bound.per_example_output_grad(outputs)).astype(outputs.dtype)

    return cotangent


def _num_examples(layer: Layer, output_shape: tuple[int, ...]) -> int:
    """``N``: the leading axis of a call's input (and output), or ``1`` for an unbatched call."""
    example_ndim = layer.output_ndim if layer.kind == "dense" else len(layer.kernel_shape) - 1
    return output_shape[0] if len(output_shape) > example_ndim else 1


def _factors(calls: Sequence[tuple[jax.Array, jax.Array, int]]) -> tuple[jax.Array, jax.Array]:
    """``A = sum a a^T / rows`` and ``G = sum p p^T`` over all the calls of one layer."""
    highest = jax.lax.Precision.HIGHEST
    aa = sum(jnp.matmul(a.T, a, precision=highest) for a, _, _ in calls)
    gg = sum(jnp.matmul(p.T, p, precision=highest) for _, p, _ in calls)
    return aa / sum(a.shape[0] for a, _, _ in calls), gg


def _per_example_rows(calls: Sequence[tuple[jax.Array, jax.Array, int]], name: str) -> tuple[jax.Array, jax.Array]:
    """One layer's rows ``a`` and ``p`` grouped by example, ``(N, T, d_in)`` and ``(N, T, d_out)``.

    The calls of a shared layer become further locations ``t`` of the same examples.
    """
    examples = {n for _, _, n in calls}
    if len(examples) > 1:
        raise ValueError(
            f"kronecker_factors: eigenbasis scales need every call of layer {name} to have the same number of "
            f"examples (leading input axis), got {sorted(examples)}"
        )
    n = examples.pop()
    a = jnp.concatenate([a.reshape(n, -1, a.shape[-1]) for a, _, _ in calls], axis=1)
    p = jnp.concatenate([p.reshape(n, -1, p.shape[-1]) for _, p, _ in calls], axis=1)
    return a, p


def _eigenbasis_scales(a: jax.Array, p: jax.Array, q_a: jax.Array, q_g: jax.Array) -> jax.Array:
    """EK-FAC's ``s = sum_i (sum_t (Q_A^T a_{i,t}) (Q_G^T p_{i,t})^T)**2`` from rows grouped by example.

    ``a``: ``(N, T, d_in)``, ``p``: ``(N, T, d_out)``. For ``T = 1`` the per-example matrices are rank one
    and ``s = (a_rot**2)^T (p_rot**2)``; otherwise they are formed (``N d_in d_out`` memory) and squared.
    """
    highest = jax.lax.Precision.HIGHEST
    a_rot = jnp.matmul(a, q_a.astype(a.dtype), precision=highest)
    p_rot = jnp.matmul(p, q_g.astype(p.dtype), precision=highest)
    if a.shape[1] == 1:
        return jnp.matmul(jnp.square(a_rot[:, 0]).T, jnp.square(p_rot[:, 0]), precision=highest)
    per_example = jnp.einsum("ntd,nte->nde", a_rot, p_rot, precision=highest)
    return jnp.sum(jnp.square(per_example), axis=0)


def _check_eigenbases(layers: Layers, eigenbases: dict[str, tuple[jax.Array, jax.Array]]) -> None:
    by_name = {layer.name: layer for layer in layers.layers}
    for name, (q_a, q_g) in eigenbases.items():
        if name not in by_name:
            raise ValueError(f"kronecker_factors: eigenbases names {name}, which is not one of the layers")
        layer = by_name[name]
        want = ((layer.input_dim,) * 2, (layer.output_dim,) * 2)
        if (jnp.shape(q_a), jnp.shape(q_g)) != want:
            raise ValueError(
                f"kronecker_factors: eigenbases[{name!r}] must have shapes {want} (Q_A, Q_G), "
                f"got {(jnp.shape(q_a), jnp.shape(q_g))}"
            )


def kronecker_factors(
    model_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    layers: Layers,
    output_cotangent: Callable[[jax.Array], jax.Array],
    eigenbases: dict[str, tuple[jax.Array, jax.Array]] | None = None,
) -> KroneckerStatistics:
    """One forward and backward pass of ``model_fn``: every layer's ``(A, G)``, in float32 or better.

    ``output_cotangent(outputs)`` must return ``u`` with ``u_i = sqrt(w_i / sum_j w_j) d l_i / d y_i``
    (per-example output gradients at sampled targets for the true Fisher, at the data's for the
    empirical one), so the perturbation gradients are ``p_{i,t} = sqrt(w_i / W) g_{i,t}`` and
    ``G = sum_{i,t} p p^T`` is the weighted mean over examples. The same pass returns the fallback
    parameters' gradients ``sum_i sqrt(w_i / W) d l_i / d theta``, whose square estimates the diagonal of
    the Fisher (for sampled targets the cross terms vanish in expectation).

    ``eigenbases``, ``{layer name: (Q_A, Q_G)}`` with orthogonal ``(d_in, d_in)`` and ``(d_out, d_out)``
    matrices (the eigenvectors of that layer's ``A`` and ``G``), adds EK-FAC's ``scales`` for those layers:
    ``s = sum_i (w_i / W) (Q_A^T (d l_i / d W) Q_G)**2`` of shape ``(d_in, d_out)`` (see the module docs).
    Assumption: a layer's examples ``i`` are the entries of the leading axis of its input (``(N, ..., d_in)``
    for a dense layer, ``(N, *spatial, C_in)`` for a conv; a dense layer's vector input is one example),
    and an entry's rows are its locations ``t``. Where the loss's examples are finer (the tokens of a
    sequence), an entry's loss terms are grouped: ``s`` is then the second moment of
    ``sum_t sqrt(w_t / W) d l_t / d W``, equal in expectation over sampled targets to the per-token one
    (the cross terms vanish), but not for the data's targets. A shared layer (called several times) is
    supported when every call has the same ``N``: an example's gradient is the sum over all its calls,
    taken before squaring; calls with different ``N`` raise a ValueError.
    """
    eigenbases = {} if eigenbases is None else eigenbases
    _check_eigenbases(layers, eigenbases)
    keys, leaves, treedef = _flatten(params)
    shapes = [call.output for call in _trace_calls(model_fn, params)]
    fallback_index = [keys.index(name) for name in layers.fallback]
    calls: list[_Call] = []

    def forward(fallback_leaves, perturbations):
        all_leaves = list(leaves)
        for i, leaf in zip(fallback_index, fallback_leaves):
            all_leaves[i] = leaf
        recorder = _Recorder(perturbations)
        recorder.watch(keys, all_leaves)
        with _recording(recorder):
            outputs = model_fn(jax.tree_util.tree_unflatten(treedef, all_leaves))
        calls[:] = recorder.calls
        return outputs, [call.inputs for call in recorder.calls]

    perturbations = [jnp.zeros(s.shape, s.dtype) for s in shapes]
    fallback_leaves = [leaves[i] for i in fallback_index]
    outputs, vjp_fn, inputs = jax.vjp(forward, fallback_leaves, perturbations, has_aux=True)
    fallback_grads, output_grads = vjp_fn(output_cotangent(outputs))

    rows: dict[str, list[tuple[jax.Array, jax.Array, int]]] = {}
    for call, a, g in zip(calls, inputs, output_grads):
        dtype = jnp.promote_types(a.dtype, jnp.float32)
        p = g.reshape(-1, call.layer.output_dim).astype(dtype)
        rows.setdefault(call.layer.name, []).append((a.astype(dtype), p, _num_examples(call.layer, call.output.shape)))
    factors, scales = {}, {}
    for layer in layers.layers:
        if layer.name not in rows:
            raise ValueError(f"kronecker_factors: layer {layer.name} was not called by model_fn")
        factors[layer.name] = _factors(rows[layer.name])
        if layer.name in eigenbases:
            a, p = _per_example_rows(rows[layer.name], layer.name)
            scales[layer.name] = _eigenbasis_scales(a, p, *eigenbases[layer.name])
    return KroneckerStatistics(factors, dict(zip(layers.fallback, fallback_grads)), scales)

