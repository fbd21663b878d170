"""Contract cases of the quasi-Newton family (transforms/quasi_newton.py, transforms/kbfgs.py and their aliases).

The line-search cases need ``value_fn`` (the contract passes ``value_fn``, ``model_fn`` and ``loss``, never
``value`` or ``grad``: the line search computes them). The zoom line search is slow to compile (a while loop of
interpolations; the backtracking one is not much cheaper), so one case uses a line search: the adapter
(``scale_by_linesearch``) is the same for every rule. ``scale_by_quasi_newton`` runs with a fixed learning rate
(``linesearch=None``, the stochastic mode, needing ``value_fn`` only with ``same_batch_pairs``) in two cases, the
Cholesky form (the one with a loop of rotations) and SR1 on ``B`` with same-batch pairs: the rules on ``H``
(BFGS, DFP, inverse SR1) differ from them only in their formulas, which the unit tests check. K-BFGS needs
``model_fn`` and ``loss``. Eight cases took about 9 CPU-minutes; these six keep the suite's time in bounds.
"""

from __future__ import annotations

import optax_second_order as oso
from contract import ContractCase

CASES = [
    ContractCase("lbfgs-zoom", oso.lbfgs, needs=("value_fn",), inject="curv_rtol", injected_value=0.1),
    ContractCase("bfgs_cholesky-fixed", oso.bfgs, dict(cholesky=True, linesearch=None), inject="min_cosine",
                 injected_value=0.99),
    ContractCase("sr1-same-batch", oso.sr1, dict(linesearch=None, same_batch_pairs=True), needs=("value_fn",),
                 inject="min_cosine", injected_value=0.99),
    ContractCase("lbfgs-same-batch", oso.lbfgs, dict(linesearch=None, same_batch_pairs=True), needs=("value_fn",),
                 inject="min_cosine", injected_value=0.99),
    ContractCase("kbfgs", oso.kbfgs, needs=("model_fn", "loss"), inject="damping", uses_layers=True),
    ContractCase("kbfgs-l", oso.kbfgs, dict(limited_memory=True), needs=("model_fn", "loss"), inject="pair_decay",
                 injected_value=0.2, uses_layers=True),
]
