"""Storage options of Shampoo, SOAP and K-FAC (issue 22): ``state_dtype`` and ``quantize`` store what they say, shrink the
state, stay close to the float32 run, and a corrupt quantized state restarts instead of poisoning the run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_second_order as oso
from optax_second_order.curvature import quantize as qz
from optax_second_order.curvature.quantize import Eigenpairs, Quantized, Quantizer, SymmetricQuantized


def problem():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(0.3 * rng.standard_normal((72, 80)), jnp.float32), "b": jnp.zeros(80, jnp.float32)}
    x = jnp.asarray(rng.standard_normal((96, 72)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((96, 80)), jnp.float32)

    def loss(p):
        return jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) - y) ** 2)

    return params, loss


def run(tx, steps=12):
    params, loss = problem()
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value

    values = []
    for _ in range(steps):
        params, state, value = step(params, state)
        values.append(float(value))
    return params, state, values


SHAMPOO = dict(precondition_frequency=2, start_preconditioning_step=2, block_size=64)
SOAP = dict(precondition_frequency=2, block_size=64)


def test_shampoo_stores_quantized_eigenpairs_and_roots():
    _, state, values = run(oso.shampoo(1e-2, quantize=4, **SHAMPOO))
    inner = state[0]
    for stats, root in zip(inner.stats, inner.roots):
        assert isinstance(stats, Eigenpairs) and isinstance(root, SymmetricQuantized)
        assert stats.vectors.codes.dtype == jnp.uint8 and stats.vectors.codes.shape[-1] == 32  # 64 wide, packed
        assert stats.values.dtype == jnp.float32 and root.diagonal.dtype == jnp.float32
        assert np.all(np.asarray(stats.values) >= 0)
    assert int(inner.nonfinite) == 0 and int(inner.root_failures) == 0
    dense = run(oso.shampoo(1e-2, **SHAMPOO))
    assert qz.nbytes(state) < 0.55 * qz.nbytes(dense[1])
    # 4-bit Shampoo follows float32 Shampoo: the loss after 12 steps within 1% (issue 22's bound; measured 0.6%)
    assert abs(values[-1] - dense[2][-1]) <= 0.01 * dense[2][-1]


def test_shampoo_quantized_roots_are_close_to_the_float32_roots():
    """One statistics step and one root from the same gradient: the 8-bit root (from the quantized eigenpairs, 4
    Björck steps) is within 1% of the float32 root."""
    kw = dict(precondition_frequency=1, start_preconditioning_step=1, block_size=64)
    _, dense, _ = run(oso.shampoo(1e-2, **kw), steps=1)
    _, quant, _ = run(oso.shampoo(1e-2, quantize=8, **kw), steps=1)
    storage = qz.FactorStorage(jnp.float32, jnp.float32, Quantizer(8))
    for exact, stored in zip(dense[0].roots, quant[0].roots):
        root = np.asarray(storage.load_symmetric(stored))
        assert np.linalg.norm(root - np.asarray(exact)) <= 0.01 * np.linalg.norm(np.asarray(exact))


def test_state_dtype_stores_bfloat16_and_computes_float32():
    params, state, values = run(oso.shampoo(1e-2, state_dtype="bfloat16", **SHAMPOO))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((state[0].stats, state[0].roots)))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state[1]))  # the momentum
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state[0].diagonal))  # the graft's v stays float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    _, soap_state, soap_values = run(oso.soap(3e-3, state_dtype=jnp.bfloat16, **SOAP))
    inner = soap_state[0]
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((inner.mu, inner.nu, inner.factors, inner.bases)))
    _, _, dense = run(oso.soap(3e-3, **SOAP))
    assert abs(soap_values[-1] - dense[-1]) <= 0.01 * dense[-1]  # measured 0.07%


@pytest.mark.parametrize("quantizer", [Quantizer(4), Quantizer(8, rectify=0)])
def test_soap_quantized_bases_follow_float32_soap(quantizer):
    _, state, values = run(oso.soap(3e-3, quantize=quantizer, **SOAP))
    assert all(isinstance(q, Quantized) for q in state[0].bases)
    assert int(state[0].nonfinite) == 0 and int(state[0].basis_failures) == 0
    _, dense_state, dense = run(oso.soap(3e-3, **SOAP))
    assert abs(values[-1] - dense[-1]) <= 0.01 * dense[-1]  # measured 0.6% (4-bit, lower), 0.07% (8-bit)
    assert qz.nbytes(state[0].bases) < 0.3 * qz.nbytes(dense_state[0].bases)


def test_a_corrupt_quantized_statistic_restarts():
    tx = oso.shampoo(1e-2, quantize=4, **SHAMPOO)
    params, loss = problem()
    _, state, _ = run(tx, steps=3)
    inner = state[0]
    bad = inner.stats[0]._replace(values=inner.stats[0].values.at[0, 0].set(jnp.nan))
    state = (inner._replace(stats=(bad, *inner.stats[1:])), *state[1:])
    updates, new = jax.jit(tx.update)(jax.grad(loss)(params), state, params)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(updates))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(new) if jnp.issubdtype(x.dtype, jnp.inexact))


def test_bad_options_name_the_argument():
    with pytest.raises(ValueError, match="quantize"):
        oso.shampoo(1e-2, quantize=3)
    with pytest.raises(ValueError, match="state_dtype"):
        oso.soap(1e-2, state_dtype="int8")


@pytest.mark.parametrize("approximation", ["kronecker", "eigenvalue_corrected"])
def test_kfac_state_dtype_is_the_float32_step_on_states_rounded_to_bfloat16(approximation):
    """K-FAC / EK-FAC with ``state_dtype="bfloat16"`` against a loop of the float32 transformation whose factors,
    preconditioners and scales are rounded to bfloat16 after every step (what storing them means): equal to the
    last bit, for 6 steps with statistics and refreshes; the stored state is bfloat16 and half the bytes."""
    params, _ = problem()
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((96, 72)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((96, 80)), jnp.float32)
    model = lambda p: jnp.tanh(oso.kronecker.dense(x, p["w"], p["b"]))  # noqa: E731
    loss = oso.losses.squared_error(y)
    layers = oso.kronecker.find_layers(model, params)
    options = dict(approximation=approximation, statistics_frequency=2, precondition_frequency=3, kl_clip=None)
    low, plain = (oso.scale_by_kfac(layers, state_dtype=d, **options) for d in ("bfloat16", None))
    fields = ("factors", "preconditioners", "scales")

    def rounded(state):
        return state._replace(**{f: jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(a.dtype), getattr(state, f))
                                 for f in fields})

    grads = jax.grad(lambda p: loss(model(p)))(params)
    step = {id(tx): jax.jit(lambda s, tx=tx: tx.update(grads, s, params, model_fn=model, loss=loss)) for tx in (low, plain)}
    s_low, s_plain = low.init(params), rounded(plain.init(params))
    for _ in range(6):
        u_low, s_low = step[id(low)](s_low)
        u_plain, s_plain = step[id(plain)](s_plain)
        s_plain = rounded(s_plain)
        jax.tree.map(np.testing.assert_array_equal, u_low, u_plain)
    for f in fields:
        stored, reference = getattr(s_low, f), getattr(s_plain, f)
        assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(stored))
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), b), stored, reference)
    nbytes = lambda s: sum(a.nbytes for f in fields for a in jax.tree.leaves(getattr(s, f)))  # noqa: E731
    assert nbytes(s_low) * 2 == nbytes(s_plain)
