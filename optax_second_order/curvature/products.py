"""Curvature-vector products over parameter pytrees.

* Hessian:      ``H v``            by forward-over-reverse, ``jvp(grad(f))`` (Pearlmutter 1994).
* Gauss-Newton: ``J^T H_L J v``    by ``jvp`` of the model, the loss's output Hessian, ``vjp``
  (Schraudolph 2002; Martens 2010).
* Fisher:       ``J^T E_t[s s^T] J v`` with ``s = d l / d y`` at targets ``t`` sampled from the model
  (Monte Carlo; its expectation is the GGN for the losses in :mod:`.losses`).
* Empirical Fisher: ``1/N sum_i g_i g_i^T v`` from per-example losses at the data's targets.

Each product has an *operator* form that linearizes the function once and returns a linear map
``v -> C v`` that is cheap to apply many times (conjugate gradient, Lanczos): ``jax.linearize``
keeps the primal residuals, and ``jax.linear_transpose`` of the linearized model gives its ``vjp``.

The GGN and the two Fishers also have a *factor* form, ``C = U U^T`` with ``U`` of ``m`` columns (one per
output coordinate, sampled output gradient or example), for the row-space solve
:func:`~optax_second_order.curvature.solvers.low_rank_damped_solve` when ``m`` is below the parameter count.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from optax_second_order.curvature.losses import OutputLoss

__all__ = [
    "hvp",
    "hvp_operator",
    "grad_and_hvp_fn",
    "gnvp",
    "gnvp_operator",
    "gnvp_quadratic_form",
    "fisher_vp",
    "fisher_operator",
    "empirical_fisher_vp",
    "empirical_fisher_operator",
    "empirical_fisher_diagonal",
    "ggn_factor",
    "fisher_factor",
    "empirical_fisher_factor",
]

PyTree = Any
LinearOperator = Callable[[PyTree], PyTree]


def hvp_operator(value_fn: Callable[[PyTree], jax.Array], params: PyTree) -> LinearOperator:
    """``v -> H v`` with ``H = d^2 value_fn / d params^2``, linearized once at ``params``."""
    _, hessian_vp = jax.linearize(jax.grad(value_fn), params)
    return hessian_vp


def grad_and_hvp_fn(
    value_fn: Callable[[PyTree], jax.Array], params: PyTree, *, return_value: bool = False
) -> tuple[PyTree, Callable] | tuple[jax.Array, PyTree, Callable]:
    """The gradient of ``value_fn`` at ``params`` and the map ``v -> H v``, from one linearization.

    ``jax.linearize(jax.grad(value_fn), params)``: the forward and backward pass run once and give the gradient,
    and the returned linear map evaluates only the tangent (forward-over-reverse) part. A training step that
    computes its gradient this way and passes ``hvp_fn=`` to the optimizer saves the Hessian-vector estimators
    (AdaHessian, Sophia-H: the Hutchinson estimate) a second forward and backward pass::

        grads, hvp_fn = oso.grad_and_hvp_fn(value_fn, params)
        updates, state = tx.update(grads, state, params, value_fn=value_fn, hvp_fn=hvp_fn)

    Under ``jax.jit`` the linear map costs nothing where it is not called (its work is only traced where used),
    but the forward pass keeps the residuals it needs (``docs/optimizers/adahessian.md``).

    Args:
      value_fn: params -> scalar loss of the batch.
      params: where to linearize.
      return_value: also return the loss: ``(value, grads, hvp_fn)``.

    Returns:
      ``(grads, hvp_fn)``, or ``(value, grads, hvp_fn)`` with ``return_value``.
    """
    if return_value:
        (value, grads), linear = jax.linearize(jax.value_and_grad(value_fn), params)
        return value, grads, lambda v: linear(v)[1]
    grads, hessian_vp = jax.linearize(jax.grad(value_fn), params)
    return grads, hessian_vp


def hvp(value_fn: Callable[[PyTree], jax.Array], params: PyTree, v: PyTree) -> PyTree:
    """Hessian-vector product ``H v`` by forward-over-reverse differentiation, ``jvp(grad(f))``."""
    return jax.jvp(jax.grad(value_fn), (params,), (v,))[1]


def _linearize_model(model_fn, params):
    """``outputs, J v, J^T u`` maps of the model at ``params``: one forward pass for both."""
    outputs, jvp_fn = jax.linearize(model_fn, params)
    transpose = jax.linear_transpose(jvp_fn, params)
    return outputs, jvp_fn, lambda u: transpose(u)[0]


def gnvp_operator(model_fn: Callable[[PyTree], jax.Array], loss: OutputLoss, params: PyTree) -> LinearOperator:
    """``v -> J^T H_L J v`` (generalized Gauss-Newton), the model linearized once at ``params``."""
    outputs, jvp_fn, vjp_fn = _linearize_model(model_fn, params)
    return lambda v: vjp_fn(loss.output_hvp(outputs, jvp_fn(v)))


def gnvp(model_fn: Callable[[PyTree], jax.Array], loss: OutputLoss, params: PyTree, v: PyTree) -> PyTree:
    """Generalized Gauss-Newton-vector product ``G v = J^T H_L J v``.

    ``J`` is the Jacobian of ``model_fn`` at ``params`` and ``H_L`` the Hessian of ``loss`` w.r.t. the
    model's outputs: one ``jvp``, the closed-form output-space product, one ``vjp``.
    """
    return gnvp_operator(model_fn, loss, params)(v)


def gnvp_quadratic_form(model_fn: Callable[[PyTree], jax.Array], loss: OutputLoss, params: PyTree, v: PyTree) -> jax.Array:
    """``v^T G v = (J v)^T H_L (J v)``: one ``jvp`` and the output-space product, no ``vjp``.

    The output-space inner product is a sum of products, not ``jnp.vdot``: the outputs may be split over devices
    with the batch, and a contraction over a split axis has no sharding JAX can infer on ``Explicit`` mesh axes.
    """
    outputs, jv = jax.jvp(model_fn, (params,), (v,))
    return jnp.sum(jv * loss.output_hvp(outputs, jv))


def _check_num_samples(num_samples, fn: str) -> None:
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"{fn}: num_samples must be a Python int >= 1, got {num_samples}")


def _sampled_output_grads(loss: OutputLoss, outputs: jax.Array, key: jax.Array, num_samples: int) -> jax.Array:
    """``s^(k) = d l / d y`` at targets ``t^(k) ~ p(t | y)``, ``k = 1..num_samples``, each draw from its own key
    of ``jax.random.split(key, num_samples)``: shape ``(num_samples, *outputs.shape)``, float32 or better."""

    def one_sample(key):
        return loss.with_targets(loss.sample_targets(key, outputs)).per_example_output_grad(outputs)

    return jax.vmap(one_sample)(jax.random.split(key, num_samples))


def fisher_operator(
    model_fn: Callable[[PyTree], jax.Array], loss: OutputLoss, params: PyTree, key: jax.Array, num_samples: int = 1
) -> LinearOperator:
    """``v -> F v`` for the sampled true Fisher of :func:`fisher_vp`, linearized and sampled once.

    The targets are drawn once, so every product applies the same matrix
    ``J^T (1/W sum_i w_i (1/S) sum_k s_ik s_ik^T) J``: one fixed linear map for conjugate gradient or
    Lanczos, equal to :func:`fisher_vp` with the same ``key``.
    """
    _check_num_samples(num_samples, "fisher_operator")
    outputs, jvp_fn, vjp_fn = _linearize_model(model_fn, params)
    grads = _sampled_output_grads(loss, outputs, key, num_samples)
    scale = loss.example_scale(outputs) / num_samples
    event_axes = tuple(axis + 1 for axis in loss.event_axes(outputs))

    def output_fisher_vp(u):
        """``(w_i / W) (1/S) sum_k s_ik (s_ik . u_i)`` per example."""
        projections = jnp.sum(grads * u.astype(grads.dtype), axis=event_axes, keepdims=True)
        return (scale * jnp.sum(grads * projections, axis=0)).astype(outputs.dtype)

    return lambda v: vjp_fn(output_fisher_vp(jvp_fn(v)))


def fisher_vp(
    model_fn: Callable[[PyTree], jax.Array],
    loss: OutputLoss,
    params: PyTree,
    v: PyTree,
    key: jax.Array,
    num_samples: int = 1,
) -> PyTree:
    """Monte Carlo true-Fisher-vector product ``F v = J^T (1/W sum_i w_i s_i s_i^T) J v``.

    ``s_i = d l_i / d y_i`` is the output gradient of example ``i`` at a target drawn from the model's
    predictive distribution (``num_samples`` draws per example, averaged). Its expectation over the
    draws is the true Fisher, which equals the GGN ``J^T H_L J`` for the losses of :mod:`.losses`
    (natural-parameter exponential families); use :func:`gnvp` for the exact expectation.
    """
    return fisher_operator(model_fn, loss, params, key, num_samples)(v)


def empirical_fisher_operator(per_example_value_fn: Callable[[PyTree], jax.Array], params: PyTree) -> LinearOperator:
    """``v -> F_emp v = J_l^T (J_l v) / N`` (see :func:`empirical_fisher_vp`), linearized once at ``params``."""
    values, jvp_fn = jax.linearize(per_example_value_fn, params)
    transpose = jax.linear_transpose(jvp_fn, params)
    return lambda v: transpose(jvp_fn(v) / values.size)[0]


def empirical_fisher_vp(
    per_example_value_fn: Callable[[PyTree], jax.Array], params: PyTree, v: PyTree
) -> PyTree:
    """Empirical-Fisher-vector product ``(1/N) sum_i g_i (g_i . v)``.

    ``per_example_value_fn(params)`` returns the per-example losses ``l_i`` at the data's targets
    (any shape, ``N`` = its size) and ``g_i = d l_i / d params``. With ``J_l`` the Jacobian of the
    per-example losses, ``F_emp v = J_l^T (J_l v) / N``: one ``jvp`` and one ``vjp``, no per-example
    gradients materialized.
    """
    return empirical_fisher_operator(per_example_value_fn, params)(v)


def empirical_fisher_diagonal(per_example_value_fn: Callable[[PyTree], jax.Array], params: PyTree) -> PyTree:
    """``diag(F_emp) = (1/N) sum_i g_i^2`` from the per-example Jacobian (memory ``N x #params``)."""
    jac = jax.jacrev(per_example_value_fn)(params)
    values_ndim = jax.eval_shape(per_example_value_fn, params).ndim
    return jax.tree.map(lambda j: jnp.mean(jnp.square(j), axis=tuple(range(values_ndim))), jac)


def _transpose_columns(vjp_fn, columns: jax.Array) -> PyTree:
    """``J^T c_j`` for every output-space column ``c_j`` (leading axis): a pytree with a leading axis ``m``."""
    return jax.vmap(lambda c: vjp_fn(c)[0])(columns)


def _basis(shape: tuple[int, ...], dtype) -> jax.Array:
    """The ``prod(shape)`` unit arrays of ``shape``, stacked: shape ``(prod(shape), *shape)``."""
    size = int(np.prod(shape, dtype=np.int64))
    return jnp.eye(size, dtype=dtype).reshape((size,) + tuple(shape))


def ggn_factor(model_fn: Callable[[PyTree], jax.Array], loss: OutputLoss, params: PyTree) -> PyTree:
    """``U = J^T S`` with ``G = J^T H_L J = U U^T``: one column per output coordinate (``m = outputs.size``).

    ``S S^T = H_L`` is the loss's output-Hessian square root (:meth:`~.losses.OutputLoss.output_hessian_sqrt_vp`,
    example weights included), so no inverse of ``H_L`` appears in the row-space solve
    :func:`~.solvers.low_rank_damped_solve`. Returned as a pytree shaped like ``params`` with a leading axis
    ``m``; one ``vjp`` per column (batched), memory ``m x #params``.
    """
    outputs, vjp_fn = jax.vjp(model_fn, params)
    roots = jax.vmap(lambda e: loss.output_hessian_sqrt_vp(outputs, e))(_basis(outputs.shape, outputs.dtype))
    return _transpose_columns(vjp_fn, roots)


def fisher_factor(
    model_fn: Callable[[PyTree], jax.Array], loss: OutputLoss, params: PyTree, key: jax.Array, num_samples: int = 1
) -> PyTree:
    """``U`` with ``U U^T`` the sampled true Fisher of :func:`fisher_vp` / :func:`fisher_operator` (same ``key``,
    same draws): column ``(k, i)`` is ``sqrt(w_i / (W S)) J^T s_ik``, with ``s_ik`` placed at example ``i``.

    ``m = num_samples x`` examples columns (sample-major), a pytree shaped like ``params`` with a leading
    axis ``m``, for :func:`~.solvers.low_rank_damped_solve`.
    """
    _check_num_samples(num_samples, "fisher_factor")
    outputs, vjp_fn = jax.vjp(model_fn, params)
    grads = _sampled_output_grads(loss, outputs, key, num_samples)
    grads = grads * jnp.sqrt(loss.example_scale(outputs) / num_samples)
    example_shape = loss.example_shape(outputs)
    indicators = jnp.expand_dims(_basis(example_shape, grads.dtype), tuple(a + 1 for a in loss.event_axes(outputs)))
    columns = (grads[:, None] * indicators[None]).reshape((-1,) + outputs.shape).astype(outputs.dtype)
    return _transpose_columns(vjp_fn, columns)


def empirical_fisher_factor(per_example_value_fn: Callable[[PyTree], jax.Array], params: PyTree) -> PyTree:
    """``U = J_l^T / sqrt(N)`` with ``F_emp = U U^T``: column ``i`` is the per-example gradient ``g_i / sqrt(N)``.

    ``N`` counts every per-example loss (as :func:`empirical_fisher_vp`); a pytree shaped like ``params``
    with a leading axis ``N``, for :func:`~.solvers.low_rank_damped_solve`.
    """
    values, vjp_fn = jax.vjp(per_example_value_fn, params)
    return _transpose_columns(vjp_fn, _basis(values.shape, values.dtype) / np.sqrt(values.size))
