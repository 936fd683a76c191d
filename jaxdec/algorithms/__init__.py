"""Algorithms as pure ``Algorithm(init, step)`` pairs over the worker axis."""

from jaxdec.algorithms.dsgd import DSGDInfo, DSGDState, dsgd
from jaxdec.algorithms.fedlin import FedLinInfo, FedLinState, fedlin, round_sampler
from jaxdec.algorithms.fedlrt import FeDLRTInfo, FeDLRTState, fedlrt
from jaxdec.algorithms.gradient_tracking import (
    GradientTrackingInfo,
    GradientTrackingState,
    gradient_tracking,
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
