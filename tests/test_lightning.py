"""RBO under PyTorch Lightning's automatic optimisation (CPU, tiny model, a few steps)."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from rollingball import RBO  # noqa: E402
from rollingball.integrations.lightning import RBOCallback  # noqa: E402
from rollingball.optim.accumulation import (  # noqa: E402
    accumulated_loss,
    micro_batch_closure,
    split_batch,
)
from rollingball.optim.batchnorm import running_stat_buffers  # noqa: E402
from stepping import model_closure  # noqa: E402

# Lightning 2.6 with a newer torch warns about its own use of torch.utils._pytree
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

STEPS = 4
# the projection settings are explicit, so that the counts below do not follow the defaults
# the converged projection (K = 20, memory 5), so that the calls per step vary with the step
RBO_ARGS: dict[str, Any] = dict(
    lr=0.5, radius=0.5, projection_steps=20, projection_tol=1e-4, anderson_memory=5
)


def make_data() -> TensorDataset:
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(STEPS * 16, 6, generator=generator)
    return TensorDataset(x, torch.randint(0, 3, (STEPS * 16,), generator=generator))


def make_net(batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(12) if batchnorm else nn.Identity()
    return nn.Sequential(nn.Linear(6, 12), norm, nn.Tanh(), nn.Linear(12, 3))


class Classifier(pl.LightningModule):
    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()
        self.net = make_net(batchnorm)
        self.calls: Counter[int] = Counter()  # training_step calls per optimizer step
        self.stats: list[dict[str, Any]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.calls[self.global_step] += 1
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)  # RBOCallback keeps the first call's
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.stats.append(dict(self.optimizers().optimizer.last_stats))

    def configure_optimizers(self) -> RBO:
        return RBO(self.parameters(), **RBO_ARGS)


def make_trainer(tmp_path: Path, **kwargs: Any) -> Any:
    options: dict[str, Any] = {"log_every_n_steps": 1, "callbacks": [RBOCallback()], **kwargs}
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        logger=pl.loggers.CSVLogger(tmp_path, name="logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **options,
    )


def logged_rows(tmp_path: Path, name: str) -> list[dict[str, str]]:
    (metrics_file,) = tmp_path.glob("logs/*/metrics.csv")
    return [row for row in csv.DictReader(metrics_file.open()) if row.get(name)]


def plain_loop() -> tuple[nn.Module, list[int]]:
    net = make_net()
    opt = RBO(net.parameters(), **RBO_ARGS)
    calls = []
    for x, y in DataLoader(make_data(), batch_size=16):
        opt.step(model_closure(opt, net, x, y))
        calls.append(opt.last_stats["grad_evals"])
    return net, calls


def test_lightning_trains_rbo_and_logs_its_closure_calls(tmp_path: Path) -> None:
    module = Classifier()
    trainer = make_trainer(tmp_path)
    trainer.fit(module, DataLoader(make_data(), batch_size=16))
    assert trainer.global_step == STEPS
    # the closure runs training_step 1 + (projection iterations) times per step
    calls = [module.calls[step] for step in range(STEPS)]
    assert calls == [s["grad_evals"] for s in module.stats]
    assert calls == [1 + s["projection_steps"] for s in module.stats]
    assert min(calls) >= 3
    # ... and gives exactly the steps of a plain loop over the same batches
    net, plain_calls = plain_loop()
    assert calls == plain_calls
    for ours, theirs in zip(module.net.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # the callback logged every step's closure calls and the running total
    rows = logged_rows(tmp_path, "rbo/closure_calls")
    assert [int(float(row["rbo/closure_calls"])) for row in rows] == calls
    assert int(float(rows[-1]["rbo/grad_evals"])) == sum(calls)
    assert all(float(row["rbo/converged"]) in (0.0, 1.0) for row in rows)
    # rbo/loss_step is the loss at the start point, and so is training_step's own log
    losses = [float(row["rbo/loss_step"]) for row in rows]
    assert losses == pytest.approx([s["loss"] for s in module.stats], rel=1e-6)
    logged = [float(row["train_loss"]) for row in rows]
    assert logged == pytest.approx(losses, rel=1e-6)
    assert float(trainer.progress_bar_metrics["train_loss"]) == pytest.approx(losses[-1], rel=1e-6)
    assert "log" not in vars(module)  # the module's own log is back after training
    (epoch_row,) = logged_rows(tmp_path, "rbo/loss_epoch")
    assert float(epoch_row["rbo/loss_epoch"]) == pytest.approx(sum(losses) / STEPS, rel=1e-6)


def test_without_log_at_theta_training_step_logs_the_last_trial_points_loss(
    tmp_path: Path,
) -> None:
    module = Classifier()
    trainer = make_trainer(tmp_path, callbacks=[RBOCallback(log_at_theta=False)])
    trainer.fit(module, DataLoader(make_data(), batch_size=16))
    rows = logged_rows(tmp_path, "rbo/loss_step")
    at_theta = [float(row["rbo/loss_step"]) for row in rows]
    trial = [float(row["train_loss"]) for row in rows]
    assert all(abs(a - b) > 1e-4 for a, b in zip(at_theta, trial, strict=True))


def test_rbo_figures_cover_every_step_at_lightnings_logging_interval(tmp_path: Path) -> None:
    module = Classifier()
    make_trainer(tmp_path, log_every_n_steps=2).fit(module, DataLoader(make_data(), batch_size=16))
    calls = [s["grad_evals"] for s in module.stats]
    rows = logged_rows(tmp_path, "rbo/closure_calls")
    assert len(rows) == STEPS // 2  # Lightning writes every second step
    means = [float(row["rbo/closure_calls"]) for row in rows]
    assert means == pytest.approx([sum(calls[:2]) / 2, sum(calls[2:]) / 2])
    assert len(set(calls)) > 1  # so that the means are not those of one step
    assert int(float(rows[-1]["rbo/grad_evals"])) == sum(calls)


@pytest.mark.parametrize("callback", [True, False])
def test_batchnorm_statistics_move_once_per_step_with_the_callback(
    tmp_path: Path, callback: bool
) -> None:
    module = Classifier(batchnorm=True)
    make_trainer(tmp_path, callbacks=[RBOCallback()] if callback else []).fit(
        module, DataLoader(make_data(), batch_size=16)
    )
    calls = sum(s["grad_evals"] for s in module.stats)
    tracked = int(running_stat_buffers(module.net)[2])
    assert calls >= 3 * STEPS
    assert tracked == (STEPS if callback else calls)


class Accumulating(Classifier):
    """The recipe of docs/scaling.md: micro-batches of 4 inside training_step."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.calls[self.global_step] += 1
        x, y = batch
        return accumulated_loss(
            lambda xb, yb: nn.functional.cross_entropy(self.net(xb), yb),
            split_batch(x, y, size=4),
        )

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        pass  # RBO clears the gradients before every closure call


def test_accumulation_under_automatic_optimisation_equals_the_plain_loop(tmp_path: Path) -> None:
    module = Accumulating()
    make_trainer(tmp_path).fit(module, DataLoader(make_data(), batch_size=16))
    net = make_net()
    opt = RBO(net.parameters(), **RBO_ARGS)
    calls = []
    for x, y in DataLoader(make_data(), batch_size=16):

        def loss_fn(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(net(xb), yb)

        opt.step(micro_batch_closure(opt, loss_fn, split_batch(x, y, size=4)))
        calls.append(opt.last_stats["grad_evals"])
    assert [s["grad_evals"] for s in module.stats] == calls
    assert min(calls) >= 3
    for ours, theirs in zip(module.net.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # ... and the whole batch in one pass, to float32 round-off
    whole, _ = plain_loop()
    for ours, theirs in zip(module.net.parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"accumulate_grad_batches": 2}, "accumulate_grad_batches=2"),
        ({"gradient_clip_val": 1.0}, r"gradient clipping.*max_update"),
    ],
)
def test_settings_that_break_the_closure_are_refused(
    tmp_path: Path, setting: dict[str, Any], message: str
) -> None:
    module = Classifier()
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, **setting).fit(module, DataLoader(make_data(), batch_size=16))
    assert sum(module.calls.values()) == 0


class WithDropout(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(self.net[0], nn.Dropout(0.2), self.net[2], self.net[3])

    def configure_optimizers(self) -> RBO:
        return RBO(self.parameters(), **RBO_ARGS)


def test_dropout_in_training_step_repeats_within_each_step(tmp_path: Path) -> None:
    module = WithDropout()
    make_trainer(tmp_path).fit(module, DataLoader(make_data(), batch_size=16))
    # measured: 6 or 7 calls, all converged; with fixed_randomness=False 21 calls, none
    assert all(s["converged"] for s in module.stats)
    assert max(s["grad_evals"] for s in module.stats) < 21
