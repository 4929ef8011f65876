"""PyTorch Lightning: RBO under automatic optimisation, with its closure calls logged.

Return RBO from ``configure_optimizers`` and train as usual. Under automatic optimisation
Lightning passes ``optimizer.step`` a closure that runs ``training_step``, ``zero_grad`` and
``backward``; RBO calls it 1 + (projection iterations) times per step, so ``training_step``
runs that often per batch. Add :class:`RBOCallback` to the trainer to log each step's
figures and to refuse the two Trainer settings that break the closure's contract:

- ``accumulate_grad_batches > 1``: Lightning does not zero the gradients inside the closure
  between accumulated batches, so each of RBO's evaluations would add to the gradients of
  the batches before. Accumulate inside ``training_step`` instead (see
  ``rollingball.optim.accumulation``), under manual optimisation.
- ``gradient_clip_val``: Lightning clips after every closure call, which changes the
  gradient but not the loss RBO rolls on.

Logged per step (``on_step``): ``rbo/closure_calls``, ``rbo/projection_steps``,
``rbo/residual``, ``rbo/converged``, and the running total ``rbo/grad_evals``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from rollingball.optim.rbo import RBO

__all__ = ["RBOCallback"]


def _rbo_optimizers(trainer: pl.Trainer) -> list[RBO]:
    found = []
    for optimizer in trainer.optimizers:
        inner = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer wraps it
        if isinstance(inner, RBO):
            found.append(inner)
    return found


class RBOCallback(pl.Callback):
    """Logs RBO's per-step figures and refuses Trainer settings that break its closure.

    Args:
        prefix: the prefix of the logged names.
        prog_bar: also show the closure calls per step in the progress bar.
    """

    def __init__(self, prefix: str = "rbo/", prog_bar: bool = False) -> None:
        self.prefix = prefix
        self.prog_bar = prog_bar

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not _rbo_optimizers(trainer):
            return
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "RBO calls its closure several times per step, and Lightning's "
                f"accumulate_grad_batches={trainer.accumulate_grad_batches} would add every "
                "call's gradients to the earlier batches'; use accumulate_grad_batches=1 and "
                "accumulate inside the closure (rollingball.optim.accumulation) instead"
            )
        if trainer.gradient_clip_val:
            raise ValueError(
                "gradient clipping changes the gradients RBO sees at every closure call but "
                "not the loss, so the ball would roll on an inconsistent landscape; remove "
                "gradient_clip_val (a smaller lr or radius bounds the step instead)"
            )

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
            values = {
                "closure_calls": float(stats["grad_evals"]),
                "projection_steps": float(stats["projection_steps"]),
                "residual": float(stats["residual"]),
                "converged": float(stats["converged"]),
                "grad_evals": float(optimizer.grad_evals),
            }
            for name, value in values.items():
                pl_module.log(
                    prefix + name,
                    value,
                    on_step=True,
                    on_epoch=False,
                    prog_bar=self.prog_bar and name == "closure_calls",
                    batch_size=1,
                )
