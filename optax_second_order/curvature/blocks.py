r"""K-FAC's curvature blocks for embeddings and scale-and-shift layers: their statistics and natural gradients.

Embedding, ``y = table[ids]`` with ``table`` ``(V, D)``. The lookup is the dense layer ``y = onehot(ids)^T W``
with ``W = table`` and no bias, so its K-FAC block is ``A (x) G`` (Martens & Grosse 2015) with

.. math::

    A = \frac{1}{N T} \sum_{i,t} e_{id_{i,t}} e_{id_{i,t}}^T = \mathrm{diag}(c), \qquad
    G = \sum_{i,t} p_{i,t} p_{i,t}^T ,

``c_v`` the frequency of token ``v`` among the ``N T`` looked-up ids and ``p`` the output-gradient rows (as for a
dense layer, :mod:`~optax_second_order.curvature.kronecker`). ``A`` is diagonal, so only ``c`` is kept (``V``
numbers, not ``V^2``), and ``(A + a I)^{-1}`` is ``1 / (c + a)``: the block's preconditioner is one ``D x D``
factor. A learned positional table looked up at positions ``0..T-1`` of every example is the same block, with
``c = 1/T`` on those rows.

Scale-and-shift, ``y = x * s + b`` per feature (LayerNorm's and RMSNorm's affine part). Its parameters are few
(``2 D``), so the block is the Fisher's exact diagonal from per-example gradients, as K-FAC-JAX's default
``ScaleAndShiftDiagonal`` block (Botev & Martens, K-FAC-JAX, 2022):

.. math::

    d_s = \sum_i \Big(\sum_t p_{i,t} \circ x_{i,t}\Big)^{\circ 2}, \qquad
    d_b = \sum_i \Big(\sum_t p_{i,t}\Big)^{\circ 2},

``p_{i,t} = sqrt(w_i / W) d l_i / d y_{i,t}`` (the rows of :func:`~optax_second_order.kronecker.layer_rows`), so
``sum_t p x`` is example ``i``'s gradient of the scale, weighted: ``d`` is the weighted mean of the squared
per-example gradients, the diagonal of the (true or empirical) Fisher, with no cross-example terms to estimate.

References: Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate curvature", ICML 2015;
Botev & Martens, "KFAC-JAX", 2022 (its ``ScaleAndShiftDiagonal`` and ``ScaleAndShiftFull`` blocks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "token_frequencies",
    "embedding_factors",
    "scale_and_shift_diagonal",
    "embedding_natural_gradient",
]

_HIGHEST = jax.lax.Precision.HIGHEST


def token_frequencies(ids: jax.Array, vocabulary: int, dtype) -> jax.Array:
    """``c``: the count of each token ``0..V-1`` in ``ids`` (any shape) over ``ids.size``: ``A``'s diagonal."""
    ids = jnp.reshape(ids, -1)
    counts = jnp.zeros(vocabulary, dtype).at[ids].add(1)
    return counts / max(ids.size, 1)


def embedding_factors(ids: jax.Array, output_grads: jax.Array, vocabulary: int) -> tuple[jax.Array, jax.Array]:
    """An embedding's ``(c, G)``: ``A = diag(c)`` the token frequencies, ``G = sum_rows p p^T``.

    ``ids``: the looked-up ids of every row ``(rows,)``; ``output_grads``: ``p`` ``(rows, D)``.
    """
    g = jnp.matmul(output_grads.T, output_grads, precision=_HIGHEST)
    return token_frequencies(ids, vocabulary, output_grads.dtype), g


def scale_and_shift_diagonal(inputs: jax.Array, output_grads: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(d_s, d_b)``: the exact Fisher diagonal of the scale and the shift, from rows grouped by example.

    ``inputs`` ``x`` and ``output_grads`` ``p``: ``(..., N, T, D)`` (any leading axes, a stack's ``L``); returns
    ``d_s = sum_i (sum_t p x)^2`` and ``d_b = sum_i (sum_t p)^2``, ``(..., D)``.
    """
    per_example_scale = jnp.sum(output_grads * inputs, axis=-2)
    per_example_shift = jnp.sum(output_grads, axis=-2)
    return jnp.sum(jnp.square(per_example_scale), axis=-2), jnp.sum(jnp.square(per_example_shift), axis=-2)


def embedding_natural_gradient(v: jax.Array, inverse_a: jax.Array, inverse_g: jax.Array) -> jax.Array:
    """``(A + a I)^{-1} V (G + g I)^{-1}`` with the diagonal ``(A + a I)^{-1}`` given as a vector ``(V,)``."""
    return inverse_a[:, None] * jnp.matmul(v, inverse_g, precision=_HIGHEST)
