"""Communication schedules, the single global merge and the label-resampling data
protocol: the invariants of ../shared/specs/single_merge.md section 6."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdec as jd
from jaxdec import gossip as G


def _rand_tree(n, seed=0):
    r = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(r.normal(size=(n, 5, 3)), jnp.float32),
        "b": jnp.asarray(r.normal(size=(n, 3)), jnp.float32),
    }


def _matrices(mix, n):
    """Jitted ``step -> W(step)`` of a linear mixer (one compile per mixer)."""
    f = jax.jit(lambda t: mix(jnp.eye(n, dtype=jnp.float32), t))
    return lambda t: np.asarray(f(jnp.int32(t)))


def _lsq(params, batch, key):
    a, y = batch
    return jnp.mean((a @ params["w"] - y) ** 2)


def test_global_merge_is_exact_mean_and_keeps_optimizer_state():
    n = 6
    opt = optax.sgd(0.1, momentum=0.9)
    algo = jd.algorithms.dsgd(_lsq, opt, G.identity())
    params = {
        "w": jnp.asarray(np.random.default_rng(0).normal(size=(n, 4)), jnp.float32)
    }
    state = algo.init(params)
    a = jnp.asarray(np.random.default_rng(1).normal(size=(n, 8, 4)), jnp.float32)
    y = jnp.asarray(np.random.default_rng(2).normal(size=(n, 8)), jnp.float32)
    state, _ = algo.step(state, (a, y), jax.random.key(0))
    merged = jd.merge.global_merge(state)
    expected = np.asarray(state.params["w"], np.float64).mean(0)
    for i in range(n):
        np.testing.assert_allclose(merged.params["w"][i], expected, rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, merged.opt_state, state.opt_state)
    assert int(merged.count) == int(state.count)
    assert float(jd.tree.consensus_distance(merged.params)) <= 1e-10
    with pytest.raises(ValueError, match="params"):
        jd.merge.global_merge({"w": params["w"]})


def test_evaluate_merged_leaves_training_state_bit_identical():
    n = 4
    params = _rand_tree(n)
    algo = jd.algorithms.dsgd(
        lambda p, b, k: jnp.sum(p["w"]), optax.sgd(0.1), G.identity()
    )
    state = algo.init(params)
    before = jax.tree.map(np.array, state)
    out = jd.merge.evaluate_merged(
        lambda s: {"spread": jd.tree.consensus_distance(s.params)}, state
    )
    assert float(out["spread"]) <= 1e-10
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, state))
    assert float(jd.tree.consensus_distance(state.params)) > 0


def test_complete_every_step_with_momentum_equals_parallel_sgd():
    n, b, d, lr, beta = 5, 6, 3, 0.05, 0.9
    r = np.random.default_rng(0)
    w0 = jnp.asarray(r.normal(size=d), jnp.float32)
    algo = jd.algorithms.dsgd(_lsq, optax.sgd(lr, momentum=beta), G.complete(n))
    state = algo.init({"w": jd.tree.replicate(w0, n)})
    w, m = np.asarray(w0, np.float64), np.zeros(d)
    for t in range(20):
        a = r.normal(size=(n, b, d)).astype(np.float32)
        y = r.normal(size=(n, b)).astype(np.float32)
        state, _ = algo.step(state, (jnp.asarray(a), jnp.asarray(y)), jax.random.key(t))
        g = np.mean([2 * a[k].T @ (a[k] @ w - y[k]) / b for k in range(n)], axis=0)
        m = g + beta * m
        w = w - lr * m
    for k in range(n):
        np.testing.assert_allclose(state.params["w"][k], w, rtol=1e-5, atol=1e-6)


def test_pairing_matrices_and_mean_preservation():
    n = 10
    mix = G.connectivity(n, 0.2, seed=3)
    mat = _matrices(mix, n)
    x = _rand_tree(n)
    for step in range(5):
        M = mat(step)
        np.testing.assert_allclose(M, M.T)
        np.testing.assert_allclose(M.sum(0), 1.0, atol=1e-7)
        assert set(np.unique(np.round(M, 6))) <= {0.0, 0.5, 1.0}
        y = mix(x, step)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a.mean(0), b.mean(0), atol=1e-6),
            x,
            y,
        )


def test_pull_rows_and_not_mean_preserving():
    n = 10
    mix = G.random_pull(n, 0.2, seed=1)
    mat = _matrices(mix, n)
    Ms = np.stack([mat(s) for s in range(1000)])  # 10^4 rows
    np.testing.assert_allclose(Ms.sum(2), 1.0, atol=1e-6)
    assert (Ms >= 0).all()
    has_peer = (Ms * (1 - np.eye(n))).sum(2) > 0
    off = Ms[has_peer] * (1 - np.eye(n))[None].repeat(len(Ms), 0)[has_peer]
    assert np.allclose(off.max(1), 0.5) and np.allclose((off > 0).sum(1), 1)
    assert abs(has_peer.mean() - 0.2) < 0.01
    np.testing.assert_allclose(
        G.as_matrix(G.random_pull(n, n - 1, seed=0), n, 0),
        np.full((n, n), 1 / n),
        atol=1e-6,
    )
    x = _rand_tree(n, 5)
    y = G.random_pull(n, 1.0, seed=2)(x, 0)
    assert float(jnp.max(jnp.abs(y["w"].mean(0) - x["w"].mean(0)))) > 1e-4
    with pytest.raises(ValueError, match="pairing"):
        G.connectivity(n, 2.0)
    with pytest.raises(ValueError, match="r must be in"):
        G.random_pull(n, n + 1.0)


@pytest.mark.parametrize("mode", ["pairing", "pull"])
def test_realized_exchanges_match_budget(mode):
    n, p, rounds = 16, 0.2, 10_000
    mix = G.connectivity(n, p, seed=7, mode=mode)
    budget = G.communication_budget(mix, rounds, n, params=_rand_tree(n))
    # expectations are accumulated in float32 over chunks of 1024 rounds
    assert budget["expected_exchanges_per_worker"] == pytest.approx(
        p * rounds, rel=1e-5
    )
    # per-round exchanges of one worker are Bernoulli(p) (pairing, even n) or
    # (pull) a sum of pulls with mean p; 3 standard errors of the mean over rounds
    se = np.sqrt(p * (1 - p) / rounds) * rounds
    realized = budget["realized_exchanges_per_worker"]
    assert abs(realized - p * rounds) < 3 * se
    assert budget["floats_sent_per_worker"] == pytest.approx(realized * (15 + 3))


def test_truncate_switches_exactly():
    n, H = 8, 100
    T = 300 * H
    mat = _matrices(G.truncate(n, 0.2, n - 1, 0.997, max_steps=T, H=H, seed=0), n)
    J = np.full((n, n), 1 / n)

    def is_complete(rho):
        return np.allclose(mat(rho * H + H - 1), J, atol=1e-6)

    complete_rounds = [rho for rho in range(290, 300) if is_complete(rho)]
    assert complete_rounds == [299]  # paper preset: exactly 1 of 300 rounds
    assert not is_complete(0)
    # off-round steps do not communicate
    np.testing.assert_allclose(mat(5), np.eye(n), atol=1e-7)
    # point1 = 0.5 over 10 rounds: rounds 0..3 sparse (pi < 0.5), 4.. complete
    m2 = _matrices(G.truncate(n, 0.0, n - 1, 0.5, max_steps=10 * H, H=H), n)
    flags = [np.allclose(m2(r * H + H - 1), J, atol=1e-6) for r in range(10)]
    assert flags == [False] * 4 + [True] * 6


def test_dense_window_switches_exactly():
    n, H, rounds = 6, 10, 20
    J = np.full((n, n), 1 / n)
    mix = _matrices(
        G.dense_window(n, 0.5, 0.25, r_sparse=0.0, max_steps=rounds * H, H=H), n
    )
    flags = [np.allclose(mix(r * H + H - 1), J, atol=1e-6) for r in range(rounds)]
    # rounds whose last-step progress (r + 1) / 20 lies in [0.5, 0.75)
    assert flags == [0.5 <= (r + 1) / rounds < 0.75 for r in range(rounds)]
    first = _matrices(
        G.dense_window(n, 0.0, 0.1, r_sparse=0.0, max_steps=rounds * H, H=H), n
    )
    f2 = [np.allclose(first(r * H + H - 1), J, atol=1e-6) for r in range(rounds)]
    assert f2 == [r < 1 for r in range(rounds)]


def test_consensus_grows_without_communication_and_vanishes_after_merge():
    n, d = 6, 4
    r = np.random.default_rng(0)
    a = jnp.asarray(r.normal(size=(n, 16, d)), jnp.float32)
    y = jnp.asarray(r.normal(size=(n, 16)) + 3 * np.arange(n)[:, None], jnp.float32)
    algo = jd.algorithms.dsgd(_lsq, optax.sgd(0.05), G.identity())
    state = algo.init({"w": jnp.zeros((n, d))})
    cds = []
    for t in range(5):
        state, info = algo.step(state, (a, y), jax.random.key(t))
        cds.append(float(info.consensus))
    assert all(b > a_ for a_, b in zip(cds, cds[1:], strict=False))
    assert (
        float(jd.tree.consensus_distance(jd.merge.global_merge(state).params)) <= 1e-10
    )


def test_label_resample_protocol():
    q = jd.data.dirichlet_proportions(4, 5, 0.5, seed=0)
    np.testing.assert_allclose(q.sum(1), 1.0)
    y = np.repeat(np.arange(5), [30, 10, 50, 20, 40])
    x = np.arange(len(y), dtype=np.float32)[:, None]  # x encodes the row
    sampler = jd.data.label_resample_sampler(x, y, q, batch_size=500)
    draw = jax.jit(lambda s, k, t: s(k, t))
    hist = np.zeros((4, 5))
    for t in range(200):  # 10^5 draws per worker
        xb, yb = draw(sampler, jax.random.key(0), t)
        xb, yb = np.asarray(xb), np.asarray(yb)
        np.testing.assert_array_equal(
            y[xb[..., 0].astype(int)], yb
        )  # label matches row
        for k in range(4):
            hist[k] += np.bincount(yb[k], minlength=5)
    tv = 0.5 * np.abs(hist / hist.sum(1, keepdims=True) - q).sum(1)
    assert (tv < 0.02).all()
    low = jd.data.dirichlet_proportions(200, 10, 0.1, seed=1).max(1).mean()
    high = jd.data.dirichlet_proportions(200, 10, 1.0, seed=1).max(1).mean()
    assert low > high
    with pytest.raises(ValueError, match="rows summing"):
        jd.data.label_resample_sampler(x, y, q * 2, 8)


def test_evaluator_reports_mergeability_gap():
    ds = jd.data.load_digits()
    model = jd.models.MLP(hidden=(8,), num_classes=10)
    params = jd.models.init_workers(
        model, jax.random.key(0), 3, ds.x_train[:1], same_init=False
    )
    ev = jd.metrics.evaluator(jd.models.apply_fn(model), ds.x_test, ds.y_test)
    out = jax.jit(lambda e, p: e(p))(ev, params)
    assert float(out["mergeability_gap"]) == pytest.approx(
        float(out["avg_model_acc"] - out["local_acc_mean"]), abs=1e-6
    )


def test_scheduled_random_mixers_count_messages_inside_dsgd():
    """Random mixers nested in schedules report their messages through Info."""
    n, H = 8, 2
    mix = G.truncate(n, 1.0, n - 1, 0.8, max_steps=8, H=H, seed=0)
    algo = jd.algorithms.dsgd(_lsq, optax.sgd(0.1), mix)
    state = algo.init({"w": jnp.zeros((n, 3))})
    batch = (jnp.ones((n, 2, 3)), jnp.ones((n, 2)))
    sent = []
    step = jax.jit(algo.step)
    for t in range(8):
        state, info = step(state, batch, jax.random.key(t))
        sent.append(float(info.floats_sent))
    # odd steps end a round: rounds 0-2 pair every worker (1 message of 3 floats),
    # the last round (progress 1 >= 0.8; round 2 has 0.75) averages exactly
    assert sent == [0, 3, 0, 3, 0, 3, 0, 3 * (n - 1)]


def _bn_setup(n=4, d=6, width=5, seed=0, classes=3):
    model = jd.models.MLP(hidden=(width,), num_classes=classes, norm="batch")
    params, stats = jd.models.init_workers(
        model,
        jax.random.key(seed),
        n,
        jnp.zeros((1, d)),
        same_init=False,
        with_stats=True,
    )
    return model, params, stats


def test_batch_statistics_are_recomputed_cumulative_averages():
    """Sheet invariant 9: the merged copy's statistics are re-estimated on pooled
    batches (cumulative average of per-batch mean / biased variance), not averaged."""
    model, params, _ = _bn_setup()
    rng = np.random.default_rng(1)
    xs = rng.normal(1.0, 2.0, size=(40, 16, 6)).astype(np.float32)
    theta = jd.merge.merged_params(params)
    stats = jax.jit(lambda p, x: jd.merge.batch_statistics(model, p, x))(theta, xs)
    k = np.asarray(theta["body"]["Dense_0"]["kernel"])
    b = np.asarray(theta["body"]["Dense_0"]["bias"])
    h = np.einsum("kbd,dw->kbw", xs[:32].astype(np.float64), np.asarray(k)) + b
    bn = stats["batch_stats"]["body"]["BatchNorm_0"]
    np.testing.assert_allclose(bn["mean"], h.mean(1).mean(0), rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(bn["var"], h.var(1).mean(0), rtol=2e-4)
    # not an average of the workers' own statistics
    own = jax.vmap(lambda p: jd.merge.batch_statistics(model, p, xs))(params)
    avg = own["batch_stats"]["body"]["BatchNorm_0"]["var"].mean(0)
    assert np.max(np.abs(np.asarray(avg) - np.asarray(bn["var"]))) > 1e-2
    with pytest.raises(ValueError, match="batches"):
        jd.merge.batch_statistics(model, theta, xs[0])
    plain = jd.models.MLP(hidden=(5,), num_classes=3)
    with pytest.raises(ValueError, match="no 'batch_stats'"):
        jd.merge.batch_statistics(plain, theta, xs)


def test_batchnorm_model_trains_and_merged_evaluation_recalibrates():
    """D-SGD on a BatchNorm MLP (train-mode loss), then counterfactual merged
    evaluation with recalibration: state bit-identical, eval mode uses the new
    statistics, and without the init flag the model is rejected."""
    ds = jd.data.load_digits()
    n = 4
    model, params, _ = _bn_setup(n=n, d=64, width=32, classes=10)
    with pytest.raises(ValueError, match="with_stats=True"):
        jd.models.init_workers(model, jax.random.key(0), n, jnp.zeros((1, 64)))
    parts = jd.data.iid(len(ds.y_train), n, seed=0)
    sampler = jd.data.make_sampler(jd.data.stack(ds.x_train, ds.y_train, parts), 16)
    mix = jd.gossip.dense(jd.topology.mixing_matrix(jd.topology.ring(n), "metropolis"))
    loss = jd.models.classification_loss(model)
    algo = jd.algorithms.dsgd(loss, optax.sgd(0.05), mix)
    state, hist = jd.run(
        algo, algo.init(params), sampler, jax.random.key(1), 60, progress=False
    )
    assert np.isfinite(hist.train["loss"]).all()
    assert hist.train["loss"][-1] < hist.train["loss"][0]
    ev = jd.metrics.evaluator(jd.models.apply_fn(model), ds.x_test, ds.y_test)
    xb = jnp.asarray(ds.x_train[: 8 * 32].reshape(8, 32, -1))
    before = jax.tree.map(np.asarray, state)
    out = jax.jit(
        lambda s: jd.merge.evaluate_merged(ev, s, model=model, calibration=xb)
    )(state)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, state))
    assert float(out["avg_model_acc"]) > 0.5
    # the same number by hand: merged params + recomputed statistics
    theta = jd.merge.merged_params(state.params)
    v = {"params": theta, **jd.merge.batch_statistics(model, theta, xb)}
    logits = jd.models.apply_fn(model)(v, jnp.asarray(ds.x_test))
    acc = np.mean(np.argmax(np.asarray(logits), 1) == ds.y_test)
    np.testing.assert_allclose(float(out["local_acc_mean"]), acc, atol=1e-6)
    with pytest.raises(ValueError, match="both"):
        jd.merge.evaluate_merged(ev, state, model=model)
