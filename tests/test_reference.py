"""The fast RBO step (`rollingball.RBO`) against the reference step (`optim/reference.py`).

The reference forms every vector (u, p₀, the blind step, the differences) and takes every
inner product in float64 when it needs it; the fast path keeps u and p₀ as multiples,
the blind step as a combination, gathers small gradients into flat buffers and batches its
host transfers. Both must take the same decisions (closure calls, rejected trial points,
blind steps, convergence) and reach the same parameters to round-off, over a hypothesis
range of landscapes, radii, budgets, solvers, momentum, weight decay, loss scale, maximize,
per-group learning rates and dtypes.

Each step is compared from the same start: after a step the reference's parameters and
momentum buffers are set to the fast path's, so that round-off does not compound through
the dynamics from one step to the next (several steps, so momentum and the workspace's
reuse are exercised).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from hypothesis import example, given, reject, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from rollingball import RBO
from rollingball.optim.projection import SOLVERS
from rollingball.optim.reference import rbo_step

DECISIONS = ("grad_evals", "projection_steps", "safeguard_steps", "converged", "blind_step")
STEPS = 3


class Polynomial(nn.Module):
    """½ zᵀ A z + cᵀ z (+ ¼ Σ z⁴ for the quartic), z = (w, b): two parameter tensors."""

    def __init__(self, generator: torch.Generator, quartic: bool) -> None:
        super().__init__()
        self.w = nn.Parameter(0.5 * torch.randn(4, generator=generator))
        self.b = nn.Parameter(0.5 * torch.randn(3, generator=generator))
        q, _ = torch.linalg.qr(torch.randn(7, 7, generator=generator))
        curvatures = 0.1 + 2.4 * torch.rand(7, generator=generator)
        self.register_buffer("a", q @ torch.diag(curvatures) @ q.T)
        self.register_buffer("c", torch.randn(7, generator=generator))
        self.quartic = quartic

    def loss(self) -> Tensor:
        z = torch.cat([self.w, self.b])
        value = 0.5 * z @ self.a @ z + self.c @ z
        return value + 0.25 * (z**4).sum() if self.quartic else value


class MLP(nn.Module):
    """A 3-6-2 MLP with a mean squared error on a fixed batch of 12."""

    def __init__(self, generator: torch.Generator, activation: type[nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(int(torch.randint(0, 2**30, (1,), generator=generator)))
        self.net = nn.Sequential(nn.Linear(3, 6), activation(), nn.Linear(6, 2))
        self.register_buffer("x", torch.randn(12, 3, generator=generator))
        self.register_buffer("y", torch.randn(12, 2, generator=generator))

    def loss(self) -> Tensor:
        return nn.functional.mse_loss(self.net(self.x), self.y)


LANDSCAPES: dict[str, Callable[[torch.Generator], nn.Module]] = {
    "tanh": lambda generator: MLP(generator, nn.Tanh),
    "relu": lambda generator: MLP(generator, nn.ReLU),
    "quadratic": lambda generator: Polynomial(generator, quartic=False),
    "quartic": lambda generator: Polynomial(generator, quartic=True),
}


def landscape(kind: str, seed: int, dtype: torch.dtype) -> nn.Module:
    return LANDSCAPES[kind](torch.Generator().manual_seed(seed)).to(dtype)


def closure_of(model: nn.Module, maximize: bool) -> Callable[[], Tensor]:
    """The loss, or with `maximize` its negative, so that the ball rolls on the same
    bounded landscape either way."""

    def closure() -> Tensor:
        loss = -model.loss() if maximize else model.loss()
        loss.backward()
        return loss

    return closure


def groups(model: nn.Module) -> list[list[Tensor]]:
    params = list(model.parameters())
    return [params[:1], params[1:]]


@st.composite
def problems(draw: st.DrawFn, single: bool = False) -> dict[str, Any]:
    """A landscape, and RBO's settings. gd's γ and η stay small enough that its iteration
    does not diverge on these landscapes (γ(1 + ‖g‖²) < 2); Anderson's η goes up to where
    most trial points are rejected, and its tol stays above 0, below which it would iterate
    into round-off and decide on noise.

    `single` (float32): η ≥ 0.1 and tol = 1e-2 (or 0 for gd). Below, float32 decides on
    noise: near ‖r‖ = 1e-4·‖r(θ)‖ after a step of η = 0.01, the mismatch m = f(x) − ỹ is
    a difference of float32 losses, and ‖r‖ is known to 2% only."""
    solver = draw(st.sampled_from(SOLVERS))
    gd = solver == "gd"
    if single:
        lrs, tols = [0.1, 0.3, 0.5], [0.0, 1e-2] if gd else [1e-2]
        memory = 1
    else:
        lrs = [0.01, 0.1, 0.3, 0.5] if gd else [0.01, 0.1, 0.5, 2.0, 4.0]
        tols = [0.0, 1e-4, 1e-2] if gd else [1e-6, 1e-4, 1e-2]
        memory = draw(st.integers(1, 3))
    lr = draw(st.sampled_from(lrs))
    options = {
        "radius": draw(st.sampled_from([0.0, 0.05, 0.3, 1.0])),
        "projection": solver,
        "projection_steps": draw(st.integers(1, 6)),
        "projection_step_size": draw(st.sampled_from([0.1, 0.2] if gd else [1.0, 0.5])),
        "projection_tol": draw(st.sampled_from(tols)),
        "anderson_memory": memory,
        "momentum": draw(st.sampled_from([0.0, 0.5, 0.9])),
        "weight_decay": draw(st.sampled_from([0.0, 0.01, 0.3])),
        "loss_scale": draw(st.sampled_from([1.0, 0.5, 2.0])),
        "maximize": draw(st.booleans()),
    }
    return {
        "kind": draw(st.sampled_from(sorted(LANDSCAPES))),
        "seed": draw(st.integers(0, 2**16)),
        "lrs": [lr, lr * draw(st.sampled_from([1.0, 0.3]))],  # equal: u = (ρ/s + η) g unformed
        "options": options,
    }


def compare(problem: dict[str, Any], dtype: torch.dtype) -> None:
    """Run the fast path and the reference from one start, step by step: the same decisions,
    and the same parameters and residual to round-off (see the two tests for the bounds)."""
    options, lrs = problem["options"], problem["lrs"]
    fast = landscape(problem["kind"], problem["seed"], dtype)
    slow, wide = copy.deepcopy(fast), copy.deepcopy(fast).double()
    maximize = options["maximize"]
    opt = RBO(
        [{"params": group, "lr": lr} for group, lr in zip(groups(fast), lrs, strict=True)],
        **options,
    )
    buffers: dict[Tensor, Tensor] = {}
    wide_buffers: dict[Tensor, Tensor] = {}
    for _ in range(STEPS):
        start = [p.detach().clone() for p in fast.parameters()]
        try:
            fast_loss = opt.step(closure_of(fast, maximize))
        except FloatingPointError:  # a diverging iteration: not what this test is about
            reject()
        loss, stats = rbo_step(
            groups(slow), closure_of(slow, maximize), lr=lrs, momentum_buffers=buffers, **options
        )
        for key in DECISIONS:
            assert stats[key] == opt.last_stats[key], (key, stats, opt.last_stats)
        assert float(loss.detach()) == float(fast_loss.detach())  # one closure at one θ
        assert stats["loss"] == opt.last_stats["loss"]
        ends = [p.detach() for p in fast.parameters()]
        error = _distance(ends, slow.parameters())
        residual_error = abs(opt.last_stats["residual"] - stats["residual"])
        size = max(float(t.abs().max()) for t in start) + _distance(ends, start)
        if dtype == torch.float64:
            # 5·10⁴ eps of the step's numbers: the Anderson least squares amplifies round-off
            # by its conditioning (up to 4·10² eps measured on this range)
            assert error <= 1e-11 * size, (error, size)
            assert residual_error <= 1e-7 * stats["residual"]  # a small difference of O(1) vectors
        else:
            # float32: within 8 times the reference's own float32 round-off (its distance to the
            # float64 run from the same start), plus one rounding of x per move (2K + 2 moves at
            # most, rejections going back included), and for the residual ‖r‖/‖r(θ)‖ as many
            # roundings of r, whose terms are of the size of r(θ)
            _, wide_stats = rbo_step(
                groups(wide),
                closure_of(wide, maximize),
                lr=lrs,
                momentum_buffers=wide_buffers,
                **options,
            )
            own = _distance([p.detach() for p in slow.parameters()], wide.parameters())
            own_residual = abs(stats["residual"] - wide_stats["residual"])
            eps = torch.finfo(dtype).eps
            moves = 2 * options["projection_steps"] + 2
            assert error <= 8 * own + moves * eps * size, (error, own, size)
            assert residual_error <= 8 * own_residual + moves * eps * (1 + stats["residual"])
        with torch.no_grad():  # the next step starts from the fast path's state
            pairs = zip(fast.parameters(), slow.parameters(), wide.parameters(), strict=True)
            for p, q, w in pairs:
                q.copy_(p)
                w.copy_(p)
                if "momentum_buffer" in opt.state[p]:
                    buffers[q] = opt.state[p]["momentum_buffer"].clone()
                    wide_buffers[w] = opt.state[p]["momentum_buffer"].double()


def _distance(a: Iterable[Tensor], b: Iterable[Tensor]) -> float:
    """max |a − b| over every element, in float64."""
    pairs = zip(a, b, strict=True)
    return max(float((x.detach().double() - y.detach().double()).abs().max()) for x, y in pairs)


def example_problem(kind: str, seed: int, lr: float, **options: Any) -> dict[str, Any]:
    """A problem with Anderson's defaults but for `options`."""
    defaults = {"radius": 0.3, "projection": "anderson", "projection_steps": 2}
    defaults |= {"projection_step_size": 1.0, "projection_tol": 1e-6, "anderson_memory": 1}
    defaults |= {"momentum": 0.0, "weight_decay": 0.0, "loss_scale": 1.0, "maximize": False}
    return {"kind": kind, "seed": seed, "lrs": [lr, lr], "options": defaults | options}


# A trial point rejected just before the last accepted one: no blind step may follow, since
# the fast solver no longer holds the gradient at the point the last step started from.
AFTER_A_REJECTION = [
    example_problem("relu", 58937, 4.0, radius=1.0),
    example_problem("quadratic", 64131, 0.3, projection_steps=4, anderson_memory=2),
]


@settings(max_examples=120, deadline=None, derandomize=True)
@given(problem=problems())
@example(problem=AFTER_A_REJECTION[0])
@example(problem=AFTER_A_REJECTION[1])
def test_the_fast_step_is_the_reference_step_in_float64(problem):
    compare(problem, torch.float64)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(problem=problems(single=True))
def test_the_fast_step_is_the_reference_step_in_float32(problem):
    compare(problem, torch.float32)
