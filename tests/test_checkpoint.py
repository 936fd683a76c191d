"""Checkpoints and resume: bit-identical resumption for every algorithm, atomicity,
corruption detection, keep-last-k, divergence keeps the last good checkpoint,
``optax.apply_if_finite`` against a NumPy loop, determinism across processes, and no
pickle anywhere in the package."""

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdec as jd
from jaxdec import checkpoint as jckpt
from jaxdec import gossip, topology
from jaxdec.run import Diverged, History

N, D, M = 6, 3, 40
ROOT = Path(__file__).resolve().parents[1]

ALGORITHMS = {
    "dsgd": lambda loss, opt, mix: jd.algorithms.dsgd(loss, opt, mix),
    "gradient_tracking": lambda loss, opt, mix: jd.algorithms.gradient_tracking(
        loss, opt, mix
    ),
}
# algorithms landed by other modules, picked up when present
if hasattr(jd.algorithms, "proxgt"):
    from jaxdec import prox as _prox

    ALGORITHMS["proxgt"] = lambda loss, opt, mix: jd.algorithms.proxgt(
        loss, _prox.l1(1e-3), mix, optimizer=opt, prox_step=0.05
    )


def _problem(seed=0):
    r = np.random.default_rng(seed)
    a = jnp.asarray(r.normal(size=(N, M, D)), jnp.float32)
    y = jnp.asarray(np.einsum("nmd,nd->nm", np.asarray(a), r.normal(size=(N, D))))

    def sampler(key, step):
        idx = jax.random.randint(key, (N, 8), 0, M)
        return jnp.take_along_axis(a, idx[..., None], 1), jnp.take_along_axis(y, idx, 1)

    def loss(params, batch, key):
        aa, yy = batch
        noise = 1e-3 * jax.random.normal(key, ())  # uses the algorithm key too
        return jnp.mean((aa @ params["w"] + params["b"] - yy) ** 2) + noise

    def eval_fn(s):
        pred = jnp.einsum("nmd,nd->nm", a, s.params["w"]) + s.params["b"][:, None]
        return {"mse": jnp.mean((pred - y) ** 2)}

    return sampler, loss, eval_fn


def _build(name="dsgd", lr=0.05, opt=None):
    sampler, loss, eval_fn = _problem()
    W = topology.mixing_matrix(topology.ring(N))
    opt = (
        optax.chain(optax.clip_by_global_norm(5.0), optax.adam(lr))
        if opt is None
        else opt
    )
    algo = ALGORITHMS[name](loss, opt, gossip.sparse(W))
    state = algo.init({"w": jnp.zeros((N, D)), "b": jnp.zeros((N,))})
    return algo, state, sampler, eval_fn


def _assert_trees_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_hist_equal(h1, h2):
    assert h1.train.keys() == h2.train.keys()
    for k in h1.train:
        np.testing.assert_array_equal(h1.train[k], h2.train[k])
    np.testing.assert_array_equal(h1.eval_steps, h2.eval_steps)
    for k in h1.eval:
        np.testing.assert_array_equal(h1.eval[k], h2.eval[k])
    assert len(h1.wall_time) == len(h2.wall_time)


class _Crash(Exception):
    pass


def _crash_after(monkeypatch, n_saves):
    """Make the process 'die' right after its ``n_saves``-th checkpoint."""
    real = jckpt.Checkpointer.save
    count = {"n": 0}

    def save(self, *a, **k):
        out = real(self, *a, **k)
        count["n"] += 1
        if count["n"] == n_saves:
            raise _Crash
        return out

    monkeypatch.setattr(jckpt.Checkpointer, "save", save)
    return lambda: monkeypatch.setattr(jckpt.Checkpointer, "save", real)


RUN = {"eval_every": 5, "progress": False}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_resume_is_bit_identical(name, tmp_path, monkeypatch):
    algo, state, sampler, eval_fn = _build(name)
    key = jax.random.key(7)
    ref_state, ref_hist = jd.run(algo, state, sampler, key, 33, eval_fn=eval_fn, **RUN)
    ckdir = tmp_path / "ck"
    # crash twice (after the 2nd and after 3 more checkpoints), resuming each time
    for n_saves in (2, 3):
        undo = _crash_after(monkeypatch, n_saves)
        with pytest.raises(_Crash):
            jd.run(
                algo, state, sampler, key, 33, eval_fn=eval_fn,
                checkpoint_dir=ckdir, resume=True, keep_checkpoints=2, **RUN,
            )  # fmt: skip
        undo()
    assert jckpt.latest_step(ckdir) == 25
    assert jckpt.all_steps(ckdir) == [20, 25]  # keep-last-k
    s, h = jd.run(
        algo, state, sampler, key, 33, eval_fn=eval_fn,
        checkpoint_dir=ckdir, resume=True, keep_checkpoints=2, **RUN,
    )  # fmt: skip
    _assert_trees_equal(s, ref_state)
    _assert_hist_equal(h, ref_hist)
    assert int(s.count) == 33
    assert jckpt.latest_step(ckdir) == 33  # the final partial chunk is saved too
    if name != "dsgd":
        return
    # resuming a finished run returns its final state without stepping
    s2, h2 = jd.run(
        algo, state, sampler, key, 33, eval_fn=eval_fn,
        checkpoint_dir=ckdir, resume=True, **RUN,
    )  # fmt: skip
    _assert_trees_equal(s2, ref_state)
    _assert_hist_equal(h2, ref_hist)


class _ServerState(NamedTuple):
    params: dict
    opt_state: tuple
    server: jax.Array
    rng: jax.Array
    count: jax.Array


def test_generic_pytree_roundtrip_with_keys_and_history(tmp_path):
    opt = optax.adamw(0.1)
    params = {"a": jnp.arange(12.0).reshape(N, 2), "b": {"c": jnp.ones((N, 2, 2))}}
    st = _ServerState(
        params=params,
        opt_state=jax.vmap(opt.init)(params),
        server=jnp.float32(3.5),
        rng=jax.random.split(jax.random.key(1), N),
        count=jnp.int32(4),
    )
    hist = History(
        train={"loss": np.array([1.5, np.nan, np.inf], np.float32),
               "ok": np.array([True, False, True])},
        eval_steps=np.array([0, 3]),
        eval={"acc": np.array([0.1, 0.2])},
        wall_time=[0.5],
    )  # fmt: skip
    tree = {"state": st, "key": jax.random.key(9)}
    jckpt.save(tmp_path, 4, tree, history=hist, metadata={"note": "x"})
    zeros = jax.tree.map(
        lambda x: x if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else 0 * x,
        tree,
    )
    got = jckpt.restore(tmp_path, zeros)
    _assert_trees_equal(got.tree, tree)
    assert isinstance(got.tree["state"], _ServerState)
    assert got.tree["state"].rng.shape == (N,)
    assert got.step == 4 and got.metadata == {"note": "x"}
    for k in hist.train:
        np.testing.assert_array_equal(got.history.train[k], hist.train[k])
        assert got.history.train[k].dtype == hist.train[k].dtype
    np.testing.assert_array_equal(got.history.eval["acc"], hist.eval["acc"])
    # a template of another structure / shape is refused with a pointer to the fix
    with pytest.raises(ValueError, match="like= built"):
        jckpt.restore(tmp_path, {"state": st._replace(server=jnp.zeros(2)), "key": 0})
    with pytest.raises(ValueError, match="different tree"):
        jckpt.restore(tmp_path, {"state": st})
    with pytest.raises(ValueError, match="already has a checkpoint"):
        jckpt.save(tmp_path, 4, tree)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 15-step run checkpointed every 5 steps, and the uninterrupted 20-step run."""
    algo, state, sampler, _ = _build()
    key = jax.random.key(0)
    d = tmp_path_factory.mktemp("saved") / "ck"
    jd.run(algo, state, sampler, key, 15, checkpoint_dir=d, **RUN)
    ref = jd.run(algo, state, sampler, key, 20, **RUN)
    return algo, state, sampler, key, d, ref


def _copy(saved, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(saved[4], d)
    return d


def test_unfinished_checkpoint_is_invisible(saved, tmp_path):
    algo, state, sampler, key, _, _ = saved
    d = _copy(saved, tmp_path)
    assert jckpt.all_steps(d) == [5, 10, 15]
    # a writer killed mid-save leaves orbax's temporary directory, never "<step>"
    (d / "15").rename(d / "20.orbax-checkpoint-tmp-1234567")
    assert jckpt.latest_step(d) == 10
    with pytest.raises(FileNotFoundError):
        jckpt.restore(d, {"state": state, "key": key}, step=20)
    assert jckpt.latest_step(tmp_path / "missing") is None


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_checkpoint_never_loads_wrong_content(saved, tmp_path, damage):
    """Damage every file of a checkpoint in turn: restore either raises
    CorruptCheckpoint or returns exactly the saved content (a file it does not
    need), never anything else."""
    _, state, _, key, _, _ = saved
    like = {"state": state, "key": key}
    good = jckpt.restore(saved[4], like, step=15)
    files = sorted(p for p in (saved[4] / "15").rglob("*") if p.is_file())
    assert len(files) >= 5
    detected = 0
    for k, f in enumerate(files):
        d = tmp_path / f"c{k}"
        shutil.copytree(saved[4], d)
        target = d / f.relative_to(saved[4])
        raw = bytearray(target.read_bytes())
        if damage == "flip":
            for pos in range(0, len(raw), max(1, len(raw) // 3)):
                raw[pos] ^= 0x5A
            target.write_bytes(bytes(raw))
        elif damage == "truncate":
            target.write_bytes(bytes(raw[: len(raw) // 2]))
        else:
            target.unlink()
        try:
            got = jckpt.restore(d, like, step=15)
        except jckpt.CorruptCheckpoint:
            detected += 1
            continue
        except FileNotFoundError:  # step no longer listed as finalized
            detected += 1
            continue
        _assert_trees_equal(got.tree, good.tree)
        _assert_hist_equal(got.history, good.history)
    assert detected >= 3


def test_tampered_metadata_fails_checksum(saved, tmp_path):
    _, state, _, key, _, _ = saved
    d = _copy(saved, tmp_path)
    meta = d / "15" / "meta" / "metadata"
    text = meta.read_text()
    assert '"eval_every": 5' in text
    meta.write_text(text.replace('"eval_every": 5', '"eval_every": 6', 1))
    with pytest.raises(jckpt.CorruptCheckpoint, match="checksum"):
        jckpt.restore(d, {"state": state, "key": key}, step=15)


def test_resume_skips_corrupt_checkpoint(saved, tmp_path, capsys):
    algo, state, sampler, key, _, (ref, ref_h) = saved
    d = _copy(saved, tmp_path)
    data = max(
        (p for p in (d / "15" / "state").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    data.write_bytes(bytes(raw))
    # the newest checkpoint is unusable: resume from step 10, move 15 aside, and
    # still land on the uninterrupted trajectory
    s, h = jd.run(algo, state, sampler, key, 20, checkpoint_dir=d, resume=True, **RUN)
    err = capsys.readouterr().err
    assert "skipping" in err and "15.corrupt" in err
    assert (d / "15.corrupt").is_dir()
    _assert_trees_equal(s, ref)
    _assert_hist_equal(h, ref_h)
    assert jckpt.all_steps(d) == [10, 15, 20]


def test_run_checkpoint_argument_errors(saved, tmp_path):
    algo, state, sampler, key, _, _ = saved
    d = _copy(saved, tmp_path)
    with pytest.raises(ValueError, match="resume=True"):
        jd.run(algo, state, sampler, key, 15, checkpoint_dir=d, **RUN)
    with pytest.raises(ValueError, match="needs checkpoint_dir"):
        jd.run(algo, state, sampler, key, 15, resume=True, **RUN)
    with pytest.raises(ValueError, match="different key"):
        jd.run(
            algo, state, sampler, jax.random.key(1), 15,
            checkpoint_dir=d, resume=True, **RUN,
        )  # fmt: skip
    with pytest.raises(ValueError, match="past the end"):
        jd.run(algo, state, sampler, key, 10, checkpoint_dir=d, resume=True, **RUN)
    with pytest.raises(ValueError, match="checkpoint_every"):
        jd.run(algo, state, sampler, key, 10, checkpoint_dir=d, checkpoint_every=0)
    with pytest.raises(ValueError, match="max_to_keep"):
        jckpt.Checkpointer(tmp_path / "x", max_to_keep=0)


def test_divergence_keeps_last_good_checkpoint(tmp_path):
    algo, state, sampler, _ = _build(lr=50.0, opt=optax.sgd(50.0))
    key = jax.random.key(0)
    d = tmp_path / "ck"
    with pytest.raises(Diverged, match="Last good checkpoint"):
        jd.run(
            algo, state, sampler, key, 40, checkpoint_dir=d, on_nonfinite="raise",
            **RUN,
        )  # fmt: skip
    s, h = jd.run(algo, state, sampler, key, 40, checkpoint_dir=tmp_path / "ck2", **RUN)
    assert h.diverged_at is not None
    last = jckpt.latest_step(tmp_path / "ck2")
    # the newest checkpoint is the end of the last chunk before the divergence
    assert last == (h.diverged_at // 5) * 5
    got = jckpt.restore(tmp_path / "ck2", {"state": state, "key": key})
    for leaf in jax.tree.leaves(got.tree["state"].params):
        assert np.isfinite(np.asarray(leaf)).all()
    assert np.isfinite(got.history.train["loss"]).all()
    assert got.history.num_steps == last
    # with "ignore" the run goes on, but a state holding NaN/inf is never saved
    _, h3 = jd.run(
        algo, state, sampler, key, 40, checkpoint_dir=tmp_path / "ck3",
        on_nonfinite="ignore", **RUN,
    )  # fmt: skip
    assert h3.num_steps == 40
    got3 = jckpt.restore(tmp_path / "ck3", {"state": state, "key": key})
    assert last <= got3.step < 40
    for leaf in jax.tree.leaves(got3.tree["state"].params):
        assert np.isfinite(np.asarray(leaf)).all()


def test_apply_if_finite_skips_poisoned_updates_like_numpy():
    """Worker 2's data hold a NaN at steps 3 and 7: with optax.apply_if_finite its
    update is skipped there (x_i <- sum_j W_ij (x_j + ok_j u_j)), others proceed."""
    n, d, lr, steps = 4, 3, 0.1, 10
    r = np.random.default_rng(0)
    A = r.normal(size=(n, d)).astype(np.float32)
    W = topology.mixing_matrix(topology.ring(n))
    poisoned = {3, 7}

    def sampler(key, step):
        bad = jnp.isin(step, jnp.array(sorted(poisoned))) & (jnp.arange(n) == 2)
        return jnp.where(bad[:, None], jnp.nan, jnp.asarray(A))

    def loss(params, a, key):
        return 0.5 * jnp.sum((params["x"] - a) ** 2)

    opt = optax.apply_if_finite(optax.sgd(lr), max_consecutive_errors=5)
    algo = jd.algorithms.dsgd(loss, opt, gossip.dense(W))
    state = algo.init({"x": jnp.zeros((n, d))})
    s, h = jd.run(
        algo, state, sampler, jax.random.key(0), steps, eval_every=5,
        progress=False, on_nonfinite="ignore",
    )  # fmt: skip
    x = np.zeros((n, d))
    for t in range(steps):
        ok = np.ones(n)
        if t in poisoned:
            ok[2] = 0.0
        u = -lr * (x - A) * ok[:, None]
        x = W @ (x + u)
    np.testing.assert_allclose(np.asarray(s.params["x"]), x, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        h.train["nonfinite_workers"], [int(t in poisoned) for t in range(steps)]
    )
    # without the wrapper the NaN spreads through gossip and the run stops
    plain = jd.algorithms.dsgd(loss, optax.sgd(lr), gossip.dense(W))
    _, h2 = jd.run(
        plain, plain.init({"x": jnp.zeros((n, d))}), sampler, jax.random.key(0),
        steps, eval_every=5, progress=False,
    )  # fmt: skip
    assert h2.diverged_at == 3


_DETERMINISM_SCRIPT = textwrap.dedent(
    """
    import hashlib, jax, jax.numpy as jnp, numpy as np, optax
    import jaxdec as jd
    n, d = 6, 5
    a = jax.random.normal(jax.random.key(0), (n, 50, d))
    y = jnp.sin(a.sum(-1))

    def sampler(key, step):
        idx = jax.random.randint(key, (n, 8), 0, 50)
        return jnp.take_along_axis(a, idx[..., None], 1), jnp.take_along_axis(y, idx, 1)

    def loss(p, batch, key):
        aa, yy = batch
        h = jnp.tanh(aa @ p["w1"] + 0.1 * jax.random.normal(key, (8, 4)))
        return jnp.mean((h @ p["w2"] - yy) ** 2)

    params = {"w1": jax.random.normal(jax.random.key(1), (n, d, 4)),
              "w2": jax.random.normal(jax.random.key(2), (n, 4))}
    W = jd.topology.mixing_matrix(jd.topology.ring(n))
    algo = jd.algorithms.gradient_tracking(loss, optax.adam(1e-2), jd.gossip.sparse(W))
    s, h = jd.run(algo, algo.init(params), sampler, jax.random.key(3), 20,
                  eval_every=7, progress=False)
    hsh = hashlib.sha256()
    for leaf in jax.tree.leaves(s):
        hsh.update(np.asarray(leaf).tobytes())
    hsh.update(np.asarray(h.train["loss"]).tobytes())
    print("DIGEST", hsh.hexdigest(), float(h.train["loss"][-1]))
    """
)


def test_same_seed_same_bits_across_processes():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _DETERMINISM_SCRIPT],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    digests = [ln for out in outs for ln in out.splitlines() if "DIGEST" in ln]
    assert len(digests) == 2
    assert digests[0] == digests[1]


_UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "shelve", "marshal"}


def test_no_pickle_anywhere_in_package():
    """No module imports a pickle-like loader and nothing passes allow_pickle=True
    (np.load defaults to allow_pickle=False)."""
    offenders = []
    files = sorted((ROOT / "jaxdec").rglob("*.py")) + sorted(
        (ROOT / "experiments").rglob("*.py")
    )
    assert len(files) > 10
    for path in files:
        src = path.read_text()
        if "allow_pickle=True" in src.replace(" ", ""):
            offenders.append(f"{path}: allow_pickle=True")
        for node in ast.walk(ast.parse(src)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            bad = _UNSAFE_MODULES.intersection(names)
            if bad:
                offenders.append(f"{path}:{node.lineno}: imports {sorted(bad)}")
            if (
                isinstance(node, ast.keyword)
                and node.arg == "allow_pickle"
                and not (isinstance(node.value, ast.Constant) and not node.value.value)
            ):
                offenders.append(f"{path}:{node.value.lineno}: allow_pickle")
    assert not offenders, offenders


@pytest.mark.slow
def test_cli_run_checkpoint_and_resume(tmp_path, capsys):
    """`jaxdec run --checkpoint-dir D` then `--resume` with more steps continues the
    run exactly where a longer uninterrupted run would be."""
    from jaxdec.cli import ExperimentConfig, build, main

    flags = ["run", "--n-workers", "4", "--hidden", "8", "--batch-size", "8"]
    flags += ["--eval-every", "10", "--no-progress"]
    d, ref = tmp_path / "ck", tmp_path / "ref"
    assert main([*flags, "--steps", "20", "--checkpoint-dir", str(d)]) == 0
    assert main([*flags, "--steps", "20", "--checkpoint-dir", str(d)]) == 2
    assert "resume=True" in capsys.readouterr().err
    assert main([*flags, "--steps", "30", "--checkpoint-dir", str(d), "--resume"]) == 0
    assert main([*flags, "--steps", "30", "--checkpoint-dir", str(ref)]) == 0
    assert jckpt.all_steps(d) == [10, 20, 30]
    cfg = ExperimentConfig(n_workers=4, hidden=(8,), batch_size=8)
    like = {"state": build(cfg)["state"], "key": jax.random.key(cfg.seed + 1)}
    got, want = jckpt.restore(d, like), jckpt.restore(ref, like)
    _assert_trees_equal(got.tree, want.tree)
    _assert_hist_equal(got.history, want.history)


# ---------------------------------------------------------- content fingerprints
_M32 = 0xFFFFFFFF


def _fmix32(h):
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _reference_fingerprint(a: np.ndarray) -> str:
    """The fingerprint's equation as a plain Python loop over the array's
    little-endian words (bool / 1- and 2-byte items zero-extended)."""
    a = np.ascontiguousarray(a)
    if a.dtype.kind == "c":
        a = np.stack([a.real, a.imag], -1)
    size = a.dtype.itemsize
    fmt = {1: "<u1", 2: "<u2", 4: "<u4", 8: "<u4"}[size]
    words = [int(w) for w in np.frombuffer(a.tobytes(), fmt)]
    lanes = []
    for seed in (0x9E3779B9, 0x7F4A7C15):
        acc = 0
        for i, w in enumerate(words):
            acc = (acc + _fmix32(w ^ _fmix32((i + seed) & _M32))) & _M32
        lanes.append(f"{acc:08x}")
    return "".join(lanes)


def _fp_cases():
    r = np.random.default_rng(3)
    x = r.normal(size=(6, 5, 3)).astype(np.float32)
    return {
        "float32": x,
        "bfloat16": x[:, 0].astype(jnp.bfloat16),
        "int8": r.integers(-128, 127, size=(7, 3)).astype(np.int8),
        "bool": r.random((5, 4)) > 0.5,
        "uint32 scalar": np.uint32(0xDEADBEEF),
        "complex64": (x[:, :, 0] + 1j * x[:, :, 1]).astype(np.complex64),
        "float64 (host)": r.normal(size=(4, 3)),
        "empty": np.zeros((0, 3), np.float32),
    }


@pytest.mark.parametrize("name", list(_fp_cases()))
def test_fingerprint_matches_python_reference(name):
    a = _fp_cases()[name]
    want = _reference_fingerprint(np.asarray(a))
    assert jckpt.fingerprints([np.asarray(a)]) == [want]  # host
    if np.asarray(a).dtype.itemsize < 8 or np.asarray(a).dtype.kind == "c":
        assert jckpt.fingerprints([jnp.asarray(a)]) == [want]  # on the device


def test_fingerprint_sees_any_change():
    x = np.random.default_rng(0).normal(size=(64, 9)).astype(np.float32)
    base = jckpt.fingerprints([jnp.asarray(x)])[0]
    flipped = x.copy()
    flipped.view(np.uint32)[17, 4] ^= 1  # one bit of one value
    swapped = x.copy()
    swapped[[3, 40]] = swapped[[40, 3]]  # same values, other places
    for y in (flipped, swapped, x.reshape(9, 64)):
        fp = jckpt.fingerprints([jnp.asarray(y)])[0]
        if y.shape == x.shape:
            # every 32-bit lane changes (a bijection per word under the sum)
            assert len(fp) == 16
            assert all(fp[k : k + 8] != base[k : k + 8] for k in (0, 8))
        else:  # same words in the same order: the shape lives in the metadata
            assert fp == base


def test_bfloat16_state_round_trips(tmp_path):
    """bfloat16 leaves (``jd.sharding`` low-precision storage) restore exactly."""
    w = (jnp.arange(24.0).reshape(N, 4) / 7).astype(jnp.bfloat16)
    tree = {"w": w, "m": w.astype(jnp.float32), "key": jax.random.key(2)}
    jckpt.save(tmp_path, 3, tree)
    got = jckpt.restore(tmp_path, jax.tree.map(lambda v: v, tree))
    assert got.tree["w"].dtype == jnp.bfloat16
    _assert_trees_equal(got.tree, tree)


def test_bfloat16_run_resumes_bit_identically(tmp_path):
    """A run with parameters (and Adam moments) stored in bfloat16 resumes from its
    checkpoint onto the uninterrupted trajectory (format v1 could not restore it)."""
    from jaxdec import sharding

    sampler, loss, _ = _problem()
    W = topology.mixing_matrix(topology.ring(N))
    algo = jd.algorithms.dsgd(
        sharding.float32_loss(loss), optax.adam(0.05), gossip.sparse(W)
    )
    params = {"w": jnp.zeros((N, D)), "b": jnp.zeros((N,))}
    state = algo.init(sharding.cast_floats(params, jnp.bfloat16))
    key = jax.random.key(4)
    ref, ref_h = jd.run(algo, state, sampler, key, 10, **RUN)
    assert ref.params["w"].dtype == jnp.bfloat16
    jd.run(algo, state, sampler, key, 5, checkpoint_dir=tmp_path, **RUN)
    s, h = jd.run(algo, state, sampler, key, 10, checkpoint_dir=tmp_path, resume=True,
                  **RUN)  # fmt: skip
    _assert_trees_equal(s, ref)
    _assert_hist_equal(h, ref_h)


def test_reads_version_1_checkpoints(tmp_path):
    """Checkpoints written by format version 1 (arrays gathered on the host, SHA-256
    over their bytes) still load and verify."""
    like = {
        "w": jnp.zeros((4, 3)),
        "count": jnp.int32(0),
        "mask": jnp.zeros(4, bool),
        "key": jax.random.key(0),
    }
    got = jckpt.restore(ROOT / "tests" / "data" / "checkpoint_v1", like)
    assert got.step == 7
    assert got.metadata == {"written_by": "jaxdec checkpoint format v1"}
    # the expression that wrote it (jnp's float32 division)
    want = jnp.arange(12.0, dtype=jnp.float32).reshape(4, 3) / 7
    np.testing.assert_array_equal(np.asarray(got.tree["w"]), np.asarray(want))
    assert int(got.tree["count"]) == 4
    np.testing.assert_array_equal(np.asarray(got.tree["mask"]), [1, 0, 1, 1])
    key_data = np.asarray(jax.random.key_data(got.tree["key"]))
    np.testing.assert_array_equal(key_data, [0, 9])
    np.testing.assert_array_equal(got.history.train["loss"], [1.5, 0.5])
    d = tmp_path / "v1"
    shutil.copytree(ROOT / "tests" / "data" / "checkpoint_v1", d)
    meta = d / "7" / "meta" / "metadata"
    meta.write_text(meta.read_text().replace('"values": [1.5', '"values": [2.5', 1))
    with pytest.raises(jckpt.CorruptCheckpoint, match="checksum"):
        jckpt.restore(d, like)


# Runs with 8 fake devices: a worker-sharded tree is fingerprinted on its devices
# (no all-gather compiled), saved shard by shard, and restored into 8 devices and
# into one device; a one-device checkpoint restores into the 8-device sharding; a
# sharded D-SGD run checkpointed on 8 devices resumes on 4.
_SHARDED = r"""
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 8)
import jax.numpy as jnp, numpy as np
from jaxdec import checkpoint as jckpt, sharding
d = sys.argv[1]
mesh = sharding.worker_mesh()
x = np.random.default_rng(0).normal(size=(32, 5, 3)).astype(np.float32)
tree = {"x": jnp.asarray(x), "h": jnp.asarray(x[:, 0]).astype(jnp.bfloat16),
        "c": jnp.int32(3), "key": jax.random.key(1)}
sh = sharding.shard_workers(tree, mesh)
sh["key"] = jax.device_put(tree["key"], jax.devices()[3])  # a leaf on one device
data = lambda t: [jax.random.key_data(v) if v.dtype == tree["key"].dtype else v
                  for v in jax.tree.leaves(t)]
out = {"fp_sharded": jckpt.fingerprints(data(sh)),
       "fp_single": jckpt.fingerprints(data(tree)),
       "x_spec": str(sh["x"].sharding.spec)}
hlo = jckpt._device_lanes.lower([sh["x"]]).compile().as_text()
out["all_gather"] = "all-gather" in hlo
out["all_reduce"] = "all-reduce" in hlo
jckpt.save(d + "/a", 1, sh)
jckpt.save(d + "/b", 1, tree)
got = {"8->8": jckpt.restore(d + "/a", sh).tree,
       "8->1": jckpt.restore(d + "/a", tree).tree,
       "1->8": jckpt.restore(d + "/b", sh).tree}
for k, t in got.items():
    out[k] = {"x_spec": str(t["x"].sharding.spec) if k != "8->1" else None,
              "devices": len(t["x"].sharding.device_set),
              "equal": all(bool(np.array_equal(np.asarray(a), np.asarray(b)))
                           for a, b in zip(data(t), data(tree)))}
# a sharded run checkpointed on 8 devices resumes on a 4-device mesh (a restart on
# another allocation) and lands where the one-device run does
import jaxdec as jd
sys.path.insert(0, sys.argv[2])
from test_sharding import problem
W = jd.topology.mixing_matrix(jd.topology.ring(16))
run = dict(eval_every=2, progress=False)
algo, st, smp, _ = problem("dsgd", W, mesh, n=16, evaluate=False)
jd.run(algo, st, smp, jax.random.key(5), 4, checkpoint_dir=d + "/run", **run)
mesh4 = sharding.worker_mesh(jax.devices()[:4])
algo, st, smp, _ = problem("dsgd", W, mesh4, n=16, evaluate=False)
junk = jax.tree.map(lambda v: v * 0 + 7, st)
s4, _ = jd.run(algo, junk, smp, jax.random.key(5), 6, checkpoint_dir=d + "/run",
               resume=True, **run)
algo, st, smp, _ = problem("dsgd", W, None, n=16, evaluate=False)
s1, _ = jd.run(algo, st, smp, jax.random.key(5), 6, **run)
out["resumed_devices"] = len(s4.params["w1"].sharding.device_set)
out["resumed_vs_one_device"] = max(
    float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    for a, b in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params)))
print(json.dumps(out))
"""


def test_sharded_checkpoint_is_written_and_verified_shard_by_shard(tmp_path):
    res = subprocess.run(
        [sys.executable, "-c", _SHARDED, str(tmp_path), str(ROOT / "tests")],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": str(ROOT),
            "XLA_FLAGS": "--xla_backend_optimization_level=0",
        },  # fmt: skip
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["x_spec"] == str(jax.sharding.PartitionSpec("workers"))
    # the content fingerprint does not depend on the layout ...
    assert out["fp_sharded"] == out["fp_single"]
    # ... and is computed where the shards live: partial sums, no gather
    assert out["all_reduce"] and not out["all_gather"]
    assert out["8->8"] == {"x_spec": out["x_spec"], "devices": 8, "equal": True}
    assert out["8->1"]["devices"] == 1 and out["8->1"]["equal"]
    assert out["1->8"] == {"x_spec": out["x_spec"], "devices": 8, "equal": True}
    assert out["resumed_devices"] == 4
    assert out["resumed_vs_one_device"] < 1e-5
