"""Contract cases of the Kronecker-factored matrix preconditioners (Shampoo, SOAP).

Each case runs the refresh options too (one case per transformation keeps the suite's time in bounds; the
default configurations are checked against NumPy loops of the papers in tests/transforms/): Shampoo with
frequent, staggered coupled-Newton roots (two slots, one refreshed per step, so a root branch runs within the
contract's steps), SOAP in blocks of 3 (the toy's 4 x 3 matrix and 3 x 3 x 2 x 4 kernel get zero-padded blocks)
with staggered Cholesky-QR bases.

The storage options (issue 22) have a case each: Shampoo with 4-bit quantized statistics and roots and bfloat16 storage
of the rest, SOAP with 8-bit quantized bases and bfloat16 factors and moments. The toy's factors are 2 x 2 to 24 x 24,
below the paper's 4096 entries, so these quantizers take every matrix (``min_size=0``) in blocks of 2 (odd widths pad
a block and, at 4 bits, a nibble). Shampoo's case cuts the kernel into its 4 modes (``block_size=4``): merged to
18 x 4, its 18 x 18 statistic has a 14-dimensional null space after a step, where eigh may return any basis, and
programs compiled apart (the ``inject_hyperparams`` check) then quantize different bases to different codes (the
quantizer is discontinuous); docs/memory.md says so. SOAP's memory variants (issue 22, the paper's sec. 7) have one
case, staggered: the 4 x 3 matrix keeps the factor and basis of its 3-wide side only and Adafactor's row and column
accumulators (3 + 4 numbers) for its second moment; the rank-4 kernel keeps SOAP's two-sided layout.
"""

from __future__ import annotations

import optax_second_order as oso
from contract import ContractCase
from optax_second_order.curvature.quantize import Quantizer

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
    ContractCase(
        "shampoo-q4", oso.shampoo,
        dict(precondition_frequency=2, start_preconditioning_step=1, state_dtype="bfloat16", block_size=4,
             quantize=Quantizer(4, block_size=2, min_size=0)),
        inject="b1", static_args=("block_size",),
        # a quantized store rounds discontinuously: the hyperparameters' float32 rounding can store a neighbouring
        # 4-bit code (1.6e-5 against updates of 3e-3 at step 1)
        inject_rtol=2e-2,
    ),
    ContractCase(
        "soap-q8", oso.soap,
        dict(precondition_frequency=2, stagger=True, state_dtype="bfloat16", quantize=Quantizer(8, block_size=2, min_size=0)),
        inject="b1", static_args=("precondition_frequency",),
        # as shampoo-q4, a neighbouring 8-bit code of a basis (2.2e-5 against updates of 1.6e-2 at step 1)
        inject_rtol=1e-2,
    ),
    ContractCase(
        "soap-1s-fac", oso.soap,
        dict(precondition_frequency=2, stagger=True, one_sided=True, factorized_second_moment=True),
        inject="b1", static_args=("precondition_frequency",),
        # the injected alias differs from the plain one by more than SOAP's 1e-3 (measured at step 1 on the dense
        # leaf: 2.4e-4 one-sided alone, 1.4e-2 factorized alone, 1.9e-3 both). Not pinned down (open, docs/memory.md);
        # a guess: Adafactor's rank-1 v mixes the rounding-level coordinates of the factors' null space (a softmax
        # layer's gradient has one) with the others. The float64 loop of tests/transforms/test_soap.py agrees to 1e-10
        inject_rtol=2e-2,
        # the same amplification between the donated and the kept program: 96 ulps at step 2 once the whole-tree
        # checks got a kernel of their own (common.computed_once changed the fusions), 5.7e-6 relative
        donate_ulps=256,
    ),
]
