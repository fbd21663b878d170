"""Output-space losses: value, output-space Hessian-vector product, targets sampled from the model.

A loss object is bound to the targets of the current batch, so the curvature primitives need only
``model_fn`` (params -> outputs) and ``loss``:

.. math::

    L(y) = \\frac{\\sum_i w_i \\, \\ell(y_i, t_i)}{\\sum_i w_i}

where ``i`` runs over the *examples* (every leading index of the outputs that is not part of an
event: the class axis of a softmax, the last ``event_ndim`` axes of a regression), ``w_i`` are
optional per-example weights or a 0/1 mask, and ``t_i`` the targets.

Every loss provides

* ``loss(outputs)`` -- the weighted mean above;
* ``loss.per_example(outputs)`` -- the unweighted per-example losses ``l_i``;
* ``loss.output_hvp(outputs, v)`` -- ``H_L v`` with ``H_L = d^2 L / dy^2`` (closed form);
* ``loss.output_hessian_sqrt_vp(outputs, v)`` and ``loss.output_hessian_sqrt_transpose_vp(outputs, v)`` --
  ``S v`` and ``S^T v`` for a factor ``H_L = S S^T``, block diagonal over examples (for row-space solves);
* ``loss.sample_targets(key, outputs)`` -- targets drawn from the model's predictive distribution
  ``p(t | y)`` for which ``l = -log p(t | y)`` (up to a constant);
* ``loss.with_targets(t)`` -- the same loss bound to other targets (for example sampled ones);
* ``loss.kl(outputs, new_outputs)`` -- the weighted mean over examples of the KL divergence
  ``KL(p(t | y_i) || p(t | y'_i))`` between the model's predictive distributions at two outputs (categorical,
  Bernoulli, unit-variance Gaussian), computed without cancellation; its Hessian in ``y'`` at ``y' = y`` is ``H_L``.

For these three losses the negative log-likelihood is an exponential family in its natural
parameter ``y``, so the true Fisher ``E_{t ~ p(t|y)}[grad grad^T]`` equals the output Hessian
``H_L`` and the true Fisher of the network equals its generalized Gauss-Newton matrix
(Martens, "New insights and perspectives on the natural gradient method", JMLR 2020, section 9.2).

Losses are registered JAX pytrees (targets and weights are leaves), so they can be passed through
``jax.jit`` and ``optax.chain`` as extra arguments.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = [
    "OutputLoss",
    "SquaredError",
    "SigmoidBinaryCrossEntropy",
    "SoftmaxCrossEntropy",
    "squared_error",
    "sigmoid_binary_cross_entropy",
    "softmax_cross_entropy",
]


def _compute_dtype(x: jax.Array) -> jnp.dtype:
    """float32 or better, whatever the model's output dtype."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _exp_minus_one_minus(u: jax.Array) -> jax.Array:
    """``e^u - 1 - u >= 0`` to full relative precision: its Taylor series ``u^2/2 + u^3/6 + ... + u^6/720`` for
    ``|u| < 0.1`` (truncation below 1e-9 relative), where ``expm1(u) - u`` would cancel, and that difference beyond."""
    small = jnp.abs(u) < 0.1
    s = jnp.where(small, u, 0.0)
    series = s * s * (1 / 2 + s * (1 / 6 + s * (1 / 24 + s * (1 / 120 + s / 720))))
    return jnp.where(small, series, jnp.expm1(u) - u)


def _categorical_kl(log_p: jax.Array, delta: jax.Array, axis) -> jax.Array:
    """``KL(p || q)`` for ``q ∝ p e^delta`` over ``axis``, without cancellation.

    With ``c = delta - sum p delta`` (so ``sum p c = 0``), ``KL = log sum p e^c = log1p(sum p (e^c - 1 - c))``: every
    term is non-negative and second order in ``delta``, where ``sum p (log p - log q)`` would subtract first-order
    terms of the logits' size and keep their rounding.
    """
    p = jnp.exp(log_p)
    c = delta - jnp.sum(p * delta, axis=axis, keepdims=True)
    return jnp.log1p(jnp.sum(p * _exp_minus_one_minus(c), axis=axis))


@dataclasses.dataclass(frozen=True)
class OutputLoss:
    """Base class: a per-example loss ``l(y_i, t_i)`` averaged with weights ``w_i``.

    Subclasses implement ``_per_example``, ``_output_hvp_per_example``, ``_output_hessian_sqrt_per_example``,
    ``_output_hessian_sqrt_transpose_per_example`` and ``_sample``.
    ``event_ndim`` is the number of trailing output axes that form one example's output; the leading
    axis is always a batch axis (see :meth:`event_axes`).
    """

    targets: jax.Array
    weights: jax.Array | None = None
    event_ndim: int = 1

    def event_axes(self, outputs: jax.Array) -> tuple[int, ...]:
        """The trailing axes that form one example's output: the last ``event_ndim`` axes, never the leading one.

        The leading axis is the batch: ``(N,)`` outputs are ``N`` scalar examples whatever ``event_ndim``
        (binary logits, regression targets), ``(N, K)`` outputs are ``N`` examples of ``K`` outputs with
        ``event_ndim=1``, and a 0-d output is one example.
        """
        n = min(self.event_ndim, max(outputs.ndim - 1, 0))
        return tuple(range(outputs.ndim - n, outputs.ndim))

    def example_shape(self, outputs: jax.Array) -> tuple[int, ...]:
        """The shape of the per-example losses: ``outputs.shape`` without the :meth:`event_axes`."""
        return outputs.shape[: outputs.ndim - len(self.event_axes(outputs))]

    def example_weights(self, outputs: jax.Array) -> jax.Array:
        """``w_i`` (ones without ``weights``), of shape :meth:`example_shape`, in float32 or better."""
        shape = self.example_shape(outputs)
        if self.weights is None:
            return jnp.ones(shape, _compute_dtype(outputs))
        return jnp.broadcast_to(self.weights, shape).astype(_compute_dtype(outputs))

    def check_outputs(self, outputs: jax.Array) -> None:
        """A ``ValueError`` unless ``outputs`` has the shape the targets imply (static: costs nothing under jit)."""
        expected = self._expected_output_shapes(outputs)
        if tuple(jnp.shape(outputs)) not in expected:
            raise ValueError(
                f"{type(self).__name__}: model outputs of shape {tuple(jnp.shape(outputs))} do not match targets of "
                f"shape {tuple(jnp.shape(self.targets))} (expected outputs of shape "
                f"{' or '.join(str(s) for s in expected)}); model_fn and the loss must see the same batch"
            )

    def _expected_output_shapes(self, outputs: jax.Array) -> tuple[tuple[int, ...], ...]:
        return (tuple(jnp.shape(self.targets)),)

    def num_examples(self, outputs: jax.Array) -> jax.Array:
        """``sum_i w_i``: the number of examples (tokens, pixels, ...) for a 0/1 mask."""
        return jnp.sum(self.example_weights(outputs))

    def per_example(self, outputs: jax.Array) -> jax.Array:
        """Unweighted per-example losses ``l_i``, of shape :meth:`example_shape`."""
        return self._per_example(self._checked(outputs))

    def __call__(self, outputs: jax.Array) -> jax.Array:
        """The weighted mean ``sum_i w_i l_i / sum_i w_i``."""
        per_example = self.per_example(outputs)
        w = self.example_weights(outputs)
        return jnp.sum(w * per_example) / jnp.sum(w)

    def example_scale(self, outputs: jax.Array) -> jax.Array:
        """``w_i / sum_j w_j`` broadcastable against ``outputs`` (singleton event axes)."""
        w = self.example_weights(outputs)
        return jnp.expand_dims(w / jnp.sum(w), self.event_axes(outputs))

    def output_hvp(self, outputs: jax.Array, v: jax.Array) -> jax.Array:
        """``H_L v``, the Hessian of the weighted mean loss w.r.t. the outputs, times ``v``."""
        y = self._checked(outputs)
        scale = self.example_scale(outputs)
        return (scale * self._output_hvp_per_example(y, v.astype(y.dtype))).astype(v.dtype)

    def output_hessian_sqrt_vp(self, outputs: jax.Array, v: jax.Array) -> jax.Array:
        """``S v`` for a square root ``S S^T = H_L`` of the output Hessian of the weighted mean loss.

        ``S`` is block diagonal over examples, ``S_i = sqrt(w_i / sum_j w_j) R_i`` with ``R_i R_i^T`` the Hessian
        of ``l_i`` (see the subclasses), so ``J^T S`` factors the GGN, ``J^T H_L J = (J^T S)(J^T S)^T``,
        without inverting ``H_L`` (the row-space solve of :func:`~.solvers.low_rank_damped_solve`).
        """
        y = self._checked(outputs)
        scale = jnp.sqrt(self.example_scale(outputs))
        return (scale * self._output_hessian_sqrt_per_example(y, v.astype(y.dtype))).astype(v.dtype)

    def output_hessian_sqrt_transpose_vp(self, outputs: jax.Array, v: jax.Array) -> jax.Array:
        """``S^T v`` for the square root of :meth:`output_hessian_sqrt_vp` (``||S^T J v||^2 = v^T G v``)."""
        y = self._checked(outputs)
        scale = jnp.sqrt(self.example_scale(outputs))
        return (scale * self._output_hessian_sqrt_transpose_per_example(y, v.astype(y.dtype))).astype(v.dtype)

    def per_example_output_grad(self, outputs: jax.Array) -> jax.Array:
        """``s_i = d l_i / d y_i`` for every example (unweighted)."""
        y = self._checked(outputs)
        return jax.grad(lambda y: jnp.sum(self._per_example(y)))(y)

    def sample_targets(self, key: jax.Array, outputs: jax.Array) -> jax.Array:
        """Targets ``t ~ p(t | y)`` from the model's predictive distribution, in the targets' format."""
        return self._sample(key, self._checked(outputs))

    def _checked(self, outputs: jax.Array) -> jax.Array:
        """``outputs`` in float32 or better, after :meth:`check_outputs`."""
        if not hasattr(outputs, "shape") or isinstance(outputs, tuple):
            raise TypeError(
                f"{type(self).__name__}: expected the model's outputs as one array, got {type(outputs).__name__}; "
                "a linen apply with mutable=... returns (outputs, state): use its [0]"
            )
        self.check_outputs(outputs)
        return outputs.astype(_compute_dtype(outputs))

    def kl(self, outputs: jax.Array, new_outputs: jax.Array) -> jax.Array:
        """``sum_i w_i KL(p(t | y_i) || p(t | y'_i)) / sum_i w_i``: the weighted mean KL divergence between the
        predictive distributions at ``outputs`` (``y``) and ``new_outputs`` (``y'``), over the same examples.

        To second order it is ``1/2 (y' - y)^T H_L (y' - y)`` (the Fisher of the likelihood is ``H_L``), so it is the
        realized counterpart of the quadratic model a KL-normalized natural-gradient step is scaled by.
        """
        y = self._checked(outputs)
        y_new = self._checked(new_outputs).astype(y.dtype)
        w = self.example_weights(outputs)
        return jnp.sum(w * self._kl_per_example(y, y_new)) / jnp.sum(w)

    def with_targets(self, targets: jax.Array) -> "OutputLoss":
        """The same loss (same weights) bound to other targets."""
        return dataclasses.replace(self, targets=targets)

    def _per_example(self, y: jax.Array) -> jax.Array:
        raise NotImplementedError

    def _output_hvp_per_example(self, y: jax.Array, v: jax.Array) -> jax.Array:
        raise NotImplementedError

    def _output_hessian_sqrt_per_example(self, y: jax.Array, v: jax.Array) -> jax.Array:
        raise NotImplementedError

    def _output_hessian_sqrt_transpose_per_example(self, y: jax.Array, v: jax.Array) -> jax.Array:
        raise NotImplementedError

    def _sample(self, key: jax.Array, y: jax.Array) -> jax.Array:
        raise NotImplementedError

    def _kl_per_example(self, y: jax.Array, y_new: jax.Array) -> jax.Array:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class SquaredError(OutputLoss):
    """``l = 1/2 ||y - t||^2`` summed over the event axes; ``H_L = I = S S^T`` with ``S = I``; ``t ~ N(y, I)``."""

    def _per_example(self, y):
        return 0.5 * jnp.sum(jnp.square(y - self.targets), axis=self.event_axes(y))

    def _output_hvp_per_example(self, y, v):
        return v

    def _output_hessian_sqrt_per_example(self, y, v):
        return v

    def _output_hessian_sqrt_transpose_per_example(self, y, v):
        return v

    def _sample(self, key, y):
        return (y + jax.random.normal(key, y.shape, y.dtype)).astype(self.targets.dtype)

    def _kl_per_example(self, y, y_new):
        """``KL(N(y, I) || N(y', I)) = 1/2 ||y - y'||^2``."""
        return 0.5 * jnp.sum(jnp.square(y_new - y), axis=self.event_axes(y))


@dataclasses.dataclass(frozen=True)
class SigmoidBinaryCrossEntropy(OutputLoss):
    """``l = sum softplus(y) - t y`` over the event axes (logits ``y``, targets in [0, 1]).

    ``H_L = diag(s (1 - s))`` with ``s = sigmoid(y)``, ``S = diag(sqrt(s (1 - s)))``; ``t ~ Bernoulli(s)``.
    """

    def _per_example(self, y):
        t = self.targets.astype(y.dtype)
        return jnp.sum(jax.nn.softplus(y) - t * y, axis=self.event_axes(y))

    def _output_hvp_per_example(self, y, v):
        s = jax.nn.sigmoid(y)
        return s * (1 - s) * v

    def _output_hessian_sqrt_per_example(self, y, v):
        # s (1 - s) = sigmoid(y) sigmoid(-y): no cancellation in 1 - s for large logits.
        return jnp.sqrt(jax.nn.sigmoid(y) * jax.nn.sigmoid(-y)) * v

    def _output_hessian_sqrt_transpose_per_example(self, y, v):
        return self._output_hessian_sqrt_per_example(y, v)

    def _sample(self, key, y):
        return jax.random.bernoulli(key, jax.nn.sigmoid(y)).astype(self.targets.dtype)

    def _kl_per_example(self, y, y_new):
        """``KL(Bernoulli(s) || Bernoulli(s'))`` summed over the event axes: the categorical KL on logits ``(0, y)``."""
        log_p = jnp.stack([jax.nn.log_sigmoid(-y), jax.nn.log_sigmoid(y)], axis=-1)
        delta = jnp.stack([jnp.zeros_like(y), y_new - y], axis=-1)
        return jnp.sum(_categorical_kl(log_p, delta, -1), axis=self.event_axes(y))


@dataclasses.dataclass(frozen=True)
class SoftmaxCrossEntropy(OutputLoss):
    """``l = logsumexp(y) - y[t]`` over the last (class) axis, with integer or one-hot targets.

    ``H_L = diag(p) - p p^T`` with ``p = softmax(y)``; ``t ~ Categorical(p)``. Its square root
    ``S = (I - p 1^T) diag(sqrt(p))`` (``S S^T = diag(p) - 2 p p^T + p (1^T p) p^T = H_L``) needs no
    factorization: ``S v = sqrt(p) v - p (sqrt(p) . v)`` and ``S^T v = sqrt(p) (v - p . v)``.
    """

    def _is_one_hot(self, y) -> bool:
        return self.targets.ndim == y.ndim

    def event_axes(self, outputs: jax.Array) -> tuple[int, ...]:
        """The class axis (the last): ``(N, K)`` logits are ``N`` examples, ``(K,)`` logits one example."""
        return (outputs.ndim - 1,)

    def _expected_output_shapes(self, outputs: jax.Array) -> tuple[tuple[int, ...], ...]:
        targets = tuple(jnp.shape(self.targets))
        classes = jnp.shape(outputs)[-1:] if jnp.ndim(outputs) else (1,)
        return (targets + tuple(classes),) if len(targets) < jnp.ndim(outputs) else (targets,)

    def _per_example(self, y):
        log_p = jax.nn.log_softmax(y, axis=-1)
        if self._is_one_hot(y):
            return -jnp.sum(self.targets.astype(y.dtype) * log_p, axis=-1)
        return -jnp.take_along_axis(log_p, self.targets[..., None].astype(jnp.int32), axis=-1)[..., 0]

    def _output_hvp_per_example(self, y, v):
        p = jax.nn.softmax(y, axis=-1)
        return p * v - p * jnp.sum(p * v, axis=-1, keepdims=True)

    def _output_hessian_sqrt_per_example(self, y, v):
        log_p = jax.nn.log_softmax(y, axis=-1)
        sqrt_p_v = jnp.exp(0.5 * log_p) * v
        return sqrt_p_v - jnp.exp(log_p) * jnp.sum(sqrt_p_v, axis=-1, keepdims=True)

    def _output_hessian_sqrt_transpose_per_example(self, y, v):
        log_p = jax.nn.log_softmax(y, axis=-1)
        return jnp.exp(0.5 * log_p) * (v - jnp.sum(jnp.exp(log_p) * v, axis=-1, keepdims=True))

    def _kl_per_example(self, y, y_new):
        """``KL(softmax(y) || softmax(y'))`` over the class axis."""
        return _categorical_kl(jax.nn.log_softmax(y, axis=-1), y_new - y, -1)

    def _sample(self, key, y):
        labels = jax.random.categorical(key, y, axis=-1)
        if self._is_one_hot(y):
            return jax.nn.one_hot(labels, y.shape[-1], dtype=self.targets.dtype)
        return labels.astype(self.targets.dtype)


for _cls in (SquaredError, SigmoidBinaryCrossEntropy, SoftmaxCrossEntropy):
    jax.tree_util.register_dataclass(
        _cls, data_fields=["targets", "weights"], meta_fields=["event_ndim"]
    )


def squared_error(targets: jax.Array, weights: jax.Array | None = None, event_ndim: int = 1) -> SquaredError:
    """Mean squared error ``1/2 ||y - t||^2`` (Gaussian likelihood with unit variance).

    Args:
      targets: regression targets, the shape of the outputs.
      weights: optional per-example weights or 0/1 mask, shape ``outputs.shape[:-event_ndim]``.
      event_ndim: trailing axes summed into one example's loss (0: every scalar is an example).
    """
    return SquaredError(jnp.asarray(targets), weights, event_ndim)


def sigmoid_binary_cross_entropy(
    targets: jax.Array, weights: jax.Array | None = None, event_ndim: int = 1
) -> SigmoidBinaryCrossEntropy:
    """Sigmoid cross-entropy on logits (independent Bernoulli outputs), targets in [0, 1]."""
    return SigmoidBinaryCrossEntropy(jnp.asarray(targets), weights, event_ndim)


def softmax_cross_entropy(labels: jax.Array, weights: jax.Array | None = None) -> SoftmaxCrossEntropy:
    """Softmax cross-entropy on logits over the last axis.

    Args:
      labels: integer class labels of shape ``outputs.shape[:-1]`` or one-hot / soft labels of
        the outputs' shape.
      weights: optional per-example weights or 0/1 mask of shape ``outputs.shape[:-1]``.
    """
    return SoftmaxCrossEntropy(jnp.asarray(labels), weights, 1)
