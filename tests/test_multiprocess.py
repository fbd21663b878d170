"""Several processes: Shampoo, SOAP, K-FAC, K-BFGS and Sophia-G under ``jax.distributed.initialize`` (2 processes x 2 host devices, gloo
collectives, coordinator on 127.0.0.1), their block stacks split over the global mesh of 4, equal to one device (K-FAC's,
K-BFGS's and Sophia-G's curvature statistics are those of the global batch);
and the orbax checkpoint the two processes write, restored in one process on 1 device and on a 4-device mesh, continues
step for step. The processes run ``tests/multiprocess_worker.py``."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")
TIMEOUT = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(WORKER), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=WORKER.parents[1])


def _finish(process: subprocess.Popen) -> str:
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"worker timed out: {output[-3000:]}")
    if process.returncode != 0 and "gloo" in output.lower() and "not" in output.lower() and "DONE" not in output:
        pytest.skip(f"this jaxlib has no gloo CPU collectives: {output[-500:]}")
    assert process.returncode == 0 and "DONE" in output, output[-3000:]
    return output


@pytest.mark.parametrize("optimizer", ["shampoo", "soap", "kfac", "kbfgs", "sophia"])
def test_two_processes_equal_one_device_and_their_checkpoint_restores_on_other_topologies(optimizer, tmp_path):
    port = str(_free_port())
    workers = [_start("worker", optimizer, str(tmp_path), str(i), port) for i in range(2)]
    for w in workers:
        _finish(w)
    for args in (("single", optimizer, str(tmp_path)), ("restore", optimizer, str(tmp_path), "1"),
                 ("restore", optimizer, str(tmp_path), "4")):
        _finish(_start(*args))
    reference = np.load(tmp_path / "single1.npz")
    for run in ("worker2", "restore1", "restore4"):
        got = np.load(tmp_path / f"{run}.npz")
        for k in reference.files:
            np.testing.assert_allclose(got[k], reference[k], rtol=1e-10, atol=1e-12, err_msg=f"{run} {k}")
