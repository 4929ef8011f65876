"""``rollingball study`` end to end on a tiny Fashion-MNIST made of IDX files, shrunk scales."""

import csv
import gzip
import json
import struct

import numpy as np
import pytest

from rollingball.cli import main
from rollingball.experiments import study as st
from rollingball.experiments.data import SYSTEM_DIRS
from rollingball.experiments.runner import read_metrics


def _idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.tobytes())


@pytest.fixture
def tiny_fmnist(tmp_path, monkeypatch):
    """240 training and 60 test images whose class is a bright square's position."""
    folder = tmp_path / "fmnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 240), ("t10k", 60)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c : 2 * c + 6, 4:10] = 250
        _idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        _idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    monkeypatch.setitem(SYSTEM_DIRS, "fashion_mnist", folder)
    monkeypatch.delenv("ROLLINGBALL_DATA", raising=False)
    # one epoch everywhere, 2 seeds, the paper's mode at its full K = 100 (one step per epoch)
    scale = st.Scale(1, 0, 2, 1, 1, 2, 0, 1, True, 5, 3, 2)
    monkeypatch.setitem(st.SCALES, ("mlp", True), scale)
    return scale


def test_the_quick_study_runs_every_part_and_resumes(tiny_fmnist, tmp_path, capsys):
    out = tmp_path / "study"
    args = ["study", "--quick", "--models", "mlp", "--out", str(out)]
    assert main(args) == 0
    text = (out / "study.md").read_text()
    for title in ("Tuning: mlp", "Fair comparison: mlp", "The paper's protocol",
                  "Noisy labels", "Sharpness"):  # fmt: skip
        assert title in text
    assert text.count("QUICK VARIANT") >= 5 and "Command: `rollingball study --quick" in text
    state = json.loads((out / "study.json").read_text())["mlp"]
    # trials: 2 learning rates per optimizer (more where the best sat on an edge), 1 more ρ
    # for SAM, USAM and RBO; RBO with momentum gets 2 learning rates at RBO's chosen radius
    base = {"sgd": 2, "momentum": 2, "adamw": 2, "sam": 3, "usam": 3, "rbo": 3, "rbo_momentum": 2}
    assert state["trials"].keys() == base.keys()
    assert all(state["trials"][k] >= n for k, n in base.items())
    assert all(state["noisy_trials"][k] >= base[k] for k in ("sgd", "momentum", "sam", "usam"))
    best = state["best"]
    for opt, hp in best.items():  # the chosen rate is inside the range tried, or on the grid's end
        tried = sorted(
            float(p.name.split("_")[0][2:]) for p in (out / "tune" / "mlp" / opt).iterdir()
        )
        grid = st.LR_GRID[opt]
        assert (
            tried[0] < hp["lr"] < tried[-1]
            or hp["lr"] in (grid[0], grid[-1])
            or (
                opt in ("sam", "usam", "rbo")  # the ρ stage reruns the chosen rate
            )
        )
    assert best["rbo_momentum"]["radius"] == best["rbo"]["radius"]
    # RBO with momentum is tuned once, at RBO's chosen radius
    radius = f"radius{best['rbo']['radius']:g}"
    assert all(p.name.endswith(radius) for p in (out / "tune" / "mlp" / "rbo_momentum").iterdir())
    assert (out / "fair" / "mlp" / "epochs" / "accuracy_vs_epoch.png").exists()
    # the 200 training images outside the 40-image validation split, batches of 128: 2 steps
    fair = out / "fair" / "mlp"
    labels = {p.name for p in (fair / "epochs").iterdir() if p.is_dir()}
    assert labels == {"sgd", "momentum", "adamw", "sam", "usam", "rbo_best_radius",
                      "rbo_best_radius_k1", "rbo_best_radius_momentum"}  # fmt: skip
    for seed in (0, 1):
        calls = read_metrics(fair / "calls" / "sgd" / f"seed{seed}")[-1]["grad_evals"]
        assert calls == 3 * 1 * 2  # three closure calls per step of one epoch
        assert read_metrics(fair / "epochs" / "sam" / f"seed{seed}")[-1]["grad_evals"] == 4
        k1 = read_metrics(fair / "epochs" / "rbo_best_radius_k1" / f"seed{seed}")[-1]
        assert k1["grad_evals"] <= 2 * 2
    assert (fair / "wall").is_dir() and "equal wall time" in text
    with open(fair / "epochs" / "summary.csv") as handle:
        assert {r["label"] for r in csv.DictReader(handle)} >= {"sgd", "adamw"}
    # the paper's mode (gd, K = 100): 100 closure calls per step; 240 images at batch 256: 1 step
    paper = read_metrics(out / "paper" / "mlp" / "rbo_paper_mode" / "seed0")[-1]
    assert paper["grad_evals"] == 100 and paper["step"] == 1
    sharp = json.loads((fair / "epochs" / "sgd" / "seed0" / "sharpness.json").read_text())
    assert sharp["lambda_max"] > 0 and sharp["subset"] == 200 and sharp["trace"] != 0
    assert (out / "slice_mlp.png").read_bytes()[:4] == b"\x89PNG"
    # the noisy arm trains on noisy labels and is judged on clean ones
    noisy = read_metrics(out / "noisy" / "mlp" / "epochs" / "sgd" / "seed0")
    config = (out / "noisy" / "mlp" / "epochs" / "sgd" / "seed0" / "config.toml").read_text()
    assert noisy and "label_noise = 0.4" in config and "noisy_validation = true" in config
    tuned = out / "noisy_tune" / "mlp" / "sgd"
    assert all(
        "noisy_validation = true" in (t / "config.toml").read_text() for t in tuned.glob("*")
    )
    # a rerun finds everything finished and trains nothing
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.jsonl")}
    assert main(args) == 0
    assert "run(s) to do" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("metrics.jsonl")} == before
    # a call that runs one part still reports every part found on disk
    assert main([*args, "--parts", "paper"]) == 0
    again = (out / "study.md").read_text()
    for title in ("Tuning: mlp", "Fair comparison: mlp", "Noisy labels", "Sharpness"):
        assert title in again


def _trial(tmp_path, optimizer, lr, acc, diverged=False):
    path = tmp_path / f"{optimizer}{lr}"
    path.mkdir()
    row = {"val_accuracy": acc, **({"diverged": True} if diverged else {})}
    (path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    return st.Trial(optimizer, "lr", {"lr": lr}, path, None)


def test_a_best_rate_on_the_edge_widens_the_grid_by_its_next_value(tmp_path):
    grid = st.LR_GRID["sgd"]  # 0.01 ... 10 in half-decades
    top = [_trial(tmp_path, "sgd", lr, acc) for lr, acc in ((0.1, 0.7), (0.3, 0.8), (1.0, 0.9))]
    assert st.widen(top) == {"sgd": grid[grid.index(1.0) + 1]}
    bottom = [_trial(tmp_path, "adamw", lr, acc) for lr, acc in ((1e-3, 0.9), (3e-3, 0.8))]
    assert st.widen(bottom) == {"adamw": 3e-4}
    inside = [
        _trial(tmp_path, "momentum", lr, acc) for lr, acc in ((0.01, 0.7), (0.03, 0.9), (0.1, 0.8))
    ]
    assert st.widen(inside) == {}
    # a diverged larger rate closes the edge; the grid's own end closes it too
    closed = [
        _trial(tmp_path, "usam", 0.1, 0.8),
        _trial(tmp_path, "usam", 0.3, 0.9),
        _trial(tmp_path, "usam", 1.0, 0.1, diverged=True),
    ]
    assert st.widen(closed) == {}
    assert st.widen([_trial(tmp_path, "rbo_momentum", 0.3, 0.9)]) == {"rbo_momentum": 0.1}
    assert st.widen([_trial(tmp_path, "sgd", 10.0, 0.9), _trial(tmp_path, "sgd", 3.0, 0.8)]) == {}


def test_an_interrupted_run_stops_the_study(monkeypatch, tmp_path):
    from rollingball.experiments.runner import RunResult

    monkeypatch.setattr(st, "run", lambda *a, **k: RunResult(tmp_path, [], interrupted=True))
    monkeypatch.setattr(st, "config_from_dict", lambda raw: raw)
    with pytest.raises(KeyboardInterrupt, match="rerun to continue"):
        st._run_one({}, str(tmp_path))


def test_choice_ignores_diverged_trials_and_prefers_the_smaller_rate(tmp_path):
    trials = []
    for lr, acc, diverged in ((0.1, 0.8, False), (0.3, 0.8, False), (1.0, 0.9, True)):
        path = tmp_path / f"lr{lr}"
        path.mkdir()
        row = {"val_accuracy": acc, **({"diverged": True} if diverged else {})}
        (path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
        trials.append(st.Trial("sgd", "lr", {"lr": lr}, path, None))
    assert st.choose(trials) == {"sgd": {"lr": 0.1}}


def test_results_table_marks_divergence_and_noise():
    rows = {
        "sgd": [{"test_accuracy": a, "train_accuracy": 0.9, "train_loss": 0.3, "test_loss": 0.4,
                 "grad_evals": 10, "wall_seconds": 1.0, "step": 5} for a in (0.80, 0.81, 0.79)],
        "rbo_best_radius": [{"test_accuracy": a, "train_accuracy": 0.9, "train_loss": 0.3,
                             "test_loss": 0.4, "grad_evals": 30, "wall_seconds": 3.0, "step": 5}
                            for a in (0.85, 0.86, 0.84)],
        "sam": [{"test_accuracy": 0.1, "train_accuracy": 0.1, "train_loss": float("nan"),
                 "test_loss": float("nan"), "grad_evals": 4, "wall_seconds": 0.1, "step": 2,
                 "diverged": True, "diverged_step": 2}] * 3,
    }  # fmt: skip
    table = st.results_table(rows)
    assert "| sam |  | 3 | diverged at step 2 |" in table and "10.00 ±" not in table
    assert "| rbo_best_radius |  | 3 | 85.00 ± 1.00 |" in table
    assert "yes (+5.00 ± 1.63)" in table  # 2 standard errors of the difference: 2·√(2/3)%


def test_unfinished_runs_are_called_partial(tmp_path):
    assert st._partial([(tmp_path / "never", None)]) == [
        "**Partial: 0 of 1 runs finished; the table shows those.**",
        "",
    ]
    assert st._partial([]) == []
