"""The bit-packed Rademacher draw against the distribution it must have: fair, independent +-1 signs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_second_order.curvature.estimators import rademacher


@pytest.mark.parametrize("shape", [(), (1,), (33,), (7, 5, 3)])
def test_shape_dtype_and_values(shape):
    x = rademacher(jax.random.key(0), shape, jnp.bfloat16)
    assert x.shape == shape and x.dtype == jnp.bfloat16
    assert set(np.unique(np.asarray(x, np.float32))) <= {-1.0, 1.0}


def test_fair_and_independent_signs():
    n = 200_003  # not a multiple of 32: the last word is cut
    x = np.asarray(rademacher(jax.random.key(1), (n,)), np.float64)
    standard_error = 1 / np.sqrt(n)
    assert abs(x.mean()) < 4 * standard_error
    for lag in (1, 31, 32, 33):  # signs from the same word, across words, and the same bit of the next word
        assert abs(np.mean(x[:-lag] * x[lag:])) < 4 * standard_error


def test_distinct_keys_give_distinct_draws():
    a, b = (np.asarray(rademacher(k, (64,))) for k in jax.random.split(jax.random.key(2)))
    assert not np.array_equal(a, b)
