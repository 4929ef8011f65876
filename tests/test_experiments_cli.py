"""The commands: compare (the main job) on a tiny budget, run, sweep and report."""

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import rollingball
from rollingball.cli import main
from rollingball.experiments.report import SUMMARY_COLUMNS

PNG = b"\x89PNG\r\n\x1a\n"


def _png(path):
    return path.exists() and path.read_bytes()[:8] == PNG and path.stat().st_size > 5000


def test_compare_on_a_tiny_budget_writes_table_csv_report_and_plots(tmp_path, capsys):
    out = tmp_path / "compare"
    args = ["compare", "--data", "digits", "--epochs", "1", "--seeds", "2", "--radii", "0.1,0.5"]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for word in ("optimizer", "sgd", "momentum", "adamw", "sam", "entropy_sgd", "rbo", "±"):
        assert word in printed
    with open(out / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0])[: len(SUMMARY_COLUMNS)] == SUMMARY_COLUMNS
    assert {"momentum", "betas", "radius", "projection_steps", "budget.epochs"} <= set(rows[0])
    # digits' own tuned settings (compare.TASK_SETTINGS), not MNIST-1D's
    assert {(r["optimizer"], r["lr"]) for r in rows} == {
        ("sgd", "1.0"), ("momentum", "0.3"), ("adamw", "0.003"), ("sam", "0.3"),
        ("entropy_sgd", "100.0"), ("rbo", "0.3")
    }  # fmt: skip
    assert "tuned on digits' validation split" in printed
    assert len(rows) == (5 + 2) * 2  # 5 baselines + rbo at 2 radii, 2 seeds each
    by_name = {}
    for row in rows:
        by_name.setdefault((row["optimizer"], row["radius"]), []).append(row)
        assert 0.0 <= float(row["test_accuracy"]) <= 1.0 and float(row["wall_seconds"]) > 0
    assert set(by_name) == {
        ("sgd", ""),
        ("momentum", ""),
        ("adamw", ""),
        ("sam", ""),
        ("entropy_sgd", ""),
        ("rbo", "0.1"),
        ("rbo", "0.5"),
    }
    # one epoch of digits is 15 steps: closure calls are 15 per step-cost
    assert {int(r["grad_evals"]) for r in by_name[("sgd", "")]} == {15}
    assert {int(r["grad_evals"]) for r in by_name[("sam", "")]} == {30}
    assert {int(r["grad_evals"]) for r in by_name[("entropy_sgd", "")]} == {300}
    assert all(int(r["grad_evals"]) > 15 for r in by_name[("rbo", "0.5")])
    assert [r["seed"] for r in by_name[("adamw", "")]] == ["0", "1"]
    for stem in ("accuracy_vs_epoch", "accuracy_vs_grad_evals", "accuracy_vs_wall_time"):
        assert _png(out / f"{stem}.png")
    report = (out / "report.md").read_text()
    assert (
        "| optimizer |" in report and "entropy_sgd" in report and "accuracy_vs_epoch.png" in report
    )
    # a second call reuses the finished runs and gives the same numbers
    assert main([*args, "--out", str(out)]) == 0
    with open(out / "summary.csv") as handle:
        again = list(csv.DictReader(handle))
    key = ["optimizer", "radius", "seed", "test_accuracy", "grad_evals"]
    assert [[r[k] for k in key] for r in again] == [[r[k] for k in key] for r in rows]


def test_compare_with_an_equal_closure_call_budget(tmp_path, capsys):
    out = tmp_path / "budget"
    args = [
        "compare",
        "--data",
        "digits",
        "--seeds",
        "1",
        "--budget",
        "grad_evals",
        "--grad-evals",
        "60",
    ]
    assert (
        main(
            [*args, "--optimizers", "sgd,sam,entropy_sgd,rbo", "--radii", "0.3", "--out", str(out)]
        )
        == 0
    )
    with open(out / "summary.csv") as handle:
        rows = {r["optimizer"]: r for r in csv.DictReader(handle)}
    assert int(rows["sgd"]["grad_evals"]) == 60 and float(rows["sgd"]["epochs"]) == pytest.approx(
        4.0
    )
    assert int(rows["sam"]["grad_evals"]) == 60 and float(rows["sam"]["epochs"]) == pytest.approx(
        2.0
    )
    assert int(rows["entropy_sgd"]["grad_evals"]) == 60
    assert 60 <= int(rows["rbo"]["grad_evals"]) <= 80
    assert "60 closure calls each" in capsys.readouterr().out


def test_compare_refuses_bad_options(tmp_path, capsys):
    assert (
        main(
            [
                "compare",
                "--optimizers",
                "sgd,lion",
                "--data",
                "digits",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "unknown optimizer 'lion'" in capsys.readouterr().err
    assert (
        main(
            [
                "compare",
                "--data",
                "cifar10",
                "--data-dir",
                str(tmp_path / "none"),
                "--out",
                str(tmp_path / "y"),
            ]
        )
        == 2
    )
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


CONFIG = """
seed = 3
[data]
name = "digits"
batch_size = 200
[model]
name = "mlp"
hidden = [16]
activation = "tanh"
[optimizer]
name = "rbo"
lr = 0.5
radius = 0.2
[budget]
epochs = 2
"""


def test_run_sweep_and_report(tmp_path, capsys):
    config = tmp_path / "rbo.toml"
    config.write_text(CONFIG)
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "done: test accuracy" in capsys.readouterr().out
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["epoch"] for r in rows] == [1, 2]
    # running into the same directory again without --resume is refused
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (
        main(["run", str(config), "--out", str(tmp_path / "run"), "--resume", "--no-progress"]) == 0
    )

    assert (
        main(
            [
                "sweep",
                str(config),
                "--radius",
                "0,0.5",
                "--lr",
                "0.1,1",
                "--out",
                str(tmp_path / "sweep"),
            ]
        )
        == 0
    )
    with open(tmp_path / "sweep" / "sweep.csv") as handle:
        grid = list(csv.DictReader(handle))
    assert [(r["radius"], r["lr"]) for r in grid] == [
        ("0.0", "0.1"),
        ("0.0", "1.0"),
        ("0.5", "0.1"),
        ("0.5", "1.0"),
    ]
    # radius 0 is SGD: one closure call per step (2 epochs of 8 batches)
    assert int(grid[0]["grad_evals"]) == 16 and int(grid[2]["grad_evals"]) > 16
    assert _png(tmp_path / "sweep" / "heatmap.png")

    assert (
        main(
            [
                "report",
                str(tmp_path / "run"),
                str(tmp_path / "sweep"),
                "--out",
                str(tmp_path / "report"),
            ]
        )
        == 0
    )
    with open(tmp_path / "report" / "summary.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 5
    assert _png(tmp_path / "report" / "accuracy_vs_grad_evals.png")
    assert main(["report", str(tmp_path / "empty-does-not-exist")]) == 2


def test_run_reports_bad_configs(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text(CONFIG.replace('name = "rbo"', 'name = "rbo"\nbogus = 1'))
    assert main(["run", str(config), "--out", str(tmp_path / "out")]) == 2
    assert "no hyperparameter(s) bogus" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["sweep", str(config).replace("bad", "missing"), "--lr", "0.1"]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_compare_hyperparameter_file(tmp_path, capsys):
    hparams = tmp_path / "h.toml"
    hparams.write_text('[sgd]\nlr = 0.3\n[rbo]\nlr = 0.2\n[rbo.lr_by_radius]\n"0.5" = 0.7\n')
    out = tmp_path / "c"
    args = [
        "compare",
        "--data",
        "digits",
        "--epochs",
        "1",
        "--seeds",
        "1",
        "--optimizers",
        "sgd,rbo",
    ]
    assert main([*args, "--radii", "0.5,0.2", "--hparams", str(hparams), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "`sgd`: lr = 0.3" in report
    assert "`rbo`: lr = 0.7, radius = 0.5" in report and "`rbo`: lr = 0.2, radius = 0.2" in report
    hparams.write_text("[lion]\nlr = 1\n")
    assert main([*args, "--hparams", str(hparams), "--out", str(tmp_path / "d")]) == 2
    assert "[lion] is not an optimizer" in capsys.readouterr().err
    hparams.write_text("[sgd]\nlr = -1\n")
    assert main([*args, "--hparams", str(hparams), "--out", str(tmp_path / "d")]) == 2
    assert "lr must be" in capsys.readouterr().err


def test_compare_in_parallel_processes_gives_the_same_numbers(tmp_path):
    args = ["compare", "--data", "digits", "--epochs", "1", "--seeds", "1"]
    args += ["--optimizers", "sgd,rbo", "--radii", "0.3"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--jobs", "2", "--out", str(tmp_path / "two")]) == 0

    def rows(name):
        with open(tmp_path / name / "summary.csv") as handle:
            keys = ("optimizer", "radius", "test_accuracy", "train_loss", "grad_evals")
            return [tuple(r[k] for k in keys) for r in csv.DictReader(handle)]

    assert rows("one") == rows("two") and len(rows("one")) == 2


SGD_CONFIG = """
seed = 0
[data]
name = "digits"
batch_size = 200
[model]
name = "mlp"
hidden = [16]
activation = "tanh"
[optimizer]
name = "sgd"
[budget]
epochs = 3
"""


def test_sweep_epochs_override_and_a_line_per_cell(tmp_path, capsys):
    config = tmp_path / "sgd.toml"
    config.write_text(SGD_CONFIG)
    out = tmp_path / "sweep"
    args = ["sweep", str(config), "--lr", "0.1,1", "--seeds", "2", "--epochs", "1"]
    assert main([*args, "--out", str(out)]) == 0
    with open(out / "sweep.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {int(r["grad_evals"]) for r in rows} == {8}  # 1 epoch of 8 batches, not 3
    lines = [line for line in capsys.readouterr().out.splitlines() if "closure calls" in line]
    assert len(lines) == 2  # one per cell (learning rate), after both seeds
    for line, lr in zip(lines, ("0.1", "1.0"), strict=True):
        scores = [100 * float(r["test_accuracy"]) for r in rows if r["lr"] == lr]
        mean, std = statistics.fmean(scores), statistics.stdev(scores)
        assert line.startswith(f"sgd lr={float(lr):g}: test accuracy {mean:.2f}% ± {std:.2f}")
        assert line.endswith("8 closure calls, " + line.split("closure calls, ")[1])
        assert "(2 seed(s))" in line
    assert main([*args, "--epochs", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "budget.epochs" in capsys.readouterr().err


def test_report_keeps_learning_rates_apart_and_averages_seeds(tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    config = tmp_path / "sgd.toml"
    config.write_text(SGD_CONFIG)
    sweep_dir = tmp_path / "sweep"
    args = ["sweep", str(config), "--lr", "0.1,1", "--seeds", "2", "--epochs", "1"]
    assert main([*args, "--out", str(sweep_dir)]) == 0
    with open(sweep_dir / "sweep.csv") as handle:
        runs = list(csv.DictReader(handle))
    capsys.readouterr()
    legends = []
    save = Figure.savefig

    def savefig(figure, *a, **k):
        legends.append([t.get_text() for t in figure.axes[0].get_legend().get_texts()])
        return save(figure, *a, **k)

    monkeypatch.setattr(Figure, "savefig", savefig)
    assert main(["report", str(sweep_dir), "--out", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    with open(tmp_path / "report" / "summary.csv") as handle:
        summary = list(csv.DictReader(handle))
    assert tuple(summary[0])[: len(SUMMARY_COLUMNS)] == SUMMARY_COLUMNS
    assert {"budget.epochs", "data.batch_size", "model.hidden", "weight_decay"} <= set(summary[0])
    assert sorted((r["lr"], r["seed"]) for r in summary) == [
        ("0.1", "0"), ("0.1", "1"), ("1.0", "0"), ("1.0", "1")
    ]  # fmt: skip
    for lr in ("0.1", "1.0"):  # each learning rate is its own group, its two seeds averaged
        scores = [100 * float(r["test_accuracy"]) for r in runs if r["lr"] == lr]
        mean, std = statistics.fmean(scores), statistics.stdev(scores)
        assert f"lr={float(lr):g}" in printed and f"{mean:.2f} ± {std:.2f}" in printed
    assert legends == [["sgd (lr=0.1) (n=2)", "sgd (lr=1) (n=2)"]] * 3
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| optimizer | radius | settings |" in report and "| sgd |  | lr=0.1 |" in report


def test_every_command_error_is_one_line(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (broken / "config.toml").write_text('[data]\nname = "nope"\n')
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    missing = str(tmp_path / "missing.toml")
    tiny = ["--data", "digits", "--optimizers", "sgd", "--epochs", "1", "--seeds", "1"]
    cases = [
        (["run", missing, "--out", str(tmp_path / "r")], "config file not found"),
        (["compare", *tiny, "--hparams", missing], "hyperparameter file not found"),
        (["compare", *tiny, "--out", str(a_file)], "a_file"),  # not a directory
        (["sweep", missing, "--lr", "0.1"], "config file not found"),
        (["report", str(broken)], "unknown dataset 'nope'"),
        (["report", str(tmp_path / "nothing")], "no such directory"),
        (["report", str(tmp_path / "r")], "no such directory"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"rollingball {argv[0]}: error: ") and err.count("\n") == 1, err
        assert message in err, (argv, err)


def test_help_lists_choices_and_defaults(capsys):
    expected = {
        "compare": ["--model {cnn1d,cnn2d,mlp,", "--data {mnist1d,digits,", "(default: 30)",
                    "from: sgd, momentum, adamw, sam,", "(default: 0.1,0.3,1)"],
        "sweep": ["--epochs EPOCHS epochs per run (replaces the config's budget)",
                  "(default: runs/sweep)"],
        "run": ["--resume continue the run saved in --out"],
        "report": ["(default: first DIR)"],
    }  # fmt: skip
    for command, phrases in expected.items():
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for phrase in phrases:
            assert phrase in text, (command, phrase)


@pytest.mark.parametrize(
    ("hidden", "argv", "extra"),
    [
        ("rich", ["compare", "--epochs", "1", "--seeds", "1", "--out", "out"], "experiments"),
        ("torch", ["report", "out"], "experiments"),  # every command module imports torch
    ],
)
def test_a_command_whose_extra_is_missing_says_which_extra_in_one_line(
    tmp_path, hidden, argv, extra
):
    # the package is hidden in a fresh interpreter, as in a venv with only some extras
    script = (
        f"import sys; sys.modules[{hidden!r}] = None\n"
        f"from rollingball.cli import main; sys.exit(main({argv!r}))\n"
    )
    source = str(Path(rollingball.__file__).parents[1])  # this checkout's rollingball
    env = {**os.environ, "PYTHONPATH": source}
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"the package {hidden!r}, which is not installed" in done.stderr
    assert f"pip install 'rollingball[{extra}]'" in done.stderr


def test_a_diverged_run_is_marked_in_table_csv_report_and_plots(tmp_path, capsys, monkeypatch):
    import matplotlib.figure

    legends = []
    save = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        legends.extend(t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts())
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    hparams = tmp_path / "h.toml"
    hparams.write_text("[sgd]\nlr = 1e38\n[momentum]\nlr = 0.1\n")
    out = tmp_path / "c"
    args = ["compare", "--data", "digits", "--epochs", "2", "--seeds", "2"]
    args += ["--optimizers", "sgd,momentum", "--hparams", str(hparams), "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    with open(out / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    steps = {r["optimizer"]: r["diverged_step"] for r in rows}
    assert steps["momentum"] == "" and int(steps["sgd"]) >= 2  # the first step's loss is finite
    step = steps["sgd"]
    assert f"diverged at step {step}" in printed and "10.00 ± 0.00" not in printed
    report = (out / "report.md").read_text()
    assert f"| sgd |  | diverged at step {step} |" in report
    assert sum(f"diverged at step {step}" in text for text in legends) == 3  # one per plot
    assert not any("diverged" in text for text in legends if text.startswith("momentum"))


def test_compare_on_fashion_mnist_uses_its_own_settings(tmp_path, capsys, monkeypatch):
    import gzip
    import struct

    import numpy as np

    from rollingball.experiments.data import SYSTEM_DIRS

    folder = tmp_path / "fmnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 300), ("t10k", 50)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (n, 28, 28))),
                            ("labels-idx1", np.arange(n) % 10)):  # fmt: skip
            array = np.asarray(array, dtype=np.uint8)
            header = struct.pack(">I", 0x0800 | array.ndim)
            header += struct.pack(f">{array.ndim}I", *array.shape)
            with gzip.open(folder / f"{split}-{kind}-ubyte.gz", "wb") as handle:
                handle.write(header + array.tobytes())
    monkeypatch.setitem(SYSTEM_DIRS, "fashion_mnist", folder)  # found without flags
    monkeypatch.delenv("ROLLINGBALL_DATA", raising=False)
    out = tmp_path / "c"
    args = ["compare", "--data", "fashion_mnist", "--epochs", "1", "--seeds", "1"]
    assert main([*args, "--optimizers", "sgd,rbo", "--radii", "0.1", "--out", str(out)]) == 0
    assert "tuned on Fashion-MNIST's validation split" in capsys.readouterr().out
    with open(out / "summary.csv") as handle:
        rows = {r["optimizer"]: r for r in csv.DictReader(handle)}
    assert rows["sgd"]["lr"] == "0.3" and rows["rbo"]["lr"] == "0.3"
    assert rows["sgd"]["data.batch_size"] == "128" and int(rows["sgd"]["grad_evals"]) == 3
    # a model without tuned settings runs at the registry defaults, and says so
    out = tmp_path / "d"
    args += ["--model", "small_cnn", "--optimizers", "sgd", "--out", str(out)]
    assert main(args) == 0
    assert "none tuned for small_cnn on fashion_mnist" in capsys.readouterr().out
