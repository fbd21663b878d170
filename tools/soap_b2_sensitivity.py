"""How far a 1-ulp change of ``b2`` moves SOAP's parameters (issue 23): docs/optimizers/soap.md, "Rounding and
degenerate eigenspaces".

    python tools/soap_b2_sensitivity.py            # as the library is
    python tools/soap_b2_sensitivity.py --before   # with the tie-break and the rounding floor switched off

A 10-32-3 tanh MLP on 64 random examples, softmax cross-entropy, ``oso.soap(3e-3)`` against ``oso.soap(3e-3, b2=b2')``
with ``b2'`` the next representable number above 0.95 (in float32: ``float(np.float32(0.95))``, what
``optax.inject_hyperparams`` passes; in float64: ``np.nextafter(0.95, 1)``), and
``optax.inject_hyperparams(oso.soap)(learning_rate=3e-3)`` against the plain alias in float32: the largest parameter
difference after 2, 5 and 10 steps (the first step only builds the factors), and ``optax.adam`` beside it.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_second_order as oso
from optax_second_order.transforms import soap as soap_module

jax.config.update("jax_enable_x64", True)
STEPS = (2, 5, 10)


def problem(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 10)), dtype)
    y = rng.integers(0, 3, 64)
    params = {"w1": 0.3 * rng.standard_normal((10, 32)), "b1": np.zeros(32), "w2": 0.3 * rng.standard_normal((32, 3)),
              "b2": np.zeros(3)}

    def loss(p):
        logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return jax.tree.map(lambda a: jnp.asarray(a, dtype), params), loss


def trajectory(tx, dtype):
    params, loss = problem(dtype)
    state, out = tx.init(params), []
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
    for _ in range(max(STEPS)):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
        out.append(params)
    return out


def difference(a, b) -> str:
    return " ".join(f"{max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a[n - 1]), jax.tree.leaves(b[n - 1]))):.1e}"
                    for n in STEPS)


def main() -> None:
    if "--before" in sys.argv:
        soap_module._tie_broken = lambda factor: factor
        soap_module.ROUNDING_FLOOR = 0.0
    print(f"largest parameter difference after {', '.join(map(str, STEPS))} steps")
    for dtype, b2 in ((jnp.float32, float(np.float32(0.95))), (jnp.float64, float(np.nextafter(0.95, 1.0)))):
        name = jnp.dtype(dtype).name
        plain = trajectory(oso.soap(3e-3), dtype)
        print(f"{name}  soap, b2 one ulp up:      {difference(plain, trajectory(oso.soap(3e-3, b2=b2), dtype))}")
        if dtype == jnp.float32:
            injected = trajectory(optax.inject_hyperparams(oso.soap)(learning_rate=3e-3), dtype)
            print(f"{name}  soap, inject_hyperparams: {difference(plain, injected)}")
            adam = trajectory(optax.adam(3e-3), dtype)
            print(f"{name}  adam, inject_hyperparams: "
                  f"{difference(adam, trajectory(optax.inject_hyperparams(optax.adam)(learning_rate=3e-3), dtype))}")
        print(f"{name}  soap's own movement:      {difference(plain, [problem(dtype)[0]] * max(STEPS))}")


if __name__ == "__main__":
    main()
