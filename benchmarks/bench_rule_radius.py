"""The rule for rejected trial points against the radius, on real images: one epoch of the
study's GELU MLP (784-100-100-10) on Fashion-MNIST, RBO at lr 0.3 and its default projection,
each rule of `bench_relu_stall.RULES` at each radius, side by side in one process.

    python benchmarks/bench_rule_radius.py [--radii 0.1,1,3] [--rules halving,current] [--epochs 1]

Prints the validation accuracy (the study's 10,000-image split), closure calls, and the
share of steps that moved nothing. At ρ ≥ 1 the projection of this MLP does not converge
within the budget on any step, and the rule decides what the step becomes.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from bench_relu_stall import RULES, set_rule
from rollingball.experiments.config import (
    BudgetConfig,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    ScheduleConfig,
)
from rollingball.experiments.runner import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--radii", default="0.1,1,3")
    parser.add_argument("--rules", default="halving,halving+2,interpolation+0,current")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # the ProjectionWarning at ρ ≥ 1 is the point here
    print(f"GELU MLP, Fashion-MNIST, lr {args.lr}, {args.epochs} epoch(s), batch 128, cosine")
    print(f"{'rule':>16} {'radius':>6} {'val acc. %':>10} {'calls':>7} {'residual':>9}")
    for radius in (float(r) for r in args.radii.split(",")):
        for rule in args.rules.split(","):
            if rule not in RULES:
                raise SystemExit(f"unknown rule {rule!r}; choose from {', '.join(RULES)}")
            set_rule(rule)
            config = RunConfig(
                seed=0,
                threads=1,
                data=DataConfig(
                    name="fashion_mnist",
                    batch_size=128,
                    data_dir=args.data_dir,
                    val_fraction=10_000 / 60_000,
                    split_seed=0,
                ),
                model=ModelConfig(name="mlp", kwargs={"activation": "gelu"}),
                optimizer=OptimizerConfig(name="rbo", hparams={"lr": args.lr, "radius": radius}),
                schedule=ScheduleConfig(kind="cosine"),
                budget=BudgetConfig(epochs=args.epochs),
            )
            final = run(config, None).final
            print(
                f"{rule:>16} {radius:>6g} {100 * final['val_accuracy']:>10.2f} "
                f"{final['grad_evals']:>7,} {final.get('proj_residual_mean', float('nan')):>9.3g}",
                flush=True,
            )


if __name__ == "__main__":
    main()
