"""Host-side partitions of a dataset over ``n`` workers.

Each partition function returns ``list[np.ndarray]``: one sorted int64 index array
per worker, pairwise disjoint (every sample is used at most once; :func:`iid`,
:func:`dirichlet` and :func:`shards` use every sample exactly once). Everything is a
pure function of ``seed`` (``np.random.default_rng(seed)``).

Example:
  >>> parts = dirichlet(labels, n=10, alpha=0.1, seed=0)
  >>> heterogeneity(labels, parts, num_classes=10)      # in [0, 1); 0 = iid
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "iid",
    "dirichlet",
    "shards",
    "label_distribution",
    "heterogeneity",
    "test_split_like",
]


def _check_n(n: int, fn: str) -> int:
    if int(n) != n or int(n) < 1:
        raise ValueError(f"{fn}: n (number of workers) must be an int >= 1, got {n}.")
    return int(n)


def _as_labels(labels: np.ndarray, fn: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"{fn}: labels must be 1-D [N], got shape {y.shape}.")
    if not np.issubdtype(y.dtype, np.integer):
        if y.size and not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError(
                f"{fn}: labels must be integer class ids, got dtype {y.dtype}; "
                "remap them to 0..K-1 first (e.g. np.unique(y, return_inverse=True))."
            )
        y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise ValueError(f"{fn}: labels must be >= 0, got {y.min()}; remap to 0..K-1.")
    return y


def _check_parts(parts: Sequence[np.ndarray], size: int, fn: str) -> list[np.ndarray]:
    if len(parts) == 0:
        raise ValueError(f"{fn}: parts is empty; pass one index array per worker.")
    out = []
    for i, p in enumerate(parts):
        p = np.asarray(p)
        if p.ndim != 1 or (p.size and not np.issubdtype(p.dtype, np.integer)):
            raise ValueError(
                f"{fn}: parts[{i}] must be a 1-D integer index array, got "
                f"{p.dtype} {p.shape}."
            )
        if p.size and (p.min() < 0 or p.max() >= size):
            raise ValueError(
                f"{fn}: parts[{i}] has indices outside [0, {size}); the parts do not "
                "belong to these labels."
            )
        out.append(p.astype(np.int64))
    return out


def iid(num_samples_or_labels: int | np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """Uniformly random, equal-size (up to one sample) split.

    A random permutation of ``0..N-1`` is cut into ``n`` contiguous chunks of size
    ``floor(N/n)`` or ``ceil(N/n)``.

    Args:
      num_samples_or_labels: ``N`` or any array whose length is ``N`` (e.g. labels).
      n: number of workers, ``1 <= n <= N``.
      seed: RNG seed.

    Returns:
      ``n`` sorted, disjoint index arrays covering ``0..N-1``.
    """
    n = _check_n(n, "iid")
    if np.ndim(num_samples_or_labels) == 0:
        num = int(num_samples_or_labels)
    else:
        num = len(num_samples_or_labels)
    if num < n:
        raise ValueError(
            f"iid: {num} samples cannot give each of n={n} workers at least one; use "
            "fewer workers or more data."
        )
    perm = np.random.default_rng(seed).permutation(num)
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, n)]


def dirichlet(
    labels: np.ndarray,
    n: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
    max_tries: int = 100,
    *,
    balance: bool = False,
) -> list[np.ndarray]:
    """Per-class Dirichlet label-skew split (Hsu et al. 2019; Wang et al. 2020).

    For every class ``k`` draw ``p_k ~ Dir(alpha 1_n)`` and cut the shuffled indices
    of class ``k`` (``N_k`` of them) at ``floor(N_k cumsum(p_k))``, giving worker
    ``i`` about ``p_{k,i} N_k`` samples of class ``k``. Small ``alpha`` => each class
    concentrates on few workers (strong heterogeneity); ``alpha -> inf`` => iid-like.
    The whole draw is repeated until every worker holds ``>= min_size`` samples.

    With ``balance=True`` (the NIID-Bench recipe the DePRL and FedTSDP sheets use),
    classes are dealt one after another and a worker that already holds
    ``>= N / n`` samples gets no further share: ``p_{k,i} <- p_{k,i} [s_i < N/n]``
    renormalized, ``s_i`` its current size. This keeps worker sizes comparable at
    small ``alpha``.

    Args:
      labels: int class ids ``[N]``.
      n: number of workers.
      alpha: Dirichlet concentration, ``> 0``.
      seed: RNG seed.
      min_size: minimum samples per worker (``n * min_size <= N``).
      max_tries: redraws before giving up.
      balance: cap shares of workers already holding ``>= N / n`` samples.

    Returns:
      ``n`` sorted, disjoint index arrays covering ``0..N-1``.

    Raises:
      ValueError: invalid arguments, or no draw met ``min_size`` within
        ``max_tries`` (lower ``min_size``, raise ``alpha`` or use fewer workers).
    """
    y = _as_labels(labels, "dirichlet")
    n = _check_n(n, "dirichlet")
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"dirichlet: alpha must be a finite number > 0, got {alpha}.")
    if (
        isinstance(min_size, bool)
        or int(min_size) != min_size
        or isinstance(max_tries, bool)
        or int(max_tries) != max_tries
        or min_size < 0
        or max_tries < 1
    ):
        raise ValueError(
            f"dirichlet: need integers min_size >= 0 and max_tries >= 1, got "
            f"{min_size!r}, {max_tries!r}."
        )
    if not isinstance(balance, bool):
        raise ValueError(f"dirichlet: balance must be True or False, got {balance!r}.")
    if n * min_size > len(y):
        raise ValueError(
            f"dirichlet: n * min_size = {n} * {min_size} > {len(y)} samples; lower "
            "min_size or use fewer workers."
        )
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == k) for k in np.unique(y)]
    sizes = np.zeros(n, dtype=np.int64)
    for _ in range(max_tries):
        chunks: list[list[np.ndarray]] = [[] for _ in range(n)]
        held = np.zeros(n, dtype=np.int64)
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(n, float(alpha)))
            if not np.all(np.isfinite(p)) or p.sum() <= 0:  # underflow at tiny alpha
                p = np.eye(n)[rng.integers(n)]
            if balance:
                open_ = held < len(y) / n  # some worker is always below the mean
                p = p * open_
                p = p / p.sum() if p.sum() > 0 else open_ / open_.sum()
            cuts = np.floor(np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for i, c in enumerate(np.split(idx, np.clip(cuts, 0, len(idx)))):
                chunks[i].append(c)
                held[i] += len(c)
        parts = [np.sort(np.concatenate(c)).astype(np.int64) for c in chunks]
        sizes = np.array([len(p) for p in parts])
        if sizes.min() >= min_size:
            return parts
    raise ValueError(
        f"dirichlet: after {max_tries} draws some worker still had fewer than "
        f"min_size={min_size} samples (last draw's smallest: {sizes.min()}) with "
        f"alpha={alpha}, n={n}, N={len(y)}. Lower min_size, raise alpha, use fewer "
        "workers, or raise max_tries."
    )


def shards(
    labels: np.ndarray, n: int, shards_per_worker: int, seed: int
) -> list[np.ndarray]:
    """Sort-and-shard split of McMahan et al. (2017).

    Samples are sorted by label (ties in random order), cut into
    ``S = n * shards_per_worker`` contiguous shards of equal size (up to one), and
    each worker receives ``shards_per_worker`` distinct random shards. When shards
    are no larger than the smallest class, a worker sees at most
    ``2 * shards_per_worker`` labels (a shard straddles at most one class boundary).

    Args:
      labels: int class ids ``[N]``.
      n: number of workers.
      shards_per_worker: shards per worker, ``>= 1`` (``S <= N``).
      seed: RNG seed.

    Returns:
      ``n`` sorted, disjoint index arrays covering ``0..N-1``.
    """
    y = _as_labels(labels, "shards")
    n = _check_n(n, "shards")
    if int(shards_per_worker) != shards_per_worker or shards_per_worker < 1:
        raise ValueError(
            f"shards: shards_per_worker must be an int >= 1, got {shards_per_worker}."
        )
    total = n * int(shards_per_worker)
    if total > len(y):
        raise ValueError(
            f"shards: n * shards_per_worker = {total} shards exceed {len(y)} samples; "
            "use fewer workers or fewer shards per worker."
        )
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    order = perm[np.argsort(y[perm], kind="stable")]
    pieces = np.array_split(order, total)
    owner = rng.permutation(total).reshape(n, int(shards_per_worker))
    return [
        np.sort(np.concatenate([pieces[s] for s in row])).astype(np.int64)
        for row in owner
    ]


def label_distribution(
    labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int
) -> np.ndarray:
    """Label proportions ``P[i, k] = #{j in parts[i]: y_j = k} / |parts[i]|``.

    Args:
      labels: int class ids ``[N]`` in ``0..num_classes-1``.
      parts: one index array per worker.
      num_classes: ``K``.

    Returns:
      float64 ``[n, K]``; each row sums to 1 (an all-zero row for an empty part).
    """
    y = _as_labels(labels, "label_distribution")
    if y.size and y.max() >= num_classes:
        raise ValueError(
            f"label_distribution: label {y.max()} >= num_classes={num_classes}; "
            "pass the true number of classes."
        )
    parts = _check_parts(parts, len(y), "label_distribution")
    counts = np.stack([np.bincount(y[p], minlength=num_classes) for p in parts])
    totals = counts.sum(axis=1, keepdims=True)
    return counts / np.maximum(totals, 1)


def heterogeneity(
    labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int
) -> float:
    """Mean total-variation distance of worker label distributions from the pooled one.

    ``H = (1/n) sum_i TV(P_i, P) = (1/n) sum_i (1/2) sum_k |P_{ik} - P_k|``, where
    ``P_i`` is worker ``i``'s label distribution and ``P`` the label distribution of
    all samples covered by ``parts`` together. ``H = 0`` iff every worker has the
    pooled proportions (iid in the limit); ``H -> 1 - 1/K``-ish for one class per
    worker with balanced classes. Always in ``[0, 1)``.

    Args:
      labels: int class ids ``[N]``.
      parts: one index array per worker.
      num_classes: ``K``.

    Returns:
      The scalar ``H``.
    """
    dist = label_distribution(labels, parts, num_classes)
    y = _as_labels(labels, "heterogeneity")
    pooled = np.bincount(
        y[np.concatenate([np.asarray(p, np.int64) for p in parts])],
        minlength=num_classes,
    ).astype(np.float64)
    pooled /= max(pooled.sum(), 1.0)
    return float(np.mean(0.5 * np.abs(dist - pooled[None, :]).sum(axis=1)))


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers ``c_k >= 0`` with ``sum c_k = total`` and ``c_k ~ total * w_k``."""
    w = weights / weights.sum()
    raw = w * total
    base = np.floor(raw).astype(np.int64)
    short = total - int(base.sum())
    if short > 0:
        base[np.argsort(-(raw - base), kind="stable")[:short]] += 1
    return base


def test_split_like(
    train_labels: np.ndarray,
    parts: Sequence[np.ndarray],
    test_labels: np.ndarray,
    seed: int,
    size: int | None = None,
) -> list[np.ndarray]:
    """Per-worker test sets whose label mix follows each worker's training mix.

    Worker ``i`` gets ``s_i`` test indices with ``c_{ik} ~ s_i P_{ik}`` of class
    ``k`` (largest-remainder rounding), ``P_i`` its *training* label distribution.
    The ``c_{ik}`` indices are drawn uniformly without replacement from the global
    test samples of class ``k``; draws are independent across workers, so workers
    may share test samples (the sets are not a partition). A worker never gets a
    duplicate: if ``c_{ik}`` exceeds the number of class-``k`` test samples it gets
    all of them. Classes with no test samples are dropped and the remaining
    proportions renormalized.

    The default size mirrors the training share:
    ``s_i = max(1, round(N_test |parts[i]| / sum_j |parts[j]|))``, so all workers
    together draw about ``N_test`` samples; an int ``size`` gives every worker
    ``s_i = size``.

    Args:
      train_labels: int class ids ``[N]`` indexed by ``parts``.
      parts: per-worker training index arrays.
      test_labels: int class ids ``[N_test]`` of the global test set.
      seed: RNG seed.
      size: per-worker test-set size, or ``None`` for the default above.

    Returns:
      ``n`` sorted index arrays into ``test_labels``.
    """
    y_tr = _as_labels(train_labels, "test_split_like")
    y_te = _as_labels(test_labels, "test_split_like")
    parts = _check_parts(parts, len(y_tr), "test_split_like")
    if len(y_te) == 0:
        raise ValueError("test_split_like: test_labels is empty; pass the test set.")
    if size is not None and (int(size) != size or size < 1):
        raise ValueError(f"test_split_like: size must be an int >= 1, got {size}.")
    num_classes = int(max(y_tr.max(initial=0), y_te.max())) + 1
    dist = label_distribution(y_tr, parts, num_classes)
    test_by_class = [np.flatnonzero(y_te == k) for k in range(num_classes)]
    available = np.array([len(t) for t in test_by_class])
    train_sizes = np.array([len(p) for p in parts], dtype=np.float64)
    if train_sizes.sum() == 0:
        raise ValueError("test_split_like: all parts are empty.")
    rng = np.random.default_rng(seed)
    out = []
    for i, p_i in enumerate(dist):
        if size is None:
            s_i = max(1, round(len(y_te) * train_sizes[i] / train_sizes.sum()))
        else:
            s_i = int(size)
        w = p_i * (available > 0)
        if w.sum() == 0:  # worker's classes absent from the test set, or empty part
            w = available.astype(np.float64)
        counts = np.minimum(_largest_remainder(w, s_i), available)
        picks = [
            rng.choice(test_by_class[k], size=int(c), replace=False)
            for k, c in enumerate(counts)
            if c > 0
        ]
        out.append(np.sort(np.concatenate(picks)).astype(np.int64))
    return out


test_split_like.__test__ = False  # not a pytest test despite its name
