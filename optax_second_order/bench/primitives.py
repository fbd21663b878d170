"""``bench primitives``: the cost of the curvature primitives as a multiple of one gradient.

On the ``digits-autoencoder`` task (1.4M parameters) at batch 512, each of these is jitted with the
parameters, the direction, the batch and the key as arguments, run once to compile, then timed
``repeats`` times with ``jax.block_until_ready``; the products are timed round-robin (one of each per
round) so that load on a shared machine hits them alike. The table gives the median time and its ratio
to the median time of ``grad``:

* ``grad``: ``jax.grad(value_fn)``;
* ``hvp``: :func:`~optax_second_order.curvature.hvp` (forward-over-reverse);
* ``gnvp``: :func:`~optax_second_order.curvature.gnvp` (jvp, output-space Hessian, vjp);
* ``fisher_vp``: :func:`~optax_second_order.curvature.fisher_vp`, one sampled target per example;
* ``empirical_fisher_vp``: :func:`~optax_second_order.curvature.empirical_fisher_vp`;
* ``hutchinson``: :func:`~optax_second_order.curvature.hutchinson_diagonal`, one Rademacher probe;
* ``gnb``: :func:`~optax_second_order.curvature.gnb_diagonal` (Sophia-G's estimator).
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import jax
import numpy as np

from optax_second_order import curvature
from optax_second_order.bench.tasks import digits_autoencoder

__all__ = ["products", "time_products", "main"]


def products(task) -> dict[str, Callable]:
    """``name -> f(params, v, batch, key)`` for every timed primitive on ``task``."""

    def fns(params, batch):
        inputs, targets = batch
        loss = task.loss(targets)
        model_fn = lambda p: task.apply(p, inputs)  # noqa: E731
        return model_fn, loss, lambda p: loss(model_fn(p))

    def grad(params, v, batch, key):
        return jax.grad(fns(params, batch)[2])(params)

    def hvp(params, v, batch, key):
        return curvature.hvp(fns(params, batch)[2], params, v)

    def gnvp(params, v, batch, key):
        model_fn, loss, _ = fns(params, batch)
        return curvature.gnvp(model_fn, loss, params, v)

    def fisher_vp(params, v, batch, key):
        model_fn, loss, _ = fns(params, batch)
        return curvature.fisher_vp(model_fn, loss, params, v, key)

    def empirical_fisher_vp(params, v, batch, key):
        model_fn, loss, _ = fns(params, batch)
        return curvature.empirical_fisher_vp(lambda p: loss.per_example(model_fn(p)), params, v)

    def hutchinson(params, v, batch, key):
        return curvature.hutchinson_diagonal(fns(params, batch)[2], params, key)

    def gnb(params, v, batch, key):
        model_fn, loss, _ = fns(params, batch)
        return curvature.gnb_diagonal(model_fn, loss, params, key)

    named = (grad, hvp, gnvp, fisher_vp, empirical_fisher_vp, hutchinson, gnb)
    return {f.__name__: jax.jit(f) for f in named}


def time_products(repeats: int = 20, seed: int = 0) -> dict[str, dict[str, float]]:
    """``name -> {"median_s", "ratio"}``, timed round-robin after one compiling call each."""
    task = digits_autoencoder()
    key = jax.random.key(seed)
    params = task.init(key)
    v = curvature.probes(jax.random.fold_in(key, 1), params, "gaussian")
    batch = next(task.batches(seed))
    fns = products(task)
    args = (params, v, batch, jax.random.fold_in(key, 2))
    for f in fns.values():
        jax.block_until_ready(f(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - start)
    grad = float(np.median(times["grad"]))
    return {name: {"median_s": float(np.median(t)), "ratio": float(np.median(t)) / grad} for name, t in times.items()}


def main(out: str, repeats: int, environment: dict) -> dict:
    """Times the products, prints the table and writes ``out/primitives.json``."""
    timings = time_products(repeats)
    lines = [
        "digits-autoencoder (1.4M params), batch 512",
        "",
        "| primitive | median ms | x grad |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {1e3 * t['median_s']:.2f} | {t['ratio']:.2f} |" for name, t in timings.items()]
    print("\n".join(lines))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "primitives.json")
    with open(path, "w") as f:
        json.dump({"environment": environment, "repeats": repeats, "timings": timings}, f, indent=1)
    print(f"wrote {path}")
    return timings
