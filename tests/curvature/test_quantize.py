"""The 4-bit Shampoo quantizer (curvature/quantize.py) against a NumPy reference written here from the paper
(Wang et al. 2024: linear-square codebook, blocks of 64 along each row with an absmax scale, nearest code), and the
error bounds the paper's construction gives (eigenvector error, orthogonality after Björck, inverse root)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_second_order.curvature import quantize as qz


def reference_codebook(bits):
    """The paper's Linear-2 map: R(j) = sign(t_j) t_j^2, t_j = -1 + 2 j / (2^b - 1), and t_{2^(b-1)-1} := 0."""
    n = 2**bits
    t = [-1.0 + 2.0 * j / (n - 1) for j in range(n)]
    t[n // 2 - 1] = 0.0
    return np.array([np.sign(x) * x * x for x in t])


def reference_quantize(x, bits, block):
    """Loop over rows and blocks: scale = max |block|, code = argmin_j |x / scale - R(j)| (first on ties)."""
    code = reference_codebook(bits)
    rows, cols = x.shape
    codes = np.zeros((rows, cols), np.int64)
    scales = np.zeros((rows, -(-cols // block)))
    for r in range(rows):
        for b in range(scales.shape[1]):
            part = x[r, b * block:(b + 1) * block]
            s = np.max(np.abs(part))
            scales[r, b] = s
            if s > 0:
                codes[r, b * block:(b + 1) * block] = [np.argmin(np.abs(v / s - code)) for v in part]
            else:
                codes[r, b * block:(b + 1) * block] = n_zero(bits)
    return codes, scales


def n_zero(bits):
    return 2 ** (bits - 1) - 1


def unpack(codes, bits, cols):
    codes = np.asarray(codes).astype(np.int64)
    if bits == 8:
        return codes
    return np.stack([codes & 15, codes >> 4], axis=-1).reshape(codes.shape[0], -1)[:, :cols]


def random_psd(rng, d, condition=1e3):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    eigenvalues = np.geomspace(1.0, 1.0 / condition, d)
    return (q * eigenvalues) @ q.T, eigenvalues, q


@pytest.mark.parametrize("bits", [4, 8])
def test_codebook_is_the_papers(bits):
    np.testing.assert_allclose(qz.linear_square_codebook(bits), reference_codebook(bits), rtol=0, atol=1e-7)
    code = qz.linear_square_codebook(bits)
    assert code.shape == (2**bits,) and np.all(np.diff(code) > 0) and code[n_zero(bits)] == 0.0


@pytest.mark.parametrize("bits,cols", [(4, 130), (4, 64), (8, 130), (4, 7)])
def test_quantize_matches_numpy_reference(bits, cols):
    rng = np.random.default_rng(bits + cols)
    x = rng.standard_normal((5, cols)).astype(np.float32)
    x[1] = 0.0  # a row of zeros: scale 0, zero codes
    q = qz.quantize(jnp.asarray(x), bits, 64)
    codes, scales = reference_quantize(x.astype(np.float64), bits, 64)
    np.testing.assert_allclose(np.asarray(q.scales), scales, rtol=1e-7)
    assert q.codes.dtype == jnp.uint8
    assert q.codes.shape == (5, cols if bits == 8 else -(-cols // 2))  # two 4-bit codes per byte
    np.testing.assert_array_equal(unpack(q.codes, bits, cols), codes)
    back = np.asarray(qz.dequantize(q, cols, bits, 64))
    expected = reference_codebook(bits)[codes] * np.repeat(scales, 64, axis=1)[:, :cols]
    np.testing.assert_allclose(back, expected, rtol=1e-6, atol=1e-7)
    # the error of nearest rounding: at most half the widest codebook gap times the block's scale
    gap = np.max(np.diff(reference_codebook(bits))) / 2
    assert np.all(np.abs(back - x) <= gap * np.repeat(scales, 64, axis=1)[:, :cols] + 1e-6)


def test_quantize_is_jittable_and_batched():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2, 70, 70)), jnp.float32)
    q = jax.jit(lambda a: qz.quantize(a, 4, 64))(x)
    assert q.codes.shape == (3, 2, 70, 35) and q.scales.shape == (3, 2, 70, 2)
    eager = qz.quantize(x[1, 0])
    np.testing.assert_array_equal(np.asarray(q.codes[1, 0]), np.asarray(eager.codes))
    np.testing.assert_array_equal(np.asarray(q.scales[1, 0]), np.asarray(eager.scales))
    back = jax.jit(lambda t: qz.dequantize(t, None, 4, 64))(q)
    np.testing.assert_allclose(np.asarray(back[1, 0]), np.asarray(qz.dequantize(eager, None, 4)), rtol=1e-6)


@pytest.mark.parametrize("bits,vector_error,root_error", [(4, 0.1, 0.1), (8, 0.006, 0.006)])
def test_eigenvector_quantization_error_bounds(bits, vector_error, root_error):
    """The paper's construction: quantize U (rows of U^T), rectify, rebuild the inverse 4th root from U and the
    float32 eigenvalues. Bounds (d = 128, condition 1e3, fixed seed; measured 4-bit 0.076 / 0.06, 8-bit 0.0045 /
    0.0035): the eigenvector error ||V - U||_F / ||U||_F, ||V^T V - I||_2 after 4 Björck steps at float32 rounding,
    and the root's error against eigh; quantizing A itself (the naive 4-bit Shampoo) is several times worse."""
    rng = np.random.default_rng(1)
    a, eigenvalues, _ = random_psd(rng, 128)
    w, u = np.linalg.eigh(a)
    quantizer = qz.Quantizer(bits)
    stored = quantizer.store_basis(jnp.asarray(u, jnp.float32))
    raw = np.asarray(quantizer.load_basis(stored, 0), np.float64)
    rectified = np.asarray(quantizer.load_basis(stored, 4), np.float64)
    eye = np.eye(128)
    assert np.linalg.norm(rectified - u) / np.linalg.norm(u) <= vector_error
    assert np.linalg.norm(rectified - u) <= np.linalg.norm(raw - u)  # rectification brings V closer to U
    assert np.linalg.norm(rectified.T @ rectified - eye, 2) <= 1e-5
    assert np.linalg.norm(rectified.T @ rectified - eye, 2) < 0.01 * np.linalg.norm(raw.T @ raw - eye, 2)

    def root(vectors, values):
        return (vectors * (values + 1e-6 * values.max()) ** -0.25) @ vectors.T

    exact = root(u, w)
    rebuilt = root(rectified, w)
    error = np.linalg.norm(rebuilt - exact) / np.linalg.norm(exact)
    assert error <= root_error
    naive = np.asarray(qz.dequantize(qz.quantize(jnp.asarray(a, jnp.float32), bits, 64), None, bits, 64), np.float64)
    naive_w, naive_u = np.linalg.eigh((naive + naive.T) / 2)
    naive_error = np.linalg.norm(root(naive_u, np.maximum(naive_w, 0.0)) - exact) / np.linalg.norm(exact)
    assert naive_error > 3 * error


def test_symmetric_storage_keeps_the_diagonal():
    rng = np.random.default_rng(2)
    a, _, _ = random_psd(rng, 96)
    quantizer = qz.Quantizer(4)
    stored = quantizer.store_symmetric(jnp.asarray(a, jnp.float32))
    back = np.asarray(quantizer.load_symmetric(stored))
    np.testing.assert_array_equal(np.diag(back), np.diag(a).astype(np.float32))
    assert stored.off_diagonal.codes.shape == (96, 48)
    assert np.linalg.norm(back - a) / np.linalg.norm(a) < 0.1


def test_storage_bytes_shrink():
    d = 128
    storage4 = qz.FactorStorage(jnp.float32, jnp.float32, qz.Quantizer(4))
    storage8 = qz.FactorStorage(jnp.bfloat16, jnp.float32, qz.Quantizer(8))
    eye = jnp.eye(d)
    assert qz.nbytes(storage4.store_basis(eye)) == d * d // 2 + 4 * d * 2  # 9 KiB against 64 KiB in float32
    assert qz.nbytes(storage8.store_basis(eye)) == d * d + 4 * d * 2
    assert qz.nbytes(storage8.store(eye)) == 2 * d * d
    small = qz.FactorStorage(jnp.float32, jnp.float32, qz.Quantizer(4))
    assert isinstance(small.store_basis(jnp.eye(32)), jax.Array)  # below min_size (4096 entries): kept dense


def test_bjorck_converges_quadratically():
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    v = jnp.asarray(q + 0.005 * rng.standard_normal((64, 64)), jnp.float32)
    errors = [float(jnp.linalg.norm(qz.bjorck(v, k).T @ qz.bjorck(v, k) - jnp.eye(64), 2)) for k in range(4)]
    assert 0.05 < errors[0] < 0.5 and errors[1] <= errors[0] ** 2 and errors[2] <= max(errors[1] ** 2, 2e-6)
    assert errors[3] < 2e-6


def test_options():
    assert qz.as_quantizer("t", None) is None
    assert qz.as_quantizer("t", 4) == qz.Quantizer(4)
    assert qz.as_quantizer("t", jnp.asarray(8)) == qz.Quantizer(8)
    with pytest.raises(ValueError, match="quantize"):
        qz.as_quantizer("t", 3)
    with pytest.raises(TypeError, match="static_args"):
        jax.jit(lambda b: qz.as_quantizer("t", b))(4)
    with pytest.raises(ValueError, match="bits"):
        qz.Quantizer(2)
    assert qz.as_state_dtype("t", "bfloat16") == jnp.bfloat16
    assert qz.as_state_dtype("t", jnp.bfloat16) == jnp.bfloat16
    with pytest.raises(ValueError, match="state_dtype"):
        qz.as_state_dtype("t", jnp.int8)
