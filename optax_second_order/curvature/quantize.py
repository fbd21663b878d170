"""Low-precision storage of Kronecker matrices: block-wise 4- and 8-bit quantization with orthogonal rectification.

The quantizer of Wang, Zhou, Li & Huang, "4-bit Shampoo for Memory-Efficient Network Training" (NeurIPS 2024):

* **linear-square codebook** of ``2^b`` values in ``[-1, 1]``: ``c_j = sign(t_j) t_j^2`` with
  ``t = linspace(-1, 1, 2^b)``, entry ``2^(b-1) - 1`` (the last negative one) replaced by 0 so that zero is
  exact (:func:`linear_square_codebook`);
* **block-wise normalization**: each row of a matrix is cut into blocks of ``block_size`` (64, the paper's) entries;
  each block keeps its absolute maximum ``s`` in float32 and every entry ``x`` the index of the code nearest to
  ``x / s`` (ties to the lower index) (:func:`quantize`, :func:`dequantize`);
* what is quantized is an **eigenvector matrix** ``U`` (``A = U diag(lambda) U^T``), each eigenvector a row of
  ``U^T`` so that it has its own scales, with the eigenvalues kept in float32: quantizing ``A`` itself destroys its
  small eigenvalues, which dominate an inverse root (the paper's Fig. 2 and Table 1);
* **orthogonal rectification** after dequantization: Björck's iteration ``V <- 3/2 V - 1/2 V V^T V`` (Björck &
  Bowie 1971) pulls the dequantized ``V`` back to the nearest orthogonal matrix (converging while
  ``||V^T V - I||_2 < 1``); the paper runs ``t1 = 1`` iteration where a statistic is rebuilt and ``t2 = 4`` before
  an inverse root (:func:`bjorck`, :class:`Quantizer`);
* a matrix that is not orthogonal (an inverse root) keeps its diagonal in float32 and quantizes the rest
  (:meth:`Quantizer.store_symmetric`); matrices with fewer than ``min_size = 4096`` entries stay unquantized
  (the paper's ``min_lowbit_size``; what they would save is small).

Storage: 8-bit codes take one ``uint8`` each; 4-bit codes are **packed two per byte** (entry ``2k`` in the low
nibble, ``2k + 1`` in the high one), so a ``d x d`` matrix takes ``d ceil(d / 2)`` bytes plus ``4 d ceil(d / 64)``
bytes of scales (at ``d = 128``: 9 KiB against 64 KiB in float32).

:class:`FactorStorage` is the one storage option of the Kronecker methods: a dense dtype (``state_dtype``: float32,
or bfloat16 storage with float32 compute) and an optional :class:`Quantizer` (``quantize``: 4 or 8 bits) for the
matrices that have an eigenbasis. Every function is pure and jittable and works on stacks ``[..., d, d]``.

References: Wang et al. (2024), arXiv:2405.18144, and its code (github.com/Sike-Wang/low-bit-Shampoo: codebook
``linear-2``, ``quan_blocksize=64``, ``rect_t1=1``, ``rect_t2=4``, ``min_lowbit_size=4096``); Dettmers et al.,
"8-bit Optimizers via Block-wise Quantization" (2022); Björck & Bowie, "An iterative algorithm for computing the
best estimate of an orthogonal matrix" (SIAM J. Numer. Anal. 1971).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_second_order.curvature.matrix import eigh_psd

__all__ = [
    "linear_square_codebook", "Quantized", "Eigenpairs", "SymmetricQuantized", "quantize", "dequantize", "bjorck", "Quantizer",
    "FactorStorage", "as_quantizer", "as_state_dtype", "units_finite", "select_units", "nbytes",
]

_HIGHEST = jax.lax.Precision.HIGHEST
BITS = (4, 8)


def linear_square_codebook(bits: int) -> np.ndarray:
    """The paper's linear-square codebook: ``sign(t) t^2`` for ``t = linspace(-1, 1, 2^bits)``, with entry
    ``2^(bits-1) - 1`` set to 0 (ascending, float32, ``2^bits`` entries)."""
    if bits not in BITS:
        raise ValueError(f"linear_square_codebook: bits must be one of {BITS}, got {bits!r}")
    t = np.linspace(-1.0, 1.0, 2**bits)
    t[2 ** (bits - 1) - 1] = 0.0
    return (np.sign(t) * t * t).astype(np.float32)


class Quantized(NamedTuple):
    """A quantized ``[..., r, c]`` array: ``codes`` ``uint8`` ``[..., r, c]`` (8-bit) or ``[..., r, ceil(c / 2)]``
    (4-bit, two per byte), and ``scales`` float32 ``[..., r, ceil(c / block_size)]`` (each block's absmax)."""

    codes: jax.Array
    scales: jax.Array


class Eigenpairs(NamedTuple):
    """A PSD matrix ``U diag(values) U^T`` kept as its float32 ``values`` ``[..., d]`` and its eigenbasis ``U``
    quantized by :meth:`Quantizer.store_basis` (the paper's form of a statistic)."""

    values: jax.Array
    vectors: Quantized


class SymmetricQuantized(NamedTuple):
    """A symmetric matrix stored as its float32 ``diagonal`` ``[..., d]`` and the quantized rest ``off_diagonal``
    (the matrix with a zero diagonal)."""

    diagonal: jax.Array
    off_diagonal: Quantized


def _blocks_of(columns: int, block_size: int) -> int:
    return -(-columns // block_size)


def _code_value(j: jax.Array, bits: int) -> jax.Array:
    """Entry ``j`` of :func:`linear_square_codebook`, computed elementwise (no table lookup: a gather from a constant
    table does not take the sharding of sharded codes on an ``Explicit`` mesh)."""
    levels = 2**bits - 1
    t = -1.0 + 2.0 * j.astype(jnp.float32) / levels
    t = jnp.where(j == 2 ** (bits - 1) - 1, 0.0, t)
    return jnp.sign(t) * t * t


def _nearest_code(v: jax.Array, bits: int) -> jax.Array:
    """The index of the code nearest to each ``v`` in ``[-1, 1]`` (ties: the lower index), elementwise: the codes
    ``floor(u) - 1 .. floor(u) + 2`` around ``u = (sign(v) sqrt|v| + 1) (2^bits - 1) / 2`` (where ``v`` falls on the
    codebook's square-root scale) contain the nearest one, also next to the zero code."""
    levels = 2**bits - 1
    base = jnp.floor((jnp.sign(v) * jnp.sqrt(jnp.abs(v)) + 1.0) * (levels / 2.0)).astype(jnp.int32)
    best = jnp.clip(base - 1, 0, levels)
    best_error = jnp.abs(v - _code_value(best, bits))
    for k in (0, 1, 2):
        j = jnp.clip(base + k, 0, levels)
        error = jnp.abs(v - _code_value(j, bits))
        better = error < best_error
        best, best_error = jnp.where(better, j, best), jnp.where(better, error, best_error)
    return best


def quantize(x: jax.Array, bits: int = 4, block_size: int = 64) -> Quantized:
    """Block-wise quantization of ``x`` (``[..., r, c]``, blocks of ``block_size`` along the last axis) to the
    linear-square codebook: per block the absmax ``s`` (float32), per entry the nearest code to ``x / s``.

    A block of zeros has scale 0 (its codes are the zero code). A non-finite entry makes its block's scale
    non-finite: callers quantize finite matrices only.
    """
    x = jnp.asarray(x, jnp.float32)
    *batch, rows, columns = x.shape
    nblocks = _blocks_of(columns, block_size)
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nblocks * block_size - columns)])
    blocks = padded.reshape(*batch, rows, nblocks, block_size)
    scales = jnp.max(jnp.abs(blocks), axis=-1)
    normalized = blocks / jnp.where(scales > 0, scales, 1.0)[..., None]
    codes = _nearest_code(normalized, bits).astype(jnp.uint8)
    codes = codes.reshape(*batch, rows, nblocks * block_size)[..., :columns]
    if bits == 4:
        if columns % 2:
            codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 1)])
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return Quantized(codes, scales)


def dequantize(q: Quantized, columns: int | None = None, bits: int = 4, block_size: int = 64,
               dtype: Any = jnp.float32) -> jax.Array:
    """The ``[..., r, c]`` array of :func:`quantize` back (``columns = c``; default ``r``, a square matrix)."""
    rows = q.codes.shape[-2]
    columns = rows if columns is None else columns
    codes = q.codes
    if bits == 4:
        codes = jnp.stack([codes & 15, codes >> 4], axis=-1).reshape(*codes.shape[:-1], -1)[..., :columns]
    values = _code_value(codes.astype(jnp.int32), bits)
    nblocks = q.scales.shape[-1]
    values = jnp.pad(values, [(0, 0)] * (values.ndim - 1) + [(0, nblocks * block_size - columns)])
    values = values.reshape(*values.shape[:-1], nblocks, block_size) * q.scales[..., None]
    return values.reshape(*values.shape[:-2], nblocks * block_size)[..., :columns].astype(dtype)


def bjorck(v: jax.Array, iterations: int) -> jax.Array:
    """``iterations`` steps of Björck's orthonormalization ``V <- 3/2 V - 1/2 V (V^T V)`` (batched): quadratic
    convergence to the orthogonal polar factor of ``V`` while ``||V^T V - I||_2 < 1``."""
    for _ in range(iterations):
        gram = jnp.matmul(jnp.swapaxes(v, -1, -2), v, precision=_HIGHEST)
        v = 1.5 * v - 0.5 * jnp.matmul(v, gram, precision=_HIGHEST)
    return v


@dataclasses.dataclass(frozen=True)
class Quantizer:
    """The paper's quantizer settings (defaults: its code's).

    Attributes:
      bits: 4 or 8.
      block_size: entries per scale along a row (64).
      min_size: matrices with fewer entries stay unquantized (4096: ``d < 64``).
      rectify: Björck iterations where a stored eigenbasis is used or a statistic rebuilt (``t1 = 1``).
      root_rectify: Björck iterations before an inverse root is built from a stored eigenbasis (``t2 = 4``).
    """

    bits: int = 4
    block_size: int = 64
    min_size: int = 4096
    rectify: int = 1
    root_rectify: int = 4

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"Quantizer: bits must be one of {BITS}, got {self.bits!r}")
        for name in ("block_size", "min_size", "rectify", "root_rectify"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "block_size" else 0):
                raise ValueError(f"Quantizer: {name} must be an integer >= {1 if name == 'block_size' else 0}, "
                                 f"got {value!r}")

    def applies(self, dim: int) -> bool:
        """Whether ``dim x dim`` matrices are quantized (at least ``min_size`` entries)."""
        return dim * dim >= self.min_size

    def store_basis(self, v: jax.Array) -> Quantized:
        """An orthogonal ``V`` (eigenvectors as columns, ``[..., d, d]``), quantized eigenvector by eigenvector (the
        rows of ``V^T``)."""
        return quantize(jnp.swapaxes(v, -1, -2), self.bits, self.block_size)

    def load_basis(self, q: Quantized, iterations: int, dtype: Any = jnp.float32) -> jax.Array:
        """``V`` back from :meth:`store_basis`, rectified by ``iterations`` Björck steps."""
        vt = dequantize(q, None, self.bits, self.block_size, dtype)
        return jnp.swapaxes(bjorck(vt, iterations), -1, -2)  # Björck commutes with the transpose

    def store_symmetric(self, a: jax.Array) -> SymmetricQuantized:
        """A symmetric ``A`` (an inverse root): its diagonal in float32, the rest quantized row by row."""
        diagonal = jnp.diagonal(a, axis1=-2, axis2=-1).astype(jnp.float32)
        eye = jnp.eye(a.shape[-1], dtype=bool)
        return SymmetricQuantized(diagonal, quantize(jnp.where(eye, 0.0, a), self.bits, self.block_size))

    def load_symmetric(self, s: SymmetricQuantized, dtype: Any = jnp.float32) -> jax.Array:
        """``A`` back from :meth:`store_symmetric`."""
        rest = dequantize(s.off_diagonal, None, self.bits, self.block_size, dtype)
        eye = jnp.eye(rest.shape[-1], dtype=dtype)
        return rest + eye * s.diagonal.astype(dtype)[..., None, :]


def as_quantizer(transform: str, value: Any) -> Quantizer | None:
    """``quantize=`` as given to a transformation: ``None`` (no quantization), 4 or 8 (bits, the paper's other
    settings) or a :class:`Quantizer`; a ``ValueError`` otherwise, a ``TypeError`` for a traced value."""
    if value is None or isinstance(value, Quantizer):
        return value
    try:
        bits = float(value)
    except jax.errors.JAXTypeError as error:
        raise TypeError(f"{transform}: quantize sets the state's layout and cannot be a traced value; with "
                        f"optax.inject_hyperparams pass static_args=('quantize',)") from error
    except TypeError:
        bits = None
    if isinstance(value, bool) or bits not in BITS:
        raise ValueError(f"{transform}: quantize must be None, 4, 8 or a Quantizer, got {value!r}")
    return Quantizer(int(bits))


def as_state_dtype(transform: str, value: Any) -> jnp.dtype | None:
    """``state_dtype=`` as given to a transformation: ``None`` (the statistics' float32-or-better dtype) or a
    floating dtype (``jnp.bfloat16``, ``"bfloat16"``, ...); a ``ValueError`` otherwise."""
    if value is None:
        return None
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{transform}: state_dtype must be None or a floating dtype (jnp.bfloat16, 'bfloat16', "
                         f"jnp.float32), got {value!r}; with optax.inject_hyperparams pass it as a string or in "
                         f"static_args")
    return dtype


@dataclasses.dataclass(frozen=True)
class FactorStorage:
    """How a Kronecker method stores its ``[n, d, d]`` stacks: dense in ``dtype`` (computing in ``compute``), or,
    where ``quantizer`` applies to ``d``, quantized (eigenbases by :meth:`Quantizer.store_basis`, inverse roots
    by :meth:`Quantizer.store_symmetric`).

    ``store_*`` take compute-dtype arrays and return what the state holds; ``load_*`` the reverse. A dense store is
    a cast (bfloat16 storage rounds to nearest), its load a cast back.
    """

    dtype: Any
    compute: Any
    quantizer: Quantizer | None = None

    def quantized(self, dim: int) -> bool:
        """Whether ``dim x dim`` matrices are stored quantized."""
        return self.quantizer is not None and self.quantizer.applies(dim)

    def store(self, x: jax.Array) -> jax.Array:
        return x.astype(self.dtype)

    def load(self, x: jax.Array) -> jax.Array:
        return x.astype(self.compute)

    def store_basis(self, v: jax.Array) -> Any:
        return self.quantizer.store_basis(v) if self.quantized(v.shape[-1]) else self.store(v)

    def load_basis(self, stored: Any, root: bool = False) -> jax.Array:
        """An eigenbasis back, rectified by ``rectify`` (``root_rectify`` with ``root``) Björck steps if quantized."""
        if isinstance(stored, Quantized):
            q = self.quantizer
            return q.load_basis(stored, q.root_rectify if root else q.rectify, self.compute)
        return self.load(stored)

    def store_psd(self, m: jax.Array) -> Any:
        """A PSD statistic: dense, or as :class:`Eigenpairs` (``eigh``, eigenvalues clipped at 0)."""
        if not self.quantized(m.shape[-1]):
            return self.store(m)
        values, vectors = eigh_psd(m)
        return Eigenpairs(values.astype(jnp.float32), self.quantizer.store_basis(vectors))

    def zero_psd(self, n: int, dim: int) -> Any:
        """``n`` zero ``dim x dim`` statistics as stored (fresh buffers)."""
        if not self.quantized(dim):
            return jnp.zeros((n, dim, dim), self.dtype)
        return Eigenpairs(jnp.zeros((n, dim), jnp.float32), self.quantizer.store_basis(
            jnp.broadcast_to(jnp.eye(dim, dtype=jnp.float32), (n, dim, dim))))

    def load_psd(self, stored: Any) -> jax.Array:
        """A statistic back: ``V diag(values) V^T`` with ``V`` rectified by ``rectify`` Björck steps if stored as
        :class:`Eigenpairs`."""
        if isinstance(stored, Eigenpairs):
            v = self.load_basis(stored.vectors)
            return jnp.matmul(v * stored.values.astype(self.compute)[..., None, :], jnp.swapaxes(v, -1, -2),
                              precision=_HIGHEST)
        return self.load(stored)

    def store_symmetric(self, a: jax.Array) -> Any:
        return self.quantizer.store_symmetric(a) if self.quantized(a.shape[-1]) else self.store(a)

    def identity_symmetric(self, n: int, dim: int) -> Any:
        """``n`` identity matrices as :meth:`store_symmetric` stores them (fresh buffers)."""
        eye = jnp.broadcast_to(jnp.eye(dim, dtype=self.compute), (n, dim, dim)) + jnp.zeros((), self.compute)
        return self.store_symmetric(eye)

    def load_symmetric(self, stored: Any) -> jax.Array:
        if isinstance(stored, SymmetricQuantized):
            return self.quantizer.load_symmetric(stored, self.compute)
        return self.load(stored)


def units_finite(stored: Any) -> jax.Array:
    """Per unit (leading axis) of a stored stack (an array or a quantized tuple): whether its floating entries
    (values, scales, diagonals) are all finite."""
    leaves = [x for x in jax.tree.leaves(stored) if jnp.issubdtype(x.dtype, jnp.inexact)]
    flags = [jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim))) for x in leaves]
    return flags[0] if len(flags) == 1 else jnp.stack(flags).all(axis=0)


def select_units(ok: jax.Array, new: Any, old: Any) -> Any:
    """Per unit: ``new`` where ``ok`` (``[n]`` bool), else ``old`` (trees of stacks alike)."""
    return jax.tree.map(lambda a, b: jnp.where(ok.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)


def nbytes(tree: Any) -> int:
    """Bytes of every array of ``tree`` at its stored size (``uint8`` codes one byte each)."""
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
