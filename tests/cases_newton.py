"""Contract cases of the solve-based family (transforms/newton.py): every solver (dense, CG, row-space), the fixed and
Levenberg-Marquardt damping, the Hessian, GGN and sampled-Fisher curvatures, and HF's warm start, preconditioner,
progress rule and backtracking. ``levenberg_marquardt`` (GGN + CG + the LM rule) has no case of its own: ``newton_cg``
runs the rule and ``hessian_free`` the same GGN + CG path with it (each contract case costs about a minute of
compilation on 2 cores)."""

from __future__ import annotations

import optax_second_order as oso
from contract import ContractCase

CASES = [
    ContractCase("newton", oso.newton, dict(damping=0.1), needs=("value_fn",), inject="damping"),
    ContractCase(
        # the adapted damping lives in the state; min_damping applies at every update. A floor above the initial
        # damping (1.0) binds from the second step, so the injected value acts within the two steps compared
        "newton_cg", oso.newton_cg, dict(maxiter=20), needs=("value_fn",), inject="min_damping", injected_value=2.0,
    ),
    ContractCase(
        "gauss_newton-row_space", oso.gauss_newton, dict(solver="row_space", damping=0.1), needs=("model_fn", "loss"),
        inject="damping",
    ),
    ContractCase(
        # maxiter sizes the saved iterates and the progress history: static under inject_hyperparams
        "hessian_free", oso.hessian_free, dict(maxiter=30), needs=("value_fn", "model_fn", "loss"),
        inject="warm_start_decay", static_args=("maxiter",),
    ),
    ContractCase(
        "natural_gradient", oso.natural_gradient, dict(maxiter=20), needs=("model_fn", "loss"), inject="kl_budget",
        injected_value=1e-2,
    ),
]
