"""Contact point and ball centre of RBO on f(x) = ½x² + 0.05 sin(50x), η = 0.01, from x = 2.

    .venv/bin/python docs/figures/algorithm/wrinkle_hopping.py

Writes wrinkle_hopping.png next to this file and prints the figures quoted in docs/algorithm.md.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from rollingball import RBO
from rollingball.optim.geometry import ball_centre


def wrinkled(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x**2 + 0.05 * torch.sin(50 * x)


def roll(radius: float, steps: int = 3000):
    x = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    opt = RBO([x], lr=0.01, radius=radius, projection_steps=20, anderson_memory=5)  # converged

    def closure():
        opt.zero_grad()
        loss = wrinkled(x).sum()
        loss.backward()
        return loss

    contact, centre, calls = [], [], []
    for _ in range(steps):
        opt.step(closure)
        point = x.detach().clone().requires_grad_(True)
        value = wrinkled(point).sum()
        (grad,) = torch.autograd.grad(value, point)
        c, _ = ball_centre([point.detach()], [grad], value.item(), radius)
        contact.append(point.item())
        centre.append(c[0].item())
        calls.append(opt.last_stats["grad_evals"])
    return np.array(contact), np.array(centre), np.array(calls)


def main() -> None:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8), gridspec_kw={"height_ratios": [1, 1.2]})
    end = {}
    for radius, colour in [
        (0.0, "tab:grey"),
        (0.01, "tab:blue"),
        (0.2, "tab:red"),
        (0.5, "tab:orange"),
        (1.0, "tab:green"),
    ]:
        contact, centre, calls = roll(radius)
        losses = wrinkled(torch.from_numpy(contact)).numpy()
        jumps = np.abs(np.diff(contact[-200:]))
        print(
            f"radius {radius:4}: end x = {contact[-1]:+.4f}, f = {losses[-1]:.4f}, "
            f"closure calls/step {calls.mean():.2f}, over the last 200 steps: contact x in "
            f"[{contact[-200:].min():+.3f}, {contact[-200:].max():+.3f}], "
            f"mean jump {jumps.mean():.4f}"
        )
        label = "gradient descent (ρ = 0)" if radius == 0 else f"ρ = {radius}"
        top.plot(losses, color=colour, lw=0.8, label=label)
        end[radius] = (contact, centre)
    top.set_yscale("log")
    top.set_xlabel("step")
    top.set_ylabel("f(contact point)")
    top.set_title("RBO on f(x) = ½x² + 0.05 sin(50x), η = 0.01, from x = 2")
    top.legend(fontsize=8, ncol=3)

    contact, centre = end[0.2]
    grid = torch.linspace(-0.45, 0.55, 4001, dtype=torch.float64)
    bottom.plot(grid, wrinkled(grid), color="black", lw=1)
    for step, colour in [(-2, "tab:red"), (-1, "tab:purple")]:
        x = contact[step]
        point = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        value = wrinkled(point)
        (grad,) = torch.autograd.grad(value, point)
        s = float(np.sqrt(1 + grad.item() ** 2))
        cx, cy = x - 0.2 * grad.item() / s, value.item() + 0.2 / s
        bottom.add_patch(plt.Circle((cx, cy), 0.2, fill=False, color=colour, lw=1.4))
        bottom.plot(
            [x],
            [value.item()],
            "o",
            color=colour,
            ms=5,
            label=f"step {3000 + step + 1}: contact x = {x:+.3f}",
        )
        bottom.plot([cx], [cy], "+", color=colour, ms=9)
    bottom.set_aspect("equal")
    bottom.set_xlim(-0.45, 0.55)
    bottom.set_ylim(-0.1, 0.5)
    bottom.set_xlabel("x")
    bottom.set_title(
        "ρ = 0.2 at the end: the contact point alternates between two wrinkle flanks", fontsize=10
    )
    bottom.legend(fontsize=8, loc="upper center")
    fig.tight_layout()
    fig.savefig(Path(__file__).with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
