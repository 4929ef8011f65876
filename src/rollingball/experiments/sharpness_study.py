"""Sharpness of finished runs' final weights, and a filter-normalised slice through them.

For the study (:mod:`rollingball.experiments.study`): λ_max by Lanczos and tr ∇²L by
Hutchinson (:mod:`rollingball.landscape.sharpness`) of the training loss on a fixed subset of
the training split, in eval mode (BatchNorm's running statistics, no Dropout); each result is
cached in the run's directory as ``sharpness.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rollingball.experiments.atomic import atomic_write_text
from rollingball.experiments.config import RunConfig, config_from_dict, config_to_dict
from rollingball.experiments.models import build_model
from rollingball.experiments.runner import CHECKPOINT, load_checkpoint, read_metrics

__all__ = ["measure", "measure_all", "plot_slices"]

SUBSET = 2_000
RESULT = "sharpness.json"
SLICED = ("sgd", "sam", "rbo_best_radius")


def _model_and_batches(
    path: Path, config: RunConfig
) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The run's final model (eval mode) and the fixed subset: the first SUBSET images of
    its training split, in batches of 500."""
    bundle = config.data.load(config.seed)
    model = build_model(
        config.model.name, bundle.input_shape, bundle.num_classes, **config.model.kwargs
    )
    model.load_state_dict(load_checkpoint(path / CHECKPOINT)["model"])
    model.eval()
    n = min(SUBSET, len(bundle.train))  # type: ignore[arg-type]
    x, y = bundle.train[list(range(n))]
    return model, list(zip(x.split(500), y.split(500), strict=True))


def measure(path: str, raw: dict[str, Any], lanczos: int, hutchinson: int) -> dict[str, Any]:
    """λ_max, trace and loss of the run in ``path`` on the subset; cached in sharpness.json."""
    from rollingball.landscape.sharpness import dataset_loss, hessian_top_eigenvalue, hessian_trace

    out = Path(path) / RESULT
    if out.exists():
        return dict(json.loads(out.read_text()))
    torch.set_num_threads(1)
    config = config_from_dict(raw)
    model, batches = _model_and_batches(Path(path), config)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = dataset_loss(model, nn.functional.cross_entropy, batches)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        loss = float(loss_fn())
    result = {
        "lambda_max": hessian_top_eigenvalue(loss_fn, params, lanczos, generator=generator),
        "trace": hessian_trace(loss_fn, params, hutchinson, generator=generator),
        "loss": loss,
        "test_accuracy": float(read_metrics(path)[-1]["test_accuracy"]),
        "lanczos_iterations": lanczos,
        "hutchinson_samples": hutchinson,
        "subset": sum(len(b[1]) for b in batches),
    }
    atomic_write_text(out, json.dumps(result, indent=1))
    return result


def measure_all(
    tasks: Sequence[tuple[Path, RunConfig]],
    scale: Any,
    jobs: int,
    log: Callable[[str], None],
    compute: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """:func:`measure` for every finished, non-diverged run (``compute`` false: only those
    measured before); results grouped by label."""
    todo = [
        (p, c)
        for p, c in tasks
        if (p / CHECKPOINT).exists()
        and load_checkpoint(p / CHECKPOINT)["progress"]["finished"]
        and not read_metrics(p)[-1].get("diverged")
        and (compute or (p / RESULT).exists())
    ]
    args = [(str(p), config_to_dict(c), scale.lanczos, scale.hutchinson) for p, c in todo]
    results: dict[str, dict[str, Any]] = {}
    if jobs <= 1:
        for a in args:
            results[a[0]] = measure(*a)
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(measure, *a): a[0] for a in args}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
    log(f"  sharpness of {len(results)} run(s)")
    groups: dict[str, list[dict[str, Any]]] = {}
    for p, _ in todo:
        groups.setdefault(p.parent.name, []).append(results[str(p)])
    return groups


def plot_slices(
    tasks: Sequence[tuple[Path, RunConfig]], scale: Any, path: Path, title: str
) -> Path | None:
    """L(θ + α d) on the subset for α in [−1, 1], d filter-normalised (the same random seed
    for every run), through the seed-0 final weights of SGD, SAM and RBO; one PNG."""
    from rollingball.experiments.plots import _pyplot
    from rollingball.landscape.sharpness import dataset_loss
    from rollingball.landscape.slices import filter_normalized_direction, loss_slice

    chosen = [
        (p, c)
        for p, c in tasks
        if p.parent.name in SLICED and p.name == "seed0" and (p / CHECKPOINT).exists()
    ]
    if not chosen:
        return None
    torch.set_num_threads(1)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    alphas = np.linspace(-1.0, 1.0, scale.slice_points)
    for p, config in chosen:
        model, batches = _model_and_batches(p, config)
        params = [q for q in model.parameters() if q.requires_grad]
        direction = filter_normalized_direction(params, generator=torch.Generator().manual_seed(0))
        loss_fn = dataset_loss(model, nn.functional.cross_entropy, batches)
        values = loss_slice(loss_fn, params, [direction], [alphas])
        ax.plot(alphas, values, label=p.parent.name)
    ax.set_yscale("log")
    ax.set_xlabel("α (filter-normalised direction, seed 0)")
    ax.set_ylabel(f"training loss on {SUBSET:,} images")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
