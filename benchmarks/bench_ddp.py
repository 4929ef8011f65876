"""RBO's step time under DDP against (closure calls per step) × SGD's DDP step time.

    python benchmarks/bench_ddp.py [--world 2] [--steps 30]

Spawns `--world` CPU processes (gloo, one thread each). Each rank trains an MLP
784-512-512-10 (tanh) on its own batch of 128. Per closure call DDP all-reduces the gradients
(~0.67 M float32 values, in buckets) and RBO adds one float64 all-reduce of the loss. SGD
makes one closure call per step, RBO 1 + K; the ratio

    RBO step time / ((1 + K) × SGD step time)

is 1 when a closure call costs RBO what a whole step costs SGD; above 1 is RBO's own
overhead (its vector operations, the scalar all-reduce, the projection's bookkeeping).
The optimizers take their steps in turn (one SGD step, one step of each RBO, again), so
that a change in the machine's load hits all of them alike, and the medians of the
per-step times are compared. RBO runs with the authors' fixed K = 8 (tol = 0) and with
the default Anderson solver (K varies with the step).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rollingball import RBO
from rollingball.experiments.distributed import spawn

BATCH = 128
OPTIMIZERS: dict[str, Any] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "rbo gd K=8": lambda p: RBO(
        p, lr=0.05, radius=0.1, projection="gd", projection_steps=8, projection_tol=0.0
    ),
    "rbo anderson": lambda p: RBO(p, lr=0.05, radius=0.1),
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(784, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10)
    )


def _worker(rank: int, world: int, steps: int, out: str) -> None:
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(BATCH, 784, generator=generator)
    y = torch.randint(0, 10, (BATCH,), generator=generator)
    runs: dict[str, tuple[nn.Module, Any]] = {}
    for name, build in OPTIMIZERS.items():
        model = nn.parallel.DistributedDataParallel(make_model())
        runs[name] = (model, build(model.parameters()))
    times: dict[str, list[float]] = {name: [] for name in OPTIMIZERS}
    calls: dict[str, int] = dict.fromkeys(OPTIMIZERS, 0)
    for step in range(steps + 2):  # the first 2 steps warm up
        for name, (model, opt) in runs.items():  # one step of each, in turn
            counter = [0]

            def closure(model: nn.Module = model, opt: Any = opt, counter: list = counter) -> Any:
                counter[0] += 1
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss

            dist.barrier()
            start = time.perf_counter()
            opt.step(closure)
            elapsed = time.perf_counter() - start
            if step >= 2:
                times[name].append(elapsed)
                calls[name] += counter[0]
    # the two collectives of a closure call, alone: RBO's scalar and a gradient-sized one
    scalar = torch.zeros((), dtype=torch.float64)
    gradient = torch.zeros(sum(p.numel() for p in make_model().parameters()))
    collectives = {}
    for label, tensor, repeats in (("scalar", scalar, 200), ("gradient", gradient, 20)):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(repeats):
            dist.all_reduce(tensor)
        collectives[label] = (time.perf_counter() - start) / repeats
    if rank == 0:
        result = {"times": times, "calls": calls, "collectives": collectives}
        torch.save(result, Path(out) / "result.pt")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as out:
        spawn(_worker, args.world, args.steps, out, timeout_s=1200)
        result = torch.load(Path(out) / "result.pt")
    steps = args.steps
    sgd = statistics.median(result["times"]["sgd"])
    setup = f"tanh MLP 784-512-512-10, batch {BATCH} per rank"
    print(f"DDP on {args.world} CPU processes (gloo), {setup}")
    print(f"{'optimizer':16s} {'calls/step':>10s} {'step ms':>9s} {'ratio':>7s}")
    for name in OPTIMIZERS:
        per_step = result["calls"][name] / steps
        median = statistics.median(result["times"][name])
        ratio = median / (per_step * sgd)
        print(f"{name:16s} {per_step:10.2f} {median * 1e3:9.2f} {ratio:7.3f}")
    print("ratio = RBO step time / ((closure calls per step) x SGD step time), medians")
    scalar, gradient = result["collectives"]["scalar"], result["collectives"]["gradient"]
    size = sum(p.numel() for p in make_model().parameters())
    print(
        f"all-reduce alone: one float64 scalar {scalar * 1e3:.3f} ms, "
        f"the gradients ({size:,} float32 in one tensor) {gradient * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    main()
