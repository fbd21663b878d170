"""Where an optimizer's state lives on a mesh: the shardings of ``tx.init(params)``, for ``jax.jit`` and orbax.

The Kronecker methods with ``precondition_sharding`` store their block stacks split over mesh axes
(:mod:`~optax_second_order.curvature.bank`); every other array of a state follows the parameters' sharding (or is
replicated, such as counters). The compiler knows both: :func:`state_shardings` compiles ``tx.init`` for
``params`` (arrays, or ``jax.ShapeDtypeStruct`` with their ``sharding``) and returns the shardings of its outputs.
Use them as ``jax.jit(train_step, out_shardings=...)`` for the state, or as the target shardings of an orbax
restore (``jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)`` per leaf), so a checkpoint written on one
topology is laid out for another when it is read.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

__all__ = ["state_shardings"]


def state_shardings(tx: optax.GradientTransformation, params: Any) -> Any:
    """The sharding of every array of ``tx.init(params)``, as a pytree like the state.

    Args:
      tx: any optax transformation (an alias, a chain, ``optax.inject_hyperparams(...)``).
      params: the parameters as ``init`` will get them: arrays placed on the mesh, or ``jax.ShapeDtypeStruct``
        with a ``sharding`` (nothing is allocated then). Call under ``jax.set_mesh(mesh)`` for a mesh with
        ``Explicit`` axes.
    """
    return jax.jit(tx.init).lower(params).compile().output_shardings
