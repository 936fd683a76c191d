"""Client sampling: exactly k of n, reproducible from the seed, unbiased."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdec import participation


def test_exactly_k_reproducible_and_unbiased():
    key = jax.random.key(3)
    masks = jax.jit(jax.vmap(lambda r: participation.round_mask(key, r, 20, 5)))(
        jnp.arange(4000)
    )
    masks = np.asarray(masks)
    assert (masks.sum(1) == 5).all()
    again = np.asarray(
        jax.vmap(lambda r: participation.round_mask(key, r, 20, 5))(jnp.arange(4000))
    )
    np.testing.assert_array_equal(masks, again)
    other = np.asarray(
        jax.vmap(lambda r: participation.round_mask(jax.random.key(4), r, 20, 5))(
            jnp.arange(4000)
        )
    )
    assert not np.array_equal(masks, other)
    # each client takes part with probability k/n = 0.25: binomial sd = sqrt(4000 p q)
    freq = masks.sum(0)
    sd = np.sqrt(4000 * 0.25 * 0.75)
    assert np.all(np.abs(freq - 1000) < 4.5 * sd)
    # pairs too (a uniform k-subset): P(i and j) = k(k-1)/(n(n-1))
    both = (masks[:, 0] & masks[:, 1]).mean()
    assert abs(both - 5 * 4 / (20 * 19)) < 0.02


def test_full_participation_and_masked_mean():
    assert bool(participation.client_mask(jax.random.key(0), 6, 6).all())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3, 2)).astype(np.float32)
    w = rng.uniform(1, 3, 6).astype(np.float32)
    m = np.array([1, 0, 1, 1, 0, 0], bool)
    got = participation.masked_mean({"a": jnp.asarray(x)}, jnp.asarray(m), w)["a"]
    want = (m * w) @ x.reshape(6, -1) / (m * w).sum()
    np.testing.assert_allclose(got, want.reshape(3, 2), rtol=1e-6)


@pytest.mark.parametrize("k", [0, 7, 2.5, True])
def test_bad_k(k):
    with pytest.raises(ValueError, match="clients_per_round"):
        participation.client_mask(jax.random.key(0), 6, k)
