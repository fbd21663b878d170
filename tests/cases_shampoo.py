"""Contract cases of the Kronecker-factored matrix preconditioners (Shampoo, SOAP).

Each case runs the refresh options too (one case per transformation keeps the suite's time in bounds; the
default configurations are checked against NumPy loops of the papers in tests/transforms/): Shampoo with
frequent, staggered coupled-Newton roots (two slots, one refreshed per step, so a root branch runs within the
contract's steps), SOAP in blocks of 3 (the toy's 4 x 3 matrix and 3 x 3 x 2 x 4 kernel get zero-padded blocks)
with staggered Cholesky-QR bases.
"""

from __future__ import annotations

import optax_second_order as oso
from contract import ContractCase

CASES = [
    ContractCase(
        "shampoo", oso.shampoo,
        dict(precondition_frequency=2, start_preconditioning_step=1, nesterov=True, stagger=2, root_method="newton"),
        inject="b1", static_args=("stagger",),
        # inverse fourth roots of statistics built from two gradients amplify the hyperparameters' float32 rounding
        # by the statistics' conditioning: 1.3e-4 needed at step 2 (issue 23)
        inject_rtol=1e-3,
    ),
    ContractCase(
        "soap", oso.soap, dict(precondition_frequency=2, block_size=3, stagger=True, basis_method="cholesky_qr"),
        inject="b1", static_args=("block_size", "precondition_frequency"),
        # the eigenbases are resolved to sqrt(d u) = 6e-4 for the 3 x 3 blocks (soap._tie_broken): 2.9e-4 needed at
        # step 2 (0.23 before the tie-break, issue 23)
        inject_rtol=1e-3,
    ),
]
