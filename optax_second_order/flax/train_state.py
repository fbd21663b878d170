"""Flax training states that hand the extra arguments (``value_fn``, ``model_fn``, ``loss``) to ``tx.update``.

* Linen: ``flax.training.train_state.TrainState.apply_gradients(grads=..., **kwargs)`` calls
  ``tx.update(grads, opt_state, params)`` and uses ``kwargs`` only to ``.replace()`` fields, so a
  transformation that needs ``value_fn`` never sees it. :class:`TrainState` here is a drop-in
  subclass: keyword arguments that name a field of the state are replaced as before, every other
  keyword is forwarded to ``tx.update``. Plain optax optimizers ignore them.
* NNX: ``nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads, **extra)`` already forwards
  ``extra`` to ``tx.update`` with ``params`` the pure state of the ``wrt`` variables.
  :func:`nnx_extra_args` builds ``model_fn`` / ``value_fn`` over exactly that state, by
  ``nnx.split`` / ``nnx.merge`` of the model.

Linen::

    state = oso.flax.TrainState.create(apply_fn=module.apply, params=params, tx=oso.sophia(1e-3))

    @jax.jit
    def train_step(state, x, y):
        loss = oso.losses.softmax_cross_entropy(y)
        model_fn = lambda p: state.apply_fn({"params": p}, x)
        grads = jax.grad(lambda p: loss(model_fn(p)))(state.params)
        return state.apply_gradients(grads=grads, model_fn=model_fn, loss=loss)

NNX::

    optimizer = nnx.Optimizer(model, oso.sophia(1e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        extra = oso.flax.nnx_extra_args(model, x, oso.losses.softmax_cross_entropy(y))
        grads = nnx.grad(lambda m: extra["loss"](m(x)))(model)
        optimizer.update(model, grads, **extra)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import optax
from flax import nnx
from flax.training import train_state

from optax_second_order.curvature.losses import OutputLoss
from optax_second_order.flax.capture import tag_layers

__all__ = ["TrainState", "nnx_extra_args"]


class TrainState(train_state.TrainState):
    """Flax linen's ``TrainState`` whose ``apply_gradients`` forwards extra arguments to ``tx.update``."""

    def apply_gradients(self, *, grads: Any, **kwargs: Any) -> "TrainState":
        """One optimizer step: ``updates, opt_state = tx.update(grads, opt_state, params, **extra)``.

        Args:
          grads: gradients with the structure of ``params``.
          **kwargs: keywords naming a field of the state (``batch_stats``, ...) replace it, as in
            Flax's ``TrainState``; all others (``value_fn``, ``model_fn``, ``loss``, ...) are
            passed to ``tx.update``.

        Returns:
          The state with ``step + 1``, the new ``params`` and ``opt_state``, and replaced fields.
        """
        fields = {field.name for field in dataclasses.fields(self)}
        replace = {name: value for name, value in kwargs.items() if name in fields}
        extra = {name: value for name, value in kwargs.items() if name not in fields}
        overwrite = train_state.OVERWRITE_WITH_GRADIENT in grads
        grads_with_opt = grads["params"] if overwrite else grads
        params_with_opt = self.params["params"] if overwrite else self.params

        updates, opt_state = self.tx.update(grads_with_opt, self.opt_state, params_with_opt, **extra)
        new_params = optax.apply_updates(params_with_opt, updates)
        if overwrite:
            new_params = {
                "params": new_params,
                train_state.OVERWRITE_WITH_GRADIENT: grads[train_state.OVERWRITE_WITH_GRADIENT],
            }
        return self.replace(step=self.step + 1, params=new_params, opt_state=opt_state, **replace)


def nnx_extra_args(
    model: nnx.Module,
    inputs: Any,
    loss: OutputLoss | None = None,
    wrt: Any = nnx.Param,
    apply: Callable[[nnx.Module, Any], Any] | None = None,
) -> dict[str, Any]:
    """``model_fn`` (and ``value_fn``, ``loss`` when ``loss`` is given) over an NNX model's parameters.

    ``model_fn(params) = apply(tag_layers(nnx.merge(graphdef, params, rest)), inputs)`` with
    ``graphdef, _, rest = nnx.split(model, wrt, ...)``, so ``params`` is the pure state that
    ``nnx.Optimizer(model, tx, wrt=wrt).update`` passes to ``tx.update``, and K-FAC's capture sees the
    copy's layers (:func:`~optax_second_order.flax.tag_layers`). The merged copy is thrown away: the model
    itself is not changed by curvature evaluations. K-FAC's ``layers`` come from the same ``model_fn``:
    ``oso.flax.find_layers(extra["model_fn"], nnx.state(model, wrt))``.

    Args:
      model: the NNX model.
      inputs: the batch's inputs.
      loss: the output-space loss bound to the batch's targets (``oso.losses.*``).
      wrt: the filter of the optimized variables (the optimizer's ``wrt``).
      apply: ``apply(model, inputs) -> outputs``; default ``model(inputs)``.

    Returns:
      ``{"model_fn": ..., "value_fn": ..., "loss": loss}`` (only ``model_fn`` without ``loss``), to
      splat into ``optimizer.update(model, grads, **extra)``.
    """
    graphdef, _, rest = nnx.split(model, wrt, ...)
    call = apply or (lambda module, x: module(x))

    def model_fn(params):
        return call(tag_layers(nnx.merge(graphdef, params, rest)), inputs)

    if loss is None:
        return {"model_fn": model_fn}
    return {"model_fn": model_fn, "value_fn": lambda params: loss(model_fn(params)), "loss": loss}
