"""Layer 2: ``scale_by_*`` gradient transformations, one module per optimizer family."""

from optax_second_order.transforms import (
    diagonal, kbfgs, kfac, linesearch, newton, quasi_newton, shampoo, sharding, soap,
)
from optax_second_order.transforms.diagonal import *  # noqa: F401,F403
from optax_second_order.transforms.kbfgs import *  # noqa: F401,F403
from optax_second_order.transforms.kfac import *  # noqa: F401,F403
from optax_second_order.transforms.linesearch import *  # noqa: F401,F403
from optax_second_order.transforms.newton import *  # noqa: F401,F403
from optax_second_order.transforms.quasi_newton import *  # noqa: F401,F403
from optax_second_order.transforms.shampoo import *  # noqa: F401,F403
from optax_second_order.transforms.sharding import *  # noqa: F401,F403
from optax_second_order.transforms.soap import *  # noqa: F401,F403

__all__ = [*diagonal.__all__, *kfac.__all__, *newton.__all__, *shampoo.__all__, *soap.__all__]
__all__ += [*quasi_newton.__all__, *linesearch.__all__, *kbfgs.__all__, *sharding.__all__]
