"""Contract cases of the diagonal-preconditioner family (transforms/diagonal.py and its aliases)."""

from __future__ import annotations

import optax_second_order as oso
from contract import ContractCase

CASES = [
    ContractCase("adam_alias", oso.adam, inject="b1"),
    ContractCase("adagrad_alias", oso.adagrad, inject="eps"),
    ContractCase("adahessian", oso.adahessian, needs=("value_fn",), inject="b1"),
    ContractCase(
        "sophia-g", oso.sophia, dict(estimator="gnb", statistics_frequency=2), needs=("model_fn", "loss"), inject="rho",
        injected_value=4.0,
    ),
    ContractCase(
        "sophia-h", oso.sophia, dict(estimator="hutchinson", statistics_frequency=2), needs=("value_fn",), inject="rho",
        injected_value=4.0,
    ),
]
