"""Refresh costs: eigh and QR against the matmul-only primitives of :mod:`optax_second_order.curvature.matrix`.

Run ``python -m optax_second_order.bench.refresh`` (timings) or ``python -m
optax_second_order.bench.refresh accuracy`` (error against iterations); not wired into the ``bench``
command line. On CPU, XLA runs eigh, QR, Cholesky and triangular solves in LAPACK/BLAS (scipy's
OpenBLAS), whose threads compete with XLA's own: on a 2-core machine that makes them 10 to 300 times
slower, and data-dependently so. The library's own factorizations limit scipy's OpenBLAS to one thread when first
traced (``curvature/threads.py``); set ``OPENBLAS_NUM_THREADS`` before Python starts to choose the threads for the raw
calls too; the table's title says which.

Timings: each function is jitted, run once to compile, then timed ``repeats`` times with
``jax.block_until_ready``, round-robin over the functions of one size so that load on a shared machine
hits them alike; the table gives medians in milliseconds. Inputs are float32 ``n x n`` matrices
``Q diag(lambda) Q^T`` with a random orthogonal ``Q`` and a geometric spectrum from 1 to ``1 / cond``
(default ``cond = 1e4``), and ``batch`` of them stacked (Shampoo's ``[blocks, n, n]``). Rows:

* ``matmul``: one ``n x n`` product, the unit of the matmul-only methods;
* ``eigh``: ``jnp.linalg.eigh``; ``inverse_pth_root``: the eigh-based root, ``p = 4``;
* ``newton``: :func:`~optax_second_order.curvature.matrix.inverse_pth_root_newton`, ``p = 4``, cold
  start (scaled identity), early exit; ``newton-fixed-N``: the same iteration with no early exit, ``N``
  steps (enough for condition number 1e6), to compare the two loop forms;
* ``warm-root``: one :func:`~optax_second_order.curvature.matrix.orthogonal_iteration_step` from the
  previous basis and :func:`~optax_second_order.curvature.matrix.inverse_pth_root_in_basis`;
* orthonormalizations of ``L Q`` (product included; ``qr(LQ)`` is SOAP's current refresh): ``qr``:
  ``jnp.linalg.qr``; ``cholesky-qr2``: two plain Cholesky QR passes; ``orthonormalize``: shifted
  CholeskyQR3 (:func:`~optax_second_order.curvature.matrix.orthonormalize`); ``newton-schulz-polar``:
  15 steps of ``X <- X (3 I - X^T X) / 2`` (timed only: a polar factor cannot replace QR there);
* ``orthogonal_iteration_step``: :func:`~optax_second_order.curvature.matrix.orthogonal_iteration_step`,
  the shifted product and ``orthonormalize``.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from optax_second_order.curvature import matrix as cm

__all__ = ["refresh_inputs", "refresh_functions", "time_refreshes", "accuracy_tables", "main"]

SIZES = (64, 128, 256, 512)
P = 4
FIXED_STEPS = 20  # coupled Newton steps that reach float32 round-off for p = 4 up to condition number 1e6


def _matmul(a, b):
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(n, n)))
    return q * np.sign(np.diag(r))


def refresh_inputs(n: int, batch: int = 1, cond: float = 1e4, seed: int = 0):
    """``(stats, basis)``: ``[batch, n, n]`` float32 SPD matrices with a geometric spectrum ``1 .. 1/cond``
    and a previous eigenbasis (the exact one rotated by a small random rotation), columns sorted."""
    rng = np.random.default_rng(seed)
    lam = np.logspace(0, -np.log10(cond), n)
    q = np.stack([_random_orthogonal(n, rng) for _ in range(batch)])
    stats = np.einsum("bij,j,bkj->bik", q, lam, q)
    skew = rng.normal(size=(batch, n, n)) * (0.05 / np.sqrt(n))
    rotation = np.stack([np.linalg.qr(np.eye(n) + s - s.T)[0] for s in skew])
    return jnp.asarray(stats, jnp.float32), jnp.asarray(q @ rotation, jnp.float32)


def _newton_fixed(stats, steps: int):
    """:func:`~optax_second_order.curvature.matrix.inverse_pth_root_newton`'s iteration, ``steps`` steps, no exit test."""
    eye = jnp.eye(stats.shape[-1], dtype=stats.dtype)
    damped = cm.symmetrize(stats) + 1e-6 * eye
    z = (P + 1) / (2 * jnp.linalg.norm(damped, axis=(-2, -1)))[..., None, None]
    x, m = jnp.broadcast_to(z ** (1 / P) * eye, damped.shape), z * damped

    def step(_, state):
        x, m = state
        t = ((P + 1) * eye - m) / P
        t2 = _matmul(t, t)
        return _matmul(x, t), cm.symmetrize(_matmul(_matmul(t2, t2), m))

    return jax.lax.fori_loop(0, steps, step, (x, m))[0]


def _cholesky_qr2(a):
    for _ in range(2):
        lower = jnp.linalg.cholesky(_matmul(jnp.swapaxes(a, -1, -2), a))
        a = jax.lax.linalg.triangular_solve(lower, a, left_side=False, lower=True, transpose_a=True)
    return a


def _newton_schulz_polar(a, steps: int = 15):
    """Polar factor by ``X <- X (3 I - X^T X) / 2`` from ``A / ||A||_F`` (quadratic once ``sigma_min`` is near 1)."""
    x = a / jnp.linalg.norm(a, axis=(-2, -1), keepdims=True)
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    step = lambda _, x: _matmul(x, 1.5 * eye - 0.5 * _matmul(jnp.swapaxes(x, -1, -2), x))  # noqa: E731
    return jax.lax.fori_loop(0, steps, step, x)


def _warm_root(stats, basis):
    basis, _ = cm.orthogonal_iteration_step(stats, basis)
    return cm.inverse_pth_root_in_basis(stats, basis, P, eps=1e-6)[0]


def refresh_functions() -> dict[str, Callable]:
    """``name -> jitted f(stats, basis)`` for every timed refresh (see the module docstring)."""
    fns = {
        "matmul": lambda s, q: _matmul(s, q),
        "eigh": lambda s, q: jnp.linalg.eigh(s),
        "inverse_pth_root": lambda s, q: cm.inverse_pth_root(s, P, eps=1e-6),
        "newton": lambda s, q: cm.inverse_pth_root_newton(s, P, eps=1e-6),
        f"newton-fixed-{FIXED_STEPS}": lambda s, q: _newton_fixed(s, FIXED_STEPS),
        "warm-root": _warm_root,
        "qr(LQ)": lambda s, q: jnp.linalg.qr(_matmul(s, q))[0],
        "cholesky-qr2(LQ)": lambda s, q: _cholesky_qr2(_matmul(s, q)),
        "orthonormalize(LQ)": lambda s, q: cm.orthonormalize(_matmul(s, q)),
        "newton-schulz-polar(LQ)": lambda s, q: _newton_schulz_polar(_matmul(s, q)),
        "orthogonal_iteration_step": lambda s, q: cm.orthogonal_iteration_step(s, q),
    }
    return {name: jax.jit(f) for name, f in fns.items()}


def _shapes(sizes, batch) -> list[tuple[str, int, int]]:
    return [(str(n), n, 1) for n in sizes] + ([(f"{batch}x256", 256, batch)] if batch > 1 else [])


def time_refreshes(sizes=SIZES, batch: int = 4, repeats: int = 10, cond: float = 1e4) -> dict[str, dict[str, float]]:
    """``shape label -> {name -> median ms}`` (matrices of size ``n`` and a ``batch`` of 256 x 256)."""
    fns = refresh_functions()
    table: dict[str, dict[str, float]] = {}
    for label, n, b in _shapes(sizes, batch):
        stats, basis = refresh_inputs(n, b, cond)
        if b == 1:
            stats, basis = stats[0], basis[0]
        for f in fns.values():
            jax.block_until_ready(f(stats, basis))
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, f in fns.items():
                start = time.perf_counter()
                jax.block_until_ready(f(stats, basis))
                times[name].append(time.perf_counter() - start)
        table[label] = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
    return table


def _relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def _root64(matrix):
    """``(M + 1e-6 I)^{-1/P}`` in float64 by NumPy's eigh."""
    lam, q = np.linalg.eigh(np.asarray(matrix, np.float64))
    return (q * (lam + 1e-6) ** (-1.0 / P)) @ q.T


def _cold_newton_table(n: int, seed: int) -> list[str]:
    steps = (1, 2, 4, 8, 12, 16, 20, 24)
    lines = [f"Cold coupled Newton (float32, n = {n}, p = {P}): relative error of the root after k steps\n",
             "| cond | " + " | ".join(f"k={k}" for k in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    newton = jax.jit(_newton_fixed, static_argnums=(1,))
    for cond in (1e2, 1e4, 1e6):
        stats = refresh_inputs(n, 1, cond, seed)[0][0]
        reference = _root64(stats)
        errors = [_relative_error(newton(stats, k), reference) for k in steps]
        lines.append(f"| {cond:.0e} | " + " | ".join(f"{e:.1e}" for e in errors) + " |")
    return lines


def _warm_start_table(n: int, seed: int) -> list[str]:
    steps = (0, 1, 2, 4, 8)
    lines = [f"Warm starts (n = {n}, p = {P}, cond 1e4): relative error of the new root after k steps from the old "
             "one; basis: float32, root error / off-diagonal residual of Q^T M Q; root: float64\n",
             "| change | start | " + " | ".join(f"k={k}" for k in steps) + " |", "|---" * (len(steps) + 2) + "|"]
    g = np.random.default_rng(seed + 1).normal(size=(n, n))
    bump = g @ g.T / np.linalg.norm(g @ g.T, 2)
    old = np.asarray(refresh_inputs(n, 1, 1e4, seed)[0][0], np.float64)
    step = jax.jit(cm.orthogonal_iteration_step)
    in_basis = jax.jit(functools.partial(cm.inverse_pth_root_in_basis, p=P, eps=1e-6))
    for change in (1e-3, 1e-2, 1e-1):
        new = old + change * bump
        reference = _root64(new)
        basis, cells = jnp.asarray(np.linalg.eigh(old)[1][:, ::-1], jnp.float32), []
        for k in range(max(steps) + 1):
            if k in steps:
                root, _, residual = in_basis(jnp.asarray(new, jnp.float32), basis)
                cells.append(f"{_relative_error(root, reference):.1e} / {float(residual):.0e}")
            estimates = jnp.einsum("ij,ik,kj->j", basis, new, basis)
            basis = step(jnp.asarray(new, jnp.float32), basis[:, jnp.argsort(-estimates)])[0]
        lines.append(f"| {change:.0e} | basis | " + " | ".join(cells) + " |")
        root, cells, damped = _root64(old), [], new + 1e-6 * np.eye(n)
        with np.errstate(all="ignore"):
            for k in range(max(steps) + 1):
                if k in steps:
                    cells.append(f"{_relative_error(root, reference):.1e}")
                root = root @ ((P + 1) * np.eye(n) - np.linalg.matrix_power(root, P) @ damped) / P
                root = (root + root.T) / 2
        lines.append(f"| {change:.0e} | root, X ((p+1) I - X^p A) / p | " + " | ".join(cells) + " |")
    return lines


def accuracy_tables(n: int = 256, seed: int = 0) -> str:
    """Markdown tables of the root's relative error against iterations: the cold coupled Newton
    iteration (no exit test), and two warm starts from the previous refresh, ``k`` orthogonal-iteration
    steps from the old eigenbasis (:func:`~optax_second_order.curvature.matrix.inverse_pth_root_in_basis`)
    and the uncoupled Newton correction from the old root; between the two refreshes the statistics
    change by ``change * G G^T / ||G G^T||_2`` (``G`` Gaussian ``n x n``, ``lambda_max = 1``)."""
    return "\n".join(_cold_newton_table(n, seed) + [""] + _warm_start_table(n, seed))


def _format(table: dict[str, dict[str, float]], setting: str) -> str:
    labels = list(table)
    names = list(next(iter(table.values())))
    lines = [f"float32 refresh times, median ms ({setting}; {jax.devices()[0].device_kind}, {os.cpu_count()} cores)\n",
             "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{table[label][name]:.2f}" for label in labels) + " |" for name in names]
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(prog="python -m optax_second_order.bench.refresh",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", default="time", choices=("time", "accuracy"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4, help="also time a batch of this many 256 x 256 (1: none)")
    parser.add_argument("--cond", type=float, default=1e4, help="condition number of the test matrices")
    args = parser.parse_args(argv)
    if args.command == "accuracy":
        text = accuracy_tables()
    else:
        table = time_refreshes(batch=args.batch, repeats=args.repeats, cond=args.cond)
        text = _format(table, f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    print(text)
    return text


if __name__ == "__main__":
    main()
