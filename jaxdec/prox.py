r"""Proximal operators on pytrees, ``prox(tree, step_size) -> tree``.

For a convex, closed, proper ``h`` and a step ``a > 0`` the proximal operator is

.. math::
    \operatorname{prox}_{a h}(x) = \arg\min_z \; h(z) + \frac{1}{2a} \lVert z - x
    \rVert^2 .

Every constructor here returns a :class:`Prox`: a callable
``prox(tree, step_size) -> tree`` written for ONE worker's parameters (the
algorithms vmap it over the worker axis) that also knows ``h`` itself
(``prox.value(tree)``, e.g. to report ``Psi = F + h``). Penalties act on the whole
pytree as one vector unless stated otherwise; :func:`masked` applies a prox to a
subset of leaves and the identity to the rest.

All proximal operators are firmly non-expansive:
``<P(x) - P(y), x - y> >= ||P(x) - P(y)||^2``.

Example:
  >>> import jaxdec as jd, jax.numpy as jnp
  >>> p = jd.prox.l1(0.1)
  >>> p({"w": jnp.array([0.5, -0.02, -0.3])}, 1.0)["w"]    # soft-threshold at 0.1
  Array([ 0.4,  0. , -0.2], dtype=float32)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.types import PyTree

__all__ = [
    "Prox",
    "zero",
    "l1",
    "l2",
    "elastic_net",
    "nonneg",
    "box",
    "l2_ball",
    "l1_ball",
    "masked",
    "soft_threshold",
    "density",
]


@dataclasses.dataclass(frozen=True, eq=False)
class Prox:
    """A proximal operator with its function.

    Attributes:
      fn: ``fn(tree, step_size) -> tree``, the proximal map of ``step_size * h``.
      value: ``value(tree) -> scalar``, ``h(tree)`` (``inf`` outside the domain of
        an indicator, up to the tolerance ``1e-5`` relative).
      name: short description.
    """

    fn: Callable[[PyTree, jax.Array], PyTree]
    value: Callable[[PyTree], jax.Array]
    name: str

    def __call__(self, tree: PyTree, step_size) -> PyTree:
        return self.fn(tree, step_size)

    def __repr__(self) -> str:
        return f"Prox({self.name})"


def _check_nonneg(v: float, what: str) -> float:
    v = float(v)
    if not np.isfinite(v) or v < 0.0:
        raise ValueError(f"{what} must be a finite number >= 0, got {v}.")
    return v


def _map(f: Callable[[jax.Array], jax.Array], tree: PyTree) -> PyTree:
    return jax.tree.map(f, tree)


def _sum(f: Callable[[jax.Array], jax.Array], tree: PyTree) -> jax.Array:
    return sum(
        (jnp.sum(f(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)),
        jnp.zeros((), jnp.float32),
    )


def _tree_norm(tree: PyTree) -> jax.Array:
    return jnp.sqrt(_sum(jnp.square, tree))


def soft_threshold(x: jax.Array, tau) -> jax.Array:
    """``sign(x) * max(|x| - tau, 0)`` elementwise (the prox of ``tau |.|``)."""
    return jnp.sign(x) * jnp.maximum(jnp.abs(x) - tau, 0.0).astype(x.dtype)


def zero() -> Prox:
    """``h = 0``: the prox is the identity (plain gradient methods)."""
    return Prox(lambda tree, a: tree, lambda tree: jnp.zeros((), jnp.float32), "zero")


def l1(reg: float) -> Prox:
    r"""``h(x) = r ||x||_1``; prox is the soft-threshold at ``a r``.

    .. math:: \operatorname{prox}_{a h}(x)_k = \operatorname{sign}(x_k)
        \max(|x_k| - a r, 0).
    """
    r = _check_nonneg(reg, "l1: reg")

    def fn(tree, a):
        return _map(lambda x: soft_threshold(x, a * r), tree)

    return Prox(fn, lambda tree: r * _sum(jnp.abs, tree), f"l1({r:g})")


def l2(reg: float, *, group: str = "tree") -> Prox:
    r"""Group lasso ``h(x) = r sum_g ||x_g||_2``; block soft-threshold per group.

    .. math:: \operatorname{prox}_{a h}(x)_g = \max\left(1 - \frac{a r}{\lVert x_g
        \rVert_2}, 0\right) x_g .

    Args:
      reg: ``r >= 0``.
      group: ``"tree"`` (the whole pytree is one block) or ``"leaf"`` (every leaf
        is its own block).
    """
    r = _check_nonneg(reg, "l2: reg")
    if group not in ("tree", "leaf"):
        raise ValueError(f"l2: group must be 'tree' or 'leaf', got {group!r}.")

    def scale(norm, a):
        return jnp.maximum(1.0 - a * r / jnp.maximum(norm, 1e-30), 0.0)

    if group == "tree":

        def fn(tree, a):
            s = scale(_tree_norm(tree), a)
            return _map(lambda x: (s * x).astype(x.dtype), tree)

        def value(tree):
            return r * _tree_norm(tree)

    else:

        def fn(tree, a):
            return _map(
                lambda x: (scale(jnp.linalg.norm(x.astype(jnp.float32)), a) * x).astype(
                    x.dtype
                ),
                tree,
            )

        def value(tree):
            return r * sum(
                (jnp.linalg.norm(x.astype(jnp.float32)) for x in jax.tree.leaves(tree)),
                jnp.zeros(()),
            )

    return Prox(fn, value, f"l2({r:g}, group={group})")


def elastic_net(l1_reg: float, l2_reg: float) -> Prox:
    r"""``h(x) = r_1 ||x||_1 + (r_2 / 2) ||x||_2^2``.

    .. math:: \operatorname{prox}_{a h}(x) = \frac{\operatorname{soft}(x, a r_1)}
        {1 + a r_2}.
    """
    r1 = _check_nonneg(l1_reg, "elastic_net: l1_reg")
    r2 = _check_nonneg(l2_reg, "elastic_net: l2_reg")

    def fn(tree, a):
        return _map(
            lambda x: (soft_threshold(x, a * r1) / (1.0 + a * r2)).astype(x.dtype), tree
        )

    def value(tree):
        return r1 * _sum(jnp.abs, tree) + 0.5 * r2 * _sum(jnp.square, tree)

    return Prox(fn, value, f"elastic_net({r1:g}, {r2:g})")


def _indicator(violation: jax.Array, scale: jax.Array) -> jax.Array:
    return jnp.where(violation <= 1e-5 * (1.0 + scale), 0.0, jnp.inf)


def nonneg() -> Prox:
    r"""Indicator of ``{x >= 0}``; prox is the projection ``max(x, 0)``."""

    def value(tree):
        return _indicator(_sum(lambda x: jnp.maximum(-x, 0.0), tree), 0.0)

    return Prox(
        lambda tree, a: _map(lambda x: jnp.maximum(x, 0.0).astype(x.dtype), tree),
        value,
        "nonneg",
    )


def box(lower: float, upper: float) -> Prox:
    r"""Indicator of ``{lower <= x <= upper}``; prox is ``clip(x, lower, upper)``."""
    lo, hi = float(lower), float(upper)
    if not lo <= hi:
        raise ValueError(f"box: need lower <= upper, got {lo} > {hi}.")

    def value(tree):
        v = _sum(lambda x: jnp.maximum(x - hi, 0.0) + jnp.maximum(lo - x, 0.0), tree)
        return _indicator(v, max(abs(lo), abs(hi)))

    return Prox(
        lambda tree, a: _map(lambda x: jnp.clip(x, lo, hi).astype(x.dtype), tree),
        value,
        f"box({lo:g}, {hi:g})",
    )


def l2_ball(radius: float) -> Prox:
    r"""Indicator of ``{||x||_2 <= rho}`` (whole tree); prox is the projection.

    .. math:: P(x) = x \min\left(1, \frac{\rho}{\lVert x \rVert_2}\right).
    """
    rho = _check_nonneg(radius, "l2_ball: radius")

    def fn(tree, a):
        nrm = _tree_norm(tree)
        s = jnp.minimum(1.0, rho / jnp.maximum(nrm, 1e-30))
        return _map(lambda x: (s * x).astype(x.dtype), tree)

    def value(tree):
        return _indicator(jnp.maximum(_tree_norm(tree) - rho, 0.0), rho)

    return Prox(fn, value, f"l2_ball({rho:g})")


def _flatten(tree: PyTree) -> tuple[jax.Array, Callable[[jax.Array], PyTree]]:
    leaves, treedef = jax.tree.flatten(tree)
    shapes = [x.shape for x in leaves]
    dtypes = [x.dtype for x in leaves]
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    flat = jnp.concatenate([x.astype(jnp.float32).reshape(-1) for x in leaves])

    def unflatten(v):
        out, k = [], 0
        for s, d, m in zip(shapes, dtypes, sizes, strict=True):
            out.append(v[k : k + m].reshape(s).astype(d))
            k += m
        return jax.tree.unflatten(treedef, out)

    return flat, unflatten


def l1_ball(radius: float) -> Prox:
    r"""Indicator of ``{||x||_1 <= rho}`` (whole tree); exact sort-based projection.

    Duchi et al. (2008): if ``||x||_1 <= rho`` return ``x``; otherwise sort
    ``u = |x|`` decreasingly, ``c_j = sum_{k <= j} u_k``,
    ``j* = max{j : u_j - (c_j - rho)/j > 0}``, ``theta = (c_{j*} - rho) / j*`` and

    .. math:: P(x) = \operatorname{sign}(x) \max(|x| - \theta, 0).

    Cost ``O(p log p)`` for ``p`` parameters.
    """
    rho = _check_nonneg(radius, "l1_ball: radius")

    def fn(tree, a):
        x, unflatten = _flatten(tree)
        ax = jnp.abs(x)
        u = -jnp.sort(-ax)
        c = jnp.cumsum(u)
        j = jnp.arange(1, u.shape[0] + 1, dtype=jnp.float32)
        cond = u - (c - rho) / j > 0
        jstar = jnp.max(jnp.where(cond, j, 1.0))
        theta = (jnp.take(c, jstar.astype(jnp.int32) - 1) - rho) / jstar
        inside = jnp.sum(ax) <= rho
        theta = jnp.where(inside, 0.0, jnp.maximum(theta, 0.0))
        return unflatten(jnp.sign(x) * jnp.maximum(ax - theta, 0.0))

    def value(tree):
        return _indicator(jnp.maximum(_sum(jnp.abs, tree) - rho, 0.0), rho)

    return Prox(fn, value, f"l1_ball({rho:g})")


def masked(prox: Prox, mask: PyTree) -> Prox:
    """Apply ``prox`` to the leaves where ``mask`` is ``True``, identity elsewhere.

    ``h(x) = h_prox(x_selected)``: tree-coupled operators (``l2(group="tree")``,
    balls) see the selected leaves as one vector. ``mask`` is a pytree of Python
    bools with the structure of ONE worker's params (e.g. from
    ``jd.tree.mask_by_path(params, lambda p: "kernel" in p)``, applied to a
    one-worker tree), so biases can be left unregularized.
    """
    mask_leaves = [bool(m) for m in jax.tree.leaves(mask)]

    def split(tree):
        leaves, treedef = jax.tree.flatten(tree)
        if len(leaves) != len(mask_leaves):
            raise ValueError(
                f"masked prox: the mask has {len(mask_leaves)} leaves but the tree "
                f"has {len(leaves)}; build the mask from one worker's params."
            )
        return leaves, treedef

    def fn(tree, a):
        leaves, treedef = split(tree)
        sel = [x for x, m in zip(leaves, mask_leaves, strict=True) if m]
        done = iter(prox(sel, a) if sel else [])
        out = [next(done) if m else x for x, m in zip(leaves, mask_leaves, strict=True)]
        return jax.tree.unflatten(treedef, out)

    def value(tree):
        leaves, _ = split(tree)
        sel = [x for x, m in zip(leaves, mask_leaves, strict=True) if m]
        return prox.value(sel) if sel else jnp.zeros((), jnp.float32)

    return Prox(fn, value, f"masked({prox.name})")


def density(tree: PyTree) -> jax.Array:
    """Fraction of non-zero entries over all leaves (``1 - sparsity``)."""
    nnz = _sum(lambda x: (x != 0).astype(jnp.float32), tree)
    total = sum(
        int(np.prod(jnp.shape(x), dtype=np.int64)) for x in jax.tree.leaves(tree)
    )
    return nnz / max(total, 1)
