"""optax_second_order: second-order optimizers as composable Optax gradient transformations.

The public surface is flat: ``import optax_second_order as oso`` gives the curvature primitives
(``oso.hvp``, ``oso.gnvp``, ...), the ``oso.losses`` module, the ``scale_by_*`` transformations and
the ready optimizers (aliases).
"""

from optax_second_order import curvature, transforms
from optax_second_order.curvature import *  # noqa: F401,F403
from optax_second_order.curvature import losses
from optax_second_order.transforms import *  # noqa: F401,F403
# Last, so that the aliases (e.g. ``oso.shampoo``) win over same-named transforms submodules.
from optax_second_order.aliases import *  # noqa: F401,F403
# Registers K-FAC's capture of Flax layers (and makes ``oso.flax`` available).
import optax_second_order.flax.capture  # noqa: E402,F401

__version__ = "0.1.0"
