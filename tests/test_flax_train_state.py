"""Flax integration: extra arguments reach ``tx.update`` from a linen ``TrainState`` and an ``nnx.Optimizer``.

Each optimizer of the diagonal family runs two steps through the Flax API and, independently, through
``tx.update`` called by hand with ``model_fn`` / ``value_fn`` written here in plain JAX over the same
parameter arrays; the parameters must agree.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state as flax_train_state

import optax_second_order as oso
from optax_second_order.flax import TrainState, nnx_extra_args

OPTIMIZERS = {
    "adam": lambda: oso.adam(1e-2),
    "adahessian": lambda: oso.adahessian(0.05, eps=0.1),
    "sophia-g": lambda: oso.sophia(1e-2, estimator="gnb", refresh_every=2),
    "sophia-h": lambda: oso.sophia(1e-2, estimator="hutchinson", refresh_every=2),
    "optax.adam": lambda: optax.adam(1e-2),
}

X = jax.random.normal(jax.random.PRNGKey(0), (8, 3))
LOSS = oso.losses.softmax_cross_entropy(jax.random.randint(jax.random.PRNGKey(1), (8,), 0, 2))


def mlp(p, x):
    """The two-layer tanh network of both Flax models, in plain JAX over ``{"l1": ..., "l2": ...}``."""
    h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    return h @ p["l2"]["kernel"] + p["l2"]["bias"]


def by_hand(tx, params, steps=2):
    """``steps`` updates through ``tx.update`` with extras built from :func:`mlp`."""
    def model_fn(p):
        return mlp(p, X)

    def value_fn(p):
        return LOSS(model_fn(p))

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(value_fn)(params), state, params,
                                   value_fn=value_fn, model_fn=model_fn, loss=LOSS)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="l2")(jnp.tanh(nn.Dense(4, name="l1")(x)))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_linen_train_state_forwards_extra_arguments(name):
    module = LinenMLP()
    params = module.init(jax.random.PRNGKey(2), X)["params"]
    state = TrainState.create(apply_fn=module.apply, params=params, tx=OPTIMIZERS[name]())

    @jax.jit
    def train_step(state):
        def model_fn(p):
            return state.apply_fn({"params": p}, X)

        def value_fn(p):
            return LOSS(model_fn(p))

        grads = jax.grad(value_fn)(state.params)
        return state.apply_gradients(grads=grads, value_fn=value_fn, model_fn=model_fn, loss=LOSS)

    for _ in range(2):
        state = train_step(state)
    assert int(state.step) == 2
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 state.params, by_hand(OPTIMIZERS[name](), params))


def test_linen_train_state_still_replaces_fields():
    class WithStats(TrainState):
        batch_stats: dict

    module = LinenMLP()
    params = module.init(jax.random.PRNGKey(2), X)["params"]
    state = WithStats.create(apply_fn=module.apply, params=params, tx=optax.sgd(0.1), batch_stats={"n": 0})
    grads = jax.tree.map(jnp.ones_like, params)
    new = state.apply_gradients(grads=grads, batch_stats={"n": 1})
    assert new.batch_stats == {"n": 1}
    np.testing.assert_allclose(new.params["l1"]["bias"], params["l1"]["bias"] - 0.1)


def test_flax_own_train_state_does_not_forward():
    """Why this module exists: Flax's ``TrainState`` calls ``tx.update`` without the extra arguments."""
    module = LinenMLP()
    params = module.init(jax.random.PRNGKey(2), X)["params"]
    state = flax_train_state.TrainState.create(apply_fn=module.apply, params=params, tx=oso.adahessian())
    with pytest.raises(TypeError, match="value_fn"):
        state.apply_gradients(grads=params)


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 4, rngs=rngs)
        self.l2 = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_nnx_optimizer_forwards_extra_arguments(name):
    model = NNXMLP(nnx.Rngs(3))
    params = jax.tree.map(jnp.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    optimizer = nnx.Optimizer(model, OPTIMIZERS[name](), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer):
        extra = nnx_extra_args(model, X, LOSS)
        grads = nnx.grad(lambda m: LOSS(m(X)))(model)
        optimizer.update(model, grads, **extra)

    for _ in range(2):
        train_step(model, optimizer)
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 got, by_hand(OPTIMIZERS[name](), params))


def test_nnx_extra_args_evaluate_the_model_at_the_given_params():
    model = NNXMLP(nnx.Rngs(4))
    extra = nnx_extra_args(model, X, LOSS)
    params = nnx.state(model, nnx.Param)
    doubled = jax.tree.map(lambda p: 2 * p, params)
    np.testing.assert_allclose(extra["model_fn"](doubled), mlp(jax.tree.map(lambda p: 2 * p, nnx.to_pure_dict(params)), X),
                               rtol=1e-6)
    np.testing.assert_allclose(extra["value_fn"](params), LOSS(model(X)), rtol=1e-6)
    assert set(nnx_extra_args(model, X)) == {"model_fn"}
