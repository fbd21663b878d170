"""Shampoo's root computation on 1 vs N devices: ``python -m optax_second_order.bench shampoo-roots``.

Shampoo's cost is its inverse roots. :func:`optax_second_order.scale_by_shampoo` stacks the factors of
equal size and, given a ``mesh``, computes the roots of a stack under ``jax.shard_map`` with the stack
split along the mesh: each device decomposes ``n / devices`` factors. This module times exactly that
code path (a stack of ``num_blocks`` random SPD ``block_size x block_size`` factors, ``p = 4``) on a
mesh of all local devices, once per device count, each in a fresh process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (the flag must be set before JAX starts).

On a CPU, forced host devices share the machine's cores, so the speed-up is bounded by the number of
cores (a single LAPACK ``syevd`` call per device runs on one thread); on a multi-GPU or TPU host the
same code spreads the stack over real accelerators.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time

__all__ = ["measure", "main"]


def measure(num_blocks: int = 32, block_size: int = 128, repeats: int = 5) -> dict:
    """Median seconds of one jitted root computation of the stack on a mesh of all local devices."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    from optax_second_order.curvature.matrix import inverse_pth_root
    from optax_second_order.transforms.shampoo import _sharded

    mesh = Mesh(np.array(jax.devices()), ("blocks",))
    x = jax.random.normal(jax.random.PRNGKey(0), (num_blocks, block_size, 2 * block_size))
    stack = jnp.einsum("nij,nkj->nik", x, x) / (2 * block_size)
    fn = functools.partial(inverse_pth_root, p=4.0, eps=1e-12, relative_eps=1e-6)
    roots = jax.jit(lambda h: _sharded(fn, h, mesh, ("blocks",)))
    jax.block_until_ready(roots(stack))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(roots(stack))
        times.append(time.perf_counter() - start)
    return {"devices": jax.device_count(), "seconds": float(np.median(times)), "num_blocks": num_blocks,
            "block_size": block_size}


def _in_subprocess(devices: int, num_blocks: int, block_size: int, repeats: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    code = (f"import json; from optax_second_order.bench.shampoo_roots import measure; "
            f"print(json.dumps(measure({num_blocks}, {block_size}, {repeats})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(device_counts=(1, 4), num_blocks: int = 32, block_size: int = 128, repeats: int = 5) -> list[dict]:
    """Print a markdown table of the root time per host-device count, and return its rows."""
    rows = [_in_subprocess(n, num_blocks, block_size, repeats) for n in device_counts]
    base = rows[0]["seconds"]
    print(f"Shampoo roots: {num_blocks} factors of {block_size} x {block_size}, p = 4, CPU host devices "
          f"({os.cpu_count()} cores)\n")
    print("| host devices | root time (ms) | speed-up |\n|---|---|---|")
    for row in rows:
        print(f"| {row['devices']} | {1e3 * row['seconds']:.1f} | {base / row['seconds']:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
