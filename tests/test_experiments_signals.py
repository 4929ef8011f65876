"""Real signals on a `rollingball run` process: Ctrl-C saves and exits; kill -9 loses nothing."""

import os
import signal
import subprocess
import sys
import time

import pytest

from rollingball.experiments.config import load_config
from rollingball.experiments.runner import read_metrics, run

CONFIG = """
seed = 1
threads = 1
[data]
name = "digits"
batch_size = 20
[model]
name = "mlp"
hidden = [32]
activation = "tanh"
[optimizer]
name = "rbo"
lr = 0.3
radius = 0.2
momentum = 0.5
[schedule]
kind = "cosine"
[budget]
epochs = 6
"""


def _without_time(rows):
    return [{k: v for k, v in row.items() if k != "wall_seconds"} for row in rows]


def _start(config, out):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable,
        "-m",
        "rollingball",
        "run",
        str(config),
        "--out",
        str(out),
        "--no-progress",
    ]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def _wait_for_first_epoch(process, out, timeout=120):
    deadline = time.monotonic() + timeout
    while not (out / "metrics.jsonl").exists():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "the run wrote no metrics in time"
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["ctrl-c", "kill -9"])
def test_signal_then_resume_gives_the_uninterrupted_metrics(tmp_path, how):
    config = tmp_path / "run.toml"
    config.write_text(CONFIG)
    reference = run(load_config(config), None)
    out = tmp_path / "out"
    process = _start(config, out)
    _wait_for_first_epoch(process, out)
    process.send_signal(signal.SIGINT if how == "ctrl-c" else signal.SIGKILL)
    output, _ = process.communicate(timeout=120)
    if how == "ctrl-c":
        assert process.returncode == 130, output
        assert "interrupted; saved" in output and "--resume" in output
    else:
        assert process.returncode == -signal.SIGKILL
    saved = read_metrics(out)
    assert 1 <= len(saved) < 6  # stopped early, and what is on disk parses
    files = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert files == ["checkpoint.pt", "config.toml", "metrics.jsonl"]  # a metrics file has
    # its checkpoint; a kill -9 inside a write may leave that write's temporary file
    resumed = run(load_config(config), out, resume=True)
    assert _without_time(resumed.metrics) == _without_time(reference.metrics)
    assert sorted(p.name for p in out.iterdir()) == files  # the temporary is gone


def test_resume_removes_the_temporary_files_a_kill_left(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(CONFIG.replace("epochs = 6", "epochs = 1"))
    out = tmp_path / "out"
    run(load_config(config), out)
    stale = out / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    run(load_config(config), out, resume=True)
    assert not stale.exists()
