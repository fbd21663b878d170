"""Compile time of a jitted K-FAC step for a stack of dense layers, under ``oso.kronecker.scan`` and unrolled.

    python tools/scan_compile_time.py [depth ...]      (default: 2 12)

Prints, per depth and form, the seconds to trace and lower, and to compile (XLA), the step of
``oso.kfac`` (statistics and refresh branches included) on a 64-wide MLP with that many hidden layers, with this
process's ``XLA_FLAGS`` (none: XLA's defaults).
"""

import sys
import time

import jax
import jax.numpy as jnp

import optax_second_order as oso
from optax_second_order.curvature import kronecker

WIDTH, BATCH, CLASSES = 64, 32, 10


def _model(depth: int, scanned: bool):
    def block(h, p):
        return jnp.tanh(kronecker.dense(h, p["w"], p["b"])), None

    def model(params, x):
        if scanned:
            h, _ = kronecker.scan(block, x, params["blocks"])
        else:
            h = x
            for l in range(depth):
                h, _ = block(h, params[f"b{l}"])
        return kronecker.dense(h, params["head"])

    return model


def _params(depth: int, scanned: bool):
    w = jnp.ones((depth, WIDTH, WIDTH)) / WIDTH
    b = jnp.zeros((depth, WIDTH))
    params = {"head": jnp.ones((WIDTH, CLASSES)) / WIDTH}
    if scanned:
        return {**params, "blocks": {"w": w, "b": b}}
    return {**params, **{f"b{l}": {"w": w[l], "b": b[l]} for l in range(depth)}}


def measure(depth: int, scanned: bool) -> tuple[float, float]:
    """Seconds to trace and lower, and to compile, one jitted K-FAC step."""
    model, params = _model(depth, scanned), _params(depth, scanned)
    x, y = jnp.ones((BATCH, WIDTH)), jnp.zeros(BATCH, jnp.int32)
    layers = kronecker.find_layers(lambda p: model(p, x), params)
    tx = oso.kfac(0.1, layers)

    def step(params, state, x, y):
        loss = oso.losses.softmax_cross_entropy(y)
        grads = jax.grad(lambda p: loss(model(p, x)))(params)
        return tx.update(grads, state, params, model_fn=lambda p: model(p, x), loss=loss)

    start = time.perf_counter()
    lowered = jax.jit(step).lower(params, tx.init(params), x, y)
    traced = time.perf_counter()
    lowered.compile()
    return traced - start, time.perf_counter() - traced


if __name__ == "__main__":
    measure(1, True)  # warm-up: JAX's own start-up is not the step's
    for depth in [int(d) for d in sys.argv[1:]] or [2, 12]:
        for scanned in (True, False):
            trace, compile_ = measure(depth, scanned)
            form = "scanned" if scanned else "unrolled"
            print(f"{depth:3d} layers {form:8s}  trace+lower {trace:6.2f} s  compile {compile_:6.2f} s", flush=True)
