"""Optimizers: RBO, the baselines the project implements itself, and closure helpers."""

from rollingball.optim.accumulation import accumulated_loss, micro_batch_closure, split_batch
from rollingball.optim.batchnorm import first_call_updates_batchnorm
from rollingball.optim.entropy_sgd import EntropySGD
from rollingball.optim.rbo import RBO, ProjectionWarning
from rollingball.optim.usam import USAM

__all__ = [
    "RBO",
    "USAM",
    "EntropySGD",
    "ProjectionWarning",
    "accumulated_loss",
    "first_call_updates_batchnorm",
    "micro_batch_closure",
    "split_batch",
]
