"""Every public constructor / factory rejects bad input with a ValueError that names
the cause and the fix, before anything compiles."""

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import optax
import pytest

import jaxdec as jd
from jaxdec import checkpoint, data, gossip, metrics, models, topology
from jaxdec import tree as jtree

W4 = topology.mixing_matrix(topology.ring(4))


def _loss(p, b, k):
    return jnp.sum(p["w"] ** 2)


def _algo():
    return jd.algorithms.dsgd(_loss, optax.sgd(0.1), gossip.dense(W4))


def _state():
    return _algo().init({"w": jnp.ones((4, 2))})


def _sampler(key, step):
    return jnp.zeros((4, 1))


def _wd():
    return data.stack(
        np.ones((5, 2)), np.arange(5) % 2, [np.arange(3), np.arange(3, 5)]
    )


# (id, thunk, regex the message must match: cause ... and the fix)
CASES = [
    # topology
    ("ring0", lambda: topology.ring(0), "n must be an integer >= 1"),
    ("ring_float", lambda: topology.ring(2.5), "integer >= 1"),
    ("hypercube", lambda: topology.hypercube(6), "power of two"),
    ("erdos_p", lambda: topology.erdos_renyi(5, 0.0), r"p must be in \(0, 1\]"),
    ("regular", lambda: topology.random_regular(5, 3), "change d or n"),
    ("by_name", lambda: topology.by_name("moebius", 4), "choose one of"),
    ("rule", lambda: topology.mixing_matrix(topology.ring(4), "foo"), "choose one of"),
    (
        "disconnected",
        lambda: topology.mixing_matrix(nx.empty_graph(3)),
        "disconnected.*Add edges",
    ),
    (
        "directed",
        lambda: topology.mixing_matrix(nx.DiGraph([(0, 1)])),
        "to_undirected",
    ),
    (
        "labels",
        lambda: topology.mixing_matrix(nx.path_graph(["a", "b"])),
        "convert_node_labels_to_integers",
    ),
    ("edge_range", lambda: topology.from_edges(3, [(0, 5)]), "outside 0..2"),
    ("edge_float", lambda: topology.from_edges(3, [(0, 1.5)]), "pair of integer"),
    ("edge_triple", lambda: topology.from_edges(3, [(0, 1, 2)]), "pair of integer"),
    ("W_square", lambda: topology.check_mixing_matrix(np.ones((2, 3))), "square"),
    ("W_n", lambda: topology.check_mixing_matrix(W4, n=5), "same number of workers"),
    ("W_nan", lambda: topology.check_mixing_matrix(np.full((2, 2), np.nan)), "finite"),
    (
        "W_neg",
        lambda: topology.check_mixing_matrix(np.array([[1.5, -0.5], [-0.5, 1.5]])),
        "must be >= 0",
    ),
    (
        "W_rows",
        lambda: topology.check_mixing_matrix(np.ones((3, 3))),
        "row-stochastic.*mixing_matrix",
    ),
    (
        "W_cols",
        lambda: topology.check_mixing_matrix(np.array([[1.0, 0.0], [1.0, 0.0]])),
        "doubly stochastic.*metropolis",
    ),
    ("gap_square", lambda: topology.spectral_gap(np.ones((2, 3))), "square"),
    ("nbr_square", lambda: topology.neighbor_lists(np.ones((2, 3))), "square"),
    # gossip
    ("dense_rows", lambda: gossip.dense(np.ones((3, 3))), "row-stochastic"),
    ("sparse_cols", lambda: gossip.sparse(np.array([[1.0, 0], [1, 0]])), "doubly"),
    (
        "mixer_n",
        lambda: gossip.dense(W4)({"w": jnp.ones((3, 2))}, 0),
        "build the mixer for 3 workers",
    ),
    ("every", lambda: gossip.every(0, gossip.dense(W4)), "H must be an integer >= 1"),
    ("chebyshev", lambda: gossip.chebyshev(W4, 0), "rounds must be an integer >= 1"),
    ("time_varying", lambda: gossip.time_varying([]), "at least one"),
    ("schedule", lambda: gossip.schedule([5, 2], [W4] * 3), "strictly increasing"),
    ("matching_p", lambda: gossip.random_matching(4, p=2.0), r"p must be in \[0, 1\]"),
    (
        "masked_tree",
        lambda: gossip.masked(gossip.dense(W4), {"a": True})({"w": jnp.ones((4,))}, 0),
        "mask",
    ),
    # algorithms
    (
        "loss",
        lambda: jd.algorithms.dsgd(1, optax.sgd(0.1), gossip.dense(W4)),
        "loss_fn must be callable",
    ),
    (
        "optimizer",
        lambda: jd.algorithms.gradient_tracking(_loss, "sgd", gossip.dense(W4)),
        r"optax.sgd\(0.1\)",
    ),
    (
        "mix",
        lambda: jd.algorithms.dsgd(_loss, optax.sgd(0.1), W4),
        r"jd.gossip.dense\(W\)",
    ),
    (
        "order",
        lambda: jd.algorithms.dsgd(_loss, optax.sgd(0.1), gossip.dense(W4), order="x"),
        "'atc' or 'cta'",
    ),
    (
        "has_aux",
        lambda: jd.algorithms.gradient_tracking(
            _loss, optax.sgd(0.1), gossip.dense(W4), has_aux="yes"
        ),
        "has_aux=True when loss_fn returns",
    ),
    ("init_scalar", lambda: _algo().init({"w": jnp.float32(1)}), "jd.tree.replicate"),
    (
        "init_ragged",
        lambda: _algo().init({"w": jnp.ones((4, 2)), "b": jnp.ones((3,))}),
        "same leading dimension",
    ),
    # tree
    (
        "mask",
        lambda: jtree.validate_mask({"a": True}, {"b": jnp.ones(2)}, name="mask"),
        "mask",
    ),
    # run driver
    (
        "num_steps",
        lambda: jd.run(_algo(), _state(), _sampler, jax.random.key(0), 0),
        "num_steps must be an integer >= 1",
    ),
    (
        "eval_every",
        lambda: jd.run(_algo(), _state(), _sampler, jax.random.key(0), 3, eval_every=0),
        "eval_every",
    ),
    (
        "on_nonfinite",
        lambda: jd.run(
            _algo(), _state(), _sampler, jax.random.key(0), 3, on_nonfinite="x"
        ),
        "'stop', 'raise' or 'ignore'",
    ),
    (
        "run_key",
        lambda: jd.run(_algo(), _state(), _sampler, 0, 3),
        r"jax.random.key\(0\)",
    ),
    (
        "run_algo",
        lambda: jd.run(None, _state(), _sampler, jax.random.key(0), 3),
        r"Algorithm\(init, step\)",
    ),
    (
        "run_sampler",
        lambda: jd.run(_algo(), _state(), None, jax.random.key(0), 3),
        "make_sampler",
    ),
    (
        "start_step",
        lambda: jd.run(
            _algo(), _state(), _sampler, jax.random.key(0), 3, start_step=-1
        ),
        "start_step must be >= 0",
    ),
    (
        "resume_dir",
        lambda: jd.run(_algo(), _state(), _sampler, jax.random.key(0), 3, resume=True),
        "needs checkpoint_dir",
    ),
    (
        "traced_ck",
        lambda: jd.run_traced(
            _algo(), _state(), _sampler, jax.random.key(0), 10, checkpoint_every=3
        ),
        "must divide num_steps",
    ),
    # checkpoint
    ("keep", lambda: checkpoint.Checkpointer("unused_dir", 0), "max_to_keep must be"),
    ("ckpt_dir", lambda: checkpoint.latest_step(3), "must be a path"),
    # data
    ("iid_n", lambda: data.iid(10, 2.5, 0), "int >= 1"),
    ("iid_N", lambda: data.iid(3, 5, 0), "fewer workers or more data"),
    ("dir_alpha", lambda: data.dirichlet(np.zeros(10, int), 2, 0.0, 0), "alpha"),
    (
        "dir_min",
        lambda: data.dirichlet(np.zeros(10, int), 2, 1.0, 0, min_size=1.5),
        "integers min_size",
    ),
    (
        "dir_big",
        lambda: data.dirichlet(np.zeros(10, int), 2, 1.0, 0, min_size=6),
        "lower min_size",
    ),
    ("dir_labels", lambda: data.dirichlet(-np.ones(10, int), 2, 1.0, 0), "remap"),
    ("shards", lambda: data.shards(np.zeros(10, int), 2, 0, 0), "int >= 1"),
    ("shards_N", lambda: data.shards(np.zeros(10, int), 4, 3, 0), "fewer"),
    (
        "stack_N",
        lambda: data.stack(np.ones((5, 2)), np.ones(4, int), [np.arange(2)]),
        "same N",
    ),
    (
        "stack_idx",
        lambda: data.stack(np.ones((5, 2)), np.ones(5, int), [np.arange(7)]),
        "different dataset",
    ),
    ("sampler_b", lambda: data.make_sampler(_wd(), 0), "batch_size must be"),
    # models / metrics
    (
        "init_workers",
        lambda: models.init_workers(
            models.MLP(hidden=(4,)), jax.random.key(0), 0, np.ones((1, 4))
        ),
        "n must be an integer >= 1",
    ),
    (
        "mlp_classes",
        lambda: models.init_workers(
            models.MLP(hidden=(4,), num_classes=0),
            jax.random.key(0),
            2,
            np.ones((1, 4)),
        ),
        r"num_classes must be an integer >= 1.*MLP\(num_classes=10\)",
    ),
    (
        "mlp_hidden",
        lambda: models.init_workers(
            models.MLP(hidden=(4, 0)), jax.random.key(0), 2, np.ones((1, 4))
        ),
        r"hidden\[1\] must be an integer >= 1",
    ),
    (
        "lenet_input",
        lambda: models.init_workers(
            models.LeNet5(), jax.random.key(0), 2, np.ones((1, 4))
        ),
        "image_shape",
    ),
    (
        "l2",
        lambda: models.classification_loss(models.MLP(), l2=-1.0),
        "l2 must be >= 0",
    ),
    (
        "evaluator",
        lambda: metrics.evaluator(lambda p, x: x, np.ones((5, 2)), np.ones(4, int)),
        r"x \[N, \.\.\.\] with integer labels y \[N\]",
    ),
]


@pytest.mark.parametrize(
    "thunk,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_raises_value_error_naming_the_fix(thunk, match):
    with pytest.raises(ValueError, match=match):
        thunk()


def test_validation_happens_before_compiling():
    """A bad key is reported without tracing the step function once."""
    traced = []

    def loss(p, b, k):
        traced.append(1)
        return jnp.sum(p["w"] ** 2)

    algo = jd.algorithms.dsgd(loss, optax.sgd(0.1), gossip.dense(W4))
    with pytest.raises(ValueError, match="PRNG key"):
        jd.run(algo, algo.init({"w": jnp.ones((4, 2))}), _sampler, "seed", 3)
    assert not traced


def test_raw_uint32_key_still_accepted():
    s, h = jd.run(_algo(), _state(), _sampler, jax.random.PRNGKey(0), 2, progress=False)
    assert h.num_steps == 2
