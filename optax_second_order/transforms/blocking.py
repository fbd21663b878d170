"""Shape helpers for Kronecker-factored preconditioners (Shampoo, SOAP).

A gradient ``G`` of order ``k`` has one factor per mode ``i``, built from the mode-``i`` unfolding
``G_(i)`` (the ``d_i x prod_{j != i} d_j`` matrix whose columns are the mode-``i`` fibres):

* :func:`mode_gram`: ``G_(i) G_(i)^T``, the mode-``i`` statistic;
* :func:`mode_dot`: ``G x_i M^T``, i.e. ``M^T`` applied to every mode-``i`` fibre (``M`` symmetric: ``G x_i M``);
* :func:`merge_small_dims`: Anil et al. (2020)'s "best-effort shape interpretation": consecutive
  dimensions are merged while their product stays ``<= max_dim`` (size-1 dimensions disappear), so a
  ``3 x 3 x 64 x 128`` convolution kernel is preconditioned as a ``576 x 128`` matrix;
* :func:`split_blocks` / :func:`merge_blocks`: dimensions above ``block_size`` are cut into blocks of
  ``block_size`` (the last one smaller), each block getting its own factors (Anil et al. 2020, sec. 5.1).

References: Gupta, Koren & Singer, "Shampoo: Preconditioned Stochastic Tensor Optimization" (2018);
Anil et al., "Scalable Second Order Optimization for Deep Learning" (2020).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = ["mode_gram", "mode_dot", "merge_small_dims", "block_grid", "split_blocks", "merge_blocks"]


def mode_gram(x: jax.Array, axis: int) -> jax.Array:
    """``X_(axis) X_(axis)^T``: contract ``x`` with itself over every axis except ``axis``."""
    others = [a for a in range(x.ndim) if a != axis]
    return jnp.tensordot(x, x, axes=(others, others), precision=jax.lax.Precision.HIGHEST)


def mode_dot(x: jax.Array, matrix: jax.Array, axis: int) -> jax.Array:
    """``y[..., a, ...] = sum_j x[..., j, ...] matrix[j, a]`` along ``axis`` (``x x_axis matrix^T``)."""
    y = jnp.tensordot(x, matrix, axes=([axis], [0]), precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(y, -1, axis)


def merge_small_dims(shape: Sequence[int], max_dim: int) -> tuple[int, ...]:
    """Merge consecutive dimensions while their product stays ``<= max_dim``; drop size-1 dimensions.

    ``(3, 3, 64, 128), 1024 -> (576, 128)``; ``(1, 10), 1024 -> (10,)``; ``(), _ -> ()``.
    """
    merged: list[int] = []
    product = 1
    for d in shape:
        if product * d <= max_dim:
            product *= d
        else:
            if product > 1:
                merged.append(product)
            product = d
    if product > 1:
        merged.append(product)
    return tuple(merged)


def _bounds(dim: int, block_size: int) -> list[slice]:
    return [slice(s, min(s + block_size, dim)) for s in range(0, dim, block_size)]


def block_grid(shape: Sequence[int], block_size: int) -> list[tuple[slice, ...]]:
    """The blocks of a tensor of ``shape``, row-major: every dimension cut every ``block_size``."""
    return list(itertools.product(*(_bounds(d, block_size) for d in shape)))


def block_shape(block: tuple[slice, ...]) -> tuple[int, ...]:
    """The shape of one block of :func:`block_grid`."""
    return tuple(s.stop - s.start for s in block)


def split_blocks(x: jax.Array, block_size: int) -> list[jax.Array]:
    """The blocks of ``x`` in :func:`block_grid` order."""
    return [x[block] for block in block_grid(x.shape, block_size)]


def merge_blocks(blocks: Sequence[jax.Array], shape: Sequence[int], block_size: int) -> jax.Array:
    """Inverse of :func:`split_blocks`."""
    grid = block_grid(shape, block_size)
    if len(grid) == 1:
        return blocks[0]
    counts = [math.ceil(d / block_size) for d in shape]
    # Concatenate along the last axis first, then outwards (row-major grid order).
    tiles: list = list(blocks)
    for axis in reversed(range(len(shape))):
        n = counts[axis]
        tiles = [jnp.concatenate(tiles[i : i + n], axis=axis) for i in range(0, len(tiles), n)]
    return tiles[0]
