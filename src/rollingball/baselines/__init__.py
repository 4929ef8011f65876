"""Baselines the experiment harness compares RBO with and that torch does not provide."""

from rollingball.baselines.entropy_sgd import EntropySGD
from rollingball.baselines.usam import USAM

__all__ = ["USAM", "EntropySGD"]
