"""The runner: files, determinism, kill-and-resume, Ctrl-C, atomic writes, budgets, bad configs."""

import json
import math
import os
import signal

import pytest
import torch

from rollingball.cli import main
from rollingball.experiments import atomic
from rollingball.experiments.config import (
    ConfigError,
    ScheduleConfig,
    config_from_dict,
    load_config,
    lr_factor,
)
from rollingball.experiments.data import DataNotFoundError, load_data
from rollingball.experiments.optimizers import OPTIMIZERS
from rollingball.experiments.runner import (
    CHECKPOINT,
    CheckpointError,
    load_checkpoint,
    read_metrics,
    run,
)

DIGITS = load_data("digits")  # 1437 train examples: 15 batches of 100 per epoch


def _config(optimizer=None, epochs=3, **extra):
    raw = {
        "seed": 7,
        "data": {"name": "digits", "batch_size": 100},
        "model": {"name": "mlp", "hidden": [16], "activation": "tanh"},
        "optimizer": optimizer or {"name": "momentum", "lr": 0.1},
        "schedule": {"kind": "cosine", "warmup": 0.1},
        "budget": {"epochs": epochs},
    }
    raw.update(extra)
    return config_from_dict(raw)


def _without_time(metrics):
    return [{k: v for k, v in row.items() if k != "wall_seconds"} for row in metrics]


REQUIRED = {
    "epoch",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "grad_evals",
    "wall_seconds",
}


def test_writes_config_metrics_and_checkpoint(tmp_path):
    config = _config({"name": "rbo", "lr": 0.5, "radius": 0.2})
    result = run(config, tmp_path / "run", data=DIGITS)
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["checkpoint.pt", "config.toml", "metrics.jsonl"]
    assert load_config(tmp_path / "run" / "config.toml") == config
    rows = read_metrics(tmp_path / "run")
    assert rows == json.loads(json.dumps(result.metrics))
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert set(row) >= REQUIRED
        assert 1 <= row["proj_steps_mean"] <= 20 and 0 <= row["proj_converged_frac"] <= 1
        assert row["proj_residual_mean"] >= 0
    # closure calls: one per step plus the projection iterations
    steps = 3 * 15
    assert rows[-1]["step"] == steps
    mean_proj = sum(r["proj_steps_mean"] for r in rows) / 3
    assert rows[-1]["grad_evals"] == pytest.approx(steps * (1 + mean_proj))
    assert rows[-1]["test_accuracy"] > 0.5  # it learns


def test_runs_are_deterministic_on_cpu():
    a = run(_config({"name": "entropy_sgd", "langevin_steps": 3}, epochs=2), None, data=DIGITS)
    b = run(_config({"name": "entropy_sgd", "langevin_steps": 3}, epochs=2), None, data=DIGITS)
    assert _without_time(a.metrics) == _without_time(b.metrics)
    c = run(
        _config({"name": "entropy_sgd", "langevin_steps": 3}, epochs=2, seed=8), None, data=DIGITS
    )
    assert _without_time(a.metrics) != _without_time(c.metrics)


OPTIMIZERS_FOR_RESUME = [
    {"name": "momentum", "lr": 0.1},
    {"name": "entropy_sgd", "langevin_steps": 3, "noise": 1e-3},  # uses the global RNG
    {"name": "rbo", "lr": 0.5, "radius": 0.2, "momentum": 0.5},
]


@pytest.mark.parametrize("optimizer", OPTIMIZERS_FOR_RESUME, ids=lambda o: o["name"])
def test_ctrl_c_saves_and_resume_gives_identical_metrics(tmp_path, optimizer):
    reference = run(_config(optimizer), tmp_path / "reference", data=DIGITS)

    def press_ctrl_c(state):
        if state.step == 20:  # in the middle of the second epoch
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "interrupted"
    first = run(_config(optimizer), out, data=DIGITS, on_step=press_ctrl_c)
    assert first.interrupted and len(first.metrics) == 1
    assert len(read_metrics(out)) == 1
    resumed = run(_config(optimizer), out, resume=True, data=DIGITS)
    assert not resumed.interrupted
    assert _without_time(resumed.metrics) == _without_time(reference.metrics)
    assert _without_time(read_metrics(out)) == _without_time(read_metrics(tmp_path / "reference"))


def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    optimizer = {"name": "rbo", "lr": 0.5, "radius": 0.2}
    reference = run(_config(optimizer), None, data=DIGITS)

    class Killed(Exception):
        pass

    def kill(state):
        if state.step == 37:  # epoch 3, nothing saved since the end of epoch 2
            raise Killed

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        run(_config(optimizer), out, data=DIGITS, on_step=kill)
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2]
    resumed = run(_config(optimizer), out, resume=True, data=DIGITS)
    assert _without_time(resumed.metrics) == _without_time(reference.metrics)
    # resuming a finished run changes nothing
    again = run(_config(optimizer), out, resume=True, data=DIGITS)
    assert again.metrics == resumed.metrics


def test_an_interrupted_write_never_corrupts_metrics(tmp_path, monkeypatch):
    out = tmp_path / "run"
    snapshots = []

    def die(fd):  # the process dies after writing the temporary file, before the rename
        raise KeyboardInterrupt

    def arm(state):
        if state.step == 16:  # epoch 1 is on disk; the next write (end of epoch 2) dies
            snapshots.append((out / "metrics.jsonl").read_bytes())
            monkeypatch.setattr(atomic.os, "fsync", die)

    with pytest.raises(KeyboardInterrupt):
        run(_config(epochs=2), out, data=DIGITS, on_step=arm)
    monkeypatch.undo()
    after = (out / "metrics.jsonl").read_bytes()
    assert after == snapshots[0]
    assert [json.loads(line)["epoch"] for line in after.decode().splitlines()] == [1]
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt",
        "config.toml",
        "metrics.jsonl",
    ]
    resumed = run(_config(epochs=2), out, resume=True, data=DIGITS)
    assert [r["epoch"] for r in resumed.metrics] == [1, 2]


def test_equal_grad_eval_budget(tmp_path):
    sgd = run(_config({"name": "sgd", "lr": 0.1}, budget={"grad_evals": 100}), None, data=DIGITS)
    sam = run(_config({"name": "sam", "lr": 0.1}, budget={"grad_evals": 100}), None, data=DIGITS)
    rbo = run(
        _config({"name": "rbo", "lr": 0.5, "radius": 0.2}, budget={"grad_evals": 100}),
        None,
        data=DIGITS,
    )
    assert sgd.final["grad_evals"] == 100 and sgd.final["step"] == 100
    assert sgd.final["epochs"] == pytest.approx(100 / 15, abs=1e-5) and sgd.final["partial_epoch"]
    assert [r["epoch"] for r in sgd.metrics] == [1, 2, 3, 4, 5, 6, 7]
    assert sam.final["grad_evals"] == 100 and sam.final["step"] == 50
    assert 100 <= rbo.final["grad_evals"] <= 100 + 20 and rbo.final["step"] < 50


def test_equal_wall_time_budget(tmp_path):
    config = _config(budget={"wall_seconds": 0.5})
    result = run(config, tmp_path / "w", data=DIGITS)
    last = result.final
    # it stops at the first step after the budget is spent (one epoch here is ~15 short steps)
    assert 0.5 <= last["wall_seconds"] < 5.0 and last["step"] >= 1
    assert load_config(tmp_path / "w" / "config.toml").budget.wall_seconds == 0.5
    for bad in ({"wall_seconds": 0}, {"wall_seconds": 1, "epochs": 1}):
        with pytest.raises(ConfigError, match="budget"):
            _config(budget=bad)


def test_learning_rate_schedules():
    cosine = ScheduleConfig(kind="cosine")
    assert lr_factor(cosine, 0.0) == 1.0 and lr_factor(cosine, 0.5) == pytest.approx(0.5)
    assert lr_factor(cosine, 1.0) == pytest.approx(0.0, abs=1e-12)
    step = ScheduleConfig(kind="step", milestones=[0.5, 0.75], gamma=0.1)
    assert [lr_factor(step, t) for t in (0.1, 0.5, 0.8)] == pytest.approx([1.0, 0.1, 0.01])
    warm = ScheduleConfig(kind="cosine", warmup=0.2)
    assert lr_factor(warm, 0.0, step_fraction=0.05) == pytest.approx(0.25)
    assert lr_factor(warm, 0.6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(ScheduleConfig(kind="constant"), 0.9) == 1.0
    # the runner applies it: the last logged lr of a cosine run is near zero
    result = run(_config({"name": "sgd", "lr": 0.1}, epochs=2), None, data=DIGITS)
    assert result.metrics[-1]["lr"] < 0.1 * 0.01


@pytest.mark.parametrize(
    "change, message",
    [
        ({"optimizer": {"name": "adamax"}}, "unknown optimizer 'adamax'"),
        ({"optimizer": {"name": "sgd", "lr": -0.1}}, "lr must be a finite number >= 0"),
        ({"model": {"name": "transformer"}}, "unknown model"),
        ({"budget": {"epochs": 2, "grad_evals": 10}}, "exactly one"),
        ({"budget": {"epochs": 0}}, "budget.epochs"),
        ({"data": {"name": "digits", "batch_size": 0}}, "batch_size"),
        ({"schedule": {"kind": "linear"}}, "unknown schedule"),
        ({"data": {"name": "digits", "bogus": 1}}, "unknown key"),
    ],
)
def test_bad_configs_are_refused_with_a_clear_message(tmp_path, change, message):
    raw = {"data": {"name": "digits"}, "model": {"name": "mlp"}, "optimizer": {"name": "sgd"}}
    raw.update(change)
    path = tmp_path / "bad.toml"
    import tomli_w

    path.write_text(tomli_w.dumps(raw))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_an_unknown_model_option_is_a_config_error(tmp_path):
    config = _config()
    config.model.kwargs["depth"] = 3
    with pytest.raises(ConfigError, match=r"\[model\] mlp: .*depth"):
        run(config, tmp_path / "out", data=DIGITS)
    assert not (tmp_path / "out").exists()


def test_missing_data_dir_writes_nothing(tmp_path):
    config = config_from_dict(
        {
            "data": {"name": "cifar10", "data_dir": str(tmp_path / "no-cifar")},
            "model": {"name": "resnet18"},
            "optimizer": {"name": "sgd"},
        }
    )
    with pytest.raises(DataNotFoundError, match="no-cifar"):
        run(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_or_to_resume_a_different_config(tmp_path):
    out = tmp_path / "run"
    run(_config(epochs=1), out, data=DIGITS)
    with pytest.raises(FileExistsError, match="--resume"):
        run(_config(epochs=1), out, data=DIGITS)
    with pytest.raises(ConfigError, match="differs"):
        run(_config({"name": "sgd", "lr": 0.2}, epochs=1), out, resume=True, data=DIGITS)


def test_a_diverging_run_stops_and_says_so():
    result = run(_config({"name": "sgd", "lr": 1e38}, epochs=3), None, data=DIGITS)
    assert result.diverged and result.final["diverged"]
    assert len(result.metrics) == 1
    # the run stops at the first step whose loss is not finite, and says which (not the first:
    # it starts from finite weights)
    assert result.final["diverged_step"] == result.final["step"] >= 2
    assert not math.isfinite(result.final["train_loss"])


def test_threads_setting(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    run(_config(epochs=1, threads=1), None, data=DIGITS)
    assert calls == [1]


class Payload:
    """An arbitrary object: unpickling it could run code."""


def test_a_checkpoint_holding_an_arbitrary_object_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    run(_config(epochs=1), out, data=DIGITS)
    payload = torch.load(out / CHECKPOINT, weights_only=True)
    payload["extra"] = Payload()
    torch.save(payload, out / CHECKPOINT)
    with pytest.raises(CheckpointError, match="objects other than tensors and plain Python"):
        run(_config(epochs=1), out, resume=True, data=DIGITS)
    with pytest.raises(CheckpointError, match="refusing to load it"):
        load_checkpoint(out / CHECKPOINT)
    command = ["run", str(out / "config.toml"), "--out", str(out), "--resume", "--no-progress"]
    assert main(command) == 2
    error = capsys.readouterr().err
    assert error.startswith("rollingball run: error: ") and error.count("\n") == 1


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizers_checkpoint_holds_only_tensors_and_plain_values(tmp_path, name):
    config = _config({"name": name}, budget={"grad_evals": 20})
    out = tmp_path / name
    run(config, out, data=DIGITS)
    payload = torch.load(out / CHECKPOINT, weights_only=True)
    assert set(payload) == {"model", "optimizer", "rng_cpu", "rng_cuda", "progress"}
    assert payload["progress"]["finished"] and payload["progress"]["grad_evals"] >= 20
