"""Synthetic heterogeneous problems for tests and examples (host NumPy, seeded).

Every generator returns per-worker arrays with the worker axis first and a
``heterogeneity`` knob: ``0`` makes all workers identical (or identically
distributed), larger values spread them apart.

Example:
  >>> A, b = heterogeneous_quadratics(n=8, d=5, seed=0, heterogeneity=2.0)
  >>> x_star = quadratic_optimum(A, b)      # minimizer of sum_i f_i
"""

from __future__ import annotations

import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "heterogeneous_quadratics",
    "quadratic_optimum",
    "heterogeneous_regression",
    "heterogeneous_classification",
]


def _check_pos(fn: str, **kw: int) -> None:
    for name, v in kw.items():
        if int(v) != v or v < 1:
            raise ValueError(f"{fn}: {name} must be an int >= 1, got {v}.")


def _check_nonneg(fn: str, **kw: float) -> None:
    for name, v in kw.items():
        if not np.isfinite(v) or v < 0:
            raise ValueError(f"{fn}: {name} must be a finite number >= 0, got {v}.")


def heterogeneous_quadratics(
    n: int, d: int, seed: int, heterogeneity: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Per-worker strongly convex quadratics ``f_i(x) = 0.5 x^T A_i x - b_i^T x``.

    ``A_i = A_0 + h E_i E_i^T / d`` and ``b_i = b_0 + h delta_i`` with
    ``A_0 = I + M M^T / d`` shared, ``M, E_i`` standard Gaussian ``d x d``,
    ``b_0, delta_i ~ N(0, I_d)`` and ``h = heterogeneity``. Every ``A_i`` is SPD
    with smallest eigenvalue ``>= 1``; ``h = 0`` gives identical workers.
    Gradient: ``grad f_i(x) = A_i x - b_i``.

    Args:
      n: number of workers.
      d: dimension.
      seed: RNG seed.
      heterogeneity: ``h >= 0``.

    Returns:
      ``(A, b)``: float32 ``A [n, d, d]`` (symmetric) and ``b [n, d]``.
    """
    _check_pos("heterogeneous_quadratics", n=n, d=d)
    _check_nonneg("heterogeneous_quadratics", heterogeneity=heterogeneity)
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((d, d))
    a0 = np.eye(d) + m @ m.T / d
    e = rng.standard_normal((n, d, d))
    a = a0[None] + heterogeneity * np.einsum("nij,nkj->nik", e, e) / d
    a = 0.5 * (a + np.swapaxes(a, 1, 2))
    b = rng.standard_normal(d)[None] + heterogeneity * rng.standard_normal((n, d))
    return a.astype(np.float32), b.astype(np.float32)


def quadratic_optimum(A: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Minimizer of ``sum_i f_i``: the solution of ``(sum_i A_i) x = sum_i b_i``.

    Solved on the host in float64 (``numpy.linalg.solve``).

    Args:
      A: ``[n, d, d]`` per-worker SPD matrices.
      b: ``[n, d]`` per-worker linear terms.

    Returns:
      float64 ``x* [d]``.
    """
    a = np.asarray(A, dtype=np.float64)
    bb = np.asarray(b, dtype=np.float64)
    if a.ndim != 3 or a.shape[1] != a.shape[2] or bb.shape != a.shape[:2]:
        raise ValueError(
            f"quadratic_optimum: need A [n, d, d] and b [n, d], got {a.shape} and "
            f"{bb.shape}."
        )
    return np.linalg.solve(a.sum(axis=0), bb.sum(axis=0))


def heterogeneous_regression(
    n: int,
    m: int,
    d: int,
    seed: int,
    heterogeneity: float = 1.0,
    noise: float = 0.1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-worker linear regression with worker-specific ground truth.

    ``w_i = w_0 + h delta_i`` with ``w_0, delta_i ~ N(0, I_d)``; samples
    ``x_{ij} ~ N(0, I_d)``, ``y_{ij} = x_{ij}^T w_i + noise * eps_{ij}``,
    ``eps ~ N(0, 1)``.

    Args:
      n: number of workers.
      m: samples per worker.
      d: dimension.
      seed: RNG seed.
      heterogeneity: ``h >= 0`` (``0``: one shared model).
      noise: label-noise standard deviation ``>= 0``.

    Returns:
      float32 ``(x [n, m, d], y [n, m], w_star [n, d])``.
    """
    _check_pos("heterogeneous_regression", n=n, m=m, d=d)
    _check_nonneg("heterogeneous_regression", heterogeneity=heterogeneity, noise=noise)
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal(d)
    w = w0[None] + heterogeneity * rng.standard_normal((n, d))
    x = rng.standard_normal((n, m, d))
    y = np.einsum("nmd,nd->nm", x, w) + noise * rng.standard_normal((n, m))
    return x.astype(np.float32), y.astype(np.float32), w.astype(np.float32)


def heterogeneous_classification(
    n: int,
    m: int,
    d: int,
    num_classes: int,
    seed: int,
    alpha: float = 0.5,
    separation: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian class blobs with per-worker Dirichlet label skew.

    Class means ``mu_k = s u_k`` with ``u_k`` uniform on the unit sphere and
    ``s = separation``. Worker ``i`` draws label proportions
    ``q_i ~ Dir(alpha 1_K)``, then ``y_{ij} ~ Cat(q_i)`` and
    ``x_{ij} = mu_{y_{ij}} + N(0, I_d)``. Small ``alpha`` => few classes per worker.
    Wrap the result with :func:`jaxdec.data.from_worker_arrays` to get a
    :class:`~jaxdec.data.WorkerData`.

    Args:
      n: number of workers.
      m: samples per worker.
      d: feature dimension.
      num_classes: ``K >= 2``.
      seed: RNG seed.
      alpha: Dirichlet concentration ``> 0``.
      separation: distance of class means from the origin.

    Returns:
      ``(x, y)``: float32 ``x [n, m, d]``, int32 ``y [n, m]``.
    """
    _check_pos("heterogeneous_classification", n=n, m=m, d=d)
    if int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(
            f"heterogeneous_classification: num_classes must be an int >= 2, got "
            f"{num_classes}."
        )
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(
            f"heterogeneous_classification: alpha must be > 0, got {alpha}."
        )
    _check_nonneg("heterogeneous_classification", separation=separation)
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((num_classes, d))
    mu = separation * u / np.linalg.norm(u, axis=1, keepdims=True)
    q = rng.dirichlet(np.full(num_classes, float(alpha)), size=n)
    q = np.where(np.isfinite(q), q, 0.0)
    q = np.where(q.sum(axis=1, keepdims=True) > 0, q, 1.0 / num_classes)
    cdf = np.cumsum(q / q.sum(axis=1, keepdims=True), axis=1)
    y = (rng.random((n, m, 1)) > cdf[:, None, : num_classes - 1]).sum(axis=2)
    x = mu[y] + rng.standard_normal((n, m, d))
    return x.astype(np.float32), y.astype(np.int32)
