"""Optimizers by name, with documented defaults, behind one closure interface.

Every optimizer here is a ``torch.optim.Optimizer`` whose ``step(closure)`` calls the closure
as many times as it needs and returns the loss of the first call, so the runner counts
gradient evaluations the same way for all of them (:class:`CountingClosure`):

- ``sgd``: ``torch.optim.SGD`` without momentum; 1 closure call per step.
- ``momentum``: ``torch.optim.SGD`` with momentum 0.9 (``nesterov = true`` for Nesterov); 1.
- ``adamw``: ``torch.optim.AdamW`` (weight decay 0.01); 1.
- ``sam``: ``pytorch_optimizer.SAM`` over momentum SGD, rho 0.05; 2.
- ``usam``: :class:`rollingball.baselines.usam.USAM`, θ ← θ − lr ∇f(θ + rho ∇f(θ)); 2.
- ``entropy_sgd``: :class:`rollingball.baselines.entropy_sgd.EntropySGD`; L (``langevin_steps``).
- ``rbo``: :class:`rollingball.RBO`; 1 + projection iterations.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from rollingball import defaults

__all__ = [
    "OPTIMIZERS",
    "CountingClosure",
    "OptimizerSpec",
    "build_optimizer",
    "closure_sam_class",
    "optimizer_defaults",
]


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one optimizer: a factory and its default hyperparameters."""

    factory: Callable[..., Optimizer]
    defaults: dict[str, Any] = field(default_factory=dict)
    doc: str = ""


@functools.cache
def closure_sam_class() -> Callable[..., Optimizer]:
    """``pytorch_optimizer.SAM`` with a closure-only ``step`` (imported on first use).

    ``pytorch_optimizer.SAM.step(closure)`` expects the first gradient to be computed before
    the call; this subclass's ``step(closure)`` makes both evaluations itself (2 closure
    calls) and returns the loss at the unperturbed weights, like every optimizer here.
    """
    from pytorch_optimizer import SAM

    class ClosureSAM(SAM):
        @torch.no_grad()
        def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
            if closure is None:
                raise RuntimeError("SAM.step needs a closure (it evaluates the loss twice)")
            with torch.enable_grad():
                loss = closure()
            super().step(closure)  # type: ignore[arg-type]
            self.last_stats = {"grad_evals": 2, "loss": float(loss)}
            return loss

    return ClosureSAM


def _sgd(params: Iterable[Any], **kw: Any) -> Optimizer:
    return torch.optim.SGD(params, **kw)


def _adamw(params: Iterable[Any], **kw: Any) -> Optimizer:
    return torch.optim.AdamW(params, **kw)


def _entropy_sgd(params: Iterable[Any], **kw: Any) -> Optimizer:
    from rollingball.baselines.entropy_sgd import EntropySGD

    return EntropySGD(params, **kw)


def _rbo(params: Iterable[Any], **kw: Any) -> Optimizer:
    from rollingball import RBO

    return RBO(params, **kw)


def _sam(params: Iterable[Any], **kw: Any) -> Optimizer:
    return closure_sam_class()(params, torch.optim.SGD, **kw)


def _usam(params: Iterable[Any], **kw: Any) -> Optimizer:
    from rollingball.baselines.usam import USAM

    return USAM(params, **kw)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(_sgd, {"lr": 0.1, "weight_decay": 0.0}, "plain SGD (momentum 0)"),
    "momentum": OptimizerSpec(
        _sgd,
        {"lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0},
        "SGD with heavy-ball momentum 0.9 (nesterov = true for Nesterov)",
    ),
    "adamw": OptimizerSpec(
        _adamw,
        {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01},
        "AdamW (decoupled weight decay 0.01)",
    ),
    "sam": OptimizerSpec(
        _sam,
        {"lr": 0.05, "rho": 0.05, "momentum": 0.9, "weight_decay": 0.0, "adaptive": False},
        "pytorch_optimizer.SAM over SGD with momentum 0.9, rho = 0.05",
    ),
    "usam": OptimizerSpec(
        _usam,
        {"lr": 0.1, "rho": 0.05, "momentum": 0.0, "weight_decay": 0.0},
        "unnormalized SAM: lr ∇f(θ + rho ∇f(θ)), heavy ball as torch SGD",
    ),
    "entropy_sgd": OptimizerSpec(
        _entropy_sgd,
        {
            "lr": 1.0,
            "langevin_steps": 20,
            "inner_lr": 0.1,
            "gamma": 0.03,
            "scoping": 1e-3,
            "noise": 1e-4,
            "alpha": 0.75,
            "momentum": 0.0,
            "nesterov": False,
            "weight_decay": 0.0,
        },
        "Entropy-SGD (Chaudhari et al. 2017, Algorithm 1), L = 20 Langevin steps",
    ),
    "rbo": OptimizerSpec(
        _rbo,
        {
            "lr": 0.1,
            "radius": 1.0,
            "projection": defaults.PROJECTION,
            "projection_steps": defaults.PROJECTION_STEPS,
            "projection_step_size": defaults.PROJECTION_STEP_SIZE,
            "projection_tol": defaults.PROJECTION_TOL,
            "anderson_memory": defaults.ANDERSON_MEMORY,
            "momentum": 0.0,
            "weight_decay": 0.0,
        },
        "the Rolling Ball Optimizer (rollingball.RBO)",
    ),
}


def optimizer_defaults(name: str) -> dict[str, Any]:
    """A copy of the default hyperparameters of optimizer ``name``."""
    return dict(_spec(name).defaults)


def _spec(name: str) -> OptimizerSpec:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def validate_hyperparameters(name: str, hparams: dict[str, Any]) -> dict[str, Any]:
    """Defaults merged with ``hparams``; unknown keys and negative or non-finite numbers refused."""
    spec = _spec(name)
    unknown = sorted(set(hparams) - set(spec.defaults))
    if unknown:
        raise ValueError(
            f"optimizer {name!r} has no hyperparameter(s) {', '.join(unknown)}; "
            f"known: {', '.join(spec.defaults)}"
        )
    merged = {**spec.defaults, **hparams}
    for key, value in merged.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"optimizer {name!r}: {key} must be a finite number >= 0, got {value}")
    if merged.get("lr", 1.0) <= 0:
        raise ValueError(f"optimizer {name!r}: lr must be > 0, got {merged['lr']}")
    if "betas" in merged:
        merged["betas"] = tuple(merged["betas"])
    return merged


def build_optimizer(name: str, params: Iterable[Any], **hparams: Any) -> Optimizer:
    """Optimizer ``name`` over ``params`` with its defaults overridden by ``hparams``."""
    return _spec(name).factory(params, **validate_hyperparameters(name, hparams))


class CountingClosure:
    """Wraps a closure and counts its calls: the one way the runner counts gradient evaluations."""

    def __init__(self, closure: Callable[[], Tensor]) -> None:
        self.closure = closure
        self.calls = 0

    def __call__(self) -> Tensor:
        self.calls += 1
        return self.closure()
