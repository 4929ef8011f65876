"""`rollingball landscape`: loss slices of a model trained by the harness, ironed.

It loads the harness's data, models and checkpoints and uses the landscape tools on them;
matplotlib, Pillow and rich are imported when it runs, not at registration.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rollingball.arguments import HelpFormatter, comma_separated_floats, one_line, positive_radii
from rollingball.landscape.cli import warn_if_finer_than_grid
from rollingball.landscape.ironing import unreachable_from_ironed

__all__ = ["add_parser"]


def add_parser(subparsers: Any) -> None:
    """Register the ``landscape`` sub-command."""
    from rollingball.experiments.data import DATASETS
    from rollingball.experiments.models import MODELS

    p = subparsers.add_parser(
        "landscape",
        help="loss slices of a trained model along filter-normalised directions, ironed",
        description="Writes slice.png, slice.csv and slice.json to --out.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--state-dict", type=Path, required=True,
        help="a state_dict file, or a training checkpoint holding it under 'model'",
    )  # fmt: skip
    p.add_argument("--model", default="mlp", choices=sorted(MODELS), help="model (registry)")
    p.add_argument(
        "--hidden", type=comma_separated_floats, help="hidden widths of an mlp, e.g. 64,64"
    )
    p.add_argument("--data", default="digits", choices=DATASETS, help="data set")
    p.add_argument("--data-dir", type=Path, help="directory with the dataset files")
    p.add_argument("--split", choices=("train", "test"), default="train", help="data split")
    p.add_argument("--max-samples", type=int, help="use the first N samples only")
    p.add_argument("--batch-size", type=int, default=1024, help="evaluation batch size")
    p.add_argument("--dim", type=int, choices=(1, 2), default=2, help="slice dimension")
    p.add_argument("--span", type=float, default=1.0, help="coordinates in [-S, S]")
    p.add_argument("--points", type=int, default=21, help="grid points per axis")
    p.add_argument(
        "--radii", type=positive_radii, default="0.05,0.2", help="ball radii, comma-separated"
    )
    p.add_argument(
        "--include-1d", action="store_true",
        help="also move biases and norm weights (left out in Li et al.)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    p.add_argument(
        "--train-mode", action="store_true", help="evaluate in train mode (default: eval mode)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", type=Path, default=Path("out/landscape"), help="output directory")
    p.set_defaults(func=run_landscape)


def run_landscape(args: argparse.Namespace) -> int:
    """Slice figure with its ironed versions, the slice's values (CSV) and settings (JSON)."""
    from rollingball.experiments.data import TensorData, load_data
    from rollingball.experiments.models import build_model
    from rollingball.landscape.plots import plot_ironed, save_png
    from rollingball.landscape.sharpness import dataset_loss
    from rollingball.landscape.slices import filter_normalized_direction, ironed_slices, loss_slice

    bundle = load_data(args.data, args.data_dir)
    dataset = bundle.train if args.split == "train" else bundle.test
    if not isinstance(dataset, TensorData):
        raise ValueError(f"{args.data} {args.split} is not held as tensors; cannot slice it")
    total = len(dataset)
    count = total if args.max_samples is None else min(args.max_samples, total)
    inputs, targets = dataset.inputs[:count], dataset.targets[:count]
    kwargs = {} if args.hidden is None else {"hidden": [int(h) for h in args.hidden]}
    model = build_model(args.model, bundle.input_shape, bundle.num_classes, **kwargs)
    _load_weights(model, args.state_dict)
    model.train(args.train_mode)
    batches = list(zip(inputs.split(args.batch_size), targets.split(args.batch_size), strict=True))
    loss_fn = dataset_loss(model, torch.nn.functional.cross_entropy, batches)
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(args.seed)
    directions = [
        filter_normalized_direction(params, args.include_1d, generator) for _ in range(args.dim)
    ]
    if args.points < 2 or args.span <= 0:
        raise ValueError(f"need --points >= 2 and --span > 0, got {args.points} and {args.span}")
    axis = np.linspace(-args.span, args.span, args.points)
    warn_if_finer_than_grid("landscape", args.radii, 2 * args.span / (args.points - 1))
    values = loss_slice(
        loss_fn, params, directions, [axis] * args.dim, progress=not args.no_progress
    )
    surfaces = ironed_slices(values, [axis] * args.dim, args.radii)
    args.out.mkdir(parents=True, exist_ok=True)
    title = f"{args.model} on {args.data} ({args.split}, {count} samples): loss slice"
    labels = ("α (direction 1)", "β (direction 2)")
    save_png(
        plot_ironed([axis] * args.dim, values, surfaces, title, labels), args.out / "slice.png"
    )
    columns = ["alpha", "beta"][: args.dim] + ["loss"] + [f"ironed_{r:g}" for r in args.radii]
    with open(args.out / "slice.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for index in np.ndindex(values.shape):
            coordinates = [axis[i] for i in index]
            writer.writerow([*coordinates, values[index], *(s[index] for s in surfaces.values())])
    with torch.no_grad():
        trained = float(loss_fn())
    summary = {
        "model": args.model, "data": args.data, "split": args.split, "samples": count,
        "mode": "train" if args.train_mode else "eval", "seed": args.seed,
        "loss_at_trained": trained, "min_loss": float(values.min()),
        "unreachable_fraction": {f"{r:g}": float(unreachable_from_ironed(values, s, r).mean())
                                 for r, s in surfaces.items()},
    }  # fmt: skip
    (args.out / "slice.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"loss at the trained parameters {trained:.6g}; wrote {args.out}/")
    return 0


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a state_dict (or a checkpoint's "model") into ``model``; a mismatch is a ValueError."""
    from rollingball.experiments.runner import load_checkpoint

    payload = load_checkpoint(path)
    if not isinstance(payload, dict):
        raise ValueError(f"{path} holds a {type(payload).__name__}, not a state_dict")
    try:
        model.load_state_dict(payload.get("model", payload))
    except RuntimeError as error:  # missing or unexpected keys, shapes that differ
        raise ValueError(
            f"{path} does not fit this model (check --model and --hidden): {one_line(error)}"
        ) from None
