"""The benchmark harness: outputs of a tiny run, the summary's arithmetic, the tasks themselves.

Independent references: scipy.optimize.rosen / rosen_der for Rosenbrock, the layer shapes of the issue
for the autoencoder, medians and minima recomputed here from the per-run JSON records for the table.
No timings are asserted.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import rosen, rosen_der

import optax_second_order as oso
from optax_second_order import curvature
from optax_second_order.bench import OPTIMIZERS, TASKS, get_task, npz_task
from optax_second_order.bench.__main__ import parse_args, run_benchmark
from optax_second_order.bench.report import best_runs
from optax_second_order.bench import runner
from optax_second_order.bench.runner import RunResult, make_step, run_one


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory):
    """A small, separable 3-class problem: the class shifts the mean of 5 features."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 80)
    x = rng.normal(size=(80, 5)) + 3.0 * np.eye(3, 5)[y]
    path = tmp_path_factory.mktemp("data") / "toy.npz"
    np.savez(path, x=x, y=y)
    return str(path)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, npz_path):
    """A 2-step run of sgd (and the automatically added adam) on rosenbrock-2 and the user-data task."""
    out = str(tmp_path_factory.mktemp("bench"))
    args = parse_args(
        ["--tasks", "rosenbrock-2", "--data", npz_path, "--optimizers", "sgd", "--steps", "2", "--out", out,
         "--lrs", "0.01,0.001", "--seeds", "2"]
    )
    paths = run_benchmark(args)
    with open(os.path.join(out, "results.json")) as f:
        record = json.load(f)
    with open(os.path.join(out, "results.md")) as f:
        table = f.read()
    return out, paths, record, table


def test_run_writes_json_markdown_and_plots(tiny_run):
    out, paths, record, table = tiny_run
    assert {"config", "targets", "summary", "runs"} <= set(record)
    assert sorted(record["summary"]) == ["data:toy", "rosenbrock-2"]
    # 2 tasks x 2 optimizers x 2 learning rates x 2 seeds, each evaluated at steps 0, 1, 2.
    assert len(record["runs"]) == 16
    assert all(r["steps"] == [0, 1, 2] for r in record["runs"])
    assert "## rosenbrock-2" in table and "## data:toy" in table and "| sgd |" in table
    for name in ("rosenbrock-2.png", "data_toy.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_ratio_column_uses_the_same_run_adam(tiny_run):
    _, _, record, table = tiny_run
    for task, rows in record["summary"].items():
        runs = [r for r in record["runs"] if r["task"] == task]
        median = {o: np.median([r["step_time"] for r in runs if r["optimizer"] == o]) for o in ("adam", "sgd")}
        row = {r["optimizer"]: r for r in rows}
        assert row["adam"]["step_time_ratio"] == pytest.approx(1.0)
        assert row["sgd"]["step_time_ratio"] == pytest.approx(median["sgd"] / median["adam"])
        assert f"| {row['sgd']['step_time_ratio']:.2f} | {1e3 * row['sgd']['mean_step_time']:.2f} |" in table


def test_state_ratio_counts_the_optimizer_state_against_the_params(tiny_run):
    """Adam keeps two moments (ratio 2 plus its counter and the injected learning rate); the table shows it."""
    params = {"w": jnp.zeros((50, 20), jnp.float32), "b": jnp.zeros(20, jnp.bfloat16)}
    state = optax.adam(1e-3).init(params)
    assert runner.state_bytes_ratio(state, params) == (2 * (4000 + 40) + 4) / (4000 + 40)
    _, _, record, table = tiny_run
    row = {r["optimizer"]: r for r in record["summary"]["data:toy"]}
    assert row["adam"]["state_ratio"] == pytest.approx(2.0, abs=0.05)
    assert f"| {row['adam']['state_ratio']:.2f} |" in table


def test_hlo_ops_count_the_lowered_program_and_show_next_to_compile_time(tiny_run):
    """The count is the StableHLO program's operations: a Python loop unrolls into the program (three times the
    body's ops), a lax.fori_loop does not (its body once); the table and the JSON carry it for every row."""
    def body(x):
        return jnp.sin(x) * 2.0 + 1.0

    def unrolled(x):
        for _ in range(3):
            x = body(x)
        return x

    x = jnp.ones(3)
    one = runner.hlo_op_count(jax.jit(body).lower(x))
    assert one >= 4  # sine, multiply, add and their constants
    assert runner.hlo_op_count(jax.jit(unrolled).lower(x)) == 3 * one
    looped = runner.hlo_op_count(jax.jit(lambda x: jax.lax.fori_loop(0, 3, lambda i, c: body(c), x)).lower(x))
    assert looped < 3 * one + 8
    assert runner.compiled_kernel_count(jax.jit(unrolled).lower(x).compile()) >= 1
    _, _, record, table = tiny_run
    for task, rows in record["summary"].items():
        for row in rows:
            runs = [r for r in record["runs"] if r["task"] == task and r["optimizer"] == row["optimizer"]]
            assert row["hlo_ops"] > 0 and {r["hlo_ops"] for r in runs} == {row["hlo_ops"]}
            assert row["kernels"] > 0
            assert f"| {row['hlo_ops']:d} | {row['state_ratio']:.2f} |" in table
    assert "| compile s | compile x adam | HLO ops | state / params |" in table


def test_default_target_is_adams_best_final_loss(tiny_run):
    _, _, record, _ = tiny_run
    for task, target in record["targets"].items():
        adam = [r for r in record["runs"] if r["task"] == task and r["optimizer"] == "adam"]
        by_lr = {lr: np.mean([r["final_loss"] for r in adam if r["learning_rate"] == lr]) for lr in (0.01, 0.001)}
        assert target == pytest.approx(min(by_lr.values()))


def test_user_data_task_reports_heldout_accuracy(tiny_run, npz_path):
    _, _, record, _ = tiny_run
    rows = record["summary"]["data:toy"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    task = npz_task(npz_path)
    assert task.heldout[0].shape == (12, 5)  # the last 15% of 80 rows
    assert task.eval_batch[0].shape == (68, 5)
    np.testing.assert_allclose(np.mean(task.eval_batch[0], axis=0), 0.0, atol=1e-5)  # standardized


def test_user_data_regression(tmp_path):
    path = tmp_path / "reg.npz"
    np.savez(path, x=np.ones((20, 2, 3)), y=np.zeros((20, 2), np.float32))
    task = npz_task(str(path))
    params = task.init(jax.random.key(0))
    assert task.apply(params, task.eval_batch[0]).shape == (17, 2)
    assert isinstance(task.loss(task.eval_batch[1]), curvature.losses.SquaredError)
    assert task.heldout is None


def test_best_runs_treats_divergence_as_worst():
    def run(lr, final):
        return RunResult("t", "o", lr, 0, [0], [0.0], [1.0], final, None, 1.0, 1.0, 0.0, not math.isfinite(final))

    results = [run(0.1, math.inf), run(0.01, 0.5), run(0.001, 0.7)]
    assert best_runs(results, "t", "o")[0].learning_rate == 0.01


def test_every_registered_optimizer_runs():
    """Each registry entry builds, compiles and takes 2 steps on rosenbrock-2 (float64) with the runner's extras."""
    task = get_task("rosenbrock-2")
    with jax.enable_x64(True):
        for name, spec in OPTIMIZERS.items():
            assert len(spec.learning_rates) == 3 and spec.description, name
            result = run_one(task, name, spec, spec.learning_rates[-1], seed=0, steps=2, eval_every=1)
            assert result.diverged or result.steps == [0, 1, 2], name


def test_step_donates_params_and_state():
    """The runner's step consumes params and state (as a tuned training loop does) and computes the
    same step as ``optax.apply_updates`` of ``tx.update`` on ``jax.grad`` of the batch loss."""
    task = get_task("rosenbrock-2")
    tx = optax.adam(0.1)
    with jax.enable_x64(True):
        batch = next(task.batches(0))
        params = task.init(jax.random.key(0))
        state = tx.init(params)
        new_params, _, value = make_step(task, tx)(params, state, batch)
        assert all(x.is_deleted() for x in jax.tree.leaves((params, state)))

        params = task.init(jax.random.key(0))
        grads = jax.grad(task.batch_loss)(params, batch)
        expected = optax.apply_updates(params, tx.update(grads, tx.init(params), params)[0])
        np.testing.assert_allclose(new_params["x"], expected["x"], rtol=1e-12)
        np.testing.assert_allclose(value, task.batch_loss(params, batch), rtol=1e-12)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_loss_decreases_under_adam(name):
    task = get_task(name)
    with jax.enable_x64(task.x64):
        result = run_one(task, "adam", OPTIMIZERS["adam"], 3e-3, seed=0, steps=3, eval_every=3)
    assert result.steps == [0, 3]
    assert result.losses[1] < result.losses[0]


@pytest.mark.parametrize("n", [2, 10])
def test_rosenbrock_matches_scipy(n):
    task = get_task(f"rosenbrock-{n}")
    rng = np.random.default_rng(n)
    with jax.enable_x64(True):
        start = task.init(jax.random.key(0))["x"]
        assert start.dtype == jnp.float64
        np.testing.assert_array_equal(start[:2], [-1.2, 1.0])
        value_fn = lambda p: task.batch_loss(p, task.eval_batch)  # noqa: E731
        value_and_grad = jax.jit(jax.value_and_grad(value_fn))
        for x in (rng.normal(size=n), np.asarray(start), np.ones(n)):
            value, grad = value_and_grad({"x": jnp.asarray(x)})
            np.testing.assert_allclose(value, rosen(x), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(grad["x"], rosen_der(x), rtol=1e-12, atol=1e-12)
        # The minimum: value and gradient vanish at (1, ..., 1) and the Gauss-Newton matrix J^T J is
        # positive definite there, as the Hessian of a zero-residual least-squares problem must be.
        ones = {"x": jnp.ones(n)}
        model_fn = lambda p: task.apply(p, None)  # noqa: E731
        loss = task.loss(task.eval_batch[1])
        gauss_newton = jax.jit(jax.vmap(lambda v: curvature.gnvp(model_fn, loss, ones, {"x": v})["x"]))(jnp.eye(n))
        np.testing.assert_allclose(gauss_newton, jax.jit(jax.hessian(value_fn))(ones)["x"]["x"], rtol=1e-12)
        assert np.linalg.eigvalsh(gauss_newton).min() > 0


def test_autoencoder_shape_and_data():
    task = get_task("digits-autoencoder")
    widths = [64, 1000, 500, 250, 30, 250, 500, 1000, 64]
    params = task.init(jax.random.key(0))
    assert sum(p.size for p in jax.tree.leaves(params)) == sum(a * b + b for a, b in zip(widths, widths[1:]))
    x, targets = task.eval_batch
    assert x.shape == (1797, 64) and float(x.min()) == 0.0 and float(x.max()) == 1.0
    np.testing.assert_array_equal(x, targets)
    assert next(task.batches(0))[0].shape == (512, 64)


def test_charlm_corpus_is_reproducible():
    first, second = get_task("stdlib-charlm"), get_task("stdlib-charlm")
    (x1, y1), (x2, y2) = next(first.batches(3)), next(second.batches(3))
    np.testing.assert_array_equal(x1, x2)
    assert x1.shape == (32, 64) and int(x1.max()) < 256
    np.testing.assert_array_equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one


def test_scanned_charlm_is_the_charlm_with_its_blocks_stacked():
    """``stdlib-charlm-scan``: the unrolled model's blocks, stacked on a leading axis under ``blocks``, give the same
    logits (nn.scan runs the same block); K-FAC's capture finds every Dense layer (the scanned ones stacked, 2 layers
    each) and Shampoo's ``layer_axes`` marks exactly the stacked leaves."""
    unrolled, scanned = get_task("stdlib-charlm"), get_task("stdlib-charlm-scan")
    params = unrolled.init(jax.random.key(0))["params"]
    blocks = [params.pop(f"Block_{l}") for l in range(2)]
    stacked = {"params": {**params, "blocks": {"Block_0": jax.tree.map(lambda *x: jnp.stack(x), *blocks)}}}
    tokens = unrolled.eval_batch[0][:4]
    np.testing.assert_allclose(scanned.apply(stacked, tokens),
                               unrolled.apply({"params": {**params, "Block_0": blocks[0], "Block_1": blocks[1]}}, tokens),
                               rtol=1e-5, atol=1e-5)
    layers = oso.flax.find_layers(lambda p: scanned.apply(p, tokens), stacked)
    assert [l.stack for l in layers.layers].count(2) == 4 and len(layers.layers) == 5
    assert not [name for name in layers.fallback if "Dense" in name]
    axes = jax.tree_util.tree_leaves_with_path(scanned.layer_axes(stacked), is_leaf=lambda x: x is None)
    assert {jax.tree_util.keystr(k) for k, a in axes if a == 0} == {
        jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(stacked) if "blocks" in jax.tree_util.keystr(k)}


def _in_git_checkout() -> bool:
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True).returncode == 0


@pytest.mark.skipif(not _in_git_checkout(), reason="ab needs a git checkout")
def test_ab_times_this_checkout_against_the_package_at_a_revision(tmp_path, capsys):
    import subprocess
    import sys

    import optax_second_order
    from optax_second_order.bench import ab

    # the package as committed at the revision, extracted apart from this checkout
    folder = ab.package_at("HEAD~1", str(tmp_path))
    for path in ("optax_second_order/__init__.py", "optax_second_order/transforms/shampoo.py"):
        shown = subprocess.run(["git", "show", f"HEAD~1:{path}"], capture_output=True, text=True,
                               cwd=os.path.dirname(__file__), check=True).stdout
        with open(os.path.join(folder, path)) as f:
            assert f.read() == shown
    with pytest.raises(SystemExit, match="ab: needs"):
        ab.package_at("no-such-revision", str(tmp_path))

    results = ab.main("HEAD", ["rosenbrock-2"], ["sgd"], repeats=1)
    assert set(results["rosenbrock-2"]) == {"adam tree", "sgd tree", "sgd HEAD"}
    assert all(t > 0 for t in results["rosenbrock-2"].values())
    assert "mean x adam" in capsys.readouterr().out
    # afterwards the package is this checkout's again
    import optax_second_order as again
    assert os.path.dirname(again.__file__) == os.path.dirname(optax_second_order.__file__)
    package_dir = os.path.dirname(optax_second_order.__file__)
    loaded = [m for name, m in list(sys.modules.items()) if name.startswith("optax_second_order")]
    assert all((getattr(m, "__file__", None) or package_dir).startswith(package_dir) for m in loaded)
