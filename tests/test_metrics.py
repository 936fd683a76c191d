"""Tests for jaxdec.metrics against per-worker NumPy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdec import metrics, models, tree

N_WORKERS, D_IN, N_CLASSES = 5, 6, 4


def _np_ce_acc(logits, y):
    logits = np.asarray(logits, np.float64)
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    ce = -logp[np.arange(len(y)), y]
    return ce, (logits.argmax(1) == y).astype(np.float64)


def _np_params(model, n, sample_x, seed=0):
    """Random worker-axis params with the model's tree, drawn by NumPy.

    ``jax.eval_shape`` gives the structure without compiling flax's initializers
    (slow to compile on small CPUs); the metrics do not care how params were drawn.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), sample_x)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0.0, 0.5, (n, *s.shape)), jnp.float32), shapes
    )


@pytest.fixture(scope="module")
def setup():
    model = models.MLP(hidden=(8,), num_classes=N_CLASSES)
    apply = models.apply_fn(model)
    params = _np_params(model, N_WORKERS, jnp.ones((1, D_IN)))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(23, D_IN)), jnp.float32)
    y = jnp.asarray(rng.integers(0, N_CLASSES, 23), jnp.int32)
    return apply, params, x, y


def _worker(params, i):
    return jax.tree.map(lambda a: np.asarray(a)[i], params)


def _jit(fn, apply, **kw):
    """Jit ``fn(apply, *arrays, **kw)`` (library code is not jitted internally)."""
    return jax.jit(lambda *a: fn(apply, *a, **kw))


@pytest.mark.parametrize("example_chunk", [None, 5, 23, 100])
def test_evaluate_local_matches_loop(setup, example_chunk):
    apply, params, x, y = setup
    f = _jit(metrics.evaluate_local, apply, worker_chunk=2, example_chunk=example_chunk)
    loss, acc = f(params, x, y)
    assert loss.shape == acc.shape == (N_WORKERS,)
    ref_apply = jax.jit(apply)
    for i in range(N_WORKERS):
        ce, corr = _np_ce_acc(ref_apply(_worker(params, i), x), np.asarray(y))
        np.testing.assert_allclose(loss[i], ce.mean(), rtol=1e-5)
        np.testing.assert_allclose(acc[i], corr.mean(), rtol=1e-6)


def test_evaluate_local_jits_and_chunk_larger_than_n(setup):
    apply, params, x, y = setup
    f = jax.jit(lambda p: metrics.evaluate_local(apply, p, x, y, worker_chunk=64))
    loss, acc = f(params)
    ref_loss, ref_acc = _jit(metrics.evaluate_local, apply, worker_chunk=1)(
        params, x, y
    )
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(acc, ref_acc)


def test_evaluate_averaged_equals_mean_params(setup):
    apply, params, x, y = setup
    loss, acc = _jit(metrics.evaluate_averaged, apply, example_chunk=4)(params, x, y)
    mean_p = jax.tree.map(lambda a: np.asarray(a).mean(axis=0), params)
    ce, corr = _np_ce_acc(jax.jit(apply)(mean_p, x), np.asarray(y))
    np.testing.assert_allclose(loss, ce.mean(), rtol=1e-5)
    np.testing.assert_allclose(acc, corr.mean(), rtol=1e-6)


@pytest.mark.parametrize("example_chunk", [None, 3])
def test_evaluate_personalized_masks_padding(setup, example_chunk):
    apply, params, _, _ = setup
    m = 7
    rng = np.random.default_rng(5)
    x_w = jnp.asarray(rng.normal(size=(N_WORKERS, m, D_IN)), jnp.float32)
    y_w = jnp.asarray(rng.integers(0, N_CLASSES, (N_WORKERS, m)), jnp.int32)
    counts = np.array([7, 3, 1, 5, 2])
    # garbage in padded rows must not matter
    pad = np.arange(m)[None, :] >= counts[:, None]
    x_w = jnp.where(jnp.asarray(pad)[..., None], 1e4, x_w)
    f = _jit(
        metrics.evaluate_personalized,
        apply,
        worker_chunk=2,
        example_chunk=example_chunk,
    )
    loss, acc = f(params, x_w, y_w, counts)
    ref_acc = []
    ref_apply = jax.jit(apply)
    for i in range(N_WORKERS):
        c = counts[i]
        logits = np.asarray(ref_apply(_worker(params, i), x_w[i]))[:c]
        ce, corr = _np_ce_acc(logits, np.asarray(y_w[i, :c]))
        np.testing.assert_allclose(loss[i], ce.mean(), rtol=1e-5)
        np.testing.assert_allclose(acc[i], corr.mean(), rtol=1e-6)
        ref_acc.append(corr.mean())
    pa = _jit(metrics.personalized_accuracy, apply, worker_chunk=2)(
        params, x_w, y_w, counts
    )
    np.testing.assert_allclose(pa, np.mean(ref_acc), rtol=1e-6)


def test_evaluate_personalized_no_counts_uses_all_rows(setup):
    apply, params, x, y = setup
    x_w = jnp.broadcast_to(x[:4], (N_WORKERS, 4, D_IN))
    y_w = jnp.broadcast_to(y[:4], (N_WORKERS, 4))
    loss_p, acc_p = _jit(metrics.evaluate_personalized, apply)(params, x_w, y_w)
    loss_l, acc_l = _jit(metrics.evaluate_local, apply)(params, x[:4], y[:4])
    np.testing.assert_allclose(loss_p, loss_l, rtol=1e-6)
    np.testing.assert_allclose(acc_p, acc_l)


def test_evaluate_personalized_zero_count_is_nan(setup):
    apply, params, _, _ = setup
    x_w = jnp.ones((N_WORKERS, 2, D_IN))
    y_w = jnp.zeros((N_WORKERS, 2), jnp.int32)
    counts = jnp.array([0, 2, 2, 2, 2])
    loss, acc = _jit(metrics.evaluate_personalized, apply)(params, x_w, y_w, counts)
    assert np.isnan(loss[0]) and np.isnan(acc[0])
    assert np.all(np.isfinite(acc[1:]))
    pa = _jit(metrics.personalized_accuracy, apply)(params, x_w, y_w, counts)
    np.testing.assert_allclose(pa, np.mean(np.asarray(acc[1:])), rtol=1e-6)


def test_evaluate_personalized_validates(setup):
    apply, params, _, _ = setup
    x_w = jnp.ones((N_WORKERS, 2, D_IN))
    y_w = jnp.zeros((N_WORKERS, 2), jnp.int32)
    with pytest.raises(ValueError, match="x_w"):
        metrics.evaluate_personalized(apply, params, x_w[:4], y_w[:4])
    with pytest.raises(ValueError, match="counts"):
        metrics.evaluate_personalized(apply, params, x_w, y_w, np.array([3] * 5))
    with pytest.raises(ValueError, match="counts"):
        metrics.evaluate_personalized(apply, params, x_w, y_w, np.array([1, 2]))


def test_ring_communication_volume(setup):
    _, params, _, _ = setup
    n = 6
    W = np.zeros((n, n))
    for i in range(n):
        W[i, i] = 1 / 3
        W[i, (i + 1) % n] = 1 / 3
        W[i, (i - 1) % n] = 1 / 3
    p6 = jax.tree.map(lambda a: jnp.concatenate([a, a[:1]]), params)
    d = tree.num_params(p6)
    assert d == D_IN * 8 + 8 + 8 * N_CLASSES + N_CLASSES
    per, mean = metrics.communication_volume(W, p6)
    np.testing.assert_array_equal(per, np.full(n, 2.0 * d))
    assert mean == 2.0 * d
    # directed pattern: only worker 0 sends (to workers 1 and 2)
    P = np.eye(n, dtype=bool)
    P[1, 0] = P[2, 0] = True
    per, mean = metrics.communication_volume(P, 10)
    np.testing.assert_array_equal(per, [20, 0, 0, 0, 0, 0])
    assert mean == pytest.approx(20 / 6)
    with pytest.raises(ValueError, match="workers"):
        metrics.communication_volume(W, params)
    with pytest.raises(ValueError, match="square"):
        metrics.communication_volume(np.ones((2, 3)), 4)


def test_evaluator_hook(setup):
    apply, params, x, y = setup
    eval_fn = jax.jit(metrics.evaluator(apply, x, y, worker_chunk=2, example_chunk=8))
    out = eval_fn(params)
    assert set(out) == {
        "local_acc_mean",
        "local_acc_min",
        "local_loss_mean",
        "avg_model_acc",
        "avg_model_loss",
        "mergeability_gap",
        "consensus_distance",
    }
    loss, acc = _jit(metrics.evaluate_local, apply)(params, x, y)
    a_loss, a_acc = _jit(metrics.evaluate_averaged, apply)(params, x, y)
    np.testing.assert_allclose(out["local_acc_mean"], np.mean(acc), rtol=1e-6)
    np.testing.assert_allclose(out["local_acc_min"], np.min(acc), rtol=1e-6)
    np.testing.assert_allclose(out["local_loss_mean"], np.mean(loss), rtol=1e-5)
    np.testing.assert_allclose(out["avg_model_acc"], a_acc, rtol=1e-6)
    np.testing.assert_allclose(out["avg_model_loss"], a_loss, rtol=1e-5)
    np.testing.assert_allclose(out["mergeability_gap"], a_acc - np.mean(acc), atol=1e-6)
    flat = np.concatenate(
        [np.asarray(a).reshape(N_WORKERS, -1) for a in jax.tree.leaves(params)], axis=1
    )
    cd = np.mean(np.sum((flat - flat.mean(0)) ** 2, axis=1))
    np.testing.assert_allclose(out["consensus_distance"], cd, rtol=1e-5)
    assert metrics.consensus_distance is tree.consensus_distance


def test_bad_chunks_and_test_set(setup):
    apply, params, x, y = setup
    with pytest.raises(ValueError, match="worker_chunk"):
        metrics.evaluate_local(apply, params, x, y, worker_chunk=0)
    with pytest.raises(ValueError, match="example_chunk"):
        metrics.evaluator(apply, x, y, example_chunk=-2)
    with pytest.raises(ValueError, match="y"):
        metrics.evaluate_local(apply, params, x, y[:3])


def test_lenet_flat_digits_local_eval_chunked():
    """LeNet5 on flat 8x8 digits (image_shape) equals LeNet5 on [b, 8, 8, 1]."""
    model = models.LeNet5(num_classes=3, image_shape=(8, 8, 1))
    apply = models.apply_fn(model)
    sx = jnp.ones((1, 64))
    params = _np_params(model, 3, sx)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(10, 64)), jnp.float32)
    y = jnp.arange(10) % 3
    f = _jit(metrics.evaluate_local, apply, worker_chunk=3, example_chunk=5)
    loss, acc = f(params, x, y)
    ref_apply = jax.jit(
        jax.vmap(models.apply_fn(models.LeNet5(num_classes=3)), (0, None))
    )
    logits = np.asarray(ref_apply(params, x.reshape(10, 8, 8, 1)))
    for i in range(3):
        ce, corr = _np_ce_acc(logits[i], np.asarray(y))
        np.testing.assert_allclose(loss[i], ce.mean(), rtol=1e-5)
        np.testing.assert_allclose(acc[i], corr.mean(), rtol=1e-6)


def test_class_weighted_accuracy_matches_loop(setup):
    apply, params, x, y = setup
    rng = np.random.default_rng(4)
    q = rng.dirichlet(np.ones(N_CLASSES), size=N_WORKERS)
    q[0] = np.eye(N_CLASSES)[int(y[0])]  # one-class worker
    got = _jit(metrics.class_weighted_accuracy, apply, example_chunk=7)(
        params, x, y, jnp.asarray(q)
    )
    yn = np.asarray(y)
    for i in range(N_WORKERS):
        logits = apply(_worker(params, i), x)
        _, corr = _np_ce_acc(logits, yn)
        per_class = np.array([corr[yn == c].mean() for c in range(N_CLASSES)])
        np.testing.assert_allclose(got[i], q[i] @ per_class, rtol=1e-5)
    ev = jax.jit(metrics.personalized_evaluator(apply, x, y, q))(params)
    np.testing.assert_allclose(ev["pers_acc"], np.mean(got), rtol=1e-6)
    np.testing.assert_allclose(ev["pers_acc_min"], np.min(got), rtol=1e-6)
    glob = np.mean(
        [
            _np_ce_acc(apply(_worker(params, i), x), yn)[1].mean()
            for i in range(N_WORKERS)
        ]
    )
    np.testing.assert_allclose(ev["global_acc_mean"], glob, rtol=1e-5)


def test_class_weighted_accuracy_validates(setup):
    apply, params, x, y = setup
    with pytest.raises(ValueError, match="sum"):
        metrics.class_weighted_accuracy(
            apply, params, x, y, np.full((N_WORKERS, N_CLASSES), 0.5)
        )
    with pytest.raises(ValueError, match="label_distribution"):
        metrics.class_weighted_accuracy(apply, params, x, y, np.ones((2, N_CLASSES)))
    q = np.zeros((N_WORKERS, N_CLASSES + 1))
    q[:, -1] = 1.0  # class 4 never appears in y
    with pytest.raises(ValueError, match="no test example"):
        metrics.class_weighted_accuracy(apply, params, x, y, q)
