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

# Lightning 2.6 with a newer torch warns about its own use of torch.utils._pytree
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

STEPS = 4
RBO_ARGS: dict[str, Any] = dict(lr=0.5, radius=0.5)


def make_data() -> TensorDataset:
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(STEPS * 16, 6, generator=generator)
    return TensorDataset(x, torch.randint(0, 3, (STEPS * 16,), generator=generator))


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()
        self.calls: Counter[int] = Counter()  # training_step calls per optimizer step
        self.stats: list[dict[str, Any]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.calls[self.global_step] += 1
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.stats.append(dict(self.optimizers().optimizer.last_stats))

    def configure_optimizers(self) -> RBO:
        return RBO(self.parameters(), **RBO_ARGS)


def make_trainer(tmp_path: Path, **kwargs: Any) -> Any:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        logger=pl.loggers.CSVLogger(tmp_path, name="logs"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[RBOCallback()],
        **kwargs,
    )


def plain_loop() -> tuple[nn.Module, list[int]]:
    net = make_net()
    opt = RBO(net.parameters(), **RBO_ARGS)
    calls = []
    for x, y in DataLoader(make_data(), batch_size=16):

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            return loss

        opt.step(closure)
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
    (metrics_file,) = tmp_path.glob("logs/*/metrics.csv")
    rows = [row for row in csv.DictReader(metrics_file.open()) if row.get("rbo/closure_calls")]
    assert [int(float(row["rbo/closure_calls"])) for row in rows] == calls
    assert int(float(rows[-1]["rbo/grad_evals"])) == sum(calls)
    assert all(float(row["rbo/converged"]) in (0.0, 1.0) for row in rows)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"accumulate_grad_batches": 2}, "accumulate_grad_batches=2"),
        ({"gradient_clip_val": 1.0}, "gradient clipping"),
    ],
)
def test_settings_that_break_the_closure_are_refused(
    tmp_path: Path, setting: dict[str, Any], message: str
) -> None:
    module = Classifier()
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, **setting).fit(module, DataLoader(make_data(), batch_size=16))
    assert sum(module.calls.values()) == 0
