"""Tiny float64 models and batches for the curvature tests: an MLP, a small CNN, a small attention block.

Each ``Case`` binds a model to one batch and an output-space loss, so ``model_fn(params)`` gives the
outputs and ``loss(model_fn(params))`` the weighted mean loss. The dense references of the tests
work on the flattened parameter vector (``flat``, ``unravel``).

The cases cover the three losses, integer and one-hot labels, non-binary weights, 0/1 masks and
examples that are tokens of a sequence (outputs of shape ``(batch, time, classes)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import optax_second_order as oso

F64 = jnp.float64


def _normal(rng, shape, scale=1.0):
    """Data and parameters come from NumPy (no JAX compilation for setup)."""
    return jnp.asarray(scale * rng.standard_normal(shape), F64)


def _dense(rng, fan_in, fan_out):
    return {"w": _normal(rng, (fan_in, fan_out), 1 / np.sqrt(fan_in)), "b": _normal(rng, (fan_out,), 0.1)}


def mlp(params, x):
    """``tanh`` hidden layer, linear output."""
    h = jnp.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"])
    return h @ params["out"]["w"] + params["out"]["b"]


def _conv(x, p, stride, padding):
    y = jax.lax.conv_general_dilated(x, p["w"], (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["b"]


def cnn(params, x):
    """3x3 conv (SAME) -> tanh -> 3x3 conv (stride 2, VALID) -> tanh -> flatten -> dense."""
    h = jnp.tanh(_conv(x, params["conv1"], 1, "SAME"))
    h = jnp.tanh(_conv(h, params["conv2"], 2, "VALID"))
    return h.reshape(h.shape[0], -1) @ params["out"]["w"] + params["out"]["b"]


def _layer_norm(x, eps=1e-5):
    centered = x - jnp.mean(x, axis=-1, keepdims=True)
    return centered / jnp.sqrt(jnp.mean(jnp.square(centered), axis=-1, keepdims=True) + eps)


def attention(params, tokens):
    """Token embedding, one causal single-head self-attention with residual and layer norm, vocabulary head."""
    x = params["embed"][tokens]
    q, k, v = (x @ params[name] for name in ("query", "key", "value"))
    scores = q @ jnp.swapaxes(k, -1, -2) / np.sqrt(x.shape[-1])
    causal = jnp.tril(jnp.ones(scores.shape[-2:], bool))
    weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
    h = _layer_norm(x + weights @ v @ params["proj"])
    return h @ params["head"]["w"] + params["head"]["b"]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    params: Any
    model_fn: Callable
    loss: oso.losses.OutputLoss
    example_weights: jax.Array  # w_i over the example shape (ones when the loss has none)

    @property
    def flat(self):
        return ravel_pytree(self.params)[0]

    @property
    def unravel(self):
        return ravel_pytree(self.params)[1]

    def value_fn(self, params):
        return self.loss(self.model_fn(params))

    def per_example_value_fn(self, params):
        return self.loss.per_example(self.model_fn(params))


def _mlp_params(rng, n_in, n_out):
    return {"hidden": _dense(rng, n_in, 6), "out": _dense(rng, 6, n_out)}


def mlp_softmax() -> Case:
    """8 examples, 3 classes, integer labels, positive non-binary weights."""
    rng = np.random.default_rng(0)
    params, x = _mlp_params(rng, 5, 3), _normal(rng, (8, 5))
    labels = jnp.asarray(rng.integers(0, 3, 8))
    weights = jnp.asarray(rng.uniform(0.5, 2.0, 8), F64)
    loss = oso.losses.softmax_cross_entropy(labels, weights)
    return Case("mlp-softmax", params, lambda p: mlp(p, x), loss, weights)


def mlp_squared() -> Case:
    """8 examples, 3-dimensional regression targets, a 0/1 mask."""
    rng = np.random.default_rng(1)
    params, x, targets = _mlp_params(rng, 5, 3), _normal(rng, (8, 5)), _normal(rng, (8, 3))
    mask = jnp.array([1, 1, 0, 1, 1, 1, 0, 1], F64)
    loss = oso.losses.squared_error(targets, mask)
    return Case("mlp-squared", params, lambda p: mlp(p, x), loss, mask)


def mlp_sigmoid() -> Case:
    """8 examples, 3 independent binary labels each (sigmoid cross-entropy), weights with a zero (masked) example."""
    rng = np.random.default_rng(4)
    params, x = _mlp_params(rng, 5, 3), _normal(rng, (8, 5))
    targets = jnp.asarray(rng.integers(0, 2, (8, 3)), F64)
    weights = jnp.asarray(rng.uniform(0.5, 2.0, 8), F64).at[5].set(0.0)
    loss = oso.losses.sigmoid_binary_cross_entropy(targets, weights)
    return Case("mlp-sigmoid", params, lambda p: mlp(p, x), loss, weights)


def cnn_sigmoid() -> Case:
    """4 images 6x6x1, 2 independent binary labels each (sigmoid cross-entropy), no weights."""
    rng = np.random.default_rng(2)
    params = {
        "conv1": {"w": _normal(rng, (3, 3, 1, 3), 1 / 3), "b": _normal(rng, (3,), 0.1)},
        "conv2": {"w": _normal(rng, (3, 3, 3, 4), 1 / np.sqrt(27)), "b": _normal(rng, (4,), 0.1)},
        "out": _dense(rng, 16, 2),
    }
    x = _normal(rng, (4, 6, 6, 1))
    targets = jnp.asarray(rng.integers(0, 2, (4, 2)), F64)
    loss = oso.losses.sigmoid_binary_cross_entropy(targets)
    return Case("cnn-sigmoid", params, lambda p: cnn(p, x), loss, jnp.ones((4,), F64))


def attention_softmax() -> Case:
    """2 sequences of 4 tokens (vocabulary 5, width 4); every token is an example; one-hot labels, 0/1 mask."""
    rng = np.random.default_rng(3)
    params = {
        "embed": _normal(rng, (5, 4)),
        **{name: _normal(rng, (4, 4), 0.5) for name in ("query", "key", "value", "proj")},
        "head": _dense(rng, 4, 5),
    }
    tokens = jnp.asarray(rng.integers(0, 5, (2, 4)))
    labels = jnp.asarray(np.eye(5)[rng.integers(0, 5, (2, 4))], F64)
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]], F64)
    loss = oso.losses.softmax_cross_entropy(labels, mask)
    return Case("attention-softmax", params, lambda p: attention(p, tokens), loss, mask)


CASES = {
    c.__name__.replace("_", "-"): c for c in (mlp_softmax, mlp_squared, mlp_sigmoid, cnn_sigmoid, attention_softmax)
}


def dense_hessian(case: Case) -> jax.Array:
    """``d^2 L / d theta^2`` of the flattened parameters (jax.hessian)."""
    return jax.jit(jax.hessian(lambda x: case.value_fn(case.unravel(x))))(case.flat)


def dense_ggn(case: Case) -> jax.Array:
    """Explicit ``J^T H_L J``: ``J`` from jax.jacobian of the flattened outputs, ``H_L`` from jax.hessian of the loss."""

    @jax.jit
    def ggn(flat):
        outputs = case.model_fn(case.unravel(flat))
        jac = jax.jacobian(lambda x: case.model_fn(case.unravel(x)).reshape(-1))(flat)
        output_hessian = jax.hessian(lambda y: case.loss(y.reshape(outputs.shape)))(outputs.reshape(-1))
        return jac.T @ output_hessian @ jac

    return ggn(case.flat)


def per_example_gradients(case: Case, targets: jax.Array) -> jax.Array:
    """``g_i = d l_i / d theta`` at ``targets``, shape ``(num_examples, #params)`` (jax.jacobian).

    A leading axis of ``targets`` (one target set per draw) is vmapped: ``(draws, num_examples, #params)``.
    """

    def gradients(t):
        per_example = lambda x: case.loss.with_targets(t).per_example(case.model_fn(case.unravel(x))).reshape(-1)
        return jax.jacobian(per_example)(case.flat)

    batched = targets.ndim > case.loss.targets.ndim
    return jax.jit(jax.vmap(gradients) if batched else gradients)(targets)


def sampled_targets(case: Case, key: jax.Array, num_samples: int) -> jax.Array:
    """Targets drawn as ``fisher_vp`` draws them: ``sample_targets(k, outputs)`` for ``k in split(key, num_samples)``."""
    draw = jax.vmap(case.loss.sample_targets, in_axes=(0, None))
    return jax.jit(lambda p: draw(jax.random.split(key, num_samples), case.model_fn(p)))(case.params)


def dense_sampled_fisher(case: Case, key: jax.Array, num_samples: int) -> np.ndarray:
    """Explicit ``(1/W) sum_i w_i (1/S) sum_k g_ik g_ik^T`` from per-example gradients at the sampled targets."""
    grads = np.asarray(per_example_gradients(case, sampled_targets(case, key, num_samples)))  # (draws, examples, params)
    w = np.asarray(case.example_weights).reshape(-1)
    return np.einsum("kip,i,kiq->pq", grads, w, grads) / (num_samples * np.sum(w))


def dense_empirical_fisher(case: Case) -> np.ndarray:
    """Explicit ``(1/N) sum_i g_i g_i^T`` from per-example gradients at the data's targets (weights unused)."""
    grads = np.asarray(per_example_gradients(case, case.loss.targets))
    return grads.T @ grads / grads.shape[0]
