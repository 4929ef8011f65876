"""Run configurations: one TOML file per run, validated before anything is written.

    seed = 0
    device = "cpu"              # "cpu", "cuda", "cuda:1", or "auto"
    # threads = 1               # torch CPU threads
    # sync_batchnorm = true     # under torchrun: BatchNorm statistics over all ranks

    [data]
    name = "mnist1d"            # mnist1d | digits | mnist | fashion_mnist | cifar10 | cifar100
    batch_size = 100
    # data_dir = "~/data"       # existing files; download = true to fetch torchvision data
    # val_fraction = 0.1        # validation split carved from train
    # augment = true            # random crop + flip (CIFAR, Fashion-MNIST; MNIST: crop only)
    # label_noise = 0.4         # fraction of training labels replaced (seeded by noise_seed)
    # noisy_validation = true   # the validation labels get the same noise (tuning under noise)
    # train_subset = 10000      # keep this many training examples

    [model]
    name = "mlp"                # other keys go to the model, e.g. hidden = [256, 256]

    [optimizer]
    name = "rbo"                # other keys are its hyperparameters (see optimizers.py)
    lr = 0.1
    radius = 1.0

    [schedule]
    kind = "cosine"             # constant | step | cosine
    warmup = 0.0                # fraction of the budget with a linear warmup
    # milestones = [0.5, 0.75]  # step schedule: fractions of the budget
    # gamma = 0.1               # step schedule: factor at each milestone

    [budget]
    epochs = 20                 # or: grad_evals = 50000 (closure calls, the same for all)
                                # or: wall_seconds = 600 (training + evaluation time)

Schedules are functions of the fraction of the budget spent, so they mean the same thing
under an epoch budget and under a gradient-evaluation budget.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rollingball.experiments.atomic import atomic_write_text
from rollingball.experiments.data import AUGMENTABLE, DATASETS, DataBundle, load_data
from rollingball.experiments.models import MODELS
from rollingball.experiments.optimizers import OPTIMIZERS, validate_hyperparameters

__all__ = [
    "BudgetConfig",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "RunConfig",
    "ScheduleConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "lr_factor",
    "save_config",
]

SCHEDULES = ("constant", "step", "cosine")


class ConfigError(ValueError):
    """A configuration that cannot be run, with the reason."""


@dataclass
class DataConfig:
    name: str = "mnist1d"
    batch_size: int = 100
    eval_batch_size: int = 1000
    data_dir: str | None = None
    download: bool = False
    val_fraction: float = 0.0
    augment: bool = False
    normalize: bool = True
    label_noise: float = 0.0
    noise_seed: int = 0
    noisy_validation: bool = False  # the validation labels get the same noise (seed + 1)
    train_subset: int = 0
    split_seed: int | None = None  # the validation split's seed (None: the run's seed)

    def load(self, seed: int) -> DataBundle:
        """The data set this section names, split with ``split_seed`` (if set, else ``seed``)."""
        return load_data(
            self.name,
            self.data_dir,
            download=self.download,
            val_fraction=self.val_fraction,
            seed=seed if self.split_seed is None else self.split_seed,
            augment=self.augment,
            normalize=self.normalize,
            label_noise=self.label_noise,
            noise_seed=self.noise_seed,
            noisy_validation=self.noisy_validation,
            train_subset=self.train_subset,
        )


@dataclass
class ModelConfig:
    name: str = "mlp"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    hparams: dict[str, Any] = field(default_factory=dict)
    # only the first closure call of a step may update BatchNorm running statistics
    bn_first_call_only: bool = True


@dataclass
class ScheduleConfig:
    kind: str = "constant"
    warmup: float = 0.0
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    gamma: float = 0.1


@dataclass
class BudgetConfig:
    epochs: int | None = None
    grad_evals: int | None = None
    wall_seconds: float | None = None


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    sync_batchnorm: bool = False  # under torch.distributed: SyncBatchNorm across ranks
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    budget: BudgetConfig = field(default_factory=lambda: BudgetConfig(epochs=10))

    def validate(self) -> RunConfig:
        """Raise :class:`ConfigError` if the configuration cannot run; return self."""
        _check(
            isinstance(self.seed, int) and self.seed >= 0,
            f"seed must be an integer >= 0, got {self.seed!r}",
        )
        _check(
            self.threads is None or (isinstance(self.threads, int) and self.threads >= 1),
            f"threads must be an integer >= 1, got {self.threads!r}",
        )
        d = self.data
        _check(
            d.name in DATASETS, f"unknown dataset {d.name!r}; choose one of {', '.join(DATASETS)}"
        )
        _check(
            _positive_int(d.batch_size),
            f"data.batch_size must be an integer >= 1, got {d.batch_size!r}",
        )
        _check(
            _positive_int(d.eval_batch_size),
            f"data.eval_batch_size must be an integer >= 1, got {d.eval_batch_size!r}",
        )
        _check(
            0.0 <= d.val_fraction < 1.0,
            f"data.val_fraction must be in [0, 1), got {d.val_fraction}",
        )
        _check(
            not d.augment or d.name in AUGMENTABLE,
            f"data.augment (random crop + flip) is for {', '.join(AUGMENTABLE)}, not {d.name!r}",
        )
        _check(
            0.0 <= d.label_noise < 1.0, f"data.label_noise must be in [0, 1), got {d.label_noise}"
        )
        _check(
            not d.noisy_validation or (d.label_noise > 0 and d.val_fraction > 0),
            "data.noisy_validation needs label_noise > 0 and val_fraction > 0",
        )
        _check(
            isinstance(d.train_subset, int) and d.train_subset >= 0,
            f"data.train_subset must be an integer >= 0, got {d.train_subset!r}",
        )
        _check(
            self.model.name in MODELS,
            f"unknown model {self.model.name!r}; choose one of {', '.join(MODELS)}",
        )
        o = self.optimizer
        _check(
            o.name in OPTIMIZERS,
            f"unknown optimizer {o.name!r}; choose one of {', '.join(OPTIMIZERS)}",
        )
        try:
            validate_hyperparameters(o.name, o.hparams)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        s = self.schedule
        _check(
            s.kind in SCHEDULES,
            f"unknown schedule {s.kind!r}; choose one of {', '.join(SCHEDULES)}",
        )
        _check(
            0.0 <= s.warmup < 1.0, f"schedule.warmup must be a fraction in [0, 1), got {s.warmup}"
        )
        _check(
            all(0.0 < m < 1.0 for m in s.milestones) and list(s.milestones) == sorted(s.milestones),
            f"schedule.milestones must be increasing fractions in (0, 1), got {s.milestones}",
        )
        _check(0.0 < s.gamma <= 1.0, f"schedule.gamma must be in (0, 1], got {s.gamma}")
        b = self.budget
        _check(
            sum(v is not None for v in (b.epochs, b.grad_evals, b.wall_seconds)) == 1,
            "budget: give exactly one of epochs, grad_evals or wall_seconds",
        )
        if b.wall_seconds is not None:
            _check(
                isinstance(b.wall_seconds, (int, float))
                and not isinstance(b.wall_seconds, bool)
                and math.isfinite(b.wall_seconds)
                and b.wall_seconds > 0,
                f"budget.wall_seconds must be a number > 0, got {b.wall_seconds!r}",
            )
        if b.epochs is not None:
            _check(
                _positive_int(b.epochs), f"budget.epochs must be an integer >= 1, got {b.epochs!r}"
            )
        if b.grad_evals is not None:
            _check(
                _positive_int(b.grad_evals),
                f"budget.grad_evals must be an integer >= 1, got {b.grad_evals!r}",
            )
        return self


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


_SECTIONS: dict[str, Any] = {"data": DataConfig, "schedule": ScheduleConfig, "budget": BudgetConfig}


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a TOML-shaped dictionary."""
    raw = dict(raw)
    top_known = {"seed", "device", "threads", "sync_batchnorm"} | {
        "data",
        "model",
        "optimizer",
        "schedule",
        "budget",
    }
    unknown = sorted(set(raw) - top_known)
    _check(not unknown, f"unknown top-level key(s): {', '.join(unknown)}")
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        table = raw.get(name, {})
        _check(isinstance(table, dict), f"[{name}] must be a table")
        known = set(cls.__dataclass_fields__)
        bad = sorted(set(table) - known)
        _check(
            not bad,
            f"[{name}] has unknown key(s) {', '.join(bad)}; known: {', '.join(sorted(known))}",
        )
        sections[name] = cls(**table)
    if "budget" not in raw:
        sections["budget"] = BudgetConfig(epochs=10)
    model = dict(raw.get("model", {}))
    optimizer = dict(raw.get("optimizer", {}))
    config = RunConfig(
        seed=raw.get("seed", 0),
        device=raw.get("device", "cpu"),
        threads=raw.get("threads"),
        sync_batchnorm=raw.get("sync_batchnorm", False),
        model=ModelConfig(name=model.pop("name", "mlp"), kwargs=model),
        optimizer=OptimizerConfig(
            name=optimizer.pop("name", "sgd"),
            bn_first_call_only=optimizer.pop("bn_first_call_only", True),
            hparams=optimizer,
        ),
        **sections,
    )
    return config.validate()


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """The TOML-shaped dictionary of ``config`` (``None`` values left out)."""
    out: dict[str, Any] = {"seed": config.seed, "device": config.device}
    if config.threads is not None:
        out["threads"] = config.threads
    if config.sync_batchnorm:
        out["sync_batchnorm"] = True
    out["data"] = {k: v for k, v in asdict(config.data).items() if v is not None}
    out["model"] = {"name": config.model.name, **config.model.kwargs}
    out["optimizer"] = {
        "name": config.optimizer.name,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in config.optimizer.hparams.items()},
    }
    if not config.optimizer.bn_first_call_only:
        out["optimizer"]["bn_first_call_only"] = False
    out["schedule"] = asdict(config.schedule)
    out["budget"] = {k: v for k, v in asdict(config.budget).items() if v is not None}
    return out


def load_config(path: str | os.PathLike[str]) -> RunConfig:
    """Read and validate a TOML run configuration."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    try:
        return config_from_dict(raw)
    except (ConfigError, TypeError) as error:
        raise ConfigError(f"{path}: {error}") from None


def save_config(config: RunConfig, path: str | os.PathLike[str]) -> None:
    """Write ``config`` as TOML, atomically."""
    import tomli_w

    atomic_write_text(Path(path), tomli_w.dumps(config_to_dict(config)))


def lr_factor(schedule: ScheduleConfig, progress: float, step_fraction: float = 0.0) -> float:
    """Multiplier of the base learning rate for a step taken after ``progress`` (in [0, 1]) of
    the budget; ``step_fraction`` is the share of the budget one step uses (warmup's first
    step then gets a non-zero learning rate)."""
    t = min(max(progress, 0.0), 1.0)
    if schedule.warmup > 0 and t < schedule.warmup:
        return min(1.0, (t + step_fraction) / schedule.warmup)
    if schedule.kind == "constant":
        return 1.0
    if schedule.kind == "step":
        return float(schedule.gamma ** sum(t >= m for m in schedule.milestones))
    # cosine from the end of warmup to the end of the budget
    u = (t - schedule.warmup) / (1.0 - schedule.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * u))
