"""Every claims experiment at smoke-test size: it runs, writes its figure and its numbers."""

import json
from pathlib import Path

import pytest

from rollingball.cli import build_parser
from rollingball.experiments.claims import EXPERIMENTS, run, run_many
from rollingball.experiments.config import load_config

STEMS = {
    "usam": "h1_usam",
    "edge_of_stability": "h2_edge_of_stability",
    "hidden_learning_rate": "h3_hidden_learning_rate",
    "large_learning_rates": "h4_large_learning_rates",
    "ironing": "ironing",
    "sharp_flat": "sharp_flat",
    "training": "training",
    "regimes": "regimes",
}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_at_tiny_size(name, tmp_path):
    report = run(name, tmp_path, tiny=True)
    assert report.startswith(f"## {name} (") and "|---|" in report
    assert (tmp_path / f"{STEMS[name]}.png").stat().st_size > 1000
    results = json.loads((tmp_path / f"{STEMS[name]}.json").read_text())
    if name == "hidden_learning_rate":  # a tiny ball in paper mode: SGD at η[1 − (1 − γs²)^K]
        for task in results["one_step"].values():
            assert task["start"]["relative_distance"][0] < 1e-3
            assert 0.09 < task["start"]["effective_rate"] < 0.11
    if name == "large_learning_rates":  # the truncated projection takes about a tenth of the step
        truncated = results["runs"]["RBO truncated (γ = 1e-3, K = 100)"]
        assert all(0.05 < run["first_step_ratio"] < 0.15 for run in truncated)
    if name == "ironing":  # gradient descent stays in the first wrinkle
        assert results["gd"] > 1.8
    if name == "usam":  # with momentum the derived law explains RBO, USAM's term on g does not
        for task in results["momentum"]["tasks"].values():
            for entry in task.values():
                assert entry["first_order"][0] < 0.5 * entry["usam_shared"][0]


def test_experiments_in_two_processes(tmp_path):
    report = run_many(("ironing", "usam"), tmp_path, tiny=True, jobs=2)
    assert report.index("## ironing (") < report.index("## usam (")  # in the order asked
    assert "## total: " in report and "2 process(es)" in report
    assert (tmp_path / "ironing.png").exists() and (tmp_path / "h1_usam.json").exists()


def test_the_command_line_knows_the_experiments():
    args = build_parser().parse_args(["claims", "usam", "--tiny", "--out", "x"])
    assert (args.name, args.tiny, str(args.out)) == ("usam", True, "x")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["claims", "nonsense"])


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "experiments" / "claims").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_gpu_scale_configs_are_valid(path):
    config = load_config(path)
    assert path.stem.startswith(f"{config.data.name}_{config.model.name}_{config.optimizer.name}")
    assert config.budget.epochs == 10 and config.data.batch_size == 256
    if config.optimizer.name == "rbo":  # the projection is always spelled out
        assert {"projection", "projection_steps", "projection_tol"} <= set(config.optimizer.hparams)
