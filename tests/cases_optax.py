"""Contract cases that prove the contract on optax's own transformations and two small fixtures (``library=False``:
the library's own policies for non-finite numbers and masking are not asked of them).

The fixtures are not optimizers of this library: they are the smallest transformations that use
the extra-argument protocol (``value_fn``; ``model_fn`` and ``loss`` with a PRNG key in the state),
so the contract's missing-argument and checkpoint checks run on something that needs them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from contract import ContractCase
from optax_second_order.curvature import gnb_diagonal
from optax_second_order.transforms.common import extra_arg, require_params, stat_dtype


def polyak_fixture(max_step: float = 1.0, eps: float = 1e-8) -> optax.GradientTransformationExtraArgs:
    """Polyak's step ``min(f(x) / ||g||^2, max_step) g`` (optimal value taken as 0); needs ``value_fn``."""

    def update(updates, state, params=None, **extra):
        value_fn = extra_arg(extra, "value_fn", "polyak_fixture")
        value = value_fn(require_params(params, "polyak_fixture"))
        step = jnp.minimum(value / (optax.tree.norm(updates, squared=True) + eps), max_step)
        return jax.tree.map(lambda g: (step * g).astype(g.dtype), updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


class GNBFixtureState(NamedTuple):
    key: jax.Array
    diagonal: Any


def gnb_fixture(decay: float = 0.9, damping: float = 0.1, seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """``g / (d + damping)`` with ``d`` an EMA of Gauss-Newton-Bartlett diagonals; needs ``model_fn``, ``loss``."""

    def init(params):
        diagonal = jax.tree.map(lambda p: jnp.zeros(p.shape, stat_dtype(p.dtype)), params)
        return GNBFixtureState(jax.random.PRNGKey(seed), diagonal)

    def update(updates, state, params=None, **extra):
        model_fn = extra_arg(extra, "model_fn", "gnb_fixture")
        loss = extra_arg(extra, "loss", "gnb_fixture")
        key, sample_key = jax.random.split(state.key)
        estimate = gnb_diagonal(model_fn, loss, require_params(params, "gnb_fixture"), sample_key)
        diagonal = jax.tree.map(lambda d, h: decay * d + (1 - decay) * h.astype(d.dtype), state.diagonal, estimate)
        updates = jax.tree.map(lambda g, d: (g / (d + damping)).astype(g.dtype), updates, diagonal)
        return updates, GNBFixtureState(key, diagonal)

    return optax.GradientTransformationExtraArgs(init, update)


def polyak(learning_rate, max_step: float = 1.0) -> optax.GradientTransformationExtraArgs:
    return optax.chain(polyak_fixture(max_step), optax.scale_by_learning_rate(learning_rate))


def gnb(learning_rate, decay: float = 0.9, damping: float = 0.1, seed: int = 0) -> optax.GradientTransformationExtraArgs:
    return optax.chain(gnb_fixture(decay, damping, seed), optax.scale_by_learning_rate(learning_rate))


CASES = [
    ContractCase("adam", optax.adam, inject="b1", library=False),
    ContractCase("lbfgs", optax.lbfgs, dict(memory_size=3, linesearch=None), static_args=("memory_size",), library=False),
    ContractCase("polyak_fixture", polyak, needs=("value_fn",), inject="max_step", injected_value=1e-3, library=False),
    ContractCase("gnb_fixture", gnb, needs=("model_fn", "loss"), inject="damping", library=False),
]
