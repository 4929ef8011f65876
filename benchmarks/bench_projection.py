"""Projection cost: closure calls the default solver needs, against the authors' scheme.

    python benchmarks/bench_projection.py [--device cpu|cuda]

A tanh MLP 64-32-10 on one batch of 256 of scikit-learn's bundled digits, in float64, at a
point reached by 20 SGD steps. For each (η, ρ): the exact contact point is a long converged
run (tolerance 1e-13); the default solver ("anderson", tol 1e-4, up to 500 iterations so that
it meets its tolerance) spends n closure calls and
lands at distance e from it; the authors' scheme ("gd", γ = 0.1, no stopping test) needs
K closure calls to come as close. Prints n, e, K and the ratio K / n. Also per memory m.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from stepping import digits, one_step, sgd_steps

SETTINGS = [(0.5, 0.1), (0.5, 1.0), (1.0, 0.5)]


def problem(device: str = "cpu") -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    x, y = digits(256, device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double().to(device)
    return sgd_steps(model, x, y, lr=0.5, steps=20), x, y


def gd_calls_to_reach(start, x, y, lr, radius, exact, error) -> int | None:
    """Fewest closure calls K for which gd (γ = 0.1, tol 0) lands within `error` of `exact`."""

    def close_enough(k: int) -> bool:
        point, _ = one_step(
            start,
            x,
            y,
            lr=lr,
            radius=radius,
            projection="gd",
            projection_steps=k,
            projection_step_size=0.1,
            projection_tol=0.0,
        )
        return float((point - exact).norm()) <= error

    high = 1
    while not close_enough(high):
        high *= 2
        if high > 4096:
            return None
    low = high // 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if close_enough(middle) else (middle, high)
    return high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    start, x, y = problem(parser.parse_args().device)
    print(
        f"{'lr':>4s} {'radius':>6s} {'m':>2s} {'anderson calls':>15s} {'error':>9s} "
        f"{'gd(0.1) calls':>14s} {'ratio':>6s}"
    )
    for lr, radius in SETTINGS:
        exact, stats = one_step(
            start, x, y, lr=lr, radius=radius, projection_tol=1e-13, projection_steps=500
        )
        if not stats["converged"]:
            residual = stats["residual"]
            print(
                f"{lr:4.1f} {radius:6.1f}  exact contact point not found (residual {residual:.1e})"
            )
            continue
        for memory in (5, 2, 1):
            point, stats = one_step(
                start,
                x,
                y,
                lr=lr,
                radius=radius,
                anderson_memory=memory,
                projection_steps=500,
                projection_tol=1e-4,
            )
            error = float((point - exact).norm())
            calls = stats["grad_evals"]
            gd = gd_calls_to_reach(start, x, y, lr, radius, exact, error)
            ratio = f"{gd / calls:6.1f}" if gd else "  >4096 calls"
            gd_calls = gd or "-"
            row = f"{lr:4.1f} {radius:6.1f} {memory:2d} {calls:15d} {error:9.1e}"
            print(f"{row} {gd_calls:>14} {ratio}")


if __name__ == "__main__":
    main()
