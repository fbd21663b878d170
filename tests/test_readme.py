"""The README's example runs as written: its train step lowers the loss of a small classifier."""

import pathlib
import re

import jax
import jax.numpy as jnp

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_train_step_trains():
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "train_step" in block]
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)

    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k1, (64, 8))
    y = jnp.argmax(x @ jax.random.normal(k2, (8, 3)), axis=-1)  # a learnable labelling
    params = {"w1": 0.5 * jax.random.normal(k3, (8, 16)), "w2": 0.5 * jax.random.normal(k4, (16, 3))}
    opt_state = namespace["tx"].init(params)
    losses = []
    for _ in range(50):
        params, opt_state, value = namespace["train_step"](params, opt_state, x, y)
        losses.append(float(value))
    assert all(jnp.isfinite(jnp.asarray(losses)))
    assert losses[-1] < 0.9 * losses[0]  # Sophia moves each coordinate by at most lr = 1e-3 per step
