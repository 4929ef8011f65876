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
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, reject, settings
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
def problems(draw: st.DrawFn) -> dict[str, Any]:
    """A landscape, and RBO's settings. gd's γ stays below the 2/(1 + ‖g‖²) past which its
    iteration diverges on these landscapes; Anderson's tol stays above 0, where it would
    iterate into round-off and decide on noise."""
    solver = draw(st.sampled_from(SOLVERS))
    gd = solver == "gd"
    lr = draw(st.sampled_from([0.01, 0.1, 0.3, 0.5]))
    options = {
        "radius": draw(st.sampled_from([0.0, 0.05, 0.3, 1.0])),
        "projection": solver,
        "projection_steps": draw(st.integers(1, 6)),
        "projection_step_size": draw(st.sampled_from([0.1, 0.2] if gd else [1.0, 0.5])),
        "projection_tol": draw(st.sampled_from([0.0, 1e-4, 1e-2] if gd else [1e-6, 1e-4, 1e-2])),
        "anderson_memory": draw(st.integers(1, 3)),
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


def compare(
    problem: dict[str, Any],
    dtype: torch.dtype,
    tolerance: Callable[..., list[Tensor]],
    residual_rtol: float,
) -> None:
    """Run the fast path and the reference from one start, step by step, and check that they
    decide the same and that |fast − reference| ≤ `tolerance(start, fast, reference, wide)`
    elementwise (`wide`: the float64 reference's parameters for a float32 run, else None)."""
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
        assert float(loss) == float(fast_loss)  # the same closure at the same θ
        assert stats["loss"] == opt.last_stats["loss"]
        assert stats["residual"] == pytest.approx(opt.last_stats["residual"], rel=residual_rtol)
        ends = [p.detach() for p in fast.parameters()]
        expected = [p.detach() for p in slow.parameters()]
        widest = None
        if dtype != torch.float64:
            rbo_step(
                groups(wide),
                closure_of(wide, maximize),
                lr=lrs,
                momentum_buffers=wide_buffers,
                **options,
            )
            widest = [p.detach() for p in wide.parameters()]
        bounds = tolerance(start, ends, expected, widest)
        for end, reference, bound in zip(ends, expected, bounds, strict=True):
            assert bool(((end - reference).abs() <= bound).all()), (end - reference, bound)
        with torch.no_grad():  # the next step starts from the fast path's state
            pairs = zip(fast.parameters(), slow.parameters(), wide.parameters(), strict=True)
            for p, q, w in pairs:
                q.copy_(p)
                w.copy_(p)
                if "momentum_buffer" in opt.state[p]:
                    buffers[q] = opt.state[p]["momentum_buffer"].clone()
                    wide_buffers[w] = opt.state[p]["momentum_buffer"].double()


def _scale(start: list[Tensor], ends: list[Tensor]) -> float:
    """max |θ| + max |Δθ|: the size of the numbers a step's round-off is relative to."""
    size = max(float(t.abs().max()) for t in start)
    return size + max(float((e - s).abs().max()) for s, e in zip(start, ends, strict=True))


@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)
@given(problem=problems())
def test_the_fast_step_is_the_reference_step_in_float64(problem):
    """float64: the same parameters within 1e-11 of the step's scale (5·10⁴ eps, for the
    Anderson least squares, whose conditioning amplifies round-off: up to 4·10² eps measured
    here), the same residual within 1e-7 (it is a small difference of O(1) vectors)."""

    def tolerance(start, ends, expected, wide):
        return [torch.full_like(e, 1e-11 * _scale(start, ends)) for e in ends]

    compare(problem, torch.float64, tolerance, residual_rtol=1e-7)


@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)
@given(problem=problems())
def test_the_fast_step_is_the_reference_step_in_float32(problem):
    """float32, with a tolerance from the step's own round-off: the reference run in float64
    from the same start shows how far float32 arithmetic takes this step (|ref₃₂ − ref₆₄|,
    which grows with the conditioning of the Anderson least squares); the fast path must stay
    within 4 times that, plus one rounding of x per move (2K + 2 moves at most, rejections
    going back included)."""
    steps = problem["options"]["projection_steps"]
    eps = torch.finfo(torch.float32).eps

    def tolerance(start, ends, expected, wide):
        floor = (2 * steps + 2) * eps * _scale(start, ends)
        own = [(w - r.double()).abs().float() for r, w in zip(expected, wide, strict=True)]
        return [4 * error + floor for error in own]

    compare(problem, torch.float32, tolerance, residual_rtol=1e-2)
