"""The authors' scheme's iteration written three ways: what each costs, and how exactly each
computes.

    python benchmarks/bench_gd_iteration.py [--rounds 5] [--iterations 12] [--seeds 16]

One iteration of `gd` moves the trial point by x ← x − γ r, r = (x − θ̃) + m g, after a closure
call at x (g = ∇f(x), m = f(x) − ỹ). Three ways to write it:
- **u kept** (RBO's `gd`, its own kernels): u = x − θ̃ is kept; r = u + m g is written over g,
  ‖r‖² is reduced (the finiteness check), and x and u move by −γ r: 4 parameter-sized kernels.
  RBO takes ‖r‖² at every iteration with tol > 0; with tol = 0 only at the first and the last,
  where it decides something:
- **u kept, no ‖r‖**: the same without the reduction (RBO's iterations between the first and
  the last at tol = 0): 3 kernels.
- **centre kept**: θ̃ is kept instead; ‖g‖² is reduced, T = θ̃ − m g is written over g, and
  x ← lerp(x, T, γ) = x − γ(x − T): 3 kernels, and nothing is written back but x.
- **fused**: the u-kept iteration as one `torch.compile`d function (inductor): one loop per
  tensor.

Cost: on `bench_overhead.py`'s MLP (784-1024-1024-10, batch 256), on one thread, the CPU time
of the iteration's kernels over the CPU time of the closure call before it (forward and
backward), for `--iterations` iterations; the variants take turns for `--rounds` rounds and the
median round is printed with the range, next to the fused function's compile time.

Accuracy: 50 float32 steps (η = 0.1, ρ = 0.5, tol = 0) on the tanh MLP of
`tests/test_rbo_exact.py`, from `--seeds` random starts and several (K, γ); printed is the
median and largest over seeds of max |θ − θ₆₄|, the distance to the authors' scheme run in
float64. The u-kept row is RBO itself; the authors' own float32 arithmetic, which subtracts
x − θ̃ before adding m g, is the reference row.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from bench_overhead import make_model
from rollingball import RBO
from rollingball.optim.geometry import squared_norm, to_host
from rollingball.optim.projection import _form_residual, _move, _residual

Iteration = Callable[[list[Tensor], list[Tensor], list[Tensor], float, float], float]


def u_kept(x: list[Tensor], u: list[Tensor], g: list[Tensor], m: float, gamma: float) -> float:
    """RBO's `gd` iteration: r = u + m g over g, ‖r‖², x and u move by −γ r."""
    norm_sq = to_host([_residual(g, u, m)])[0]
    _move(x, u, g, -gamma)
    return norm_sq


def u_kept_unreduced(
    x: list[Tensor], u: list[Tensor], g: list[Tensor], m: float, gamma: float
) -> float:
    """r = u + m g over g, x and u move by −γ r; ‖r‖² is not taken."""
    _form_residual(g, u, m)
    _move(x, u, g, -gamma)
    return math.nan


def centre_kept(
    x: list[Tensor], centre: list[Tensor], g: list[Tensor], m: float, gamma: float
) -> float:
    """‖g‖², T = θ̃ − m g over g, x ← lerp(x, T, γ)."""
    norm_sq = squared_norm(g)
    for target, c in zip(g, centre, strict=True):
        torch.add(c, target, alpha=-m, out=target)
    torch._foreach_lerp_(x, g, gamma)
    return norm_sq


def _fused_body(x: list[Tensor], u: list[Tensor], g: list[Tensor], scalars: Tensor) -> Tensor:
    m, gamma = scalars[0], scalars[1]
    sums = []
    for xt, ut, gt in zip(x, u, g, strict=True):
        r = ut + m * gt
        sums.append((r * r).sum(dtype=torch.float64))
        xt.sub_(gamma * r)
        ut.sub_(gamma * r)
    return torch.stack(sums)


_fused_compiled = torch.compile(_fused_body, dynamic=False, fullgraph=True)


def fused(x: list[Tensor], u: list[Tensor], g: list[Tensor], m: float, gamma: float) -> float:
    """The u-kept iteration compiled into one loop per tensor; m and γ travel as a tensor, so
    new values do not recompile."""
    scalars = torch.tensor([m, gamma], dtype=torch.float64)
    return math.fsum(_fused_compiled(x, u, g, scalars).tolist())


VARIANTS: dict[str, Iteration] = {
    "u kept (RBO)": u_kept,
    "u kept, no ‖r‖": u_kept_unreduced,
    "centre kept": centre_kept,
    "fused": fused,
}


def cost_round(name: str, iterations: int, batch: tuple[Tensor, Tensor]) -> float:
    """Iteration time over closure time (CPU time of this thread) for one fresh model."""
    model = make_model()
    x = [p for p in model.parameters()]
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        u = [1e-3 * torch.randn(p.shape, generator=generator) for p in x]
        second = (
            [p - offset for p, offset in zip(x, u, strict=True)] if name == "centre kept" else u
        )
    inside = outside = 0.0
    for i in range(iterations + 2):  # two warm-up iterations
        start = time.thread_time()
        for p in x:
            p.grad = None
        nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
        middle = time.thread_time()
        with torch.no_grad():
            VARIANTS[name](x, second, [p.grad for p in x], 0.01, 0.5)
        end = time.thread_time()
        if i >= 2:
            inside, outside = inside + middle - start, outside + end - middle
    return outside / inside


def compile_seconds(batch: tuple[Tensor, Tensor]) -> float:
    """Wall time of the fused function's first call on the MLP (inductor compiles it)."""
    model = make_model()
    nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
    x = list(model.parameters())
    start = time.perf_counter()
    with torch.no_grad():
        fused(x, [torch.zeros_like(p) for p in x], [p.grad for p in x], 0.01, 0.5)
    return time.perf_counter() - start


def tanh_problem(seed: int, dtype: torch.dtype) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """The loss and start of `test_gd_mode_reproduces_the_authors_scheme` (drawn in float32)."""
    torch.manual_seed(seed)
    inputs, targets = torch.randn(64, 4).to(dtype), torch.randn(64).to(dtype)
    theta = torch.cat([torch.randn(32) * 0.5, torch.randn(8) * 0.5]).to(dtype)

    def loss_fn(flat: Tensor) -> Tensor:
        hidden = torch.tanh(inputs @ flat[:32].view(4, 8))
        return ((hidden @ flat[32:] - targets) ** 2).mean()

    return loss_fn, theta


def value_and_grad(loss_fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[float, Tensor]:
    point = x.detach().requires_grad_(True)
    value = loss_fn(point)
    (grad,) = torch.autograd.grad(value, point)
    return value.item(), grad


def standalone_step(
    name: str, loss_fn: Callable[[Tensor], Tensor], theta: Tensor, steps: int, gamma: float
) -> Tensor:
    """One step (η = 0.1, ρ = 0.5) with K = `steps` iterations of `name`, or "authors"."""
    lr, radius = 0.1, 0.5
    value, g = value_and_grad(loss_fn, theta)
    grad_sq = float(g @ g)
    s = math.sqrt(1 + grad_sq)
    height = value + radius / s - lr * grad_sq
    x = theta.clone()
    if name == "authors":
        target = theta - radius * g / s - lr * g
    elif name == "centre kept":
        second = [theta - (radius / s + lr) * g]
    else:
        second = [(radius / s + lr) * g]
    for _ in range(steps):
        if name == "authors":
            x = x - gamma * ((x - target) + (value - height) * g)
        else:
            VARIANTS[name]([x], second, [g], value - height, gamma)
        value, g = value_and_grad(loss_fn, x)
    return x


def accuracy(name: str, seed: int, steps: int, gamma: float) -> float | None:
    """max |θ − θ₆₄| after 50 float32 steps of `name` against the authors' scheme in float64;
    None where the float64 run itself diverges (a step too large for that start)."""
    loss64, theta64 = tanh_problem(seed, torch.float64)
    loss32, theta = tanh_problem(seed, torch.float32)
    for _ in range(50):
        theta64 = standalone_step("authors", loss64, theta64, steps, gamma)
    if not bool(torch.isfinite(theta64).all()):
        return None
    if name == "u kept (RBO)":
        theta = theta.clone().requires_grad_(True)
        opt = RBO(
            [theta], lr=0.1, radius=0.5, projection="gd", projection_steps=steps,
            projection_step_size=gamma, projection_tol=0,
        )  # fmt: skip

        def closure() -> Tensor:
            opt.zero_grad()
            loss = loss32(theta)
            loss.backward()
            return loss

        for _ in range(50):
            opt.step(closure)
    else:
        for _ in range(50):
            theta = standalone_step(name, loss32, theta, steps, gamma)
    return float((theta.detach().double() - theta64).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(1)
    batch = (
        torch.randn(256, 784, generator=generator),
        torch.randint(0, 10, (256,), generator=generator),
    )
    print(f"fused: compiled in {compile_seconds(batch):.1f} s (6 tensors, one thread)")
    ratios: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name in VARIANTS:
            ratios[name].append(cost_round(name, args.iterations, batch))
    print("\ncost: iteration CPU time / closure CPU time (median of rounds, range)")
    for name, values in ratios.items():
        values.sort()
        middle = values[len(values) // 2]
        print(f"  {name:16s} {middle * 100:5.2f}%  ({values[0] * 100:.2f}–{values[-1] * 100:.2f}%)")
    print(
        "\naccuracy: max |θ − θ64| after 50 float32 steps, median (largest) over the seeds "
        "whose float64 run stays finite"
    )
    settings = [(5, 0.1), (3, 0.3), (8, 0.5)]
    print(f"  {'':16s} " + "  ".join(f"{f'K={k}, γ={g}':>18s}" for k, g in settings))
    for name in ["authors", *VARIANTS]:
        cells = []
        for steps, gamma in settings:
            runs = [accuracy(name, seed, steps, gamma) for seed in range(args.seeds)]
            errors = [error for error in runs if error is not None]
            cells.append(f"{statistics.median(errors):.1e} ({max(errors):.1e})")
        label = "authors' f32" if name == "authors" else name
        print(f"  {label:16s} " + "  ".join(f"{cell:>18s}" for cell in cells))


if __name__ == "__main__":
    main()
