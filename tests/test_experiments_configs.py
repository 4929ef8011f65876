"""The shipped experiment configurations are valid and say what they claim."""

from pathlib import Path

import pytest

from rollingball.experiments.config import load_config

ROOT = Path(__file__).resolve().parents[1] / "experiments"
PAPER = sorted((ROOT / "paper").glob("*.toml"))
FAIR = sorted(p for p in (ROOT / "fair").glob("*.toml") if not p.stem.startswith("compare_"))
HPARAMS = sorted((ROOT / "fair").glob("compare_*.toml"))


@pytest.mark.parametrize("path", PAPER + FAIR, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_is_valid(path):
    config = load_config(path)
    assert path.stem.startswith(config.data.name)
    assert config.optimizer.name in path.stem


def test_paper_table_1_grid():
    # MNIST: MLP, ResNet-6, VGG-9; CIFAR-10/100: ResNet-8, VGG-9; four optimizers each
    expected = {
        f"{data}_{model}_{opt}"
        for data, models in (
            ("mnist", ("mlp", "resnet6", "vgg9")),
            ("cifar10", ("resnet8", "vgg9")),
            ("cifar100", ("resnet8", "vgg9")),
        )
        for model in models
        for opt in ("sgd", "sam", "entropy_sgd", "rbo")
    }
    assert {p.stem for p in PAPER} == expected
    for path in PAPER:
        config = load_config(path)
        assert config.budget.epochs == 10 and config.data.batch_size == 256
        if config.optimizer.name in ("sgd", "rbo"):
            assert config.optimizer.hparams["lr"] == 0.01
        assert config.optimizer.hparams.get("momentum", 0.0) == 0.0


def test_fair_equal_closure_call_budgets():
    for path in FAIR:
        if path.stem.endswith("_evals"):
            config = load_config(path)
            sibling = load_config(path.with_name(path.stem.replace("_evals", "_epochs") + ".toml"))
            steps = -(-50000 // 128) if config.data.name == "cifar10" else -(-54000 // 256)
            assert config.budget.grad_evals == sibling.budget.epochs * steps
    names = {p.stem for p in FAIR}
    assert {
        "cifar10_resnet18_momentum_epochs",
        "cifar10_wrn16_8_momentum_epochs",
        "cifar10_resnet18_adamw_epochs",
    } <= names


@pytest.mark.parametrize("path", HPARAMS, ids=lambda p: p.stem)
def test_compare_hyperparameter_files_are_valid(path):
    from rollingball.experiments.compare import load_hparams

    hparams, by_radius = load_hparams(path)
    assert set(hparams) == {"sgd", "momentum", "adamw", "sam", "entropy_sgd", "rbo"}
    assert by_radius and all(r > 0 and lr > 0 for r, lr in by_radius.items())


def test_the_mnist1d_file_holds_the_compare_defaults():
    from rollingball.experiments.compare import COMPARE_HPARAMS, RBO_LR_BY_RADIUS, load_hparams

    hparams, by_radius = load_hparams(ROOT / "fair" / "compare_mnist1d.toml")
    assert hparams == COMPARE_HPARAMS and by_radius == RBO_LR_BY_RADIUS


@pytest.mark.parametrize("task", ["mnist1d", "digits"])
def test_compare_uses_each_tasks_own_tuned_file(task):
    from rollingball.experiments.compare import load_hparams, task_settings

    hparams, by_radius = load_hparams(ROOT / "fair" / f"compare_{task}.toml")
    tuned = task_settings(task, "mlp")
    assert tuned is not None
    assert hparams == tuned.hparams and by_radius == tuned.rbo_lr_by_radius


FMNIST = sorted((ROOT / "fmnist").glob("*.toml"))


@pytest.mark.parametrize("path", FMNIST, ids=lambda p: p.stem)
def test_fashion_mnist_configs(path):
    config = load_config(path)
    assert path.stem.startswith("fashion_mnist_") and config.data.name == "fashion_mnist"
    assert config.optimizer.name in path.stem
    # the CNN rows at full size are for a GPU; the MLP rows run on CPU
    assert config.device == ("cpu" if config.model.name == "mlp" else "cuda")


def test_the_mlp_paper_configs_are_what_the_study_runs(tmp_path):
    from rollingball.experiments import study as st
    from rollingball.experiments.config import config_to_dict

    scale = st.SCALES[("mlp", False)]
    tasks = st._paper_tasks(st.StudySpec(), scale, tmp_path)
    runs = {path.parent.name: config for path, config in tasks if path.name == "seed0"}
    names = {
        "sgd_lr0.01": "sgd",
        "sam_lr0.01": "sam",
        "entropy_sgd_defaults": "entropy_sgd",
        "rbo_paper_mode": "rbo",
        "sgd_lr0.1_h3": "sgd_h3",
    }
    assert set(runs) == set(names)
    for label, stem in names.items():
        shipped = config_to_dict(
            load_config(ROOT / "fmnist" / f"fashion_mnist_mlp_paper_{stem}.toml")
        )
        ours = config_to_dict(runs[label])
        ours.pop("threads")
        assert shipped == ours, label
