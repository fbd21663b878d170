"""Benchmark tasks on data that ships with the dependencies.

A :class:`Task` is a model (a Flax linen module, or a plain function), its output-space loss from
:mod:`optax_second_order.losses`, a reproducible minibatch stream, the fixed batch the reported loss is
measured on, an optional held-out set for accuracy, a default step budget and a default target loss.

* ``digits-autoencoder``: scikit-learn digits (1797 x 64, scaled to [0, 1]), tanh MLP autoencoder
  64-1000-500-250-30-250-500-1000-64 (the MNIST autoencoder of Hinton & Salakhutdinov 2006, Martens 2010 and
  Martens & Grosse 2015, scaled to 8x8 inputs), sigmoid cross-entropy on logits summed over the 64 pixels,
  minibatch 512; loss on all 1797 digits.
* ``digits-mlp``: tanh MLP 64-256-256-10, softmax cross-entropy, minibatch 128 from the first 1500 digits;
  loss on those 1500, accuracy on the last 297.
* ``digits-cnn``: two tanh 3x3 convolutions (16 channels, then 32 with stride 2) and a dense layer on the
  8x8 images; same data split as ``digits-mlp``.
* ``stdlib-charlm``: a 2-layer pre-LayerNorm causal transformer (width 128, 4 heads, context 64) predicting
  the next byte of a fixed, sorted list of standard-library modules read from the running interpreter;
  minibatch 32 windows; loss on 64 fixed windows from the held-out last 10% of the corpus.
* ``stdlib-charlm-scan``: the same transformer with its blocks under linen's ``nn.scan`` (parameters stacked on a
  leading layer axis, ``Task.layer_axes`` for Shampoo and SOAP; K-FAC's capture sees the scan): the same steps as
  ``stdlib-charlm`` up to the initialization of the stacked blocks (``split_rngs``) and rounding.
* ``rosenbrock-2``, ``rosenbrock-10``: the Rosenbrock function in float64 from the classic start
  (-1.2, 1, -1.2, 1, ...), written as squared residuals so Gauss-Newton-type methods apply (see
  :func:`rosenbrock`).

``npz_task(path)`` makes an MLP task from a user's own ``.npz`` file (see its docstring).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sysconfig
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from optax_second_order.curvature import losses
from optax_second_order.curvature.losses import OutputLoss

__all__ = [
    "Task",
    "TASKS",
    "get_task",
    "npz_task",
    "MLP",
    "DigitsCNN",
    "CharTransformer",
    "rosenbrock",
    "rosenbrock_residuals",
    "STDLIB_MODULES",
]

PyTree = Any
Batch = tuple[Any, jax.Array]  # (inputs, targets)


@dataclasses.dataclass(frozen=True)
class Task:
    """One benchmark problem.

    Attributes:
      name: registry name.
      description: one line for the tables.
      module: the Flax linen module (``None`` for a plain function such as Rosenbrock).
      init: ``init(key) -> params``.
      apply: ``apply(params, inputs) -> outputs`` (logits or predictions).
      loss: ``loss(targets) -> OutputLoss``, the loss bound to a batch's targets.
      batches: ``batches(seed)`` -> an endless iterator of ``(inputs, targets)`` minibatches, reproducible.
      eval_batch: the fixed ``(inputs, targets)`` the reported loss is measured on.
      steps: default step budget.
      target: default target loss (``--target task``), or ``None``.
      heldout: ``(inputs, integer labels)`` for held-out accuracy, or ``None``.
      x64: run in float64 (``jax.enable_x64``).
      seed: the run's seed: the runner hands each run's optimizer factory a copy of the task with it set, for the
        optimizers that take a seed (PRNG keys for probes and sampled targets).
      layer_axes: where the parameters stack scanned layers (``layer_axes=`` of Shampoo and SOAP; K-FAC's capture
        finds them itself), or ``None``.
    """

    name: str
    description: str
    module: nn.Module | None
    init: Callable[[jax.Array], PyTree]
    apply: Callable[[PyTree, Any], jax.Array]
    loss: Callable[[jax.Array], OutputLoss]
    batches: Callable[[int], Iterator[Batch]]
    eval_batch: Batch
    steps: int
    target: float | None = None
    heldout: Batch | None = None
    x64: bool = False
    seed: int = 0
    layer_axes: Any = None  # the stacked (scanned) layers' axes, for ``layer_axes=`` of Shampoo and SOAP

    def batch_loss(self, params: PyTree, batch: Batch) -> jax.Array:
        """The loss of ``params`` on ``batch = (inputs, targets)``."""
        inputs, targets = batch
        return self.loss(targets)(self.apply(params, inputs))


# ----------------------------------------------------------------------------------------- models


class MLP(nn.Module):
    """Dense layers of the given widths with ``tanh`` between them (the last layer is linear)."""

    widths: Sequence[int]

    @nn.compact
    def __call__(self, x):
        for width in self.widths[:-1]:
            x = nn.tanh(nn.Dense(width)(x))
        return nn.Dense(self.widths[-1])(x)


class DigitsCNN(nn.Module):
    """``conv3x3(16) - tanh - conv3x3(32, stride 2) - tanh - dense(classes)`` on ``(B, 8, 8, 1)`` images."""

    classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Conv(16, (3, 3))(x))
        x = nn.tanh(nn.Conv(32, (3, 3), strides=(2, 2))(x))
        return nn.Dense(self.classes)(x.reshape(x.shape[0], -1))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with ``nn.Dense`` projections (so K-FAC can capture them)."""

    heads: int

    @nn.compact
    def __call__(self, x):
        batch, length, width = x.shape
        head_dim = width // self.heads
        qkv = nn.Dense(3 * width)(x).reshape(batch, length, 3, self.heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
        causal = jnp.tril(jnp.ones((length, length), bool))
        logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
        y = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        return nn.Dense(width)(y.reshape(batch, length, width))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: attention and a 4x GELU MLP, each with a residual connection."""

    heads: int

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x = x + CausalSelfAttention(self.heads)(nn.LayerNorm()(x))
        return x + nn.Dense(width)(nn.gelu(nn.Dense(4 * width)(nn.LayerNorm()(x))))


class ScanBlock(nn.Module):
    """:class:`Block` as the body of ``nn.scan``: ``(x, _) -> (Block(x), None)``."""

    heads: int

    @nn.compact
    def __call__(self, x, _):
        return Block(self.heads)(x), None


class CharTransformer(nn.Module):
    """Byte-level causal transformer: token + learned position embeddings, blocks, LayerNorm, linear head. With
    ``scan`` the blocks run under ``nn.scan`` (their parameters stacked on a leading layer axis under ``"blocks"``),
    as models written for scale do."""

    vocab: int = 256
    width: int = 128
    layers: int = 2
    heads: int = 4
    context: int = 64
    scan: bool = False

    @nn.compact
    def __call__(self, tokens):
        position = self.param("position", nn.initializers.normal(0.02), (self.context, self.width))
        x = nn.Embed(self.vocab, self.width)(tokens) + position[: tokens.shape[-1]]
        if self.scan:
            blocks = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers)
            x, _ = blocks(self.heads, name="blocks")(x, None)
        else:
            for _ in range(self.layers):
                x = Block(self.heads)(x)
        return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def scanned_blocks(params: PyTree) -> PyTree:
    """``layer_axes`` of a :class:`CharTransformer` with ``scan``: axis 0 for the leaves under ``"blocks"``."""
    def axes(path, _):
        return 0 if any(getattr(k, "key", None) == "blocks" for k in path) else None

    return jax.tree_util.tree_map_with_path(axes, params)


# ------------------------------------------------------------------------------------------- data


def _minibatches(inputs: np.ndarray, targets: np.ndarray, batch_size: int, seed: int) -> Iterator[Batch]:
    """Endless epochs of shuffled minibatches (without replacement, remainder dropped), from ``seed``."""
    rng = np.random.default_rng(seed)
    n = len(inputs)
    batch_size = min(batch_size, n)
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield jnp.asarray(inputs[idx]), jnp.asarray(targets[idx])


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digits, pixels scaled from 0..16 to [0, 1], as float32 and int32."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int32)


def _init_linen(module: nn.Module, example_inputs) -> Callable[[jax.Array], PyTree]:
    return lambda key: module.init(key, example_inputs)


def _classifier(name, description, module, x, y, train_size, batch_size, steps, target) -> Task:
    """A softmax classifier trained on the first ``train_size`` examples, accuracy on the rest."""
    train_x, train_y = x[:train_size], y[:train_size]
    return Task(
        name=name,
        description=description,
        module=module,
        init=_init_linen(module, jnp.asarray(train_x[:1])),
        apply=module.apply,
        loss=losses.softmax_cross_entropy,
        batches=lambda seed: _minibatches(train_x, train_y, batch_size, seed),
        eval_batch=(jnp.asarray(train_x), jnp.asarray(train_y)),
        steps=steps,
        target=target,
        heldout=(jnp.asarray(x[train_size:]), jnp.asarray(y[train_size:])),
    )


def digits_autoencoder() -> Task:
    x, _ = _digits()
    module = MLP((1000, 500, 250, 30, 250, 500, 1000, 64))
    return Task(
        name="digits-autoencoder",
        description="digits 64-1000-500-250-30-250-500-1000-64 tanh autoencoder, sigmoid CE, batch 512",
        module=module,
        init=_init_linen(module, jnp.asarray(x[:1])),
        apply=module.apply,
        loss=losses.sigmoid_binary_cross_entropy,
        batches=lambda seed: _minibatches(x, x, 512, seed),
        eval_batch=(jnp.asarray(x), jnp.asarray(x)),
        steps=100,
        target=20.0,
    )


def digits_mlp() -> Task:
    x, y = _digits()
    return _classifier(
        "digits-mlp", "digits 64-256-256-10 tanh MLP, softmax CE, batch 128, accuracy on the last 297",
        MLP((256, 256, 10)), x, y, train_size=1500, batch_size=128, steps=100, target=0.05,
    )


def digits_cnn() -> Task:
    x, y = _digits()
    return _classifier(
        "digits-cnn", "digits 8x8 CNN (conv16, conv32/2, dense10), softmax CE, batch 128, accuracy on the last 297",
        DigitsCNN(), x.reshape(-1, 8, 8, 1), y, train_size=1500, batch_size=128, steps=200, target=0.05,
    )


STDLIB_MODULES = (
    "abc", "argparse", "bisect", "colorsys", "contextlib", "copy", "dataclasses", "enum", "fnmatch",
    "functools", "heapq", "keyword", "operator", "queue", "random", "shlex", "textwrap", "types", "weakref",
)  # fmt: skip
"""Standard-library modules (single ``.py`` files since Python 3.0) whose source is the character corpus."""


def _stdlib_corpus() -> np.ndarray:
    """The bytes of :data:`STDLIB_MODULES` (those present), concatenated in sorted order, as int32 tokens."""
    root = sysconfig.get_paths()["stdlib"]
    paths = [os.path.join(root, f"{name}.py") for name in sorted(STDLIB_MODULES)]
    text = b"".join(open(p, "rb").read() for p in paths if os.path.exists(p))
    return np.frombuffer(text, dtype=np.uint8).astype(np.int32)


def _windows(tokens: np.ndarray, starts: np.ndarray, context: int) -> Batch:
    """Inputs ``tokens[s : s + context]`` and next-token targets ``tokens[s + 1 : s + context + 1]``."""
    idx = starts[:, None] + np.arange(context + 1)
    chunk = tokens[idx]
    return jnp.asarray(chunk[:, :-1]), jnp.asarray(chunk[:, 1:])


def _random_windows(tokens: np.ndarray, context: int, batch_size: int, seed: int) -> Iterator[Batch]:
    rng = np.random.default_rng(seed)
    while True:
        yield _windows(tokens, rng.integers(0, len(tokens) - context - 1, batch_size), context)


def stdlib_charlm(scan: bool = False) -> Task:
    context = 64
    tokens = _stdlib_corpus()
    split = int(0.9 * len(tokens))
    train, held = tokens[:split], tokens[split:]
    eval_starts = np.linspace(0, len(held) - context - 1, 64).astype(np.int64)
    module = CharTransformer(context=context, scan=scan)
    return Task(
        name="stdlib-charlm-scan" if scan else "stdlib-charlm",
        description="2-layer width-128 byte transformer, context 64, batch 32, on stdlib source; held-out loss"
        + ("; blocks under nn.scan" if scan else ""),
        layer_axes=scanned_blocks if scan else None,
        module=module,
        init=_init_linen(module, jnp.zeros((1, context), jnp.int32)),
        apply=module.apply,
        loss=losses.softmax_cross_entropy,
        batches=lambda seed: _random_windows(train, context, 32, seed),
        eval_batch=_windows(held, eval_starts, context),
        steps=200,
        target=2.5,
    )


def rosenbrock_residuals(x: jax.Array) -> jax.Array:
    """``r(x) = sqrt(2) [10 (x_{i+1} - x_i^2), 1 - x_i]_{i<n}`` so that ``1/2 ||r||^2`` is Rosenbrock's

    ``f(x) = sum_{i=1}^{n-1} 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2``, minimum 0 at ``x = (1, ..., 1)``.
    """
    return np.sqrt(2.0) * jnp.concatenate([10.0 * (x[1:] - x[:-1] ** 2), 1.0 - x[:-1]])


def rosenbrock(n: int) -> Task:
    """Rosenbrock's function in ``n`` dimensions, float64, deterministic and full-batch.

    Params are ``{"x": x}`` from the classic start ``(-1.2, 1, -1.2, 1, ...)`` (every seed gives the same
    start). The "model" maps params to the ``2 (n - 1)`` residuals of :func:`rosenbrock_residuals`, as one
    example of shape ``(1, 2 (n - 1))``, and the loss is ``squared_error`` against zero targets, so ``value_fn``
    is exactly Rosenbrock's function and ``model_fn``/``loss`` give Gauss-Newton-type methods ``J^T J``.
    """
    start = np.where(np.arange(n) % 2 == 0, -1.2, 1.0)
    zeros = np.zeros((1, 2 * (n - 1)))

    def batches(seed):
        while True:
            yield None, jnp.asarray(zeros)

    return Task(
        name=f"rosenbrock-{n}",
        description=f"Rosenbrock n={n}, float64, from (-1.2, 1, ...), as squared residuals",
        module=None,
        init=lambda key: {"x": jnp.asarray(start, jnp.float64)},
        apply=lambda params, inputs: rosenbrock_residuals(params["x"])[None],
        loss=losses.squared_error,
        batches=batches,
        eval_batch=(None, zeros),
        steps=500,
        target=1e-6,
        x64=True,
    )


def npz_task(path: str) -> Task:
    """An MLP task on a user's ``.npz`` file with arrays ``x`` and ``y``.

    * ``x``: float features, shape ``(N, d)`` (more axes are flattened).
    * ``y``: integer class labels, shape ``(N,)`` -> classification (softmax cross-entropy, held-out
      accuracy), or floats of shape ``(N,)`` or ``(N, k)`` -> regression (squared error).

    The last 15% of the rows are held out (shuffle the file beforehand if it is ordered); features are
    standardized with the training rows' mean and standard deviation. The model is a tanh MLP
    ``d-256-256-out``, minibatch 128, 200 steps; the reported loss is on the training rows.
    """
    with np.load(path) as data:
        x = np.asarray(data["x"], np.float32).reshape(len(data["x"]), -1)
        y = np.asarray(data["y"])
    train_size = len(x) - max(1, int(0.15 * len(x)))
    mean, std = x[:train_size].mean(0), x[:train_size].std(0) + 1e-8
    x = (x - mean) / std
    name = "data:" + os.path.splitext(os.path.basename(path))[0]
    if np.issubdtype(y.dtype, np.integer):
        classes = int(y.max()) + 1
        return _classifier(
            name, f"{path}: MLP {x.shape[1]}-256-256-{classes}, softmax CE, accuracy on the last {len(x) - train_size}",
            MLP((256, 256, classes)), x, y.astype(np.int32), train_size, batch_size=128, steps=200, target=None,
        )
    y = y.astype(np.float32).reshape(len(y), -1)
    module = MLP((256, 256, y.shape[1]))
    train_x, train_y = x[:train_size], y[:train_size]
    return Task(
        name=name,
        description=f"{path}: MLP {x.shape[1]}-256-256-{y.shape[1]}, squared error",
        module=module,
        init=_init_linen(module, jnp.asarray(train_x[:1])),
        apply=module.apply,
        loss=losses.squared_error,
        batches=lambda seed: _minibatches(train_x, train_y, 128, seed),
        eval_batch=(jnp.asarray(train_x), jnp.asarray(train_y)),
        steps=200,
    )


TASKS: dict[str, Callable[[], Task]] = {
    "digits-autoencoder": digits_autoencoder,
    "digits-mlp": digits_mlp,
    "digits-cnn": digits_cnn,
    "stdlib-charlm": stdlib_charlm,
    "stdlib-charlm-scan": functools.partial(stdlib_charlm, scan=True),
    "rosenbrock-2": functools.partial(rosenbrock, 2),
    "rosenbrock-10": functools.partial(rosenbrock, 10),
}
"""Task factories by name (built lazily: the corpus and the digits are read only when used)."""


def get_task(name: str) -> Task:
    """The task called ``name`` (see :data:`TASKS`), or an ``.npz`` path (see :func:`npz_task`)."""
    if name in TASKS:
        return TASKS[name]()
    if name.endswith(".npz") and os.path.exists(name):
        return npz_task(name)
    raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)} or give an existing .npz path")
