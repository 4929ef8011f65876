"""`rollingball iron`: the microscope on a synthetic landscape.

(`rollingball landscape`, which slices a model trained by the harness, is registered by
`rollingball.experiments.landscape_cli`: the harness uses the landscape tools, not the reverse.)
matplotlib and Pillow are imported by the command that draws, not at registration, so that
`rollingball --help` stays fast.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rollingball.arguments import HelpFormatter, comma_separated_floats, positive_radii
from rollingball.landscape.functions import FUNCTIONS, get_function
from rollingball.landscape.ironing import iron
from rollingball.landscape.trajectories import trajectory
from rollingball.optim.rbo import RBO

__all__ = ["add_parser"]


def add_parser(subparsers: Any) -> None:
    """Register the ``iron`` sub-command."""
    p = subparsers.add_parser(
        "iron",
        help="iron a synthetic landscape at several radii and run RBO and GD on it",
        description="Writes ironed.png, trajectories.png and trajectories.csv to --out.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("function", choices=sorted(FUNCTIONS), help="synthetic landscape")
    p.add_argument("--dim", type=int, choices=(1, 2), default=1, help="dimension")
    p.add_argument(
        "--radii", type=positive_radii, default="0.01,0.1,1", help="ball radii, comma-separated"
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


def warn_if_finer_than_grid(command: str, radii: list[float], spacing: float) -> None:
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
    warn_if_finer_than_grid("iron", args.radii, spacing)
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
