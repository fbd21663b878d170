"""The library limits the OpenBLAS behind XLA:CPU's LAPACK kernels to one thread, unless the user set the threads.

Each case runs in a fresh interpreter: the limit is process-wide and applied once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from optax_second_order.curvature.threads import USER_THREAD_VARIABLES

_SCRIPT = """
import json, jax, jax.numpy as jnp, threadpoolctl
import optax_second_order as oso
before = {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"}
stack = jnp.stack([jnp.eye(4) * (i + 1.0) for i in range(3)])
jax.jit(lambda m: oso.inverse_pth_root(m, 4))(stack)
after = {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"}
print(json.dumps({"limited": oso.curvature.threads.one_lapack_thread(), "after": after}))
"""


def _run(**env_overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in USER_THREAD_VARIABLES}
    env.update(env_overrides)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_first_factorization_limits_scipys_openblas_to_one_thread():
    result = _run()
    assert result["limited"], "no BLAS library was limited"
    for path in result["limited"]:
        assert result["after"][path] == 1, result
        assert "numpy" not in os.path.basename(os.path.dirname(path)), "numpy's own OpenBLAS is not jaxlib's"


@pytest.mark.parametrize("variable", USER_THREAD_VARIABLES)
def test_a_users_thread_setting_is_left_alone(variable):
    result = _run(**{variable: "2"})
    assert result["limited"] == []
