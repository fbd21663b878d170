"""SOAP: Adam run in the eigenbasis of Shampoo's Kronecker factors (Vyas et al. 2024, Alg. 3).

For each mode ``i`` of a gradient ``G`` with ``d_i <= max_precond_dim`` SOAP keeps Shampoo's factor
``L_i <- shampoo_beta L_i + (1 - shampoo_beta) G_(i) G_(i)^T`` and an orthogonal basis ``Q_i`` of its
eigenvectors (eigenvalues descending). With ``rotate(X) = X x_1 Q_1^T ... x_k Q_k^T`` (modes above
``max_precond_dim`` are left alone), each step is

    m <- b1 m + (1 - b1) G                    (kept in the original space)
    v <- b2 v + (1 - b2) rotate(G)^2           (kept in the eigenbasis)
    N = rotate^{-1}( rotate(m) / (sqrt(v) + eps) ),   [N <- N / RMS(N) if normalize_grads]
    update = N sqrt(1 - b2^t) / (1 - b1^t)     (bias correction as in the official code, if correct_bias)

after which the factors take in ``G`` and, every ``precondition_frequency`` Adam steps, the basis is
refreshed by one step of power iteration with QR: the columns of ``Q_i`` are sorted by the estimated
eigenvalues ``diag(Q_i^T L_i Q_i)`` (descending), ``v`` is permuted the same way along mode ``i`` (so
each second moment follows its eigenvector), and ``Q_i <- qr(L_i Q_i).Q``.

The first call only builds the factors from ``G`` and the basis from ``eigh`` and returns a zero update
("so that we never use the current gradients in the projection", official code). 1-D leaves run plain
Adam (the official ``precondition_1d=False``).

Non-finite numbers: a step whose gradient, moments or factors come out non-finite (an overflowing square) is
rejected as a whole (zero update, state kept) and counted in ``state.nonfinite``; a stored moment or factor that
is not finite (a corrupt state) restarts from zero; a basis that comes out non-finite from finite factors keeps
the previous one (``state.basis_failures``).

Defaults are the official code's (github.com/nikhilvyas/SOAP, ``soap.py``): ``lr = 3e-3``, ``betas =
(0.95, 0.95)``, ``shampoo_beta = -1`` meaning ``b2``, ``eps = 1e-8``, ``weight_decay = 0.01`` (in the
alias), ``precondition_frequency = 10``, ``max_precond_dim = 10000``, ``normalize_grads = False``,
``correct_bias = True``. Not implemented: ``merge_dims`` (off by default there).

Reference: Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam" (2024), arXiv:2409.11321.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_second_order.curvature.matrix import eigh_psd, orthogonal_iteration_step
from optax_second_order.transforms import blocking
from optax_second_order.transforms.common import (
    all_finite,
    check,
    check_choice,
    check_float_leaves,
    discard_nonfinite,
    due_slot,
    partition_by_cost,
    stagger_slots,
    stat_dtype,
    static_int,
)
from optax_second_order.transforms.damping import reject_step

__all__ = ["SoapState", "scale_by_soap", "BASIS_METHODS"]

BASIS_METHODS = ("qr", "cholesky_qr")


class SoapState(NamedTuple):
    """State of :func:`scale_by_soap`.

    Attributes:
      count: number of calls so far (the first one only initializes; Adam's step is ``count``).
      mu: first moments, original space, like the params.
      nu: second moments, in the eigenbasis, like the params.
      factors: per leaf (``jax.tree.leaves`` order) the factors ``L_i`` of its preconditioned modes.
      bases: the matching eigenbases ``Q_i`` (identity until the first call).
      basis_failures: number of basis computations that came out non-finite and were skipped
        (the previous basis and second moments are kept).
      nonfinite: number of steps rejected because a gradient, moment or factor came out non-finite.
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    factors: tuple[tuple[jax.Array, ...], ...]
    bases: tuple[tuple[jax.Array, ...], ...]
    basis_failures: jax.Array
    nonfinite: jax.Array


def _preconditioned_modes(shape: tuple[int, ...], max_precond_dim: int) -> tuple[int, ...]:
    """Modes with their own factor: none for scalars and vectors, else those of size <= max_precond_dim."""
    if len(shape) <= 1:
        return ()
    return tuple(i for i, d in enumerate(shape) if d <= max_precond_dim)


def rotate(x: jax.Array, modes, bases, back: bool = False) -> jax.Array:
    """``x x_i Q_i^T`` over the preconditioned modes (into the eigenbasis), or ``x x_i Q_i`` with ``back``."""
    for mode, q in zip(modes, bases):
        x = blocking.mode_dot(x, q.T if back else q, mode)
    return x


def _eigenbasis(factor: jax.Array) -> jax.Array:
    """Eigenvectors of ``L`` as columns, eigenvalues descending."""
    return eigh_psd(factor)[1][:, ::-1]


def _sorted_basis(factor, basis, nu, mode):
    """The columns of ``Q`` sorted by decreasing ``diag(Q^T L Q)``, and ``nu`` permuted alike along ``mode``."""
    estimated = jnp.einsum("ij,ik,kj->j", basis, factor, basis, precision=jax.lax.Precision.HIGHEST)
    order = jnp.argsort(-estimated, stable=True)
    return basis[:, order], jnp.take(nu, order, axis=mode)


def _power_qr_refresh(factor, basis, nu, mode):
    """One power-iteration step with Householder QR (the official code); ``nu`` follows the sorted eigenvectors
    along ``mode``."""
    basis, nu = _sorted_basis(factor, basis, nu, mode)
    q, _ = jnp.linalg.qr(jnp.matmul(factor, basis, precision=jax.lax.Precision.HIGHEST))
    return q, nu


def _cholesky_qr_refresh(factor, basis, nu, mode):
    """The same step with :func:`~optax_second_order.curvature.matrix.orthogonal_iteration_step` (shifted
    CholeskyQR3 of ``(L / ||L||_F + 1e-5 I) Q``: products, a Cholesky factorization and triangular solves); a
    basis that fails comes back non-finite, so the caller keeps the previous one."""
    basis, nu = _sorted_basis(factor, basis, nu, mode)
    q, ok = orthogonal_iteration_step(factor, basis)
    return jnp.where(ok, q, jnp.nan), nu


def scale_by_soap(
    b1: float = 0.95,
    b2: float = 0.95,
    shampoo_beta: float | None = None,
    eps: float = 1e-8,
    precondition_frequency: int = 10,
    max_precond_dim: int | None = None,
    normalize_grads: bool = False,
    correct_bias: bool = True,
    basis_method: str = "qr",
    stagger: bool | int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """SOAP's update direction (see the module docstring); chain with the learning rate (:func:`soap`).

    Args:
      b1, b2: Adam's decays (official default ``(0.95, 0.95)``).
      shampoo_beta: the factors' decay; ``None`` uses ``b2`` (official ``shampoo_beta=-1``).
      eps: Adam's epsilon, added to ``sqrt(v)``.
      precondition_frequency: Adam steps between eigenbasis refreshes.
      max_precond_dim: modes larger than this are not rotated (``None``: 10000; a shape, so under
        ``optax.inject_hyperparams`` leave it ``None`` or list it in ``static_args``).
      normalize_grads: divide each leaf's direction by its RMS (official option, helps at frequency ~100).
      correct_bias: Adam's bias correction.
      basis_method: the orthonormalization of the refresh ``L Q``: ``"qr"`` (Householder, the official code's;
        fastest on CPU) or ``"cholesky_qr"`` (shifted CholeskyQR3 with a relative shift of ``1e-5``: products,
        Cholesky and triangular solves, for GPU/TPU).
      stagger: spread each refresh over this many steps (``True``: ``precondition_frequency``; ``None``/``False``:
        every basis on one step): a fixed partition of the (leaf, mode) factors balanced by the cost ``d^3``,
        slot ``r`` refreshed ``r`` steps before the unstaggered schedule. At most ``precondition_frequency``; a
        shape, so under ``optax.inject_hyperparams`` list it (or, with ``True``, ``precondition_frequency``) in
        ``static_args``. The first call still computes every basis (by eigh).
    """
    name = "scale_by_soap"
    shampoo_beta = b2 if shampoo_beta is None else shampoo_beta
    for argument, value in (("b1", b1), ("b2", b2), ("shampoo_beta", shampoo_beta)):
        check(name, argument, value, lambda x: 0 <= x < 1, "in [0, 1)")
    check(name, "eps", eps, lambda x: x >= 0, ">= 0")
    check(name, "precondition_frequency", precondition_frequency, lambda x: x >= 1 and float(x).is_integer(), "an integer >= 1")
    max_precond_dim = static_int(name, "max_precond_dim", max_precond_dim, 10000)
    check_choice(name, "basis_method", basis_method, BASIS_METHODS)
    slots = stagger_slots(name, stagger, precondition_frequency)
    check(name, "stagger", slots, lambda x: not isinstance(precondition_frequency, (int, float)) or x <= precondition_frequency,
          f"at most precondition_frequency ({precondition_frequency})")

    def slot_table(leaves):
        """The refresh slot of each (leaf, mode) factor, per leaf: a partition balanced by ``d^3``."""
        units = [(j, x.shape[i]) for j, x in enumerate(leaves) for i in _preconditioned_modes(x.shape, max_precond_dim)]
        slot_of = iter(partition_by_cost([float(d) ** 3 for _, d in units], slots))
        return [tuple(next(slot_of) for _ in _preconditioned_modes(x.shape, max_precond_dim)) for x in leaves]

    def init_fn(params):
        leaves = jax.tree.leaves(params)
        zeros = lambda x: jnp.zeros(x.shape, stat_dtype(x.dtype))  # noqa: E731
        modes = [_preconditioned_modes(x.shape, max_precond_dim) for x in leaves]
        factors = tuple(tuple(jnp.zeros((x.shape[i],) * 2, stat_dtype(x.dtype)) for i in m) for x, m in zip(leaves, modes))
        bases = tuple(tuple(jnp.eye(x.shape[i], dtype=stat_dtype(x.dtype)) for i in m) for x, m in zip(leaves, modes))
        zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731 (fresh buffers: the state is donatable)
        return SoapState(zero(), jax.tree.map(zeros, params), jax.tree.map(zeros, params), factors, bases, zero(), zero())

    def refresh_fn():
        return _power_qr_refresh if basis_method == "qr" else _cholesky_qr_refresh

    def staggered_bases(safe, finite, bases, nu, modes, slots_of_modes, count):
        """Per factor: eigh on the first call, a refresh when its slot is due, else as it was."""
        due = due_slot(count, precondition_frequency)
        new_bases, failed = [], jnp.zeros((), jnp.int32)
        for f, q, mode, slot in zip(safe, bases, modes, slots_of_modes):

            def first_basis(q, nu, f=f):
                return _eigenbasis(f), nu

            def refresh(q, nu, f=f, mode=mode):
                return refresh_fn()(f, q, nu, mode)

            branch = jnp.where(count == 0, 0, jnp.where(due == slot, 1, 2))
            new_q, new_nu = jax.lax.switch(branch, (first_basis, refresh, lambda q, v: (q, v)), q, nu)
            ok = finite & all_finite(new_q)
            new_bases.append(jnp.where(ok, new_q, q))
            nu = jnp.where(ok, new_nu, nu)
            failed += ((branch != 2) & ~ok).astype(jnp.int32)
        return tuple(new_bases), nu, failed

    def leaf_update(g, mu, nu, factors, bases, count, slots_of_modes):
        modes = _preconditioned_modes(g.shape, max_precond_dim)
        t = jnp.maximum(count, 1).astype(g.dtype)
        # Adam in the eigenbasis (skipped on the first call, where the basis does not exist yet).
        new_mu = b1 * mu + (1.0 - b1) * g
        new_nu = b2 * nu + (1.0 - b2) * jnp.square(rotate(g, modes, bases))
        direction = rotate(rotate(new_mu, modes, bases) / (jnp.sqrt(new_nu) + eps), modes, bases, back=True)
        if normalize_grads:
            direction = direction / (1e-30 + jnp.sqrt(jnp.mean(jnp.square(direction))))
        if correct_bias:
            direction = direction * jnp.sqrt(1.0 - b2**t) / (1.0 - b1**t)
        started = count > 0
        direction = jnp.where(started, direction, 0.0)
        mu, nu = jnp.where(started, new_mu, mu), jnp.where(started, new_nu, nu)
        # Shampoo's factors take in G after the step; then the basis: eigh first, power-QR every f steps.
        factors = tuple(
            shampoo_beta * f + (1.0 - shampoo_beta) * blocking.mode_gram(g, mode) for f, mode in zip(factors, modes)
        )

        # LAPACK's result on non-finite input is undefined: such factors are replaced by I and flagged.
        finite = all_finite(factors)
        safe = tuple(jnp.where(finite, f, jnp.eye(f.shape[0], dtype=f.dtype)) for f in factors)

        def first_basis(bases, nu):
            return tuple(_eigenbasis(f) for f in safe), nu

        def refresh(bases, nu):
            new = []
            for f, q, mode in zip(safe, bases, modes):
                q, nu = refresh_fn()(f, q, nu, mode)
                new.append(q)
            return tuple(new), nu

        if slots > 1:
            bases, nu, failed = staggered_bases(safe, finite, bases, nu, modes, slots_of_modes, count)
            return direction, mu, nu, factors, bases, failed
        branch = jnp.where(count == 0, 0, jnp.where(count % precondition_frequency == 0, 1, 2))
        new_bases, new_nu = jax.lax.switch(branch, (first_basis, refresh, lambda b, v: (b, v)), bases, nu)
        ok = finite & all_finite(new_bases)
        bases = tuple(jnp.where(ok, q, old) for q, old in zip(new_bases, bases))
        nu = jnp.where(ok, new_nu, nu)
        return direction, mu, nu, factors, bases, ((branch != 2) & ~ok).astype(jnp.int32)

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        check_float_leaves(updates, name)
        leaves, treedef = jax.tree.flatten(updates)
        mu, nu, factors = discard_nonfinite((state.mu, state.nu, state.factors))  # a corrupt statistic restarts
        results = [
            leaf_update(g.astype(m.dtype), m, v, f, q, state.count, r)
            for g, m, v, f, q, r in zip(leaves, jax.tree.leaves(mu), jax.tree.leaves(nu), factors, state.bases,
                                        slot_table(leaves))
        ]
        direction, mu, nu, factors, bases, failed = zip(*results) if results else ((),) * 6
        out = [d.astype(g.dtype) for d, g in zip(direction, leaves)]
        new_state = SoapState(
            optax.safe_int32_increment(state.count),
            jax.tree.unflatten(treedef, list(mu)),
            jax.tree.unflatten(treedef, list(nu)),
            tuple(factors),
            tuple(bases),
            state.basis_failures + sum(failed, jnp.zeros((), jnp.int32)),
            state.nonfinite,
        )
        # non-finite policy: a step whose gradient, moments or factors are not finite (an overflowing square) is
        # rejected as a whole (zero update, state kept), rather than freezing an infinite second moment in the state
        ok = all_finite((leaves, new_state.mu, new_state.nu, new_state.factors, out))
        kept = state._replace(nonfinite=state.nonfinite + 1)
        new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, kept)
        return jax.tree.unflatten(treedef, reject_step(~ok, out)), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
