"""Shape helpers for Kronecker-factored preconditioners (Shampoo, SOAP).

A gradient ``G`` of order ``k`` has one factor per mode ``i``, built from the mode-``i`` unfolding
``G_(i)`` (the ``d_i x prod_{j != i} d_j`` matrix whose columns are the mode-``i`` fibres):

* :func:`mode_gram`: ``G_(i) G_(i)^T``, the mode-``i`` statistic;
* :func:`mode_dot`: ``G x_i M^T``, i.e. ``M^T`` applied to every mode-``i`` fibre (``M`` symmetric: ``G x_i M``);
* :func:`merge_small_dims`: Anil et al. (2020)'s "best-effort shape interpretation": consecutive
  dimensions are merged while their product stays ``<= max_dim`` (size-1 dimensions disappear), so a
  ``3 x 3 x 64 x 128`` convolution kernel is preconditioned as a ``576 x 128`` matrix; the last dimension stays
  on its own, so a small matrix keeps its two factors;
* :func:`to_blocks` / :func:`from_blocks`: dimensions above ``block_size`` are cut into blocks of
  ``block_size`` (the last one zero-padded), each block getting its own factors (Anil et al. 2020, sec. 5.1);
  the blocks of a tensor are stacked, so :func:`batched_mode_gram` and :func:`batched_mode_dot` treat them all
  in one operation.

References: Gupta, Koren & Singer, "Shampoo: Preconditioned Stochastic Tensor Optimization" (2018);
Anil et al., "Scalable Second Order Optimization for Deep Learning" (2020).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = [
    "mode_gram", "mode_dot", "merge_small_dims", "block_layout", "to_blocks", "from_blocks", "batched_mode_gram",
    "batched_mode_dot", "block_norms",
]


def mode_gram(x: jax.Array, axis: int) -> jax.Array:
    """``X_(axis) X_(axis)^T``: contract ``x`` with itself over every axis except ``axis``."""
    others = [a for a in range(x.ndim) if a != axis]
    return jnp.tensordot(x, x, axes=(others, others), precision=jax.lax.Precision.HIGHEST)


def mode_dot(x: jax.Array, matrix: jax.Array, axis: int) -> jax.Array:
    """``y[..., a, ...] = sum_j x[..., j, ...] matrix[j, a]`` along ``axis`` (``x x_axis matrix^T``)."""
    y = jnp.tensordot(x, matrix, axes=([axis], [0]), precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(y, -1, axis)


def merge_small_dims(shape: Sequence[int], max_dim: int) -> tuple[int, ...]:
    """Merge consecutive dimensions while their product stays ``<= max_dim``; drop size-1 dimensions; keep the last
    dimension of a tensor of order >= 2 on its own.

    ``(3, 3, 64, 128), 1024 -> (576, 128)``; ``(1, 10), 1024 -> (10,)``; ``(30, 32), 1024 -> (30, 32)``:
    a small matrix keeps its two Kronecker factors (``30 x 30`` and ``32 x 32``) instead of one ``960 x 960``
    full-matrix factor of ``vec(G)``, which costs ~40x the step of the others for no gain the factors lack.
    """
    dims = [d for d in shape if d > 1]
    if len(dims) <= 1:
        return tuple(dims)
    merged: list[int] = []
    product = 1
    for d in dims[:-1]:
        if product * d <= max_dim:
            product *= d
        else:
            if product > 1:
                merged.append(product)
            product = d
    if product > 1:
        merged.append(product)
    return (*merged, dims[-1])


def block_layout(shape: Sequence[int], block_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(counts, block_shape)``: a dimension above ``block_size`` is cut into ``ceil(d / block_size)``
    blocks of ``block_size`` (the last one zero-padded); a smaller one is a single block of its own size."""
    counts = tuple(math.ceil(d / block_size) if d > block_size else 1 for d in shape)
    return counts, tuple(min(d, block_size) for d in shape)


def to_blocks(x: jax.Array, block_size: int) -> jax.Array:
    """The blocks of ``x`` stacked along a new leading axis (row-major block order), ``[n, *block_shape]``.

    A zero-padded last block changes no Kronecker factor's action on the real entries: its factor is
    ``diag(S, 0)``, whose root is ``diag(S_root, delta^{-1/p} I)``, and the padded rows multiply zeros.
    """
    counts, bshape = block_layout(x.shape, block_size)
    x = jnp.pad(x, [(0, c * b - d) for d, c, b in zip(x.shape, counts, bshape)])
    x = x.reshape([v for c, b in zip(counts, bshape) for v in (c, b)])
    k = len(bshape)
    x = x.transpose([2 * i for i in range(k)] + [2 * i + 1 for i in range(k)])
    return x.reshape((-1, *bshape))


def block_norms(x: jax.Array, block_size: int) -> jax.Array:
    """The Frobenius norm of every block of ``x``, ``[n]`` in :func:`to_blocks`' order, without moving the blocks
    together: a sum of squares over the within-block axes of ``x`` reshaped to ``(c_1, b_1, ..., c_k, b_k)``
    (zero padding adds nothing)."""
    counts, bshape = block_layout(x.shape, block_size)
    x = jnp.pad(x, [(0, c * b - d) for d, c, b in zip(x.shape, counts, bshape)])
    x = x.reshape([v for c, b in zip(counts, bshape) for v in (c, b)])
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, 2 * len(bshape), 2)))).reshape(-1)


def from_blocks(blocks: jax.Array, shape: Sequence[int], block_size: int) -> jax.Array:
    """Inverse of :func:`to_blocks`."""
    counts, bshape = block_layout(shape, block_size)
    k = len(bshape)
    x = blocks.reshape((*counts, *bshape))
    x = x.transpose([v for i in range(k) for v in (i, k + i)])
    x = x.reshape([c * b for c, b in zip(counts, bshape)])
    return x[tuple(slice(0, d) for d in shape)]


def batched_mode_gram(blocks: jax.Array, axis: int) -> jax.Array:
    """:func:`mode_gram` of every block of a ``[n, ...]`` stack along block axis ``axis``: ``[n, d, d]``."""
    others = tuple(a for a in range(1, blocks.ndim) if a != axis + 1)
    return jax.lax.dot_general(
        blocks, blocks, ((others, others), ((0,), (0,))), precision=jax.lax.Precision.HIGHEST
    )


def batched_mode_dot(blocks: jax.Array, matrices: jax.Array, axis: int) -> jax.Array:
    """:func:`mode_dot` of every block with its own matrix (``matrices`` is ``[n, d, d]``)."""
    y = jax.lax.dot_general(
        blocks, matrices, (((axis + 1,), (1,)), ((0,), (0,))), precision=jax.lax.Precision.HIGHEST
    )
    return jnp.moveaxis(y, -1, axis + 1)
