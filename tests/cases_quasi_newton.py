"""Contract cases of the quasi-Newton family (transforms/quasi_newton.py, transforms/kbfgs.py and their aliases).

The line-search cases need ``value_fn`` (the contract passes ``value_fn``, ``model_fn`` and ``loss``, never
``value`` or ``grad``: the line search computes them). The zoom line search is slow to compile (a while loop of
interpolations; the backtracking one is not much cheaper), so two cases use a line search, one for each
line search the aliases default to (zoom for L-BFGS, Moré-Thuente for BFGS): the adapter (``scale_by_linesearch``) is the
same for every rule. ``scale_by_quasi_newton`` runs with a fixed learning rate
(``linesearch=None``, the stochastic mode) in one case, the Cholesky form (the one with a loop of rotations) with
same-batch pairs (needing ``value_fn``): the other rules (SR1 on ``B``, BFGS, DFP and inverse SR1 on ``H``) differ
from it only in their formulas, which the unit tests check against scipy and NumPy. K-BFGS needs ``model_fn`` and
``loss``; K-BFGS(L) differs from it in the ``H_g`` memory, checked against a NumPy loop of the paper in the unit
tests. Eight cases took about 9 CPU-minutes; these five keep the suite's time in bounds.
"""

from __future__ import annotations

import optax_second_order as oso
from contract import ContractCase

CASES = [
    ContractCase("lbfgs-zoom", oso.lbfgs, needs=("value_fn",), inject="curv_rtol", injected_value=0.1),
    ContractCase("bfgs-more-thuente", oso.bfgs, needs=("value_fn",), inject="curv_rtol", injected_value=0.1),
    ContractCase("bfgs_cholesky-same-batch", oso.bfgs, dict(cholesky=True, linesearch=None, same_batch_pairs=True),
                 needs=("value_fn",), inject="min_cosine", injected_value=0.99),
    ContractCase("lbfgs-same-batch", oso.lbfgs, dict(linesearch=None, same_batch_pairs=True), needs=("value_fn",),
                 inject="min_cosine", injected_value=0.99),
    ContractCase("kbfgs", oso.kbfgs, needs=("model_fn", "loss"), inject="damping", uses_layers=True),
]
