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

import re
import subprocess
import sys

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
    inverse_pth_root_in_basis,
    inverse_pth_root_newton,
    one_matrix_at_a_time,
    orthogonal_iteration_step,
    orthonormalize,
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


# --- Matmul-only refreshes: coupled Newton roots, roots in a given basis, Cholesky-based QR ---------------

newton_fn = jax.jit(inverse_pth_root_newton, static_argnums=1, static_argnames=("max_iterations", "tolerance"))


@pytest.mark.parametrize("p", PS)
def test_newton_float64_matches_known_spectrum(p):
    q = random_orthogonal(N, 0)
    lam = spectra(1e4)
    root, ok, error = newton_fn(jnp.asarray(build(q, lam)), p, 0.0)
    assert root.dtype == jnp.float64 and ok.all() and np.all(error < 1e-12)
    assert relative_errors(root, build(q, lam ** (-1.0 / p))).max() <= 1e-11


@pytest.mark.parametrize("p", PS)
def test_newton_float32_relative_error(p):
    """Measured 0.5 to 1.1 ``u cond / p`` (condition numbers 1e2, 1e3, 1e4); one to four times the
    eigh-based root's error."""
    for cond in (1e2, 1e3, 1e4):
        matrix32 = build(random_orthogonal(N, 1), spectra(cond)).astype(np.float32)
        root, ok, _ = newton_fn(jnp.asarray(matrix32), p, 0.0)
        assert root.dtype == jnp.float32 and ok.all()
        reference = reference_root(matrix32.astype(np.float64), p)
        errors = relative_errors(root, reference)
        print(f"newton float32 p={p} cond={cond:.0e}: relative errors {errors}")
        assert errors.max() <= 2 * U32 * cond / p
        assert errors.max() <= 5 * relative_errors(root_fn(jnp.asarray(matrix32), p, 0.0)[0], reference).max()


def test_newton_is_right_where_optax_is_wrong():
    """p = 3 and 6, where ``optax.matrix_inverse_pth_root`` returns a multiple of ``M^{-1/4}``, ``M^{-1/8}``."""
    q = random_orthogonal(6, 3)
    lam = np.linspace(1.0, 4.0, 6)
    for p in (3, 6):
        root, ok, _ = newton_fn(jnp.asarray(build(q, lam), jnp.float32), p, 0.0)
        assert ok and relative_errors(root, build(q, lam ** (-1.0 / p))) < 1e-5


def test_newton_damping_per_block_and_batch_dims():
    q = random_orthogonal(N, 4)
    lam = np.concatenate([[1.0], np.linspace(0.5, 1e-3, N - 1)])  # a gap, so 20 power steps find lambda_max
    matrices = np.stack([build(q, lam), build(q, 2 * lam)])
    eps, relative_eps, p = np.array([1e-3, 1e-2]), 0.1, 4
    root, ok, _ = newton_fn(jnp.asarray(matrices), p, jnp.asarray(eps), relative_eps)
    scale = np.array([1.0, 2.0])[:, None]
    expected = build(q, (scale * lam + eps[:, None] + relative_eps * scale) ** (-1.0 / p))
    assert ok.all() and relative_errors(root, expected).max() < 1e-9
    stacked = jnp.asarray(np.stack([matrices, matrices[::-1]]))
    batched, ok, error = newton_fn(stacked, p)
    assert batched.shape == (2, 2, N, N) and ok.shape == error.shape == (2, 2) and ok.all()
    mapped = jax.jit(jax.vmap(jax.vmap(lambda m: inverse_pth_root_newton(m, p)[0])))(stacked)
    np.testing.assert_allclose(batched, mapped, rtol=1e-10, atol=1e-12)


def test_newton_flags_non_finite_singular_and_unconverged_blocks():
    good = build(random_orthogonal(4, 7), np.array([1.0, 2.0, 3.0, 4.0]))
    nan, inf = good.copy(), good.copy()
    nan[0, 1] = np.nan
    inf[2, 2] = np.inf
    matrices = jnp.asarray(np.stack([good, nan, inf, np.zeros((4, 4)), np.zeros((4, 4))]), jnp.float32)
    root, ok, _ = newton_fn(matrices, 4, jnp.asarray([0.0, 0.0, 0.0, 0.0, 1e-4]))
    np.testing.assert_array_equal(ok, [True, False, False, False, True])  # a zero matrix needs damping
    assert relative_errors(root[0], reference_root(good, 4)) < 1e-5 and np.all(np.isnan(root[1:4]))
    np.testing.assert_allclose(root[4], 10.0 * np.eye(4), rtol=1e-5)
    ill = jnp.asarray(build(random_orthogonal(N, 8), spectra(1e4)))
    _, ok, error = newton_fn(ill, 4, 0.0, max_iterations=4)
    assert not ok.any() and np.all(error > 1e-2)


def test_newton_uncoupled_warm_correction_diverges():
    """Why the coupled iteration is not warm-started: from the previous root ``X`` the uncoupled Newton
    correction ``X <- X ((p + 1) I - X^p A) / p`` (which needs ``X`` to commute with ``A``) diverges even at
    condition number 1e2 when the statistics change by 1e-3, while a cold start converges."""
    q = random_orthogonal(N, 9)
    old = build(q, spectra(1e2)[0])
    g = np.random.default_rng(9).normal(size=(N, N))
    new = old + 1e-3 * g @ g.T / np.linalg.norm(g @ g.T, 2)
    p, x = 4, reference_root(old, 4)
    errors = []
    for _ in range(6):
        x = x @ ((p + 1) * np.eye(N) - np.linalg.matrix_power(x, p) @ new) / p
        x = (x + x.T) / 2
        errors.append(relative_errors(x, reference_root(new, p)))
    assert errors[-1] > 1.0 > 1e-3 > errors[0]
    cold, ok, _ = newton_fn(jnp.asarray(new), p, 0.0)
    assert ok and relative_errors(cold, reference_root(new, p)) < 1e-12


@pytest.mark.parametrize(
    "kwargs, name",
    [({"p": 2.5}, "p"), ({"p": 0}, "p"), ({"p": True}, "p"), ({"p": 2, "eps": -1.0}, "eps"),
     ({"p": 2, "relative_eps": -0.1}, "relative_eps"), ({"p": 2, "max_iterations": 0}, "max_iterations"),
     ({"p": 2, "tolerance": -1.0}, "tolerance")],
)
def test_newton_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        inverse_pth_root_newton(jnp.eye(2), **kwargs)


def test_newton_accepts_integral_float_p():
    root, ok, _ = newton_fn(4.0 * jnp.eye(3), 2.0, 0.0)
    assert ok and np.allclose(root, 0.5 * np.eye(3))


def test_root_in_exact_basis_is_the_eigh_root_and_in_a_rotated_basis_reports_its_error():
    q = random_orthogonal(N, 10)
    lam = spectra(1e3)[0]
    matrix = jnp.asarray(build(q, lam))
    for p in (1, 2.5, 4):
        root, ok, error = inverse_pth_root_in_basis(matrix, jnp.asarray(q), p, eps=1e-3, relative_eps=0.1)
        expected, _ = inverse_pth_root(matrix, p, eps=1e-3, relative_eps=0.1)
        assert ok and error < 1e-12 and relative_errors(root, expected) < 1e-12
    rotated = q @ random_orthogonal(N, 11)
    _, ok, error = inverse_pth_root_in_basis(matrix, jnp.asarray(rotated), 4)
    assert ok and error > 0.1


def test_warm_start_from_the_previous_basis_improves_with_orthogonal_iteration():
    """The sound warm start: the old eigenbasis, refreshed by orthogonal iteration (columns sorted by
    ``q_i^T M q_i`` before each step, as SOAP), then :func:`inverse_pth_root_in_basis`. Root error and
    off-diagonal residual fall with the steps (slowly: like power iteration, with the eigenvalue gaps)."""
    q = random_orthogonal(N, 12)
    old = build(q, spectra(1e2)[0])
    g = np.random.default_rng(12).normal(size=(N, N))
    new = jnp.asarray(old + 1e-2 * g @ g.T / np.linalg.norm(g @ g.T, 2))
    reference = reference_root(np.asarray(new), 4, 1e-6)
    basis, errors, residuals = jnp.asarray(q[:, ::-1]), [], []
    for _ in range(6):
        root, ok, residual = inverse_pth_root_in_basis(new, basis, 4)
        assert ok
        errors.append(relative_errors(root, reference))
        residuals.append(float(residual))
        estimates = jnp.einsum("ij,ik,kj->j", basis, new, basis)
        basis, ok = orthogonal_iteration_step(new, basis[:, jnp.argsort(-estimates)])
        assert ok
    assert np.all(np.diff(errors) < 0) and np.all(np.diff(residuals) < 0)
    assert errors[-1] < 0.5 * errors[0]


def ill_conditioned_columns(m, k, cond, seed):
    """``U diag(s) V^T`` (``m x k``), singular values ``1 .. 1/cond``, with column norms spread over 1e3."""
    rng = np.random.default_rng(seed)
    u = random_orthogonal(m, seed)[:, :k]
    a = (u * np.logspace(0, -np.log10(cond), k)) @ random_orthogonal(k, seed + 1).T
    return a * np.logspace(0, -3, k)[rng.permutation(k)]


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-13), (np.float32, 1e-5)])
@pytest.mark.parametrize("cond", [1e2, 1e4])
def test_orthonormalize_is_householder_qr_with_positive_diagonal(dtype, tol, cond):
    a = ill_conditioned_columns(48, 32, cond, 13).astype(dtype)
    q, ok = orthonormalize(jnp.asarray(a))
    q64 = np.asarray(q, np.float64)
    assert ok and q.dtype == dtype and q.shape == a.shape
    assert np.linalg.norm(q64.T @ q64 - np.eye(32)) <= tol  # Q^T Q = I
    r = q64.T @ a.astype(np.float64)
    assert np.linalg.norm(np.tril(r, -1)) <= tol * np.linalg.norm(r)  # spans of leading columns are A's
    assert np.all(np.diag(r) > 0)
    reference, r_ref = np.linalg.qr(a.astype(np.float64))
    np.testing.assert_allclose(q64, reference * np.sign(np.diag(r_ref)), atol=100 * tol)  # same columns


def test_orthonormalize_flags_non_finite_and_zero_input_and_batches():
    a = ill_conditioned_columns(16, 8, 10.0, 14)
    nan = a.copy()
    nan[0, 0] = np.nan
    q, ok = orthonormalize(jnp.asarray(np.stack([a, nan, np.zeros_like(a)]), jnp.float32))
    np.testing.assert_array_equal(ok, [True, False, False])
    np.testing.assert_allclose(q[0], orthonormalize(jnp.asarray(a, jnp.float32))[0], atol=1e-6)
    with pytest.raises(ValueError, match="rows"):
        orthonormalize(jnp.ones((2, 3)))


def stale_basis(n, eigenvectors, angle, seed):
    """The eigenvectors (descending order) rotated by ``exp(angle * S)``, ``S`` a random skew matrix."""
    s = np.random.default_rng(seed).normal(size=(n, n)) / np.sqrt(2 * n)
    rotation, _ = np.linalg.qr(np.eye(n) + angle * (s - s.T))
    return eigenvectors[:, ::-1] @ rotation


@pytest.mark.parametrize("spectrum", ["cond 1e6", "rank n/4", "zero"])
def test_orthogonal_iteration_step_float32_matches_qr_of_the_shifted_product(spectrum):
    """Float32 factors that break plain CholeskyQR (condition 1e6) or any Cholesky QR of ``L Q`` (rank
    deficient, zero) give an orthonormal basis equal to Householder QR's of ``(L / ||L||_F + shift I) Q``."""
    n, q = 64, random_orthogonal(64, 15)
    lam = {"cond 1e6": spectra(1e6, n)[0], "rank n/4": np.where(np.arange(n) < n // 4, 1.0, 0.0),
           "zero": np.zeros(n)}[spectrum]
    factor = build(q, lam).astype(np.float32)
    basis = stale_basis(n, q, 0.3, 16).astype(np.float32)
    new, ok = jax.jit(orthogonal_iteration_step)(jnp.asarray(factor), jnp.asarray(basis))
    new = np.asarray(new, np.float64)
    assert ok and np.linalg.norm(new.T @ new - np.eye(n)) < 1e-5
    shifted = (factor.astype(np.float64) / max(np.linalg.norm(factor), 1e-30) + 1e-5 * np.eye(n)) @ basis
    reference, r = np.linalg.qr(shifted)
    assert np.all(np.abs(np.sum(new * reference * np.sign(np.diag(r)), axis=0)) > 1 - 1e-3)
    if spectrum == "zero":
        np.testing.assert_allclose(new, basis, atol=1e-5)


def test_orthogonal_iteration_converges_to_the_eigenvectors():
    """SOAP's refresh from a random basis (columns sorted by ``q_i^T L q_i`` before each step)."""
    n, q = 16, random_orthogonal(16, 17)
    matrix = jnp.asarray(build(q, 0.7 ** np.arange(n)))

    def refresh(_, state):
        basis, ok = state
        estimates = jnp.einsum("ij,ik,kj->j", basis, matrix, basis)
        basis, step_ok = orthogonal_iteration_step(matrix, basis[:, jnp.argsort(-estimates)])
        return basis, ok & step_ok

    basis, ok = jax.jit(lambda b: jax.lax.fori_loop(0, 200, refresh, (b, True)))(random_orthogonal(n, 18))
    assert ok
    np.testing.assert_allclose(np.abs(np.sum(np.asarray(basis) * q, axis=0)), 1.0, atol=1e-8)


def test_polar_factor_cannot_refresh_an_eigenbasis():
    """Why orthonormalization must be triangular (QR's nested spans): the polar factor of ``L Q`` is ``Q``
    itself for every SPD ``L`` (``L Q = Q (Q^T L Q)``), so a Newton-Schulz polar step leaves the basis as is."""
    n, q = 16, random_orthogonal(16, 19)
    matrix = build(q, np.logspace(0, -3, n))
    basis = random_orthogonal(n, 20)
    u, _, vt = np.linalg.svd(matrix @ basis)
    np.testing.assert_allclose(u @ vt, basis, atol=1e-10)
    moved, _ = orthogonal_iteration_step(jnp.asarray(matrix), jnp.asarray(basis))
    assert np.linalg.norm(np.abs(np.asarray(moved)) - np.abs(basis)) > 0.1


def test_orthogonal_iteration_step_needs_its_shift_for_a_rank_deficient_factor():
    """An exactly rank-8 factor (a young Kronecker factor) maps 24 of the basis columns to exact zeros: the unshifted
    Gram has zero pivots and fails, the shifted step gives an orthonormal basis. (A factor that is only numerically
    rank-deficient fails or not depending on rounding: it flipped with XLA's LLVM optimization level.)"""
    n = 32
    factor = jnp.asarray(np.diag(np.where(np.arange(n) < n // 4, 1.0, 0.0)), jnp.float32)
    basis = jnp.asarray(np.eye(n)[:, np.random.default_rng(22).permutation(n)], jnp.float32)
    assert not orthogonal_iteration_step(factor, basis, shift=0.0)[1]
    q, ok = orthogonal_iteration_step(factor, basis)
    assert ok
    np.testing.assert_allclose(np.asarray(q).T @ np.asarray(q), np.eye(n), atol=1e-5)


def test_orthogonal_iteration_step_bad_shift_raises():
    with pytest.raises(ValueError, match="shift"):
        orthogonal_iteration_step(jnp.eye(2), jnp.eye(2), shift=-1.0)


# --- one matrix per LAPACK call on CPU (the deadlock of jaxlib 0.10's batched CPU kernels) --------------------

def random_spd(batch, n, rng):
    a = rng.standard_normal((*batch, n, n))
    return jnp.asarray(a @ np.swapaxes(a, -1, -2) + n * np.eye(n))


BATCHED_FACTORIZATIONS = {
    "inverse_pth_root": lambda x: inverse_pth_root(x, 4.0)[0],
    "damped_inverse": lambda x: damped_inverse(x, 1.0)[0],
    "orthonormalize": lambda x: orthonormalize(x)[0],
    "one_matrix_at_a_time(qr)": lambda x: one_matrix_at_a_time(lambda m: jnp.linalg.qr(m)[0], x),
}


@pytest.mark.parametrize("name", sorted(BATCHED_FACTORIZATIONS))
def test_cpu_lowering_calls_lapack_on_single_matrices_and_matches_the_batched_call(name):
    fn = BATCHED_FACTORIZATIONS[name]
    x = random_spd((2, 3), 8, np.random.default_rng(0))
    text = jax.jit(fn).lower(x).as_text()
    batch_dims = re.findall(r"custom_call @lapack_\w+\(.*?num_batch_dims = \"(\d+)\"", text)
    assert batch_dims and set(batch_dims) == {"0"}, batch_dims
    looped = np.stack([np.stack([fn(x[i, j]) for j in range(3)]) for i in range(2)])
    np.testing.assert_allclose(fn(x), looped, rtol=1e-12, atol=1e-12)


def test_one_matrix_at_a_time_keeps_pytree_outputs_and_passes_single_matrices_through():
    x = random_spd((4,), 6, np.random.default_rng(1))
    w, v = one_matrix_at_a_time(jnp.linalg.eigh, x)
    ref_w, ref_v = jnp.linalg.eigh(x)
    np.testing.assert_allclose(w, ref_w, rtol=1e-12)
    np.testing.assert_allclose(np.abs(v), np.abs(ref_v), atol=1e-10)
    assert one_matrix_at_a_time(jnp.linalg.inv, x[0]).shape == (6, 6)


# Eight independent batched factorizations in one jitted step: XLA:CPU runs them at once, and with jaxlib 0.10's
# batched kernels (plain jnp.linalg.qr / cholesky / inv here) the step never returned on a 2-core machine, at
# its first to fifth call (docs/api/matrix.md). The watchdog turns a hang into a failure.
CONCURRENT_FACTORIZATIONS = """
import faulthandler, jax, jax.numpy as jnp
from optax_second_order.curvature.matrix import damped_inverse, one_matrix_at_a_time, orthonormalize
qr = lambda x: one_matrix_at_a_time(lambda m: jnp.linalg.qr(m)[0], x)
step = jax.jit(lambda xs: [f(x) for x in xs for f in (qr, lambda x: damped_inverse(x, 1.0), orthonormalize)])
xs = [jax.random.normal(jax.random.key(i), (4, 64, 64)) for i in range(8)]
xs = [x @ jnp.swapaxes(x, -1, -2) + 64 * jnp.eye(64) for x in xs]
for _ in range(30):
    faulthandler.dump_traceback_later(30, exit=True)
    jax.block_until_ready(step(xs))
print("finished")
"""


def test_concurrent_batched_factorizations_finish_on_cpu():
    result = subprocess.run([sys.executable, "-c", CONCURRENT_FACTORIZATIONS], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "finished" in result.stdout, result.stderr[-2000:]
