"""How often the blind last step is taken, and how often it leaves φ worse than the last
evaluated point, on random 1-D and 2-D landscapes.

    python benchmarks/bench_blind_step.py [--samples 600]

One RBO step (float64) from a random start with random η ∈ [0.01, 1.5], ρ ∈ [0.01, 3], budget
K ∈ {1, …, 4}, Anderson memory ∈ {1, 2, 3} and tolerance 1e-10, on two families:
- smooth: ½ Σ λ_i x_i² + q/4 Σ x_i⁴ + b exp(−‖x − c‖²/2w²), λ ∈ [−1, 8], w ∈ [0.5, 2];
- wrinkled: ½ Σ λ_i x_i² + a Π sin(ω x_i), a ∈ [0, 0.2], ω ∈ [0.5, 30] (wrinkles narrower
  than one step).
Prints, per family, the blind steps taken and those that left φ = ½‖x − θ̃‖² + ½(f(x) − ỹ)²
above its value at the last evaluated point.
"""

from __future__ import annotations

import argparse
import random

import torch

from stepping import moved_centre, phi, roll_once, smooth_bowl


def smooth(rng: random.Random, dim: int):
    scale = [rng.uniform(-1, 8) for _ in range(dim)]
    quartic, bump, width = rng.uniform(0, 1), rng.uniform(-2, 2), rng.uniform(0.5, 2)
    return smooth_bowl(scale, quartic, bump, width, [rng.uniform(-2, 2) for _ in range(dim)])


def wrinkled(rng: random.Random, dim: int):
    scale = torch.tensor([rng.uniform(-1, 8) for _ in range(dim)], dtype=torch.float64)
    amplitude, frequency = rng.uniform(0, 0.2), rng.uniform(0.5, 30)

    def f(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (scale * x * x).sum() + amplitude * torch.sin(frequency * x).prod()

    return f


def one_sample(rng: random.Random, family) -> tuple[bool, bool]:
    """(blind step taken, and it left φ worse than the last evaluated point)."""
    dim = rng.randint(1, 2)
    f = family(rng, dim)
    theta = torch.tensor([rng.uniform(-2, 2) for _ in range(dim)], dtype=torch.float64)
    lr, radius = rng.uniform(0.01, 1.5), rng.uniform(0.01, 3)
    budget, memory = rng.randint(1, 4), rng.randint(1, 3)
    opt, x, points = roll_once(
        f,
        theta,
        lr=lr,
        radius=radius,
        projection_steps=budget,
        projection_tol=1e-10,
        anderson_memory=memory,
    )
    if not opt.last_stats["blind_step"]:
        return False, False
    centre, height = moved_centre(f, theta, lr, radius)
    last = phi(f, points[-1], centre, height)
    return True, phi(f, x, centre, height) > last * (1 + 1e-12) + 1e-15


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=600)
    args = parser.parse_args()
    for name, family in (("smooth", smooth), ("wrinkled", wrinkled)):
        rng = random.Random(0)
        outcomes = [one_sample(rng, family) for _ in range(args.samples)]
        taken = sum(t for t, _ in outcomes)
        worse = sum(w for _, w in outcomes)
        print(
            f"{name:9s} {args.samples} steps: blind step taken {taken}, worse than the last "
            f"evaluated point {worse}"
        )


if __name__ == "__main__":
    main()
