"""Flax integration details. That every registered transformation runs in ``oso.flax.TrainState`` and
``nnx.Optimizer`` step for step like the plain run is a contract check (``tests/contract_flax.py``); here: the
TrainState still replaces fields, Flax's own TrainState does not forward extras, and ``nnx_extra_args``."""

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

X = jax.random.normal(jax.random.PRNGKey(0), (8, 3))
LOSS = oso.losses.softmax_cross_entropy(jax.random.randint(jax.random.PRNGKey(1), (8,), 0, 2))


def mlp(p, x):
    """The two-layer tanh network of both Flax models, in plain JAX over ``{"l1": ..., "l2": ...}``."""
    h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    return h @ p["l2"]["kernel"] + p["l2"]["bias"]


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="l2")(jnp.tanh(nn.Dense(4, name="l1")(x)))


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


def test_nnx_extra_args_evaluate_the_model_at_the_given_params():
    model = NNXMLP(nnx.Rngs(4))
    extra = nnx_extra_args(model, X, LOSS)
    params = nnx.state(model, nnx.Param)
    doubled = jax.tree.map(lambda p: 2 * p, params)
    np.testing.assert_allclose(extra["model_fn"](doubled), mlp(jax.tree.map(lambda p: 2 * p, nnx.to_pure_dict(params)), X),
                               rtol=1e-6)
    np.testing.assert_allclose(extra["value_fn"](params), LOSS(model(X)), rtol=1e-6)
    assert set(nnx_extra_args(model, X)) == {"model_fn"}
