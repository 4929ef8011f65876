"""RBO and its closure helpers (the baselines are in `rollingball.baselines`)."""

from rollingball.optim.accumulation import accumulated_loss, micro_batch_closure, split_batch
from rollingball.optim.batchnorm import first_call_updates_batchnorm
from rollingball.optim.rbo import RBO, ProjectionWarning

__all__ = [
    "RBO",
    "ProjectionWarning",
    "accumulated_loss",
    "first_call_updates_batchnorm",
    "micro_batch_closure",
    "split_batch",
]
