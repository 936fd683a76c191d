"""The shared battery over every algorithm factory (DESIGN.md, Conventions / Tests).

For each algorithm, on a tiny heterogeneous least-squares problem with a "body" /
"head" parameter split and the optimizer ``optax.chain(clip_by_global_norm, adam)``:

* the step compiles once: three jitted steps with fresh batches and keys trace the
  loss in one compilation only (jit cache size 1);
* the state is a NamedTuple of arrays with an ``int32`` step counter ``count`` that
  advances by one per step, and the parameters move;
* every step reports finite diagnostics (``Info.finite`` or a finite loss);
* a step is a pure function of its inputs: the same state, batch and key give
  bit-identical results.

The reference equivalences (NumPy loops of each algorithm's equations) are in each
algorithm's own test module.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdec as jd
from jaxdec import gossip, topology
from jaxdec import lowrank as L

N, D, H, B, S = 4, 5, 3, 6, 2  # workers, inputs, hidden, batch, local steps


def loss_fn(params, batch, key=None):
    """0.5 mean (x B w - y)^2 for ONE worker (body B [D, H], head w [H])."""
    x, y = batch
    pred = x @ params["body"]["w"] @ params["head"]["w"]
    return 0.5 * jnp.mean(jnp.square(pred - y))


def is_head(path: str) -> bool:
    return path.startswith("head")


def dense_ls(params, batch, key=None):
    """0.5 mean ||x W - y||^2 (FedLin / FeDLRT: W [D, H] factorized by FeDLRT)."""
    x, y = batch
    return 0.5 * jnp.mean(jnp.sum(jnp.square(x @ params["W"] - y), -1))


def opt() -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.05))


def params0(n=N, seed=0):
    r = np.random.default_rng(seed)
    return {
        "body": {"w": jnp.asarray(r.normal(size=(n, D, H)) / 2, jnp.float32)},
        "head": {"w": jnp.asarray(r.normal(size=(n, H)) / 2, jnp.float32)},
    }


def consensual(n=N):
    return jd.tree.replicate(jax.tree.map(lambda x: x[0], params0(n)), n)


def batch(t: int, lead: tuple[int, ...], out: tuple[int, ...] = ()) -> tuple:
    """A fresh batch ``(x [*lead, B, D], y [*lead, B, *out])`` for step ``t``."""
    r = np.random.default_rng(100 + t)
    x = (
        r.normal(size=(*lead, B, D))
        * np.linspace(0.5, 1.5, lead[0])[(...,) + (None,) * (len(lead) + 1)]
    )
    y = r.normal(size=(*lead, B, *out))
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


class Case(NamedTuple):
    build: Callable[[Callable], jd.Algorithm]  # w(loss) -> counted loss; -> algo
    init: Callable[[jd.Algorithm], Any]  # algorithm -> state
    batch: Callable[[int], Any]  # step -> batch


W_RING = topology.mixing_matrix(topology.ring(N))
MIX = gossip.sparse(W_RING)
PER_STEP = lambda t: batch(t, (N,))  # noqa: E731
PER_ROUND = lambda t: batch(t, (N, S))  # noqa: E731


def _fedlin_batch(t):
    return batch(t, (N,), (H,)), batch(t + 50, (N, S), (H,))


def _server_W():
    return {"W": jnp.asarray(np.random.default_rng(3).normal(size=(D, H)), jnp.float32)}


CASES: dict[str, Case] = {
    "dsgd": Case(
        lambda w: jd.algorithms.dsgd(w(loss_fn), opt(), MIX),
        lambda a: a.init(params0()),
        PER_STEP,
    ),
    "gradient_tracking": Case(
        lambda w: jd.algorithms.gradient_tracking(w(loss_fn), opt(), MIX),
        lambda a: a.init(params0()),
        PER_STEP,
    ),
    "prox_dsgd": Case(
        lambda w: jd.algorithms.prox_dsgd(
            w(loss_fn), jd.prox.l1(1e-3), MIX, optimizer=opt(), prox_step=0.05
        ),
        lambda a: a.init(consensual()),
        PER_STEP,
    ),
    "proxgt": Case(
        lambda w: jd.algorithms.proxgt(
            w(loss_fn), jd.prox.l1(1e-3), MIX, optimizer=opt(), prox_step=0.05
        ),
        lambda a: a.init(consensual()),
        PER_STEP,
    ),
    "deprl": Case(
        lambda w: jd.algorithms.deprl(
            w(loss_fn), opt(), opt(), MIX, is_head=is_head, head_steps=1, body_steps=1
        ),
        lambda a: a.init(consensual()),
        PER_ROUND,
    ),
    "dfedper": Case(
        lambda w: jd.algorithms.dfedper(
            w(loss_fn), opt(), MIX, is_head=is_head, local_steps=S
        ),
        lambda a: a.init(params0()),
        PER_ROUND,
    ),
    "finetune_head": Case(
        lambda w: jd.algorithms.finetune_head(w(loss_fn), opt(), is_head=is_head),
        lambda a: a.init(params0()),
        PER_STEP,
    ),
    "fedavg": Case(
        lambda w: jd.algorithms.fedavg(w(loss_fn), opt(), clients_per_round=2, seed=1),
        lambda a: a.init(params0(), jnp.arange(1.0, N + 1)),
        PER_ROUND,
    ),
    "fedavg_server_adam": Case(
        lambda w: jd.algorithms.fedavg(
            w(loss_fn),
            opt(),
            server_optimizer=optax.adam(0.1),
            clients_per_round=2,
            seed=1,
        ),
        lambda a: a.init(params0()),
        PER_ROUND,
    ),
    "fedprox": Case(
        lambda w: jd.algorithms.fedprox(w(loss_fn), opt(), 0.1),
        lambda a: a.init(params0()),
        PER_ROUND,
    ),
    "fedper": Case(
        lambda w: jd.algorithms.fedper(w(loss_fn), opt(), personal=is_head),
        lambda a: a.init(params0()),
        PER_ROUND,
    ),
    "local_only": Case(
        lambda w: jd.algorithms.local_only(w(loss_fn), opt()),
        lambda a: a.init(params0()),
        PER_ROUND,
    ),
    "scaffold": Case(
        lambda w: jd.algorithms.scaffold(
            w(loss_fn), opt(), clients_per_round=3, seed=2, control="i"
        ),
        lambda a: a.init(params0()),
        PER_ROUND,
    ),
    "ifca": Case(
        lambda w: jd.algorithms.ifca(w(loss_fn), opt(), 2),
        lambda a: a.init(params0(), models=params0(2, seed=5)),
        PER_ROUND,
    ),
    "fedtsdp": Case(
        lambda w: jd.algorithms.fedtsdp(
            w(loss_fn),
            opt(),
            lambda p, x: jax.nn.softmax(
                jnp.stack([x @ p["body"]["w"] @ p["head"]["w"], -x[:, 0]], -1)
            ),
            np.random.default_rng(7).normal(size=(16, D)).astype(np.float32),
            blocks=["body", "head"],
            l_top=1,
            public_batch=8,
        ),
        lambda a: a.init(params0(), np.tile([[5, 3]], (N, 1))),
        PER_ROUND,
    ),
    "fedlin": Case(
        lambda w: jd.algorithms.fedlin(w(dense_ls), opt(), local_steps=S),
        lambda a: a.init(_server_W()),
        _fedlin_batch,
    ),
    "fedlrt": Case(
        lambda w: jd.algorithms.fedlrt(
            L.densified(w(dense_ls)),
            opt(),
            factorize="W",
            local_steps=S,
            r0=1,
            r_min=1,
            r_max=2,
            clients_per_round=3,
        ),
        lambda a: a.init(_server_W()),
        _fedlin_batch,
    ),
}


def _finite(info) -> bool:
    flag = getattr(info, "finite", None)
    if flag is None:
        flag = getattr(info, "loss", getattr(info, "global_loss", None))
        assert flag is not None, f"{type(info).__name__} has no finite flag or loss"
        return bool(jnp.all(jnp.isfinite(flag)))
    return bool(jnp.all(flag))


def _params(state):
    return state.params


@pytest.mark.parametrize("name", list(CASES))
def test_battery(name):
    case = CASES[name]
    traces = []

    def wrap(loss):
        def counted(params, b, key=None):
            traces.append(1)
            return loss(params, b, key)

        return counted

    algo = case.build(wrap)
    assert isinstance(algo, tuple) and callable(algo.init) and callable(algo.step)
    state0 = case.init(algo)
    assert hasattr(state0, "_fields") and "count" in state0._fields, name
    assert state0.count.dtype == jnp.int32 and int(state0.count) == 0
    for leaf in jax.tree.leaves(state0):
        assert isinstance(leaf, jax.Array | np.ndarray), (name, type(leaf))

    step = jax.jit(algo.step)
    state = state0
    n_traces = None
    for t in range(3):
        state, info = step(state, case.batch(t), jax.random.key(t))
        assert int(state.count) == t + 1
        assert _finite(info), (name, t)
        if t == 0:
            n_traces = len(traces)
    assert step._cache_size() == 1, f"{name}: the step recompiled"
    assert len(traces) == n_traces, f"{name}: the loss was traced again"

    moved = [
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(
            jax.tree.leaves(_params(state0)),
            jax.tree.leaves(_params(state)),
            strict=True,
        )
    ]
    assert any(moved), f"{name}: no parameter moved in 3 steps"

    # pure: same inputs, same bits
    b0, k0 = case.batch(7), jax.random.key(11)
    s1, _ = step(state, b0, k0)
    s2, _ = step(state, b0, k0)
    for a, c in zip(jax.tree.leaves(s1), jax.tree.leaves(s2), strict=True):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, c = jax.random.key_data(a), jax.random.key_data(c)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
