"""Seconds per 60,000-image epoch of SGD (batch 128, one thread) for the 28×28 models,
timed in turns in one process, so that their ratios hold on a busy machine.

    python benchmarks/bench_fmnist_models.py [--models mlp,cnn2d,small_cnn,resnet6] [--steps 20]

Each round takes ``--steps`` SGD steps (forward, backward, update; random inputs, training
mode) of every model in turn; the figure is the best of ``--rounds`` rounds, scaled to the
469 steps of one epoch.
"""

from __future__ import annotations

import argparse
import time

import torch

from rollingball.experiments.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn2d,small_cnn,resnet6")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    models = {}
    for name in args.models.split(","):
        model = build_model(name, (1, 28, 28), 10)
        models[name] = (model, torch.optim.SGD(model.parameters(), lr=0.01))

    def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    for model, optimizer in models.values():
        for _ in range(3):  # warm-up
            step(model, optimizer)
    best = dict.fromkeys(models, float("inf"))
    for _ in range(args.rounds):
        for name, (model, optimizer) in models.items():
            tick = time.perf_counter()
            for _ in range(args.steps):
                step(model, optimizer)
            best[name] = min(best[name], (time.perf_counter() - tick) / args.steps)
    reference = best.get("cnn2d")
    for name, seconds in best.items():
        ratio = f"  ({seconds / reference:.2f}× cnn2d)" if reference else ""
        print(f"{name:>10}: {469 * seconds:6.1f} s per 60,000-image epoch{ratio}")


if __name__ == "__main__":
    main()
