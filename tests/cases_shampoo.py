"""Contract cases of the Kronecker-factored matrix preconditioners (Shampoo, SOAP)."""

from __future__ import annotations

import optax_second_order as oso
from contract import ContractCase

CASES = [
    # Frequent roots, so that the root branch runs within the contract's 3 steps (blocking is tested in
    # tests/transforms/test_shampoo.py; the default block size keeps the number of root groups to compile small).
    ContractCase(
        "shampoo", oso.shampoo, dict(precondition_frequency=1, start_preconditioning_step=1, nesterov=True), inject="b1"
    ),
    ContractCase("soap", oso.soap, dict(precondition_frequency=2), inject="b1"),
]
