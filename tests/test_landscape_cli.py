"""`rollingball iron` and `rollingball landscape` on small budgets: files, sizes, rows."""

from __future__ import annotations

import csv
import json
import math
import struct
from pathlib import Path

import pytest
import torch

from rollingball.cli import main


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000  # a drawn figure, not an empty canvas
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_iron_1d(tmp_path, capsys):
    out = tmp_path / "iron"
    code = main(["iron", "wrinkled_quadratic", "--radii", "0.1,0.5", "--steps", "6",
                 "--points", "401", "--lr", "0.05", "--out", str(out)])  # fmt: skip
    assert code == 0
    assert png_size(out / "ironed.png") == (900, 480)  # 9 × 4.8 in at 100 dpi
    assert png_size(out / "trajectories.png") == (1040, 660)  # two radii: landscape over zoom
    rows = read_rows(out / "trajectories.csv")
    assert [(r["optimizer"], float(r["radius"])) for r in rows] == [
        ("GD", 0.0), ("RBO", 0.1), ("RBO", 0.5)
    ]  # fmt: skip
    assert set(rows[0]) == {"optimizer", "radius", "start", "lr", "steps", "end_0", "final_loss",
                            "closure_calls", "unconverged_steps", "longest_step"}  # fmt: skip
    assert int(rows[0]["unconverged_steps"]) == 0
    assert int(rows[0]["closure_calls"]) == 6
    assert all(int(r["closure_calls"]) >= 6 for r in rows[1:])
    assert float(rows[0]["final_loss"]) < 1.8**2 / 2 + 0.1 * math.sin(10 * 1.8)  # f(start)
    assert "closure calls" in capsys.readouterr().out


def test_iron_2d_two_starts(tmp_path):
    out = tmp_path / "wells"
    code = main(["iron", "gaussian_wells", "--dim", "2", "--radii", "1.5", "--start", "2,0",
                 "--start", "2,0.1", "--steps", "3", "--points", "41", "--lr", "0.01",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    assert png_size(out / "ironed.png") == (1000, 420)  # f and one ironed map
    assert png_size(out / "trajectories.png") == (520, 480)  # one radius, one panel
    rows = read_rows(out / "trajectories.csv")
    assert [(r["optimizer"], r["start"]) for r in rows] == [
        ("GD", "2,0"), ("RBO", "2,0"), ("GD", "2,0.1"), ("RBO", "2,0.1")
    ]  # fmt: skip
    assert {"end_0", "end_1"} <= set(rows[0])


def test_iron_refuses_negative_radii(tmp_path):
    with pytest.raises(SystemExit):  # argparse: usage and one error line
        main(["iron", "ackley", "--steps", "1", "--out", str(tmp_path), "--radii", "0.1,-1"])


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"rollingball {command}: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["ackley", "--domain=2,1"], "--domain needs LO,HI with LO < HI"),
        (["ackley", "--points", "2"], "--points needs at least 3"),
        (["ackley", "--start", "1,2,3"], "--start needs 1 or 1 values"),
        (["ackley", "--points", "11", "--steps", "-1"], "--steps must be >= 0"),
        (["ackley", "--lr", "-1"], "Invalid learning rate"),
        (["rosenbrock", "--dim", "1"], "dim >= 2"),
    ],
)
def test_iron_errors_are_one_line(flags, message, tmp_path, capsys):
    assert main(["iron", "--steps", "1", "--out", str(tmp_path), *flags]) == 2
    assert message in _one_line_error(capsys, "iron")


def test_iron_warns_when_a_radius_is_below_the_grid_spacing(tmp_path, capsys):
    # 101 points over ackley's box [-4, 4]: spacing 0.08; at 201 points 0.04
    args = ["iron", "ackley", "--steps", "1", "--out", str(tmp_path)]
    assert main([*args, "--points", "101", "--radii", "0.05,0.1"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        "rollingball iron: warning: radius 0.05 is below the grid spacing 0.08, so ironing at "
        "it changes nothing; use more --points or a larger radius"
    ]
    assert main([*args, "--points", "201", "--radii", "0.05,0.1"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_help_lists_choices_and_defaults(capsys):
    for command in ("iron", "landscape"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        if command == "iron":
            assert "{ackley,gaussian_wells," in text and "(default: 0.01,0.1,1)" in text
            assert "--anderson-memory ANDERSON_MEMORY m of the Anderson solver (default: 5)" in text
        else:
            assert "--model {cnn1d,cnn2d,mlp," in text and "(default: mlp)" in text
            assert "--data {mnist1d,digits," in text and "(default: 0.05,0.2)" in text


def test_landscape_refuses_an_unknown_model_without_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["landscape", "--state-dict", str(tmp_path / "m.pt"), "--model", "foo"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'foo'" in err and "Traceback" not in err


class Payload:
    """An arbitrary object: unpickling it could run code."""


def test_landscape_errors_are_one_line(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from rollingball.experiments.data import load_data
    from rollingball.experiments.models import build_model

    bundle = load_data("digits")
    path = tmp_path / "model.pt"
    torch.save(build_model("mlp", bundle.input_shape, bundle.num_classes, hidden=[8]).state_dict(),
               path)  # fmt: skip
    args = ["landscape", "--points", "3", "--no-progress", "--out", str(tmp_path / "out")]
    assert main([*args, "--state-dict", str(tmp_path / "missing.pt")]) == 2
    assert "No such file" in _one_line_error(capsys, "landscape")
    assert main([*args, "--state-dict", str(path), "--hidden", "16"]) == 2
    assert "does not fit this model (check --model and --hidden)" in _one_line_error(
        capsys, "landscape"
    )
    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    assert main([*args, "--state-dict", str(tmp_path / "evil.pt")]) == 2
    assert "refusing to load it" in _one_line_error(capsys, "landscape")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("checkpoint", [False, True])
def test_landscape_slice_2d(tmp_path, checkpoint):
    pytest.importorskip("sklearn")  # digits come with the experiments extra
    from rollingball.experiments.data import load_data
    from rollingball.experiments.models import build_model

    bundle = load_data("digits")
    model = build_model("mlp", bundle.input_shape, bundle.num_classes, hidden=[16])
    path = tmp_path / "model.pt"
    torch.save({"model": model.state_dict()} if checkpoint else model.state_dict(), path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "slice"
    code = main(["landscape", "--state-dict", str(path), "--model", "mlp", "--hidden", "16",
                 "--data", "digits", "--max-samples", "200", "--points", "5", "--radii", "0.1,0.3",
                 "--no-progress", "--out", str(out)])  # fmt: skip
    assert code == 0
    assert png_size(out / "slice.png") == (1460, 420)  # f and two ironed maps
    rows = read_rows(out / "slice.csv")
    assert len(rows) == 25
    assert list(rows[0]) == ["alpha", "beta", "loss", "ironed_0.1", "ironed_0.3"]
    assert all(float(r["ironed_0.3"]) >= float(r["loss"]) for r in rows)
    summary = json.loads((out / "slice.json").read_text())
    assert summary["samples"] == 200
    assert summary["mode"] == "eval"
    centre = next(r for r in rows if float(r["alpha"]) == 0 and float(r["beta"]) == 0)
    assert float(centre["loss"]) == pytest.approx(summary["loss_at_trained"], rel=1e-6)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_landscape_slice_1d(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from rollingball.experiments.data import load_data
    from rollingball.experiments.models import build_model

    bundle = load_data("digits")
    model = build_model("mlp", bundle.input_shape, bundle.num_classes, hidden=[8])
    torch.save(model.state_dict(), tmp_path / "model.pt")
    out = tmp_path / "slice1d"
    code = main(["landscape", "--state-dict", str(tmp_path / "model.pt"), "--hidden", "8",
                 "--split", "test", "--max-samples", "100", "--dim", "1", "--points", "11",
                 "--radii", "0.2", "--train-mode", "--out", str(out)])  # fmt: skip
    assert code == 0
    assert png_size(out / "slice.png") == (900, 480)
    rows = read_rows(out / "slice.csv")
    assert list(rows[0]) == ["alpha", "loss", "ironed_0.2"]
    assert len(rows) == 11
    summary = json.loads((out / "slice.json").read_text())
    assert summary["mode"] == "train" and summary["split"] == "test"
    assert float(rows[5]["loss"]) == pytest.approx(summary["loss_at_trained"], rel=1e-6)
    assert "warning" not in capsys.readouterr().err  # radius 0.2 = the spacing 2/10
    args = ["landscape", "--state-dict", str(tmp_path / "model.pt"), "--hidden", "8",
            "--dim", "1", "--max-samples", "10", "--points", "11", "--no-progress",
            "--out", str(out)]  # fmt: skip
    assert main([*args, "--radii", "0.1,0.2"]) == 0
    assert capsys.readouterr().err == (
        "rollingball landscape: warning: radius 0.1 is below the grid spacing 0.2, so ironing "
        "at it changes nothing; use more --points or a larger radius\n"
    )
