"""Integrations: float16 loss scaling for closures, and PyTorch Lightning helpers."""

from rollingball.integrations.amp import LossScaler

__all__ = ["LossScaler"]
