"""Contract cases of the diagonal-preconditioner family (transforms/diagonal.py and its aliases)."""

from __future__ import annotations

import optax_second_order as oso
from contract import ContractCase

CASES = [
    ContractCase("adam_alias", lambda learning_rate: oso.adam(learning_rate)),
    ContractCase("adagrad_alias", lambda learning_rate: oso.adagrad(learning_rate)),
    ContractCase("adahessian", lambda learning_rate: oso.adahessian(learning_rate), needs=("value_fn",)),
    ContractCase(
        "sophia-g",
        lambda learning_rate: oso.sophia(learning_rate, estimator="gnb", refresh_every=2),
        needs=("model_fn", "loss"),
    ),
    ContractCase(
        "sophia-h",
        lambda learning_rate: oso.sophia(learning_rate, estimator="hutchinson", refresh_every=2),
        needs=("value_fn",),
    ),
]
