"""jaxdec: decentralized and federated learning where workers are an array axis.

>>> import jaxdec as jd, optax
>>> W = jd.topology.mixing_matrix(jd.topology.ring(16), "metropolis")
>>> algo = jd.algorithms.dsgd(loss_fn, optax.sgd(0.1), jd.gossip.dense(W))
"""

from jaxdec import (
    algorithms,
    checkpoint,
    clustering,
    data,
    gossip,
    hyper,
    launch,
    loop,
    lowrank,
    merge,
    metrics,
    models,
    participation,
    prox,
    sharding,
    topology,
    tree,
    types,
)
from jaxdec.run import History, run, run_traced
from jaxdec.types import Algorithm, MixingFn

__version__ = "0.1.0"
__all__ = [
    "Algorithm",
    "History",
    "MixingFn",
    "algorithms",
    "checkpoint",
    "clustering",
    "data",
    "metrics",
    "models",
    "participation",
    "prox",
    "gossip",
    "hyper",
    "launch",
    "loop",
    "lowrank",
    "merge",
    "run",
    "run_traced",
    "sharding",
    "topology",
    "tree",
    "types",
]
