"""Solvers against dense references and NumPy loops of the published algorithms.

* conjugate gradient: ``jnp.linalg.solve`` and a NumPy loop of textbook PCG on explicit SPD pytree systems;
  the negative-curvature stop against a NumPy loop of Newton-CG (Nocedal & Wright, Algorithm 7.1) on
  diag(1, -1, 2, 3) and diag(1, -1); Martens' (2010) stopping rule and saved iterates against a NumPy loop of
  his CG; the quadratic model value against ``1/2 x^T A x - b^T x``;
* dense (Cholesky / eigh, saddle-free), row-space (Woodbury) and CG solves of an MLP's damped Hessian, GGN,
  sampled Fisher and empirical Fisher against ``np.linalg.solve`` of the explicitly built matrices
  (``jax.hessian``, ``J^T H_L J``, per-example gradients at the same sampled targets);
* the Newton decrement against ``sqrt(g^T (M + lambda I)^{-1} g)``.
"""

import math

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax.tree_utils as otu  # noqa: E402
import pytest  # noqa: E402
from curvature_models import (  # noqa: E402
    CASES,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    dense_sampled_fisher,
)
from jax.flatten_util import ravel_pytree  # noqa: E402

import optax_second_order as oso  # noqa: E402
from optax_second_order.curvature.solvers import conjugate_gradient  # noqa: E402

TEMPLATE = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
_, UNRAVEL = ravel_pytree(TEMPLATE)
N = 7


def spd_matrix(seed, cond=100.0, scales=None):
    """``D Q diag(lambda) Q^T D`` with a log-spaced spectrum and optional bad row/column scaling ``D``."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(N, N)))
    a = (q * np.logspace(0, -np.log10(cond), N)) @ q.T
    if scales is not None:
        a = scales[:, None] * a * scales[None, :]
    return a


def pytree_operator(a):
    return lambda v: UNRAVEL(jnp.asarray(a) @ ravel_pytree(v)[0])


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


B = UNRAVEL(jnp.asarray(np.random.default_rng(0).normal(size=N)))
solve = jax.jit(conjugate_gradient, static_argnums=0, static_argnames=("tol", "atol", "maxiter", "preconditioner"))


def numpy_cg(a, b, x, iterations, m_inv=None):
    """Textbook preconditioned CG (Nocedal & Wright, Algorithm 5.3), a plain NumPy loop."""
    m_inv = np.eye(len(b)) if m_inv is None else m_inv
    r = b - a @ x
    z = m_inv @ r
    p = z.copy()
    for _ in range(iterations):
        alpha = (r @ z) / (p @ a @ p)
        x = x + alpha * p
        r_new = r - alpha * (a @ p)
        z_new = m_inv @ r_new
        p = z_new + (r_new @ z_new) / (r @ z) * p
        r, z = r_new, z_new
    return x


def test_matches_dense_solve():
    a = spd_matrix(1)
    x, info = conjugate_gradient(pytree_operator(a), B, tol=1e-12)
    np.testing.assert_allclose(flat(x), np.linalg.solve(a, flat(B)), rtol=1e-9)
    assert info.converged and info.iterations <= 3 * N
    np.testing.assert_allclose(info.residual_norm, np.linalg.norm(flat(B) - a @ flat(x)), atol=1e-12)


def test_iterates_match_numpy_loop_and_maxiter_stops():
    a = spd_matrix(2, scales=np.logspace(0, 1, N))
    m_inv = np.diag(1 / np.diag(a))
    x, info = conjugate_gradient(pytree_operator(a), B, maxiter=3)
    assert info.iterations == 3 and not info.converged
    np.testing.assert_allclose(flat(x), numpy_cg(a, flat(B), np.zeros(N), 3), rtol=1e-10)
    jacobi = pytree_operator(m_inv)
    x, _ = conjugate_gradient(pytree_operator(a), B, maxiter=3, preconditioner=jacobi)
    np.testing.assert_allclose(flat(x), numpy_cg(a, flat(B), np.zeros(N), 3, m_inv), rtol=1e-10)


def test_jacobi_preconditioner_on_badly_scaled_system():
    """Diagonal scaling over 4 decades: Jacobi undoes it, so CG needs fewer iterations."""
    a = spd_matrix(3, cond=10.0, scales=np.logspace(0, 2, N))
    jacobi = pytree_operator(np.diag(1 / np.diag(a)))
    expected = np.linalg.solve(a, flat(B))
    plain, plain_info = solve(pytree_operator(a), B, tol=1e-10)
    pre, pre_info = solve(pytree_operator(a), B, tol=1e-10, preconditioner=jacobi)
    for x in (plain, pre):
        np.testing.assert_allclose(flat(x), expected, rtol=1e-7)
    assert pre_info.converged and pre_info.iterations < plain_info.iterations


def test_warm_start():
    a = spd_matrix(4)
    exact = UNRAVEL(jnp.asarray(np.linalg.solve(a, flat(B))))
    _, info = conjugate_gradient(pytree_operator(a), B, exact, tol=1e-8)
    assert info.iterations == 0 and info.converged
    near = jax.tree.map(lambda x: x + 1e-6, exact)
    x, info = conjugate_gradient(pytree_operator(a), B, near, atol=1e-12, tol=0.0)
    _, cold = conjugate_gradient(pytree_operator(a), B, atol=1e-12, tol=0.0)
    np.testing.assert_allclose(flat(x), flat(exact), rtol=1e-9)
    assert info.iterations <= cold.iterations
    x, _ = conjugate_gradient(pytree_operator(a), B, near, tol=0.0, maxiter=2)
    np.testing.assert_allclose(flat(x), numpy_cg(a, flat(B), flat(near), 2), rtol=1e-10)


def test_zero_right_hand_side_returns_zero():
    x, info = conjugate_gradient(pytree_operator(spd_matrix(5)), otu.tree_zeros_like(B))
    assert info.iterations == 0 and np.all(flat(x) == 0)


def test_damped_gauss_newton_system_from_gnvp_operator():
    case = CASES["mlp-softmax"]()
    damping = 1e-3
    ggn = oso.gnvp_operator(case.model_fn, case.loss, case.params)
    grads = jax.grad(case.value_fn)(case.params)

    @jax.jit
    def newton_direction(grads):
        damped = lambda v: otu.tree_add_scale(ggn(v), damping, v)  # noqa: E731
        return conjugate_gradient(damped, grads, tol=1e-10)

    x, info = newton_direction(grads)
    dense = dense_ggn(case) + damping * np.eye(case.flat.size)
    np.testing.assert_allclose(flat(x), np.linalg.solve(dense, flat(grads)), rtol=1e-7)
    assert info.converged


@pytest.mark.parametrize("kwargs", [{"tol": -1.0}, {"atol": -1.0}, {"maxiter": -1}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        conjugate_gradient(lambda v: v, B, **kwargs)


# --- Negative curvature (Nocedal & Wright, Algorithm 7.1) -------------------------------------------------


def numpy_newton_cg(a, b, maxiter, x0=None, m_inv=None):
    """Preconditioned Newton-CG inner loop (Nocedal & Wright 2006, Algorithm 7.1), a plain NumPy loop.

    Stops at the first direction with ``p^T A p <= eps ||p|| ||A p||`` and returns the last iterate, or the
    preconditioned steepest-descent direction ``M b`` when that is the zero start. Returns ``(x, stopped_there)``.
    """
    eps = np.finfo(np.float64).eps
    m_inv = np.eye(len(b)) if m_inv is None else m_inv
    x = np.zeros_like(b) if x0 is None else x0
    r = b - a @ x
    z = m_inv @ r
    p = z.copy()
    for j in range(maxiter):
        ap = a @ p
        if p @ ap <= eps * np.linalg.norm(p) * np.linalg.norm(ap):
            return (m_inv @ b if x0 is None and j == 0 else x), True
        alpha = (r @ z) / (p @ ap)
        x = x + alpha * p
        r_new = r - alpha * ap
        z_new = m_inv @ r_new
        p = z_new + (r_new @ z_new) / (r @ z) * p
        r, z = r_new, z_new
    return x, False


def quadratic(a, b, x):
    return 0.5 * x @ a @ x - b @ x


@pytest.mark.parametrize("b", [[1.0, 0.5, 1.0, 1.0], [0.3, -2.0, 1.0, 0.7]])
def test_negative_curvature_stops_at_last_iterate(b):
    """diag(1, -1, 2, 3): plain CG runs on to the saddle point ``A^{-1} b``; Newton-CG stops at the last iterate."""
    a, b = np.diag([1.0, -1.0, 2.0, 3.0]), np.asarray(b)
    x, info = jax.jit(lambda b: conjugate_gradient(lambda v: jnp.asarray(a) @ v, b, tol=1e-12))(jnp.asarray(b))
    expected, stopped = numpy_newton_cg(a, b, maxiter=40)
    assert stopped and bool(info.negative_curvature) and not bool(info.converged)
    np.testing.assert_allclose(x, expected, rtol=1e-12)
    assert np.linalg.norm(x - np.linalg.solve(a, b)) > 0.1 * np.linalg.norm(np.linalg.solve(a, b))
    np.testing.assert_allclose(info.quadratic_value, quadratic(a, b, np.asarray(x)), rtol=1e-12)
    np.testing.assert_allclose(info.residual_norm, np.linalg.norm(b - a @ np.asarray(x)), rtol=1e-12)
    assert quadratic(a, b, np.asarray(x)) < 0  # a descent direction of the model


@pytest.mark.parametrize(
    "b, m_inv, x0",
    [
        ([1.0, 1.0], None, None),  # zero curvature along b: plain CG divides by 0 (NaN)
        ([1.0, 2.0], None, None),  # negative curvature along b
        ([1.0, 4.0], np.diag([2.0, 0.5]), None),  # zero curvature along M b
        ([1.0, 1.0], None, [0.5, -0.25]),  # warm start: the last iterate is x0
    ],
    ids=["zero", "negative", "preconditioned", "warm-start"],
)
def test_negative_curvature_on_first_iteration(b, m_inv, x0):
    """diag(1, -1): the first direction has non-positive curvature; the steepest-descent direction ``M b``
    comes back (``x0`` itself after a warm start), not NaN."""
    a, b = np.diag([1.0, -1.0]), np.asarray(b)
    preconditioner = None if m_inv is None else (lambda r: jnp.asarray(m_inv) @ r)
    x, info = conjugate_gradient(
        lambda v: jnp.asarray(a) @ v, jnp.asarray(b), None if x0 is None else jnp.asarray(x0), preconditioner=preconditioner
    )
    expected, stopped = numpy_newton_cg(a, b, 10, None if x0 is None else np.asarray(x0), m_inv)
    assert stopped and bool(info.negative_curvature) and not bool(info.converged) and info.iterations == 1
    np.testing.assert_allclose(x, expected, rtol=1e-15)
    np.testing.assert_allclose(info.quadratic_value, quadratic(a, b, np.asarray(x)), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(info.residual_norm, np.linalg.norm(b - a @ np.asarray(x)), rtol=1e-12)


@pytest.mark.parametrize("dtype, cond", [(np.float64, 1e12), (np.float32, 1e7)])
def test_ill_conditioned_spd_system_never_reports_negative_curvature(dtype, cond):
    """Positive definite, condition number 1e12 (float64) / 1e7 (float32, beyond ``1 / eps``), run 10 n
    iterations past convergence: the cosine test never fires (Kantorovich: only beyond ``4 / eps^2``)."""
    for seed in range(3):
        a = spd_matrix(seed, cond=cond).astype(dtype)
        b = np.random.default_rng(seed).normal(size=N).astype(dtype)
        x, info = conjugate_gradient(lambda v: jnp.asarray(a) @ v, jnp.asarray(b), tol=0.0, maxiter=10 * N)
        assert not bool(info.negative_curvature) and int(info.iterations) == 10 * N
        exact = np.linalg.solve(a.astype(np.float64), b.astype(np.float64))
        error = np.linalg.norm(np.asarray(x, np.float64) - exact) / np.linalg.norm(exact)
        assert error <= 10 * cond * np.finfo(dtype).eps


# --- The quadratic model, Martens' stopping rule and saved iterates ----------------------------------------


def test_quadratic_value_tracks_the_model():
    """``phi(x) = 1/2 x^T A x - b^T x`` from the recurrence equals the direct formula (warm start, Jacobi)."""
    a = spd_matrix(7, scales=np.logspace(0, 1, N))
    jacobi = pytree_operator(np.diag(1 / np.diag(a)))
    x0 = UNRAVEL(jnp.asarray(np.random.default_rng(1).normal(size=N)))
    for maxiter in (0, 1, 4):
        x, info = conjugate_gradient(pytree_operator(a), B, x0, tol=0.0, maxiter=maxiter, preconditioner=jacobi)
        np.testing.assert_allclose(info.quadratic_value, quadratic(a, flat(B), flat(x)), rtol=1e-12)


def numpy_martens_cg(a, b, maxiter, eps, gamma, m_inv=None):
    """Martens' (2010) CG as a plain NumPy loop: PCG from 0, ``phi(x_i)`` evaluated directly, stop at ``i`` when
    ``i > k``, ``phi_i < 0`` and ``(phi_i - phi_{i-k}) / phi_i < k eps`` with ``k = max(10, ceil(i / 10))``
    (section 4.4); ``x_i`` kept at ``i = ceil(gamma^j)`` (section 4.6). Returns ``(x, i, phis, saved)``."""
    m_inv = np.eye(len(b)) if m_inv is None else m_inv
    x = np.zeros_like(b)
    r = b.copy()
    z = m_inv @ r
    p = z.copy()
    phis, saved = [quadratic(a, b, x)], {}
    save_at = {math.ceil(gamma**j) for j in range(400)}
    for i in range(1, maxiter + 1):
        ap = a @ p
        alpha = (r @ z) / (p @ ap)
        x = x + alpha * p
        r_new = r - alpha * ap
        z_new = m_inv @ r_new
        p = z_new + (r_new @ z_new) / (r @ z) * p
        r, z = r_new, z_new
        phis.append(quadratic(a, b, x))
        if i in save_at:
            saved[i] = x
        k = max(10, math.ceil(i / 10))
        if i > k and phis[i] < 0 and (phis[i] - phis[i - k]) / phis[i] < k * eps:
            break
    return x, i, phis, saved


def linear_spectrum_spd(n, cond, seed, scales=None):
    """``D Q diag(linspace(1, 1 / cond, n)) Q^T D`` and a right-hand side.

    A linearly spaced spectrum keeps CG's iterates reproducible to ~1e-13 over 100 iterations (a log-spaced
    one does not: after its Ritz values converge, summation order alone changes the iterates by 1e-3).
    """
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = (q * np.linspace(1.0, 1.0 / cond, n)) @ q.T
    if scales is not None:
        a = scales[:, None] * a * scales[None, :]
    return a, rng.normal(size=n)


@pytest.mark.parametrize(
    "cond, eps, jacobi",
    [(1e3, 5e-4, False), (1e4, 1e-6, False), (1e3, 1e-6, True)],
    ids=["martens-eps", "window-11", "jacobi"],
)
def test_martens_stopping_rule_and_saved_iterates_match_numpy_loop(cond, eps, jacobi):
    """600 unknowns; the rule stops CG after 50 to 107 iterations (window ``k = ceil(i / 10) = 11`` at 107),
    with the test ratio at least 5% from its threshold on the iterations before and at the stop."""
    n, maxiter = 600, 300
    a, b = linear_spectrum_spd(n, cond, seed=0, scales=np.logspace(0, 1, n) if jacobi else None)
    m_inv = np.diag(1 / np.diag(a)) if jacobi else None
    preconditioner = None if m_inv is None else (lambda r: jnp.asarray(m_inv) @ r)
    run = jax.jit(
        lambda b: conjugate_gradient(
            lambda v: jnp.asarray(a) @ v,
            b,
            tol=0.0,
            maxiter=maxiter,
            preconditioner=preconditioner,
            progress_eps=eps,
            save_gamma=1.3,
        )
    )
    x, info = run(jnp.asarray(b))
    expected, stop, phis, saved = numpy_martens_cg(a, b, maxiter, eps, 1.3, m_inv)

    assert stop < maxiter and not bool(info.converged) and not bool(info.negative_curvature)
    assert int(info.iterations) == stop
    np.testing.assert_allclose(x, expected, rtol=1e-9)
    np.testing.assert_allclose(info.quadratic_value, phis[-1], rtol=1e-10)

    schedule = sorted({math.ceil(1.3**j) for j in range(400)} & set(range(1, maxiter + 1)))
    np.testing.assert_array_equal(info.saved_iterations, schedule)
    assert info.saved_iterates.shape == (len(schedule), n)
    for slot, i in enumerate(schedule):
        np.testing.assert_allclose(info.saved_iterates[slot], saved.get(i, np.zeros(n)), rtol=1e-9)


def test_saved_iterates_of_a_pytree_and_no_rule_without_progress_eps():
    """Saving alone does not stop early; the saved iterates are pytrees stacked on a leading axis."""
    a = spd_matrix(8)
    x, info = conjugate_gradient(pytree_operator(a), B, tol=0.0, maxiter=5, save_gamma=1.3)
    assert int(info.iterations) == 5
    np.testing.assert_array_equal(info.saved_iterations, [1, 2, 3, 4, 5])
    assert jax.tree.structure(info.saved_iterates) == jax.tree.structure(B)
    for slot, i in enumerate([1, 2, 3, 4, 5]):
        iterate = jax.tree.map(lambda leaf: leaf[slot], info.saved_iterates)
        np.testing.assert_allclose(flat(iterate), numpy_cg(a, flat(B), np.zeros(N), i), rtol=1e-10)
    np.testing.assert_allclose(flat(x), flat(jax.tree.map(lambda leaf: leaf[-1], info.saved_iterates)), rtol=0)


# --- Dense, row-space and CG solves of the curvature matrices of an MLP -------------------------------------

DAMPING = 1e-3


def damped(matvec, damping):
    return lambda v: otu.tree_add_scale(matvec(v), damping, v)


def assert_solves(x, matrix, g, damping, rtol=1e-8):
    """``x`` (a pytree) equals ``np.linalg.solve(matrix + damping I, g)`` to ``rtol`` in norm."""
    expected = np.linalg.solve(np.asarray(matrix) + damping * np.eye(len(g)), np.asarray(g))
    error = np.linalg.norm(flat(x) - expected) / np.linalg.norm(expected)
    assert error <= rtol, f"relative error {error:.1e} > {rtol:.0e}"


@pytest.fixture(scope="module")
def mlp():
    """The softmax MLP (non-binary weights), its gradient and its dense Hessian and GGN."""
    case = CASES["mlp-softmax"]()
    return case, jax.grad(case.value_fn)(case.params), np.asarray(dense_hessian(case)), np.asarray(dense_ggn(case))


def test_dense_matrix_of_operators(mlp):
    case, _, hessian, ggn = mlp
    build = jax.jit(
        lambda p: (
            oso.dense_matrix(oso.hvp_operator(case.value_fn, p), p),
            oso.dense_matrix(oso.gnvp_operator(case.model_fn, case.loss, p), p),
        )
    )
    dense_h, dense_g = build(case.params)
    assert dense_h.shape == (case.flat.size,) * 2
    np.testing.assert_allclose(dense_h, hessian, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dense_g, ggn, rtol=1e-10, atol=1e-12)


def test_dense_solve_takes_cholesky_or_eigh(mlp):
    """The indefinite Hessian: damping above ``-lambda_min`` solves by Cholesky, below it by ``eigh`` (which
    reports ``lambda_min``); both equal ``np.linalg.solve`` of ``H + damping I``."""
    case, grads, hessian, _ = mlp
    lambda_min = np.linalg.eigvalsh(hessian)[0]
    assert lambda_min < -0.1
    solve_jit = jax.jit(oso.dense_solve)
    for damping, uses_eigh in [(-lambda_min + 0.1, False), (DAMPING, True)]:
        x, info = solve_jit(jnp.asarray(hessian), grads, damping)
        assert jax.tree.structure(x) == jax.tree.structure(case.params)
        assert bool(info.used_eigh) == uses_eigh
        assert_solves(x, hessian, flat(grads), damping)
        if uses_eigh:
            np.testing.assert_allclose(info.min_eigenvalue, lambda_min, rtol=1e-10)
        else:
            assert np.isnan(info.min_eigenvalue)


def test_dense_solve_of_a_singular_matrix_is_the_pseudo_inverse():
    """``diag(1, -1, 0)`` undamped: Cholesky fails, ``eigh`` leaves the zero eigenvalue out (least squares)."""
    x, info = oso.dense_solve(jnp.diag(jnp.array([1.0, -1.0, 0.0])), jnp.array([1.0, 2.0, 3.0]))
    assert bool(info.used_eigh) and float(info.min_eigenvalue) == -1.0
    np.testing.assert_allclose(x, np.linalg.pinv(np.diag([1.0, -1.0, 0.0])) @ [1.0, 2.0, 3.0], rtol=1e-15)


def test_saddle_free_solve_matches_numpy_absolute_hessian(mlp):
    """``(|H| + damping I)^{-1} g`` with ``|H| = Q |Lambda| Q^T`` built by NumPy (Dauphin et al. 2014)."""
    case, grads, hessian, _ = mlp
    eigenvalues, q = np.linalg.eigh(hessian)
    absolute = (q * np.abs(eigenvalues)) @ q.T
    x, info = jax.jit(lambda m, g: oso.dense_solve(m, g, DAMPING, saddle_free=True))(jnp.asarray(hessian), grads)
    assert bool(info.used_eigh)
    np.testing.assert_allclose(info.min_eigenvalue, eigenvalues[0], rtol=1e-10)
    assert_solves(x, absolute, flat(grads), DAMPING)
    # A descent direction, unlike the damped Newton step on the indefinite Hessian.
    assert flat(grads) @ flat(x) > 0


@pytest.mark.parametrize("name", ["mlp-softmax", "mlp-squared", "mlp-sigmoid", "attention-softmax"])
def test_row_space_ggn_solve_matches_dense(name):
    """``(J^T H_L J + damping I)^{-1} g`` by Woodbury on ``U = J^T S`` against the explicit GGN: softmax with
    weights, squared error with a mask, sigmoid with weights and a zero weight, tokens of a sequence with a mask."""
    case = CASES[name]()
    grads = jax.grad(case.value_fn)(case.params)

    @jax.jit
    def solve(params, grads):
        return oso.low_rank_damped_solve(oso.ggn_factor(case.model_fn, case.loss, params), grads, DAMPING)

    x = solve(case.params, grads)
    assert jax.tree.structure(x) == jax.tree.structure(case.params)
    assert_solves(x, dense_ggn(case), flat(grads), DAMPING)


@pytest.mark.parametrize("name", ["mlp-softmax", "mlp-sigmoid"])
def test_sampled_fisher_solves_match_dense(name):
    """Row-space (``fisher_factor``), CG with ``n`` iterations (``fisher_operator``) and dense
    (``dense_matrix`` of the operator) against the explicit sampled Fisher built from the same draws."""
    case = CASES[name]()
    key, num_samples, n = jax.random.key(3), 2, case.flat.size
    grads = jax.grad(case.value_fn)(case.params)
    fisher = dense_sampled_fisher(case, key, num_samples)

    @jax.jit
    def solves(params, grads, key):
        factor = oso.fisher_factor(case.model_fn, case.loss, params, key, num_samples)
        operator = oso.fisher_operator(case.model_fn, case.loss, params, key, num_samples)
        row_space = oso.low_rank_damped_solve(factor, grads, DAMPING)
        cg, info = conjugate_gradient(damped(operator, DAMPING), grads, tol=0.0, maxiter=n)
        dense, _ = oso.dense_solve(oso.dense_matrix(operator, params), grads, DAMPING)
        return row_space, cg, dense, info

    row_space, cg, dense, info = solves(case.params, grads, key)
    for x in (row_space, cg, dense):
        assert_solves(x, fisher, flat(grads), DAMPING)
    assert not bool(info.negative_curvature)


def test_empirical_fisher_solves_match_dense():
    """Row-space (``empirical_fisher_factor``) and CG (``empirical_fisher_operator``) against
    ``(1/N) sum_i g_i g_i^T`` from explicit per-example gradients."""
    case = CASES["mlp-squared"]()
    grads = jax.grad(case.value_fn)(case.params)
    empirical = dense_empirical_fisher(case)

    @jax.jit
    def solves(params, grads):
        factor = oso.empirical_fisher_factor(case.per_example_value_fn, params)
        operator = oso.empirical_fisher_operator(case.per_example_value_fn, params)
        cg, _ = conjugate_gradient(damped(operator, DAMPING), grads, tol=0.0, maxiter=case.flat.size)
        return oso.low_rank_damped_solve(factor, grads, DAMPING), cg

    for x in solves(case.params, grads):
        assert_solves(x, empirical, flat(grads), DAMPING)


def test_cg_with_n_iterations_matches_dense_ggn_and_newton_decrement(mlp):
    """CG run for ``n`` iterations on the damped GGN equals the dense solve; the Newton decrement of each
    solver's step is ``sqrt(g^T (G + damping I)^{-1} g)``."""
    case, grads, _, ggn = mlp
    n = case.flat.size

    @jax.jit
    def steps(params, grads):
        operator = oso.gnvp_operator(case.model_fn, case.loss, params)
        cg, _ = conjugate_gradient(damped(operator, DAMPING), grads, tol=0.0, maxiter=n)
        dense, _ = oso.dense_solve(oso.dense_matrix(operator, params), grads, DAMPING)
        row_space = oso.low_rank_damped_solve(oso.ggn_factor(case.model_fn, case.loss, params), grads, DAMPING)
        return cg, dense, row_space

    g = flat(grads)
    expected = np.sqrt(g @ np.linalg.solve(ggn + DAMPING * np.eye(n), g))
    for step in steps(case.params, grads):
        assert_solves(step, ggn, g, DAMPING)
        np.testing.assert_allclose(oso.newton_decrement(grads, step), expected, rtol=1e-10)


def test_newton_decrement_is_nan_for_an_indefinite_step():
    """``g^T M^{-1} g < 0`` (``M = diag(1, -1)``, ``g = e_2``) has no square root: NaN, not a silent 0."""
    assert np.isnan(oso.newton_decrement(jnp.array([0.0, 1.0]), jnp.array([0.0, -1.0])))
    np.testing.assert_allclose(oso.newton_decrement({"a": jnp.array([3.0])}, {"a": jnp.array([3.0])}), 3.0)


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: conjugate_gradient(lambda v: v, B, progress_eps=0.0), "progress_eps"),
        (lambda: conjugate_gradient(lambda v: v, B, save_gamma=1.0), "save_gamma"),
        (lambda: conjugate_gradient(lambda v: v, B, save_gamma=jnp.asarray(1.3)), "save_gamma"),
        (lambda: oso.dense_solve(jnp.eye(7), B, -1.0), "damping"),
        (lambda: oso.low_rank_damped_solve(jax.tree.map(lambda x: x[None], B), B, 0.0), "damping"),
    ],
    ids=["progress_eps", "save_gamma", "traced-save_gamma", "dense-damping", "low-rank-damping"],
)
def test_bad_solver_arguments_raise(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()
