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

Layers are found by :mod:`~optax_second_order.curvature.capture` (tags, or Flax layers through
:func:`optax_second_order.flax.find_layers`); :func:`layer_rows` gives every captured layer's input rows ``a`` and
output-gradient rows ``p`` from one forward and backward pass, and :func:`kronecker_factors` builds the factors
from them. A stacked layer (``L`` layers run by :func:`~optax_second_order.curvature.capture.scan`, ``layer.stack``)
is ``L`` independent layers: its rows, kernel matrices, factors and scales carry a leading layer axis ``L``, and
layer ``l``'s come from layer ``l``'s inputs and output gradients alone. The same pass gives the statistics of
K-FAC's embedding and scale-and-shift blocks (``layers.blocks``; :func:`block_statistics`,
:mod:`~optax_second_order.curvature.blocks`).

References: Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate
curvature", ICML 2015; Grosse & Martens, "A Kronecker-factored approximate Fisher matrix for
convolution layers", ICML 2016; George, Laurent, Bouthillier, Ballas & Vincent, "Fast approximate
natural gradient descent in a Kronecker-factored eigenbasis", NeurIPS 2018.
"""


from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from optax_second_order.curvature import blocks as curvature_blocks
from optax_second_order.curvature.bank import FactorBank, plan_bank
from optax_second_order.curvature.capture import (
    ConvConfig,
    Layer,
    Layers,
    conv,
    dense,
    embed,
    find_layers,
    scale_and_shift,
    scan,
    tag_layer,
    trace_calls,
)
from optax_second_order.curvature.losses import OutputLoss

__all__ = [
    # re-exported from capture, where layers are found
    "ConvConfig",
    "Layer",
    "Layers",
    "dense",
    "conv",
    "embed",
    "scale_and_shift",
    "tag_layer",
    "find_layers",
    "scan",
    # defined here
    "LayerRows",
    "CapturedPass",
    "KroneckerStatistics",
    "layer_inputs",
    "kernel_matrix",
    "split_kernel_matrix",
    "layer_bank",
    "fisher_cotangent",
    "layer_rows",
    "sum_over_rows",
    "kronecker_factors",
    "block_statistics",
]

PyTree = Any


class LayerRows(NamedTuple):
    """One call of a layer: input rows ``a`` ``(rows, d_in [+1])`` (a trailing ``1`` for the bias), output-gradient
    rows ``p`` ``(rows, d_out)``, and ``num_examples``, the call's number of examples ``N`` (rows are ``N x T``).
    A stacked layer's rows have a leading layer axis, ``(L, rows, d)``."""

    inputs: jax.Array
    output_grads: jax.Array
    num_examples: int


class CapturedPass(NamedTuple):
    """What :func:`layer_rows` returns: the model's ``outputs``; per layer (``layers.layers`` order) the
    :class:`LayerRows` of each of its calls; the fallback parameters' gradients (``layers.fallback`` order); per
    block (``layers.blocks`` order) the rows of each of its calls (an embedding's inputs are its ids ``(rows,)``)."""

    outputs: jax.Array
    rows: tuple[tuple[LayerRows, ...], ...]
    fallback_grads: tuple[jax.Array, ...]
    block_rows: tuple[tuple[LayerRows, ...], ...] = ()


class KroneckerStatistics(NamedTuple):
    """``factors``: ``{layer name: (A, G)}``; ``fallback_grads``: the fallback parameters' gradients;
    ``scales``: ``{layer name: s}``, EK-FAC's ``(d_in, d_out)`` diagonal in the eigenbases asked for
    (empty when none were)."""

    factors: dict[str, tuple[jax.Array, jax.Array]]
    fallback_grads: dict[str, jax.Array]
    scales: dict[str, jax.Array]
    blocks: dict[str, tuple[jax.Array, ...]] = {}  # per block of layers.blocks: block_statistics


def layer_inputs(layer: Layer, x: jax.Array, config: ConvConfig | None = None) -> jax.Array:
    """The rows ``a`` of ``A`` (one per example and location), with a trailing ``1`` for the bias.

    Dense: ``x (..., *in_shape)`` flattened to ``(-1, prod(in_shape))``. Conv: image patches from
    ``jax.lax.conv_general_dilated_patches`` (features ordered ``(C_in, *window)``, see
    :func:`kernel_matrix`), one row per example and output location. A stacked layer: ``x (L, ...)``, rows
    ``(L, rows, d_in [+1])``.
    """
    if layer.stack is not None:
        return jax.vmap(lambda xl: layer_inputs(layer.one_layer(), xl, config))(x)
    if layer.kind == "embed":  # the ids, not their one-hot rows
        return jnp.reshape(x, -1)
    if layer.kind == "scale_and_shift":  # the inputs x per feature, no homogeneous coordinate
        return x.reshape(math.prod(x.shape[: x.ndim - layer.output_ndim]), layer.output_dim)
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
    else:  # the leading axes are the rows (counted, not inferred: a kernel with no inputs has fan_in 0)
        in_ndim = len(layer.kernel_shape) - layer.output_ndim
        rows = x.reshape(math.prod(x.shape[: x.ndim - in_ndim]), layer.fan_in)
    if layer.bias is not None:
        ones = jnp.ones_like(jnp.sum(rows, axis=1, keepdims=True))  # (rows, 1) laid out like the rows on a mesh
        rows = jnp.concatenate([rows, ones], axis=1)
    return rows


def kernel_matrix(layer: Layer, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """The ``(d_in [+1], d_out)`` matrix ``W`` whose rows match :func:`layer_inputs` (bias last).

    A dense kernel ``(*in_shape, *out_shape)`` becomes ``(prod(in_shape), prod(out_shape))`` row-major,
    its bias ``out_shape`` the row ``prod(out_shape)``. A stacked layer: ``(L, d_in [+1], d_out)``.
    """
    if layer.stack is not None:
        return jax.vmap(lambda k, b: kernel_matrix(layer.one_layer(), k, b))(kernel, bias)
    if layer.kind == "conv":
        kernel = jnp.moveaxis(kernel, -2, 0)  # (*window, C_in, C_out) -> (C_in, *window, C_out)
    w = kernel.reshape(-1, layer.output_dim)
    if layer.bias is not None:
        w = jnp.concatenate([w, bias.reshape(1, -1).astype(w.dtype)], axis=0)
    return w


def split_kernel_matrix(layer: Layer, w: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Inverse of :func:`kernel_matrix`: ``(kernel, bias)`` in the parameters' shapes."""
    if layer.stack is not None:
        return jax.vmap(lambda wl: split_kernel_matrix(layer.one_layer(), wl))(w)
    bias = w[-1].reshape(layer.kernel_shape[-layer.output_ndim:]) if layer.bias is not None else None
    w = w[:-1] if layer.bias is not None else w
    if layer.kind == "conv":
        shape = layer.kernel_shape
        kernel = jnp.moveaxis(w.reshape((shape[-2],) + shape[:-2] + (shape[-1],)), 0, -2)
    else:
        kernel = w.reshape(layer.kernel_shape)
    return kernel, bias


def layer_bank(layers: Layers, sharding: NamedSharding | None = None) -> FactorBank:
    """The factor bank of a capture: one unit per captured layer, its :func:`kernel_matrix` ``(d_in [+1], d_out)``,
    with a factor over the inputs (mode 0: K-FAC's ``A``, K-BFGS's ``H_a``) and one over the output gradients
    (mode 1: ``G``, ``H_g``); layers of one shape share the stacks (:mod:`~optax_second_order.curvature.bank`). A
    stacked layer (scanned, ``layer.stack = L``) is ``L`` units of the same group, one per layer."""
    shapes = [(l.input_dim, l.output_dim) for l in layers.layers]
    return plan_bank(shapes, lambda shape: (0, 1), None, sharding, layers=[l.stack or 1 for l in layers.layers])


def fisher_cotangent(
    loss: OutputLoss, key: jax.Array | None = None, *, sign_key: jax.Array | None = None
) -> Callable[[jax.Array], jax.Array]:
    """``outputs -> u`` with ``u_i = sqrt(w_i / sum_j w_j) d l(y_i, t_i) / d y_i`` for :func:`kronecker_factors`.

    ``t_i ~ p(t | y_i)`` sampled with ``key`` gives the true Fisher (K-FAC's default); ``key=None`` uses the
    data's targets bound to ``loss`` (the empirical Fisher). ``sign_key`` multiplies each example's ``u_i`` by
    an independent random sign ``eps_i = +-1``: the factors (and EK-FAC's scales) are unchanged, since they are
    sums of per-example squares, but the squared *summed* gradient of a fallback parameter,
    ``(sum_i eps_i u_i . d y_i / d theta)^2``, becomes an unbiased estimate of the per-example squares
    ``sum_i (u_i . d y_i / d theta)^2`` (``E[eps_i eps_j] = 0`` for ``i != j``), the diagonal of the empirical
    Fisher -- the argument that makes the sampled-target square unbiased for the true Fisher (Gauss-Newton-
    Bartlett), without per-example gradients.
    """

    def cotangent(outputs):
        outputs = jax.lax.stop_gradient(outputs)
        bound = loss if key is None else loss.with_targets(loss.sample_targets(key, outputs))
        scale = jnp.sqrt(loss.example_scale(outputs))
        if sign_key is not None:
            signs = jax.random.rademacher(sign_key, loss.example_shape(outputs), scale.dtype)
            scale = scale * jnp.expand_dims(signs, loss.event_axes(outputs))
        return (scale * bound.per_example_output_grad(outputs)).astype(outputs.dtype)

    return cotangent


def _num_examples(layer: Layer, output_shape: tuple[int, ...]) -> int:
    """``N``: the leading axis of a call's input (and output), or ``1`` for an unbatched call (after the layer axis of
    a stacked layer's)."""
    output_shape = output_shape if layer.stack is None else output_shape[1:]
    example_ndim = len(layer.kernel_shape) - 1 if layer.kind == "conv" else layer.output_ndim
    return output_shape[0] if len(output_shape) > example_ndim else 1


def layer_rows(
    model_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    layers: Layers,
    output_cotangent: Callable[[jax.Array], jax.Array],
) -> CapturedPass:
    """One forward and backward pass of ``model_fn``: every captured layer's input and output-gradient rows.

    The backward pass starts from ``output_cotangent(outputs)`` (``u``, shaped like the outputs): a layer's
    output-gradient rows are then ``p = u^T d outputs / d s`` at its outputs ``s`` (for ``u = dL/dy``, the
    loss's gradient ``dL/ds``), and the fallback parameters get ``u^T d outputs / d theta``. Rows are in float32
    or better. K-FAC's factors are sums of their outer products (:func:`kronecker_factors`); K-BFGS uses their
    means.
    """
    leaves = layers.check_params(params, "layer_rows")
    treedef = jax.tree.structure(params)
    shapes = _call_output_shapes(model_fn, params, layers)
    recorded: list = []

    def forward(fallback_leaves, perturbations):
        all_leaves = list(leaves)
        for i, leaf in zip(layers.fallback_indices, fallback_leaves):
            all_leaves[i] = leaf
        outputs, calls = trace_calls(model_fn, jax.tree.unflatten(treedef, all_leaves), perturbations, layers.capture)
        recorded[:] = calls
        return outputs, [call.inputs for call in calls]

    perturbations = [jnp.zeros(s.shape, s.dtype) for s in shapes]
    fallback_leaves = [leaves[i] for i in layers.fallback_indices]
    outputs, vjp_fn, inputs = jax.vjp(forward, fallback_leaves, perturbations, has_aux=True)
    fallback_grads, output_grads = vjp_fn(output_cotangent(outputs))

    by_layer: dict[int, list[LayerRows]] = {}
    for call, x, g in zip(recorded, inputs, output_grads):
        by_layer.setdefault(call.layer.kernel_index, []).append(_call_rows(call, x, g))
    missing = [layer.name for layer in layers.layers + layers.blocks if layer.kernel_index not in by_layer]
    if missing:
        raise ValueError(f"layer_rows: layers {missing} were not called by model_fn (is it the model find_layers traced?)")
    rows = tuple(tuple(by_layer[layer.kernel_index]) for layer in layers.layers)
    block_rows = tuple(tuple(by_layer[layer.kernel_index]) for layer in layers.blocks)
    return CapturedPass(outputs, rows, tuple(fallback_grads), block_rows)


def _call_rows(call, x: jax.Array, g: jax.Array) -> LayerRows:
    """One call's rows: inputs ``a`` and output gradients ``p`` in float32 or better (an embedding's ids as they
    are)."""
    a = layer_inputs(call.layer, x, call.config)
    dtype = jnp.promote_types(g.dtype if call.layer.kind == "embed" else a.dtype, jnp.float32)
    if call.layer.kind != "embed":
        a = a.astype(dtype)
    p = g.reshape(*a.shape[:a.ndim - (call.layer.kind != "embed")], call.layer.output_dim).astype(dtype)
    return LayerRows(a, p, _num_examples(call.layer, call.output.shape))


def _call_output_shapes(model_fn, params, layers: Layers) -> list[jax.ShapeDtypeStruct]:
    """The output shape of every tagged call of ``model_fn(params)``, from one abstract trace."""
    found: list = []

    def trace(p):
        outputs, calls = trace_calls(model_fn, p, capture=layers.capture)
        found.extend(calls)
        return outputs

    jax.eval_shape(trace, params)
    return [call.output for call in found]


def sum_over_rows(x: jax.Array, y: jax.Array) -> jax.Array:
    """``x^T y``, a sum over the rows (the batch), for every index of any leading axes (a stacked layer's ``L``). On
    a mesh with ``Explicit`` axes the rows may be split over the devices, and JAX asks where such a sum goes: here,
    replicated (the global batch's statistic on every device)."""
    mesh = jax.typeof(x).sharding.mesh
    explicit = not mesh.empty and AxisType.Explicit in mesh.axis_types
    return jnp.matmul(jnp.swapaxes(x, -1, -2), y, precision=jax.lax.Precision.HIGHEST,
                      out_sharding=PartitionSpec() if explicit else None)


def _factors(calls: Sequence[LayerRows]) -> tuple[jax.Array, jax.Array]:
    """``A = sum a a^T / rows`` and ``G = sum p p^T`` over all the calls of one layer (per layer of a stack)."""
    aa = sum(sum_over_rows(c.inputs, c.inputs) for c in calls)
    gg = sum(sum_over_rows(c.output_grads, c.output_grads) for c in calls)
    return aa / sum(c.inputs.shape[-2] for c in calls), gg


def _per_example_rows(calls: Sequence[LayerRows], name: str) -> tuple[jax.Array, jax.Array]:
    """One layer's rows ``a`` and ``p`` grouped by example, ``(N, T, d_in)`` and ``(N, T, d_out)`` (after the layer
    axis ``L`` of a stacked layer's).

    The calls of a shared layer become further locations ``t`` of the same examples.
    """
    examples = {c.num_examples for c in calls}
    if len(examples) > 1:
        raise ValueError(
            f"kronecker_factors: eigenbasis scales need every call of layer {name} to have the same number of "
            f"examples (leading input axis), got {sorted(examples)}"
        )
    n = examples.pop()
    # the locations per example counted, not inferred (``-1`` fails on a layer with no inputs, d_in = 0)
    def by_example(x):
        return x.reshape(*x.shape[:-2], n, x.shape[-2] // n, x.shape[-1])

    a = jnp.concatenate([by_example(c.inputs) for c in calls], axis=-2)
    p = jnp.concatenate([by_example(c.output_grads) for c in calls], axis=-2)
    return a, p


def block_statistics(layer: Layer, calls: Sequence[LayerRows]) -> tuple[jax.Array, ...]:
    """A block's statistics from all its calls (:mod:`~optax_second_order.curvature.blocks`): an embedding's
    ``(c, G)`` (token frequencies, ``G = sum p p^T``); a scale-and-shift layer's exact Fisher diagonal ``(d_s,)`` or
    ``(d_s, d_b)`` (with a shift), shaped like the parameters."""
    if layer.kind == "embed":
        ids = jnp.concatenate([c.inputs for c in calls])
        grads = jnp.concatenate([c.output_grads for c in calls])
        return curvature_blocks.embedding_factors(ids, grads, layer.kernel_shape[0])
    x, p = _per_example_rows(calls, layer.name)
    d_scale, d_shift = curvature_blocks.scale_and_shift_diagonal(x, p)
    shape = layer.leaf_shape
    return (d_scale.reshape(shape),) if layer.bias is None else (d_scale.reshape(shape), d_shift.reshape(shape))


def _eigenbasis_scales(a: jax.Array, p: jax.Array, q_a: jax.Array, q_g: jax.Array) -> jax.Array:
    """EK-FAC's ``s = sum_i (sum_t (Q_A^T a_{i,t}) (Q_G^T p_{i,t})^T)**2`` from rows grouped by example.

    ``a``: ``(N, T, d_in)``, ``p``: ``(N, T, d_out)``. For ``T = 1`` the per-example matrices are rank one
    and ``s = (a_rot**2)^T (p_rot**2)``; otherwise they are formed (``N d_in d_out`` memory) and squared.
    """
    highest = jax.lax.Precision.HIGHEST
    a_rot = jnp.matmul(a, q_a.astype(a.dtype), precision=highest)
    p_rot = jnp.matmul(p, q_g.astype(p.dtype), precision=highest)
    if a.shape[1] == 1:
        return sum_over_rows(jnp.square(a_rot[:, 0]), jnp.square(p_rot[:, 0]))
    per_example = jnp.einsum("ntd,nte->nde", a_rot, p_rot, precision=highest)
    return jnp.sum(jnp.square(per_example), axis=0)


def _check_eigenbases(layers: Layers, eigenbases: dict[str, tuple[jax.Array, jax.Array]]) -> None:
    by_name = {layer.name: layer for layer in layers.layers}
    for name, (q_a, q_g) in eigenbases.items():
        if name not in by_name:
            raise ValueError(f"kronecker_factors: eigenbases names {name}, which is not one of the layers")
        layer = by_name[name]
        stack = () if layer.stack is None else (layer.stack,)
        want = ((*stack, *(layer.input_dim,) * 2), (*stack, *(layer.output_dim,) * 2))
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
    empirical one; :func:`fisher_cotangent`), so the perturbation gradients are ``p_{i,t} = sqrt(w_i / W) g_{i,t}``
    and ``G = sum_{i,t} p p^T`` is the weighted mean over examples. The same pass returns the fallback
    parameters' gradients ``sum_i sqrt(w_i / W) d l_i / d theta``, whose square estimates the diagonal of
    the Fisher (for sampled targets, or random signs, the cross terms vanish in expectation).

    ``eigenbases``, ``{layer name: (Q_A, Q_G)}`` with orthogonal ``(d_in, d_in)`` and ``(d_out, d_out)``
    matrices (the eigenvectors of that layer's ``A`` and ``G``; ``(L, d, d)`` for a stacked layer), adds EK-FAC's ``scales`` for those layers:
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
    captured = layer_rows(model_fn, params, layers, output_cotangent)
    factors, scales = {}, {}
    for layer, calls in zip(layers.layers, captured.rows):
        factors[layer.name] = _factors(calls)
        if layer.name in eigenbases:
            a, p = _per_example_rows(calls, layer.name)
            scales_of = _eigenbasis_scales if layer.stack is None else jax.vmap(_eigenbasis_scales)
            scales[layer.name] = scales_of(a, p, *eigenbases[layer.name])
    blocks = {b.name: block_statistics(b, calls) for b, calls in zip(layers.blocks, captured.block_rows)}
    return KroneckerStatistics(factors, dict(zip(layers.fallback, captured.fallback_grads)), scales, blocks)
