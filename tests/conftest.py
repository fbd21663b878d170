"""Suite-wide settings.

Several modules compare against float64 dense references, and pytest imports every module of the
suite in each worker before running any test, so float64 ("x64") mode is on for the whole suite. It is
enabled here as well so that one file run alone behaves exactly as it does in the full run; the float32
and bfloat16 paths are exercised through explicit dtypes (see tests/contract.py).

XLA:CPU compiles fast here: LLVM at -O0 (``--xla_backend_optimization_level=0``) and the older fusion emitters
(``--xla_cpu_use_fusion_emitters=false``), set before any backend starts (flags already in ``XLA_FLAGS`` come after
and win). Most tests compile a step and run it a few times on a tiny problem, so compiling was most of the suite's
time: the unit tests took 20 min 10 s on a 2-core machine (CI's size), 14 min 45 s with -O0 alone, 5 min 35 s with both
(README.md, "Tests"). XLA's HLO passes (fusion, layout, the while loops and custom calls that tests inspect) run
as usual; the machine code is less optimized and may round differently from a user's build in the last bits (no
fused multiply-adds), within every test's tolerance. (The contract's ``donate`` check allows 4 ulps between a donated
and a non-donated step: the two compile apart and may round differently.)
"""

import os

_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = f"{_FAST_COMPILE} {os.environ.get('XLA_FLAGS', '')}".strip()

import jax  # noqa: E402 (after XLA_FLAGS)

jax.config.update("jax_enable_x64", True)
