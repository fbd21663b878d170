"""optax_second_order: second-order optimizers as composable Optax gradient transformations.

The public surface is flat: ``import optax_second_order as oso`` gives the curvature primitives
(``oso.hvp``, ``oso.gnvp``, ...), the ``oso.losses``, ``oso.capture`` and ``oso.kronecker`` modules, the
``scale_by_*`` transformations, the ready optimizers (aliases) and the Flax integration ``oso.flax``.
"""

from optax_second_order import aliases, curvature, transforms
from optax_second_order.curvature import *  # noqa: F401,F403
from optax_second_order.transforms import *  # noqa: F401,F403

# Last, so that the aliases (e.g. ``oso.shampoo``) win over same-named transforms submodules.
from optax_second_order.aliases import *  # noqa: F401,F403,E402
from optax_second_order import driver  # noqa: E402
from optax_second_order.driver import *  # noqa: F401,F403,E402
from optax_second_order import flax  # noqa: E402

__all__ = ["curvature", "transforms", "flax", *curvature.__all__, *transforms.__all__, *aliases.__all__]
__all__ += driver.__all__
del aliases, driver  # exported by name; the modules are not namespaces of their own

__version__ = "0.1.0"
