"""Algorithms as pure ``Algorithm(init, step)`` pairs over the worker axis."""

from jaxdec.algorithms.dsgd import DSGDInfo, DSGDState, dsgd
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
