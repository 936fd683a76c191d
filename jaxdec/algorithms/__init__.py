"""Algorithms as pure ``Algorithm(init, step)`` pairs over the worker axis.

Decentralized: :func:`dsgd`, :func:`gradient_tracking`, :func:`prox_dsgd`,
:func:`proxgt`. Personalized decentralized: :func:`deprl`, :func:`dfedper`,
:func:`finetune_head`. Federated: :func:`fedavg`, :func:`fedprox`, :func:`fedper`,
:func:`local_only`, :func:`scaffold`, :func:`ifca`, :func:`fedtsdp`, :func:`fedlin`,
:func:`fedlrt`.

Round samplers: :func:`round_sampler` (FedLin / FeDLRT, ``(grad_batch,
local_batches)`` from a ``WorkerData``) and :func:`personalized.round_sampler`
(``[n, S, b, ...]`` from any step sampler; DePRL and the federated algorithms).
"""

from jaxdec.algorithms import federated, personalized
from jaxdec.algorithms.deprl import (
    DePRLInfo,
    DePRLState,
    deprl,
    deprl_code_preset,
    theory_step_sizes,
)
from jaxdec.algorithms.dsgd import DSGDInfo, DSGDState, dsgd
from jaxdec.algorithms.federated import (
    FedAvgState,
    FederatedInfo,
    IFCAState,
    ScaffoldState,
    fedavg,
    fedper,
    fedprox,
    ifca,
    local_only,
    scaffold,
)
from jaxdec.algorithms.fedlin import FedLinInfo, FedLinState, fedlin, round_sampler
from jaxdec.algorithms.fedlrt import FeDLRTInfo, FeDLRTState, fedlrt
from jaxdec.algorithms.fedtsdp import (
    FedTSDPInfo,
    FedTSDPState,
    fedtsdp,
    personal_layers,
    run_fedtsdp,
)
from jaxdec.algorithms.gradient_tracking import (
    GradientTrackingInfo,
    GradientTrackingState,
    gradient_tracking,
)
from jaxdec.algorithms.personalized import (
    DFedPerInfo,
    DFedPerState,
    FinetuneInfo,
    FinetuneState,
    dfedper,
    finetune_head,
    merge_params,
    personalized_stationarity,
    split_params,
)
from jaxdec.algorithms.prox_tracking import (
    ProxDSGDInfo,
    ProxDSGDState,
    ProxGTInfo,
    ProxGTState,
    prox_dsgd,
    proxgt,
)

__all__ = [
    "federated",
    "personalized",
    "DePRLInfo",
    "DePRLState",
    "deprl",
    "deprl_code_preset",
    "theory_step_sizes",
    "DFedPerInfo",
    "DFedPerState",
    "FinetuneInfo",
    "FinetuneState",
    "dfedper",
    "finetune_head",
    "merge_params",
    "personalized_stationarity",
    "split_params",
    "FedAvgState",
    "FederatedInfo",
    "IFCAState",
    "ScaffoldState",
    "fedavg",
    "fedper",
    "fedprox",
    "ifca",
    "local_only",
    "scaffold",
    "FedTSDPInfo",
    "FedTSDPState",
    "fedtsdp",
    "personal_layers",
    "run_fedtsdp",
    "FedLinInfo",
    "FedLinState",
    "fedlin",
    "round_sampler",
    "FeDLRTInfo",
    "FeDLRTState",
    "fedlrt",
    "ProxDSGDInfo",
    "ProxDSGDState",
    "ProxGTInfo",
    "ProxGTState",
    "prox_dsgd",
    "proxgt",
    "DSGDInfo",
    "DSGDState",
    "GradientTrackingInfo",
    "GradientTrackingState",
    "dsgd",
    "gradient_tracking",
]
