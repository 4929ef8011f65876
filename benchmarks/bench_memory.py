"""Memory: the extra memory of one optimizer step, in parameter copies.

    python benchmarks/bench_memory.py [--width 4096] [--device cpu|cuda]

Two measurements, side by side for each optimizer:
- peak RSS: an MLP 2048-W-W-W (42 M parameters at W = 4096), batch 64, one process per
  optimizer. After two warm-up steps the kernel's peak-RSS counter is reset
  (/proc/self/clear_refs) and the peak of a bare closure call is measured; reset again, the
  peak of one `step`. (step peak − closure peak + kept buffers) / parameter bytes is the step's
  extra memory, temporaries included: on the CPU RBO keeps its step's buffers for the next
  step (its workspace), resident during both measurements, so they are added.
- tracker: every tensor `step` allocates outside the closure, counted by
  `rollingball.diagnostics.memory.peak_step_memory` (MLP 784-1024-1024-10).
With --device cuda the peak is CUDA's max allocated memory instead of peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from rollingball import RBO
from rollingball.diagnostics.memory import peak_step_memory, storage_bytes, workspace_tensors
from stepping import model_closure

OPTIMIZERS = {
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "SGD momentum 0.9": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "RBO radius 0": lambda p: RBO(p, lr=0.1, radius=0.0),
    "RBO gd, K = 8": lambda p: RBO(
        p, lr=0.1, radius=0.5, projection="gd", projection_steps=8, projection_tol=0
    ),
    "RBO default": lambda p: RBO(p, lr=0.1, radius=0.5, projection_tol=0),
    "RBO anderson m=1, K = 8": lambda p: RBO(
        p, lr=0.1, radius=0.5, projection_steps=8, projection_tol=0, anderson_memory=1
    ),
    "RBO anderson m=2, K = 8": lambda p: RBO(
        p, lr=0.1, radius=0.5, projection_steps=8, projection_tol=0, anderson_memory=2
    ),
    "RBO anderson m=5, K = 8": lambda p: RBO(
        p, lr=0.1, radius=0.5, projection_steps=8, projection_tol=0, anderson_memory=5
    ),
}


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _reset_peak() -> int:
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_bytes()


def _reset_cuda_peak(device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def rss_in_this_process(name: str, width: int, device_name: str = "cpu") -> dict[str, float]:
    """Peak RSS (CUDA: max allocated) of one step beyond the closure's own peak, in parameter
    copies."""
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = nn.Sequential(
        nn.Linear(2048, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, width),
    ).to(device)
    x, y = torch.randn(64, 2048, device=device), torch.randn(64, width, device=device)
    reset = (lambda: _reset_cuda_peak(device)) if cuda else _reset_peak
    peak = (lambda: torch.cuda.max_memory_allocated(device)) if cuda else _peak_rss_bytes
    opt = OPTIMIZERS[name](model.parameters())
    closure = model_closure(opt, model, x, y, nn.functional.mse_loss)
    for _ in range(2):
        opt.step(closure)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    base = reset()
    closure()
    closure_peak = peak() - base
    base = reset()
    opt.step(closure)
    step_peak = peak() - base
    kept = storage_bytes(workspace_tensors(opt))
    return {
        "params_millions": param_bytes / 4 / 1e6,
        "extra_copies": (step_peak - closure_peak + kept) / param_bytes,
    }


def tracker(name: str) -> tuple[float, float, float]:
    torch.manual_seed(0)
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
    model = nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
    opt = OPTIMIZERS[name](model.parameters())
    closure = model_closure(opt, model, x, y)
    opt.step(closure)  # the first step creates the state
    memory = peak_step_memory(opt, closure)
    return memory.state_buffers, memory.workspace_bytes / memory.param_bytes, memory.peak_buffers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(rss_in_this_process(args.child, args.width, args.device)))
        return
    print(f"{'optimizer':26s} {'state':>6s} {'kept':>5s} {'tracker peak':>13s} {'peak extra':>11s}")
    for name in OPTIMIZERS:
        state, kept, peak = tracker(name)
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                name,
                "--width",
                str(args.width),
                "--device",
                args.device,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        rss = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{name:26s} {state:6.2f} {kept:5.2f} {peak:13.2f} {rss['extra_copies']:11.2f}")
    peak = "CUDA max allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"({peak} on {rss['params_millions']:.1f} M parameters; in parameter copies)")


if __name__ == "__main__":
    main()
