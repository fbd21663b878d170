"""Contract cases of the Kronecker-factored matrix preconditioners (Shampoo, SOAP)."""

from __future__ import annotations

import optax_second_order as oso
from contract import ContractCase

CASES = [
    # Small blocks and frequent roots, so that blocking, merging and the root branch all run in 3 steps.
    ContractCase(
        "shampoo",
        lambda learning_rate: oso.shampoo(
            learning_rate, block_size=4, precondition_frequency=1, start_preconditioning_step=1, nesterov=True
        ),
    ),
    ContractCase("soap", lambda learning_rate: oso.soap(learning_rate, precondition_frequency=2)),
]
