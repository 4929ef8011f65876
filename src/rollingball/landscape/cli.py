"""`rollingball iron` and `rollingball landscape`: the microscope's two commands.

matplotlib, Pillow and rich are imported by the commands that draw, not at registration,
so that `rollingball --help` stays fast.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rollingball.cli import HelpFormatter, comma_separated_floats, one_line
from rollingball.landscape.functions import FUNCTIONS, get_function
from rollingball.landscape.ironing import iron, unreachable_from_ironed
from rollingball.landscape.trajectories import trajectory
from rollingball.optim.rbo import RBO

__all__ = ["add_parser"]


def _positive_radii(text: str) -> list[float]:
    radii = comma_separated_floats(text)
    if not radii or any(r <= 0 for r in radii):
        raise argparse.ArgumentTypeError(f"radii must be positive, got {text!r}")
    return radii


def add_parser(subparsers: Any) -> None:
    """Register the ``iron`` and ``landscape`` sub-commands."""
    _add_iron(subparsers)
    _add_landscape(subparsers)


def _add_iron(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "iron",
        help="iron a synthetic landscape at several radii and run RBO and GD on it",
        description="Writes ironed.png, trajectories.png and trajectories.csv to --out.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("function", choices=sorted(FUNCTIONS), help="synthetic landscape")
    p.add_argument("--dim", type=int, choices=(1, 2), default=1, help="dimension")
    p.add_argument(
        "--radii", type=_positive_radii, default="0.01,0.1,1", help="ball radii, comma-separated"
    )
    p.add_argument(
        "--start", type=comma_separated_floats, action="append",
        help="start point, comma-separated (one value is used for every coordinate); repeat "
        "for several starts (default: the function's own start)",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=500, help="optimizer steps per run")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of RBO and GD")
    p.add_argument(
        "--projection", choices=("anderson", "gd"), default="anderson", help="RBO's solver"
    )
    p.add_argument("--projection-steps", type=int, default=20, help="K, at most per step")
    p.add_argument("--projection-step-size", type=float, default=1.0, help="γ")
    p.add_argument(
        "--projection-tol", type=float, default=1e-4,
        help="relative residual to stop at; 0 runs every projection step (the authors' "
        "scheme with --projection gd)",
    )  # fmt: skip
    p.add_argument("--anderson-memory", type=int, default=5, help="m of the Anderson solver")
    p.add_argument(
        "--domain", type=comma_separated_floats,
        help="LO,HI of every coordinate (default: the function's box; a negative LO needs "
        "--domain=LO,HI)",
    )  # fmt: skip
    p.add_argument("--points", type=int, help="grid points per axis (default: 1-D 4001, 2-D 201)")
    p.add_argument("--out", type=Path, default=Path("out/iron"), help="output directory")
    p.set_defaults(func=run_iron)


def _add_landscape(subparsers: Any) -> None:
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
        "--radii", type=_positive_radii, default="0.05,0.2", help="ball radii, comma-separated"
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


def _warn_if_finer_than_grid(command: str, radii: list[float], spacing: float) -> None:
    """One line on stderr per radius below the grid spacing: such a ball irons nothing."""
    for radius in radii:
        if radius < spacing:
            print(
                f"rollingball {command}: warning: radius {radius:g} is below the grid spacing "
                f"{spacing:.3g}, so ironing at it changes nothing; use more --points or a "
                "larger radius",
                file=sys.stderr,
            )


def run_iron(args: argparse.Namespace) -> int:
    """Ironed figure, trajectories figure and a CSV of the runs' end points."""
    from rollingball.landscape.plots import Run, plot_ironed, plot_trajectories, save_png

    fn = get_function(args.function, args.dim)
    if args.domain is not None and (len(args.domain) != 2 or args.domain[0] >= args.domain[1]):
        raise ValueError(f"--domain needs LO,HI with LO < HI, got {args.domain}")
    lo, hi = args.domain if args.domain else fn.domain
    points = args.points or (4001 if args.dim == 1 else 201)
    if points < 3:
        raise ValueError(f"--points needs at least 3, got {points}")
    if args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    axis = np.linspace(lo, hi, points)
    spacing = float(axis[1] - axis[0])
    _warn_if_finer_than_grid("iron", args.radii, spacing)
    mesh = torch.meshgrid(*[torch.from_numpy(axis)] * args.dim, indexing="ij")
    points_flat = torch.stack(mesh, -1).reshape(-1, args.dim)
    with torch.no_grad():  # in chunks: gaussian_wells holds a (points, wells, d) difference
        chunks = [fn(chunk) for chunk in points_flat.split(4096)]
    values = torch.cat(chunks).reshape(mesh[0].shape).numpy()
    surfaces = {r: iron(values, spacing, r) for r in args.radii}
    grid = [axis] * args.dim
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{fn.name} ({args.dim}-D)"
    figure = plot_ironed(grid, values, surfaces, f"{name}: ironed at each radius")
    save_png(figure, args.out / "ironed.png")

    starts = args.start or [[fn.start]]
    runs, rows = [], []
    for start in starts:
        if len(start) not in (1, args.dim):
            raise ValueError(f"--start needs 1 or {args.dim} values, got {len(start)}")
        theta0 = torch.tensor(start * args.dim if len(start) == 1 else start, dtype=torch.float64)
        where = ",".join(f"{v:g}" for v in theta0.tolist())
        configs = [("GD", 0.0)] + [("RBO", r) for r in args.radii]
        for label, radius in configs:

            def make(params: list[torch.Tensor], radius: float = radius) -> torch.optim.Optimizer:
                if radius == 0:
                    return torch.optim.SGD(params, lr=args.lr)
                return RBO(
                    params, lr=args.lr, radius=radius, projection=args.projection,
                    projection_steps=args.projection_steps,
                    projection_step_size=args.projection_step_size,
                    projection_tol=args.projection_tol, anderson_memory=args.anderson_memory,
                )  # fmt: skip

            run = trajectory(fn, theta0, make, args.steps)
            full = f"{label} from ({where})" if len(starts) > 1 else label
            runs.append(Run(full, radius, run))
            end = run.end.tolist()
            rows.append(
                {"optimizer": label, "radius": radius, "start": where, "lr": args.lr,
                 "steps": args.steps, **{f"end_{i}": v for i, v in enumerate(end)},
                 "final_loss": float(run.loss[-1]), "closure_calls": int(run.closure_calls[-1]),
                 "unconverged_steps": run.unconverged_steps,
                 "longest_step": float(run.step_lengths.max()) if args.steps else 0.0}
            )  # fmt: skip
    title = f"{name}: RBO (warm colours) and GD (cool), lr {args.lr:g}, {args.steps} steps"
    figure = plot_trajectories(grid, values, surfaces, runs, title)
    save_png(figure, args.out / "trajectories.png")
    with open(args.out / "trajectories.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(
            f"{row['optimizer']:>4} ρ={row['radius']:<6g} from ({row['start']}): "
            f"loss {row['final_loss']:.6g} after {row['closure_calls']} closure calls, "
            f"longest step {row['longest_step']:.3g}, {row['unconverged_steps']} unconverged"
        )
    print(f"wrote {args.out}/ironed.png, trajectories.png, trajectories.csv")
    return 0


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
    _warn_if_finer_than_grid("landscape", args.radii, 2 * args.span / (args.points - 1))
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
