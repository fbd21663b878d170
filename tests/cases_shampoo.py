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
    # the refresh options: staggered slots (2 here, one refreshed per step), coupled Newton roots, blocks of 3 (the
    # toy's 4 x 3 matrix and 3 x 3 x 2 x 4 kernel get zero-padded blocks), Cholesky-QR bases
    ContractCase(
        "shampoo-staggered-newton", oso.shampoo,
        dict(precondition_frequency=2, start_preconditioning_step=1, stagger=2, root_method="newton"), inject="b1",
        static_args=("stagger",),
    ),
    ContractCase(
        "soap-blocked-staggered", oso.soap,
        dict(precondition_frequency=2, block_size=3, stagger=True, basis_method="cholesky_qr"), inject="b1",
        static_args=("block_size", "precondition_frequency"),
    ),
]
