"""Conjugate gradient against dense solves (``jnp.linalg.solve``) and a NumPy loop of the textbook algorithm.

Systems are pytrees (a vector and a matrix leaf) whose flattened operator is an explicit SPD matrix,
plus a damped Gauss-Newton system of an MLP built from ``gnvp_operator`` against the explicit
``J^T H_L J + lambda I`` of ``curvature_models.dense_ggn``.
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax.tree_utils as otu  # noqa: E402
import pytest  # noqa: E402
from curvature_models import CASES, dense_ggn  # noqa: E402
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
