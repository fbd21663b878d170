"""Shared pieces: extra-argument errors, hyperparameter checks, the finite guards, the damping rules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_second_order as oso
from optax_second_order.curvature import blocking
from optax_second_order.transforms import common, damping

F32 = jnp.float32


def test_a_plain_callable_as_loss_is_a_type_error_that_says_how_to_build_one():
    with pytest.raises(TypeError, match="softmax_cross_entropy"):
        common.extra_arg({"loss": lambda y: jnp.sum(y)}, "loss", "scale_by_x")
    with pytest.raises(TypeError, match="got ndarray|got ArrayImpl"):
        common.extra_arg({"loss": np.zeros(3)}, "loss", "scale_by_x")


def test_a_non_scalar_value_fn_is_a_value_error():
    value_fn = common.extra_arg({"value_fn": lambda p: p * 2}, "value_fn", "scale_by_x")
    with pytest.raises(ValueError, match="scalar loss.*shape \\(3,\\)"):
        jax.eval_shape(value_fn, jnp.zeros(3))
    tx = oso.sophia(1e-3, estimator="hutchinson")
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="sophia.*scalar"):
        jax.eval_shape(lambda p: tx.update(p, tx.init(p), p, value_fn=lambda q: q["w"] ** 2), params)


def test_a_linen_model_fn_returning_its_mutated_state_is_a_type_error():
    tx = oso.sophia(1e-3, estimator="gnb")
    params = {"w": jnp.ones((3, 2))}
    loss = oso.losses.softmax_cross_entropy(jnp.zeros(4, jnp.int32))
    model_fn = lambda p: (jnp.ones((4, 3)) @ p["w"], {"batch_stats": {}})  # noqa: E731
    with pytest.raises(TypeError, match="mutable"):
        jax.eval_shape(lambda p: tx.update(p, tx.init(p), p, model_fn=model_fn, loss=loss), params)


def test_a_batch_mismatch_between_model_fn_and_loss_is_a_value_error():
    tx = oso.sophia(1e-3, estimator="gnb")
    params = {"w": jnp.ones((3, 2))}
    loss = oso.losses.softmax_cross_entropy(jnp.zeros(5, jnp.int32))  # another batch than the model's 4
    with pytest.raises(ValueError, match="do not match targets"):
        jax.eval_shape(lambda p: tx.update(p, tx.init(p), p, model_fn=lambda q: jnp.ones((4, 3)) @ q["w"], loss=loss),
                       params)


def test_check_skips_arrays_and_names_python_numbers():
    common.check("t", "b1", jnp.asarray(2.0), lambda x: x < 1, "< 1")  # an array (inject_hyperparams): unchecked
    with pytest.raises(ValueError, match="t: b1 must be < 1, got 2.0"):
        common.check("t", "b1", 2.0, lambda x: x < 1, "< 1")


def test_static_int_accepts_concrete_values_and_explains_traced_ones():
    assert common.static_int("t", "block_size", None, 1024) == 1024
    assert common.static_int("t", "block_size", jnp.asarray(8), 1024) == 8
    with pytest.raises(ValueError, match="block_size must be an integer >= 1, got 0"):
        common.static_int("t", "block_size", 0, 1024)
    with pytest.raises(TypeError, match="static_args"):
        jax.jit(lambda b: common.static_int("t", "block_size", b, 1024))(8)


def test_shape_arguments_under_inject_hyperparams_ask_for_static_args():
    params = {"w": jnp.ones((4, 3))}
    injected = optax.inject_hyperparams(oso.shampoo)(learning_rate=1e-2, block_size=2)
    state = injected.init(params)
    with pytest.raises(TypeError, match="static_args=\\('block_size',\\)"):
        jax.jit(injected.update)(params, state, params)
    fixed = optax.inject_hyperparams(oso.shampoo, static_args=("block_size",))(learning_rate=1e-2, block_size=2)
    jax.jit(fixed.update)(params, fixed.init(params), params)


def test_finite_ema_keeps_the_old_value_and_counts():
    old = {"a": jnp.ones(2), "b": jnp.zeros(())}
    new, bad = common.finite_ema(old, {"a": jnp.array([3.0, jnp.inf]), "b": jnp.ones(())}, 0.5)
    assert int(bad) == 1
    jax.tree.map(np.testing.assert_array_equal, new, old)
    new, bad = common.finite_ema(old, {"a": jnp.array([3.0, 5.0]), "b": jnp.ones(())}, 0.5)
    assert int(bad) == 0
    np.testing.assert_array_equal(new["a"], [2.0, 3.0])


def test_discard_nonfinite_matrices_zeroes_only_the_corrupt_ones_and_gives_the_largest_kept_entry():
    rng = np.random.default_rng(0)
    stack = rng.standard_normal((4, 3, 3))
    stack[1, 0, 2] = np.nan  # off the diagonal
    stack[3, 2, 1] = -np.inf
    single = rng.standard_normal((2, 2))
    (clean_stack, clean_single), largest = common.discard_nonfinite_matrices((jnp.asarray(stack), jnp.asarray(single)))
    expected = stack.copy()
    expected[[1, 3]] = 0.0
    np.testing.assert_array_equal(clean_stack, expected)
    np.testing.assert_array_equal(clean_single, single)
    assert float(largest) == np.abs(np.concatenate([stack[[0, 2]].ravel(), single.ravel()])).max()
    assert float(common.discard_nonfinite_matrices((jnp.full((2, 2), jnp.nan),))[1]) == 0.0


@pytest.mark.parametrize("decay, weight", [(1.0, 1.0), (0.95, 0.05)])
def test_gram_update_finite_is_false_for_bad_gradients_and_never_true_for_an_overflowing_factor(decay, weight):
    """Soundness against the factors computed in float32: wherever the check passes, every mode Gram update
    ``decay F + weight G_(i) G_(i)^T`` is finite; it fails for NaN/Inf gradients; and it passes for ordinary ones."""
    rng = np.random.default_rng(1)
    for scale in 10.0 ** np.arange(16, 21, 0.25):
        for factor_scale in (0.0, 1e30, 1e37, 3e38):
            g = (scale * rng.standard_normal((6, 5))).astype(np.float32)
            factor = np.float32(factor_scale) * np.ones((6, 6), np.float32)
            ok = common.gram_update_finite({"g": jnp.asarray(g)}, jnp.float32(factor_scale), decay, weight, F32)
            new = decay * jnp.asarray(factor) + weight * jnp.asarray(g) @ jnp.asarray(g).T
            if ok:
                assert np.all(np.isfinite(new)), (scale, factor_scale)
    g = jnp.ones((3, 2), jnp.float32)
    assert common.gram_update_finite({"g": g, "b": jnp.ones(3)}, jnp.float32(1e3), decay, weight, F32)
    for bad in (jnp.nan, jnp.inf):
        assert not common.gram_update_finite({"g": g.at[1, 1].set(bad)}, jnp.float32(1.0), decay, weight, F32)
    assert not common.gram_update_finite({"g": g * 1e20}, jnp.float32(1.0), decay, weight, F32)  # squares overflow
    assert common.gram_update_finite({}, jnp.float32(0.0), decay, weight, F32)


@pytest.mark.parametrize("decay, weight", [(1.0, 1.0), (0.95, 0.05)])
def test_gram_update_finite_holds_at_the_edge_of_overflow(decay, weight):
    """For random gradients scaled to the largest size the check accepts (bisection), the Gram matrices and the
    factor update computed in float32 are finite; in float64 storage the same gradients pass."""
    rng = np.random.default_rng(2)
    check = jax.jit(lambda g, f: common.gram_update_finite({"g": g}, f, decay, weight, F32))
    # one row (its Gram matrix is 1 x 1: ||G||^2 itself, summed in another order) or many
    for trial in range(16):
        direction = rng.standard_normal((1, int(rng.integers(3, 64))) if trial % 2 else (int(rng.integers(3, 40)), 5))
        direction /= np.linalg.norm(direction)
        factor = np.float32(rng.choice([0.0, 1e38]))
        low, high = 1e17, 1e20
        for _ in range(40):
            middle = np.sqrt(low * high)
            low, high = (middle, high) if check(jnp.asarray(direction * middle, jnp.float32), factor) else (low, middle)
        g = jnp.asarray(direction * low, jnp.float32)
        for mode in (0, 1):
            gram = blocking.batched_mode_gram(g[None], mode)
            assert np.all(np.isfinite(gram)) and np.all(np.isfinite(decay * factor + weight * gram)), (low, factor)
    assert common.gram_update_finite({"g": jnp.asarray(direction * 1e25)}, 0.0, decay, weight, jnp.float64)


def test_levenberg_marquardt_follows_the_rule_on_a_scripted_sequence():
    """rho > 3/4: shrink; rho < 1/4 (or -inf): grow; else keep; never below the floor."""
    rhos = [0.9, 0.5, 0.1, -2.0, 1.0, 0.8, 0.76, 0.24, 0.25, 0.75]
    lam, floor, expected = 1.0, 0.5, []
    for rho in rhos:
        lam = max(lam * 2 / 3 if rho > 0.75 else lam * 1.5 if rho < 0.25 else lam, floor)
        expected.append(lam)
    lam, got = jnp.asarray(1.0), []
    for rho in rhos:
        lam = damping.levenberg_marquardt(lam, jnp.asarray(rho), 2 / 3, 1.5, floor)
        got.append(float(lam))
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_reduction_ratio_fails_steps_the_model_does_not_predict_to_help():
    assert float(damping.reduction_ratio(jnp.asarray(-1.0), jnp.asarray(-2.0))) == 0.5
    for actual, predicted in [(-1.0, 0.0), (-1.0, 1.0), (jnp.nan, -1.0), (jnp.inf, -1.0), (-1.0, jnp.nan)]:
        assert float(damping.reduction_ratio(jnp.asarray(actual), jnp.asarray(predicted))) == -np.inf


def test_kl_clip_scale_bounds_the_quadratic_and_gives_no_step_for_garbage():
    lr, kl = 0.1, 1e-3
    rng = np.random.default_rng(0)
    g = {"a": rng.standard_normal(3), "b": rng.standard_normal((2, 2))}
    v = jax.tree.map(lambda x: x * 2.0, g)  # F = I / 2
    for scale in [1e-6, 1.0, 1e6, 1e20]:  # 1e20: v.g overflows float32, the step must not
        vs, gs = (jax.tree.map(lambda x: jnp.asarray(scale * x, jnp.float32), t) for t in (v, g))
        vg = scale**2 * sum(np.vdot(a, b) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(g)))
        nu = float(damping.kl_clip_scale(vs, gs, lr, kl))
        expected = min(1.0, np.sqrt(kl / (lr**2 * vg)))
        np.testing.assert_allclose(nu, expected, rtol=1e-5)
    for garbage in [-1.0, jnp.nan, jnp.inf]:
        vs = jax.tree.map(lambda x: garbage * jnp.asarray(x), v)
        assert float(damping.kl_clip_scale(vs, g, lr, kl)) == 0.0
    zeros = jax.tree.map(jnp.zeros_like, g)
    assert float(damping.kl_clip_scale(zeros, zeros, lr, kl)) == 0.0


@pytest.mark.parametrize("make", [
    lambda: oso.adam(1e-2), lambda: oso.sophia(1e-2, estimator="hutchinson"), lambda: oso.shampoo(1e-2),
    lambda: oso.soap(1e-2),
], ids=["adam", "sophia", "shampoo", "soap"])
def test_integer_leaves_are_named(make):
    """A step counter inside the params (its gradient is float0): an error that names the leaf."""
    params = {"w": jnp.ones((3, 2)), "step": jnp.zeros((), jnp.int32)}
    grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2), allow_int=True)(params)
    tx = make()
    with pytest.raises(TypeError, match="\\['step'\\]"):
        tx.update(grads, tx.init(params), params, value_fn=lambda p: jnp.sum(p["w"] ** 2))


ALIASES = {
    "adam": lambda **kw: oso.adam(**kw), "adagrad": lambda **kw: oso.adagrad(**kw),
    "adahessian": lambda **kw: oso.adahessian(**kw), "sophia": lambda **kw: oso.sophia(**kw),
    "shampoo": lambda **kw: oso.shampoo(**kw), "soap": lambda **kw: oso.soap(**kw),
}


@pytest.mark.parametrize("name", list(ALIASES))
@pytest.mark.parametrize("argument, value", [("learning_rate", 0.0), ("learning_rate", -1e-3), ("weight_decay", -0.1)])
def test_bad_values_at_construction_name_the_argument_and_show_the_value(name, argument, value):
    if argument == "weight_decay" and name in ("adam", "adagrad"):
        pytest.skip("no weight decay")
    kwargs = {"learning_rate": 1e-3, argument: value}
    with pytest.raises(ValueError, match=f"{argument} must be .*got {value!r}"):
        ALIASES[name](**kwargs)


def test_momentum_and_min_damping_are_checked():
    layers = oso.kronecker.find_layers(lambda p: oso.kronecker.dense(jnp.ones((2, 3)), p["w"]), {"w": jnp.ones((3, 2))})
    with pytest.raises(ValueError, match="momentum must be in \\[0, 1\\), got 1.5"):
        oso.kfac(0.1, layers, momentum=1.5)
    with pytest.raises(ValueError, match="b1"):
        oso.shampoo(0.1, b1=1.0)
    with pytest.raises(ValueError, match="min_damping must be >= 0"):
        oso.kfac(0.1, layers, min_damping=-1.0)
    with pytest.raises(ValueError, match="min_damping must be <= damping"):
        oso.kfac(0.1, layers, damping=1e-3, min_damping=1e-2)


def test_computed_once_is_its_input_bit_for_bit_and_a_kernel_of_its_own():
    values = [
        jnp.asarray(True), jnp.asarray(False), jnp.asarray(-0.0), jnp.asarray(jnp.nan), jnp.asarray(-jnp.inf),
        jnp.asarray([1.5, -2.0, jnp.nan, 0.0]), jnp.arange(6, dtype=jnp.int32).reshape(2, 3),
    ]
    for x in values:
        y = jax.jit(common.computed_once)(x)
        assert y.dtype == x.dtype and y.shape == x.shape
        assert np.asarray(y).tobytes() == np.asarray(x).tobytes()

    def scaled(xs):  # one scalar from every leaf, scaling every leaf
        s = sum(jnp.sum(x) for x in xs)
        return [x * common.computed_once(s) for x in xs]

    xs = [jnp.full((3 + i,), float(i)) for i in range(12)]
    text = jax.jit(scaled).lower(xs).compile().as_text()
    assert text.count(" add(") <= 2 * len(xs)  # the sum is formed once, not once per leaf's kernel
