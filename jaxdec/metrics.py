"""Evaluation metrics over the worker axis, with bounded memory.

Every evaluator takes ``apply(params_i, x) -> logits`` written for ONE worker (e.g.
``jd.models.apply_fn(model)``) and worker-axis params (leaves ``[n, ...]``). Workers
are processed ``worker_chunk`` at a time (``jax.lax.map(..., batch_size=c)``: a scan
over chunks, ``jax.vmap`` inside a chunk, remainder handled separately), and test
examples ``example_chunk`` at a time (a scan over padded, masked example blocks), so
peak memory is ``O(worker_chunk * example_chunk)`` activations for any ``n``.

All array functions are jittable and, like all jaxdec library code, not jitted
internally: wrap calls in ``jax.jit`` (the driver does) to avoid op-by-op dispatch.
:func:`communication_volume` is a host-side NumPy count.

Example:
  >>> apply = jd.models.apply_fn(model)
  >>> loss, acc = jd.metrics.evaluate_local(apply, params, x_test, y_test)  # [n]
  >>> eval_fn = jax.jit(jd.metrics.evaluator(apply, x_test, y_test))
  >>> eval_fn(state.params)["avg_model_acc"]
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdec.tree import consensus_distance, num_params, num_workers, worker_mean
from jaxdec.types import PyTree

__all__ = [
    "consensus_distance",
    "evaluate_local",
    "evaluate_averaged",
    "evaluate_personalized",
    "personalized_accuracy",
    "class_accuracy",
    "class_weighted_accuracy",
    "personalized_evaluator",
    "communication_volume",
    "evaluator",
]

ApplyFn = Callable[[PyTree, jax.Array], jax.Array]


# --------------------------------------------------------------------------- helpers


def _check_chunk(value: int | None, name: str, *, allow_none: bool) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(
            f"{name} must be a positive integer{' or None' if allow_none else ''}, "
            f"got {value!r}."
        )
    return int(value)


def _check_xy(x: jax.Array, y: jax.Array, where: str) -> None:
    if jnp.ndim(y) != 1 or jnp.shape(x)[:1] != jnp.shape(y):
        raise ValueError(
            f"{where}: expected a test set x [N, ...] with integer labels y [N], got "
            f"x {jnp.shape(x)} and y {jnp.shape(y)}."
        )
    if jnp.shape(y)[0] == 0:
        raise ValueError(f"{where}: the test set is empty (N = 0).")


def _blocks(
    x: jax.Array, y: jax.Array, valid: jax.Array, chunk: int | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pad the example axis to a multiple of ``chunk`` and reshape to blocks.

    ``x [N, ...] -> [B, c, ...]``, ``y, valid [N] -> [B, c]`` with padded rows
    ``valid = 0``. ``chunk=None`` (or ``>= N``) gives one block.
    """
    m = y.shape[0]
    c = m if chunk is None or chunk >= m else chunk
    pad = (-m) % c
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)], axis=0)
        y = jnp.concatenate([y, jnp.zeros((pad,), y.dtype)], axis=0)
        valid = jnp.concatenate([valid, jnp.zeros((pad,), valid.dtype)], axis=0)
    nb = (m + pad) // c
    return (
        x.reshape(nb, c, *x.shape[1:]),
        y.reshape(nb, c),
        valid.reshape(nb, c),
    )


def _sums(
    apply: ApplyFn,
    params: PyTree,
    xb: jax.Array,
    yb: jax.Array,
    vb: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """``(sum_k v_k ce_k, sum_k v_k [argmax = y_k])`` over example blocks."""

    def block(blk):
        x, y, v = blk
        logits = apply(params, x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
        ce = jnp.where(v > 0, ce, 0.0)  # padded rows may hold anything
        return jnp.sum(v * ce), jnp.sum(v * correct)

    if xb.shape[0] == 1:
        return block((xb[0], yb[0], vb[0]))
    loss_s, corr_s = jax.lax.map(block, (xb, yb, vb))
    return jnp.sum(loss_s), jnp.sum(corr_s)


def _global_eval(
    apply: ApplyFn, x: jax.Array, y: jax.Array, example_chunk: int | None
) -> Callable[[PyTree], tuple[jax.Array, jax.Array]]:
    """One-model evaluator on a shared test set: ``p -> (mean ce, accuracy)``."""
    x = jnp.asarray(x)
    y = jnp.asarray(y, jnp.int32)
    n_ex = y.shape[0]
    xb, yb, vb = _blocks(x, y, jnp.ones((n_ex,), jnp.float32), example_chunk)

    def one(p: PyTree) -> tuple[jax.Array, jax.Array]:
        loss_s, corr_s = _sums(apply, p, xb, yb, vb)
        return loss_s / n_ex, corr_s / n_ex

    return one


# ------------------------------------------------------------------------ evaluators


def evaluate_local(
    apply: ApplyFn,
    params: PyTree,
    x: jax.typing.ArrayLike,
    y: jax.typing.ArrayLike,
    *,
    worker_chunk: int = 64,
    example_chunk: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Each worker's own model on the global test set.

    .. math::
        \\ell_i = \\frac{1}{N} \\sum_{k=1}^{N} \\mathrm{CE}(f(x_i; a_k), b_k), \\qquad
        \\mathrm{acc}_i = \\frac{1}{N} \\sum_{k=1}^{N}
            [\\arg\\max f(x_i; a_k) = b_k]

    for worker params ``x_i`` and test pairs ``(a_k, b_k)``.

    Args:
      apply: ``apply(params_i, x_batch) -> logits`` for ONE worker.
      params: worker-axis params (leaves ``[n, ...]``).
      x: test inputs ``[N, ...]``.
      y: integer test labels ``[N]``.
      worker_chunk: workers evaluated in parallel per scan step.
      example_chunk: test examples per forward pass (``None``: all at once).

    Returns:
      ``(loss, acc)``, each ``[n]`` float32.
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    _check_xy(x, y, "evaluate_local")
    worker_chunk = _check_chunk(worker_chunk, "worker_chunk", allow_none=False)
    example_chunk = _check_chunk(example_chunk, "example_chunk", allow_none=True)
    num_workers(params)  # validates the worker axis
    one = _global_eval(apply, x, y, example_chunk)
    return jax.lax.map(one, params, batch_size=worker_chunk)


def evaluate_averaged(
    apply: ApplyFn,
    params: PyTree,
    x: jax.typing.ArrayLike,
    y: jax.typing.ArrayLike,
    *,
    example_chunk: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The averaged model ``x_bar = (1/n) sum_i x_i`` on the test set.

    .. math::
        \\ell = \\frac{1}{N} \\sum_k \\mathrm{CE}(f(\\bar x; a_k), b_k), \\qquad
        \\mathrm{acc} = \\frac{1}{N} \\sum_k [\\arg\\max f(\\bar x; a_k) = b_k]

    Args:
      apply: ``apply(params, x_batch) -> logits`` for ONE model.
      params: worker-axis params (leaves ``[n, ...]``).
      x: test inputs ``[N, ...]``.
      y: integer test labels ``[N]``.
      example_chunk: test examples per forward pass (``None``: all at once).

    Returns:
      ``(loss, acc)`` float32 scalars.
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    _check_xy(x, y, "evaluate_averaged")
    example_chunk = _check_chunk(example_chunk, "example_chunk", allow_none=True)
    num_workers(params)
    return _global_eval(apply, x, y, example_chunk)(worker_mean(params))


def evaluate_personalized(
    apply: ApplyFn,
    params: PyTree,
    x_w: jax.typing.ArrayLike,
    y_w: jax.typing.ArrayLike,
    counts: jax.typing.ArrayLike | None = None,
    *,
    worker_chunk: int = 64,
    example_chunk: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Worker ``i``'s model on its own (padded) test split.

    With ``m_i = counts[i]`` valid rows of ``x_w[i]``:

    .. math::
        \\ell_i = \\frac{1}{m_i} \\sum_{k < m_i} \\mathrm{CE}(f(x_i; a_{ik}), b_{ik}),
        \\qquad
        \\mathrm{acc}_i = \\frac{1}{m_i} \\sum_{k < m_i}
            [\\arg\\max f(x_i; a_{ik}) = b_{ik}]

    Rows ``k >= counts[i]`` are padding and ignored. A worker with ``m_i = 0`` gets
    ``NaN`` (no test data, no estimate).

    Args:
      apply: ``apply(params_i, x_batch) -> logits`` for ONE worker.
      params: worker-axis params (leaves ``[n, ...]``).
      x_w: per-worker test inputs ``[n, m, ...]``.
      y_w: per-worker integer labels ``[n, m]``.
      counts: valid rows per worker ``[n]`` (``None``: all ``m`` rows valid).
      worker_chunk: workers evaluated in parallel per scan step.
      example_chunk: rows per forward pass (``None``: all ``m`` at once).

    Returns:
      ``(loss, acc)``, each ``[n]`` float32.
    """
    x_w, y_w = jnp.asarray(x_w), jnp.asarray(y_w, jnp.int32)
    worker_chunk = _check_chunk(worker_chunk, "worker_chunk", allow_none=False)
    example_chunk = _check_chunk(example_chunk, "example_chunk", allow_none=True)
    n = num_workers(params)
    if y_w.ndim != 2 or x_w.shape[:2] != y_w.shape or y_w.shape[0] != n:
        raise ValueError(
            f"evaluate_personalized: expected x_w [n, m, ...] and y_w [n, m] with "
            f"n = {n} workers, got x_w {x_w.shape} and y_w {y_w.shape}; stack each "
            "worker's test split (padded to m rows) along axis 0."
        )
    m = y_w.shape[1]
    if counts is None:
        counts = jnp.full((n,), m, jnp.int32)
    else:
        if jnp.shape(counts) != (n,):
            raise ValueError(
                f"evaluate_personalized: counts must have shape ({n},), got "
                f"{jnp.shape(counts)}; give the number of valid rows per worker."
            )
        if not isinstance(counts, jax.core.Tracer):
            c_np = np.asarray(counts)
            if c_np.min() < 0 or c_np.max() > m:
                raise ValueError(
                    f"evaluate_personalized: counts must lie in [0, {m}] (the padded "
                    f"split size), got range [{c_np.min()}, {c_np.max()}]."
                )
        counts = jnp.asarray(counts, jnp.int32)

    def one(args) -> tuple[jax.Array, jax.Array]:
        p, xi, yi, ci = args
        valid = (jnp.arange(m) < ci).astype(jnp.float32)
        xb, yb, vb = _blocks(xi, yi, valid, example_chunk)
        loss_s, corr_s = _sums(apply, p, xb, yb, vb)
        denom = ci.astype(jnp.float32)
        nan = jnp.full((), jnp.nan, jnp.float32)
        return (
            jnp.where(ci > 0, loss_s / jnp.maximum(denom, 1.0), nan),
            jnp.where(ci > 0, corr_s / jnp.maximum(denom, 1.0), nan),
        )

    return jax.lax.map(one, (params, x_w, y_w, counts), batch_size=worker_chunk)


def personalized_accuracy(
    apply: ApplyFn,
    params: PyTree,
    x_w: jax.typing.ArrayLike,
    y_w: jax.typing.ArrayLike,
    counts: jax.typing.ArrayLike | None = None,
    *,
    worker_chunk: int = 64,
    example_chunk: int | None = None,
) -> jax.Array:
    """Personalized accuracy ``(1/|S|) sum_{i in S} acc_i`` (unweighted mean).

    ``acc_i`` is from :func:`evaluate_personalized`; ``S`` is the set of workers with
    at least one valid test row (all workers when ``counts`` is None).

    Returns:
      A float32 scalar.
    """
    _, acc = evaluate_personalized(
        apply,
        params,
        x_w,
        y_w,
        counts,
        worker_chunk=worker_chunk,
        example_chunk=example_chunk,
    )
    return jnp.nanmean(acc)


def class_accuracy(
    apply: ApplyFn,
    params: PyTree,
    x: jax.typing.ArrayLike,
    y: jax.typing.ArrayLike,
    num_classes: int,
    *,
    worker_chunk: int = 64,
    example_chunk: int | None = None,
) -> jax.Array:
    """Per-worker, per-class accuracy on one shared test set.

    .. math::
        A_{ic} = \\frac{1}{|T_c|} \\sum_{k \\in T_c} [\\arg\\max f(x_i; a_k) = c],
        \\qquad T_c = \\{k : b_k = c\\}

    A class with no test example gets ``NaN``.

    Args:
      apply: ``apply(params_i, x_batch) -> logits`` for ONE worker.
      params: worker-axis params (leaves ``[n, ...]``).
      x: test inputs ``[N, ...]``.
      y: integer test labels ``[N]`` in ``0..num_classes-1``.
      num_classes: ``C``.
      worker_chunk: workers evaluated in parallel per scan step.
      example_chunk: test examples per forward pass (``None``: all at once).

    Returns:
      ``[n, C]`` float32.
    """
    x = jnp.asarray(x)
    y = jnp.asarray(y, jnp.int32)
    _check_xy(x, y, "class_accuracy")
    if (
        isinstance(num_classes, bool)
        or int(num_classes) != num_classes
        or num_classes < 1
    ):
        raise ValueError(
            f"class_accuracy: num_classes must be an int >= 1, got {num_classes!r}."
        )
    worker_chunk = _check_chunk(worker_chunk, "worker_chunk", allow_none=False)
    example_chunk = _check_chunk(example_chunk, "example_chunk", allow_none=True)
    num_workers(params)
    n_ex = y.shape[0]
    xb, yb, vb = _blocks(x, y, jnp.ones((n_ex,), jnp.float32), example_chunk)
    onehot = jax.nn.one_hot(yb, num_classes, dtype=jnp.float32) * vb[..., None]
    per_class = jnp.sum(onehot, axis=(0, 1))  # [C]

    def one(p: PyTree) -> jax.Array:
        def block(blk):
            xx, yy, oh = blk
            correct = (jnp.argmax(apply(p, xx), axis=-1) == yy).astype(jnp.float32)
            return correct @ oh  # [C] correct counts

        hits = jax.lax.map(block, (xb, yb, onehot)).sum(axis=0)
        return jnp.where(per_class > 0, hits / jnp.maximum(per_class, 1.0), jnp.nan)

    return jax.lax.map(one, params, batch_size=worker_chunk)


def class_weighted_accuracy(
    apply: ApplyFn,
    params: PyTree,
    x: jax.typing.ArrayLike,
    y: jax.typing.ArrayLike,
    q: jax.typing.ArrayLike,
    *,
    worker_chunk: int = 64,
    example_chunk: int | None = None,
) -> jax.Array:
    """Personalized accuracy weighted by each worker's own label proportions.

    .. math::
        \\mathrm{acc}_i = \\sum_c q_{ic} A_{ic}

    with ``A`` from :func:`class_accuracy` on the global test set and ``q_i`` worker
    ``i``'s *training* label proportions (``jd.data.label_distribution``). This is the
    expectation of worker ``i``'s accuracy on a test split whose label mix matches its
    training mix, without the sampling noise of drawing such a split (the DePRL and
    FedTSDP sheets' metric). Classes with ``q_{ic} = 0`` never matter, also when the
    test set lacks them.

    Args:
      apply: ``apply(params_i, x_batch) -> logits`` for ONE worker.
      params: worker-axis params (leaves ``[n, ...]``).
      x: global test inputs ``[N, ...]``.
      y: integer test labels ``[N]``.
      q: label proportions ``[n, C]``, rows non-negative and summing to 1.
      worker_chunk: workers evaluated in parallel per scan step.
      example_chunk: test examples per forward pass.

    Returns:
      ``[n]`` float32.

    Raises:
      ValueError: ``q`` of the wrong shape, negative, or with rows not summing to 1
        (normalize with ``q / q.sum(1, keepdims=True)``), or a class with
        ``q_{ic} > 0`` and no test example.
    """
    n = num_workers(params)
    q_np = None if isinstance(q, jax.core.Tracer) else np.asarray(q, np.float64)
    if jnp.ndim(q) != 2 or jnp.shape(q)[0] != n:
        raise ValueError(
            f"class_weighted_accuracy: q must be [n, C] label proportions, n = {n}, "
            f"got shape {jnp.shape(q)}; use jd.data.label_distribution(y, parts, C)."
        )
    if q_np is not None:
        if q_np.min() < 0 or not np.allclose(q_np.sum(1), 1.0, atol=1e-5):
            raise ValueError(
                "class_weighted_accuracy: every row of q must be non-negative and sum "
                "to 1 (a worker's label proportions); normalize q first."
            )
        present = np.bincount(np.asarray(y, np.int64), minlength=q_np.shape[1])
        missing = np.flatnonzero((q_np.max(0) > 0) & (present[: q_np.shape[1]] == 0))
        if missing.size:
            raise ValueError(
                f"class_weighted_accuracy: classes {missing.tolist()} have training "
                "weight but no test example; use a test set that covers them."
            )
    qj = jnp.asarray(q, jnp.float32)
    A = class_accuracy(
        apply,
        params,
        x,
        y,
        qj.shape[1],
        worker_chunk=worker_chunk,
        example_chunk=example_chunk,
    )
    return jnp.sum(jnp.where(qj > 0, qj * A, 0.0), axis=1)


def personalized_evaluator(
    apply: ApplyFn,
    test_x: jax.typing.ArrayLike,
    test_y: jax.typing.ArrayLike,
    q: jax.typing.ArrayLike,
    *,
    worker_chunk: int = 64,
    example_chunk: int | None = None,
) -> Callable[[PyTree], dict[str, jax.Array]]:
    """Jittable eval hook for personalized methods (each worker its own model).

    Keys: ``pers_acc = (1/n) sum_i acc_i`` with ``acc_i`` the class-weighted accuracy
    of :func:`class_weighted_accuracy`, ``pers_acc_min = min_i acc_i``, and
    ``global_acc_mean`` (plain accuracy on the whole test set, mean over workers).

    Args:
      apply: ``apply(params_i, x_batch) -> logits`` for ONE worker.
      test_x: global test inputs ``[N, ...]``.
      test_y: integer test labels ``[N]``.
      q: workers' training label proportions ``[n, C]``.
      worker_chunk: workers per parallel chunk.
      example_chunk: test examples per forward pass.

    Returns:
      ``eval_fn(params_or_state) -> dict``, a ``jax.tree_util.Partial`` whose leaves
      are the test arrays and ``q`` (so passing it to jit does not embed them).
    """
    x = jnp.asarray(test_x)
    y = jnp.asarray(test_y, jnp.int32)
    _check_xy(x, y, "personalized_evaluator")
    q_np = np.asarray(q, np.float64)
    if q_np.ndim != 2 or q_np.min() < 0 or not np.allclose(q_np.sum(1), 1.0, atol=1e-5):
        raise ValueError(
            "personalized_evaluator: q must be [n, C] label proportions (rows "
            f"non-negative, summing to 1), got shape {q_np.shape}."
        )
    worker_chunk = _check_chunk(worker_chunk, "worker_chunk", allow_none=False)
    example_chunk = _check_chunk(example_chunk, "example_chunk", allow_none=True)

    def eval_fn(x, y, q, target):
        params = getattr(target, "params", target)
        A = class_accuracy(
            apply,
            params,
            x,
            y,
            q.shape[1],
            worker_chunk=worker_chunk,
            example_chunk=example_chunk,
        )
        acc = jnp.sum(jnp.where(q > 0, q * A, 0.0), axis=1)
        counts = jnp.bincount(y, length=q.shape[1]).astype(jnp.float32)
        glob = jnp.nansum(A * counts[None, :], axis=1) / jnp.sum(counts)
        return {
            "pers_acc": jnp.mean(acc),
            "pers_acc_min": jnp.min(acc),
            "global_acc_mean": jnp.mean(glob),
        }

    return jax.tree_util.Partial(eval_fn, x, y, jnp.asarray(q_np, jnp.float32))


# ------------------------------------------------------------------- communication


def communication_volume(
    W_or_pattern: np.ndarray, params: PyTree | int
) -> tuple[np.ndarray, float]:
    """Floats sent per worker per gossip round.

    Model: the gossip step ``x_i <- sum_j W_ij x_j`` needs worker ``j``'s full
    parameter vector (``d`` floats) at every out-neighbour ``i != j`` with
    ``W_ij != 0``; each such neighbour costs one message of ``d`` floats, so

    .. math::
        \\mathrm{sent}_j = \\lvert\\{ i \\ne j : W_{ij} \\ne 0 \\}\\rvert \\cdot d.

    No compression, no broadcast sharing, self-loops free. Multiply by 4 for float32
    bytes. For a ring (``W`` tridiagonal-circulant) ``sent_j = 2 d``.

    Args:
      W_or_pattern: mixing matrix ``W`` ``(n, n)`` or its boolean sparsity pattern.
      params: worker-axis params (``d`` = per-worker parameter count via
        ``jd.tree.num_params``), or ``d`` as an int.

    Returns:
      ``(per_worker, mean)``: float64 NumPy array ``[n]`` and its mean.

    Raises:
      ValueError: if ``W`` is not square or disagrees with the params' worker count.
    """
    W = np.asarray(W_or_pattern)
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(
            f"communication_volume: W must be a square (n, n) matrix, got shape "
            f"{W.shape}; pass jd.topology.mixing_matrix(G, ...)."
        )
    n = W.shape[0]
    if isinstance(params, (int, np.integer)) and not isinstance(params, bool):
        d = int(params)
        if d < 0:
            raise ValueError(f"communication_volume: d must be >= 0, got {d}.")
    else:
        n_p = num_workers(params)
        if n_p != n:
            raise ValueError(
                f"communication_volume: W is {n}x{n} but params carry {n_p} workers; "
                "use the mixing matrix of the same network."
            )
        d = num_params(params)
    nz = W != 0
    np.fill_diagonal(nz, False)
    out_degree = nz.sum(axis=0)  # column j: receivers of worker j
    per_worker = out_degree.astype(np.float64) * float(d)
    return per_worker, float(per_worker.mean())


# --------------------------------------------------------------------------- hook


def evaluator(
    apply: ApplyFn,
    test_x: jax.typing.ArrayLike,
    test_y: jax.typing.ArrayLike,
    *,
    worker_chunk: int = 64,
    example_chunk: int | None = None,
) -> Callable[[PyTree], dict[str, jax.Array]]:
    """Build a jittable eval hook ``eval_fn(params) -> dict`` of float32 scalars.

    Keys: ``local_acc_mean = mean_i acc_i``, ``local_acc_min = min_i acc_i``,
    ``local_loss_mean = mean_i loss_i`` (each worker's model on the test set, see
    :func:`evaluate_local`), ``avg_model_acc`` / ``avg_model_loss`` (the averaged
    model ``x_bar``, :func:`evaluate_averaged`), ``mergeability_gap =
    avg_model_acc - local_acc_mean``, and
    ``consensus_distance = (1/n) sum_i ||x_i - x_bar||^2``.

    Args:
      apply: ``apply(params_i, x_batch) -> logits`` for ONE worker.
      test_x: test inputs ``[N, ...]`` (moved to device once).
      test_y: integer test labels ``[N]``.
      worker_chunk: workers per parallel chunk.
      example_chunk: test examples per forward pass.

    Returns:
      ``eval_fn(params) -> dict[str, jax.Array]``; ``eval_fn(state)`` evaluates
      ``state.params`` of any algorithm state, so ``jd.run(..., eval_fn=eval_fn)``
      works directly. It is a ``jax.tree_util.Partial`` whose leaves are the test
      arrays, so passed as a jit argument the test set is not compiled in.

    Example:
      >>> eval_fn = jax.jit(evaluator(apply_fn(model), x_test, y_test))
      >>> metrics = eval_fn(state.params)
    """
    x = jnp.asarray(test_x)
    y = jnp.asarray(test_y, jnp.int32)
    _check_xy(x, y, "evaluator")
    worker_chunk = _check_chunk(worker_chunk, "worker_chunk", allow_none=False)
    example_chunk = _check_chunk(example_chunk, "example_chunk", allow_none=True)

    def eval_fn(x: jax.Array, y: jax.Array, target: PyTree) -> dict[str, jax.Array]:
        params = getattr(target, "params", target)
        one = _global_eval(apply, x, y, example_chunk)
        loss, acc = jax.lax.map(one, params, batch_size=worker_chunk)
        avg_loss, avg_acc = one(worker_mean(params))
        return {
            "local_acc_mean": jnp.mean(acc),
            "local_acc_min": jnp.min(acc),
            "local_loss_mean": jnp.mean(loss),
            "avg_model_acc": avg_acc,
            "avg_model_loss": avg_loss,
            "mergeability_gap": avg_acc - jnp.mean(acc),
            "consensus_distance": consensus_distance(params),
        }

    return jax.tree_util.Partial(eval_fn, x, y)
