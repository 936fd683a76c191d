"""Worker-axis sharding: ppermute gossip vs NumPy W X, sharded vs unsharded runs on
8 fake CPU devices (in a subprocess: the device count is fixed before JAX starts),
buffer donation, bfloat16 storage."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdec as jd
from jaxdec import gossip, sharding, topology

ROOT = Path(__file__).resolve().parents[1]
# quick XLA:CPU compiles for the subprocess (both sides of every comparison use it)
FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
N = 32  # 4 workers per device on 8 devices; torus 4 x 8: a device holds half a row

GRAPHS = {
    "ring": lambda: topology.mixing_matrix(topology.ring(N)),
    "torus": lambda: topology.mixing_matrix(topology.torus(4, 8)),
    "exponential": lambda: topology.mixing_matrix(topology.exponential(N)),
    "regular": lambda: topology.mixing_matrix(topology.random_regular(N, 3, seed=0)),
}

# Runs with 8 fake devices: every mixer on sharded inputs, and D-SGD / gradient
# tracking with jd.run sharded (ppermute gossip, sharded evaluator) and unsharded
# (gossip.sparse, metrics.evaluator on one device). Arrays go back in an npz.
WORKER = r"""
import json, re, sys
import jax
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
import jax.numpy as jnp, numpy as np
import jaxdec as jd
from jaxdec import gossip, sharding, topology
sys.path.insert(0, sys.argv[2])
from test_sharding import GRAPHS, N, problem

out, meta = {}, {"devices": len(jax.devices())}
mesh = sharding.worker_mesh()
X = np.random.default_rng(0).normal(size=(N, 3, 2)).astype(np.float32)
xs = sharding.shard_workers({"a": jnp.asarray(X), "b": jnp.asarray(X[:, 0, 0])}, mesh)
OPS = r"(all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)"
mixers = {}
for g, make in GRAPHS.items():
    for method in ("auto", "shift", "gather", "dense"):
        mixers[f"{g}/{method}"] = sharding.ppermute_gossip(make(), mesh, method=method)
ys = jax.jit(lambda t: {k: m(t, 0) for k, m in mixers.items()})(xs)
for k, y in ys.items():
    out[f"mix/{k}/a"], out[f"mix/{k}/b"] = np.asarray(y["a"]), np.asarray(y["b"])
    meta[k] = {"name": mixers[k].name, "spec": str(y["a"].sharding.spec)}
for k in ("ring/auto", "torus/auto", "exponential/auto", "regular/auto", "ring/gather"):
    hlo = jax.jit(lambda t, m=mixers[k]: m(t, 0)).lower(xs).compile().as_text()
    meta[k]["ops"] = sorted(set(re.findall(OPS, hlo)))
    meta[k]["messages"] = re.findall(r"= (\S+) collective-permute(?:-start)?\(", hlo)
    meta[k]["whole_block_packed"] = "f32[4,7]" in hlo  # all local rows of a and b
one_peer = gossip.time_varying(
    [sharding.ppermute_gossip(W, mesh) for W in topology.one_peer_exponential(N)])
step3 = jax.jit(lambda v: one_peer(one_peer(one_peer(v, 0), 1), 2))
out["mix/one_peer/a"] = np.asarray(step3(xs)["a"])
for bad in (lambda: sharding.shard_workers(jnp.ones((12, 2)), mesh),
            lambda: sharding.ppermute_gossip(topology.mixing_matrix(
                topology.ring(12)), mesh)):
    try:
        bad()
        meta.setdefault("errors", []).append(None)
    except ValueError as e:
        meta.setdefault("errors", []).append(str(e))

for algo_name in ("dsgd", "gradient_tracking"):
    for g in ("ring", "torus", "exponential"):
        W = GRAPHS[g]()
        evaluate = (algo_name, g) == ("dsgd", "ring")
        for sharded in (False, True):
            algo, state, sampler, ev = problem(
                algo_name, W, mesh if sharded else None, evaluate=evaluate)
            state, hist = jd.run(algo, state, sampler, jax.random.key(1), 4,
                                 eval_every=4 if evaluate else None, eval_fn=ev,
                                 progress=False)
            tag = f"run/{algo_name}/{g}/{'sharded' if sharded else 'single'}"
            flat = jax.tree_util.tree_leaves_with_path(state.params)
            for p, v in flat:
                out[f"{tag}/params/{jd.tree.path_str(p)}"] = np.asarray(v)
            for k, v in hist.eval.items():
                out[f"{tag}/eval/{k}"] = v
            out[f"{tag}/loss"] = hist.train["loss"]
            sh = flat[0][1].sharding
            meta[tag] = {"spec": str(getattr(sh, "spec", None)),
                         "devices": len(sh.device_set)}
np.savez(sys.argv[1] + ".npz", **out)
json.dump(meta, open(sys.argv[1] + ".json", "w"))
"""


def _data(n):
    """Gaussian blobs, 4 classes in 6-D: per-worker training sets and a test set."""
    r = np.random.default_rng(0)
    centers = r.normal(size=(4, 6)) * 2.0
    y = r.integers(0, 4, size=(n, 24))
    x = (centers[y] + r.normal(size=(n, 24, 6))).astype(np.float32)
    yt = r.integers(0, 4, size=64)
    xt = (centers[yt] + r.normal(size=(64, 6))).astype(np.float32)
    return jd.data.from_worker_arrays(x, y), xt, yt


def _init(n, hidden):
    r = np.random.default_rng(1)
    return {
        "w1": jnp.asarray(r.normal(size=(n, 6, hidden)) / 3, jnp.float32),
        "b1": jnp.zeros((n, hidden), jnp.float32),
        "w2": jnp.asarray(r.normal(size=(n, hidden, 4)) / 3, jnp.float32),
        "b2": jnp.zeros((n, 4), jnp.float32),
    }


def apply(p, x):
    """One worker's 6 -> hidden -> 4 tanh MLP (logits)."""
    return jnp.tanh(x @ p["w1"] + p["b1"][None]) @ p["w2"] + p["b2"][None]


def loss_fn(p, batch, key):
    x, y = batch
    logits = apply(p, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def problem(algo_name, W, mesh=None, n=N, hidden=8, evaluate=True, loss=loss_fn):
    """D-SGD / gradient tracking on a small softmax-MLP classification problem.

    With ``mesh``: ppermute gossip, state and sampler sharded, sharded evaluator;
    without: gossip.sparse and metrics.evaluator on one device."""
    data, xt, yt = _data(n)
    params = _init(n, hidden)
    make = getattr(jd.algorithms, algo_name)
    sampler = jd.data.make_sampler(data, 8)
    if mesh is None:
        algo = make(loss, optax.sgd(0.2), gossip.sparse(W))
        ev = jd.metrics.evaluator(apply, xt, yt, worker_chunk=8) if evaluate else None
        return algo, algo.init(params), sampler, ev
    algo = make(loss, optax.sgd(0.2), sharding.ppermute_gossip(W, mesh))
    state = sharding.shard_workers(algo.init(params), mesh)
    sampler = sharding.shard_workers(sampler, mesh)
    ev = None
    if evaluate:
        ev = sharding.evaluator(apply, xt, yt, mesh, worker_chunk=2)
    return algo, state, sampler, ev


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("sharded") / "out")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS=FAST)
    res = subprocess.run(
        [sys.executable, "-c", WORKER, base, str(Path(__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    arrays = dict(np.load(base + ".npz"))
    meta = json.loads(Path(base + ".json").read_text())
    assert meta["devices"] == 8
    return arrays, meta


def _x():
    return np.random.default_rng(0).normal(size=(N, 3, 2)).astype(np.float32)


@pytest.mark.parametrize("graph", list(GRAPHS))
@pytest.mark.parametrize("method", ["auto", "shift", "gather", "dense"])
def test_ppermute_gossip_equals_dense_mixing(eight, graph, method):
    arrays, meta = eight
    W = GRAPHS[graph]()
    X = _x().astype(np.float64)
    ref = np.einsum("ij,jkl->ikl", W, X)  # plain NumPy W X
    got = arrays[f"mix/{graph}/{method}/a"]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        arrays[f"mix/{graph}/{method}/b"], ref[:, 0, 0], rtol=1e-5, atol=1e-5
    )
    dense = np.asarray(gossip.dense(W)({"a": jnp.asarray(_x())}, 0)["a"])
    np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-6)
    assert meta[f"{graph}/{method}"]["spec"] == "P('workers',)"


def test_neighbour_gossip_is_real_collective_permute(eight):
    _, meta = eight
    for g in ("ring", "torus", "exponential"):  # few shifts: ppermute only
        assert meta[f"{g}/auto"]["ops"] == ["collective-permute"], meta[f"{g}/auto"]
        assert meta[f"{g}/auto"]["name"].startswith("ppermute")
    # a ring moves one row per direction: both leaves' rows (3 * 2 + 1 floats)
    # packed in one message, never a whole leaf
    assert [m.split("{")[0] for m in meta["ring/auto"]["messages"]] == ["f32[1,7]"] * 2
    assert not meta["ring/auto"]["whole_block_packed"]
    assert meta["ring/shift"]["name"] == f"ppermute(n={N}, D=8, shifts=3)"
    assert meta["torus/shift"]["name"] == f"ppermute(n={N}, D=8, shifts=7)"
    # a random regular graph has ~n distinct shifts: all-gather fallback
    assert meta["regular/auto"]["name"].startswith("sharded_gather")
    assert "all-gather" in meta["regular/auto"]["ops"]
    assert "collective-permute" not in meta["ring/gather"]["ops"]


def test_one_peer_time_varying_ppermute(eight):
    arrays, _ = eight
    Ws = topology.one_peer_exponential(N)
    ref = _x().astype(np.float64)
    for t in range(3):
        ref = np.einsum("ij,jkl->ikl", Ws[t % len(Ws)], ref)
    np.testing.assert_allclose(arrays["mix/one_peer/a"], ref, rtol=1e-5, atol=1e-5)


def test_indivisible_worker_count_raises(eight):
    _, meta = eight
    for msg in meta["errors"]:
        assert msg is not None and "cannot be split evenly over 8 devices" in msg


@pytest.mark.parametrize("algo_name", ["dsgd", "gradient_tracking"])
@pytest.mark.parametrize("graph", ["ring", "torus", "exponential"])
def test_sharded_run_matches_single_device(eight, algo_name, graph):
    arrays, meta = eight
    a, b = f"run/{algo_name}/{graph}/sharded", f"run/{algo_name}/{graph}/single"
    keys = [k for k in arrays if k.startswith(a + "/")]
    assert any("/params/" in k for k in keys)
    if (algo_name, graph) == ("dsgd", "ring"):  # sharded evaluator vs metrics.evaluator
        assert sum("/eval/" in k for k in keys) == 7
    for k in keys:
        ref = arrays[b + k[len(a) :]]
        np.testing.assert_allclose(arrays[k], ref, rtol=2e-5, atol=2e-6, err_msg=k)
    # the final state is still split over all 8 devices
    assert meta[a] == {"spec": "P('workers',)", "devices": 8}
    assert meta[b]["devices"] == 1
    # training did something: the loss moved
    loss = arrays[f"{a}/loss"]
    assert np.isfinite(loss).all() and loss[-1] < loss[0]


_METHODS3 = ("shift", "gather", "dense")


def test_single_device_mesh_matches_sparse():
    """The sharded mixers also run on a 1-device mesh (this process)."""
    mesh = sharding.worker_mesh(jax.devices()[:1])
    W = GRAPHS["torus"]()
    x = {"a": jnp.asarray(_x())}
    ref = np.einsum("ij,jkl->ikl", W, _x().astype(np.float64))
    mixers = [sharding.ppermute_gossip(W, mesh, method=m) for m in _METHODS3]
    outs = jax.jit(lambda t: [m(t, 0)["a"] for m in mixers])(x)
    for got in outs:
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


def test_shift_decomposition_rebuilds_w():
    for make in GRAPHS.values():
        W = make()
        parts = sharding.shift_decomposition(W)
        rebuilt = np.zeros_like(W)
        i = np.arange(N)
        for s, a in parts.items():
            rebuilt[i, (i + s) % N] += a
        np.testing.assert_array_equal(rebuilt, W)
    assert sorted(sharding.shift_decomposition(GRAPHS["torus"]())) == [
        0,
        1,
        7,
        8,
        24,
        25,
        31,
    ]


def test_bad_method_raises():
    mesh = sharding.worker_mesh(jax.devices()[:1])
    with pytest.raises(ValueError, match="method must be one of"):
        sharding.ppermute_gossip(GRAPHS["ring"](), mesh, method="ring")


# ----------------------------------------------------------------------- donation


def _ring8():
    return topology.mixing_matrix(topology.ring(8))


def _fresh(algo_name):
    return problem(algo_name, _ring8(), n=8)[1]


def _probe(s):  # a cheap eval hook: reads the state between donated chunks
    return {"w1": jnp.sum(s.params["w1"]), "y": jnp.sum(s.tracker["b2"])}


def _run(donate, algo_name="dsgd", state=None):
    algo, st, sampler, _ = problem(algo_name, _ring8(), n=8, evaluate=False)
    st = st if state is None else state
    return st, jd.run(
        algo,
        st,
        sampler,
        jax.random.key(3),
        6,
        eval_every=2,
        eval_fn=_probe,
        progress=False,
        donate=donate,
    )


def test_donation_does_not_change_results():
    algo_name = "gradient_tracking"  # its init shares one zeros array in two leaves
    _, (s0, h0) = _run(False, algo_name)
    # donate=True: the caller's state stays valid and unchanged (a device copy is
    # the snapshot: a NumPy view would pin the buffers and block donation)
    init = _fresh(algo_name)
    snap = jax.tree.map(lambda x: x.copy(), init)
    _, (s1, h1) = _run(True, algo_name, state=init)
    assert not any(x.is_deleted() for x in jax.tree.leaves(init))
    jax.tree.map(np.testing.assert_array_equal, init, snap)
    # donate="input": the caller's buffers are consumed (gradient tracking's init
    # uses one zeros array for two leaves: still fine)
    init2 = _fresh(algo_name)
    _, (s2, h2) = _run("input", algo_name, state=init2)
    assert all(x.is_deleted() for x in jax.tree.leaves(init2))
    for s in (s1, s2):
        jax.tree.map(np.testing.assert_array_equal, s0, s)
    for h in (h1, h2):
        for k in h0.train:
            np.testing.assert_array_equal(h0.train[k], h.train[k])
        for k in h0.eval:
            np.testing.assert_array_equal(h0.eval[k], h.eval[k])


def test_bad_donate_raises():
    algo, st, sampler, _ = problem("dsgd", _ring8(), n=8)
    with pytest.raises(ValueError, match="donate must be"):
        jd.run(algo, st, sampler, jax.random.key(0), 2, donate="yes", progress=False)


# ------------------------------------------------------------------------ bfloat16


def test_bfloat16_mixing_accumulates_in_float32():
    W = GRAPHS["torus"]()
    x = jnp.asarray(_x(), jnp.bfloat16)
    exact = np.einsum("ij,jkl->ikl", W, np.asarray(x, np.float64))
    want = np.asarray(jnp.asarray(exact, jnp.float32).astype(jnp.bfloat16), np.float64)
    mesh = sharding.worker_mesh(jax.devices()[:1])
    mixers = (gossip.sparse(W), sharding.ppermute_gossip(W, mesh))
    for got in jax.jit(lambda t: [m({"a": t}, 0)["a"] for m in mixers])(x):
        assert got.dtype == jnp.bfloat16
        # float32 accumulation, one rounding to bfloat16: within one bf16 ulp
        ulp = np.abs(want) * 2.0**-7 + 1e-30
        assert np.all(np.abs(np.asarray(got, np.float64) - want) <= ulp)


def test_bfloat16_params_track_float32_run():
    W = _ring8()
    algo, st, sampler, _ = problem("dsgd", W, n=8)
    s32, h32 = jd.run(algo, st, sampler, jax.random.key(0), 5, progress=False)
    loss = sharding.float32_loss(loss_fn)
    algo16 = jd.algorithms.dsgd(loss, optax.sgd(0.2), gossip.sparse(W))
    # the same problem with the parameters stored in bfloat16
    st16 = algo16.init(sharding.cast_floats(st.params, jnp.bfloat16))
    s16, h16 = jd.run(algo16, st16, sampler, jax.random.key(0), 5, progress=False)
    for a, b in zip(
        jax.tree.leaves(s16.params), jax.tree.leaves(s32.params), strict=True
    ):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0.05, atol=0.02)
    np.testing.assert_allclose(h16.train["loss"], h32.train["loss"], rtol=0.02)
    assert sharding.cast_floats({"i": jnp.arange(3)})["i"].dtype == jnp.int32


def test_gather_returns_host_arrays_and_keys():
    tree = {
        "x": jnp.arange(6.0).reshape(3, 2),
        "k": jax.random.split(jax.random.key(2), 3),
        "i": jnp.int32(4),
    }
    got = sharding.gather(tree)
    assert isinstance(got["x"], np.ndarray) and isinstance(got["i"], np.ndarray)
    np.testing.assert_array_equal(got["x"], np.arange(6.0).reshape(3, 2))
    assert jax.dtypes.issubdtype(got["k"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(
        np.asarray(jax.random.key_data(got["k"])),
        np.asarray(jax.random.key_data(tree["k"])),
    )
