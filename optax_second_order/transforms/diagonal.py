r"""Diagonal preconditioners: Adagrad, Adam, AdaHessian and Sophia as one transformation.

An adaptive method preconditions the gradient by a diagonal estimate of the curvature raised to a
power. :func:`scale_by_diagonal_curvature` is that one idea, with three choices:

* the **estimator** ``e_t`` of the curvature diagonal, computed every ``statistics_frequency`` steps:

  - ``"squared_gradient"``: ``g * g``, the diagonal of the rank-one empirical Fisher ``g g^T`` of
    the mini-batch gradient (Adagrad, Adam: "diagonal Fisher, square-rooted");
  - ``"hutchinson"``: ``z * H z`` with Rademacher ``z`` (Sophia-H), :func:`~optax_second_order.hutchinson_diagonal`;
  - ``"gnb"``: Gauss-Newton-Bartlett ``B * g_hat * g_hat`` with labels sampled from the model
    (Sophia-G), :func:`~optax_second_order.gnb_diagonal`;
  - ``"adahessian"``: ``(spatial mean |z * H z|)^2`` (AdaHessian's squared Hutchinson estimate);
  - or any callable ``estimator(grads, params, key, extra, name) -> pytree``;

* the **averaging** of the estimates: a running sum (Adagrad) or an exponential moving average
  with decay ``b2``, optionally bias-corrected by ``1 - b2^n`` after ``n`` estimates;

* the **power** ``p`` and the denominator ``D = (scale * max(s_hat, 0) + eps_root)^p + eps``.

With momentum ``m_t = b1 m_{t-1} + (1 - b1) g_t`` (optionally bias-corrected) the update is
``u_t = m_hat_t / D_t``, clipped to ``[-clip, clip]`` when ``clip`` is given.

On a refresh step the new estimate enters the update of that same step (Sophia's Algorithm 3,
AdaHessian).

Non-finite numbers: a step whose gradient or estimate (an overflowing square ``g * g`` included) is not finite is
rejected as a whole: the update is zero, the momentum, curvature and step count keep their values (a kept statistic
paired with a fresh momentum is what makes such a step huge), and the state's ``nonfinite`` field counts it. This is
decided from those inputs, one ``max |x|`` reduction per leaf, before the new state is computed, so that keeping or
replacing each state entry happens in the same loop that writes it (checking the new moments and update afterwards
made ``oso.adam``'s step 1.2-1.5x ``optax.adam``'s; ``docs/benchmark.md``). Finite inputs give finite moments; an
entry that still overflows (an Adagrad sum past the float range) keeps its previous value, and an update entry that
is not finite (a zero denominator with ``eps = eps_root = 0``) is zero. A stored moment or statistic entry that is
not finite (a corrupt state) restarts from zero (the statistic from ``initial_curvature``), entry by entry: the
coordinates of a diagonal method are independent, so one bad entry says nothing of the others.

References:
  Duchi, Hazan & Singer, "Adaptive subgradient methods", JMLR 2011 (Adagrad).
  Kingma & Ba, "Adam: a method for stochastic optimization", ICLR 2015.
  Yao et al., "ADAHESSIAN: an adaptive second order optimizer for machine learning", AAAI 2021;
  official code https://github.com/amirgholami/adahessian.
  Liu et al., "Sophia: a scalable stochastic second-order optimizer for language model
  pre-training", ICLR 2024 (arXiv:2305.14342); official code https://github.com/Liuhong99/Sophia.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_second_order.curvature.estimators import gnb_diagonal, hutchinson_diagonal
from optax_second_order.transforms.common import (
    all_finite,
    check,
    check_choice,
    check_float_leaves,
    extra_arg,
    is_refresh_step,
    masked_extras,
    require_params,
    stat_dtype,
)

__all__ = [
    "DiagonalCurvatureState",
    "squared_gradient_estimate",
    "hutchinson_estimate",
    "gnb_estimate",
    "adahessian_estimate",
    "conv_spatial_axes",
    "spatially_reduced_shape",
    "scale_by_diagonal_curvature",
    "scale_by_adahessian",
    "scale_by_sophia",
]

PyTree = Any
Estimator = Callable[[PyTree, PyTree, jax.Array, dict, str], PyTree]


class DiagonalCurvatureState(NamedTuple):
    """State of :func:`scale_by_diagonal_curvature`.

    Attributes:
      count: completed updates (int32).
      momentum: ``m``, the moving average of the gradients.
      curvature: ``s``, the running sum or moving average of the curvature estimates.
      estimates: number of estimates accumulated into ``curvature`` (int32, for bias correction).
      nonfinite: number of steps rejected because a gradient or estimate was not finite (int32).
      key: PRNG key for probes and sampled labels, split at each refresh.
    """

    count: jax.Array
    momentum: PyTree
    curvature: PyTree
    estimates: jax.Array
    nonfinite: jax.Array
    key: jax.Array


# ---------------------------------------------------------------------------------------------
# Estimators of the curvature diagonal: estimator(grads, params, key, extra, name) -> pytree.


def squared_gradient_estimate(grads, params, key, extra, name):
    """``g * g``: the diagonal of the mini-batch empirical Fisher ``g g^T`` (Adagrad, Adam)."""
    del params, key, extra, name
    return jax.tree.map(jnp.square, grads)


def hutchinson_estimate(grads, params, key, extra, name):
    """``z * H z`` with one Rademacher probe ``z``: unbiased for ``diag(H)`` (Sophia-H).

    ``H z`` from the extra argument ``hvp_fn`` when given (:func:`~optax_second_order.grad_and_hvp_fn`: the
    training step's own linearization, no second forward/backward pass), else by differentiating ``value_fn``.
    """
    del grads
    params = require_params(params, name)
    if extra.get("hvp_fn") is not None:
        return hutchinson_diagonal(None, params, key, hvp_fn=extra["hvp_fn"])
    value_fn = extra_arg(extra, "value_fn", name)
    return hutchinson_diagonal(value_fn, params, key)


def gnb_estimate(grads, params, key, extra, name):
    """Gauss-Newton-Bartlett ``B * g_hat * g_hat``, labels sampled from the model (Sophia-G)."""
    del grads
    model_fn = extra_arg(extra, "model_fn", name)
    loss = extra_arg(extra, "loss", name)
    return gnb_diagonal(model_fn, loss, require_params(params, name), key)


def conv_spatial_axes(leaf: jax.Array) -> tuple[int, ...]:
    """The spatial axes of a conv kernel: ``(0, 1)`` for a rank-4 leaf (Flax's ``(h, w, in, out)``).

    Other ranks (biases, dense kernels, rank-3 attention kernels) get no spatial averaging, as in
    the official AdaHessian code, which averages only 4-D (PyTorch ``(out, in, h, w)``) kernels.
    """
    return (0, 1) if leaf.ndim == 4 else ()


def adahessian_estimate(grads, params, key, extra, name, spatial_axes=conv_spatial_axes):
    """AdaHessian's ``D^2`` with ``D = |z * H z|`` averaged over the conv kernels' spatial axes.

    ``z`` is one Rademacher probe; ``|z * Hz| = |Hz|`` since ``z = +-1``. The average over a
    kernel's spatial axes (Yao et al. 2021, section 3.2) keeps those axes with size 1
    (:func:`spatially_reduced_shape`: a ``(3, 3, in, out)`` kernel's estimate is ``(1, 1, in, out)``), so the
    statistic costs no more memory than the distinct values it holds; it broadcasts in the update.
    """
    estimate = hutchinson_estimate(grads, params, key, extra, name)

    def squared_spatial_mean(d):
        d = jnp.abs(d)
        axes = spatial_axes(d)
        if axes:
            d = jnp.mean(d, axis=axes, keepdims=True)
        return jnp.square(d)

    return jax.tree.map(squared_spatial_mean, estimate)


def spatially_reduced_shape(leaf: jax.Array, spatial_axes=conv_spatial_axes) -> tuple[int, ...]:
    """``leaf``'s shape with its spatial axes (``spatial_axes(leaf)``) of size 1: AdaHessian's statistic shape."""
    axes = spatial_axes(leaf)
    return tuple(1 if i in axes else d for i, d in enumerate(jnp.shape(leaf)))


ESTIMATORS: dict[str, Estimator] = {
    "squared_gradient": squared_gradient_estimate,
    "hutchinson": hutchinson_estimate,
    "gnb": gnb_estimate,
    "adahessian": adahessian_estimate,
}


# ---------------------------------------------------------------------------------------------
# The transformation.


def _bias_corrected(tree: PyTree, decay, n: jax.Array) -> PyTree:
    """``tree / (1 - decay^n)`` (``optax.tree.bias_correction``); unchanged while ``n == 0`` (nothing accumulated)."""
    corrected = optax.tree.bias_correction(tree, decay, jnp.maximum(n, 1))
    return jax.tree.map(lambda c, t: jnp.where(n > 0, c, t).astype(t.dtype), corrected, tree)


def _largest_magnitude(tree: PyTree) -> jax.Array:
    """``max |x|`` over the entries of every leaf: NaN if one is NaN (XLA's maximum propagates it), inf if one is
    infinite; 0 for none.

    One reduction per leaf, each starting as soon as its leaf is ready. (Measured on ``digits-mlp`` under load, in
    ``optax_second_order.bench ab``: three boolean kernels per leaf and tree, ``jnp.all(jnp.isfinite(x))``, made
    ``oso.adam``'s step 1.3-1.5x ``optax.adam``'s; the leaves concatenated into one vector and reduced once, fewer
    kernels, 1.6-1.7x, since every update then waits for one kernel split over the threads.)
    """
    leaves = [jnp.max(jnp.abs(x)) for x in jax.tree.leaves(tree) if jnp.size(x)]
    return functools.reduce(jnp.maximum, leaves) if leaves else jnp.zeros((), jnp.float32)


def _finite_or(x: jax.Array, value) -> jax.Array:
    """``x`` with its non-finite entries replaced by ``value``."""
    return jnp.where(jnp.isfinite(x), x, jnp.asarray(value, x.dtype))


def _power(x: jax.Array, p) -> jax.Array:
    """``x^p``, with the exact square root and identity for a Python ``p`` of ``1/2`` or ``1``."""
    if isinstance(p, (int, float)) and p == 0.5:
        return jnp.sqrt(x)
    if isinstance(p, (int, float)) and p == 1:
        return x
    return x**p


def scale_by_diagonal_curvature(
    estimator: str | Estimator = "squared_gradient",
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    averaging: str = "ema",
    momentum_bias_correction: bool = True,
    curvature_bias_correction: bool = True,
    step_bias_correction: bool = False,
    power: float = 0.5,
    scale: float = 1.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    clip: float | None = None,
    initial_curvature: float = 0.0,
    statistics_frequency: int = 1,
    seed: int = 0,
    name: str = "scale_by_diagonal_curvature",
    curvature_shape: Callable[[jax.Array], tuple[int, ...]] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Precondition by a diagonal curvature estimate raised to a power.

    .. math::

        m_t &= b_1 m_{t-1} + (1 - b_1) g_t, \qquad
        s_t = \begin{cases} b_2 s_{t-k} + (1 - b_2) e_t & \text{ema} \\ s_{t-k} + e_t & \text{sum}
              \end{cases} \quad \text{(refresh steps, every } k\text{)} \\
        u_t &= \operatorname{clip}\Big(\hat m_t \,/\, \big((\text{scale} \cdot \max(\hat s_t, 0)
              + \epsilon_{root})^p + \epsilon\big),\ \pm\text{clip}\Big)

    where ``e_t`` is the estimator's curvature diagonal, ``m_hat = m / (1 - b1^t)`` and
    ``s_hat = s / (1 - b2^n)`` after ``n`` estimates when bias correction is on.

    Args:
      estimator: ``"squared_gradient"``, ``"hutchinson"`` (needs ``value_fn``, or ``hvp_fn`` from
        :func:`~optax_second_order.grad_and_hvp_fn`), ``"gnb"`` (needs ``model_fn`` and ``loss``), ``"adahessian"``
        (as ``"hutchinson"``), or a callable
        ``estimator(grads, params, key, extra, name) -> pytree`` (``extra`` is the dict of extra
        arguments given to ``update``).
      b1: momentum decay (0: the gradient itself).
      b2: decay of the curvature moving average (``averaging="ema"``).
      averaging: ``"ema"`` or ``"sum"`` (a running sum, as Adagrad).
      momentum_bias_correction: divide the momentum by ``1 - b1^t``.
      curvature_bias_correction: divide the moving average by ``1 - b2^n`` (``"ema"`` only).
      step_bias_correction: divide the (clipped) update by ``1 - b1^t`` (Sophia-H's original correction, outside
        the clip; use it instead of ``momentum_bias_correction``).
      power: the exponent ``p`` of the denominator.
      scale: factor on the curvature inside the denominator (Sophia's ``rho``).
      eps: added to the denominator.
      eps_root: added inside the power.
      clip: clip the update elementwise to ``[-clip, clip]`` (``None``: no clipping).
      initial_curvature: initial value of ``s`` (Adagrad's initial accumulator).
      statistics_frequency: compute a new estimate every this many steps, under ``jax.lax.cond``.
      seed: seed of the PRNG key for probes and sampled labels.
      name: the name used in error messages.
      curvature_shape: ``leaf -> shape`` of its curvature statistic, if the estimator's is smaller than the leaf
        (it must broadcast against the leaf); default the leaf's shape.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`DiagonalCurvatureState`.
    """
    estimate_fn = ESTIMATORS.get(estimator) if isinstance(estimator, str) else estimator
    if not callable(estimate_fn):
        raise ValueError(f"{name}: estimator must be one of {tuple(ESTIMATORS)} or a callable, got {estimator!r}")
    check(name, "b1", b1, lambda x: 0 <= x < 1, "in [0, 1)")
    check(name, "b2", b2, lambda x: 0 <= x < 1, "in [0, 1)")
    check_choice(name, "averaging", averaging, ("ema", "sum"))
    check(name, "power", power, lambda x: x > 0, "> 0")
    check(name, "scale", scale, lambda x: x > 0, "> 0")
    check(name, "eps", eps, lambda x: x >= 0, ">= 0")
    check(name, "eps_root", eps_root, lambda x: x >= 0, ">= 0")
    check(name, "clip", clip, lambda x: x > 0, "None or > 0")
    check(name, "initial_curvature", initial_curvature, lambda x: x >= 0, ">= 0")
    check(name, "statistics_frequency", statistics_frequency, lambda x: x >= 1 and float(x).is_integer(),
          "an integer >= 1")

    statistic_shape = curvature_shape or jnp.shape

    def init_fn(params):
        def full(p, shape, value):
            # laid out like the parameter (split with it on a mesh), as optax's moments: a statistic of AdaHessian's
            # spatially reduced shape is the corner of a parameter-like array, which keeps the other axes' layout
            like = jnp.full_like(p, value, stat_dtype(jnp.result_type(p)))
            if shape == like.shape:
                return like
            if len(shape) == like.ndim and all(n <= d for n, d in zip(shape, like.shape)):
                return jax.lax.slice(like, (0,) * like.ndim, shape)
            return jnp.full(shape, value, like.dtype)

        return DiagonalCurvatureState(
            count=jnp.zeros([], jnp.int32),
            momentum=jax.tree.map(lambda p: full(p, jnp.shape(p), 0.0), params),
            curvature=jax.tree.map(lambda p: full(p, statistic_shape(p), initial_curvature), params),
            estimates=jnp.zeros([], jnp.int32),
            nonfinite=jnp.zeros([], jnp.int32),
            key=jax.random.PRNGKey(seed),
        )

    def accumulate(curvature, estimate):
        if averaging == "sum":
            return jax.tree.map(jnp.add, curvature, estimate)
        return jax.tree.map(lambda s, e: b2 * s + (1 - b2) * e, curvature, estimate)

    squares_of_gradients = estimate_fn is squared_gradient_estimate

    def refresh(state, grads, params, extra):
        """A new estimate folded into the statistic, and whether it was finite."""
        if squares_of_gradients:  # no randomness: the key stays as it is (splitting it is a loop of kernels on CPU)
            key = subkey = state.key
        else:
            key, subkey = jax.random.split(state.key)
        estimate = estimate_fn(grads, params, subkey, extra, name)
        estimate = jax.tree.map(lambda e, s: e.astype(s.dtype), estimate, state.curvature)
        # the squares' check covers the gradients (g * g is finite only where g is): it is made in update_fn
        finite = jnp.asarray(True) if squares_of_gradients else all_finite(estimate)
        return accumulate(state.curvature, estimate), state.estimates + 1, finite, key

    def keep(state):
        return state.curvature, state.estimates, jnp.asarray(True), state.key

    def update_fn(updates, state, params=None, **extra):
        check_float_leaves(updates, name)
        extra = masked_extras(params, extra, name)
        grads = updates
        # a stored moment or statistic entry that is not finite (a corrupt state) restarts, entry by entry
        state = state._replace(
            momentum=jax.tree.map(lambda m: _finite_or(m, 0.0), state.momentum),
            curvature=jax.tree.map(lambda c: _finite_or(c, initial_curvature), state.curvature),
        )
        if isinstance(statistics_frequency, int) and statistics_frequency == 1:
            curvature, estimates, estimate_ok, key = refresh(state, grads, params, extra)
        else:
            curvature, estimates, estimate_ok, key = jax.lax.cond(
                is_refresh_step(state.count, statistics_frequency),
                lambda: refresh(state, grads, params, extra),
                lambda: keep(state),
            )
        # The non-finite policy: a gradient or estimate that is not finite (an overflowing square included) is not
        # folded in, and since the kept statistic would pair with a fresh momentum, the step is rejected as a whole.
        # Decided from the inputs (the gradients, their squares, the estimate) before the new state exists, so that
        # the choice of old or new fuses into the loops that write the state: a select after the fact wrote every
        # state array twice and waited for reductions over the moments, statistics and updates too.
        if squares_of_gradients:  # g * g in the statistic's dtype, as the estimator computes it
            squares = jax.tree.map(lambda g, c: jnp.square(g).astype(c.dtype), grads, state.curvature)
            ok = jnp.isfinite(_largest_magnitude(squares))
        else:
            ok = jnp.isfinite(_largest_magnitude(grads)) & estimate_ok
        count = jnp.where(ok, optax.safe_int32_increment(state.count), state.count)
        momentum = optax.tree.update_moment(jax.tree.map(lambda g, m: g.astype(m.dtype), grads, state.momentum),
                                            state.momentum, b1, 1)

        def kept_unless_ok(new, old):
            # an entry whose new value overflows from finite inputs (an Adagrad sum past the float range) keeps its
            # previous value, as every entry does on a rejected step
            return jax.tree.map(lambda n, o: jnp.where(ok & jnp.isfinite(n), n, o), new, old)

        # the update is computed from the state as stored (new where ok, else old: it is zeroed then), so that the
        # state arrays are written in place and read back, not copied first
        momentum = kept_unless_ok(momentum, state.momentum)
        curvature = kept_unless_ok(curvature, state.curvature)
        estimates = jnp.where(ok, estimates, state.estimates)
        m_hat = optax.tree.bias_correction(momentum, b1, count) if momentum_bias_correction else momentum
        debias = curvature_bias_correction and averaging == "ema"
        s_hat = _bias_corrected(curvature, b2, estimates) if debias else curvature

        def precondition(g, m, s):
            u = m / (_power(scale * jnp.maximum(s, 0) + eps_root, power) + eps)
            if clip is not None:
                u = jnp.clip(u, -clip, clip)
            if step_bias_correction:
                u = u / (1 - b1**count).astype(u.dtype)
            # finite inputs give a finite update but for a zero denominator (eps = eps_root = 0) or an overflowing
            # quotient: such an entry moves by 0
            return jnp.where(ok & jnp.isfinite(u), u, 0).astype(g.dtype)

        updates = jax.tree.map(precondition, grads, m_hat, s_hat)
        nonfinite = state.nonfinite + (~ok).astype(jnp.int32)
        new_state = DiagonalCurvatureState(count, momentum, curvature, estimates, nonfinite, key)
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_adahessian(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-4,
    hessian_power: float = 1.0,
    statistics_frequency: int = 1,
    spatial_axes: Callable[[jax.Array], tuple[int, ...]] = conv_spatial_axes,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""AdaHessian (Yao et al. 2021): Adam with a squared Hutchinson Hessian diagonal.

    .. math::

        D_t = \overline{|z \odot H z|}^{\,\text{spatial}}, \quad
        v_t = b_2 v_{t-1} + (1 - b_2) D_t^2, \quad
        u_t = \frac{m_t / (1 - b_1^t)}{\big(\sqrt{v_t / (1 - b_2^n)}\big)^k + \epsilon}

    with one Rademacher probe ``z``, ``k`` the Hessian power and ``n`` the number of Hessian
    estimates so far (``n = t`` when ``statistics_frequency = 1``). Defaults are the official code's
    (``optim_adahessian.py``): betas ``(0.9, 0.999)``, ``eps = 1e-4``, ``hessian_power = 1``; its
    learning rate 0.15 is the default of :func:`optax_second_order.adahessian`.

    Args:
      b1: momentum decay.
      b2: decay of the moving average of ``D^2``.
      eps: added to the denominator.
      hessian_power: ``k`` in ``(0, 1]``.
      statistics_frequency: estimate the Hessian diagonal every this many steps ("delayed Hessian
        update"; between refreshes ``v`` is reused).
      spatial_axes: ``leaf -> axes`` to average ``|z * Hz|`` over (default: the two spatial axes of
        rank-4 conv kernels in Flax's ``(h, w, in, out)`` layout).
      seed: seed of the probes' PRNG key.

    Needs the extra argument ``value_fn`` (params -> scalar loss of the batch), or ``hvp_fn`` (``v -> H v`` at
    ``params``): with the training step's gradient from :func:`~optax_second_order.grad_and_hvp_fn`, passing its
    ``hvp_fn`` saves the estimate a second forward and backward pass.
    """
    check("scale_by_adahessian", "hessian_power", hessian_power, lambda x: 0 < x <= 1, "in (0, 1]")

    def estimator(grads, params, key, extra, name):
        return adahessian_estimate(grads, params, key, extra, name, spatial_axes)

    def curvature_shape(leaf):
        return spatially_reduced_shape(leaf, spatial_axes)

    return scale_by_diagonal_curvature(
        estimator,
        b1=b1,
        b2=b2,
        power=hessian_power / 2,
        eps=eps,
        statistics_frequency=statistics_frequency,
        seed=seed,
        name="scale_by_adahessian",
        curvature_shape=curvature_shape,
    )


def scale_by_sophia(
    estimator: str = "gnb",
    b1: float = 0.965,
    b2: float = 0.99,
    rho: float = 0.04,
    eps: float = 1e-15,
    clip: float = 1.0,
    statistics_frequency: int = 10,
    bias_correction: str | None = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Sophia (Liu et al. 2023): momentum over a clipped, EMA'd diagonal Hessian estimate.

    .. math::

        h_t = b_2 h_{t-k} + (1 - b_2) \hat h_t \ \text{(every } k \text{ steps)}, \quad
        m_t = b_1 m_{t-1} + (1 - b_1) g_t, \quad
        u_t = \operatorname{clip}\big(m_t / (\rho \max(h_t, 0) + \epsilon),\ \pm 1\big)

    ``estimator="gnb"`` is Sophia-G: ``h_hat = B * g_hat^2`` with ``g_hat`` the gradient of the
    mean loss at labels sampled from the model and ``B`` the number of examples (tokens) in the
    batch. The official code keeps the EMA of ``g_hat^2`` and divides by ``rho * bs * h`` with
    ``bs`` the tokens per batch; since our ``h`` already carries ``B``, **our ``rho`` is the official
    ``rho``**. ``estimator="hutchinson"`` is Sophia-H: ``h_hat = z * H z``; ``max(h, 0)`` makes
    negative curvature a full clipped step, as ``relu`` does in the official Sophia-H code.

    Defaults are the official ``SophiaG`` class's (``sophia.py``): betas ``(0.965, 0.99)``,
    ``rho = 0.04``, ``eps = 1e-15``, and its training script's ``interval = 10``. The estimate is
    refreshed at steps ``0, k, 2k, ...`` and used from that step on (the paper's Algorithm 3; the
    official training loop first refreshes after ``k`` steps, so its first ``k`` steps divide by
    ``eps``, i.e. are clipped sign-momentum steps). Like the official Sophia-G, nothing is bias-corrected
    by default; ``bias_correction="momentum"`` divides ``m_t`` by ``1 - b1^t`` inside the clip (as
    ``optax.contrib.sophia``), ``bias_correction="step"`` divides the clipped update by ``1 - b1^t`` (the learning
    rate ``lr / (1 - b1^t)`` of the original Sophia-H code).

    Args:
      estimator: ``"gnb"`` (Sophia-G; needs ``model_fn`` and ``loss``) or ``"hutchinson"``
        (Sophia-H; needs ``value_fn``, or ``hvp_fn`` from :func:`~optax_second_order.grad_and_hvp_fn`).
      b1: momentum decay.
      b2: decay of the Hessian moving average (per refresh).
      rho: the clipping scale ``rho``.
      eps: added to the denominator.
      clip: the elementwise bound on the update (before the learning rate).
      statistics_frequency: ``k``, steps between Hessian estimates.
      bias_correction: ``None``, ``"momentum"`` or ``"step"`` (above).
      seed: seed of the PRNG key for sampled labels or probes.
    """
    check_choice("scale_by_sophia", "estimator", estimator, ("gnb", "hutchinson"))
    check_choice("scale_by_sophia", "bias_correction", bias_correction, (None, "momentum", "step"))
    check("scale_by_sophia", "rho", rho, lambda x: x > 0, "> 0")
    return scale_by_diagonal_curvature(
        estimator,
        b1=b1,
        b2=b2,
        momentum_bias_correction=bias_correction == "momentum",
        curvature_bias_correction=False,
        step_bias_correction=bias_correction == "step",
        power=1.0,
        scale=rho,
        eps=eps,
        clip=clip,
        statistics_frequency=statistics_frequency,
        seed=seed,
        name=f"scale_by_sophia(estimator={estimator!r})",
    )
