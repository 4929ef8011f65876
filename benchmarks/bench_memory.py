"""Memory: optimizer state and peak transient allocations per step, in parameter sizes.

    python benchmarks/bench_memory.py

MLP 784-1024-1024-10 (1.86 M parameters), batch 64. For each optimizer: the persistent state
(momentum buffers) and the peak of what `step` allocates outside the closure, both divided by
the parameters' bytes, measured by `rollingball.optim.memory.peak_step_memory`.
"""

from __future__ import annotations

import torch
from torch import nn

from rollingball import RBO
from rollingball.optim.memory import peak_step_memory

OPTIMIZERS = {
    "SGD momentum 0.9": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "RBO radius 0": lambda p: RBO(p, lr=0.1, radius=0.0),
    "RBO gd": lambda p: RBO(p, lr=0.1, radius=0.5, projection="gd", projection_steps=8),
    "RBO gd, momentum 0.9": lambda p: RBO(
        p, lr=0.1, radius=0.5, projection="gd", projection_steps=8, momentum=0.9
    ),
    "RBO anderson m=5": lambda p: RBO(p, lr=0.1, radius=0.5, projection_steps=8, projection_tol=0),
    "RBO anderson m=2": lambda p: RBO(
        p, lr=0.1, radius=0.5, projection_steps=8, projection_tol=0, anderson_memory=2
    ),
}


def main() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
    print(f"{'optimizer':24s} {'state / params':>15s} {'peak step / params':>19s}")
    for name, build in OPTIMIZERS.items():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
        )
        opt = build(model.parameters())

        def closure(model=model, opt=opt):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)  # the first step creates the state
        memory = peak_step_memory(opt, closure)
        print(f"{name:24s} {memory.state_buffers:15.2f} {memory.peak_buffers:19.2f}")


if __name__ == "__main__":
    main()
