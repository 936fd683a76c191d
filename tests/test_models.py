"""Tests for jaxdec.models: body/head trees, shapes, worker init, losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdec import models, tree

SHAPES = [(8, 8, 1), (28, 28, 1), (32, 32, 3)]


def _np_params(model, sample_x, *lead, seed=0):
    """Random params (NumPy) with the model's tree and optional leading axes.

    Uses ``jax.eval_shape`` for the structure, so no flax initializer is compiled
    (keeps the suite fast on small CPUs); numerical tests need any params.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), sample_x)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0.0, 0.5, (*lead, *s.shape)), jnp.float32),
        shapes,
    )


def _np_cross_entropy(logits, y):
    logits = np.asarray(logits, np.float64)
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y]


def _shapes(model, x, method=None):
    """Params and output shapes by abstract evaluation (no XLA compile)."""
    p = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    out = jax.eval_shape(
        lambda q, x: model.apply({"params": q}, x, method=method), p, x
    )
    return p, out


@pytest.mark.parametrize("model_cls", [models.MLP, models.LeNet5])
@pytest.mark.parametrize("shape", SHAPES)
def test_tree_and_logit_shapes(model_cls, shape):
    model = model_cls(num_classes=7)
    x = jax.ShapeDtypeStruct((3, *shape), jnp.float32)
    params, logits = _shapes(model, x)
    assert set(params) == {"body", "head"}
    assert logits.shape == (3, 7)
    _, feats = _shapes(model, x, method="features")
    assert feats.shape == (3, 64 if model_cls is models.MLP else 84)
    # a single unbatched image also works
    if model_cls is models.LeNet5:
        _, one = _shapes(model, jax.ShapeDtypeStruct(shape, jnp.float32))
        assert one.shape == (7,)


@pytest.mark.parametrize(("shape", "flat"), [((8, 8, 1), 2), ((28, 28, 1), 7)])
def test_lenet_layers_and_cnn_alias(shape, flat):
    assert models.CNN is models.LeNet5
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    params, _ = _shapes(models.LeNet5(), x)
    body = params["body"]
    assert set(body) == {"Conv_0", "Conv_1", "Dense_0", "Dense_1"}
    assert body["Conv_0"]["kernel"].shape == (5, 5, 1, 6)
    assert body["Conv_1"]["kernel"].shape == (5, 5, 6, 16)
    assert body["Dense_0"]["kernel"].shape == (flat * flat * 16, 120)
    assert body["Dense_1"]["kernel"].shape == (120, 84)
    assert params["head"]["kernel"].shape == (84, 10)


def test_lenet_rejects_non_image():
    with pytest.raises(ValueError, match="image_shape"):
        _shapes(models.LeNet5(), jax.ShapeDtypeStruct((4, 64), jnp.float32))


def test_mlp_flattens_and_matches_numpy():
    model = models.MLP(hidden=(5,), num_classes=3)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 2, 3, 1)), jnp.float32)
    p = _np_params(model, x)
    b, h = p["body"]["Dense_0"], p["head"]
    xf = np.asarray(x).reshape(4, 6)
    z = np.maximum(xf @ np.asarray(b["kernel"]) + np.asarray(b["bias"]), 0.0)
    ref = z @ np.asarray(h["kernel"]) + np.asarray(h["bias"])
    out = jax.jit(models.apply_fn(model))(p, x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    # example_ndim: two leading batch axes
    m2 = models.MLP(hidden=(5,), num_classes=3, example_ndim=3)
    out = jax.jit(models.apply_fn(m2))(p, x.reshape(2, 2, 2, 3, 1))
    np.testing.assert_allclose(out.reshape(4, 3), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_cls", [models.MLP, models.LeNet5])
def test_mask_under_head_selects_only_head(model_cls):
    init = lambda k, sx: models.init_workers(model_cls(), k, 2, sx, same_init=False)
    sx = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)
    params = jax.eval_shape(init, jax.random.key(0), sx)
    assert tree.num_workers(params) == 2
    mask = tree.mask_under(params, "head")
    assert all(jax.tree.leaves(mask["head"]))
    assert not any(jax.tree.leaves(mask["body"]))
    flat = jax.tree_util.tree_leaves_with_path(mask)
    assert sum(m for _, m in flat) == len(jax.tree.leaves(params["head"]))


def test_init_workers_same_and_different():
    model = models.MLP(hidden=(8,), num_classes=4)
    sx = jnp.ones((1, 6))
    single = jax.jit(model.init)(jax.random.key(3), sx)["params"]
    same = models.init_workers(model, jax.random.key(3), 5, sx, same_init=True)
    diff = models.init_workers(model, jax.random.key(3), 5, sx, same_init=False)
    for p in (same, diff):
        assert tree.num_workers(p) == 5
        jax.tree.map(
            lambda a, s: (a.shape == (5, *s.shape)) or pytest.fail(), p, single
        )
    jax.tree.map(
        lambda a, s: np.testing.assert_array_equal(a, np.broadcast_to(s, a.shape)),
        same,
        single,
    )
    assert float(tree.consensus_distance(same)) < 1e-10  # mean rounding only
    k = np.asarray(diff["body"]["Dense_0"]["kernel"])
    assert not np.allclose(k[0], k[1])
    assert float(tree.consensus_distance(diff)) > 0.0


@pytest.mark.parametrize("n", [0, -1, 2.5])
def test_init_workers_rejects_bad_n(n):
    with pytest.raises(ValueError, match="n must be"):
        models.init_workers(models.MLP(), jax.random.key(0), n, jnp.ones((1, 4)))


def test_loss_matches_numpy_cross_entropy():
    model = models.MLP(hidden=(16,), num_classes=5)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(9, 7)), jnp.float32)
    y = jnp.array([0, 1, 2, 3, 4, 0, 1, 2, 3])
    p = _np_params(model, x)
    logits = np.asarray(jax.jit(models.apply_fn(model))(p, x))
    ce = _np_cross_entropy(logits, np.asarray(y)).mean()
    loss = jax.jit(models.classification_loss(model))(p, (x, y), jax.random.key(0))
    np.testing.assert_allclose(loss, ce, rtol=1e-5)

    l2 = 0.3
    sq = sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in jax.tree.leaves(p))
    loss_l2 = jax.jit(models.classification_loss(model, l2=l2))(p, (x, y), None)
    np.testing.assert_allclose(loss_l2, ce + 0.5 * l2 * sq, rtol=1e-5)

    val, aux = jax.jit(models.classification_loss_with_acc(model, l2=l2))(
        p, (x, y), None
    )
    np.testing.assert_allclose(val, loss_l2, rtol=1e-6)
    np.testing.assert_allclose(aux["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(
        aux["accuracy"], np.mean(logits.argmax(1) == np.asarray(y))
    )


def test_loss_vmaps_over_workers_and_differentiates():
    model = models.MLP(hidden=(8,), num_classes=3)
    n, b = 3, 4
    params = _np_params(model, jnp.ones((1, 5)), n)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(n, b, 5)), jnp.float32)
    y = jnp.zeros((n, b), jnp.int32)
    keys = jax.random.split(jax.random.key(2), n)
    loss_fn = models.classification_loss(model)
    losses = jax.jit(jax.vmap(loss_fn))(params, (x, y), keys)
    assert losses.shape == (n,)
    one = jax.jit(loss_fn)
    for i in range(n):
        p_i = jax.tree.map(lambda a, i=i: np.asarray(a)[i], params)
        np.testing.assert_allclose(losses[i], one(p_i, (x[i], y[i]), keys[i]), 1e-6)
    grads = jax.jit(jax.vmap(jax.grad(loss_fn)))(params, (x, y), keys)
    assert jax.tree.structure(grads) == jax.tree.structure(params)


def test_loss_rejects_bad_inputs():
    model = models.MLP(hidden=(4,), num_classes=3)
    p = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 5)))["params"]
    with pytest.raises(ValueError, match="l2"):
        models.classification_loss(model, l2=-1.0)
    loss_fn = models.classification_loss(model)
    f = lambda p, batch: jax.eval_shape(loss_fn, p, batch, None)
    with pytest.raises(ValueError, match="y"):
        f(p, (jnp.ones((4, 5)), jnp.zeros((3,), jnp.int32)))
    with pytest.raises(ValueError, match="pair"):
        f(p, jnp.ones((4, 5)))
