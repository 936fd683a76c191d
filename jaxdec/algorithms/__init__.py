"""Algorithms as pure ``Algorithm(init, step)`` pairs over the worker axis."""

from jaxdec.algorithms.dsgd import DSGDInfo, DSGDState, dsgd
from jaxdec.algorithms.gradient_tracking import (
    GradientTrackingInfo,
    GradientTrackingState,
    gradient_tracking,
)

__all__ = [
    "DSGDInfo",
    "DSGDState",
    "GradientTrackingInfo",
    "GradientTrackingState",
    "dsgd",
    "gradient_tracking",
]
