"""Flax integration: training states that forward extra arguments (linen ``TrainState``, NNX helpers)."""

from optax_second_order.flax.train_state import *  # noqa: F401,F403
from optax_second_order.flax.capture import *  # noqa: F401,F403
