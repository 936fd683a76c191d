"""The driver: determinism, chunking invariance, traced equivalence, gradients,
divergence handling, JSON output."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdec as jd
from jaxdec import gossip, topology
from jaxdec.run import Diverged, step_keys

N, D, M = 6, 3, 40


def _problem(seed=0):
    r = np.random.default_rng(seed)
    a = jnp.asarray(r.normal(size=(N, M, D)), jnp.float32)
    w_true = r.normal(size=(N, D))
    y = jnp.asarray(np.einsum("nmd,nd->nm", np.asarray(a), w_true), jnp.float32)

    def sampler(key, step):
        idx = jax.random.randint(key, (N, 8), 0, M)
        return (
            jnp.take_along_axis(a, idx[..., None], 1),
            jnp.take_along_axis(y, idx, 1),
        )

    def loss(params, batch, key):
        aa, yy = batch
        return jnp.mean((aa @ params["w"] - yy) ** 2)

    return sampler, loss, (a, y)


def _setup(lr=0.05, order="atc"):
    sampler, loss, data = _problem()
    W = topology.mixing_matrix(topology.ring(N))
    algo = jd.algorithms.dsgd(loss, optax.sgd(lr), gossip.sparse(W), order=order)
    state = algo.init({"w": jnp.zeros((N, D))})

    def eval_fn(s):
        a, y = data
        pred = jnp.einsum("nmd,nd->nm", a, s.params["w"])
        return {
            "mse": jnp.mean((pred - y) ** 2),
            "consensus": jd.tree.consensus_distance(s.params),
        }

    return algo, state, sampler, eval_fn


def test_same_seed_bit_identical_and_chunking_invariant():
    algo, state, sampler, eval_fn = _setup()
    key = jax.random.key(42)
    s1, h1 = jd.run(
        algo, state, sampler, key, 30, eval_every=10, eval_fn=eval_fn, progress=False
    )
    s2, h2 = jd.run(
        algo, state, sampler, key, 30, eval_every=10, eval_fn=eval_fn, progress=False
    )
    for k in h1.train:
        np.testing.assert_array_equal(h1.train[k], h2.train[k])
    for k in h1.eval:
        np.testing.assert_array_equal(h1.eval[k], h2.eval[k])
    np.testing.assert_array_equal(s1.params["w"], s2.params["w"])
    # a different chunking follows the same trajectory
    s3, h3 = jd.run(algo, state, sampler, key, 30, eval_every=7, progress=False)
    np.testing.assert_allclose(s3.params["w"], s1.params["w"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(h3.train["loss"], h1.train["loss"], rtol=1e-6)
    # a different key gives a different run
    s4, _ = jd.run(algo, state, sampler, jax.random.key(1), 30, progress=False)
    assert not np.allclose(s4.params["w"], s1.params["w"])
    assert list(h1.eval_steps) == [0, 10, 20, 30]
    assert h1.train["loss"].shape == (30,)
    assert h1.eval["mse"][-1] < h1.eval["mse"][0]


def test_run_equals_manual_loop_and_traced():
    algo, state, sampler, _ = _setup()
    key = jax.random.key(3)
    s_run, _ = jd.run(algo, state, sampler, key, 12, eval_every=5, progress=False)
    s = state
    for t in range(12):
        k_data, k_algo = step_keys(key, jnp.int32(t))
        s, _ = algo.step(s, sampler(k_data, jnp.int32(t)), k_algo)
    np.testing.assert_allclose(s_run.params["w"], s.params["w"], rtol=1e-6, atol=1e-7)
    s_tr, summ = jax.jit(lambda st, k: jd.run_traced(algo, st, sampler, k, 12))(
        state, key
    )
    np.testing.assert_allclose(s_tr.params["w"], s.params["w"], rtol=1e-6, atol=1e-7)
    assert summ["loss"].shape == (12,)
    s_ck, _ = jd.run_traced(algo, state, sampler, key, 12, checkpoint_every=4)
    np.testing.assert_allclose(s_ck.params["w"], s.params["w"], rtol=1e-6, atol=1e-7)


def test_callback_between_chunks_replaces_state():
    """A host event every chunk: with the callback, the run equals a manual loop that
    applies the same event at the chunk boundaries; None keeps the state; a state of
    another shape is refused."""
    algo, state, sampler, _ = _setup()
    key = jax.random.key(4)
    seen = []

    def shrink(s, t):  # halve every worker's parameters at steps 5 and 10
        seen.append(t)
        if t in (5, 10):
            return s._replace(params=jax.tree.map(lambda x: 0.5 * x, s.params))
        return None

    s_run, _ = jd.run(
        algo, state, sampler, key, 12, eval_every=5, progress=False, callback=shrink
    )
    assert seen == [5, 10, 12]
    s = state
    for t in range(12):
        if t in (5, 10):
            s = s._replace(params=jax.tree.map(lambda x: 0.5 * x, s.params))
        k_data, k_algo = step_keys(key, jnp.int32(t))
        s, _ = algo.step(s, sampler(k_data, jnp.int32(t)), k_algo)
    np.testing.assert_allclose(s_run.params["w"], s.params["w"], rtol=1e-6, atol=1e-7)
    plain, _ = jd.run(algo, state, sampler, key, 12, eval_every=5, progress=False)
    assert not np.allclose(plain.params["w"], s_run.params["w"])

    def bad(s, t):
        return s._replace(params={"w": s.params["w"][:, :1]})

    with pytest.raises(ValueError, match="keep shapes and dtypes"):
        jd.run(algo, state, sampler, key, 4, eval_every=2, progress=False, callback=bad)
    with pytest.raises(ValueError, match="callback must be callable"):
        jd.run(algo, state, sampler, key, 4, progress=False, callback=3)


def test_grad_through_run_traced_matches_finite_differences():
    sampler, loss, data = _problem()
    W = topology.mixing_matrix(topology.ring(N))
    key = jax.random.key(0)

    def final_loss(lr):
        algo = jd.algorithms.dsgd(loss, optax.sgd(lr), gossip.dense(W))
        state = algo.init({"w": jnp.zeros((N, D))})
        s, _ = jd.run_traced(algo, state, sampler, key, 10, checkpoint_every=5)
        a, y = data
        return jnp.mean((jnp.einsum("nmd,nd->nm", a, s.params["w"]) - y) ** 2)

    with jax.enable_x64(True):
        lr = jnp.float64(0.03)
        g = jax.grad(final_loss)(lr)
        eps = 1e-5
        fd = (final_loss(lr + eps) - final_loss(lr - eps)) / (2 * eps)
    assert float(g) < 0  # a larger step helps early in training
    np.testing.assert_allclose(g, fd, rtol=2e-3)


def test_divergence_stops_with_report():
    algo, state, sampler, eval_fn = _setup(lr=50.0)
    s, h = jd.run(
        algo, state, sampler, jax.random.key(0), 400, eval_every=50, progress=False
    )
    assert h.diverged_at is not None
    assert h.num_steps < 400
    assert h.diverged_workers
    assert not np.isfinite(h.train["loss"][h.diverged_at])
    assert np.isfinite(h.train["loss"][: h.diverged_at]).all()
    with pytest.raises(Diverged, match="non-finite"):
        jd.run(
            algo,
            state,
            sampler,
            jax.random.key(0),
            400,
            eval_every=50,
            progress=False,
            on_nonfinite="raise",
        )


def test_jsonl_and_validation(tmp_path):
    algo, state, sampler, eval_fn = _setup()
    path = tmp_path / "m.jsonl"
    jd.run(
        algo,
        state,
        sampler,
        jax.random.key(0),
        20,
        eval_every=10,
        eval_fn=eval_fn,
        progress=False,
        jsonl=path,
    )
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 10, 20]
    assert "train_loss" in recs[1] and "mse" in recs[1]
    with pytest.raises(ValueError, match="num_steps"):
        jd.run(algo, state, sampler, jax.random.key(0), 0, progress=False)
    with pytest.raises(ValueError, match="on_nonfinite"):
        jd.run(
            algo,
            state,
            sampler,
            jax.random.key(0),
            5,
            progress=False,
            on_nonfinite="maybe",
        )
    with pytest.raises(ValueError, match="divide"):
        jd.run_traced(algo, state, sampler, jax.random.key(0), 10, checkpoint_every=3)


def test_sampler_and_evaluator_data_are_arguments_not_constants():
    """Large datasets must not be compiled into the program as constants."""
    from jaxdec.loop import is_data_pytree, scan_steps, summarize_info

    r = np.random.default_rng(0)
    x = r.normal(size=(2000, 8, 8, 1)).astype(np.float32)  # 512 KB
    y = r.integers(0, 10, 2000)
    wd = jd.data.stack(x, y, jd.data.iid(y, N, seed=0))
    sampler = jd.data.make_sampler(wd, 8)
    model = jd.models.MLP(hidden=(8,), num_classes=10)
    ev = jd.metrics.evaluator(jd.models.apply_fn(model), x, y)
    assert is_data_pytree(sampler) and is_data_pytree(ev)
    params = jd.models.init_workers(model, jax.random.key(0), N, x[:1])
    W = topology.mixing_matrix(topology.ring(N))
    algo = jd.algorithms.dsgd(
        jd.models.classification_loss(model), optax.sgd(0.1), gossip.sparse(W)
    )
    state = algo.init(params)
    chunk = jax.jit(scan_steps(algo, summarize_info, 3))
    hlo = chunk.lower(state, jax.random.key(0), jnp.int32(0), sampler).as_text()
    assert len(hlo) < x.nbytes / 4
    hlo_eval = jax.jit(lambda s, fn: fn(s)).lower(state, ev).as_text()
    assert len(hlo_eval) < x.nbytes / 4
    # the evaluator reads .params of a state and equals evaluating params directly
    a, b = jax.jit(lambda s, fn: fn(s))(state, ev), ev(state.params)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6)
