"""RBO under DistributedDataParallel, with real processes (gloo on CPU).

Two ranks, each with half of every batch, must end where one process with the whole batch
ends, in lockstep: the same closure calls on every rank, the same parameters, and the same
refusal when one rank alone sees a NaN. All cases run in one spawned job (process start-up
dominates); the one-process references run here in the test process.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from rollingball import RBO
from rollingball.experiments.distributed import spawn
from rollingball.integrations import LossScaler
from rollingball.optim.accumulation import micro_batch_closure, split_batch
from rollingball.optim.batchnorm import first_call_updates_batchnorm

BATCH = 16
STEPS = 4

# name -> (RBO keyword arguments, dtype, how the targets of the second half are scaled)
CASES: dict[str, tuple[dict[str, Any], torch.dtype, float]] = {
    "anderson": (dict(lr=0.3, radius=0.5), torch.float64, 1.0),
    "gd": (
        dict(
            lr=0.3,
            radius=0.5,
            projection="gd",
            projection_steps=20,
            projection_step_size=0.5,
            projection_tol=1e-3,
        ),
        torch.float64,
        1.0,
    ),
    "gd_authors": (
        dict(lr=0.3, radius=0.5, projection="gd", projection_steps=4, projection_tol=0.0),
        torch.float64,
        1.0,
    ),
    "momentum": (dict(lr=0.2, radius=0.5, momentum=0.9, weight_decay=1e-3), torch.float64, 1.0),
    # the second rank's local loss is about 10⁴ times the first's
    "skewed": (dict(lr=0.01, radius=0.2), torch.float64, 100.0),
    # float32: a stopping test at 1e-4 sits at round-off level, where the reduction order of
    # two ranks and of one process can tip it either way; the fixed-K scheme has no such test
    "float32": (dict(lr=0.3, radius=0.5, projection_tol=1e-2), torch.float32, 1.0),
    "float32_gd": (
        dict(lr=0.3, radius=0.5, projection="gd", projection_steps=5, projection_tol=0.0),
        torch.float32,
        1.0,
    ),
}


def make_model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def make_batches(dtype: torch.dtype, scale: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        x = torch.randn(BATCH, 5, generator=generator, dtype=dtype)
        y = torch.randn(BATCH, 3, generator=generator, dtype=dtype)
        y[BATCH // 2 :] *= scale
        batches.append((x, y))
    return batches


def train(
    model: nn.Module,
    opt: RBO,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    shard: slice,
    poison: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Train on ``batch[shard]`` of every batch; ``poison=(step, call)`` makes that closure
    call's loss NaN. Returns the figures that must agree between ranks and with one process."""
    calls_per_step: list[int] = []
    outcome: list[str] = []
    restored: list[bool] = []
    start, skipped = opt.grad_evals, opt.skipped_steps
    for step, (x, y) in enumerate(batches):
        calls = 0

        def closure(
            x: torch.Tensor = x[shard], y: torch.Tensor = y[shard], step: int = step
        ) -> torch.Tensor:
            nonlocal calls
            calls += 1
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            if poison == (step, calls):
                loss = loss * math.nan
            loss.backward()
            return loss

        before = [p.detach().clone() for p in model.parameters()]
        try:
            opt.step(closure)
            outcome.append("ok")
        except FloatingPointError as error:
            outcome.append(str(error))
        restored.append(
            all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        )
        calls_per_step.append(calls)
    return {
        "calls": calls_per_step,
        "grad_evals": opt.grad_evals - start,
        "outcome": outcome,
        "restored": restored,
        "params": [p.detach().clone() for p in model.parameters()],
        "skipped": opt.skipped_steps - skipped,
    }


def _ddp_worker(rank: int, world: int, out: str) -> None:
    half = BATCH // world
    shard = slice(rank * half, (rank + 1) * half)
    results: dict[str, Any] = {}
    for name, (kwargs, dtype, scale) in CASES.items():
        model = nn.parallel.DistributedDataParallel(make_model(dtype))
        opt = RBO(model.parameters(), **kwargs)
        results[name] = train(model, opt, make_batches(dtype, scale), shard)
    # DDP's gradients as views into its communication buckets: RBO writes into .grad
    kwargs, dtype, scale = CASES["anderson"]
    model = nn.parallel.DistributedDataParallel(make_model(dtype), gradient_as_bucket_view=True)
    opt = RBO(model.parameters(), **kwargs)
    results["bucket_view"] = train(model, opt, make_batches(dtype, scale), shard)
    # gradient accumulation under DDP: micro-batches of 3 + 3 + 2 rows, one all-reduce per call
    kwargs, dtype, scale = CASES["anderson"]
    model = nn.parallel.DistributedDataParallel(make_model(dtype))
    opt = RBO(model.parameters(), **kwargs)
    calls = []
    for x, y in make_batches(dtype, scale):
        closure = micro_batch_closure(
            opt,
            lambda a, b: nn.functional.mse_loss(model(a), b),
            split_batch(x[shard], y[shard], size=3),
            model=model,
        )
        opt.step(closure)
        calls.append(opt.last_stats["grad_evals"])
    results["accumulation"] = {"calls": calls, "params": [p.detach() for p in model.parameters()]}
    # BatchNorm under DDP: only the first closure call of a step updates the running stats
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    )
    opt = RBO(model.parameters(), lr=0.3, radius=0.5)
    calls = []
    for x, y in make_batches(torch.float64, 1.0):

        def bn_closure(x: torch.Tensor = x[shard], y: torch.Tensor = y[shard]) -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(first_call_updates_batchnorm(model, bn_closure))
        calls.append(opt.last_stats["grad_evals"])
    bn = model.module[0]
    results["batchnorm"] = {
        "calls": calls,
        "running_mean": bn.running_mean.clone(),
        "running_var": bn.running_var.clone(),
        "tracked": int(bn.num_batches_tracked),
    }
    # float16 with LossScaler: an overflow on one rank skips the step on every rank. Every
    # rank holds the same scale (the gradients are all-reduced before they are unscaled)
    model = nn.parallel.DistributedDataParallel(make_model(torch.float32))
    opt = RBO(model.parameters(), lr=0.3, radius=0.5, projection_tol=1e-2)
    scaler = LossScaler(init_scale=2.0**10)
    losses = []
    for step, (x, y) in enumerate(make_batches(torch.float32, 1.0)):
        # rank 0's first batch overflows float16 (65504) in the forward pass
        blow_up = 1e6 if rank == 0 and step == 0 else 1.0

        def loss_fn(
            x: torch.Tensor = x[shard] * blow_up, y: torch.Tensor = y[shard]
        ) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.float16):
                return nn.functional.mse_loss(model(x).float(), y)

        loss = scaler.step(opt, loss_fn)
        losses.append(None if loss is None else float(loss))
    results["float16"] = {
        "skipped": [loss is None for loss in losses],
        "scale": scaler.scale,
        "grad_evals": opt.grad_evals,
        "params": [p.detach().clone() for p in model.parameters()],
    }
    # a NaN on rank 1 only: at the first call of step 1, then inside the projection of step 2
    for policy in ("raise", "skip"):
        model = nn.parallel.DistributedDataParallel(make_model(torch.float64))
        opt = RBO(model.parameters(), lr=0.3, radius=0.5, on_nonfinite=policy)
        batches = make_batches(torch.float64, 1.0)
        first = train(model, opt, batches[:2], shard, poison=(1, 1) if rank == 1 else None)
        inner = train(model, opt, batches[2:], shard, poison=(0, 3) if rank == 1 else None)
        results[f"nan_{policy}"] = {"first_call": first, "projection": inner}
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp")
    spawn(_ddp_worker, 2, str(out), timeout_s=180)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _reference(name: str) -> dict[str, Any]:
    kwargs, dtype, scale = CASES[name]
    model = make_model(dtype)
    return train(model, RBO(model.parameters(), **kwargs), make_batches(dtype, scale), slice(None))


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_match_one_process_with_the_whole_batch(
    ddp_results: list[dict[str, Any]], name: str
) -> None:
    rank0, rank1 = ddp_results[0][name], ddp_results[1][name]
    reference = _reference(name)
    # lockstep: the same closure calls and bit-identical parameters on both ranks
    assert rank0["calls"] == rank1["calls"]
    assert all(torch.equal(a, b) for a, b in zip(rank0["params"], rank1["params"], strict=True))
    # the same run as one process with the whole batch
    assert rank0["calls"] == reference["calls"]
    assert rank0["outcome"] == ["ok"] * STEPS
    assert sum(reference["calls"]) > 2 * STEPS  # the projections did iterate
    for ours, theirs in zip(rank0["params"], reference["params"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    moved = max(
        float((p - q).detach().abs().max())
        for p, q in zip(reference["params"], make_model(CASES[name][1]).parameters(), strict=True)
    )
    assert moved > 1e-3  # the steps did move the parameters


def test_gradients_as_bucket_views_give_the_same_run(ddp_results: list[dict[str, Any]]) -> None:
    reference = _reference("anderson")
    for results in ddp_results:
        assert results["bucket_view"]["calls"] == reference["calls"]
        for ours, theirs in zip(results["bucket_view"]["params"], reference["params"], strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


def test_accumulation_under_ddp_matches_one_process(ddp_results: list[dict[str, Any]]) -> None:
    reference = _reference("anderson")
    for results in ddp_results:
        assert results["accumulation"]["calls"] == reference["calls"]
        for ours, theirs in zip(
            results["accumulation"]["params"], reference["params"], strict=True
        ):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


def test_batchnorm_running_stats_move_once_per_step_under_ddp(
    ddp_results: list[dict[str, Any]],
) -> None:
    # DDP broadcasts rank 0's buffers at every forward, so rank 0's running statistics are
    # the exponential average of its own batches' statistics, one update per step
    mean, var = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    for x, _ in make_batches(torch.float64, 1.0):
        half = x[: BATCH // 2]
        mean = 0.9 * mean + 0.1 * half.mean(0)
        var = 0.9 * var + 0.1 * half.var(0, unbiased=True)
    rank0 = ddp_results[0]["batchnorm"]
    assert rank0["calls"] == ddp_results[1]["batchnorm"]["calls"]
    assert sum(rank0["calls"]) > 2 * STEPS  # several calls per step, one update per step
    for results in ddp_results:
        assert results["batchnorm"]["tracked"] == STEPS
    torch.testing.assert_close(rank0["running_mean"], mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(rank0["running_var"], var, rtol=0, atol=1e-12)


def test_a_float16_overflow_on_one_rank_skips_the_step_on_every_rank(
    ddp_results: list[dict[str, Any]],
) -> None:
    rank0, rank1 = (r["float16"] for r in ddp_results)
    assert rank0["skipped"] == rank1["skipped"] == [True] + [False] * (STEPS - 1)
    assert rank0["scale"] == rank1["scale"] == 2.0**9
    assert rank0["grad_evals"] == rank1["grad_evals"]
    assert all(torch.equal(a, b) for a, b in zip(rank0["params"], rank1["params"], strict=True))


def test_authors_mode_spends_k_calls_per_step_on_every_rank(
    ddp_results: list[dict[str, Any]],
) -> None:
    assert ddp_results[0]["gd_authors"]["calls"] == [4] * STEPS
    assert ddp_results[1]["gd_authors"]["calls"] == [4] * STEPS


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nan_on_one_rank_is_refused_on_every_rank(
    ddp_results: list[dict[str, Any]], policy: str
) -> None:
    rank0, rank1 = (r[f"nan_{policy}"] for r in ddp_results)
    for phase, poisoned_step, calls in (("first_call", 1, 1), ("projection", 0, 3)):
        a, b = rank0[phase], rank1[phase]
        # both ranks stop at the same closure call, refuse the same way and restore everything
        assert a["calls"] == b["calls"]
        assert a["calls"][poisoned_step] == calls
        assert a["restored"][poisoned_step] and b["restored"][poisoned_step]
        assert not a["restored"][1 - poisoned_step]  # the other step did move
        if policy == "raise":
            assert "non-finite loss" in a["outcome"][poisoned_step]
            assert a["outcome"] == b["outcome"]
            assert a["skipped"] == b["skipped"] == 0
        else:
            assert a["outcome"] == b["outcome"] == ["ok", "ok"]
            assert a["skipped"] == b["skipped"] == 1
        assert a["grad_evals"] == b["grad_evals"] == sum(a["calls"])
        assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"], strict=True))


def _stuck_worker(rank: int, world: int) -> None:
    if rank == 0:
        torch.distributed.all_reduce(torch.zeros(1))  # waits for a rank that never comes
    else:
        time.sleep(600)


def test_a_deadlocked_job_fails_instead_of_hanging() -> None:
    start = time.monotonic()
    with pytest.raises((TimeoutError, torch.multiprocessing.ProcessRaisedException)):
        spawn(_stuck_worker, 2, timeout_s=8)
    assert time.monotonic() - start < 60
