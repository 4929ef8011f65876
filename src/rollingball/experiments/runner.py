"""The runner: train one configuration, with atomic files, resume and a clean Ctrl-C.

``run(config, out_dir)`` writes

- ``config.toml``: the configuration (validated, defaults filled in);
- ``metrics.jsonl``: one JSON object per epoch (and one for a final partial epoch under a
  gradient-evaluation budget), rewritten atomically;
- ``checkpoint.pt``: everything needed to continue bit-for-bit (model, optimizer, RNG,
  position inside the epoch, accumulators, metrics so far), written atomically after
  every epoch, on Ctrl-C and at the end. It holds tensors and plain Python values only and
  is loaded with ``weights_only=True``, so a checkpoint from elsewhere cannot run code.
  It is written before the metrics, so metrics on disk always have their checkpoint; a
  resume deletes the temporary files a kill -9 in the middle of a write left behind.

Every optimizer's ``step`` gets the same closure wrapped in a :class:`CountingClosure`, so
``grad_evals`` counts forward+backward passes identically for all. Under
``torch.distributed`` (``torchrun``) each rank trains on its shard of every epoch, the
metrics are summed over ranks and only rank 0 writes files; all of that lives in
:class:`Ranks`.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from rollingball.experiments.atomic import atomic_write, atomic_write_text, remove_stale_temporaries
from rollingball.experiments.config import (
    ConfigError,
    RunConfig,
    config_to_dict,
    load_config,
    lr_factor,
    save_config,
)
from rollingball.experiments.data import DataBundle, make_loader, num_batches
from rollingball.experiments.distributed import init_from_env
from rollingball.experiments.models import build_model
from rollingball.experiments.optimizers import CountingClosure, build_optimizer
from rollingball.optim.batchnorm import first_call_updates_batchnorm

__all__ = [
    "CheckpointError",
    "RunResult",
    "StepResult",
    "evaluate",
    "load_checkpoint",
    "read_metrics",
    "run",
    "run_file",
    "train_step",
]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.toml"


# --------------------------------------------------------------------------- ranks


class Ranks:
    """Rank and world size, and the few collective operations the runner needs."""

    def __init__(self) -> None:
        self.distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if self.distributed else 0
        self.world = torch.distributed.get_world_size() if self.distributed else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum of ``values`` over all ranks (identity in a single process)."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if ``flag`` is true on any rank (ranks stop at the same step)."""
        if not self.distributed:
            return flag
        return self.sum([float(flag)], device)[0] > 0


# --------------------------------------------------------------------------- one step


@dataclass
class StepResult:
    """What one optimizer step reports: loss and correct predictions at its starting point."""

    loss: float
    correct: int
    count: int
    grad_evals: int
    stats: dict[str, Any]


def train_step(
    model: nn.Module,
    optimizer: Optimizer,
    inputs: Tensor,
    targets: Tensor,
    criterion: Callable[[Tensor, Tensor], Tensor],
    bn_first_call_only: bool = True,
) -> StepResult:
    """One optimizer step on one minibatch, counting closure calls."""
    first: dict[str, Tensor] = {}

    def closure() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        logits = model(inputs)
        loss = criterion(logits, targets)
        loss.backward()
        if not first:
            first["loss"] = loss.detach()
            first["correct"] = (logits.detach().argmax(1) == targets).sum()
        return loss

    inner = first_call_updates_batchnorm(model, closure) if bn_first_call_only else closure
    counted = CountingClosure(inner)
    try:
        optimizer.step(counted)  # type: ignore[arg-type]  # closures may return tensors
    except FloatingPointError:  # RBO refuses a non-finite step (parameters left as they were)
        first["loss"] = torch.tensor(math.nan)
    stats = dict(getattr(optimizer, "last_stats", None) or {})
    return StepResult(
        loss=float(first["loss"]),
        correct=int(first.get("correct", 0)),
        count=len(targets),
        grad_evals=counted.calls,
        stats=stats,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Any,
    batch_size: int,
    device: torch.device,
    ranks: Ranks | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``dataset`` (eval mode)."""
    ranks = ranks or Ranks()
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0.0, 0.0
    for inputs, targets in make_loader(dataset, batch_size, shuffle=False):
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(inputs)
        loss_sum += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
        correct += float((logits.argmax(1) == targets).sum())
        count += len(targets)
    model.train(was_training)
    loss_sum, correct, count = ranks.sum([loss_sum, correct, count], device)
    return loss_sum / max(count, 1.0), correct / max(count, 1.0)


# --------------------------------------------------------------------------- state


@dataclass
class Progress:
    """Where the run is, and the running sums of the current epoch."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done in the current epoch
    step: int = 0  # optimizer steps overall
    grad_evals: int = 0  # closure calls overall
    wall_seconds: float = 0.0
    loss_sum: float = 0.0  # current epoch: sum of per-example losses at each step's start
    correct: int = 0
    count: int = 0
    steps_in_epoch: int = 0
    proj_steps: float = 0.0  # RBO projection statistics, summed over the epoch's steps
    proj_converged: float = 0.0
    proj_residual: float = 0.0
    proj_count: int = 0
    finished: bool = False
    diverged: bool = False
    diverged_step: int | None = None  # the first step whose loss was not finite
    metrics: list[dict[str, Any]] = field(default_factory=list)

    def start_epoch(self) -> None:
        self.batch = self.correct = self.count = self.steps_in_epoch = 0
        self.loss_sum = 0.0
        self.proj_steps = self.proj_converged = self.proj_residual = 0.0
        self.proj_count = 0

    def add(self, result: StepResult) -> None:
        self.batch += 1
        self.step += 1
        self.steps_in_epoch += 1
        self.grad_evals += result.grad_evals
        self.loss_sum += result.loss * result.count
        self.correct += result.correct
        self.count += result.count
        if "projection_steps" in result.stats:
            self.proj_steps += float(result.stats["projection_steps"])
            self.proj_converged += float(bool(result.stats.get("converged", False)))
            self.proj_residual += float(result.stats.get("residual", float("nan")))
            self.proj_count += 1


@dataclass
class RunResult:
    """The outcome of :func:`run`."""

    out_dir: Path | None
    metrics: list[dict[str, Any]]
    interrupted: bool = False
    diverged: bool = False

    @property
    def final(self) -> dict[str, Any]:
        return self.metrics[-1] if self.metrics else {}


# --------------------------------------------------------------------------- Ctrl-C


class _StopFlag:
    def __init__(self) -> None:
        self.requested = False


@contextmanager
def _graceful_sigint(flag: _StopFlag) -> Iterator[None]:
    """First Ctrl-C asks the loop to save and stop after the current step; a second one aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------- set-up


@dataclass
class _Session:
    """What one run works on: built by :func:`_set_up`, advanced step by step in ``state``."""

    config: RunConfig
    out: Path | None
    ranks: Ranks
    device: torch.device
    bundle: DataBundle
    model: nn.Module
    optimizer: Optimizer
    base_lrs: list[float]
    steps_per_epoch: int
    state: Progress = field(default_factory=Progress)
    epoch_started: float | None = None  # perf_counter at the start of the running epoch

    def seconds(self) -> float:
        """Wall time so far, the running epoch's included."""
        running = 0.0 if self.epoch_started is None else time.perf_counter() - self.epoch_started
        return self.state.wall_seconds + running

    def exhausted(self) -> bool:
        """True once the budget (epochs, closure calls or wall time) is spent."""
        budget = self.config.budget
        if budget.grad_evals is not None:
            return self.state.grad_evals >= budget.grad_evals
        if budget.wall_seconds is not None:
            return self.seconds() >= budget.wall_seconds
        return self.state.epoch >= (budget.epochs or 0)


def _device(name: str, ranks: Ranks) -> torch.device:
    """The configured device; under torchrun, "cuda" means this rank's GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available")
        if ranks.distributed and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.index is not None:
            torch.cuda.set_device(device)
    return device


def _check_out_dir(config: RunConfig, out: Path | None, resume: bool) -> None:
    """Refuse to overwrite a run, or to resume one saved with another configuration."""
    if out is not None and not resume and (out / METRICS).exists():
        raise FileExistsError(
            f"{out} already holds a run; pass --resume to continue it or choose another --out"
        )
    if resume and out is not None and (out / CONFIG).exists():
        saved = config_to_dict(load_config(out / CONFIG))
        if saved != config_to_dict(config):
            raise ConfigError(
                f"--resume: the configuration differs from the one saved in {out / CONFIG}"
            )


def _set_up(config: RunConfig, out: Path | None, data: DataBundle | None) -> _Session:
    """Device, threads, data, model (DDP-wrapped under torchrun) and optimizer; no files."""
    ranks = Ranks()
    device = _device(config.device, ranks)
    if config.sync_batchnorm and ranks.distributed and device.type == "cpu":
        raise ConfigError(
            "sync_batchnorm: PyTorch's SyncBatchNorm runs on GPUs only; on CPU leave it off "
            "(DDP then uses rank 0's BatchNorm statistics)"
        )
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    bundle = data or config.data.load(config.seed)
    torch.manual_seed(config.seed)
    try:
        model = build_model(
            config.model.name, bundle.input_shape, bundle.num_classes, **config.model.kwargs
        )
    except TypeError as error:  # an option the model does not have
        raise ConfigError(f"[model] {config.model.name}: {error}") from None
    model.to(device)
    if ranks.distributed:
        if config.sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = build_optimizer(
        config.optimizer.name, model.parameters(), **config.optimizer.hparams
    )
    return _Session(
        config=config,
        out=out,
        ranks=ranks,
        device=device,
        bundle=bundle,
        model=model,
        optimizer=optimizer,
        base_lrs=[group["lr"] for group in optimizer.param_groups],
        steps_per_epoch=num_batches(bundle.train, config.data.batch_size),
    )


# --------------------------------------------------------------------------- save and restore


class CheckpointError(ValueError):
    """A checkpoint that holds more than tensors and plain Python values."""


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _save(session: _Session) -> None:
    """Write checkpoint.pt, then metrics.jsonl, each atomically (rank 0 only; nothing in
    memory mode): a metrics file on disk always has a checkpoint at least as recent."""
    if session.out is None or not session.ranks.is_main:
        return
    payload = {  # tensors and plain Python values only: loadable with weights_only=True
        "model": _unwrap(session.model).state_dict(),
        "optimizer": session.optimizer.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "progress": asdict(session.state),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write(session.out / CHECKPOINT, lambda handle: handle.write(buffer.getvalue()))
    _write_metrics(session.out / METRICS, session.state.metrics)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint's contents, loaded with ``weights_only=True``: no code in it can run."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain Python values; refusing to "
            "load it (a checkpoint written by rollingball holds only those)"
        ) from None


def _restore(session: _Session, resume: bool) -> None:
    """Continue from out/checkpoint.pt if asked and present; otherwise write config.toml."""
    out = session.out
    if out is None:
        return
    if resume and session.ranks.is_main:
        remove_stale_temporaries(out)
    if resume and (out / CHECKPOINT).exists():
        payload = load_checkpoint(out / CHECKPOINT, session.device)
        _unwrap(session.model).load_state_dict(payload["model"])
        session.optimizer.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["rng_cpu"])
        if payload["rng_cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(payload["rng_cuda"])
        session.state = Progress(**payload["progress"])
    elif session.ranks.is_main:
        save_config(session.config, out / CONFIG)


def _write_metrics(path: Path, metrics: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in metrics))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` file (or of ``DIR/metrics.jsonl`` for a directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- one epoch


class _Bar:
    """The run's line in a ``rich.progress.Progress`` (no-op without one)."""

    def __init__(self, progress_bar: Any, session: _Session) -> None:
        self.bar = progress_bar
        if progress_bar is None:
            return
        budget = session.config.budget
        if budget.wall_seconds is not None:
            total: float = budget.wall_seconds
        elif budget.grad_evals is not None:
            total = budget.grad_evals
        else:
            total = (budget.epochs or 0) * session.steps_per_epoch
        self.task = progress_bar.add_task(
            session.config.optimizer.name, total=total, completed=_done(session), info=""
        )

    def update(self, session: _Session, loss: float) -> None:
        if self.bar is not None:
            info = _progress_info(session.state, loss)
            done = _done(session)
            self.bar.update(self.task, completed=done, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.remove_task(self.task)


def _step(session: _Session, inputs: Tensor, targets: Tensor) -> StepResult:
    """Set the scheduled learning rate, take one optimizer step, add it to the running sums."""
    state, config = session.state, session.config
    fraction, step_fraction = _budget_fraction(session)
    factor = lr_factor(config.schedule, fraction, step_fraction)
    for group, base in zip(session.optimizer.param_groups, session.base_lrs, strict=True):
        group["lr"] = base * factor
    result = train_step(
        session.model,
        session.optimizer,
        inputs.to(session.device, non_blocking=True),
        targets.to(session.device, non_blocking=True),
        nn.functional.cross_entropy,
        config.optimizer.bn_first_call_only,
    )
    state.add(result)
    if not math.isfinite(result.loss) and not state.diverged:
        state.diverged, state.diverged_step = True, state.step
    return result


def _train_epoch(
    session: _Session,
    stop: _StopFlag,
    bar: _Bar,
    on_step: Callable[[Progress], None] | None,
) -> None:
    """Steps from the current batch until the epoch ends, the budget is spent, a stop is
    asked for (on any rank) or the loss diverges; adds the time to ``wall_seconds``."""
    state, config = session.state, session.config
    loader = make_loader(
        session.bundle.train,
        config.data.batch_size,
        shuffle=True,
        seed=config.seed,
        epoch=state.epoch,
        start_batch=state.batch,
    )
    tick = session.epoch_started = time.perf_counter()
    for inputs, targets in loader:
        if session.exhausted():
            break
        result = _step(session, inputs, targets)
        bar.update(session, result.loss)
        if on_step is not None:
            on_step(state)
        if session.ranks.any(stop.requested, session.device):
            stop.requested = True
        if stop.requested or state.diverged:
            break
    session.epoch_started = None
    state.wall_seconds += time.perf_counter() - tick


# --------------------------------------------------------------------------- evaluation and metrics


def _epoch_metrics(session: _Session, partial: bool) -> dict[str, Any]:
    """The metrics row of the epoch just trained: its sums over ranks and the evaluations."""
    state, config, ranks, device = session.state, session.config, session.ranks, session.device
    test_loss, test_acc = evaluate(
        session.model, session.bundle.test, config.data.eval_batch_size, device, ranks
    )
    sums = [state.loss_sum, state.correct, state.count, state.proj_steps]
    sums += [state.proj_converged, state.proj_residual, state.proj_count]
    loss_sum, correct, count, p_steps, p_conv, p_res, p_count = ranks.sum(sums, device)
    row: dict[str, Any] = {
        "epoch": state.epoch + 1,
        "epochs": round(state.epoch + state.batch / session.steps_per_epoch, 6),
        "step": state.step,
        "train_loss": loss_sum / count if count else float("nan"),
        "train_accuracy": correct / count if count else float("nan"),
        "test_loss": test_loss,
        "test_accuracy": test_acc,
    }
    if session.bundle.val is not None:
        row["val_loss"], row["val_accuracy"] = evaluate(
            session.model, session.bundle.val, config.data.eval_batch_size, device, ranks
        )
    row["grad_evals"] = state.grad_evals
    row["wall_seconds"] = state.wall_seconds  # the evaluation's time is added by _close_epoch
    row["lr"] = session.optimizer.param_groups[0]["lr"]
    if p_count:
        row["proj_steps_mean"] = p_steps / p_count
        row["proj_converged_frac"] = p_conv / p_count
        row["proj_residual_mean"] = p_res / p_count
    if partial:
        row["partial_epoch"] = True
    if state.diverged:
        row["diverged"] = True
        row["diverged_step"] = state.diverged_step
    return row


def _close_epoch(session: _Session) -> None:
    """Evaluate, append the epoch's metrics row (evaluation time included), start the next
    epoch; the run is finished once the budget is spent or the loss diverged."""
    state = session.state
    tick = time.perf_counter()
    row = _epoch_metrics(session, partial=0 < state.batch < session.steps_per_epoch)
    state.metrics.append(row)
    state.epoch += 1
    state.start_epoch()
    state.wall_seconds += time.perf_counter() - tick
    row["wall_seconds"] = state.wall_seconds
    state.finished = session.exhausted() or state.diverged


# --------------------------------------------------------------------------- the run


def run(
    config: RunConfig,
    out_dir: str | Path | None,
    *,
    resume: bool = False,
    data: DataBundle | None = None,
    progress_bar: Any = None,
    on_step: Callable[[Progress], None] | None = None,
) -> RunResult:
    """Train ``config``; write into ``out_dir`` (``None``: keep everything in memory).

    ``resume`` continues from ``out_dir/checkpoint.pt``. ``data`` reuses loaded datasets.
    ``progress_bar`` is a ``rich.progress.Progress`` to report into. ``on_step`` is called
    after every step (tests use it to interrupt a run).
    """
    config.validate()
    init_from_env()  # under torchrun: join the process group (no-op otherwise)
    out = Path(out_dir) if out_dir is not None else None
    _check_out_dir(config, out, resume)
    # everything that can fail on bad input happens before the first file is written
    session = _set_up(config, out, data)
    _restore(session, resume)
    state = session.state
    if state.finished:
        return RunResult(out, state.metrics, diverged=state.diverged)
    bar = _Bar(progress_bar, session)
    stop = _StopFlag()
    interrupted = False
    session.model.train()
    with _graceful_sigint(stop):
        while not session.exhausted() and not state.diverged:
            _train_epoch(session, stop, bar, on_step)
            mid_epoch = state.batch < session.steps_per_epoch and not session.exhausted()
            if stop.requested and not state.diverged and mid_epoch:
                interrupted = True  # save the position inside the epoch; no metrics row
                _save(session)
                break
            _close_epoch(session)
            _save(session)
            if stop.requested:
                interrupted = not state.finished
                break
    bar.close()
    return RunResult(out, state.metrics, interrupted=interrupted, diverged=state.diverged)


def _budget_fraction(session: _Session) -> tuple[float, float]:
    """Fraction of the budget spent before the next step, and one step's share of it."""
    state, budget, steps_per_epoch = session.state, session.config.budget, session.steps_per_epoch
    if budget.wall_seconds is not None:
        spent = session.seconds()
        per_step = spent / state.step if state.step else 0.0
        return spent / budget.wall_seconds, per_step / budget.wall_seconds
    if budget.grad_evals is not None:
        per_step = state.grad_evals / state.step if state.step else 1.0
        return state.grad_evals / budget.grad_evals, per_step / budget.grad_evals
    total = (budget.epochs or 0) * steps_per_epoch
    return state.step / total, 1.0 / total


def _progress_info(state: Progress, loss: float) -> str:
    return f"epoch {state.epoch + 1}  loss {loss:.3g}  closure calls {state.grad_evals}"


def _done(session: _Session) -> float:
    """How much of the budget is spent, in the budget's unit."""
    state, budget = session.state, session.config.budget
    if budget.wall_seconds is not None:
        return session.seconds()
    return state.grad_evals if budget.grad_evals is not None else state.step


def run_file(
    path: str | Path, out_dir: str | Path, resume: bool = False, **kwargs: Any
) -> RunResult:
    """:func:`run` on a TOML configuration file."""
    return run(load_config(path), out_dir, resume=resume, **kwargs)
