"""Pieces shared by the algorithm modules: vmapped gradients, key splitting,
communication accounting and input checks."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxdec import gossip
from jaxdec import tree as jtree
from jaxdec.types import LossFn, MixingFn, PyTree


def check_factory_args(loss_fn: LossFn, optimizer, mix: MixingFn, name: str) -> None:
    """Raise ``ValueError`` for arguments that cannot work, before anything compiles."""
    if not callable(loss_fn):
        raise ValueError(
            f"{name}: loss_fn must be callable loss_fn(params, batch, key)."
        )
    if not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(
            f"{name}: optimizer must be an optax.GradientTransformation (e.g. "
            f"optax.sgd(0.1)), got {type(optimizer).__name__}."
        )
    if not callable(mix):
        raise ValueError(
            f"{name}: mix must be a MixingFn mix(tree, step), e.g. jd.gossip.dense(W)."
        )


def check_order(order: str, name: str) -> None:
    if order not in ("atc", "cta"):
        raise ValueError(f"{name}: order must be 'atc' or 'cta', got {order!r}.")


def check_has_aux(has_aux, name: str) -> None:
    """``has_aux`` must be a real bool (a truthy string would silently unpack)."""
    if not isinstance(has_aux, bool):
        raise ValueError(
            f"{name}: has_aux must be True or False, got {has_aux!r}; pass "
            "has_aux=True when loss_fn returns (loss, aux)."
        )


def worker_value_and_grad(
    loss_fn: LossFn, has_aux: bool
) -> Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, PyTree, PyTree]]:
    """Lift a one-worker ``loss_fn(params, batch, key)`` to the worker axis.

    Returns ``f(params, batch, key) -> (loss [n], aux, grads)`` where every worker
    ``i`` uses the key ``split(key, n)[i]``.
    """
    vg = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def f(params, batch, key):
        n = jtree.num_workers(params)
        keys = jax.random.split(key, n)
        with jax.named_scope("grad"):  # labels the ops in profiles
            out, grads = jax.vmap(vg)(params, batch, keys)
        loss, aux = out if has_aux else (out, None)
        return loss, aux, grads

    return f


def floats_sent(mix: MixingFn, step: jax.Array, tree: PyTree) -> jax.Array:
    """Mean floats one worker sends when ``mix`` is applied to ``tree`` at ``step``."""
    n = jtree.num_workers(tree)
    msgs = gossip.messages_sent(mix, step, n)
    return jnp.mean(msgs) * jtree.num_params(tree)


def all_finite(loss: jax.Array, tree: PyTree) -> jax.Array:
    """Per-worker flag ``[n]``: loss and every parameter finite.

    A worker's parameters are tested through their sum (one matrix-vector product
    per leaf, which any NaN or inf poisons); a finite sum that overflows float32
    is also flagged, which is as much a sign of divergence.
    """
    with jax.named_scope("all_finite"):
        ok = jnp.isfinite(loss)
        for x in jax.tree.leaves(tree):
            x2 = x.reshape(x.shape[0], -1)
            s = jnp.matmul(x2, jnp.ones((x2.shape[1],), x2.dtype))
            ok = ok & jnp.isfinite(s)
        return ok
