"""Suite-wide settings.

Precision. Users run float32 with x64 off, where hyperparameters passed as arrays (``optax.inject_hyperparams``)
are float32 and nothing is promoted; a float64 suite hides float32 rounding and promotion (issue 23: SOAP's step
picked a basis by rounding, which only float32 made large enough to see through the injected alias). The shared
contract (``tests/test_contract.py``) therefore runs with x64 off around every test (its ``float32`` fixture, a
``jax.enable_x64(False)`` context per test: right under any order pytest-xdist gives a worker, and jit caches key on
the mode), and only its ``masked`` check, which compares two programs to their rounding, turns x64 on around itself.

x64 stays on as the suite-wide default for the other modules: many compare against float64 dense or NumPy
references and build float64 arrays at import time (pytest imports every module of the suite in each worker before
running any test, so a module-level ``jnp.asarray`` of float64 data needs x64 on at import). Moving them to float32
by default, with ``jax.enable_x64(True)`` scoped to the reference comparisons (as ``tests/transforms/test_soap.py``
already scopes it per module), is what is left of issue 23's item 1. It is enabled here as well so that one file run
alone behaves exactly as it does in the full run.

XLA:CPU compiles fast here: LLVM at -O0 (``--xla_backend_optimization_level=0``) and the older fusion emitters
(``--xla_cpu_use_fusion_emitters=false``), set before any backend starts (flags already in ``XLA_FLAGS`` come after
and win). Most tests compile a step and run it a few times on a tiny problem, so compiling was most of the suite's
time: the unit tests took 20 min 10 s on a 2-core machine (CI's size), 14 min 45 s with -O0 alone, 5 min 35 s with both
(README.md, "Tests"). XLA's HLO passes (fusion, layout, the while loops and custom calls that tests inspect) run
as usual; the machine code is less optimized and may round differently from a user's build in the last bits (no
fused multiply-adds), within every test's tolerance. (The contract's ``donate`` check allows 16 ulps between a donated
and a non-donated step: the two compile apart and may round differently.)
"""

import os

_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = f"{_FAST_COMPILE} {os.environ.get('XLA_FLAGS', '')}".strip()

import jax  # noqa: E402 (after XLA_FLAGS)

jax.config.update("jax_enable_x64", True)
