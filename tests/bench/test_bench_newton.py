"""``bench newton-rosenbrock``: the scipy harness reproduces scipy's own counts, and the library's Newton-CG reaches
``||g|| < 1e-6`` with fewer Hessian-vector products than scipy's Newton-CG (counts, not timings); ``bench newton-kl``
reports the realized KL of the natural-gradient rows it names.

Independent references: ``scipy.optimize.minimize``'s ``nit`` / ``nhev`` for trust-ncg with ``gtol=1e-6`` (the
harness counts the same calls itself), ``scipy.optimize.rosen_der`` for the final gradient.
"""

import jax
import numpy as np
import pytest
from scipy.optimize import minimize, rosen, rosen_der, rosen_hess_prod

import optax_second_order as oso
from optax_second_order.bench.newton import minimize as oso_minimize
from optax_second_order.bench.newton import scipy_minimize


def test_scipy_harness_counts_what_scipy_reports():
    start = np.where(np.arange(10) % 2 == 0, -1.2, 1.0)
    result = minimize(rosen, start, method="trust-ncg", jac=rosen_der, hessp=rosen_hess_prod, options={"gtol": 1e-6})
    counted = scipy_minimize("trust-ncg", 10)
    assert counted["converged"] and np.linalg.norm(rosen_der(result.x)) < 1e-6
    assert counted["iterations"] == result.nit
    # stopped from the callback at the same point; scipy's own count includes one more product and evaluation
    assert 0 <= result.nhev - counted["products"] <= 1 and 0 <= result.nfev - counted["f"] <= 1


@pytest.mark.parametrize("n", [2, 10])
def test_newton_cg_needs_fewer_products_than_scipy_newton_cg(n):
    ours = oso_minimize(oso.newton_cg(1.0), n)
    scipy = scipy_minimize("Newton-CG", n)
    assert ours["converged"] and scipy["converged"]
    assert ours["nonfinite"] == 0
    assert ours["products"] < scipy["products"], (ours, scipy)


def test_newton_kl_rows_measure_the_realized_kl():
    """``bench newton-kl`` on one seed and budget: every row, the default within its 5% band of the budget, the former
    default (one sampled target, second order only) far above it -- the figures the natural-gradient page reports."""
    from optax_second_order.bench.newton import KL_METHODS, natural_gradient_kl

    rows = {r["method"]: r for r in natural_gradient_kl(budgets=(1e-3,), seeds=range(1))}
    assert list(rows) == list(KL_METHODS)
    assert rows["default (exact Fisher, realized-KL correction)"]["ratios"][0] == pytest.approx(1.0, abs=0.05)
    assert rows["sampled Fisher (1 sample), second order only: the former default"]["ratios"][0] > 10
