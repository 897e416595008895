"""Calibration with guarantees: split conformal prediction sets and risk-controlled thresholds."""

from offramp.calibration.conformal import (
    ClassConditionalConformal,
    MarginalConformal,
    PerExitConformal,
    conformal_quantile,
    mean_set_size,
    miscoverage,
)
from offramp.calibration.ece import Reliability, expected_calibration_error, reliability
from offramp.calibration.risk import CATsStopping, LearnThenTest, default_candidates, exit_losses

__all__ = [
    "CATsStopping",
    "ClassConditionalConformal",
    "LearnThenTest",
    "MarginalConformal",
    "PerExitConformal",
    "Reliability",
    "conformal_quantile",
    "default_candidates",
    "exit_losses",
    "expected_calibration_error",
    "mean_set_size",
    "miscoverage",
    "reliability",
]
