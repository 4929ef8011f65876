"""RBO with FSDP2 (`fully_shard`, DTensor parameters) on 2 CPU processes with gloo.

Each rank holds half of every parameter; RBO's norms and inner products must be those of
the whole parameter vector, so that 2 sharded ranks with half a batch each match one
process with the whole batch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from rollingball import RBO
from rollingball.experiments.distributed import spawn

fsdp = pytest.importorskip("torch.distributed.fsdp")

BATCH = 8
STEPS = 3
CASES: dict[str, dict[str, Any]] = {
    "anderson": dict(lr=0.2, radius=0.5, weight_decay=1e-3),
    "gd": dict(
        lr=0.2,
        radius=0.5,
        projection="gd",
        projection_steps=20,
        projection_step_size=0.5,
        momentum=0.5,
    ),
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 4, generator=generator, dtype=torch.float64)
    return x, torch.randn(BATCH, 2, generator=generator, dtype=torch.float64)


def train(model: nn.Module, opt: RBO, x: torch.Tensor, y: torch.Tensor, nan_at: int = 0) -> list:
    calls: list[int] = []
    for _ in range(STEPS):
        count = 0

        def closure() -> torch.Tensor:
            nonlocal count
            count += 1
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            if count == nan_at:
                loss = loss * math.nan
            loss.backward()
            return loss

        opt.step(closure)
        calls.append(count)
    return calls


def _fsdp_worker(rank: int, world: int, out: str) -> None:
    x, y = make_data()
    half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    results: dict[str, Any] = {}
    for name, kwargs in CASES.items():
        model = make_model()
        fsdp.fully_shard(model)
        opt = RBO(model.parameters(), **kwargs)
        calls = train(model, opt, x[half], y[half])
        local = [tuple(p.to_local().shape) for p in model.parameters()]
        results[name] = (calls, [p.full_tensor() for p in model.parameters()], local)
    model = make_model()
    fsdp.fully_shard(model)
    opt = RBO(model.parameters(), lr=0.2, radius=0.5)
    before = [p.full_tensor() for p in model.parameters()]
    try:
        train(model, opt, x[half], y[half], nan_at=3 if rank == 1 else 0)
        message = "no error"
    except FloatingPointError as error:
        message = str(error)
    after = [p.full_tensor() for p in model.parameters()]
    restored = all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    results["nan"] = (message, restored)
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("fsdp")
    spawn(_fsdp_worker, 2, str(out), timeout_s=180)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_ranks_match_one_process(fsdp_results: list[dict[str, Any]], name: str) -> None:
    calls0, params0, local0 = fsdp_results[0][name]
    calls1, params1, _ = fsdp_results[1][name]
    model = make_model()
    reference_calls = train(model, RBO(model.parameters(), **CASES[name]), *make_data())
    assert local0[0] == (4, 4)  # the first weight (8 × 4) is really split between the ranks
    assert calls0 == calls1 == reference_calls
    assert sum(reference_calls) > 2 * STEPS
    for a, b, ref in zip(params0, params1, model.parameters(), strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, ref.detach(), rtol=0, atol=1e-10)


def test_nan_on_one_sharded_rank_is_refused_everywhere(fsdp_results: list[dict[str, Any]]) -> None:
    for results in fsdp_results:
        message, restored = results["nan"]
        assert "non-finite loss" in message
        assert restored
