"""PyTorch Lightning: RBO under automatic optimisation, with its closure calls logged.

Return RBO from ``configure_optimizers`` and train as usual. Under automatic optimisation
Lightning passes ``optimizer.step`` a closure that runs ``training_step``, ``zero_grad`` and
``backward``; RBO calls it 1 + (projection iterations) times per step, so ``training_step``
runs that often per batch. Add :class:`RBOCallback` to the trainer:

- it hands the LightningModule to RBO (``RBO.model``, unless set already), so that only the
  first closure call of a step updates the BatchNorm running statistics;
- what ``training_step`` logs with ``self.log`` (or ``self.log_dict``) is what it computed
  at the first closure call of the step, at the starting point θ, as with SGD: the
  callback lets ``self.log`` through only during that call (``RBO.closure_call == 1``) or
  outside a step, so ``self.log("train_loss", loss)`` logs the loss at θ, step and epoch;
- it logs the step's loss at its starting point and the projection's figures (below);
- it refuses the two Trainer settings that break the closure's contract:
  ``accumulate_grad_batches > 1`` (Lightning accumulates across batches, adding every call's
  gradients to those of the batches before; accumulate inside ``training_step`` with
  ``rollingball.optim.accumulation.accumulated_loss`` instead) and ``gradient_clip_val``
  (Lightning clips after every closure call, which changes the gradient but not the loss
  RBO rolls on; bound the step with ``RBO(max_update=...)`` instead).

Logged names (``prefix`` ``rbo/``): ``rbo/loss_step`` and ``rbo/loss_epoch``, the loss at
the starting point (``last_stats["loss"]``, the loss SGD's ``training_step`` would log) per
step and its mean over the epoch; ``rbo/grad_evals``, the running total of closure calls;
and ``rbo/closure_calls``, ``rbo/projection_steps``, ``rbo/residual``, ``rbo/converged``
(the share of converged steps), each the mean over the last ``log_every_n_steps`` steps, so
that Lightning, which writes every ``log_every_n_steps``-th step (50 by default), records a
figure for every step.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import lightning.pytorch as pl

from rollingball.optim.rbo import RBO

__all__ = ["RBOCallback"]

WINDOWED = ("closure_calls", "projection_steps", "residual", "converged")


def _rbo_optimizers(trainer: pl.Trainer) -> list[RBO]:
    found = []
    for optimizer in trainer.optimizers:
        inner = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer wraps it
        if isinstance(inner, RBO):
            found.append(inner)
    return found


def _mean(values: Any) -> float:
    kept = [v for v in values if not math.isnan(v)]  # a skipped step has no residual
    return sum(kept) / len(kept) if kept else math.nan


def _log_at_theta(pl_module: pl.LightningModule, optimizers: list[RBO]) -> None:
    """Shadow the module's ``log`` with one that drops what is logged at trial points (closure
    calls after the first of a step); ``log_dict`` goes through ``log``."""
    _restore_log(pl_module)
    log = pl_module.log

    def log_at_theta(*args: Any, **kwargs: Any) -> None:
        if all(optimizer.closure_call <= 1 for optimizer in optimizers):
            log(*args, **kwargs)

    pl_module.__dict__["log"] = log_at_theta


def _restore_log(pl_module: pl.LightningModule) -> None:
    pl_module.__dict__.pop("log", None)


class RBOCallback(pl.Callback):
    """Logs RBO's per-step figures, gives RBO the module, refuses settings that break it.

    Args:
        prefix: the prefix of the logged names.
        prog_bar: also show the closure calls per step in the progress bar.
        log_at_theta: let the module's ``self.log`` through only at the first closure call
            of each step (the starting point θ); False logs at every call (the last stays).
    """

    def __init__(
        self, prefix: str = "rbo/", prog_bar: bool = False, log_at_theta: bool = True
    ) -> None:
        self.prefix = prefix
        self.prog_bar = prog_bar
        self.log_at_theta = log_at_theta
        self._windows: dict[int, deque[dict[str, float]]] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = _rbo_optimizers(trainer)
        if not optimizers:
            return
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "RBO calls its closure several times per step, and Lightning's "
                f"accumulate_grad_batches={trainer.accumulate_grad_batches} would add every "
                "call's gradients to the earlier batches'; use accumulate_grad_batches=1 and "
                "accumulate inside training_step (rollingball.optim.accumulation."
                "accumulated_loss, see docs/scaling.md) instead"
            )
        if trainer.gradient_clip_val:
            raise ValueError(
                "gradient clipping changes the gradients RBO sees at every closure call but "
                "not the loss, so the ball would roll on an inconsistent landscape; remove "
                "gradient_clip_val and bound the step with RBO(..., max_update=...) instead "
                "(the most the parameters may move in one step, see docs/scaling.md)"
            )
        for optimizer in optimizers:
            if optimizer.model is None:
                optimizer.model = pl_module
        window = max(1, getattr(trainer, "log_every_n_steps", 1))  # set by Lightning at init
        self._windows = {index: deque(maxlen=window) for index in range(len(optimizers))}
        if self.log_at_theta:
            _log_at_theta(pl_module, optimizers)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _restore_log(pl_module)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        _restore_log(pl_module)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        for index, optimizer in enumerate(_rbo_optimizers(trainer)):
            stats = optimizer.last_stats
            if not stats:
                continue
            prefix = self.prefix if index == 0 else f"{self.prefix}{index}/"
            window = self._windows.setdefault(index, deque(maxlen=1))
            window.append(
                {
                    "closure_calls": float(stats["grad_evals"]),
                    "projection_steps": float(stats["projection_steps"]),
                    "residual": float(stats["residual"]),
                    "converged": float(stats["converged"]),
                }
            )
            values = {name: _mean(step[name] for step in window) for name in WINDOWED}
            values["grad_evals"] = float(optimizer.grad_evals)
            for name, value in values.items():
                pl_module.log(
                    prefix + name,
                    value,
                    on_step=True,
                    on_epoch=False,
                    prog_bar=self.prog_bar and name == "closure_calls",
                    batch_size=1,
                )
            pl_module.log(
                prefix + "loss",
                float(stats["loss"]),
                on_step=True,
                on_epoch=True,
                batch_size=1,
            )
