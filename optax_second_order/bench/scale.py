"""Sharded optimizer state on 1, 2, 4 and 8 devices: ``python -m optax_second_order.bench scale``.

For each task (default ``digits-autoencoder`` and ``stdlib-charlm``) and device count ``d`` this runs, in a fresh
process started with ``XLA_FLAGS=--xla_force_host_platform_device_count=d`` (the flag must be set before JAX
starts), a data-parallel jitted step (the batch split over a mesh axis ``"data"`` of ``d`` devices, the parameters
replicated) of Adam and of the Kronecker methods (Shampoo, SOAP, K-FAC) with ``precondition_sharding`` over that axis, and reports:

* the optimizer state's bytes held by one device (device 0), and the Kronecker block stacks' share of it against
  ``total / d`` (the goal: within 1.25x);
* the mean step time over a full refresh window (amortized: every refresh of the window included) and its ratio to
  the one-device step of the same method;
* the bytes the compiled step's collectives move (all-gather, all-reduce, reduce-scatter, all-to-all,
  collective-permute: the sum of their results' sizes, each op counted once, so refresh branches count even on steps
  that skip them).

On a CPU the simulated devices share the machine's cores, so the step time measures the overhead of sharding,
not a speed-up; on a multi-GPU or TPU host the same code spreads the blocks over real accelerators.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

__all__ = ["measure", "main", "collective_bytes"]

DEVICE_COUNTS = (1, 2, 4, 8)
TASKS = ("digits-autoencoder", "stdlib-charlm")
STEPS = 20  # two refresh windows of the registry's precondition_frequency=10
_DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "s64": 8}
_COLLECTIVE = re.compile(r"=\s*(.*?)\s(?:all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")


def _makers(sharding, task):
    """The registry's Shampoo, SOAP and K-FAC settings (bench/optimizers.py) with their state split over
    ``sharding``."""
    import optax

    import optax_second_order as oso
    from optax_second_order.bench import optimizers

    return {
        "adam": optax.adam(1e-3),
        "shampoo": oso.shampoo(1e-3, precondition_frequency=10, block_size=128, stagger=True,
                               precondition_sharding=sharding),
        "soap": oso.soap(1e-3, precondition_frequency=10, block_size=128, stagger=True, precondition_sharding=sharding),
        "kfac": optimizers._kfac(0.1, task, statistics_frequency=10, seed=0, precondition_sharding=sharding,
                                 **optimizers._KFAC),
    }


def collective_bytes(hlo: str) -> int:
    """The bytes of the results of every collective op in a compiled HLO module's text (each op once)."""
    total = 0
    for shapes in _COLLECTIVE.findall(hlo):
        for dtype, dims in re.findall(r"([a-z0-9]+)\[([0-9,]*)\]", shapes):
            size = 1
            for d in filter(None, dims.split(",")):
                size *= int(d)
            total += size * _DTYPE_BYTES.get(dtype, 4)
    return total


def _stack_leaves(state) -> list:
    """The factor bank's stacks in a chained Shampoo, SOAP or K-FAC state."""
    import jax

    import optax_second_order as oso

    kinds = (oso.ShampooState, oso.SoapState, oso.KFACState)
    for inner in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kinds)):
        if isinstance(inner, oso.ShampooState):
            return jax.tree.leaves((inner.stats, inner.roots))
        if isinstance(inner, oso.SoapState):
            return jax.tree.leaves((inner.factors, inner.bases, inner.mu[0], inner.nu[0]))
        if isinstance(inner, oso.KFACState):
            return jax.tree.leaves((inner.factors, inner.preconditioners, inner.scales))
    return []


def measure(task_name: str, steps: int = STEPS) -> list[dict]:
    """One row per method for the devices of this process: bytes on device 0, mean step, collective bytes."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import optax_second_order as oso
    from optax_second_order.bench.tasks import get_task

    task = get_task(task_name)
    devices = jax.device_count()
    # Auto axes: the tasks' models carry no sharding annotations (under Explicit axes the char LM's embedding lookup
    # with a batch-split index array needs an out_sharding); the optimizers run on both kinds (tests/curvature/test_bank.py)
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = []
    with jax.set_mesh(mesh):
        split = NamedSharding(mesh, P("data"))
        for name, tx in _makers(split if devices > 1 else None, task).items():
            params = jax.device_put(task.init(jax.random.key(0)), NamedSharding(mesh, P()))
            batches = task.batches(0)
            state = tx.init(params)

            def step(params, state, batch, tx=tx):
                inputs, targets = batch
                loss = task.loss(targets)
                model_fn = lambda p: task.apply(p, inputs)  # noqa: E731 (K-FAC's statistics pass)
                grads = jax.grad(lambda p: loss(model_fn(p)))(params)
                updates, state = tx.update(grads, state, params, model_fn=model_fn, loss=loss)
                return jax.tree.map(lambda p, u: p + u, params, updates), state

            batch = jax.device_put(next(batches), split)
            # the state keeps init's layout (oso.state_shardings): on an Auto mesh XLA would otherwise be free to
            # return the per-parameter state (Adam's moments, Shampoo's graft) split like the gradient's blocks
            layout = (jax.tree.map(lambda a: a.sharding, params), oso.state_shardings(tx, params))
            start = time.perf_counter()
            compiled = jax.jit(step, donate_argnums=(0, 1), out_shardings=layout).lower(params, state, batch).compile()
            compile_seconds = time.perf_counter() - start
            params, state = compiled(params, state, batch)  # the first call (every refresh of SOAP's first step)
            jax.block_until_ready(state)
            start = time.perf_counter()
            for _ in range(steps):
                params, state = compiled(params, state, jax.device_put(next(batches), split))
            jax.block_until_ready(state)
            mean = (time.perf_counter() - start) / steps
            first = jax.devices()[0]

            def on_first(leaves):
                return sum(s.data.nbytes for a in leaves for s in a.addressable_shards if s.device == first)

            stacks = _stack_leaves(state)
            rows.append({
                "task": task_name, "optimizer": name, "devices": devices, "mean_step_s": mean,
                "compile_s": compile_seconds,
                "param_bytes": int(sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(params))),
                "state_bytes": int(sum(a.nbytes for a in jax.tree.leaves(state))),
                "state_bytes_device0": int(on_first(jax.tree.leaves(state))),
                "stack_bytes": int(sum(a.nbytes for a in stacks)), "stack_bytes_device0": int(on_first(stacks)),
                "collective_bytes": collective_bytes(compiled.as_text()),
            })
    return rows


def _in_subprocess(devices: int, task: str, steps: int) -> list[dict]:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    code = (f"import json; from optax_second_order.bench.scale import measure; "
            f"print(json.dumps(measure({task!r}, {steps})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bench scale, {task} on {devices} devices:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    """The markdown table: per task, method and device count, bytes on device 0 and step time against 1 device."""
    one = {(r["task"], r["optimizer"]): r for r in rows if r["devices"] == 1}
    lines = ["| task | method | devices | state on device 0 (KiB) | block stacks on device 0 / (total / d) | "
             "mean step (ms) | step / 1 device | collectives (KiB per step program) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        stacks = (f"{r['stack_bytes_device0'] * r['devices'] / r['stack_bytes']:.2f}" if r["stack_bytes"] else "-")
        base = one.get((r["task"], r["optimizer"]))
        ratio = f"{r['mean_step_s'] / base['mean_step_s']:.2f}" if base else "-"
        lines.append(f"| {r['task']} | {r['optimizer']} | {r['devices']} | {r['state_bytes_device0'] / 1024:.0f} | "
                     f"{stacks} | {1e3 * r['mean_step_s']:.1f} | {ratio} | {r['collective_bytes'] / 1024:.0f} |")
    return "\n".join(lines) + "\n"


def main(out: str, tasks=TASKS, device_counts=DEVICE_COUNTS, steps: int = STEPS) -> list[dict]:
    """Measure every task on every device count (one process each); print and write the table and the JSON."""
    rows = [row for task in tasks for d in device_counts for row in _in_subprocess(d, task, steps)]
    text = table(rows)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "scale.json"), "w") as f:
        json.dump({"rows": rows, "cpu_count": os.cpu_count()}, f, indent=1)
    with open(os.path.join(out, "scale.md"), "w") as f:
        f.write(text)
    print(text)
    return rows
