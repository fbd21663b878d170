"""Layer 3: ready optimizers, thin ``optax.chain``s of a ``scale_by_*`` with weight decay and the learning rate."""

from __future__ import annotations

__all__: list[str] = []
