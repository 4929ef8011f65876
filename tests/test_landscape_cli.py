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
    assert png_size(out / "trajectories.png") == (1040, 480)  # two panels
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


@pytest.mark.parametrize(
    "flags", [["--radii", "0.1,-1"], ["--domain=2,1"], ["--points", "2"], ["--start", "1,2,3"]]
)
def test_iron_refuses_bad_input(flags, tmp_path):
    with pytest.raises(SystemExit):
        main(["iron", "ackley", "--steps", "1", "--out", str(tmp_path), *flags])


def test_iron_refuses_one_dimensional_rosenbrock(tmp_path):
    with pytest.raises(SystemExit, match="dim >= 2"):
        main(["iron", "rosenbrock", "--dim", "1", "--out", str(tmp_path)])


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


def test_landscape_slice_1d(tmp_path):
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
