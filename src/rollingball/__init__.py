"""rollingball: the Rolling Ball Optimizer (RBO) for PyTorch, and tools to see and test it."""

from rollingball.optim.rbo import RBO

__all__ = ["RBO"]
__version__ = "0.1.0"
