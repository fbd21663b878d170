"""One process of the multi-process tests (tests/test_multiprocess.py runs it; not a test module itself).

    python tests/multiprocess_worker.py single  OPTIMIZER OUT           # one process, one device: the reference
    python tests/multiprocess_worker.py worker  OPTIMIZER OUT ID PORT   # process ID of 2, 2 host devices each
    python tests/multiprocess_worker.py restore OPTIMIZER OUT DEVICES   # one process: the 2-process checkpoint on
                                                                        # a mesh of DEVICES host devices

A data-parallel run of 6 steps with the batch split over a global mesh of 4 devices (2 processes x 2), the
optimizer's block stacks split over the same axis, an orbax checkpoint after 3 steps written by both processes,
and the final parameters saved by process 0; ``restore`` reads that checkpoint onto another topology, laid out by
``oso.state_shardings``, and runs the last 3 steps.
"""

import os
import sys

MODE, OPTIMIZER, OUT = sys.argv[1:4]
DEVICES = {"single": 1, "worker": 2, "restore": int(sys.argv[4]) if MODE == "restore" else 1}[MODE]
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

jax.config.update("jax_enable_x64", True)
if MODE == "worker":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{sys.argv[5]}", num_processes=2, process_id=int(sys.argv[4]))

import orbax.checkpoint as ocp  # noqa: E402

import optax_second_order as oso  # noqa: E402

STEPS, CHECKPOINT_AT, BATCH = 6, 3, 32
rng = np.random.default_rng(0)
X, Y = rng.standard_normal((STEPS, BATCH, 8)), rng.standard_normal((STEPS, BATCH, 4))
INIT = {"w1": 0.3 * rng.standard_normal((8, 16)), "b1": np.zeros(16), "w2": 0.3 * rng.standard_normal((16, 4))}


def model(params, x):
    """Two tagged dense layers (K-FAC captures them; the others ignore the tags)."""
    return oso.kronecker.dense(jnp.tanh(oso.kronecker.dense(x, params["w1"], params["b1"])), params["w2"])


def loss(params, x, y):
    return oso.losses.squared_error(y)(model(params, x))


LAYERS = oso.kronecker.find_layers(lambda p: model(p, X[0]), INIT)
MAKERS = {
    "shampoo": lambda s: oso.shampoo(0.05, block_size=4, precondition_frequency=2, start_preconditioning_step=1,
                                     precondition_sharding=s),
    "soap": lambda s: oso.soap(0.01, block_size=4, precondition_frequency=2, stagger=True, precondition_sharding=s),
    "kfac": lambda s: oso.kfac(0.05, LAYERS, statistics_frequency=1, precondition_frequency=2, stagger=True,
                               precondition_sharding=s),
    "kbfgs": lambda s: oso.kbfgs(0.05, LAYERS, precondition_sharding=s),
    # Sophia-G's Gauss-Newton-Bartlett statistics with labels sampled from the model, over the global batch
    "sophia": lambda s: oso.sophia(0.05, statistics_frequency=2),
}


def place(mesh, value, spec):
    """A global array from each process's part of ``value`` (``spec`` splits its leading axis, or replicates it)."""
    sharding = NamedSharding(mesh, spec)
    if spec == P():
        return jax.make_array_from_process_local_data(sharding, value)
    rows = value.shape[0] // jax.process_count()
    local = value[jax.process_index() * rows:(jax.process_index() + 1) * rows]
    return jax.make_array_from_process_local_data(sharding, local, value.shape)


def steps(tx, params, state, mesh, first, last):
    @jax.jit
    def step(params, state, x, y):
        extra = dict(model_fn=lambda p: model(p, x), loss=oso.losses.squared_error(y))  # K-FAC's statistics
        u, state = tx.update(jax.grad(loss)(params, x, y), state, params, **extra)
        return optax.apply_updates(params, u), state

    for t in range(first, last):
        params, state = step(params, state, place(mesh, X[t], P("data")), place(mesh, Y[t], P("data")))
    return params, state


def host(tree):
    """Every (replicated) leaf as a NumPy array on this host."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


def main():
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    tx = MAKERS[OPTIMIZER](NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):
        params = jax.tree.map(lambda v: place(mesh, v, P()), INIT)
        checkpoints = ocp.StandardCheckpointer()
        if MODE == "restore":
            target = {"params": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), params)}
            target["state"] = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                           jax.eval_shape(tx.init, params), oso.state_shardings(tx, params))
            # the bank pads each group of blocks to a multiple of the devices, at its end: strict=False lets orbax
            # drop or add those padding units (zeros, which no step reads) when the device count changes
            restored = checkpoints.restore(os.path.join(OUT, "checkpoint"), target, strict=False)
            params, state = steps(tx, restored["params"], restored["state"], mesh, CHECKPOINT_AT, STEPS)
        else:
            params, state = steps(tx, params, tx.init(params), mesh, 0, CHECKPOINT_AT)
            if MODE == "worker":
                checkpoints.save(os.path.join(OUT, "checkpoint"), {"params": params, "state": state})
                checkpoints.wait_until_finished()
            params, state = steps(tx, params, state, mesh, CHECKPOINT_AT, STEPS)
        if jax.process_index() == 0:
            np.savez(os.path.join(OUT, f"{MODE}{DEVICES}.npz"), **host(params))
    print("DONE", MODE, jax.process_count(), jax.device_count())


main()
