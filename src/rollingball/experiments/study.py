"""``rollingball study``: the Fashion-MNIST study, one resumable command.

    rollingball study [--quick] [--jobs 2] [--models mlp,small_cnn] [--parts ...] [--out DIR]

Parts, in order (each reuses the runs already finished in ``--out``, so a rerun continues
where the last one stopped):

- ``tune``: every optimizer's learning rate on a validation split of 10,000 images held out
  from the 60,000 training images (the same split for all runs), and ρ for SAM, USAM and
  RBO, in two stages (learning rates at the default ρ, then ρ at the best learning rate);
  RBO with momentum 0.9 gets its own learning-rate stage at the best radius. A learning rate
  chosen on the edge of the range tried adds the grid's next value beyond it. The choice is
  the best final validation accuracy (a diverged trial never wins); the test set is never
  looked at. The tuning table states how many trials each optimizer got.
- ``fair``: 3 seeds (1 with ``--quick``) of SGD, momentum, AdamW, SAM, USAM, and RBO (its
  default projection) at the best radius, at the best radius with momentum, and at the best
  radius with ``projection_steps = 1``, at equal epochs, at equal closure calls (3 calls per
  step of ``epochs`` epochs: RBO's default cost) and at equal wall time (the median wall time
  of RBO at its best radius at equal epochs, runs side by side ``--jobs`` at a time).
- ``paper``: the paper's Table 1 protocol on the MLP (ReLU 100-100, batch 256, constant rate,
  10 epochs, all 60,000 training images): SGD at 0.01 without momentum, SAM (lr 0.01, no
  momentum, ρ 0.05), Entropy-SGD at its defaults, RBO in the paper's mode (η = 1, ρ = 10, the
  authors' projection with γ = 1e-3 and K = 100), and SGD at ηγK = 0.1, the rate the
  hidden-learning-rate law (H3, docs/claims.md) predicts for that mode.
- ``noisy``: 40% of the training labels replaced by other classes (seeded, the same for all
  runs), and 40% of the validation labels too (another seed; test labels clean), SGD,
  momentum, SAM, USAM and RBO tuned again on that noisy validation split, then run at equal
  epochs and equal closure calls (MLP only).
- ``sharpness``: λ_max (Lanczos) and the Hessian trace (Hutchinson) of every equal-epoch fair
  run's final weights on a fixed 2,000-image training subset, and one filter-normalised
  slice through the final weights of SGD, SAM and RBO (seed 0).

It writes ``study.md`` (every table with its settings, trial counts and runtimes), CSV files
and figures into ``--out``. ``--quick`` shrinks every part (fewer epochs and trials, one seed,
a training subset for the CNN) and says so in every title. The CNN's full size is itself
a subset (10,000 training images, 5 epochs), sized to 2 cores and said so in its tables; its
GPU configurations at full size are in experiments/fmnist/. ``--quick`` runs the MLP only unless
``--models`` names the CNN too (the CNN's evaluations alone, 20,000 images per epoch, would
not fit its 15 minutes here).
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from rollingball.experiments.atomic import atomic_write_text
from rollingball.experiments.config import (
    BudgetConfig,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    ScheduleConfig,
    config_from_dict,
    config_to_dict,
)
from rollingball.experiments.data import num_batches
from rollingball.experiments.report import diverged_text
from rollingball.experiments.runner import CHECKPOINT, load_checkpoint, read_metrics, run

__all__ = ["BUDGETS", "PARTS", "Scale", "study", "tuning_plan"]

PARTS = ("tune", "fair", "paper", "noisy", "sharpness")
BUDGETS = ("epochs", "calls", "wall")
DATA = "fashion_mnist"
VAL_FRACTION = 10_000 / 60_000
BATCH = 128
EVAL_BATCH = 250  # measured faster than 1,000 for the CNN on one core (cache-sized batches)
SHARPNESS_IMAGES = 2_000

# learning-rate grids (half-decade steps) and second-stage ρ values, per optimizer; the
# first stage runs at the registry's ρ (SAM, USAM 0.05; RBO 1.0)
LR_GRID: dict[str, list[float]] = {
    "sgd": [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0],
    "momentum": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
    "adamw": [1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1],
    "sam": [0.01, 0.03, 0.1, 0.3],
    "usam": [0.03, 0.1, 0.3, 1.0],
    "rbo": [0.1, 0.3, 1.0, 3.0],
    "rbo_momentum": [0.03, 0.1, 0.3],
}
RHO_GRID: dict[str, list[float]] = {
    "sam": [0.02, 0.1, 0.2],
    "usam": [0.02, 0.1, 0.3],
    "rbo": [0.1, 0.3, 3.0],
}
RHO_KEY = {"sam": "rho", "usam": "rho", "rbo": "radius"}
DEFAULT_RHO = {"sam": 0.05, "usam": 0.05, "rbo": 1.0}
FAIR_TUNED = ("sgd", "momentum", "adamw", "sam", "usam", "rbo", "rbo_momentum")
NOISY_TUNED = ("sgd", "momentum", "sam", "usam", "rbo")
PAPER_MODE = {
    "lr": 1.0,
    "radius": 10.0,
    "projection": "gd",
    "projection_step_size": 1e-3,
    "projection_steps": 100,
    "projection_tol": 0.0,
}


@dataclass(frozen=True)
class Scale:
    """How big each part is for one model."""

    tune_epochs: int
    tune_subset: int  # training images used for tuning (0: the whole training split)
    lr_points: int  # learning rates per optimizer (the middle of its grid)
    rho_points: int  # second-stage ρ values
    epochs: int
    seeds: int
    subset: int  # training images of the final runs (0: all)
    paper_epochs: int  # 0: no paper part
    noisy: bool
    slice_points: int
    lanczos: int
    hutchinson: int


SCALES: dict[tuple[str, bool], Scale] = {
    ("mlp", False): Scale(5, 0, 7, 3, 10, 3, 0, 10, True, 41, 30, 30),
    ("small_cnn", False): Scale(3, 10_000, 3, 2, 5, 3, 10_000, 0, False, 21, 15, 5),
    ("mlp", True): Scale(1, 10_000, 3, 1, 2, 1, 0, 1, True, 21, 10, 10),
    ("small_cnn", True): Scale(1, 3_000, 2, 1, 1, 1, 5_000, 0, False, 11, 5, 3),
}
MODEL_KWARGS: dict[str, dict[str, Any]] = {"mlp": {"activation": "gelu"}, "small_cnn": {}}


def _middle(values: Sequence[float], n: int) -> list[float]:
    """``n`` values from the middle of ``values`` (all of them if n >= len)."""
    if n >= len(values):
        return list(values)
    start = (len(values) - n) // 2
    return list(values[start : start + n])


# --------------------------------------------------------------------------- configurations


def _config(
    model: str,
    optimizer: str,
    hparams: dict[str, Any],
    budget: BudgetConfig,
    seed: int = 0,
    *,
    val: bool = True,
    subset: int = 0,
    noise: float = 0.0,
    batch: int = BATCH,
    schedule: str = "cosine",
    model_kwargs: dict[str, Any] | None = None,
    data_dir: str | None = None,
) -> RunConfig:
    name = "rbo" if optimizer == "rbo_momentum" else optimizer
    return RunConfig(
        seed=seed,
        device="cpu",
        threads=1,
        data=DataConfig(
            name=DATA,
            batch_size=batch,
            eval_batch_size=EVAL_BATCH,
            data_dir=data_dir,
            val_fraction=VAL_FRACTION if val else 0.0,
            split_seed=0,
            train_subset=subset,
            label_noise=noise,
            noisy_validation=noise > 0 and val,
        ),
        model=ModelConfig(
            name=model, kwargs=dict(MODEL_KWARGS[model] if model_kwargs is None else model_kwargs)
        ),
        optimizer=OptimizerConfig(name=name, hparams=dict(hparams)),
        schedule=ScheduleConfig(kind=schedule),
        budget=budget,
    ).validate()


@dataclass
class Trial:
    """One tuning run: where it goes and what it tries."""

    optimizer: str  # a FAIR_TUNED name
    stage: str  # "lr" or "rho"
    hparams: dict[str, Any]
    path: Path
    config: RunConfig


def tuning_plan(
    model: str,
    scale: Scale,
    root: Path,
    optimizers: Sequence[str],
    chosen: dict[str, dict[str, Any]],
    *,
    noise: float = 0.0,
    data_dir: str | None = None,
) -> list[Trial]:
    """The trials that can run now: every learning-rate stage (the middle of the grid and the
    widenings in ``chosen["_lr_extra"]``), and the ρ stage (and RBO with momentum) of the
    optimizers whose learning rate is already ``chosen``."""
    budget = BudgetConfig(epochs=scale.tune_epochs)
    trials = []

    def add(opt: str, stage: str, hp: dict[str, Any]) -> None:
        slug = "_".join(f"{k}{v:g}" for k, v in sorted(hp.items()) if k != "momentum")
        config = _config(
            model,
            opt,
            hp,
            budget,
            subset=scale.tune_subset,
            noise=noise,
            data_dir=data_dir,
        )
        trials.append(Trial(opt, stage, hp, root / opt / slug, config))

    for opt in optimizers:
        if opt == "rbo_momentum":
            if "rbo" in chosen:
                radius = chosen["rbo"]["radius"]
                for lr in _learning_rates(opt, scale, chosen):
                    add(opt, "lr", {"lr": lr, "radius": radius, "momentum": 0.9})
            continue
        rho = {RHO_KEY[opt]: DEFAULT_RHO[opt]} if opt in RHO_KEY else {}
        for lr in _learning_rates(opt, scale, chosen):
            add(opt, "lr", {"lr": lr, **rho})
        if opt in RHO_KEY and opt in chosen.get("_lr_stage", {}):
            best_lr = chosen["_lr_stage"][opt]
            for value in _middle(RHO_GRID[opt], scale.rho_points):
                add(opt, "rho", {"lr": best_lr, RHO_KEY[opt]: value})
    return trials


def _learning_rates(optimizer: str, scale: Scale, chosen: dict[str, Any]) -> list[float]:
    """The learning rates tried for ``optimizer``: the middle ``scale.lr_points`` of its grid,
    and the grid values added where the best sat on an edge."""
    extra = chosen.get("_lr_extra", {}).get(optimizer, [])
    return sorted(set(_middle(LR_GRID[optimizer], scale.lr_points)) | set(extra))


def widen(trials: Sequence[Trial]) -> dict[str, float]:
    """Per optimizer whose best learning rate (:func:`choose`) is the largest (smallest) one
    tried, the next larger (smaller) value of its grid, where the grid has one: a best value
    on the edge of the tried range says the range was too narrow."""
    out = {}
    for opt, hp in choose(trials, "lr").items():
        tried = sorted({t.hparams["lr"] for t in trials if t.optimizer == opt and t.stage == "lr"})
        grid, lr = LR_GRID[opt], hp["lr"]
        i = grid.index(lr)
        if lr == tried[-1] and i + 1 < len(grid):
            out[opt] = grid[i + 1]
        elif lr == tried[0] and i > 0:
            out[opt] = grid[i - 1]
    return out


def _val_accuracy(path: Path) -> float | None:
    """The final validation accuracy of a finished trial (None: not run; nan: diverged)."""
    if not (path / "metrics.jsonl").exists():
        return None
    last = read_metrics(path)[-1]
    if last.get("diverged"):
        return math.nan
    return float(last["val_accuracy"])


def choose(trials: Sequence[Trial], stage: str | None = None) -> dict[str, dict[str, Any]]:
    """Per optimizer, the hyperparameters of its best finished trial (of ``stage``, or all):
    the highest validation accuracy, ties to the smaller learning rate; diverged trials never
    win."""
    best: dict[str, tuple[float, float, dict[str, Any]]] = {}
    for trial in trials:
        if stage is not None and trial.stage != stage:
            continue
        acc = _val_accuracy(trial.path)
        if acc is None or math.isnan(acc):
            continue
        key = (acc, -float(trial.hparams["lr"]))
        if trial.optimizer not in best or key > best[trial.optimizer][:2]:
            best[trial.optimizer] = (*key, trial.hparams)
    return {opt: dict(hp) for opt, (_, _, hp) in best.items()}


# --------------------------------------------------------------------------- execution


def _run_one(raw: dict[str, Any], out_dir: str) -> str:
    """Train one run; an interrupt (Ctrl-C) saves it and stops the study, not just the run."""
    torch.set_num_threads(1)
    if run(config_from_dict(raw), out_dir, resume=True).interrupted:
        raise KeyboardInterrupt(f"interrupted; {out_dir} saved, rerun to continue")
    return out_dir


def _finished(path: Path) -> bool:
    """True for a run whose budget is spent or whose loss diverged (its checkpoint says)."""
    if not (path / "metrics.jsonl").exists() or not (path / CHECKPOINT).exists():
        return False
    return bool(load_checkpoint(path / CHECKPOINT)["progress"]["finished"])


def _execute(tasks: Sequence[tuple[Path, RunConfig]], jobs: int, log: Callable[[str], None]) -> int:
    """Run (or finish) every task not finished yet, ``jobs`` processes at a time; how many."""
    todo = [(p, c) for p, c in tasks if not _finished(p)]
    if not todo:
        return 0
    log(f"  {len(todo)} run(s) to do ({len(tasks) - len(todo)} already finished)")
    if jobs <= 1:
        for path, config in todo:
            _run_one(config_to_dict(config), str(path))
            log(f"  done {path}")
        return len(todo)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_run_one, config_to_dict(c), str(p)) for p, c in todo]
        for future in as_completed(futures):
            log(f"  done {future.result()}")
    return len(todo)


# --------------------------------------------------------------------------- the study


@dataclass
class StudySpec:
    """What ``rollingball study`` runs."""

    out: Path = Path("runs/fmnist")
    quick: bool = False
    jobs: int = 1
    models: Sequence[str] | None = None  # None: mlp and small_cnn; with quick, mlp only
    parts: Sequence[str] = PARTS
    budgets: Sequence[str] = BUDGETS  # the fair runs' budgets, in this order
    data_dir: str | None = None
    log: Callable[[str], None] = field(default=print)

    def validate(self) -> None:
        if self.models is None:
            self.models = ("mlp",) if self.quick else ("mlp", "small_cnn")
        unknown = sorted(set(self.parts) - set(PARTS))
        if unknown:
            raise ValueError(
                f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}"
            )
        bad = sorted(set(self.models) - set(MODEL_KWARGS))
        if bad:
            raise ValueError(f"unknown model(s) {', '.join(bad)}; choose from mlp, small_cnn")
        if self.jobs < 1:
            raise ValueError("--jobs must be >= 1")
        wrong = sorted(set(self.budgets) - set(BUDGETS))
        if wrong:
            raise ValueError(
                f"unknown budget(s) {', '.join(wrong)}; choose from epochs, calls, wall"
            )


def _tune(
    spec: StudySpec,
    model: str,
    scale: Scale,
    root: Path,
    optimizers: Sequence[str],
    noise: float,
    active: bool,
    ran: set[str],
) -> tuple[dict[str, dict[str, Any]], list[Trial]]:
    """Both stages of tuning (run only if ``active``; else what is on disk): the chosen
    hyperparameters and every trial. A learning-rate grid whose best value sits on its edge
    is widened by the next grid value (:func:`widen`) until the best is inside."""
    chosen: dict[str, Any] = {"_lr_extra": {}}

    def plan_and_run() -> list[Trial]:
        while True:
            plan = tuning_plan(
                model, scale, root, optimizers, chosen, noise=noise, data_dir=spec.data_dir
            )
            if active and _execute([(t.path, t.config) for t in plan], spec.jobs, spec.log):
                ran.add("tune" if noise == 0 else "noisy")
            extra = chosen["_lr_extra"]
            wider = {k: v for k, v in widen(plan).items() if v not in extra.get(k, [])}
            if not wider:  # (or the widening has not run: a report from what is on disk)
                return plan
            for opt, lr in wider.items():
                extra[opt] = [*extra.get(opt, []), lr]

    plan = plan_and_run()
    # RBO with momentum waits for RBO's radius, chosen after its ρ stage
    chosen["_lr_stage"] = {k: v["lr"] for k, v in choose(plan, "lr").items()}
    plan = plan_and_run()
    best = choose(plan)
    if "rbo_momentum" in optimizers:  # its grid sits at RBO's chosen radius
        chosen.update(best)
        plan = plan_and_run()
        best = choose(plan)
    return best, plan


def _fair_settings(best: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Label -> (optimizer, hyperparameters) of the fair runs, duplicates left out."""
    rows: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in ("sgd", "momentum", "adamw", "sam", "usam"):
        if name in best:
            rows[name] = (name, best[name])
    if "rbo" in best:
        rows["rbo_best_radius"] = ("rbo", best["rbo"])
        rows["rbo_best_radius_k1"] = ("rbo", {**best["rbo"], "projection_steps": 1})
    if "rbo_momentum" in best:
        rows["rbo_best_radius_momentum"] = ("rbo", best["rbo_momentum"])
    return rows


def _budgets(scale: Scale, steps: int) -> dict[str, BudgetConfig]:
    return {
        "epochs": BudgetConfig(epochs=scale.epochs),
        "calls": BudgetConfig(grad_evals=3 * scale.epochs * steps),
    }


def _fair_tasks(
    spec: StudySpec,
    model: str,
    scale: Scale,
    rows: dict[str, Any],
    root: Path,
    budget_name: str,
    budget: BudgetConfig,
    noise: float = 0.0,
) -> list[tuple[Path, RunConfig]]:
    tasks = []
    for label, (optimizer, hp) in rows.items():
        for seed in range(scale.seeds):
            config = _config(
                model,
                optimizer,
                hp,
                budget,
                seed,
                subset=scale.subset,
                noise=noise,
                data_dir=spec.data_dir,
            )
            tasks.append((root / budget_name / label / f"seed{seed}", config))
    return tasks


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def study(spec: StudySpec) -> Path:
    """Run the parts of the study that ``spec`` names; write study.md; return its path."""
    spec.validate()
    assert spec.models is not None
    commit = _git_commit()  # the code this call trains with
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sections: list[str] = []
    state_path = out / "study.json"
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.exists() else {}
    steps_cache: dict[int, int] = {}
    parts = set(spec.parts)
    for model in spec.models:
        scale = SCALES[(model, spec.quick)]
        mstate = state.setdefault(model, {})
        probe = _config(model, "sgd", {}, BudgetConfig(epochs=1), subset=scale.subset)
        bundle = probe.data.load(0)  # fails early if the data is missing
        steps = steps_cache.setdefault(scale.subset, num_batches(bundle.train, BATCH))

        ran: set[str] = set()  # the parts that trained something in this call

        def execute(
            part: str, tasks: Sequence[tuple[Path, RunConfig]], ran: set[str] = ran
        ) -> None:
            if part in parts and _execute(tasks, spec.jobs, spec.log):
                ran.add(part)

        def timed(
            part: str, tick: float, mstate: dict[str, Any] = mstate, ran: set[str] = ran
        ) -> None:
            """Add the part's time in this call to its total (parts that trained nothing: 0)."""
            if part in ran:
                seconds = mstate.setdefault("seconds", {})
                seconds[part] = round(seconds.get(part, 0.0) + time.perf_counter() - tick, 1)

        tick = time.perf_counter()
        spec.log(f"[{model}] tuning")
        best, trials = _tune(
            spec, model, scale, out / "tune" / model, FAIR_TUNED, 0.0, "tune" in parts, ran
        )
        timed("tune", tick)
        if trials and any((t.path / "metrics.jsonl").exists() for t in trials):
            mstate["best"] = best
            mstate["trials"] = _trial_counts(trials)
            sections.append(_tuning_section(model, scale, spec.quick, trials, best))
        rows = _fair_settings(mstate.get("best", {}))
        budgets = _budgets(scale, steps)
        if rows:
            spec.log(f"[{model}] fair runs")
            tick = time.perf_counter()
            tables = []
            for name in spec.budgets:
                if name == "wall":
                    epochs_tasks = _fair_tasks(
                        spec, model, scale, rows, out / "fair" / model, "epochs", budgets["epochs"]
                    )
                    wall = _median_wall(epochs_tasks, "rbo_best_radius")
                    if not wall:
                        continue
                    budget = BudgetConfig(wall_seconds=max(round(wall, 1), 0.1))
                else:
                    budget = budgets[name]
                tasks = _fair_tasks(spec, model, scale, rows, out / "fair" / model, name, budget)
                execute("fair", tasks)
                tables.append((name, budget, tasks))
            timed("fair", tick)
            sections.append(_fair_section(model, scale, spec.quick, rows, tables))
            tick = time.perf_counter()
            spec.log(f"[{model}] sharpness")
            tasks = _fair_tasks(
                spec, model, scale, rows, out / "fair" / model, "epochs", budgets["epochs"]
            )
            sections.append(
                _sharpness_section(spec, model, scale, tasks, out, "sharpness" in parts)
            )
            if "sharpness" in parts:
                ran.add("sharpness")
            timed("sharpness", tick)
        if scale.paper_epochs and model == "mlp":
            spec.log(f"[{model}] the paper's protocol")
            tick = time.perf_counter()
            tasks = _paper_tasks(spec, scale, out / "paper" / model)
            execute("paper", tasks)
            timed("paper", tick)
            if _final_rows(tasks):
                sections.append(_paper_section(scale, spec.quick, tasks))
        if scale.noisy:
            spec.log(f"[{model}] noisy labels")
            tick = time.perf_counter()
            root = out / "noisy_tune" / model
            nbest, ntrials = _tune(
                spec, model, scale, root, NOISY_TUNED, 0.4, "noisy" in parts, ran
            )
            nrows = {k: (("rbo" if k.startswith("rbo") else k), v) for k, v in nbest.items()}
            tables = []
            for name in [b for b in spec.budgets if b != "wall"]:
                tasks = _fair_tasks(
                    spec, model, scale, nrows, out / "noisy" / model, name, budgets[name], noise=0.4
                )
                execute("noisy", tasks)
                tables.append((name, budgets[name], tasks))
            timed("noisy", tick)
            if any((t.path / "metrics.jsonl").exists() for t in ntrials):
                mstate["noisy_trials"] = _trial_counts(ntrials)
                sections.append(_noisy_section(model, scale, spec.quick, ntrials, nbest, tables))
        if ran - {"sharpness"}:
            commits = mstate.setdefault("commits", [])
            if commit not in commits:
                commits.append(commit)
        atomic_write_text(state_path, json.dumps(state, indent=1, sort_keys=True))
    elapsed = time.perf_counter() - started
    header = _header(spec, elapsed, state)
    path = out / "study.md"
    atomic_write_text(path, "\n".join([header, *sections]))
    spec.log(f"wrote {path} ({elapsed:.0f} s)")
    return path


def _trial_counts(trials: Sequence[Trial]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in trials:
        if (t.path / "metrics.jsonl").exists():
            counts[t.optimizer] = counts.get(t.optimizer, 0) + 1
    return counts


def _median_wall(tasks: Sequence[tuple[Path, RunConfig]], label: str) -> float | None:
    walls = [
        float(read_metrics(p)[-1]["wall_seconds"])
        for p, _ in tasks
        if p.parent.name == label and (p / "metrics.jsonl").exists()
    ]
    return statistics.median(walls) if walls else None


def _paper_tasks(spec: StudySpec, scale: Scale, root: Path) -> list[tuple[Path, RunConfig]]:
    budget = BudgetConfig(epochs=scale.paper_epochs)
    rows: dict[str, tuple[str, dict[str, Any]]] = {
        "sgd_lr0.01": ("sgd", {"lr": 0.01}),
        "sgd_lr0.1_h3": ("sgd", {"lr": 0.1}),
        "sam_lr0.01": ("sam", {"lr": 0.01, "momentum": 0.0, "rho": 0.05}),
        "entropy_sgd_defaults": ("entropy_sgd", {}),
        "rbo_paper_mode": ("rbo", dict(PAPER_MODE)),  # the dearest last: 100 calls a step
    }
    tasks = []
    for label, (optimizer, hp) in rows.items():
        for seed in range(scale.seeds):
            config = _config(
                "mlp",
                optimizer,
                hp,
                budget,
                seed,
                val=False,
                batch=256,
                schedule="constant",
                model_kwargs={},
                data_dir=spec.data_dir,
            )
            tasks.append((root / label / f"seed{seed}", config))
    return tasks


# --------------------------------------------------------------------------- tables


def _final_rows(tasks: Sequence[tuple[Path, RunConfig]]) -> dict[str, list[dict[str, Any]]]:
    """Label -> the final metrics row of each finished seed (unfinished runs left out)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for path, _ in tasks:
        if _finished(path):
            groups.setdefault(path.parent.name, []).append(read_metrics(path)[-1])
    return groups


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _beyond_noise(a: Sequence[float], b: Sequence[float]) -> str:
    """Whether mean(a) − mean(b) exceeds twice its standard error (Welch); "n/a" for 1 seed."""
    if len(a) < 2 or len(b) < 2:
        return "n/a (1 seed)"
    diff = statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    verdict = "yes" if abs(diff) > 2 * se else "no"
    return f"{verdict} ({100 * diff:+.2f} ± {200 * se:.2f})"


BASELINES = ("sgd", "momentum", "adamw", "sam", "usam")


def results_table(
    groups: dict[str, list[dict[str, Any]]],
    settings: dict[str, Any] | None = None,
    compare: bool = True,
) -> str:
    """Markdown: per label, test accuracy mean ± std, final train and test loss, train−test
    accuracy gap, closure calls, wall time, and whether it differs from the best baseline
    beyond the seed noise (a diverged run says so instead of its accuracy)."""
    finite = {
        k: [float(r["test_accuracy"]) for r in rows]
        for k, rows in groups.items()
        if not any(r.get("diverged") for r in rows)
    }
    base = [k for k in finite if k in BASELINES]
    best = max(base, key=lambda k: statistics.fmean(finite[k])) if base else None
    head = (
        "| run | settings | seeds | test acc. % | train loss | test loss "
        "| gap (train − test acc.) | closure calls | wall s |"
    )
    sep = "|---|---|---|---|---|---|---|---|---|"
    if compare:
        head += f" vs best baseline ({best or 'none'}): beyond noise? |"
        sep += "---|"
    lines = [head, sep]
    for label, rows in groups.items():
        hp = settings.get(label, ("", {}))[1] if settings else {}
        described = ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items()
        )
        div = diverged_text(
            [r.get("diverged_step", r["step"]) if r.get("diverged") else "" for r in rows]
        )
        accs = [float(r["test_accuracy"]) for r in rows]
        m, s = _mean_std(accs)
        acc = div or f"{100 * m:.2f} ± {100 * s:.2f}"
        train_loss = statistics.fmean(float(r["train_loss"]) for r in rows)
        test_loss = statistics.fmean(float(r["test_loss"]) for r in rows)
        gap = statistics.fmean(float(r["train_accuracy"]) - float(r["test_accuracy"]) for r in rows)
        calls = statistics.fmean(float(r["grad_evals"]) for r in rows)
        wall = statistics.fmean(float(r["wall_seconds"]) for r in rows)
        losses = (
            ["—"] * 3 if div else [f"{train_loss:.4f}", f"{test_loss:.4f}", f"{100 * gap:+.2f}"]
        )
        cells = [label, described, str(len(rows)), acc, *losses, f"{calls:,.0f}", f"{wall:.1f}"]
        if compare:
            cells.append(
                "—" if label == best or best is None or div else _beyond_noise(accs, finite[best])
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv(groups: dict[str, list[dict[str, Any]]], path: Path) -> None:
    keys = ["label", "seed", "test_accuracy", "test_loss", "train_loss", "train_accuracy",
            "grad_evals", "wall_seconds", "epochs", "diverged_step"]  # fmt: skip
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    for label, rows in groups.items():
        for seed, row in enumerate(rows):
            writer.writerow({"label": label, "seed": seed, "diverged_step": "", **row})
    atomic_write_text(path, buffer.getvalue())


def _quick(quick: bool) -> str:
    return (
        " — QUICK VARIANT (fewer epochs and trials, 1 seed; not the study's result)"
        if quick
        else ""
    )


def _tuning_section(
    model: str, scale: Scale, quick: bool, trials: Sequence[Trial], best: dict[str, Any]
) -> str:
    lines = [
        f"## Tuning: {model}{_quick(quick)}",
        "",
        f"{scale.tune_epochs} epoch(s) per trial on "
        + (f"{scale.tune_subset:,} of the 50,000" if scale.tune_subset else "the 50,000")
        + " training images; chosen by the final accuracy on the 10,000-image validation "
        "split (seed 0 split, the same for every run); batch 128, cosine schedule.",
        "",
        "| optimizer | trials | chosen | validation acc. % of the chosen "
        "| all trials (hyperparameters: val. acc. %) |",
        "|---|---|---|---|---|",
    ]
    missing = 0
    for opt in FAIR_TUNED if any(t.optimizer == "adamw" for t in trials) else NOISY_TUNED:
        mine = [t for t in trials if t.optimizer == opt and _finished(t.path)]
        missing += max(0, _expected_trials(opt, scale) - len(mine))
        if not mine:
            continue
        cells = []
        for t in mine:
            acc = _val_accuracy(t.path)
            shown = "diverged" if acc is None or math.isnan(acc) else f"{100 * acc:.2f}"
            hp = ", ".join(f"{k} {v:g}" for k, v in t.hparams.items() if k != "momentum")
            cells.append(f"{hp}: {shown}")
        chosen = best.get(opt, {})
        chosen_acc = (
            next((_val_accuracy(t.path) for t in mine if t.hparams == chosen), math.nan) or math.nan
        )
        lines.append(
            f"| {opt} | {len(mine)} | {', '.join(f'{k} {v:g}' for k, v in chosen.items())} | "
            f"{100 * chosen_acc:.2f} | {'; '.join(cells)} |"
        )
    if missing:
        lines += [
            "",
            f"**Partial: {missing} trial(s) not run yet; the choices above are provisional.**",
        ]
    return "\n".join(lines) + "\n"


def _expected_trials(optimizer: str, scale: Scale) -> int:
    """Trials the tuning plan gives ``optimizer`` at ``scale``."""
    rho = len(_middle(RHO_GRID[optimizer], scale.rho_points)) if optimizer in RHO_GRID else 0
    return len(_middle(LR_GRID[optimizer], scale.lr_points)) + rho


def _partial(tasks: Sequence[tuple[Path, RunConfig]]) -> list[str]:
    """A warning line when some of ``tasks`` have not finished."""
    done = sum(_finished(p) for p, _ in tasks)
    if done == len(tasks):
        return []
    return [f"**Partial: {done} of {len(tasks)} runs finished; the table shows those.**", ""]


def _fair_section(
    model: str, scale: Scale, quick: bool, rows: dict[str, Any], tables: list[Any]
) -> str:
    lines = [f"## Fair comparison: {model}{_quick(quick)}", ""]
    if scale.subset:
        lines += [
            f"**Trained on a {scale.subset:,}-image subset of the 50,000 training images.**",
            "",
        ]
    described = {
        "epochs": f"equal epochs ({scale.epochs})",
        "calls": "equal closure calls",
        "wall": "equal wall time",
    }
    for name, budget, tasks in tables:
        groups = _final_rows(tasks)
        if not groups:
            continue
        amount = (
            f"{budget.grad_evals:,} closure calls each"
            if budget.grad_evals
            else f"{budget.wall_seconds:g} s each (RBO at its best radius's median at equal epochs)"
            if budget.wall_seconds
            else f"{budget.epochs} epochs each"
        )
        root = tasks[0][0].parent.parent
        _csv(groups, root / "summary.csv")
        lines += [f"### {described[name]}: {amount}", "", *_partial(tasks)]
        lines += [results_table(groups, rows)]
        for figure in _curves(root, f"{model}, {described[name]}{' (quick)' if quick else ''}"):
            lines.append(f"![{figure.stem}]({figure.relative_to(root.parent.parent.parent)})")
        lines.append("")
    return "\n".join(lines) + "\n"


def _curves(root: Path, title: str) -> list[Path]:
    """Test accuracy against epochs, closure calls and wall time of the runs under ``root``."""
    from rollingball.experiments.plots import plot_curves
    from rollingball.experiments.report import find_runs

    records = find_runs([root])
    return plot_curves(records, root, title=title) if records else []


def _paper_section(scale: Scale, quick: bool, tasks: list[Any]) -> str:
    groups = _final_rows(tasks)
    settings = {path.parent.name: ("", config.optimizer.hparams) for path, config in tasks}
    _csv(groups, tasks[0][0].parent.parent / "summary.csv")
    return "\n".join(
        [
            f"## The paper's protocol (Table 1's MNIST row), MLP on Fashion-MNIST{_quick(quick)}",
            "",
            f"ReLU MLP 784-100-100-10, batch 256, constant learning rate, {scale.paper_epochs} "
            "epoch(s), all 60,000 training images, no validation split. RBO paper mode: "
            + ", ".join(
                f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}"
                for k, v in PAPER_MODE.items()
            )
            + ". `sgd_lr0.1_h3`: SGD at ηγK = 0.1, the hidden learning rate H3 predicts.",
            "",
            *_partial(tasks),
            results_table(groups, settings, compare=False),
        ]
    )


def _noisy_section(
    model: str,
    scale: Scale,
    quick: bool,
    trials: Sequence[Trial],
    best: dict[str, Any],
    tables: list[Any],
) -> str:
    lines = [
        f"## Noisy labels (40% symmetric, training and validation labels; test labels clean): "
        f"{model}{_quick(quick)}",
        "",
        _tuning_section(model, scale, quick, trials, best)
        .replace("## Tuning", "### Tuning under noise")
        .replace("validation split", "validation split, 40% of its labels noisy too"),
    ]
    for name, budget, tasks in tables:
        groups = _final_rows(tasks)
        if not groups:
            continue
        _csv(groups, tasks[0][0].parent.parent / f"summary_{name}.csv")
        amount = (
            f"{budget.grad_evals:,} closure calls"
            if budget.grad_evals
            else f"{budget.epochs} epochs"
        )
        lines += [
            f"### {amount} each",
            "",
            *_partial(tasks),
            results_table(groups, {k: ("", v) for k, v in best.items()}),
        ]
    return "\n".join(lines) + "\n"


def _sharpness_section(
    spec: StudySpec,
    model: str,
    scale: Scale,
    tasks: list[tuple[Path, RunConfig]],
    out: Path,
    active: bool,
) -> str:
    from rollingball.experiments.sharpness_study import measure_all, plot_slices

    results = measure_all(tasks, scale, spec.jobs, spec.log, compute=active)
    if not results:
        return ""
    lines = [
        f"## Sharpness of the minima reached: {model}{_quick(quick=spec.quick)}",
        "",
        f"Equal-epoch fair runs; training loss (eval mode) on a fixed {SHARPNESS_IMAGES:,}-image "
        f"training subset; λ_max by Lanczos ({scale.lanczos} iterations), trace by Hutchinson "
        f"({scale.hutchinson} Rademacher samples).",
        "",
        "| run | seeds | λ_max | Hessian trace | subset loss | test acc. % |",
        "|---|---|---|---|---|---|",
    ]
    for label, rows in results.items():
        lam = _mean_std([r["lambda_max"] for r in rows])
        tr = _mean_std([r["trace"] for r in rows])
        loss = statistics.fmean(r["loss"] for r in rows)
        acc = _mean_std([r["test_accuracy"] for r in rows])
        lines.append(
            f"| {label} | {len(rows)} | {lam[0]:.3g} ± {lam[1]:.2g} | {tr[0]:.4g} ± {tr[1]:.2g} | "
            f"{loss:.4f} | {100 * acc[0]:.2f} ± {100 * acc[1]:.2f} |"
        )
    figure = out / f"slice_{model}.png"
    if active:
        title = "1-D slice through the final weights (seed 0, equal epochs)"
        figure = (
            plot_slices(tasks, scale, figure, title + (" — QUICK" if spec.quick else "")) or figure
        )
    if figure.exists():
        lines += ["", f"![filter-normalised slice]({figure.name})", ""]
    return "\n".join(lines) + "\n"


def _header(spec: StudySpec, elapsed: float, state: dict[str, Any]) -> str:
    seconds = "; ".join(
        f"{model}: " + ", ".join(f"{k} {v:.0f} s" for k, v in m.get("seconds", {}).items())
        for model, m in state.items()
    )
    commits = sorted({c for m in state.values() for c in m.get("commits", [])})
    command = "rollingball study" + (" --quick" if spec.quick else "") + f" --jobs {spec.jobs}"
    command += f" --models {','.join(spec.models or ())} --parts {','.join(spec.parts)}"
    command += f" --out {spec.out}"
    return "\n".join(
        [
            "# Fashion-MNIST study" + _quick(spec.quick),
            "",
            f"Command: `{command}`; runs trained at commit(s) {', '.join(commits) or '?'}, "
            f"report written at {_git_commit()}; this call {elapsed:.0f} s (time per part, "
            f"summed over the calls that trained it: {seconds}); {platform.machine()}, torch "
            f"{torch.__version__}, one thread per run, {spec.jobs} run(s) at a time. RBO's "
            "projection: the library defaults unless a row says otherwise.",
            "",
        ]
    )
