"""Contract cases of K-FAC, on the default toy problem with its conv and dense layers tagged."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import optax_second_order as oso
from contract import Problem, ContractCase, toy_problem


@functools.cache
def tagged_problem() -> Problem:
    """The contract's toy conv net with ``oso.kronecker.conv`` / ``dense`` tags; scale and bias fall back."""
    base = toy_problem()
    images = jax.random.normal(jax.random.split(jax.random.PRNGKey(0), 4)[0], (8, 5, 5, 2))
    loss = base.extra["loss"]

    def model_fn(params):
        x = images.astype(params["kernel"].dtype)
        features = jnp.mean(jnp.tanh(oso.kronecker.conv(x, params["kernel"], padding="SAME")), axis=(1, 2))
        return params["scale"] * oso.kronecker.dense(features, params["dense"]) + params["bias"]

    return Problem(base.params, {"value_fn": lambda p: loss(model_fn(p)), "model_fn": model_fn, "loss": loss})


@functools.cache
def _layers():
    problem = tagged_problem()
    return oso.kronecker.find_layers(problem.extra["model_fn"], problem.params)


CASES = [
    ContractCase(
        "kfac",
        lambda learning_rate: oso.kfac(learning_rate, _layers(), inverse_frequency=2),
        needs=("model_fn", "loss"),
        problem=tagged_problem,
    ),
    ContractCase(
        "kfac-ekfac-adaptive",
        lambda learning_rate: oso.kfac(
            learning_rate, _layers(), approximation="eigenvalue_corrected", inverse_frequency=2,
            adaptive_damping=True, damping_adaptation_interval=2,
        ),
        needs=("model_fn", "loss", "value_fn"),
        problem=tagged_problem,
    ),
]
