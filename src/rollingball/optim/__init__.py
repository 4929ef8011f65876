"""Optimizers: RBO and the baselines the project implements itself."""

from rollingball.optim.rbo import RBO

__all__ = ["RBO"]
