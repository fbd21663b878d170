"""Layer 1: pure, jittable curvature primitives over parameter pytrees (no optimizer state)."""

from optax_second_order.curvature import (
    blocks,
    capture,
    estimators,
    kronecker,
    losses,
    matrix,
    products,
    quantize,
    secant,
    solvers,
    spectrum,
    threads,
)
from optax_second_order.curvature.estimators import *  # noqa: F401,F403
from optax_second_order.curvature.matrix import *  # noqa: F401,F403
from optax_second_order.curvature.products import *  # noqa: F401,F403
from optax_second_order.curvature.secant import *  # noqa: F401,F403
from optax_second_order.curvature.solvers import *  # noqa: F401,F403
from optax_second_order.curvature.spectrum import *  # noqa: F401,F403

__all__ = [
    "blocks",
    "capture",
    "kronecker",
    "losses",
    "quantize",
    *estimators.__all__,
    *matrix.__all__,
    *products.__all__,
    *secant.__all__,
    *solvers.__all__,
    *spectrum.__all__,
]
