r"""Client clustering for federated learning: divergences, Hopkins, agglomeration.

Jittable measures (no host round trip):

* :func:`js_divergence` / :func:`pairwise_js` / :func:`js_distances`: the
  Jensen-Shannon divergence between prediction distributions,

  .. math::
      \mathrm{JS}(P \| Q) = \tfrac12 \mathrm{KL}(P \| M) + \tfrac12 \mathrm{KL}(Q \| M),
      \qquad M = \tfrac12 (P + Q),

  natural log, ``0 log 0 = 0``, so ``0 <= JS <= ln 2``; the client distance is
  ``D(a, b) = sqrt(mean_j JS(P_a(x_j) || P_b(x_j)))`` over a batch of public samples.
* :func:`hopkins` / :func:`hopkins_mean`: the Hopkins statistic of a point cloud
  (``~0.5`` for uniform data, ``-> 1`` for clustered data; jaxdec reports ``H``, not
  ``1 - H``), and its average over repeated draws (the stabilized, "amended" form).
* :func:`cosine_distances` / :func:`cosine_from_gram`: ``1 - cos`` between flattened
  model updates.
* :func:`skew_score`: ``JS(hist / n || uniform) / ln 2`` in ``[0, 1]``, a client's
  degree of label skew.
* :func:`labels_to_matrix`: cluster labels -> block-diagonal (data-weighted) averaging
  matrix on the client axis, the mixing matrix of clustered aggregation.

Host-side (NumPy / SciPy; clustering is a rare event, not a per-step operation):

* :func:`agglomerative`: SciPy hierarchical clustering on a distance matrix with a
  cluster count or a distance threshold.
* :func:`best_silhouette`: the cluster count with the best silhouette score.
* :func:`two_stage`: coarse clusters from one distance matrix, then a 2-way split of
  every large coarse cluster by a second distance (FedTSDP's two stages).
* :func:`canonical_labels`: relabel clusters ``0..G-1`` in order of first appearance.

Example:
  >>> P = jax.nn.softmax(logits, -1)                 # [C, N, K] client predictions
  >>> D = jd.clustering.js_distances(P)              # [C, C], in [0, sqrt(ln 2)]
  >>> labels = jd.clustering.agglomerative(np.asarray(D), n_clusters=4)
  >>> A = jd.clustering.labels_to_matrix(labels, weights=counts)   # rows sum to 1
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "LN2",
    "js_divergence",
    "pairwise_js",
    "js_distances",
    "hopkins",
    "hopkins_mean",
    "cosine_distances",
    "cosine_from_gram",
    "skew_score",
    "labels_to_matrix",
    "canonical_labels",
    "agglomerative",
    "best_silhouette",
    "two_stage",
]

LN2 = float(np.log(2.0))
"""``ln 2``, the largest possible Jensen-Shannon divergence (natural log)."""

_HI = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------ divergences


def _kl_to_mid(p: jax.Array, m: jax.Array, axis: int) -> jax.Array:
    """``sum_c p_c log(p_c / m_c)`` with ``0 log 0 = 0`` (safe where ``p = 0``)."""
    pos = p > 0
    safe_p = jnp.where(pos, p, 1.0)
    safe_m = jnp.where(pos, m, 1.0)
    return jnp.sum(jnp.where(pos, p * (jnp.log(safe_p) - jnp.log(safe_m)), 0.0), axis)


def js_divergence(
    p: jax.typing.ArrayLike, q: jax.typing.ArrayLike, axis: int = -1
) -> jax.Array:
    r"""Jensen-Shannon divergence between probability vectors along ``axis``.

    .. math::
        \mathrm{JS}(P \| Q) = \tfrac12 \sum_c p_c \log\frac{p_c}{m_c}
            + \tfrac12 \sum_c q_c \log\frac{q_c}{m_c}, \qquad m = \tfrac12 (p + q),

    natural log, ``0 log 0 = 0`` (zeros are safe, no NaN). Exactly symmetric and
    exactly zero for ``p == q``; equals ``ln 2`` for disjoint supports. Float
    rounding can leave the sum a few ulp outside ``[0, ln 2]``; the result is
    clamped to that interval (a rounding guard only: the mathematical value always
    lies inside). Inputs must be probability vectors (non-negative, summing to 1),
    e.g. softmax outputs; they are not renormalized.

    Args:
      p: probabilities ``[..., K]`` (broadcast against ``q``).
      q: probabilities ``[..., K]``.
      axis: the class axis.

    Returns:
      ``JS`` with ``axis`` reduced, float32.

    Example:
      >>> js_divergence(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]))  # ln 2
    """
    p = jnp.asarray(p, jnp.float32)
    q = jnp.asarray(q, jnp.float32)
    shape = np.broadcast_shapes(p.shape, q.shape)
    p, q = jnp.broadcast_to(p, shape), jnp.broadcast_to(q, shape)
    m = 0.5 * (p + q)
    js = 0.5 * _kl_to_mid(p, m, axis) + 0.5 * _kl_to_mid(q, m, axis)
    return jnp.clip(js, 0.0, LN2)


def pairwise_js(probs: jax.typing.ArrayLike, *, chunk: int | None = 8) -> jax.Array:
    r"""Mean pairwise JS divergence between clients' prediction distributions.

    .. math::
        J_{ab} = \frac1N \sum_{j=1}^{N} \mathrm{JS}(P_a(x_j) \| P_b(x_j))

    Rows are computed ``chunk`` clients at a time (``jax.lax.map``), so memory is
    ``O(chunk * C * N * K)``. ``J`` is exactly symmetric with a zero diagonal.

    Args:
      probs: ``[C, N, K]`` client predictions (softmax outputs) on the same ``N``
        public samples, or ``[C, K]`` (one distribution per client).
      chunk: clients per parallel block (``None``: all rows at once).

    Returns:
      ``[C, C]`` float32, entries in ``[0, ln 2]``.
    """
    P = jnp.asarray(probs, jnp.float32)
    if P.ndim == 2:
        P = P[:, None, :]
    if P.ndim != 3:
        raise ValueError(
            f"pairwise_js: probs must be [C, N, K] (clients, samples, classes) or "
            f"[C, K], got shape {P.shape}."
        )

    def row(pa: jax.Array) -> jax.Array:
        return jnp.mean(js_divergence(pa[None], P), axis=-1)  # [C]

    if chunk is None or chunk >= P.shape[0]:
        return jax.vmap(row)(P)
    return jax.lax.map(row, P, batch_size=int(chunk))


def js_distances(probs: jax.typing.ArrayLike, *, chunk: int | None = 8) -> jax.Array:
    r"""Client distance matrix ``D_ab = sqrt(J_ab)`` from :func:`pairwise_js`.

    ``sqrt(JS)`` of two distributions is a metric (Endres & Schindelin 2003); the
    mean over samples keeps symmetry and the zero diagonal.

    Args:
      probs: ``[C, N, K]`` (or ``[C, K]``) client predictions.
      chunk: see :func:`pairwise_js`.

    Returns:
      ``[C, C]`` float32 in ``[0, sqrt(ln 2)]``.
    """
    return jnp.sqrt(pairwise_js(probs, chunk=chunk))


def skew_score(label_hist: jax.typing.ArrayLike) -> jax.Array:
    r"""Degree of label skew ``s_k = JS(h_k / n_k \| u) / ln 2`` in ``[0, 1]``.

    ``u`` is the uniform distribution over the ``K`` classes. A one-hot client gives
    ``0.758`` (``K = 10``), two balanced classes ``0.61``, a uniform one ``0``.

    Args:
      label_hist: ``[C, K]`` label counts (or proportions), rows with positive sum.

    Returns:
      ``[C]`` float32.
    """
    h = jnp.asarray(label_hist, jnp.float32)
    p = h / jnp.sum(h, axis=-1, keepdims=True)
    u = jnp.full(p.shape[-1:], 1.0 / p.shape[-1], jnp.float32)
    return js_divergence(p, u) / LN2


# --------------------------------------------------------------------- Hopkins


def _min_dist(a: jax.Array, b: jax.Array, exclude: jax.Array | None) -> jax.Array:
    """Distance from every row of ``a`` to its nearest row of ``b`` (``[q]``).

    Differences are formed explicitly (no ``|a|^2 + |b|^2 - 2ab`` cancellation).
    ``exclude[i]`` is the index in ``b`` that row ``i`` must skip (itself)."""
    d2 = jnp.sum(jnp.square(a[:, None, :] - b[None, :, :]), axis=-1)  # [q, n]
    if exclude is not None:
        d2 = jnp.where(jnp.arange(b.shape[0])[None, :] == exclude[:, None], jnp.inf, d2)
    return jnp.sqrt(jnp.min(d2, axis=1))


def hopkins(
    key: jax.Array,
    points: jax.typing.ArrayLike,
    q: int,
    *,
    exponent: float = 1.0,
) -> jax.Array:
    r"""Hopkins statistic of a point cloud ``Z = {z_1..z_n}`` in ``R^d``.

    Draw ``q`` of the ``n`` points without replacement (``y_i``) and ``q`` points
    ``w_i`` uniform in the bounding box of ``Z``; with
    ``u_i = min_j ||w_i - z_j||`` and ``v_i = min_{z_j != y_i} ||y_i - z_j||``,

    .. math::
        H = \frac{\sum_i u_i^e}{\sum_i u_i^e + \sum_i v_i^e}.

    ``H ~ 0.5`` for uniform data, ``H -> 1`` for well-separated clusters. The
    points are shifted to the box corner before measuring, so ``H`` is invariant to
    translations and uniform scalings of ``Z`` (for a fixed key) up to rounding.

    Args:
      key: PRNG key (the statistic is a deterministic function of it).
      points: ``[n, d]`` float points, ``n >= 2``.
      q: sample size (static), ``1 <= q <= n``.
      exponent: ``e > 0`` (``1``: stabilized default; ``d``: the classic form).

    Returns:
      A float32 scalar in ``[0, 1]``.
    """
    Z = jnp.asarray(points, jnp.float32)
    if Z.ndim != 2 or Z.shape[0] < 2:
        raise ValueError(
            f"hopkins: points must be [n, d] with n >= 2, got shape {Z.shape}."
        )
    n, d = Z.shape
    if isinstance(q, bool) or int(q) != q or not 1 <= int(q) <= n:
        raise ValueError(
            f"hopkins: q must be an int in [1, {n}] (n points), got {q!r}."
        )
    q = int(q)
    k_pick, k_unif = jax.random.split(key)
    lo = jnp.min(Z, axis=0)
    Z = Z - lo[None, :]
    span = jnp.max(Z, axis=0)
    idx = jax.random.choice(k_pick, n, (q,), replace=False)
    w = jax.random.uniform(k_unif, (q, d), jnp.float32) * span[None, :]
    u = _min_dist(w, Z, None)
    v = _min_dist(Z[idx], Z, idx)
    su = jnp.sum(u**exponent)
    sv = jnp.sum(v**exponent)
    tot = su + sv
    return jnp.where(tot > 0, su / jnp.where(tot > 0, tot, 1.0), 0.5)


def hopkins_mean(
    key: jax.Array,
    points: jax.typing.ArrayLike,
    q: int,
    *,
    repeats: int = 20,
    exponent: float = 1.0,
) -> jax.Array:
    r"""Stabilized Hopkins statistic: the mean of ``R`` independent draws.

    ``H_t = (1/R) sum_r H(key_r)`` with ``(key_1..key_R) = split(key, R)``. With few
    points (``q = 4``) a single draw has a standard deviation of about 0.1-0.2;
    averaging repeated draws (and ``e = 1``) is the amended, stabilized sampling.

    Args:
      key: PRNG key.
      points: ``[n, d]`` points.
      q: sample size per draw.
      repeats: ``R >= 1`` draws (static).
      exponent: ``e`` of :func:`hopkins`.

    Returns:
      A float32 scalar in ``[0, 1]``.
    """
    if isinstance(repeats, bool) or int(repeats) != repeats or int(repeats) < 1:
        raise ValueError(f"hopkins_mean: repeats must be an int >= 1, got {repeats!r}.")
    keys = jax.random.split(key, int(repeats))
    return jnp.mean(jax.vmap(lambda k: hopkins(k, points, q, exponent=exponent))(keys))


# ---------------------------------------------------------------------- cosine


def cosine_from_gram(gram: jax.typing.ArrayLike) -> jax.Array:
    r"""Cosine distances from a Gram matrix ``G_ab = <x_a, x_b>``.

    ``D_ab = 1 - G_ab / sqrt(G_aa G_bb)``, with ``D_aa = 0`` and ``D_ab = 1`` where a
    vector is zero (no direction). Symmetric, in ``[0, 2]``.

    Works with NumPy or JAX arrays (returns the same kind as the input library).
    """
    xp = jnp if isinstance(gram, jax.Array) else np
    G = xp.asarray(gram)
    nrm = xp.sqrt(xp.clip(xp.diagonal(G), 0.0, None))
    denom = nrm[:, None] * nrm[None, :]
    cos = xp.where(denom > 0, G / xp.where(denom > 0, denom, 1.0), 0.0)
    D = xp.clip(1.0 - cos, 0.0, 2.0)
    eye = xp.eye(G.shape[0], dtype=bool)
    D = xp.where(eye, 0.0, D)
    return 0.5 * (D + D.T)


def cosine_distances(x: jax.typing.ArrayLike) -> jax.Array:
    r"""Pairwise cosine distances ``1 - <x_a, x_b> / (||x_a|| ||x_b||)`` of rows.

    Args:
      x: ``[C, d]`` (e.g. flattened model updates ``delta_k``).

    Returns:
      ``[C, C]`` float32 in ``[0, 2]``, zero diagonal.
    """
    X = jnp.asarray(x, jnp.float32)
    G = jnp.matmul(X, X.T, precision=_HI)
    return cosine_from_gram(G)


# ------------------------------------------------------------------- aggregation


def labels_to_matrix(
    labels: jax.typing.ArrayLike,
    weights: jax.typing.ArrayLike | None = None,
    mask: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""Block-diagonal averaging matrix of a clustering (jittable).

    .. math::
        A_{kj} = \frac{c_j [g_j = g_k]}{\sum_i c_i [g_i = g_k]}, \qquad
        c_j = m_j w_j,

    so ``A X`` replaces every client's value with the weighted mean over the
    contributing members of its cluster. A row whose cluster has no contributor
    (all ``m_j = 0``) is the identity row (the client keeps its value). Rows sum
    to 1.

    Args:
      labels: int cluster labels ``[C]``.
      weights: positive client weights ``[C]`` (e.g. data sizes; ``None``: equal).
      mask: contributors ``[C]`` (bool, e.g. this round's participants; ``None``:
        all).

    Returns:
      ``[C, C]`` float32.
    """
    g = jnp.asarray(labels)
    C = g.shape[0]
    c = jnp.ones((C,), jnp.float32) if weights is None else jnp.asarray(weights)
    c = c.astype(jnp.float32)
    if mask is not None:
        c = c * jnp.asarray(mask).astype(jnp.float32)
    same = (g[:, None] == g[None, :]).astype(jnp.float32)
    num = same * c[None, :]
    den = jnp.sum(num, axis=1, keepdims=True)
    eye = jnp.eye(C, dtype=jnp.float32)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), eye)


# ------------------------------------------------------------ host clustering


def canonical_labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """Relabel clusters ``0..G-1`` in order of first appearance (int32 NumPy)."""
    lab = np.asarray(labels)
    _, first, inv = np.unique(lab, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inv.reshape(-1)].astype(np.int32)


def _check_distance_matrix(D, where: str) -> np.ndarray:
    D = np.asarray(D, np.float64)
    if D.ndim != 2 or D.shape[0] != D.shape[1]:
        raise ValueError(f"{where}: need a square distance matrix, got {D.shape}.")
    if not np.all(np.isfinite(D)) or D.min() < 0:
        bad, neg = int(np.sum(~np.isfinite(D))), int(np.sum(D < 0))
        raise ValueError(
            f"{where}: distances must be finite and >= 0 ({bad} non-finite, {neg} "
            "negative entries); check the client outputs for NaN."
        )
    return 0.5 * (D + D.T)


def agglomerative(
    D: np.ndarray,
    *,
    n_clusters: int | None = None,
    threshold: float | None = None,
    method: str = "average",
) -> np.ndarray:
    """Agglomerative (hierarchical) clustering of a precomputed distance matrix.

    SciPy's ``linkage`` on the condensed matrix, cut by ``fcluster`` either into
    ``n_clusters`` clusters (``criterion="maxclust"``) or at a cophenetic distance
    ``threshold`` (``criterion="distance"``: clusters merge while their linkage
    distance is ``<= threshold``). Exactly one of the two must be given. Labels are
    canonical (:func:`canonical_labels`), so permuting the clients permutes the
    labels of the same partition.

    Args:
      D: ``[C, C]`` symmetric, non-negative distances (host array).
      n_clusters: number of clusters ``1 <= G <= C``.
      threshold: distance threshold ``>= 0``.
      method: SciPy linkage method (``"average"``, ``"complete"``, ``"single"``,
        ``"weighted"``).

    Returns:
      int32 labels ``[C]``.
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    D = _check_distance_matrix(D, "agglomerative")
    C = D.shape[0]
    if (n_clusters is None) == (threshold is None):
        raise ValueError(
            "agglomerative: give exactly one of n_clusters=<int> or "
            "threshold=<distance>."
        )
    if method not in ("average", "complete", "single", "weighted"):
        raise ValueError(
            f"agglomerative: method must be 'average', 'complete', 'single' or "
            f"'weighted', got {method!r}."
        )
    if n_clusters is not None and (
        isinstance(n_clusters, bool)
        or int(n_clusters) != n_clusters
        or not 1 <= int(n_clusters) <= C
    ):
        raise ValueError(
            f"agglomerative: n_clusters must be an int in [1, {C}], got {n_clusters!r}."
        )
    if threshold is not None and not float(threshold) >= 0:
        raise ValueError(f"agglomerative: threshold must be >= 0, got {threshold!r}.")
    if C == 1:
        return np.zeros(1, np.int32)
    np.fill_diagonal(D, 0.0)
    Z = linkage(squareform(D, checks=False), method=method)
    if n_clusters is not None:
        lab = fcluster(Z, t=int(n_clusters), criterion="maxclust")
    else:
        lab = fcluster(Z, t=float(threshold), criterion="distance")
    return canonical_labels(lab)


def _silhouette(D: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import silhouette_score

    k = len(np.unique(labels))
    if k < 2 or k >= len(labels):
        return -1.0
    return float(silhouette_score(D, labels, metric="precomputed"))


def best_silhouette(
    D: np.ndarray, ks: Sequence[int], *, method: str = "average"
) -> tuple[np.ndarray, int, float]:
    """Agglomerative clustering with the cluster count of the best silhouette.

    For every ``k`` in ``ks`` cut the linkage tree into ``k`` clusters and score the
    partition with scikit-learn's silhouette (precomputed distances); return the
    best (ties: the smaller ``k``). Counts that give fewer than 2 or ``C`` distinct
    clusters score ``-1``.

    Args:
      D: ``[C, C]`` distances.
      ks: candidate counts (e.g. ``range(2, ceil(C / 2) + 1)``).
      method: linkage method.

    Returns:
      ``(labels, k, silhouette)``.
    """
    D = _check_distance_matrix(D, "best_silhouette")
    ks = [int(k) for k in ks if 1 <= int(k) <= D.shape[0]]
    if not ks:
        raise ValueError("best_silhouette: no candidate cluster count in [1, C].")
    best = None
    for k in ks:
        lab = agglomerative(D, n_clusters=k, method=method)
        s = _silhouette(D, lab)
        if best is None or s > best[2] + 1e-12:
            best = (lab, k, s)
    return best


def two_stage(
    d_coarse: np.ndarray,
    d_fine: np.ndarray | Callable[[np.ndarray], np.ndarray] | None,
    *,
    n_clusters: int | None = None,
    threshold: float | None = None,
    max_clusters: int | None = None,
    min_size: int = 4,
    min_silhouette: float = 0.1,
    fine_members: np.ndarray | None = None,
    method: str = "average",
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Coarse clusters by one distance, then a 2-way split of each by another.

    Stage 1: average-linkage clustering of ``d_coarse``; the number of clusters is
    ``n_clusters`` if given, else the cut at ``threshold`` if given, else the best
    silhouette over ``k in {2..max_clusters}`` (default ``max_clusters =
    ceil(C / 2)``).

    Stage 2: every coarse cluster with ``>= min_size`` members in ``fine_members``
    (default: all clients) is split into 2 groups by average linkage on
    ``d_fine`` restricted to those members; the split is kept only if its
    silhouette is ``>= min_silhouette``, otherwise the coarse cluster stays whole.
    Members outside ``fine_members`` (e.g. clients without an update this round)
    join the fine group with the smallest mean ``d_coarse`` to its members. Fine
    clusters are always subsets of coarse ones.

    Args:
      d_coarse: ``[C, C]`` stage-1 distances (e.g. :func:`js_distances`).
      d_fine: ``[C, C]`` stage-2 distances (e.g. :func:`cosine_distances` of model
        updates), a callable ``members -> [m, m]`` distances among ``members``
        (sorted client indices), or ``None`` to skip stage 2.
      n_clusters: fixed number of coarse clusters.
      threshold: coarse distance threshold.
      max_clusters: largest coarse count tried by the silhouette search.
      min_size: smallest coarse cluster stage 2 tries to split.
      min_silhouette: acceptance threshold of a stage-2 split.
      fine_members: bool ``[C]``, clients with a valid ``d_fine`` row.
      method: linkage method.

    Returns:
      ``(coarse, fine, details)``: int32 canonical labels ``[C]`` of both stages and
      a dict with the coarse silhouette and every stage-2 attempt.
    """
    D1 = _check_distance_matrix(d_coarse, "two_stage")
    C = D1.shape[0]
    details: dict = {"coarse_silhouette": None, "splits": []}
    if C < 3:
        lab = np.zeros(C, np.int32)
        return lab, lab.copy(), details
    if n_clusters is not None:
        coarse = agglomerative(D1, n_clusters=n_clusters, method=method)
    elif threshold is not None:
        coarse = agglomerative(D1, threshold=threshold, method=method)
    else:
        hi = int(np.ceil(C / 2)) if max_clusters is None else int(max_clusters)
        coarse, _, s = best_silhouette(D1, range(2, max(2, hi) + 1), method=method)
        details["coarse_silhouette"] = s
    fine = coarse.copy()
    if d_fine is None:
        return coarse, canonical_labels(fine), details
    members_ok = (
        np.ones(C, bool) if fine_members is None else np.asarray(fine_members, bool)
    )
    next_label = int(coarse.max()) + 1
    for g in np.unique(coarse):
        mem = np.flatnonzero(coarse == g)
        act = mem[members_ok[mem]]
        if len(act) < int(min_size):
            continue
        if callable(d_fine):
            D2 = _check_distance_matrix(d_fine(act), "two_stage (stage 2)")
        else:
            D2 = _check_distance_matrix(d_fine, "two_stage (stage 2)")[np.ix_(act, act)]
        sub = agglomerative(D2, n_clusters=2, method=method)
        s = _silhouette(D2, sub)
        accepted = len(np.unique(sub)) == 2 and s >= float(min_silhouette)
        details["splits"].append(
            {
                "coarse": int(g),
                "members": act.tolist(),
                "silhouette": s,
                "accepted": bool(accepted),
            }
        )
        if not accepted:
            continue
        part = {0: act[sub == 0], 1: act[sub == 1]}
        fine[part[1]] = next_label
        for j in np.setdiff1d(mem, act):  # absent members: nearest fine group
            d0 = D1[j, part[0]].mean()
            d1 = D1[j, part[1]].mean()
            if d1 < d0:
                fine[j] = next_label
        next_label += 1
    return coarse, canonical_labels(fine), details
