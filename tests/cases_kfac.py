"""Contract cases of K-FAC and EK-FAC: the toy's conv and dense layers are captured, scale and bias fall back."""

from __future__ import annotations

import optax_second_order as oso
from contract import ContractCase

CASES = [
    ContractCase(
        # a KL clip that does not bind, so the update stays linear in the learning rate (a contract clause)
        # the conv and dense layers' inverses staggered over two slots
        "kfac", oso.kfac, dict(precondition_frequency=2, stagger=2, kl_clip=1.0), needs=("model_fn", "loss"),
        inject="damping", uses_layers=True, static_args=("stagger",),
    ),
    ContractCase(
        "kfac-ekfac-adaptive",
        oso.kfac,
        # EK-FAC with everything adaptive: damping (section 6.5), step size and momentum (section 7)
        dict(approximation="eigenvalue_corrected", statistics_frequency=1, precondition_frequency=2, adaptive_damping=True,
             damping_adaptation_interval=2, kl_clip=None, adaptive_learning_rate=True, adaptive_momentum=True),
        needs=("model_fn", "loss", "value_fn"),
        # not damping: with adaptive damping it is the initial value, kept in the state; statistics every step so that
        # the second step folds a second statistic in with ema_decay
        inject="ema_decay",
        injected_value=0.2,
        uses_layers=True,
    ),
    ContractCase(
        # EK-FAC's factors, eigenbases and scales stored in bfloat16 between steps (issue 22)
        "kfac-ekfac-bf16", oso.kfac,
        dict(approximation="eigenvalue_corrected", precondition_frequency=2, kl_clip=1.0, state_dtype="bfloat16"),
        needs=("model_fn", "loss"), inject="damping", uses_layers=True,
    ),
]
