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
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from optax_second_order.curvature.losses import OutputLoss

__all__ = [
    "hvp",
    "hvp_operator",
    "gnvp",
    "gnvp_operator",
    "gnvp_quadratic_form",
    "fisher_vp",
    "empirical_fisher_vp",
    "empirical_fisher_diagonal",
]

PyTree = Any
LinearOperator = Callable[[PyTree], PyTree]


def hvp_operator(value_fn: Callable[[PyTree], jax.Array], params: PyTree) -> LinearOperator:
    """``v -> H v`` with ``H = d^2 value_fn / d params^2``, linearized once at ``params``."""
    _, hessian_vp = jax.linearize(jax.grad(value_fn), params)
    return hessian_vp


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
    """``v^T G v = (J v)^T H_L (J v)``: one ``jvp`` and the output-space product, no ``vjp``."""
    outputs, jv = jax.jvp(model_fn, (params,), (v,))
    return jnp.vdot(jv, loss.output_hvp(outputs, jv))


def _sampled_output_fisher_vp(loss: OutputLoss, outputs, u, key, num_samples):
    """``(w_i / W) mean_s s_i^{(s)} (s_i^{(s)} . u_i)`` with ``s`` the output gradients at sampled targets."""
    axes = loss.event_axes(outputs)
    scale = loss.example_scale(outputs)
    u = u.astype(scale.dtype)

    def one_sample(key):
        s = loss.with_targets(loss.sample_targets(key, outputs)).per_example_output_grad(outputs)
        return s * jnp.sum(s * u, axis=axes, keepdims=True)

    mean = jnp.mean(jax.vmap(one_sample)(jax.random.split(key, num_samples)), axis=0)
    return (scale * mean).astype(outputs.dtype)


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
    outputs, jvp_fn, vjp_fn = _linearize_model(model_fn, params)
    return vjp_fn(_sampled_output_fisher_vp(loss, outputs, jvp_fn(v), key, num_samples))


def empirical_fisher_vp(
    per_example_value_fn: Callable[[PyTree], jax.Array], params: PyTree, v: PyTree
) -> PyTree:
    """Empirical-Fisher-vector product ``(1/N) sum_i g_i (g_i . v)``.

    ``per_example_value_fn(params)`` returns the per-example losses ``l_i`` at the data's targets
    (any shape, ``N`` = its size) and ``g_i = d l_i / d params``. With ``J_l`` the Jacobian of the
    per-example losses, ``F_emp v = J_l^T (J_l v) / N``: one ``jvp`` and one ``vjp``, no per-example
    gradients materialized.
    """
    values, jvp_fn = jax.linearize(per_example_value_fn, params)
    transpose = jax.linear_transpose(jvp_fn, params)
    return transpose(jvp_fn(v) / values.size)[0]


def empirical_fisher_diagonal(per_example_value_fn: Callable[[PyTree], jax.Array], params: PyTree) -> PyTree:
    """``diag(F_emp) = (1/N) sum_i g_i^2`` from the per-example Jacobian (memory ``N x #params``)."""
    jac = jax.jacrev(per_example_value_fn)(params)
    values_ndim = jax.eval_shape(per_example_value_fn, params).ndim
    return jax.tree.map(lambda j: jnp.mean(jnp.square(j), axis=tuple(range(values_ndim))), jac)
