"""DePRL and the personalization baselines against NumPy loops of their equations,
plus the DePRL sheet's invariants (section 6)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdec import gossip, topology
from jaxdec import tree as jtree
from jaxdec.algorithms.deprl import DePRLState, deprl, deprl_code_preset, epoch_steps
from jaxdec.algorithms.dsgd import dsgd
from jaxdec.algorithms.personalized import (
    dfedper,
    finetune_head,
    head_mask_of,
    personalized_stationarity,
    round_sampler,
    split_params,
)

N, D, KK, B = 6, 5, 2, 4  # workers, input dim, representation dim, batch


def is_head(path: str) -> bool:
    return path.startswith("head")


def lin_loss(params, batch, key):
    """Linear representation: 0.5 mean_b (x^T B w - y)^2 (ONE worker)."""
    x, y = batch[0], batch[1]
    pred = x @ params["body"]["B"] @ params["head"]["w"]
    return 0.5 * jnp.mean(jnp.square(pred - y))


def _params(n=N, seed=0, same_heads=False):
    r = np.random.default_rng(seed)
    Bm = np.broadcast_to(r.normal(size=(D, KK)), (n, D, KK))
    w = r.normal(size=(1 if same_heads else n, KK))
    w = np.broadcast_to(w, (n, KK))
    return {
        "body": {"B": jnp.asarray(Bm, jnp.float32)},
        "head": {"w": jnp.asarray(w, jnp.float32)},
    }


def _batches(rounds, steps, n=N, seed=1):
    r = np.random.default_rng(seed)
    x = r.normal(size=(rounds, n, steps, B, D)).astype(np.float32)
    y = r.normal(size=(rounds, n, steps, B)).astype(np.float32)
    return x, y


def _W(n=N):
    return topology.mixing_matrix(topology.erdos_renyi(n, 0.5, seed=3))


def np_deprl(p, xs, ys, W, tau, sb, lr_h, lr_b, mom, order, reset, gamma, single):
    """NumPy loop of the sheet's steps 1-4 (float64), all rounds."""
    Bm = np.array(p["body"]["B"], np.float64)
    w = np.array(p["head"]["w"], np.float64)
    mB, mw = np.zeros_like(Bm), np.zeros_like(w)
    n = Bm.shape[0]
    for k in range(xs.shape[0]):
        X, Y = xs[k].astype(np.float64), ys[k].astype(np.float64)
        if order == "gossip_first":
            Bm = np.einsum("ij,jab->iab", W, Bm)
        if reset:
            mB[:], mw[:] = 0.0, 0.0
        f = gamma**k
        for i in range(n):
            Bi, wi = Bm[i].copy(), w[i].copy()
            for s in range(tau + sb):
                r = X[i, s] @ Bi @ wi - Y[i, s]
                gw = Bi.T @ X[i, s].T @ r / B
                gB = np.outer(X[i, s].T @ r, wi) / B
                head_phase = s < tau
                if single or head_phase:
                    mw[i] = gw + mom * mw[i]
                if single or not head_phase:
                    mB[i] = gB + mom * mB[i]
                if head_phase:
                    wi = wi - f * (lr_b if single else lr_h) * mw[i]
                else:
                    Bi = Bi - f * lr_b * mB[i]
            Bm[i], w[i] = Bi, wi
        if order == "paper":
            Bm = np.einsum("ij,jab->iab", W, Bm)
    return Bm, w


CONFIGS = {
    "two_optimizers": dict(
        mom=0.9, order="paper", reset=False, gamma=1.0, single=False
    ),
    "code_mimic": dict(
        mom=0.9, order="gossip_first", reset=True, gamma=0.9, single=True
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_numpy_loop(name):
    c = CONFIGS[name]
    tau, sb, rounds, lr_h, lr_b = 3, 2, 3, 0.1, 0.05
    W = _W()
    p = _params()
    xs, ys = _batches(rounds, tau + sb)

    def sgd(lr):
        return optax.sgd(lr, momentum=c["mom"] or None)

    algo = deprl(
        lin_loss,
        None if c["single"] else sgd(lr_h),
        sgd(lr_b),
        gossip.dense(W),
        is_head=is_head,
        head_steps=tau,
        body_steps=sb,
        order=c["order"],
        reset_opt_state_each_round=c["reset"],
        lr_decay_per_round=c["gamma"],
        single_optimizer=c["single"],
    )
    state = algo.init(p)
    step = jax.jit(algo.step)
    for k in range(rounds):
        state, info = step(state, (xs[k], ys[k]), jax.random.key(k))
    Bref, wref = np_deprl(p, xs, ys, W, tau, sb, lr_h, lr_b, **c)
    np.testing.assert_allclose(state.body["body"]["B"], Bref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.head["head"]["w"], wref, rtol=1e-5, atol=1e-6)
    assert state.head["body"]["B"] is None and state.body["head"]["w"] is None
    assert info.head_loss.shape == info.body_loss.shape == (N,)
    assert bool(jnp.all(info.finite))


def test_gradient_counts_and_frozen_parts():
    """Exactly tau head and s_b body gradients per worker; the body is bit-identical
    during the head phase and the head during the body phase (also with one
    whole-model momentum optimizer, whose stale momentum would move it)."""
    tau, sb = 3, 2
    xs, ys = _batches(1, tau + sb)
    ids = np.broadcast_to(
        100 * np.arange(N)[:, None] + np.arange(tau + sb)[None], (N, tau + sb)
    )
    ids = jnp.asarray(ids[..., None].repeat(B, -1), jnp.int32)  # [N, S, B]
    p = _params()
    for single in (False, True):
        seen = []

        def loss(params, batch, key, seen=seen):
            def rec(ident, body_v, head_v):
                seen.append((int(ident), np.array(body_v), np.array(head_v)))

            jax.debug.callback(
                rec, batch[2][0], params["body"]["B"], params["head"]["w"]
            )
            return lin_loss(params, batch, key)

        opt = optax.sgd(0.1, momentum=0.9)
        algo = deprl(
            loss,
            None if single else opt,
            opt,
            gossip.identity(),
            is_head=is_head,
            head_steps=tau,
            body_steps=sb,
            single_optimizer=single,
        )
        state = algo.init(p)
        new, _ = jax.jit(algo.step)(state, (xs[0], ys[0], ids), jax.random.key(0))
        counts = {}
        for i, _, _ in seen:
            counts[i] = counts.get(i, 0) + 1
        assert counts == {100 * w + s: 1 for w in range(N) for s in range(tau + sb)}
        for i, Bv, wv in seen:
            worker, s = divmod(i, 100)
            if s < tau:  # head phase: body frozen at phi^k
                np.testing.assert_array_equal(Bv, np.asarray(p["body"]["B"][worker]))
            else:  # body phase: head frozen at theta^{k+1}
                np.testing.assert_array_equal(
                    wv, np.asarray(new.head["head"]["w"][worker])
                )


def test_heads_never_mixed_nor_sent():
    tau, sb = 2, 1
    xs, ys = _batches(1, tau + sb)
    W = _W()
    received = []
    base = gossip.dense(W)

    def record(tree, step):
        received.append(tree)
        return base.fn(tree, step)

    recorder = gossip.Mixer(record, base.sends, N, "recorder")

    algo = deprl(
        lin_loss,
        optax.sgd(0.1),
        optax.sgd(0.1),
        recorder,
        is_head=is_head,
        head_steps=tau,
        body_steps=sb,
    )
    state = algo.init(_params())
    new, info = jax.jit(algo.step)(state, (xs[0], ys[0]), jax.random.key(0))
    assert len(received) == 1
    assert head_mask_of(received[0]) == {"body": {"B": False}, "head": {"w": True}}
    assert [x.shape for x in jax.tree.leaves(received[0])] == [(N, D, KK)]
    # rerun with every other worker's data and body replaced by random values
    r = np.random.default_rng(7)
    xs2, ys2 = np.array(xs[0]), np.array(ys[0])
    xs2[1:] = r.normal(size=xs2[1:].shape)
    ys2[1:] = r.normal(size=ys2[1:].shape)
    Bm = np.array(state.body["body"]["B"])
    Bm[1:] = r.normal(size=Bm[1:].shape)
    state2 = state._replace(body={"body": {"B": jnp.asarray(Bm)}, "head": {"w": None}})
    new2, _ = jax.jit(algo.step)(state2, (xs2, ys2), jax.random.key(0))
    np.testing.assert_array_equal(new.head["head"]["w"][0], new2.head["head"]["w"][0])
    # communication counts the body only: messages x |phi|
    msgs = float(np.mean(((W > 0) & ~np.eye(N, dtype=bool)).sum(0)))
    np.testing.assert_allclose(float(info.floats_sent), msgs * D * KK, rtol=1e-6)


def _mix_io(W, doubly_stochastic=True):
    """A mixer that records (before, after) of the body matrix B on the host."""
    io = []
    base = gossip.dense(W, doubly_stochastic=doubly_stochastic)

    def mix(tree, step):
        out = base(tree, step)
        jax.debug.callback(
            lambda a, b: io.append((np.asarray(a), np.asarray(b))),
            tree["body"]["B"],
            out["body"]["B"],
        )
        return out

    return mix, io


def test_body_mean_preserved_and_uniform_weights_drift():
    xs, ys = _batches(1, 2)
    mix, io = _mix_io(_W())
    algo = deprl(
        lin_loss, optax.sgd(0.1), optax.sgd(0.1), mix, is_head=is_head, head_steps=1
    )
    jax.jit(algo.step)(algo.init(_params()), (xs[0], ys[0]), jax.random.key(0))
    before, after = (np.asarray(t, np.float64) for t in io[0])
    np.testing.assert_allclose(after.mean(0), before.mean(0), rtol=1e-6, atol=1e-7)
    # code mimic: row-stochastic uniform weights on a star do not keep the mean
    Wu = topology.mixing_matrix(topology.star(5), "uniform")
    mix_u, io_u = _mix_io(Wu, doubly_stochastic=False)
    xs5, ys5 = _batches(1, 2, n=5)
    algo = deprl(
        lin_loss, optax.sgd(0.1), optax.sgd(0.1), mix_u, is_head=is_head, head_steps=1
    )
    p5 = _params(n=5)
    state = algo.init(p5)
    Bm = np.array(state.body["body"]["B"]) + np.random.default_rng(0).normal(
        size=(5, D, KK)
    )
    state = state._replace(body={"body": {"B": jnp.asarray(Bm)}, "head": {"w": None}})
    jax.jit(algo.step)(state, (xs5[0], ys5[0]), jax.random.key(0))
    before, after = io_u[0]
    assert np.max(np.abs(after.mean(0) - before.mean(0))) > 1e-3


def test_identity_mixing_equals_single_worker_runs():
    tau, sb, rounds = 2, 2, 3
    xs, ys = _batches(rounds, tau + sb)

    def make(mix):
        return deprl(
            lin_loss,
            optax.sgd(0.1, momentum=0.5),
            optax.sgd(0.05),
            mix,
            is_head=is_head,
            head_steps=tau,
            body_steps=sb,
        )

    p = _params()
    algo = make(gossip.identity())
    state = algo.init(p)
    for k in range(rounds):
        state, _ = jax.jit(algo.step)(state, (xs[k], ys[k]), jax.random.key(k))
    one = make(gossip.complete(1))  # N = 1: plain alternating minimization
    for i in range(N):
        s1 = one.init(jax.tree.map(lambda x, i=i: x[i : i + 1], p))
        for k in range(rounds):
            s1, _ = jax.jit(one.step)(
                s1, (xs[k, i : i + 1], ys[k, i : i + 1]), jax.random.key(k)
            )
        for a, b in zip(
            jax.tree.leaves(s1.params), jax.tree.leaves(state.params), strict=True
        ):
            np.testing.assert_allclose(a[0], b[i], rtol=1e-6, atol=1e-7)


def test_complete_graph_reductions():
    """W = J, tau = 0, identical heads: the body update is centralized SGD on the
    pooled batch. W = J, identical data and keys, different heads: the bodies stay
    identical for 10 rounds."""
    xs, ys = _batches(1, 1)
    p = _params(same_heads=True)
    lr = 0.1
    algo = deprl(
        lin_loss,
        optax.sgd(lr),
        optax.sgd(lr),
        gossip.complete(N),
        is_head=is_head,
        head_steps=0,
    )
    step = jax.jit(algo.step)
    new, info = step(algo.init(p), (xs[0], ys[0]), jax.random.key(0))
    assert bool(jnp.all(jnp.isnan(info.head_loss)))
    pooled = lambda Bm: lin_loss(
        {"body": {"B": Bm}, "head": {"w": p["head"]["w"][0]}},
        (xs[0, :, 0].reshape(-1, D), ys[0, :, 0].reshape(-1)),
        None,
    )
    B0 = p["body"]["B"][0]
    expect = B0 - lr * jax.grad(pooled)(B0)
    for i in range(N):
        np.testing.assert_allclose(
            new.body["body"]["B"][i], expect, rtol=1e-6, atol=1e-6
        )
    np.testing.assert_array_equal(new.head["head"]["w"], p["head"]["w"])
    xs, ys = _batches(10, 1, n=1)
    xs, ys = (np.repeat(a, N, axis=1) for a in (xs, ys))
    state = algo.init(_params())  # different heads
    for k in range(10):
        state, _ = step(state, (xs[k], ys[k]), jax.random.key(k))
        Bm = np.asarray(state.body["body"]["B"])
        assert np.max(np.abs(Bm - Bm[:1])) <= 1e-6


def test_consensus_contraction_and_optimizer_states_not_mixed():
    W = topology.mixing_matrix(topology.ring(N))
    rho = topology.second_largest_eigenvalue(W)
    xs, ys = _batches(1, 3)
    algo = deprl(
        lin_loss,
        optax.sgd(0.0),
        optax.sgd(0.0),
        gossip.dense(W),
        is_head=is_head,
        head_steps=2,
    )
    state = algo.init(_params())
    Bm = np.random.default_rng(5).normal(size=(N, D, KK)).astype(np.float32)
    state = state._replace(body={"body": {"B": jnp.asarray(Bm)}, "head": {"w": None}})
    before = float(jtree.consensus_distance(state.body))
    new, info = jax.jit(algo.step)(state, (xs[0], ys[0]), jax.random.key(0))
    assert float(info.consensus) <= rho**2 * before + 1e-7
    # W = J, different data: per-worker momentum states differ and keep axis N
    algo = deprl(
        lin_loss,
        optax.sgd(0.1, momentum=0.9),
        optax.sgd(0.1, momentum=0.9),
        gossip.complete(N),
        is_head=is_head,
        head_steps=2,
    )
    new, _ = jax.jit(algo.step)(algo.init(_params()), (xs[0], ys[0]), jax.random.key(0))
    for opt_state in (new.head_opt_state, new.body_opt_state):
        (tr,) = jax.tree.leaves(opt_state[0].trace)
        assert tr.shape[0] == N
        assert np.max(np.abs(np.asarray(tr) - np.asarray(tr[:1]))) > 1e-4


def test_per_worker_step_counts_are_exact_no_ops():
    tau, sb = 3, 2
    xs, ys = _batches(1, tau + sb)
    opt = optax.sgd(0.1, momentum=0.9)
    ch = np.array([0, 1, 3, 2, 3, 1])
    cb = np.array([2, 1, 2, 0, 1, 2])
    kw = dict(is_head=is_head, head_steps=tau, body_steps=sb)
    algo = deprl(
        lin_loss,
        opt,
        opt,
        gossip.identity(),
        head_steps_per_worker=ch,
        body_steps_per_worker=cb,
        **kw,
    )
    p = _params()
    new, info = jax.jit(algo.step)(algo.init(p), (xs[0], ys[0]), jax.random.key(0))
    assert np.isnan(info.head_loss[0]) and np.isnan(info.body_loss[3])
    assert bool(jnp.all(info.finite))
    for i in (0, 2):  # equals a run with exactly (ch_i, cb_i) steps
        # the reference steps all n workers (the same array shapes, so the same
        # kernels: a 1-worker program may round differently) and is read at worker i
        ref = deprl(
            lin_loss,
            opt,
            opt,
            gossip.identity(),
            is_head=is_head,
            head_steps=int(ch[i]),
            body_steps=int(cb[i]),
        )
        sel = np.r_[0 : ch[i], tau : tau + cb[i]]
        r1, _ = jax.jit(ref.step)(
            ref.init(p), (xs[0][:, sel], ys[0][:, sel]), jax.random.key(0)
        )
        for a, b in zip(
            jax.tree.leaves(r1.params), jax.tree.leaves(new.params), strict=True
        ):
            np.testing.assert_array_equal(a[i], b[i])
    np.testing.assert_array_equal(new.head["head"]["w"][0], p["head"]["w"][0])
    np.testing.assert_array_equal(new.body["body"]["B"][3], p["body"]["B"][3])


def _principal_sin(Bm, Bstar):
    Q, _ = np.linalg.qr(Bm)
    s = np.linalg.svd(Bstar.T @ Q, compute_uv=False)
    return float(np.sqrt(max(0.0, 1.0 - s.min() ** 2)))


def test_shared_subspace_recovery():
    d, k, n, m, tau, K = 20, 2, 16, 40, 5, 2000
    r = np.random.default_rng(0)
    Bstar, _ = np.linalg.qr(r.normal(size=(d, k)))
    wstar = r.normal(size=(n, k))
    x = r.normal(size=(n, m, d))
    y = np.einsum("nmd,dk,nk->nm", x, Bstar, wstar) + 0.01 * r.normal(size=(n, m))
    B0, _ = np.linalg.qr(r.normal(size=(d, k)))
    p = {
        "body": {"B": jnp.asarray(np.broadcast_to(B0, (n, d, k)), jnp.float32)},
        "head": {"w": jnp.asarray(r.normal(size=(n, k)), jnp.float32)},
    }
    batch = tuple(
        jnp.asarray(
            np.broadcast_to(a[:, None], (n, tau + 1, *a.shape[1:])), jnp.float32
        )
        for a in (x, y)
    )
    W = topology.mixing_matrix(topology.erdos_renyi(n, 0.25, seed=0))
    out = {}
    for name, mix in (("deprl", gossip.dense(W)), ("local", gossip.identity())):
        algo = deprl(
            lin_loss,
            optax.sgd(0.1),
            optax.sgd(0.1),
            mix,
            is_head=is_head,
            head_steps=tau,
        )

        @jax.jit
        def run(state, algo=algo):
            body = lambda s, _: (algo.step(s, batch, jax.random.key(0))[0], None)
            return jax.lax.scan(body, state, None, length=K)[0]

        Bs = np.asarray(run(algo.init(p)).body["body"]["B"], np.float64)
        out[name] = np.mean([_principal_sin(Bs[i], Bstar) for i in range(n)])
    assert out["deprl"] <= 0.01, out
    assert out["local"] >= 0.5, out


def test_compiles_once_and_works_with_optax_chain():
    traces = []
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    algo = deprl(lin_loss, opt, opt, gossip.dense(_W()), is_head=is_head, head_steps=2)

    def counted(state, batch, key):
        traces.append(1)
        return algo.step(state, batch, key)

    step = jax.jit(counted)
    p = _params()
    state = algo.init(p)
    xs, ys = _batches(3, 3)
    for k in range(3):
        state, info = step(state, (xs[k], ys[k]), jax.random.key(k))
    assert len(traces) == 1
    assert bool(jnp.all(info.finite))
    assert not np.allclose(state.head["head"]["w"], p["head"]["w"])
    assert not np.allclose(state.body["body"]["B"], p["body"]["B"])


def test_validation():
    p = _params()
    sgd = optax.sgd(0.1)
    mk = lambda **kw: deprl(
        lin_loss,
        sgd,
        sgd,
        gossip.identity(),
        **{"is_head": is_head, "head_steps": 1, **kw},
    )
    Bm = np.array(p["body"]["B"])
    Bm[1] += 1.0
    with pytest.raises(ValueError, match="same body"):
        mk().init({"body": {"B": jnp.asarray(Bm)}, "head": p["head"]})
    with pytest.raises(ValueError, match="every parameter as head"):
        mk(is_head=lambda path: True).init(p)
    with pytest.raises(ValueError, match="no parameter as head"):
        mk(is_head="classifier").init(p)
    with pytest.raises(ValueError, match="does not match"):
        mk(is_head={"head": True}).init(p)
    with pytest.raises(ValueError, match="order"):
        mk(order="atc")
    with pytest.raises(ValueError, match="single_optimizer"):
        deprl(lin_loss, sgd, optax.sgd(0.2), gossip.identity(), is_head=is_head,
              head_steps=1, single_optimizer=True)  # fmt: skip
    with pytest.raises(ValueError, match="body_steps"):
        mk(body_steps=0)
    with pytest.raises(ValueError, match="head_steps_per_worker"):
        mk(head_steps_per_worker=np.array([2] * N))
    with pytest.raises(ValueError, match="batch leaves"):
        xs, ys = _batches(1, 3)
        mk().step(mk().init(p), (xs[0], ys[0]), jax.random.key(0))
    # a mask pytree and a regex work like the predicate
    m = {"body": {"B": False}, "head": {"w": True}}
    assert mk(is_head=m).init(p).head == mk(is_head="^head").init(p).head


# ------------------------------------------------------------------- baselines


def test_dfedper_equals_dsgd_with_masked_periodic_gossip():
    H, rounds = 3, 2
    xs, ys = _batches(rounds, H)
    W = _W()
    p = _params()
    opt = optax.sgd(0.1, momentum=0.9)
    algo = dfedper(lin_loss, opt, gossip.dense(W), is_head=is_head, local_steps=H)
    state = algo.init(p)
    for k in range(rounds):
        state, info = jax.jit(algo.step)(state, (xs[k], ys[k]), jax.random.key(k))
    body_mask = jtree.invert_mask(jtree.mask_by_path(p, "^head"))
    ref = dsgd(
        lin_loss, opt, gossip.every(H, gossip.masked(gossip.dense(W), body_mask))
    )
    s2 = ref.init(p)
    for k in range(rounds):
        for s in range(H):
            s2, _ = jax.jit(ref.step)(s2, (xs[k, :, s], ys[k, :, s]), jax.random.key(0))
    for a, b in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(s2.params), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    msgs = float(np.mean(((W > 0) & ~np.eye(N, dtype=bool)).sum(0)))
    np.testing.assert_allclose(float(info.floats_sent), msgs * D * KK, rtol=1e-6)


def test_finetune_head_moves_only_the_head():
    xs, ys = _batches(1, 1)
    p = _params()
    lr = 0.1
    algo = finetune_head(lin_loss, optax.sgd(lr), is_head=is_head)
    new, info = jax.jit(algo.step)(
        algo.init(p), (xs[0, :, 0], ys[0, :, 0]), jax.random.key(0)
    )
    np.testing.assert_array_equal(new.params["body"]["B"], p["body"]["B"])
    X, Y = xs[0, :, 0].astype(np.float64), ys[0, :, 0].astype(np.float64)
    Bm, w = (
        np.asarray(p["body"]["B"], np.float64),
        np.asarray(p["head"]["w"], np.float64),
    )
    r = np.einsum("nbd,ndk,nk->nb", X, Bm, w) - Y
    gw = np.einsum("ndk,nbd,nb->nk", Bm, X, r) / B
    np.testing.assert_allclose(
        new.params["head"]["w"], w - lr * gw, rtol=1e-5, atol=1e-7
    )
    assert float(info.floats_sent) == 0.0


def test_personalized_stationarity_matches_numpy():
    p = _params()
    Bm = np.asarray(p["body"]["B"], np.float64) + np.random.default_rng(2).normal(
        size=(N, D, KK)
    )
    p = {"body": {"B": jnp.asarray(Bm, jnp.float32)}, "head": p["head"]}
    xs, ys = _batches(1, 1)
    data = (xs[0, :, 0], ys[0, :, 0])
    full = lambda params, d: lin_loss(params, d, None)
    out = personalized_stationarity(full, is_head=is_head)(p, data)
    X, Y = (a.astype(np.float64) for a in data)
    w = np.asarray(p["head"]["w"], np.float64)
    Bbar = np.asarray(p["body"]["B"], np.float64).mean(0)
    r = np.einsum("nbd,dk,nk->nb", X, Bbar, w) - Y
    gB = np.einsum("nbd,nb,nk->ndk", X, r, w) / B
    gw = np.einsum("dk,nbd,nb->nk", Bbar, X, r) / B
    expect = np.sum(gB.mean(0) ** 2) + np.sum(gw**2) / N
    np.testing.assert_allclose(float(out["stationarity"]), expect, rtol=1e-4)


def test_round_sampler_and_code_preset():
    def fake(key, t):  # sampler(key, t) -> x [n, b, D]: every entry equals t
        return jnp.full((3, 4, D), 1.0, jnp.float32) * t

    bx = jax.jit(round_sampler(fake, 3))(jax.random.key(1), 2)
    assert bx.shape == (3, 3, 4, D)
    np.testing.assert_array_equal(bx[0, :, 0, 0], [6.0, 7.0, 8.0])  # steps 2*3 + s
    counts = np.array([10, 25, 25])
    tot, per = epoch_steps(counts, 4, 3)
    assert tot == 21 and per.tolist() == [9, 21, 21]
    algo, steps = deprl_code_preset(
        lin_loss, topology.star(3), is_head=is_head, counts=counts, batch_size=4
    )
    assert steps == 21 + 7
    state = algo.init(_params(n=3))
    assert isinstance(state, DePRLState) and state.head_opt_state == ()
    r = np.random.default_rng(0)
    batch = (r.normal(size=(3, steps, 4, D)), r.normal(size=(3, steps, 4)))
    batch = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), batch)
    new, info = jax.jit(algo.step)(state, batch, jax.random.key(0))
    assert bool(jnp.all(info.finite))
    body, head = split_params(new.params, jtree.mask_by_path(new.params, "^head"))
    assert head["head"]["w"].shape == (3, KK) and body["head"]["w"] is None
