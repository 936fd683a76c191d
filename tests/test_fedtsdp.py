"""FedTSDP-style training: the sheet's invariants (section 6, items 4-8), the
reduction to FedAvg, the host-side trigger, and a planted end-to-end case."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.metrics import adjusted_rand_score

import jaxdec as jd
from jaxdec import participation
from jaxdec.algorithms import federated as F
from jaxdec.algorithms.fedtsdp import (
    FedTSDPProbe,
    amend_weights,
    fedtsdp,
    personal_layers,
    run_fedtsdp,
)

C, DX, K, E, B = 6, 5, 3, 2, 8
BLOCKS = ["b0", "b1", "b2"]


def predict(params, x):
    h = jnp.tanh(x @ params["b0"]["w"])
    h = jnp.tanh(h @ params["b1"]["w"])
    return jax.nn.softmax(h @ params["b2"]["w"] + params["b2"]["b"][None], axis=-1)


def loss_fn(params, batch, key):
    x, y = batch
    p = predict(params, x)
    return -jnp.mean(jnp.log(jnp.take_along_axis(p, y[:, None], 1)[:, 0] + 1e-9))


def _params(c=C, seed=0, same=True):
    r = np.random.default_rng(seed)

    def one():
        return {
            "b0": {"w": r.normal(size=(DX, 4)).astype(np.float32)},
            "b1": {"w": r.normal(size=(4, 4)).astype(np.float32)},
            "b2": {
                "w": r.normal(size=(4, K)).astype(np.float32),
                "b": np.zeros(K, np.float32),
            },
        }

    if same:
        return jd.tree.replicate(jax.tree.map(jnp.asarray, one()), c)
    ones = [one() for _ in range(c)]
    return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *ones)


def _hist(c=C):
    r = np.random.default_rng(1)
    return r.integers(5, 30, size=(c, K)).astype(np.float64)


def _batch(seed, c=C):
    r = np.random.default_rng(seed)
    x = r.normal(size=(c, E, B, DX)).astype(np.float32)
    y = r.integers(0, K, size=(c, E, B)).astype(np.int32)
    return x, y


PUB = np.random.default_rng(9).normal(size=(40, DX)).astype(np.float32)


def _algo(**kw):
    kw.setdefault("blocks", BLOCKS)
    kw.setdefault("public_batch", 16)
    return fedtsdp(loss_fn, optax.sgd(0.1), predict, PUB, **kw)


@pytest.mark.parametrize("k,sync", [(None, True), (4, True), (4, False)])
def test_aggregation_invariants(k, sync):
    algo = _algo(clients_per_round=k, sync_nonparticipants=sync, seed=3)
    st = algo.init(_params(same=False), _hist())
    cluster = np.array([0, 0, 1, 1, 1, 2])
    n_pers = np.array([0, 1, 2, 0, 1, 0])
    st = st._replace(
        cluster=jnp.asarray(cluster, jnp.int32),
        n_personal=jnp.asarray(n_pers, jnp.int32),
    )
    new, info = jax.jit(algo.aggregate)(st)
    m = np.asarray(participation.round_mask(jax.random.key(3), 0, C, k or C))
    np.testing.assert_array_equal(np.asarray(info.participation) > 0, m)
    w = _hist().sum(1)
    for blk, name in enumerate(BLOCKS):
        for leaf in st.params[name]:
            old = np.asarray(st.params[name][leaf]).reshape(C, -1)
            got = np.asarray(new.params[name][leaf]).reshape(C, -1)
            shared = blk < 3 - n_pers
            for i in range(C):
                contrib = (cluster == cluster[i]) & shared & m
                if not shared[i] or not contrib.any() or (not m[i] and not sync):
                    # personal blocks (and untouched rows): bit-identical
                    np.testing.assert_array_equal(got[i], old[i])
                else:
                    want = (w[contrib] @ old[contrib]) / w[contrib].sum()
                    np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-6)
    sizes = [DX * 4, 16, 4 * K + K]
    up = np.mean(
        [
            m[i] * sum(s for j, s in enumerate(sizes) if j < 3 - n_pers[i])
            for i in range(C)
        ]
    )
    np.testing.assert_allclose(info.floats_sent, up, rtol=1e-6)


def test_one_cluster_no_personal_layers_is_a_fedavg_round():
    kw = dict(clients_per_round=4, seed=5)
    tsdp = _algo(layer_rule=0, timing="never", **kw)
    avg = F.fedavg(loss_fn, optax.sgd(0.1), **kw)
    p, h = _params(), _hist()
    s1, _ = jax.jit(tsdp.step)(tsdp.init(p, h), _batch(0), jax.random.key(1))
    s2, _ = jax.jit(avg.step)(avg.init(p, h.sum(1)), _batch(0), jax.random.key(1))
    for a, b in zip(
        jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_layer_rule():
    h = np.full((3, 10), 50.0)
    h[1] = 0
    h[1, 4] = 80  # one-hot
    h[2] = 0
    h[2, [0, 7]] = 40  # two balanced classes
    st = _algo(l_top=2).init(_params(3), h)
    np.testing.assert_array_equal(st.n_personal, [0, 2, 1])  # IID data: p = 0
    s = np.linspace(0.0, 1.0, 101)
    for l_top in range(4):
        p = np.asarray(personal_layers(s, l_top))
        assert p.min() == 0 and p.max() == l_top and (np.diff(p) >= 0).all()


def test_sampling_weights():
    r = np.random.default_rng(2)
    with jax.enable_x64(True):
        w = jnp.asarray(r.dirichlet(np.ones(500)))
        for _ in range(20):
            idx = jnp.asarray(r.choice(500, 64, replace=False))
            d = jnp.asarray(r.uniform(0, np.log(2), 64))
            w = amend_weights(w, idx, d, 0.5)
            assert float(w.min()) > 0 and abs(float(w.sum()) - 1) < 1e-9
        u = jnp.full((500,), 1 / 500)
        u2 = amend_weights(u, idx, jnp.zeros(64), 0.5)
        np.testing.assert_allclose(u2, 1 / 500, rtol=1e-12)
    # identical clients through the jitted probe: d_j = 0, weights stay uniform
    algo = _algo()
    st = algo.init(_params(), _hist())
    pr = jax.jit(algo.probe)(st.params, st, jax.random.key(0))
    np.testing.assert_allclose(pr.disagreement, 0.0, atol=1e-7)
    np.testing.assert_allclose(pr.pub_weights, 1 / len(PUB), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(pr.js_dist), 0.0, atol=1e-3)


def _probe(h, c=C):
    z = np.zeros((c, K), np.float32)
    return FedTSDPProbe(
        hopkins=np.float32(h),
        points=z,
        z=z,
        js_dist=np.zeros((c, c), np.float32),
        gram=np.zeros((3, c, c), np.float32),
        pub_weights=np.full(len(PUB), 1 / len(PUB), np.float32),
        sample_idx=np.arange(16),
        disagreement=np.zeros(16, np.float32),
        skew_out=np.zeros(c, np.float32),
        participation=np.ones(c, bool),
    )


def test_hopkins_trigger_needs_patience():
    algo = _algo(h_star=0.66, patience=3)
    st = algo.init(_params(), _hist())
    fired = []
    for t, h in enumerate([0.70, 0.50, 0.70, 0.67, 0.69, 0.50]):
        assert algo.needs_event(st)
        st, rec = algo.decide(st._replace(count=jnp.int32(t)), _probe(h))
        fired.append(rec["triggered"])
        if rec["triggered"]:
            break
    assert fired == [False, False, False, False, True]
    assert bool(st.clustered) and int(st.clustered_at) == 4
    st = st._replace(count=jnp.int32(5))
    assert not algo.needs_event(st)  # one-shot
    re = _algo(recluster_every=3)
    assert re.needs_event(st._replace(count=jnp.int32(7)))
    fixed = _algo(timing="fixed_round", cluster_round=2)
    s0 = fixed.init(_params(), _hist())
    _, rec = fixed.decide(s0._replace(count=jnp.int32(2)), _probe(0.1))
    assert rec["triggered"]


def test_partial_participation_defers_clustering_to_a_full_round():
    algo = _algo(clients_per_round=3, patience=1)
    st = algo.init(_params(), _hist())
    pr = _probe(0.9)._replace(participation=np.arange(C) < 3)
    assert algo.needs_event(st) and not algo.full_round(st)
    st, rec = algo.decide(st, pr)
    assert rec["deferred"] and not rec["triggered"] and not bool(st.clustered)
    st = st._replace(count=jnp.int32(1))
    assert algo.needs_event(st) and algo.full_round(st)
    st, rec = algo.decide(st, _probe(0.1))  # the full round clusters regardless
    assert rec["triggered"] and bool(st.clustered) and not bool(st.cluster_next)


@pytest.mark.slow
def test_planted_label_permutation_groups_are_recovered():
    """Two groups whose labels are permuted: predictions on public data disagree."""
    c, rounds, steps = 8, 4, 10
    truth = np.array([0, 1] * 4)
    W = jnp.asarray(np.random.default_rng(0).normal(size=(DX, K)), jnp.float32)

    def sampler(key, t):
        x = jax.random.normal(key, (c, steps, B, DX))
        y = jnp.argmax(x @ W, -1)
        y = jnp.where(jnp.asarray(truth)[:, None, None] == 1, (y + 1) % K, y)
        return x, y.astype(jnp.int32)

    algo = fedtsdp(
        loss_fn,
        optax.sgd(0.5),
        predict,
        PUB,
        blocks=BLOCKS,
        timing="fixed_round",
        cluster_round=2,
        layer_rule=0,
        public_batch=32,
        stage2_min_size=5,
    )
    st = algo.init(_params(c), np.full((c, K), 10.0))
    st, hist, events = run_fedtsdp(
        algo, st, sampler, jax.random.key(0), rounds, progress=False
    )
    assert [e["triggered"] for e in events] == [False, False, True]
    assert adjusted_rand_score(truth, events[-1]["coarse"]) == 1.0
    assert adjusted_rand_score(truth, np.asarray(st.cluster)) == 1.0
    np.testing.assert_array_equal(hist.train["num_clusters"], [1, 1, 2, 2])
    w = np.asarray(st.params["b0"]["w"])
    for g in range(2):  # shared blocks identical inside a cluster
        wg = w[truth == g]
        np.testing.assert_array_equal(wg, np.broadcast_to(wg[0], wg.shape))
    assert np.abs(w[0] - w[1]).max() > 1e-3


@pytest.mark.slow
def test_driver_without_events_equals_jd_run():
    algo = _algo(timing="never", clients_per_round=4)
    st0 = algo.init(_params(), _hist())

    def sampler(key, t):
        x = jax.random.normal(key, (C, E, B, DX))
        return x, (x[..., 0] > 0).astype(jnp.int32)

    s1, h1, ev = run_fedtsdp(
        algo, st0, sampler, jax.random.key(3), 7, eval_every=3, progress=False
    )
    s2, h2 = jd.run(
        algo, st0, sampler, jax.random.key(3), 7, eval_every=3, progress=False
    )
    assert ev == []
    for a, b in zip(
        jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(h1.train["loss"], h2.train["loss"])


def test_validation():
    with pytest.raises(ValueError, match="exactly one block"):
        _algo(blocks=["b0", "b1"]).init(_params(), _hist())
    with pytest.raises(ValueError, match="label_hist"):
        _algo().init(_params(), _hist()[:, :1] * 0)
    with pytest.raises(ValueError, match="timing"):
        _algo(timing="sometimes")
    with pytest.raises(ValueError, match="layer_rule"):
        _algo(layer_rule=5)
    with pytest.raises(ValueError, match="public_batch"):
        _algo(public_batch=1000)
