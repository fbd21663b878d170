"""Suite-wide settings.

Several modules compare against float64 dense references, and pytest imports every module of the
suite in each worker before running any test, so float64 ("x64") mode is on for the whole suite. It is
enabled here as well so that one file run alone behaves exactly as it does in the full run; the float32
and bfloat16 paths are exercised through explicit dtypes (see tests/contract.py).
"""

import jax

jax.config.update("jax_enable_x64", True)
