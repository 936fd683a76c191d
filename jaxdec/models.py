"""Small classification models with a ``body``/``head`` split, and their losses.

Every model here maps inputs to logits through two named submodules,

    z = body(x)          (representation, shared in personalization methods)
    logits = head(z)     (final Dense layer, personal in DePRL / FedPer)

so the parameter tree is exactly ``{"body": {...}, "head": {...}}`` and
``jd.tree.mask_under(params, "head")`` selects the personal head.

Per-worker parameters are built with :func:`init_workers` (leaves ``[n, ...]``), and
:func:`classification_loss` gives the ONE-worker ``loss_fn(params, batch, key)`` that
algorithms lift with ``jax.vmap``.

Batch normalization (``norm="batch"``): training normalizes with the statistics of the
current minibatch (the loss runs the model in train mode), so algorithms carry only
``params``; running statistics are never trained or gossiped. Before evaluating, they
are re-estimated for the model at hand with :func:`jaxdec.merge.batch_statistics`
(cumulative averaging over a few batches, as the single-merge sheet prescribes for the
merged model), and :func:`apply_fn` takes ``{"params": p, "batch_stats": s}``.

Example:
  >>> import jax, jax.numpy as jnp, jaxdec as jd
  >>> from jaxdec.models import MLP, init_workers, classification_loss
  >>> model = MLP(hidden=(32,), num_classes=10)
  >>> params = init_workers(model, jax.random.key(0), 4, jnp.zeros((1, 64)))
  >>> loss_fn = classification_loss(model)        # loss_fn(params_i, (x, y), key)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxdec.tree import replicate, sq_norm
from jaxdec.types import PyTree

__all__ = [
    "MLPBody",
    "LeNetBody",
    "MLP",
    "LeNet5",
    "CNN",
    "init_workers",
    "apply_fn",
    "train_apply_fn",
    "as_variables",
    "uses_batch_stats",
    "features_fn",
    "classification_loss",
    "classification_loss_with_acc",
]

Activation = Callable[[jax.Array], jax.Array]


def _flatten_examples(x: jax.Array, example_ndim: int | None) -> jax.Array:
    """Flatten each example to a vector.

    With ``example_ndim=k`` the trailing ``k`` axes are one example and everything in
    front is batch: ``[*batch, *example] -> [*batch, prod(example)]``. With ``None``,
    a 1-D input is one example and otherwise axis 0 is the batch axis:
    ``[b, ...] -> [b, prod(...)]``.
    """
    if example_ndim is None:
        return x if x.ndim <= 1 else x.reshape(x.shape[0], -1)
    if example_ndim < 1 or example_ndim > x.ndim:
        raise ValueError(
            f"MLP: example_ndim={example_ndim} does not fit an input of shape "
            f"{x.shape}; set example_ndim to the number of per-example axes "
            "(1 for vectors [..., d], 3 for images [..., H, W, C])."
        )
    batch = x.shape[: x.ndim - example_ndim]
    return x.reshape(*batch, -1)


class MLPBody(nn.Module):
    """Representation ``z = act(W_L ... act(W_1 flatten(x) + b_1) ... + b_L)``.

    Attributes:
      hidden: widths of the hidden Dense layers.
      activation: elementwise nonlinearity after every hidden layer.
      example_ndim: number of trailing per-example axes (``None``: axis 0 is batch,
        or a 1-D input is a single example).
    """

    hidden: Sequence[int] = (128, 64)
    activation: Activation = nn.relu
    example_ndim: int | None = None
    norm: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        z = _flatten_examples(jnp.asarray(x, jnp.float32), self.example_ndim)
        for width in self.hidden:
            z = self.activation(_normalize(nn.Dense(width)(z), self.norm, train))
        return z


NORMS = (None, "batch")


def _check_norm(model: str, norm: str | None) -> None:
    if norm not in NORMS:
        raise ValueError(
            f"{model}: norm must be None or 'batch' (BatchNorm after every hidden "
            f"layer), got {norm!r}."
        )


def _normalize(z: jax.Array, norm: str | None, train: bool) -> jax.Array:
    """BatchNorm over all leading axes (batch statistics in train mode)."""
    if norm is None:
        return z
    return nn.BatchNorm(use_running_average=not train, momentum=0.9)(z)


class LeNetBody(nn.Module):
    """LeNet-5 style feature extractor.

    ``conv 6@5x5 -> act -> avgpool 2 -> conv 16@5x5 -> act -> avgpool 2 -> flatten
    -> dense 120 -> act -> dense 84 -> act``. Convolutions and pools use ``"SAME"``
    padding so 8x8 inputs (scikit-learn digits) work as well as 28x28 (MNIST) and
    32x32 (CIFAR-10): spatial size ``s -> ceil(s/2) -> ceil(s/4)``.

    Attributes:
      activation: elementwise nonlinearity.
      image_shape: optional ``(H, W, C)``; when given, trailing flat features are
        reshaped to it first (e.g. digits stored as ``[b, 64]`` with ``(8, 8, 1)``).
    """

    activation: Activation = nn.relu
    image_shape: tuple[int, int, int] | None = None
    norm: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        if self.image_shape is not None:
            x = x.reshape(*x.shape[:-1], *self.image_shape)
        if x.ndim < 3:
            raise ValueError(
                f"LeNet5: input of shape {x.shape} is not an image [..., H, W, C]; "
                "add a channel axis or set image_shape=(H, W, C)."
            )
        single = x.ndim == 3
        if single:
            x = x[None]
        batch = x.shape[:-3]
        x = x.reshape(-1, *x.shape[-3:])
        pool = lambda h: nn.avg_pool(h, (2, 2), strides=(2, 2), padding="SAME")
        act = lambda h: self.activation(_normalize(h, self.norm, train))
        h = pool(act(nn.Conv(6, (5, 5), padding="SAME")(x)))
        h = pool(act(nn.Conv(16, (5, 5), padding="SAME")(h)))
        h = h.reshape(h.shape[0], -1)
        h = act(nn.Dense(120)(h))
        h = act(nn.Dense(84)(h))
        h = h.reshape(*batch, h.shape[-1])
        return h[0] if single else h


class MLP(nn.Module):
    """Multilayer perceptron ``logits = head(body(x))`` with a linear ``head``.

    ``body`` is :class:`MLPBody` (flatten + hidden Dense/activation layers), ``head``
    is ``Dense(num_classes)``, so params are ``{"body": {...}, "head": {...}}``.

    Attributes:
      hidden: hidden layer widths.
      num_classes: number of output logits.
      activation: hidden nonlinearity.
      example_ndim: trailing per-example axes (see :class:`MLPBody`).
      norm: ``None`` or ``"batch"`` (BatchNorm before every hidden activation).

    Example:
      >>> model = MLP(hidden=(64,), num_classes=10)
      >>> v = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
      >>> sorted(v["params"])
      ['body', 'head']
    """

    hidden: Sequence[int] = (128, 64)
    num_classes: int = 10
    activation: Activation = nn.relu
    example_ndim: int | None = None
    norm: str | None = None

    def setup(self) -> None:
        _check_widths("MLP", {"num_classes": self.num_classes}, self.hidden)
        _check_norm("MLP", self.norm)
        self.body = MLPBody(
            hidden=tuple(self.hidden),
            activation=self.activation,
            example_ndim=self.example_ndim,
            norm=self.norm,
        )
        self.head = nn.Dense(self.num_classes)

    def features(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Representation ``z = body(x)`` (use with ``method="features"``)."""
        return self.body(x, train)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits ``head(body(x))``, shape ``[..., num_classes]``."""
        return self.head(self.body(x, train))


class LeNet5(nn.Module):
    """LeNet-5 class CNN ``logits = head(body(x))``; inputs ``[..., H, W, C]``.

    ``body`` is :class:`LeNetBody` (two conv/pool stages, dense 120, dense 84),
    ``head`` is ``Dense(num_classes)``; params are ``{"body": ..., "head": ...}``.

    Attributes:
      num_classes: number of output logits.
      activation: nonlinearity.
      image_shape: optional ``(H, W, C)`` to reshape flat inputs.
      norm: ``None`` or ``"batch"`` (BatchNorm before every hidden activation).

    Example:
      >>> model = LeNet5(num_classes=10)
      >>> v = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
      >>> model.apply(v, jnp.zeros((5, 28, 28, 1))).shape
      (5, 10)
    """

    num_classes: int = 10
    activation: Activation = nn.relu
    image_shape: tuple[int, int, int] | None = None
    norm: str | None = None

    def setup(self) -> None:
        _check_widths("LeNet5", {"num_classes": self.num_classes}, ())
        _check_norm("LeNet5", self.norm)
        self.body = LeNetBody(
            activation=self.activation, image_shape=self.image_shape, norm=self.norm
        )
        self.head = nn.Dense(self.num_classes)

    def features(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Representation ``z = body(x)`` (84 features)."""
        return self.body(x, train)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits ``head(body(x))``, shape ``[..., num_classes]``."""
        return self.head(self.body(x, train))


CNN = LeNet5
"""Alias of :class:`LeNet5`."""


def _check_widths(model: str, sizes: dict[str, int], hidden: Sequence[int]) -> None:
    """Raise ``ValueError`` for a layer width that is not a positive integer."""
    items = list(sizes.items()) + [(f"hidden[{i}]", w) for i, w in enumerate(hidden)]
    for name, v in items:
        if isinstance(v, bool) or not isinstance(v, (int, jnp.integer)) or v < 1:
            raise ValueError(
                f"{model}: {name} must be an integer >= 1, got {v!r}; e.g. "
                f"{model}(num_classes=10)."
            )


def init_workers(
    model: nn.Module,
    key: jax.Array,
    n: int,
    sample_x: jax.typing.ArrayLike,
    same_init: bool = True,
    *,
    with_stats: bool = False,
) -> PyTree:
    """Initialize parameters for ``n`` workers (leaves ``[n, ...]``).

    ``same_init=True``: ``x_i = theta_0`` for all ``i`` with
    ``theta_0 = init(key)`` (standard for decentralized SGD, consensus distance 0).
    ``same_init=False``: ``x_i = init(k_i)`` with ``(k_1..k_n) = split(key, n)``,
    computed by ``jax.vmap`` over the keys. The initializer is jitted (one compile
    instead of op-by-op dispatch); calling this inside ``jax.jit`` also works.

    Args:
      model: a flax.linen module whose only variable collection is ``params``.
      key: PRNG key.
      n: number of workers, ``>= 1``.
      sample_x: example input for ONE worker used to infer shapes (e.g. ``x[:1]``).
      same_init: replicate one initialization (True) or draw independent ones.
      with_stats: also return the model's other collections (BatchNorm's
        ``batch_stats``) as a second value; needed to accept a model that has them.

    Returns:
      The inner params dict (``variables["params"]``) with leaves ``[n, ...]``;
      with ``with_stats=True`` the pair ``(params, {"batch_stats": ...})``.

    Raises:
      ValueError: if ``n < 1``, or the model has non-``params`` collections and
        ``with_stats`` is False.
    """
    if isinstance(n, bool) or int(n) != n or int(n) < 1:
        raise ValueError(f"init_workers: n must be an integer >= 1, got {n!r}.")
    n = int(n)
    sample_x = jnp.asarray(sample_x)

    def init_one(k: jax.Array) -> PyTree:
        variables = dict(model.init(k, sample_x))
        extra = sorted(set(variables) - {"params"})
        if extra and not with_stats:
            raise ValueError(
                f"init_workers: the model has variable collections {extra} besides "
                "'params' (e.g. BatchNorm statistics); pass with_stats=True to get "
                "(params, stats), train on params (the loss normalizes with batch "
                "statistics) and re-estimate statistics with "
                "jd.merge.batch_statistics before evaluating."
            )
        params = variables.pop("params")
        return (params, variables) if with_stats else params

    if same_init:
        return replicate(jax.jit(init_one)(key), n)
    return jax.jit(jax.vmap(init_one))(jax.random.split(key, n))


def as_variables(params_or_variables: PyTree) -> dict:
    """``{"params": p}`` for a params tree; a variables dict is returned as is.

    A variables dict is a mapping with a ``"params"`` key (e.g. ``{"params": p,
    "batch_stats": s}`` for a BatchNorm model).
    """
    v = params_or_variables
    if isinstance(v, Mapping) and "params" in v:
        return dict(v)
    return {"params": v}


def uses_batch_stats(model: nn.Module) -> bool:
    """Whether ``model`` is a jaxdec model built with ``norm="batch"``."""
    return getattr(model, "norm", None) == "batch"


def apply_fn(model: nn.Module) -> Callable[[PyTree, jax.Array], jax.Array]:
    """Return ``f(params, x) = model.apply({"params": params}, x)`` (logits).

    ``params`` is ONE worker's params, or its variables dict ``{"params": p,
    "batch_stats": s}`` for a BatchNorm model (evaluation mode: running statistics);
    lift with ``jax.vmap`` over the worker axis.
    """

    def f(params: PyTree, x: jax.Array) -> jax.Array:
        return model.apply(as_variables(params), x)

    return f


def train_apply_fn(model: nn.Module) -> Callable[[PyTree, jax.Array], jax.Array]:
    """Logits in training mode: BatchNorm normalizes with the minibatch statistics.

    For a model without batch statistics this is :func:`apply_fn`. Running statistics
    are neither needed nor updated (jaxdec re-estimates them for evaluation).
    """
    if not uses_batch_stats(model):
        return apply_fn(model)

    def f(params: PyTree, x: jax.Array) -> jax.Array:
        logits, _ = model.apply(
            {"params": params}, x, train=True, mutable=["batch_stats"]
        )
        return logits

    return f


def features_fn(model: nn.Module) -> Callable[[PyTree, jax.Array], jax.Array]:
    """Return ``f(params, x) = body(x)``, the representation before the head.

    Requires a model with a ``features`` method (:class:`MLP`, :class:`LeNet5`).
    """
    if not hasattr(model, "features"):
        raise ValueError(
            f"features_fn: {type(model).__name__} has no 'features' method; use a "
            "jaxdec model (MLP, LeNet5) or add features(self, x) returning body(x)."
        )

    def f(params: PyTree, x: jax.Array) -> jax.Array:
        return model.apply(as_variables(params), x, method="features")

    return f


def _check_l2(l2: float) -> float:
    l2 = float(l2)
    if not l2 >= 0.0:
        raise ValueError(f"classification_loss: l2 must be >= 0, got {l2}.")
    return l2


def _check_batch(batch) -> tuple[jax.Array, jax.Array]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(
            "classification loss: batch must be a pair (x, y) with x [b, ...] and "
            f"integer labels y [b]; got {type(batch).__name__}."
        )
    x, y = batch
    if jnp.ndim(y) != 1 or jnp.shape(x)[:1] != jnp.shape(y):
        raise ValueError(
            f"classification loss: expected x [b, ...] and y [b], got x "
            f"{jnp.shape(x)} and y {jnp.shape(y)}; pass one worker's batch (the "
            "algorithm vmaps the worker axis)."
        )
    return x, y


def classification_loss_with_acc(
    model: nn.Module, *, l2: float = 0.0
) -> Callable[[PyTree, tuple, jax.Array], tuple[jax.Array, dict]]:
    """ONE-worker softmax cross-entropy with accuracy as aux (``has_aux=True``).

    .. math::
        L(\\theta; x, y) = \\frac{1}{b} \\sum_{k=1}^{b}
            \\left(\\log \\sum_c e^{f_\\theta(x_k)_c} - f_\\theta(x_k)_{y_k}\\right)
            + \\frac{\\lambda}{2} \\lVert \\theta \\rVert^2,
        \\qquad
        \\mathrm{acc} = \\frac{1}{b} \\sum_k [\\arg\\max_c f_\\theta(x_k)_c = y_k].

    Args:
      model: flax module mapping ``x [b, ...]`` to logits ``[b, classes]``.
      l2: weight decay ``lambda >= 0`` on all parameters.

    Returns:
      ``loss_fn(params, batch, key) -> (loss, {"accuracy": acc, "ce": ce})`` where
      ``batch = (x, y)`` with ``x [b, ...]`` and int ``y [b]``; ``key`` is unused.
    With a ``norm="batch"`` model the forward pass runs in training mode
    (minibatch statistics; see the module docstring).
    """
    l2 = _check_l2(l2)
    f = train_apply_fn(model)

    def loss_fn(params: PyTree, batch, key: jax.Array | None = None):
        del key
        x, y = _check_batch(batch)
        logits = f(params, x)
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
        acc = jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))
        loss = ce + 0.5 * l2 * sq_norm(params) if l2 > 0.0 else ce
        return loss, {"accuracy": acc, "ce": ce}

    return loss_fn


def classification_loss(
    model: nn.Module, *, l2: float = 0.0
) -> Callable[[PyTree, tuple, jax.Array], jax.Array]:
    """ONE-worker mean softmax cross-entropy plus optional L2 penalty.

    .. math::
        L(\\theta; x, y) = \\frac{1}{b} \\sum_{k=1}^{b}
            -\\log \\operatorname{softmax}(f_\\theta(x_k))_{y_k}
            + \\frac{\\lambda}{2} \\lVert \\theta \\rVert^2

    Args:
      model: flax module mapping ``x [b, ...]`` to logits ``[b, classes]``.
      l2: weight decay ``lambda >= 0``.

    Returns:
      ``loss_fn(params, batch, key) -> scalar`` with ``batch = (x, y)``.

    Example:
      >>> loss_fn = classification_loss(MLP(hidden=(32,)))
      >>> grads = jax.vmap(jax.grad(loss_fn))(params, batch, keys)  # worker axis
    """
    with_acc = classification_loss_with_acc(model, l2=l2)

    def loss_fn(params: PyTree, batch, key: jax.Array | None = None) -> jax.Array:
        return with_acc(params, batch, key)[0]

    return loss_fn
