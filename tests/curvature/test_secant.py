"""Secant updates against scipy's BFGS / SR1 update strategies, NumPy textbook formulas and each other.

References: ``scipy.optimize.BFGS`` and ``scipy.optimize.SR1`` (``HessianUpdateStrategy``: matrix and
inverse, skip and damp strategies, ``init_scale='auto'``); DFP and the K-BFGS double damping written
out in NumPy here; the inverse of the SR1 ``B``; ``np.linalg.cholesky`` of the BFGS ``B``; dense BFGS
on ``H`` for the L-BFGS two-loop recursion; quadratic termination with exact line search.
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from scipy.optimize import BFGS, SR1  # noqa: E402

import optax_second_order as oso  # noqa: E402

N = 6
sr1_b = jax.jit(oso.sr1_update)
sr1_h = jax.jit(oso.sr1_inverse_update)
bfgs_b = jax.jit(oso.bfgs_update, static_argnames="damp")
bfgs_h = jax.jit(oso.bfgs_inverse_update, static_argnames="damp")
bfgs_l = jax.jit(oso.bfgs_cholesky_update, static_argnames="damp")
dfp_h = jax.jit(oso.dfp_inverse_update, static_argnames="damp")
update_memory = jax.jit(oso.lbfgs_update_memory)
two_loop = jax.jit(oso.lbfgs_two_loop)

DENSE_BFGS_DFP = {"bfgs_b": bfgs_b, "bfgs_h": bfgs_h, "bfgs_l": bfgs_l, "dfp_h": dfp_h}


def symmetric(seed, n=N, definite=True):
    """A random symmetric matrix with eigenvalues in [1, 10] (definite) or [-5, 5] (indefinite)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    eigenvalues = np.linspace(1.0, 10.0, n) if definite else np.linspace(-5.0, 5.0, n) + 0.3
    return (q * eigenvalues) @ q.T


def random_pairs(seed, count, a, noise=0.1, negative=()):
    """Pairs ``y = A s + noise``; at the indices in ``negative``, ``y = -A s`` (``s^T y < 0`` for SPD ``A``)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for k in range(count):
        s = rng.normal(size=a.shape[0])
        y = a @ s + noise * rng.normal(size=a.shape[0])
        pairs.append((s, -a @ s if k in negative else y))
    return pairs


def scipy_strategy(strategy, approx_type):
    strategy.initialize(N, approx_type)
    return strategy


def start(approx_type, s, y):
    """``B_0 = I / gamma`` or ``H_0 = gamma I`` with ``gamma`` from the first pair (scipy's 'auto')."""
    gamma = float(oso.initial_inverse_scale(s, y))
    return np.eye(len(s)) * (gamma if approx_type == "inv_hess" else 1.0 / gamma)


# ----------------------------------------------------------------------------------------------
# Against scipy
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("approx_type", ["hess", "inv_hess"])
def test_bfgs_matches_scipy_with_skipped_pairs(approx_type):
    """Sequences of pairs, two of them with ``s^T y < 0`` (skipped by both), first-pair scaling included."""
    pairs = random_pairs(1, 8, symmetric(0), negative=(3, 6))
    reference = scipy_strategy(BFGS(exception_strategy="skip_update"), approx_type)
    update = bfgs_b if approx_type == "hess" else bfgs_h
    matrix = start(approx_type, *pairs[0])
    for k, (s, y) in enumerate(pairs):
        reference.update(s, y)
        matrix, used = update(matrix, s, y)
        assert bool(used) == (k not in (3, 6))
        np.testing.assert_allclose(matrix, reference.get_matrix(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("approx_type", ["hess", "inv_hess"])
def test_damped_bfgs_matches_scipy_damp_update(approx_type):
    """``damp=True`` is scipy's ``damp_update`` (``min_curvature=0.2``); damping fires on some pairs."""
    pairs = random_pairs(2, 8, symmetric(3), negative=(2, 5))
    reference = scipy_strategy(BFGS(exception_strategy="damp_update"), approx_type)
    update = bfgs_b if approx_type == "hess" else bfgs_h
    matrix = start(approx_type, *pairs[0])
    damped = []
    for s, y in pairs:
        if approx_type == "hess":
            damped.append(bool(oso.powell_damping(s, y, matrix @ s)[1]))
        else:
            damped.append(bool(oso.powell_damping_inverse(s, y, matrix @ y)[1]))
        reference.update(s, y)
        matrix, used = update(matrix, s, y, damp=True)
        assert used
        np.testing.assert_allclose(matrix, reference.get_matrix(), rtol=1e-11, atol=1e-12)
    assert damped[2] and damped[5]
    assert np.linalg.eigvalsh(matrix).min() > 0


@pytest.mark.parametrize("approx_type", ["hess", "inv_hess"])
def test_sr1_matches_scipy(approx_type):
    """Indefinite curvature (the first pair has ``s^T y < 0``: scipy scales by ``|s^T y|``); a pair
    with ``y = B s + u``, ``u`` orthogonal to ``s`` (``s = H y + u``, ``u`` orthogonal to ``y``) is
    skipped by both."""
    a = symmetric(4, definite=False)
    pairs = random_pairs(5, 8, a)
    s0, y0 = pairs[0]
    if s0 @ y0 > 0:
        pairs[0] = (s0, -y0)
    reference = scipy_strategy(SR1(), approx_type)
    update = sr1_b if approx_type == "hess" else sr1_h
    matrix = start(approx_type, *pairs[0])
    for k, (s, y) in enumerate(pairs):
        if k == 4:  # the SR1 denominator vanishes
            w, z = (s, y) if approx_type == "hess" else (y, s)
            z = np.asarray(matrix) @ w + z - (z @ w) / (w @ w) * w
            s, y = (w, z) if approx_type == "hess" else (z, w)
        reference.update(s, y)
        matrix, used = update(matrix, s, y)
        assert bool(used) == (k != 4)
        np.testing.assert_allclose(matrix, reference.get_matrix(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("first", ["positive", "negative", "orthogonal"])
@pytest.mark.parametrize("approx_type", ["hess", "inv_hess"])
def test_initial_scale_matches_scipy_auto(first, approx_type):
    """scipy's 'auto' scale is ``|s^T y| / y^T y`` (1 when ``s^T y = 0``); it equals N&W eq. 6.20
    ``s^T y / y^T y`` exactly when ``s^T y > 0``. A skipped first pair leaves the scaled identity."""
    rng = np.random.default_rng(6)
    s = rng.normal(size=N)
    y = {"positive": 2.0 * s + 0.1, "negative": -3.0 * s + 0.1, "orthogonal": None}[first]
    if y is None:
        s, y = np.eye(N)[0] * 2.0, np.eye(N)[1] * 5.0
    gamma = float(oso.initial_inverse_scale(s, y))
    if first == "positive":
        np.testing.assert_allclose(gamma, (s @ y) / (y @ y), rtol=1e-14)
    reference = scipy_strategy(BFGS(), approx_type)
    reference.update(s, y)
    update = bfgs_b if approx_type == "hess" else bfgs_h
    matrix, used = update(start(approx_type, s, y), s, y)
    assert bool(used) == (first == "positive")
    np.testing.assert_allclose(matrix, reference.get_matrix(), rtol=1e-12, atol=1e-14)


def test_initial_scale_falls_back_to_one():
    """``s = 0``, ``y = 0``, a tiny ``y`` (``gamma`` overflows) and NaN give ``gamma = 1``."""
    s = np.arange(1.0, N + 1.0)
    for s_, y_ in [(0 * s, s), (s, 0 * s), (s, 1e-300 * s), (s, np.nan * s)]:
        assert float(oso.initial_inverse_scale(s_, y_)) == 1.0
    assert float(oso.initial_inverse_scale(s, 1e-100 * s)) == pytest.approx(1e100)


# ----------------------------------------------------------------------------------------------
# Against textbook formulas and each other
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damp", [False, True])
def test_dfp_matches_textbook_formula(damp):
    """N&W eq. 6.15 in NumPy over a sequence with a negative-curvature pair: skipped, or with
    ``damp=True`` used after Powell damping of ``s`` (N&W Procedure 18.2 with ``s, B`` and ``y, H``
    exchanged, written out in :func:`powell_reference`)."""
    pairs = random_pairs(7, 7, symmetric(8), negative=(4,))
    h_ref = np.eye(N)
    h = h_ref
    for k, (s, y) in enumerate(pairs):
        hy = h_ref @ y
        if damp:
            s = powell_reference(y, s, hy)
        if s @ y > 0:
            h_ref = h_ref - np.outer(hy, hy) / (y @ hy) + np.outer(s, s) / (y @ s)
        h, used = dfp_h(h, *pairs[k], damp=damp)
        assert bool(used) == (damp or k != 4)
        np.testing.assert_allclose(h, h_ref, rtol=1e-12, atol=1e-13)


def test_inverse_sr1_is_inverse_of_sr1():
    b = symmetric(9)
    h = np.linalg.inv(b)
    for s, y in random_pairs(10, 6, symmetric(11, definite=False)):
        b, used_b = sr1_b(b, s, y)
        h, used_h = sr1_h(h, s, y)
        assert used_b and used_h
        np.testing.assert_allclose(h, np.linalg.inv(b), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("n", [1, 2, N])
@pytest.mark.parametrize("damp", [False, True])
def test_cholesky_bfgs_is_cholesky_of_bfgs(n, damp):
    """``L+`` is lower triangular with a positive diagonal and equals ``cholesky(B+)`` of :func:`bfgs_update`."""
    pairs = random_pairs(12, 7, symmetric(13, n), negative=(2, 5))
    b = start("hess", *pairs[0])
    l = np.linalg.cholesky(b)
    for s, y in pairs:
        b, used_b = bfgs_b(b, s, y, damp=damp)
        l, used_l = bfgs_l(l, s, y, damp=damp)
        assert bool(used_l) == bool(used_b)
        l = np.asarray(l)
        np.testing.assert_array_equal(np.triu(l, 1), 0.0)
        np.testing.assert_allclose(l, np.linalg.cholesky(np.asarray(b)), rtol=1e-11, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# L-BFGS
# ----------------------------------------------------------------------------------------------

PARAMS = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(2)}
_, UNRAVEL = ravel_pytree(PARAMS)


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def dense_lbfgs(accepted, m, gamma=None):
    """BFGS on ``H`` (the dense update) over the last ``m`` accepted pairs from ``H_0 = gamma I``."""
    window = accepted[-m:]
    s, y = window[-1]
    h = np.eye(len(s)) * ((s @ y) / (y @ y) if gamma is None else gamma)
    for s, y in window:
        h, used = bfgs_h(h, s, y)
        assert used
    return np.asarray(h)


@pytest.mark.parametrize("initial_scale", [None, 1.0])
def test_two_loop_equals_dense_bfgs_on_the_same_pairs(initial_scale):
    """After each pair (ring wrapped twice, two pairs skipped), ``H v`` of the two-loop recursion equals
    the dense BFGS ``H`` built from the same last ``m`` pairs with the same ``H_0``."""
    m = 3
    memory = oso.lbfgs_init_memory(PARAMS, m)
    v = np.random.default_rng(14).normal(size=8)
    np.testing.assert_allclose(flat(two_loop(memory, UNRAVEL(v), initial_scale)), v)
    accepted = []
    for k, (s, y) in enumerate(random_pairs(15, 9, symmetric(16, 8), negative=(2, 6))):
        memory, used = update_memory(memory, UNRAVEL(s), UNRAVEL(y))
        assert bool(used) == (k not in (2, 6))
        if used:
            accepted.append((s, y))
        h = dense_lbfgs(accepted, m, initial_scale)
        np.testing.assert_allclose(flat(two_loop(memory, UNRAVEL(v), initial_scale)), h @ v, rtol=1e-11)


def test_ring_buffer_order():
    """``m = 3``, five accepted pairs and a skipped one: slots hold pairs 3, 4, 2; count 5."""
    m = 3
    memory = oso.lbfgs_init_memory(PARAMS, m)
    pairs = random_pairs(17, 6, symmetric(18, 8), negative=(4,))
    for s, y in pairs:
        memory, _ = update_memory(memory, UNRAVEL(s), UNRAVEL(y))
    accepted = [pairs[i] for i in (0, 1, 2, 3, 5)]
    assert int(memory.count) == 5
    for slot, pair in zip(range(m), [3, 4, 2]):
        s, y = accepted[pair]
        np.testing.assert_array_equal(flat(jax.tree.map(lambda a: a[slot], memory.s)), s)
        np.testing.assert_array_equal(flat(jax.tree.map(lambda a: a[slot], memory.y)), y)
        np.testing.assert_allclose(memory.rho[slot], 1.0 / (s @ y), rtol=1e-14)


# ----------------------------------------------------------------------------------------------
# Quadratic termination
# ----------------------------------------------------------------------------------------------


def minimize_quadratic(a, b, step_matrix, update, matrix):
    """NumPy loop: ``p = -M g``, exact line search on ``x^T A x / 2 - b^T x``, then ``matrix = update(...)``."""
    x = np.zeros(len(b))
    gradient_norms = []
    for _ in range(len(b)):
        g = a @ x - b
        gradient_norms.append(np.linalg.norm(g))
        p = -step_matrix(np.asarray(matrix), g)
        alpha = -(g @ p) / (p @ a @ p)
        s = alpha * p
        matrix, used = update(matrix, s, a @ s)
        assert used
        x = x + s
    return np.asarray(matrix), gradient_norms, np.linalg.norm(a @ x - b)


def solve_cholesky(l, g):
    return np.linalg.solve(l.T, np.linalg.solve(l, g))


QUADRATIC_METHODS = {
    "bfgs_h": (lambda h, g: h @ g, bfgs_h, lambda a: np.linalg.inv(a)),
    "dfp_h": (lambda h, g: h @ g, dfp_h, lambda a: np.linalg.inv(a)),
    "bfgs_b": (lambda b, g: np.linalg.solve(b, g), bfgs_b, lambda a: a),
    "bfgs_l": (solve_cholesky, bfgs_l, lambda a: np.linalg.cholesky(a)),
}


@pytest.mark.parametrize("method", QUADRATIC_METHODS)
def test_quadratic_termination_in_n_steps(method):
    """BFGS and DFP from ``I`` with exact line search: ``g_n = 0`` and ``B_n = A`` (``H_n = A^{-1}``)
    (N&W section 6.4 and Theorem 6.4 of Fletcher 1987 on the Broyden class)."""
    a = symmetric(19)
    b = np.random.default_rng(20).normal(size=N)
    step_matrix, update, expected = QUADRATIC_METHODS[method]
    final, norms, last_norm = minimize_quadratic(a, b, step_matrix, update, np.eye(N))
    assert min(norms) > 1e-6 * norms[0]  # no early termination: all n steps were needed
    assert last_norm < 1e-10 * norms[0]
    np.testing.assert_allclose(final, expected(a), rtol=1e-8, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# Safeguards fire exactly when stated
# ----------------------------------------------------------------------------------------------

E1, E2 = np.eye(N)[0], np.eye(N)[1]


def at_cosine(cosine, length=3.0):
    """A vector with ``cos(angle to e_1) = cosine``."""
    return length * (cosine * E1 + np.sqrt(1.0 - cosine**2) * E2)


@pytest.mark.parametrize("name", DENSE_BFGS_DFP)
def test_curvature_condition_threshold(name):
    """``s^T y > min_cosine ||s|| ||y||``: cosines 1.1e-3 pass, 0.9e-3, 0 and negative skip (min_cosine 1e-3)."""
    update = DENSE_BFGS_DFP[name]
    matrix = np.diag(np.linspace(1.0, 2.0, N))
    for cosine, expected in [(1.1e-3, True), (0.9e-3, False), (0.0, False), (-0.5, False)]:
        new, used = update(matrix, 2.0 * E1, at_cosine(cosine), 1e-3)
        assert bool(used) == expected, cosine
        if not expected:
            np.testing.assert_array_equal(new, matrix)


def test_lbfgs_memory_curvature_threshold():
    memory = oso.lbfgs_init_memory(jnp.zeros(N), 2)
    for cosine, expected in [(1.1e-3, True), (0.9e-3, False), (0.0, False), (-0.5, False)]:
        new, used = update_memory(memory, 2.0 * E1, at_cosine(cosine), 1e-3)
        assert bool(used) == expected
        assert int(new.count) == int(expected)
        if not expected:
            jax.tree.map(np.testing.assert_array_equal, new, memory)


def test_sr1_denominator_threshold():
    """``|s^T (y - B s)| > min_cosine ||s|| ||y - B s||`` (and dual on ``H``), ``s, y != 0`` (as scipy)."""
    eye = np.eye(N)
    for cosine, expected in [(1.1e-3, True), (-1.1e-3, True), (0.9e-3, False), (0.0, False)]:
        _, used_b = sr1_b(eye, 2.0 * E1, 2.0 * E1 + at_cosine(cosine), 1e-3)  # y - B s = u
        _, used_h = sr1_h(eye, 2.0 * E1 + at_cosine(cosine), 2.0 * E1, 1e-3)  # s - H y = u
        assert bool(used_b) == bool(used_h) == expected, cosine
    for s, y in [(np.zeros(N), E1), (E1, np.zeros(N))]:
        for update in (sr1_b, sr1_h):
            new, used = update(2.0 * eye, s, y)
            assert not used
            np.testing.assert_array_equal(new, 2.0 * eye)


def powell_reference(s, y, bs, mu=0.2):
    """N&W Procedure 18.2."""
    sy, sbs = s @ y, s @ bs
    theta = 1.0 if sy >= mu * sbs else (1 - mu) * sbs / (sbs - sy)
    return theta * y + (1 - theta) * bs


@pytest.mark.parametrize(
    "c, damped", [(0.3, False), (0.2 + 1e-9, False), (0.2 - 1e-9, True), (0.1, True), (-1.0, True)]
)
def test_powell_damping(c, damped):
    """``s^T B s = 1``, ``s^T y = c``: damped exactly when ``c < 0.2``, and then ``s^T r = 0.2 s^T B s``."""
    b = symmetric(21)
    s = E1 / np.sqrt(b[0, 0])
    y = c * b @ s + E2 - (E2 @ s) / (s @ b @ s) * (b @ s)  # s^T y = c s^T B s
    r, was_damped = oso.powell_damping(s, y, b @ s)
    assert bool(was_damped) == damped
    np.testing.assert_allclose(r, powell_reference(s, y, b @ s), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(s @ r, max(c, 0.2) * (s @ b @ s), rtol=1e-9)
    # The inverse form is the same procedure with (s, B) and (y, H) exchanged.
    s_damped, was_damped_h = oso.powell_damping_inverse(y, s, b @ s)
    assert bool(was_damped_h) == damped
    np.testing.assert_allclose(s_damped, r, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mu", [0.1, 1.7])
def test_levenberg_marquardt_pair_damping(mu):
    """Untouched when ``s^T y >= mu s^T s``, else ``s^T y~ = mu s^T s``."""
    rng = np.random.default_rng(22)
    s = rng.normal(size=N)
    for ratio in (2.0, mu + 1e-6, mu - 1e-6, 0.05, -1.0):
        y = ratio * s + rng.normal(size=N)
        y -= ((y - ratio * s) @ s) / (s @ s) * s  # s^T y = ratio s^T s
        y_damped, damped = oso.levenberg_marquardt_pair_damping(s, y, mu)
        assert bool(damped) == (ratio < mu)
        np.testing.assert_allclose(s @ y_damped, max(ratio, mu) * (s @ s), rtol=1e-9)
        if ratio >= mu:
            np.testing.assert_array_equal(y_damped, y)


def kbfgs_double_damping_reference(s, y, h, mu1, mu2):
    """Goldfarb, Ren & Bahamou (2020), double damping, as in the authors' code (PyTorch ported to NumPy)."""
    hy = h @ y
    sy, yhy = s @ y, y @ hy
    if sy / yhy <= mu1:
        theta = (1 - mu1) * yhy / (yhy - sy)
        s = theta * s + (1 - theta) * hy
    ss, sy = s @ s, s @ y
    if sy / ss <= mu2:
        theta = (1 - mu2) * ss / (ss - sy)
        y = theta * y + (1 - theta) * s
    return s, y


@pytest.mark.parametrize("scale", [3.0, 0.05, -1.0])
def test_double_damping_matches_kbfgs_and_makes_pairs_acceptable(scale):
    """Pairs ``y = scale * A s + noise`` from negative to strong curvature; every damped pair is then
    accepted by the BFGS update of ``H`` with ``s~^T y~ >= mu_2 s~^T s~``."""
    h = np.linalg.inv(symmetric(23))
    rng = np.random.default_rng(24)
    for _ in range(4):
        s = rng.normal(size=N)
        y = scale * symmetric(25) @ s + 0.1 * rng.normal(size=N)
        s_damped, y_damped = oso.double_damping(s, y, h @ y, 0.5)
        s_ref, y_ref = kbfgs_double_damping_reference(s, y, h, 0.2, 0.5)
        np.testing.assert_allclose(s_damped, s_ref, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(y_damped, y_ref, rtol=1e-12, atol=1e-13)
        assert s_damped @ y_damped >= 0.5 * (s_damped @ s_damped) * (1 - 1e-12)
        h, used = bfgs_h(h, s_damped, y_damped)
        assert used
    assert np.linalg.eigvalsh(h).min() > 0


NON_FINITE = {
    "nan_y": lambda s, y: (s, np.where(np.arange(N) == 2, np.nan, y)),
    "inf_s": lambda s, y: (np.where(np.arange(N) == 0, np.inf, s), y),
    "overflow": lambda s, y: (1e160 * s, 1e160 * y),
}


@pytest.mark.parametrize("kind", NON_FINITE)
def test_non_finite_pairs_are_skipped(kind):
    """NaN / inf entries and pairs whose products overflow leave every matrix and the memory unchanged."""
    s, y = NON_FINITE[kind](*random_pairs(26, 1, symmetric(27))[0])
    matrix = symmetric(28)
    for update in (*DENSE_BFGS_DFP.values(), sr1_b, sr1_h):
        start_matrix = np.linalg.cholesky(matrix) if update is bfgs_l else matrix
        new, used = update(start_matrix, s, y)
        assert not used
        np.testing.assert_array_equal(new, start_matrix)
    memory = oso.lbfgs_init_memory(jnp.zeros(N), 2)
    new, used = update_memory(memory, s, y)
    assert not used and int(new.count) == 0
    jax.tree.map(np.testing.assert_array_equal, new, memory)


@pytest.mark.parametrize("name", ["bfgs_b", "dfp_h", "sr1_b", "sr1_h"])
def test_updates_that_overflow_are_skipped(name):
    """A pair that passes its test but whose update overflows (a matrix scaled by 1e160) is skipped."""
    update = {**DENSE_BFGS_DFP, "sr1_b": sr1_b, "sr1_h": sr1_h}[name]
    s, y = random_pairs(33, 1, symmetric(34))[0]
    assert update(symmetric(35), s, y)[1]
    new, used = update(1e160 * symmetric(35), s, y)
    assert not used
    np.testing.assert_array_equal(new, 1e160 * symmetric(35))


# ----------------------------------------------------------------------------------------------
# jit, vmap, dtypes, validation
# ----------------------------------------------------------------------------------------------


def test_traced_hyperparameters_and_vmap_over_blocks():
    """Per-layer matrices (K-BFGS) under vmap with a traced threshold equal the one-by-one updates."""
    hs = np.stack([np.linalg.inv(symmetric(i)) for i in range(3)])
    pairs = random_pairs(29, 3, symmetric(30), negative=(1,))
    ss, ys = (np.stack(v) for v in zip(*pairs))
    batched = jax.jit(jax.vmap(oso.bfgs_inverse_update, in_axes=(0, 0, 0, None)))
    new, used = batched(hs, ss, ys, jnp.asarray(1e-8))
    for i in range(3):
        expected, expected_used = bfgs_h(hs[i], ss[i], ys[i])
        np.testing.assert_allclose(new[i], expected, rtol=1e-14)
        assert bool(used[i]) == bool(expected_used)
    assert not used[1]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_low_precision_inputs_compute_in_float32(dtype):
    s, y = random_pairs(31, 1, symmetric(32))[0]
    h = np.linalg.inv(symmetric(32))
    new, used = oso.bfgs_inverse_update(jnp.asarray(h, dtype), jnp.asarray(s, dtype), jnp.asarray(y, dtype))
    assert used and new.dtype == jnp.float32
    rounded = [np.asarray(jnp.asarray(x, dtype), np.float64) for x in (h, s, y)]
    np.testing.assert_allclose(new, bfgs_h(*rounded)[0], rtol=1e-4, atol=1e-5)
    memory = oso.lbfgs_init_memory({"w": jnp.zeros(N, dtype)}, 2)
    assert memory.s["w"].dtype == memory.rho.dtype == jnp.float32
    memory, used = oso.lbfgs_update_memory(memory, {"w": jnp.asarray(s, dtype)}, {"w": jnp.asarray(y, dtype)})
    assert used and oso.lbfgs_two_loop(memory, {"w": jnp.asarray(s, dtype)})["w"].dtype == jnp.float32


def test_invalid_arguments_raise():
    eye, v = np.eye(3), np.ones(3)
    with pytest.raises(ValueError, match="min_cosine must be in .* got -0.1"):
        oso.bfgs_update(eye, v, v, min_cosine=-0.1)
    with pytest.raises(ValueError, match="min_cosine must be in .* got 1.0"):
        oso.sr1_update(eye, v, v, min_cosine=1.0)
    with pytest.raises(ValueError, match="min_curvature must be in .* got 1.0"):
        oso.powell_damping(v, v, v, min_curvature=1.0)
    with pytest.raises(ValueError, match="damping must be in .* got 0"):
        oso.double_damping(v, v, v, 0)
    with pytest.raises(ValueError, match=r"y must have shape \(3,\) to match h, got \(4,\)"):
        oso.dfp_inverse_update(eye, v, np.ones(4))
    with pytest.raises(ValueError, match=r"l must be a square matrix, got shape \(3, 2\)"):
        oso.bfgs_cholesky_update(np.ones((3, 2)), v, v)
    with pytest.raises(ValueError, match="memory_size must be an integer >= 1, got 0"):
        oso.lbfgs_init_memory(PARAMS, 0)
