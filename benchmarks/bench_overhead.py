"""Optimizer overhead: time in `opt.step` beyond the time spent inside the closure.

    python benchmarks/bench_overhead.py [--steps 20] [--threads 2] [--device cpu|cuda]

MLP 784-1024-1024-10, batch 256. Prints, per optimizer, closure calls per step and
overhead = (step time − closure time) / closure time, all measured side by side in one run:
SGD, RBO at radius 0, the authors' scheme (gd) and Anderson at K = 8 fixed projection
iterations (tol = 0, the issue's setting), and RBO's defaults. The closure's forward and
backward are the real work. On CUDA every closure and step is timed after a synchronisation.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from rollingball import RBO


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, build, steps: int, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    device = x.device
    model = make_model().to(device)
    opt = build(model.parameters())
    inside = [0.0]
    calls = [0]

    def closure():
        _sync(device)
        start = time.perf_counter()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        _sync(device)
        inside[0] += time.perf_counter() - start
        calls[0] += 1
        return loss

    for _ in range(2):  # warm-up: allocator, kernels, momentum buffers
        opt.step(closure)
    inside[0], calls[0] = 0.0, 0
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        opt.step(closure)
    _sync(device)
    total = time.perf_counter() - start
    overhead = (total - inside[0]) / inside[0]
    print(f"{name:34s} {calls[0] / steps:6.1f} {overhead * 100:9.1f}%  {total / steps * 1e3:9.1f}")
    return calls[0] / steps, overhead


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(256, 784, generator=generator).to(args.device),
        torch.randint(0, 10, (256,), generator=generator).to(args.device),
    )
    fixed = {"projection_steps": 8, "projection_tol": 0.0}
    print(f"{'optimizer':34s} {'calls':>6s} {'overhead':>10s} {'ms/step':>9s}")
    measure("SGD", lambda p: torch.optim.SGD(p, lr=0.1), args.steps, x, y)
    measure("RBO radius=0 (SGD path)", lambda p: RBO(p, lr=0.1, radius=0.0), args.steps, x, y)
    measure(
        "RBO gd, K=8",
        lambda p: RBO(p, lr=0.1, radius=0.5, projection="gd", projection_step_size=0.5, **fixed),
        args.steps,
        x,
        y,
    )
    for memory in (5, 2, 1):
        measure(
            f"RBO anderson m={memory}, K=8",
            lambda p, m=memory: RBO(p, lr=0.1, radius=0.5, anderson_memory=m, **fixed),
            args.steps,
            x,
            y,
        )
    measure("RBO defaults", lambda p: RBO(p, lr=0.1, radius=0.5), args.steps, x, y)


if __name__ == "__main__":
    main()
