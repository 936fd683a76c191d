"""Worker-axis pytree helpers against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdec as jd


def _tree(n=5, seed=0):
    r = np.random.default_rng(seed)
    return {
        "body": {"w": jnp.asarray(r.normal(size=(n, 3, 2)), jnp.float32)},
        "head": {
            "w": jnp.asarray(r.normal(size=(n, 4)), jnp.float32),
            "b": jnp.asarray(r.normal(size=(n,)), jnp.float32),
        },
    }


def test_replicate_and_num_workers():
    t = jd.tree.replicate({"a": jnp.ones((2, 3)), "b": jnp.zeros(())}, 7)
    assert t["a"].shape == (7, 2, 3) and t["b"].shape == (7,)
    assert jd.tree.num_workers(t) == 7
    with pytest.raises(ValueError, match="replicate"):
        jd.tree.replicate({"a": jnp.ones(2)}, 0)
    with pytest.raises(ValueError, match="disagree"):
        jd.tree.num_workers({"a": jnp.ones((3, 2)), "b": jnp.ones((4,))})
    with pytest.raises(ValueError, match="scalar"):
        jd.tree.num_workers({"a": jnp.ones((3, 2)), "b": jnp.ones(())})


def test_worker_mean_and_consensus_distance_match_numpy():
    t = _tree()
    flat = np.concatenate(
        [
            np.asarray(x).reshape(5, -1)
            for x in (t["body"]["w"], t["head"]["b"], t["head"]["w"])
        ],
        axis=1,
    )
    xbar = flat.mean(0)
    expected = np.mean(np.sum((flat - xbar) ** 2, axis=1))
    assert float(jd.tree.consensus_distance(t)) == pytest.approx(expected, rel=1e-5)
    m = jd.tree.worker_mean(t)
    np.testing.assert_allclose(
        m["body"]["w"], np.asarray(t["body"]["w"]).mean(0), rtol=1e-6
    )
    b = jd.tree.broadcast_mean(t)
    assert float(jd.tree.consensus_distance(b)) == pytest.approx(0.0, abs=1e-10)
    assert jd.tree.num_params(t) == 6 + 4 + 1
    assert float(jd.tree.sq_norm(t)) == pytest.approx(float((flat**2).sum()), rel=1e-5)


@pytest.mark.parametrize("shape", [(1000, 24, 10), (6, 50, 400)])
def test_consensus_distance_is_exact_at_agreement_and_accurate_near_it(shape):
    """Both reduction forms (many small leaves / few large ones): exactly zero when
    all workers agree, float64 accuracy when they nearly agree (centring on the
    raw float32 mean instead overestimates ~1e-8 distances several times over),
    NaN when a worker holds a NaN."""
    k0, k1 = jax.random.split(jax.random.key(0))
    c = 3.0 + jax.random.normal(k0, shape[1:], jnp.float32)
    same = jnp.broadcast_to(c, shape)
    assert float(jd.tree.consensus_distance({"w": same})) == 0.0
    near = same + 1e-5 * jax.random.normal(k1, shape, jnp.float32)
    x64 = np.asarray(near, np.float64).reshape(shape[0], -1)
    expected = np.mean(np.sum((x64 - x64.mean(0)) ** 2, axis=1))
    got = float(jd.tree.consensus_distance({"w": near}))
    assert got == pytest.approx(expected, rel=1e-4)
    bad = near.at[shape[0] - 1, 3].set(jnp.nan)
    assert np.isnan(float(jd.tree.consensus_distance({"w": bad})))


def test_masks_by_path():
    t = _tree()
    head = jd.tree.mask_under(t, "head")
    assert head == {"body": {"w": False}, "head": {"w": True, "b": True}}
    assert jd.tree.invert_mask(head) == {
        "body": {"w": True},
        "head": {"w": False, "b": False},
    }
    assert jd.tree.mask_by_path(t, r"/b$") == {
        "body": {"w": False},
        "head": {"w": False, "b": True},
    }
    assert jd.tree.mask_by_path(
        t, lambda p: p.startswith("body")
    ) == jd.tree.invert_mask(head)
    sel = jd.tree.select(head, t, jd.tree.worker_mean(t))
    assert sel["head"]["w"].shape == (5, 4) and sel["body"]["w"].shape == (3, 2)
    jd.tree.validate_mask(head, t)
    with pytest.raises(ValueError, match="does not match"):
        jd.tree.validate_mask({"body": True, "head": False}, t)
    with pytest.raises(ValueError, match="Python bools"):
        jd.tree.validate_mask(jd.tree.replicate(head, 1), t)
    # a component match, not a substring match
    t2 = {"headline": jnp.ones((2,)), "head": jnp.ones((2,))}
    assert jd.tree.mask_under(t2, "head") == {"headline": False, "head": True}
