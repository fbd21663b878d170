"""The top-level namespace shows the public API only, and every alias has an explicit signature."""

import inspect

import optax_second_order as oso

ALIASES = [oso.adam, oso.adagrad, oso.adahessian, oso.sophia, oso.shampoo, oso.soap, oso.kfac]
ALIASES += [oso.bfgs, oso.dfp, oso.sr1, oso.lbfgs, oso.kbfgs]


def test_namespace_has_no_internals():
    public = {name for name in dir(oso) if not name.startswith("_")}
    for internal in ("extra_arg", "stat_dtype", "common", "optax_second_order", "aliases", "require_params",
                     "is_refresh_step", "blocking"):
        assert internal not in public, internal
    assert set(oso.__all__) <= public
    assert {"hvp", "gnvp", "kfac", "scale_by_kfac", "losses", "kronecker", "capture", "flax"} <= public
    assert {"bfgs", "lbfgs", "kbfgs", "scale_by_quasi_newton", "scale_by_lbfgs", "scale_by_kbfgs"} <= public


def test_aliases_hide_no_arguments():
    for alias in ALIASES:
        kinds = {p.kind for p in inspect.signature(alias).parameters.values()}
        assert inspect.Parameter.VAR_KEYWORD not in kinds, alias.__name__
        assert "learning_rate" in inspect.signature(alias).parameters, alias.__name__


def test_one_name_per_concept():
    """b1/b2, statistics_frequency, precondition_frequency, max_precond_dim, precondition_sharding."""
    names = {n for alias in ALIASES for n in inspect.signature(alias).parameters}
    for old in ("beta1", "beta2", "refresh_every", "inverse_frequency", "max_preconditioned_dim", "mesh",
                "mesh_axes", "inverse_sharding", "graft_beta2"):
        assert old not in names, old
    assert {"b1", "b2", "statistics_frequency", "precondition_frequency", "max_precond_dim",
            "precondition_sharding"} <= names
