"""Runs every check of ``contract.py`` on every case of every ``tests/cases_*.py``.

Only your family's cases: ``CONTRACT_CASES=cases_mine .venv/bin/pytest -q tests/test_contract.py``.

A cases module that fails to import becomes one failing test naming it; the others still run.
The last tests show that the checks can fail: deliberately broken transformations must not pass.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import traceback

import jax
import jax.numpy as jnp
import optax
import pytest

import cases_optax as contract_cases_optax
import contract
import contract_flax
from contract import LEARNING_RATE, ContractCase
from optax_second_order.transforms.common import extra_arg

CHECKS = {**contract.CHECKS, **contract_flax.FLAX_CHECKS}


@pytest.fixture(autouse=True)
def float32():
    """x64 off around every test of this module (tests/conftest.py turns it on for the suite): the contract runs as
    users do, hyperparameters injected as float32 arrays and nothing promoted; ``check_masked`` turns it back on
    around itself. Per test, so any order of tests in a pytest-xdist worker sees the right mode; jit caches key on
    it, so a step compiled under one mode is never reused under the other."""
    with jax.enable_x64(False):
        yield


def _collect():
    """Cases of every ``tests/cases_*.py``, or only of the modules listed in ``$CONTRACT_CASES``."""
    only = os.environ.get("CONTRACT_CASES", "").replace(",", " ").split()
    cases, import_errors = [], {}
    for path in sorted(pathlib.Path(__file__).parent.glob("cases_*.py")):
        if only and path.stem not in only:
            continue
        try:
            module = importlib.import_module(path.stem)
            cases.extend(module.CASES)
        except Exception:  # reported by test_cases_module_imports
            import_errors[path.stem] = traceback.format_exc()
    return cases, import_errors


CASES, IMPORT_ERRORS = _collect()


def test_case_names_are_unique():
    names = [case.name for case in CASES]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


@pytest.mark.parametrize("module", sorted(IMPORT_ERRORS) or [None])
def test_cases_module_imports(module):
    assert module is None, f"{module}.py failed to import:\n{IMPORT_ERRORS.get(module)}"


# Failures of other libraries' transformations that this one cannot fix: strict, so a fixed release shows up.
UPSTREAM_FAILURES = {
    ("donate", "lbfgs"): "optax.scale_by_lbfgs's init puts one zeros tree in both diff_params_memory and "
    "diff_updates_memory",
}


def _group(case: ContractCase) -> pytest.MarkDecorator:
    """Under ``pytest -n 2 --dist loadgroup`` (the Makefile) every check of a case runs in one worker, so the plain
    run each check compares with (``contract._plain``, cached per process) compiles once, not once per worker."""
    return pytest.mark.xdist_group(case.name)


def _applies(check: str, case: ContractCase) -> bool:
    """``threads`` is about layer capture, the only state a trace of ``model_fn`` keeps: cases that capture layers."""
    return check != "threads" or case.uses_layers


@pytest.mark.parametrize(
    "check, case",
    [pytest.param(check, case, marks=_group(case), id=f"{check}-{case.name}")
     for check in CHECKS if check != "checkpoint" for case in CASES if _applies(check, case)],
)
def test_contract(check, case, request):
    if (check, case.name) in UPSTREAM_FAILURES:
        reason = UPSTREAM_FAILURES[check, case.name]
        request.applymarker(pytest.mark.xfail(reason=reason, raises=AssertionError, strict=True))
    CHECKS[check](case)


@pytest.mark.parametrize("case", [pytest.param(case, marks=_group(case), id=case.name) for case in CASES])
def test_contract_checkpoint(case, tmp_path):
    contract.check_checkpoint(case, tmp_path)


# ----------------------------------------------------------------------------------------------
# The checks can fail: each broken transformation below violates exactly one clause.


def _unnamed_error(learning_rate):
    """Needs value_fn but fails with a bare KeyError, as a keyword lookup would."""
    def update(updates, state, params=None, **extra):
        extra["value_fn"]
        return updates, state

    return optax.chain(optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update), optax.sgd(learning_rate))


def _ignores_learning_rate(learning_rate):
    return optax.sgd(LEARNING_RATE)


def _float32_updates(learning_rate):
    return optax.chain(optax.sgd(learning_rate), optax.stateless(lambda u, p: jax.tree.map(lambda x: x.astype(jnp.float32), u)))


def _skips_scalars(learning_rate):
    return optax.chain(optax.sgd(learning_rate), optax.stateless(lambda u, p: jax.tree.map(lambda x: x * (x.ndim > 0), u)))


def _named_error_for_value_fn(learning_rate):
    def update(updates, state, params=None, **extra):
        extra_arg(extra, "value_fn", "broken")
        return updates, state

    return optax.chain(optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update), optax.sgd(learning_rate))


def _shares_a_buffer(learning_rate):
    """Its init puts one array in two state leaves: donating the state donates that buffer twice."""
    def init(params):
        zero = jnp.zeros([], jnp.int32)
        return (zero, zero)

    def update(updates, state, params=None):
        return updates, state

    return optax.chain(optax.GradientTransformation(init, update), optax.sgd(learning_rate))


def _validates_eagerly(learning_rate, momentum=0.5):
    """Checks a hyperparameter with a Python comparison: a traced momentum cannot be compared."""
    if not 0 <= momentum < 1:
        raise ValueError("momentum must be in [0, 1)")
    return optax.sgd(learning_rate, momentum=momentum)


def _hides_arguments(learning_rate, **sgd_kwargs):
    """Passes hyperparameters through ``**kwargs``: inject_hyperparams cannot see or inject them."""
    return optax.sgd(learning_rate, **sgd_kwargs)


def _keyed_by_path(learning_rate):
    """Keeps a per-leaf state keyed by path strings: nnx.Optimizer's init and update trees have different paths."""
    def paths(tree):
        return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]

    def init(params):
        return {path: jnp.zeros([], jnp.int32) for path in paths(params)}

    def update(updates, state, params=None):
        return updates, {path: state[path] + 1 for path in paths(updates)}

    return optax.chain(optax.GradientTransformation(init, update), optax.sgd(learning_rate))


def _needs_flat_params(learning_rate):
    """Reads ``params["kernel"]``: works on the toy's flat dict, not on a linen module's nested params."""
    def update(updates, state, params=None):
        scale = 1.0 + 0.0 * jnp.sum(params["kernel"])
        return jax.tree.map(lambda u: u * scale, updates), state

    return optax.chain(optax.GradientTransformation(lambda p: optax.EmptyState(), update), optax.sgd(learning_rate))


_GLOBAL_CAPTURE: dict = {}


def _global_capture(learning_rate):
    """Keeps what it traces in a module-global dict, as a process-global recorder would."""
    def update(updates, state, params=None, **extra):
        _GLOBAL_CAPTURE["params"] = params
        extra["model_fn"](params)  # meets the other thread's trace here
        scale = 1.0 + 0.0 * _GLOBAL_CAPTURE["params"]["scale"]
        return jax.tree.map(lambda u: u * scale, updates), state

    return optax.chain(optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update), optax.sgd(learning_rate))


BROKEN = [
    ("missing_extra", ContractCase("unnamed_error", _unnamed_error, needs=("value_fn",))),
    ("missing_extra", ContractCase("undeclared", _named_error_for_value_fn, needs=())),
    ("missing_extra", ContractCase("misnamed", _named_error_for_value_fn, needs=("value_fn",))),
    ("inject_hyperparams", ContractCase("ignores_lr", _ignores_learning_rate)),
    ("inject_hyperparams", ContractCase("validates_eagerly", _validates_eagerly, inject="momentum")),
    ("inject_hyperparams", ContractCase("hides_arguments", _hides_arguments, dict(momentum=0.5), inject="momentum")),
    ("bf16", ContractCase("float32_updates", _float32_updates)),
    ("leaves", ContractCase("skips_scalars", _skips_scalars)),
    ("donate", ContractCase("shares_a_buffer", _shares_a_buffer)),
    ("nnx", ContractCase("keyed_by_path", _keyed_by_path)),
    ("linen", ContractCase("needs_flat_params", _needs_flat_params)),
    ("threads", ContractCase("global_capture", _global_capture, needs=("model_fn",))),
    ("nonfinite", ContractCase("propagates_nan", optax.adam)),
    ("masked", ContractCase("masked_value_fn", contract_cases_optax.polyak, needs=("value_fn",))),
]


@pytest.mark.parametrize("check, case", BROKEN, ids=[case.name for _, case in BROKEN])
def test_check_rejects_broken_transformation(check, case):
    with pytest.raises(AssertionError):
        CHECKS[check](case)


@pytest.mark.parametrize("check, case", BROKEN, ids=[case.name for _, case in BROKEN])
def test_broken_transformation_passes_the_plain_run(check, case):
    """Each broken transformation runs plainly (jit), so the check above fails for its own clause."""
    if check in ("missing_extra", "bf16", "leaves", "inject_hyperparams", "nonfinite"):
        pytest.skip("this clause is about the plain run itself")
    contract.check_jit(case)
