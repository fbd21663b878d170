"""Matrix functions of symmetric PSD matrices against references built from a *known* spectrum.

Test matrices are ``M = Q diag(lambda) Q^T`` with a random orthogonal ``Q`` and a chosen spectrum, so
the float64 reference ``Q diag(f(lambda)) Q^T`` needs no eigensolver. For float32 the reference is
recomputed in float64 (NumPy) from the *same float32-rounded input*: the metric is
``||R - R_ref||_F / ||R_ref||_F``, the algorithm's own error on its input.

Float32 accuracy (n = 32, spectra geometric / linear / two clusters; run
``pytest tests/curvature/test_matrix.py -k float32 -s`` to print them): any float32 algorithm's
error is of order ``cond * u / p`` (``u = 2^-24``), since the small eigenvalues of a float32
matrix are only determined to ``u * lambda_max``. Measured: ``<= 2e-5`` for every
``p in {1, 2, 3, 4, 6, 8}`` at condition number 1e3; at 1e4 ``<= 8e-5`` for ``p >= 2`` but
``1.5e-4`` for ``p = 1`` (two-cluster spectrum). The test asserts ``<= 1e-4`` where it holds and
``<= 4 u cond / p`` for every case.
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from optax_second_order.curvature.matrix import (  # noqa: E402
    damped_inverse,
    eigh_psd,
    inverse_pth_root,
    symmetrize,
)

N = 32
PS = (1, 2, 3, 4, 6, 8)
U32 = 2.0**-24


def random_orthogonal(n, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return q * np.sign(np.diag(r))


def spectra(cond, n=N):
    """Three spectra with ``lambda_max = 1`` and ``lambda_min = 1 / cond``."""
    return np.stack(
        [
            np.logspace(0, -np.log10(cond), n),
            np.linspace(1, 1 / cond, n),
            np.where(np.arange(n) < n // 2, 1.0, 1 / cond),
        ]
    )


def build(q, lam):
    """``Q diag(lam) Q^T`` for each row of ``lam`` (batched over its leading dimension)."""
    return np.einsum("ij,...j,kj->...ik", q, lam, q)


def reference_root(matrix64, p, delta=0.0):
    """``(M + delta I)^{-1/p}`` by NumPy float64 eigh (reference for float32-rounded inputs)."""
    lam, q = np.linalg.eigh(matrix64)
    return np.einsum("...ij,...j,...kj->...ik", q, (lam + delta) ** (-1.0 / p), q)


def relative_errors(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected, axis=(-2, -1)) / np.linalg.norm(expected, axis=(-2, -1))


root_fn = jax.jit(inverse_pth_root)  # p traced: one compilation per shape and dtype


@pytest.mark.parametrize("p", PS)
def test_float64_matches_known_spectrum(p):
    q = random_orthogonal(N, 0)
    lam = spectra(1e4)
    root, ok = root_fn(jnp.asarray(build(q, lam)), p, 0.0)
    assert root.dtype == jnp.float64 and ok.all()
    errors = relative_errors(root, build(q, lam ** (-1.0 / p)))
    assert errors.max() <= 1e-9, errors


@pytest.mark.parametrize("cond", [1e3, 1e4])
@pytest.mark.parametrize("p", PS)
def test_float32_relative_error(p, cond):
    matrix32 = build(random_orthogonal(N, 1), spectra(cond)).astype(np.float32)
    root, ok = root_fn(jnp.asarray(matrix32), p, 0.0)
    assert root.dtype == jnp.float32 and ok.all()
    errors = relative_errors(root, reference_root(matrix32.astype(np.float64), p))
    print(f"float32 p={p} cond={cond:.0e}: relative errors (geometric, linear, clusters) {errors}")
    assert errors.max() <= 4 * U32 * cond / p
    if cond <= 1e3 or p >= 2:
        assert errors.max() <= 1e-4


def test_rayleigh_eigenvalues_beat_plain_eigh_in_float32():
    """The Rayleigh-quotient eigenvalues of ``eigh_psd`` make the ``p = 1`` root more accurate."""
    matrix32 = build(random_orthogonal(N, 2), spectra(1e4)[1:]).astype(np.float32)
    plain_lam, plain_q = jnp.linalg.eigh(jnp.asarray(matrix32))
    plain = np.einsum("...ij,...j,...kj->...ik", plain_q, 1.0 / plain_lam, plain_q)
    ours, _ = root_fn(jnp.asarray(matrix32), 1, 0.0)
    reference = reference_root(matrix32.astype(np.float64), 1)
    assert np.all(relative_errors(ours, reference) < 0.5 * relative_errors(plain, reference))


def test_optax_helper_is_wrong_for_p3_and_p6_and_ours_is_right():
    """optax raises its Newton iterate to ``2**round(log2 p)``: for p = 3 it returns ``c M^{-1/4}``.

    Its coupled iteration keeps ``M_k = H_k^q (z M)`` with ``H_0 = z^{1/p} I`` and stops at ``M_k = I``,
    so with the power ``q`` in place of ``p`` the result is ``z^{1/p - 1/q} M^{-1/q}``,
    ``z = (1 + p) / (2 ||M||_F)``.
    """
    q = random_orthogonal(6, 3)
    lam = np.linspace(1.0, 4.0, 6)
    matrix = build(q, lam)
    for p, wrong_power in [(3, 4), (6, 8)]:
        optax_root, optax_error = optax.matrix_inverse_pth_root(jnp.asarray(matrix, jnp.float32), p, ridge_epsilon=0.0)
        exact = build(q, lam ** (-1.0 / p))
        assert optax_error < 1e-5  # it reports convergence ...
        assert relative_errors(optax_root, exact) > 1e-2  # ... to the wrong matrix,
        z = (1 + p) / (2 * np.linalg.norm(matrix))
        explained = z ** (1 / p - 1 / wrong_power) * build(q, lam ** (-1.0 / wrong_power))
        assert relative_errors(optax_root, explained) < 1e-5  # namely this one.
        ours, ok = inverse_pth_root(jnp.asarray(matrix, jnp.float32), p, eps=0.0)
        assert ok and relative_errors(ours, exact) < 1e-5


def test_non_integer_p_and_damping():
    q = random_orthogonal(N, 4)
    lam = spectra(1e3)
    eps, relative_eps, p = 1e-3, 0.1, 2.5
    root, ok = inverse_pth_root(jnp.asarray(build(q, lam)), p, eps=eps, relative_eps=relative_eps)
    expected = build(q, (lam + eps + relative_eps * lam.max(-1, keepdims=True)) ** (-1.0 / p))
    assert ok.all() and relative_errors(root, expected).max() < 1e-12


def test_per_block_damping_and_damped_inverse():
    q = random_orthogonal(N, 5)
    lam = spectra(1e3)
    damping = np.array([1e-3, 1e-2, 1e-1])
    inverse, ok = damped_inverse(jnp.asarray(build(q, lam)), jnp.asarray(damping))
    expected = np.linalg.inv(build(q, lam) + damping[:, None, None] * np.eye(N))
    assert ok.all() and relative_errors(inverse, expected).max() < 1e-12


def test_rank_deficient_with_damping_is_finite_and_cutoff_gives_pseudo_inverse():
    q = random_orthogonal(N, 6)
    lam = np.where(np.arange(N) < N // 2, np.linspace(1.0, 2.0, N), 0.0)
    matrix = jnp.asarray(build(q, lam), jnp.float32)
    for p in PS:
        root, ok = inverse_pth_root(matrix, p)  # default eps = 1e-6
        assert ok and np.all(np.isfinite(root))
    pinv_sqrt = build(q, np.where(lam > 0, lam, 1.0) ** -0.5 * (lam > 0))
    root, ok = inverse_pth_root(matrix, 2, eps=0.0, cutoff=1e-4)
    assert ok and relative_errors(root, pinv_sqrt) < 1e-5
    inverse, _ = inverse_pth_root(matrix, 1, eps=0.0, cutoff=1e-4)
    assert relative_errors(inverse, np.linalg.pinv(np.asarray(matrix, np.float64), rcond=1e-4, hermitian=True)) < 1e-5


def test_non_finite_blocks_are_flagged_and_others_unaffected():
    good = build(random_orthogonal(4, 7), np.array([1.0, 2.0, 3.0, 4.0]))
    nan, inf = good.copy(), good.copy()
    nan[0, 1] = np.nan
    inf[2, 2] = np.inf
    root, ok = inverse_pth_root(jnp.asarray(np.stack([good, nan, inf]), jnp.float32), 4)
    np.testing.assert_array_equal(ok, [True, False, False])
    assert relative_errors(root[0], reference_root(good, 4, 1e-6)) < 1e-5
    assert np.all(np.isnan(root[1:]))


def test_symmetrizes_input_and_dtypes():
    matrix = build(random_orthogonal(4, 8), np.array([1.0, 2.0, 3.0, 4.0]))
    skew = np.triu(np.ones((4, 4)), 1)
    skew = 0.3 * (skew - skew.T)
    root, _ = inverse_pth_root(jnp.asarray(matrix + skew), 2)
    assert relative_errors(root, reference_root(matrix, 2, 1e-6)) < 1e-12
    np.testing.assert_allclose(symmetrize(jnp.asarray(matrix + skew)), matrix, atol=1e-15)
    bf16_root, ok = inverse_pth_root(jnp.asarray(matrix, jnp.bfloat16), 2)
    assert bf16_root.dtype == jnp.float32 and ok


def test_eigh_psd_clips_and_reconstructs():
    q = random_orthogonal(5, 9)
    matrix = build(q, np.array([-1e-9, 0.0, 1.0, 2.0, 5.0]))
    lam, vectors = eigh_psd(jnp.asarray(matrix))
    np.testing.assert_allclose(lam, [0.0, 0.0, 1.0, 2.0, 5.0], atol=1e-12)
    np.testing.assert_allclose(vectors @ np.diag(lam) @ vectors.T, build(q, np.maximum(lam, 0)), atol=1e-12)


def test_works_under_jit_and_vmap():
    matrices = jnp.asarray(build(random_orthogonal(4, 10), spectra(10.0, 4)))
    batched, _ = jax.jit(inverse_pth_root, static_argnums=1)(matrices, 4)
    mapped, _ = jax.vmap(lambda m: inverse_pth_root(m, 4))(matrices)
    np.testing.assert_allclose(batched, mapped, rtol=1e-12)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"p": 0}, "p"), ({"p": 2, "eps": -1.0}, "eps"), ({"p": 2, "relative_eps": -0.1}, "relative_eps"),
     ({"p": 2, "cutoff": 1.0}, "cutoff")],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        inverse_pth_root(jnp.eye(2), **kwargs)
