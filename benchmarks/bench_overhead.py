"""Optimizer overhead: time in `opt.step` beyond the time spent inside the closure.

    python benchmarks/bench_overhead.py [--steps 20] [--rounds 3] [--threads 2] [--device cpu|cuda]
    python benchmarks/bench_overhead.py --threads 1 --clock cpu
    python benchmarks/bench_overhead.py --depth 100 --width 64   # many small tensors

MLP 784-1024-1024-10 (`--depth` hidden layers of `--width`: 2 of 1024), batch 256. Prints,
per optimizer, closure calls per step and
overhead = (step time − closure time) / closure time, all measured side by side in one run:
SGD, RBO at radius 0, the authors' scheme (gd) and Anderson at K = 8 fixed projection
iterations (tol = 0), and RBO's defaults. Next to the time it prints how many of the timed
steps moved the parameters and the loss after them (from the same start for every optimizer
and round: two warm-up steps, then `--steps` steps), so a stalled optimizer cannot look cheap.
The closure's forward and backward are the real work. The optimizers take turns for
`--rounds` rounds of `--steps` steps each, and the median round is printed (with the
spread), so that load from other processes hits all of them alike.
`--clock cpu` (with `--threads 1`) times the thread's CPU time instead of wall time, which
other processes on a shared machine disturb far less (only through the shared caches).
On CUDA every closure and step is timed after a synchronisation.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from rollingball import RBO

SHAPE = {"depth": 2, "width": 1024}  # hidden layers of the MLP; set from the command line


def make_model() -> nn.Module:
    """MLP 784-width-…-width-10 with `depth` hidden layers and ReLU."""
    torch.manual_seed(0)
    depth, width = SHAPE["depth"], SHAPE["width"]
    layers: list[nn.Module] = [nn.Linear(784, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCK = [time.perf_counter]  # wall time; --clock cpu: the thread's CPU time


def measure(
    build, steps: int, x: torch.Tensor, y: torch.Tensor
) -> tuple[float, float, float, int, float]:
    """(closure calls per step, overhead, ms per step, steps that moved the parameters, loss
    after the steps) of `steps` steps after two warm-up steps. Whether a step moved is found
    by comparing the parameters before and after it, outside the timed region."""
    device = x.device
    model = make_model().to(device)
    opt = build(model.parameters())
    inside = [0.0]
    calls = [0]

    def closure():
        _sync(device)
        start = CLOCK[0]()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        _sync(device)
        inside[0] += CLOCK[0]() - start
        calls[0] += 1
        return loss

    for _ in range(2):  # warm-up: allocator, kernels, momentum buffers
        opt.step(closure)
    inside[0], calls[0] = 0.0, 0
    total, moved = 0.0, 0
    for _ in range(steps):
        before = [p.detach().clone() for p in model.parameters()]
        _sync(device)
        start = CLOCK[0]()
        opt.step(closure)
        _sync(device)
        total += CLOCK[0]() - start
        now = model.parameters()
        moved += not all(torch.equal(a, b) for a, b in zip(before, now, strict=True))
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(model(x), y))
    return calls[0] / steps, (total - inside[0]) / inside[0], total / steps * 1e3, moved, loss


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--depth", type=int, default=2, help="hidden layers (default 2)")
    parser.add_argument("--width", type=int, default=1024, help="hidden width (default 1024)")
    args = parser.parse_args()
    if args.depth < 1 or args.width < 1:
        parser.error("--depth and --width must be >= 1")
    SHAPE.update(depth=args.depth, width=args.width)
    if args.clock == "cpu":
        if args.threads != 1 or args.device != "cpu":
            parser.error("--clock cpu needs --threads 1 --device cpu (one thread does all work)")
        CLOCK[0] = time.thread_time
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(256, 784, generator=generator).to(args.device),
        torch.randint(0, 10, (256,), generator=generator).to(args.device),
    )
    fixed = {"projection_steps": 8, "projection_tol": 0.0}
    optimizers = {
        "SGD": lambda p: torch.optim.SGD(p, lr=0.1),
        "RBO radius=0 (SGD path)": lambda p: RBO(p, lr=0.1, radius=0.0),
        "RBO gd, K=8": lambda p: RBO(
            p, lr=0.1, radius=0.5, projection="gd", projection_step_size=0.5, **fixed
        ),
        **{
            f"RBO anderson m={m}, K=8": lambda p, m=m: RBO(
                p, lr=0.1, radius=0.5, anderson_memory=m, **fixed
            )
            for m in (5, 2, 1)
        },
        "RBO defaults": lambda p: RBO(p, lr=0.1, radius=0.5),
    }
    rounds: dict[str, list[tuple[float, float, float, int, float]]] = {n: [] for n in optimizers}
    for _ in range(args.rounds):
        for name, build in optimizers.items():
            rounds[name].append(measure(build, args.steps, x, y))
    header = f"{'optimizer':26s} {'calls':>6s} {'overhead':>9s} {'(min–max)':>14s} {'ms/step':>8s}"
    print(f"{header} {'moved':>7s} {'loss':>7s}")
    for name, results in rounds.items():
        results.sort(key=lambda r: r[1])
        calls, overhead, ms, moved, loss = results[len(results) // 2]
        spread = f"{results[0][1] * 100:.1f}–{results[-1][1] * 100:.1f}%"
        shown = f"{moved}/{args.steps}"
        print(
            f"{name:26s} {calls:6.1f} {overhead * 100:8.1f}% {spread:>14s} {ms:8.1f} "
            f"{shown:>7s} {loss:7.3f}"
        )


if __name__ == "__main__":
    main()
