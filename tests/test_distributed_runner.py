"""The runner under torchrun: 2 CPU processes match 1 process, only rank 0 writes, resume works.

A run on N processes with batch B/N per process sees exactly the global batches of one
process with batch B (the DistributedSampler shares the single-process permutation), so
the metrics agree to float32 round-off.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from rollingball.experiments import runner
from rollingball.experiments.config import (
    ConfigError,
    config_from_dict,
    load_config,
    save_config,
)
from rollingball.experiments.data import load_data
from rollingball.experiments.distributed import spawn
from rollingball.experiments.runner import read_metrics, run

EXACT = ("epoch", "step", "grad_evals", "train_accuracy", "test_accuracy", "val_accuracy")
CLOSE = ("train_loss", "test_loss", "val_loss", "lr", "proj_steps_mean", "proj_converged_frac")


def make_config(batch_size: int, epochs: int) -> Any:
    return config_from_dict(
        {
            "seed": 3,
            "threads": 1,
            "data": {"name": "mnist1d", "batch_size": batch_size, "val_fraction": 0.1},
            "model": {"name": "mlp", "hidden": [16], "activation": "tanh"},
            # projection_tol well above float32 round-off: the ranks and the single process
            # then stop their projections after the same number of iterations
            "optimizer": {"name": "rbo", "lr": 0.5, "radius": 0.2, "projection_tol": 1e-3},
            "schedule": {"kind": "cosine"},
            "budget": {"epochs": epochs},
        }
    )


def assert_same_metrics(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert set(a) == set(b)
        for key in EXACT:
            assert a[key] == b[key], key
        for key in CLOSE:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), key
        # the relative residual sits near float32 round-off: only its size must agree
        assert a["proj_residual_mean"] == pytest.approx(b["proj_residual_mean"], rel=0.1)


@pytest.fixture(scope="module")
def mnist1d() -> Any:
    return load_data("mnist1d", val_fraction=0.1, seed=3)


def test_torchrun_two_processes_match_one_process(tmp_path: Path, mnist1d: Any) -> None:
    config_path = tmp_path / "half_batch.toml"
    save_config(make_config(50, 1), config_path)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "rollingball",
        "run",
        str(config_path),
        "--out",
        str(tmp_path / "two"),
        "--no-progress",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "checkpoint.pt",
        "config.toml",
        "metrics.jsonl",
    ]
    assert load_config(tmp_path / "two" / "config.toml") == make_config(50, 1)
    one = run(make_config(100, 1), tmp_path / "one", data=mnist1d)
    assert_same_metrics(read_metrics(tmp_path / "two"), one.metrics)
    assert one.metrics[-1]["step"] == 36 and one.metrics[-1]["proj_steps_mean"] > 1


class Killed(Exception):
    """Stands for a crash of the whole job."""


def _forbid_writes() -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a rank other than 0 wrote a file")

    runner.atomic_write = refuse
    runner.atomic_write_text = refuse
    runner.save_config = refuse


def _resume_worker(rank: int, world: int, out: str) -> None:
    if rank != 0:
        _forbid_writes()
    data = load_data("mnist1d", val_fraction=0.1, seed=3)
    config = make_config(50, 2)
    cpu_sync = make_config(50, 2)
    cpu_sync.sync_batchnorm = True
    with pytest.raises(ConfigError, match="SyncBatchNorm runs on GPUs only"):
        run(cpu_sync, out, data=data)  # refused before anything is written
    assert not Path(out).exists()

    def kill(state: Any) -> None:
        if state.step == 50:  # in epoch 2: the last checkpoint is the end of epoch 1
            raise Killed

    with contextlib.suppress(Killed):
        run(config, out, data=data, on_step=kill)
    saved = read_metrics(out) if rank == 0 else None
    torch.distributed.barrier()
    resumed = run(config, out, resume=True, data=data)
    torch.save({"saved": saved, "resumed": resumed.metrics}, Path(out) / f"result{rank}.pt")


def test_a_killed_two_process_run_resumes_and_matches_one_process(
    tmp_path: Path, mnist1d: Any
) -> None:
    out = tmp_path / "run"
    spawn(_resume_worker, 2, str(out), timeout_s=240)
    results = [torch.load(out / f"result{r}.pt", weights_only=False) for r in range(2)]
    assert [row["epoch"] for row in results[0]["saved"]] == [1]
    reference = run(make_config(100, 2), None, data=mnist1d)
    for result in results:  # every rank ends with the same metrics
        assert_same_metrics(result["resumed"], reference.metrics)
    assert_same_metrics(read_metrics(out), reference.metrics)
    assert all(math.isfinite(row["train_loss"]) for row in reference.metrics)
