"""The fast RBO step (`rollingball.RBO`) against the reference step (`optim/reference.py`).

The reference forms every vector (u, p₀, the blind step, the differences) and takes each
inner product when it needs it; the fast path keeps u and p₀ as multiples, the blind step
as a combination, gathers small gradients into flat buffers and batches its host
transfers. Both must take the same decisions (closure calls, rejected trial points, blind
steps, convergence) and reach the same parameters to round-off, over a hypothesis range of
landscapes, radii, budgets, both solvers, loss scale, maximize, per-group learning rates,
momentum and weight decay, in float64 and float32 (where a decision that round-off takes
may differ: `_on_round_off`).

Each step is compared from the same start: after a step the reference's parameters and
momentum buffers are set to the fast path's, so that round-off does not compound through
the dynamics from one step to the next (several steps, so momentum and the workspace's
reuse are exercised).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
from hypothesis import example, given, reject, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from rollingball import RBO
from rollingball.optim.problem import GATHER_BELOW
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
    """A landscape, and RBO's settings. gd's γ, η and κ stay small enough that its iteration
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
        "projection_step_size": draw(st.sampled_from([0.02, 0.05] if gd else [1.0, 0.5])),
        "projection_tol": draw(st.sampled_from(tols)),
        "anderson_memory": memory,
        "loss_scale": draw(st.sampled_from([1.0, 0.5] if gd else [1.0, 0.5, 2.0])),
        "maximize": draw(st.booleans()),
    }
    return {
        "kind": draw(st.sampled_from(sorted(LANDSCAPES))),
        "seed": draw(st.integers(0, 2**16)),
        "options": options,
        # per group; u = (ρ/s + η) g is left unformed when the rates are equal, μ = 0
        "groups": {
            "lr": [lr, lr * draw(st.sampled_from([1.0, 0.3]))],
            "momentum": draw(st.lists(st.sampled_from([0.0, 0.5, 0.9]), min_size=2, max_size=2)),
            "weight_decay": draw(st.sampled_from([[0.0, 0.0], [0.01, 0.01], [0.3, 0.0]])),
        },
    }


def compare(problem: dict[str, Any], dtype: torch.dtype) -> None:
    """Run the fast path and the reference from one start, step by step: the same decisions,
    and the same parameters and residual to round-off (see the two tests for the bounds)."""
    options, per_group = problem["options"], problem["groups"]
    fast = landscape(problem["kind"], problem["seed"], dtype)
    slow, wide = copy.deepcopy(fast), copy.deepcopy(fast).double()
    maximize = options["maximize"]
    rows = zip(*per_group.values(), strict=True)
    hyper = [dict(zip(per_group, row, strict=True)) for row in rows]  # one dict per group
    opt = RBO(
        [{"params": group, **kept} for group, kept in zip(groups(fast), hyper, strict=True)],
        **options,
    )
    buffers: dict[Tensor, Tensor] = {}
    wide_buffers: dict[Tensor, Tensor] = {}
    for _ in range(STEPS):
        start = [p.detach().clone() for p in fast.parameters()]
        before = [buffers.get(q) for q in slow.parameters()]
        try:
            fast_loss = opt.step(closure_of(fast, maximize))
        except FloatingPointError:  # a diverging iteration: not what this test is about
            reject()
        loss, stats = rbo_step(
            groups(slow),
            closure_of(slow, maximize),
            momentum_buffers=buffers,
            **per_group,
            **options,
        )
        decided = all(stats[key] == opt.last_stats[key] for key in DECISIONS)
        if not decided:  # float64 decides far from its round-off, float32 may decide within it
            on_round_off = dtype != torch.float64
            on_round_off = on_round_off and _on_round_off(
                problem, slow, start, before, opt.last_stats
            )
            assert on_round_off, (stats, opt.last_stats)
        assert float(loss.detach()) == float(fast_loss.detach())  # one closure at one θ
        assert stats["loss"] == opt.last_stats["loss"]
        if decided:
            ends = [p.detach() for p in fast.parameters()]
            error = _distance(ends, slow.parameters())
            residual_error = abs(opt.last_stats["residual"] - stats["residual"])
            size = max(float(t.abs().max()) for t in start) + _distance(ends, start)
            if dtype == torch.float64:
                # 5·10⁴ eps of the step's numbers: the Anderson least squares amplifies round-off
                # by its conditioning (up to 4·10² eps measured on this range)
                assert error <= 1e-11 * size, (error, size)
                # ‖r‖/‖r(θ)‖, a small difference of vectors of the size of r(θ): relative 1e-7,
                # and 10³ eps absolute
                assert residual_error <= 1e-7 * stats["residual"] + 1e3 * torch.finfo(dtype).eps
            else:
                # float32: within 8 times the step's round-off: the reference's own float32 error
                # (its distance to the float64 run from the same start) plus one rounding of x per
                # move (2K + 2 moves at most, rejections going back included); for the residual
                # ‖r‖/‖r(θ)‖ as many roundings of r, whose terms are of the size of r(θ). Measured
                # on some 2,500 steps of this range: at most 3 times the round-off.
                _, wide_stats = rbo_step(
                    groups(wide),
                    closure_of(wide, maximize),
                    momentum_buffers=wide_buffers,
                    **per_group,
                    **options,
                )
                own = _distance([p.detach() for p in slow.parameters()], wide.parameters())
                own_residual = abs(stats["residual"] - wide_stats["residual"])
                eps = torch.finfo(dtype).eps
                moves = 2 * options["projection_steps"] + 2
                assert error <= 8 * (own + moves * eps * size), (error, own, size)
                assert residual_error <= 8 * (own_residual + moves * eps * (1 + stats["residual"]))
        with torch.no_grad():  # the next step starts from the fast path's state
            pairs = zip(fast.parameters(), slow.parameters(), wide.parameters(), strict=True)
            for p, q, w in pairs:
                q.copy_(p)
                w.copy_(p)
                if "momentum_buffer" in opt.state[p]:
                    buffers[q] = opt.state[p]["momentum_buffer"].clone()
                    wide_buffers[w] = opt.state[p]["momentum_buffer"].double()


def _on_round_off(
    problem: dict[str, Any],
    model: nn.Module,
    start: list[Tensor],
    buffers: list[Tensor | None],
    expected: dict[str, Any],
) -> bool:
    """Whether the reference takes the fast path's decisions from `start` moved by one ulp
    (each coordinate by −1, 0 or +1 ulp, three tries): then the two differ on a decision that
    round-off takes (float32 only: near a rule's threshold, within its round-off)."""
    options, per_group = problem["options"], problem["groups"]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        probe = copy.deepcopy(model)
        with torch.no_grad():
            for p, s in zip(probe.parameters(), start, strict=True):
                ulps = torch.randint(-1, 2, s.shape, generator=generator).to(s.dtype)
                p.copy_(s + ulps * _ulp(s))
        momentum = {p: b for p, b in zip(probe.parameters(), buffers, strict=True) if b is not None}
        closure = closure_of(probe, options["maximize"])
        _, stats = rbo_step(
            groups(probe), closure, momentum_buffers=momentum, **per_group, **options
        )
        if all(stats[key] == expected[key] for key in DECISIONS):
            return True
    return False


def _ulp(t: Tensor) -> Tensor:
    """The spacing of floats at each element of t."""
    return torch.nextafter(t, torch.full_like(t, torch.inf)) - t


def _distance(a: Iterable[Tensor], b: Iterable[Tensor]) -> float:
    """max |a − b| over every element, in float64."""
    pairs = zip(a, b, strict=True)
    return max(float((x.detach().double() - y.detach().double()).abs().max()) for x, y in pairs)


def example_problem(kind: str, seed: int, lr: float, **options: Any) -> dict[str, Any]:
    """A problem with Anderson's defaults but for `options`."""
    defaults = {"radius": 0.3, "projection": "anderson", "projection_steps": 2}
    defaults |= {"projection_step_size": 1.0, "projection_tol": 1e-6, "anderson_memory": 1}
    defaults |= {"loss_scale": 1.0, "maximize": False}
    per_group = {"lr": [lr, lr], "momentum": [0.0, 0.0], "weight_decay": [0.0, 0.0]}
    return {"kind": kind, "seed": seed, "options": defaults | options, "groups": per_group}


# Edges of the blind rule that a random draw seldom reaches: a trial point rejected just
# before the last, accepted one (no blind step may follow: the fast solver no longer holds
# the gradient at the point the last step started from), and a Gauss–Newton model whose
# error on the last step lies between TRUST and 0.6 times its predicted decrease.
BLIND_RULE_EDGES = [
    example_problem("relu", 58937, 4.0, radius=1.0),
    example_problem("quadratic", 64131, 0.3, projection_steps=4, anderson_memory=2),
    example_problem("tanh", 9796, 0.5, anderson_memory=2),
]


@settings(max_examples=120, deadline=None, derandomize=True)
@given(problem=problems())
@example(problem=BLIND_RULE_EDGES[0])
@example(problem=BLIND_RULE_EDGES[1])
@example(problem=BLIND_RULE_EDGES[2])
def test_the_fast_step_is_the_reference_step_in_float64(problem):
    compare(problem, torch.float64)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(problem=problems(single=True))
def test_the_fast_step_is_the_reference_step_in_float32(problem):
    compare(problem, torch.float32)


def test_gd_at_tol_0_runs_its_k_iterations_even_where_the_residual_vanishes():
    """With tol = 0 (the authors' fixed K) ‖r‖ is looked at only at the first and the last
    iteration: on relu(w) from w = 0.05 (η = 0.1, ρ = 0.1, γ = 1) the second iteration lands
    where f is flat and u = 0, so r = 0 exactly from there, and both still make K calls."""
    for run in ("fast", "reference"):
        w = torch.tensor([0.05], dtype=torch.float64, requires_grad=True)

        def closure(w=w):
            loss = torch.relu(w).sum()
            loss.backward()
            return loss

        options = {"radius": 0.1, "projection": "gd", "projection_steps": 4, "projection_tol": 0.0}
        if run == "fast":
            opt = RBO([w], lr=0.1, **options)
            opt.step(closure)
            stats = opt.last_stats
        else:
            _, stats = rbo_step([w], closure, lr=0.1, **options)
        assert stats["grad_evals"] == 4 and stats["projection_steps"] == 3, (run, stats)
        assert stats["residual"] == 0.0 and not stats["blind_step"]
        # x₁ = θ − r(θ) = θ − η(1 + ‖g‖²), x₂ = x₁ − u₁ with u₁ = ρ/s − η(1 + ‖g‖²) + η
        assert float(w.detach()) == pytest.approx(0.05 - 0.1 / 2**0.5 - 0.1)


def cross_entropy_on(x: Tensor, y: Tensor) -> Callable[[nn.Module], Callable[[], Tensor]]:
    """For a net, the closure of its cross-entropy on (x, y); without ``zero_grad``, since both
    steps clear the gradients before every call."""

    def closure_for(net: nn.Module) -> Callable[[], Tensor]:
        def closure() -> Tensor:
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            return loss

        return closure

    return closure_for


def small_mlp() -> tuple[nn.Module, Callable[[nn.Module], Callable[[], Tensor]]]:
    """The 5-16-3 tanh MLP of test_rbo_exact.py in float64, and its cross-entropy closure
    on a fixed batch of 32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 5, generator=generator), torch.randint(0, 3, (32,), generator=generator)
    x = x.double()
    return model, cross_entropy_on(x, y)


def trajectories(
    model: nn.Module,
    closure_for: Callable[[nn.Module], Callable[[], Tensor]],
    steps: int,
    **options: Any,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], nn.Module, nn.Module]:
    """`steps` steps of the fast path and of the reference from one start, each on its own
    copy of `model` (no resynchronisation): their statistics per step, and the two models."""
    twin = copy.deepcopy(model)
    opt = RBO(model.parameters(), **options)
    lr = options.pop("lr")
    buffers: dict[Tensor, Tensor] = {}
    fast, slow = [], []
    for _ in range(steps):
        opt.step(closure_for(model))
        fast.append(dict(opt.last_stats))
        slow.append(
            rbo_step(
                list(twin.parameters()),
                closure_for(twin),
                lr=lr,
                momentum_buffers=buffers,
                **options,
            )[1]
        )
    return fast, slow, model, twin


def assert_same_steps(fast: list[dict[str, Any]], slow: list[dict[str, Any]]) -> None:
    for a, b in zip(fast, slow, strict=True):
        assert {k: a[k] for k in DECISIONS} == {k: b[k] for k in DECISIONS}


def assert_same_parameters(model: nn.Module, twin: nn.Module, rtol: float, atol: float) -> None:
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"projection": "gd", "projection_steps": 4, "projection_step_size": 0.5},
        {"projection_steps": 1},
        {"projection_steps": 5, "projection_tol": 0.0, "anderson_memory": 2},
    ],
)
def test_an_offset_left_as_a_multiple_of_the_gradient_gives_the_reference_steps(options):
    """Without momentum and with one learning rate the fast path leaves u = (ρ/s + η) g and
    r(θ) unformed and forms u at its first move along g; the reference forms u at θ: five
    steps agree to 1e-12."""
    model, closure_for = small_mlp()
    fast, slow, model, twin = trajectories(model, closure_for, 5, lr=0.5, radius=0.3, **options)
    assert_same_steps(fast, slow)
    assert_same_parameters(model, twin, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("memory", [1, 2])
def test_blind_steps_are_the_reference_steps(memory):
    """The fast path keeps the blind step β p + Σ c_i D_i unformed, with its rule's products
    from host numbers; the reference forms it and takes ⟨u, δ⟩, ⟨g, δ⟩, ‖δ‖² from it: over
    10 steps with at least 5 blind ones, the same decisions and the same parameters."""
    model, closure_for = small_mlp()
    fast, slow, model, twin = trajectories(
        model, closure_for, 10, lr=3.0, radius=0.3, anderson_memory=memory
    )
    assert_same_steps(fast, slow)
    assert sum(stats["blind_step"] for stats in fast) >= 5
    assert_same_parameters(model, twin, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("memory", [1, 2])
@pytest.mark.parametrize("layout", ["many small tensors", "large tensors"])
def test_gathered_and_per_tensor_gradients_give_the_reference_steps(layout, memory):
    """Below `GATHER_BELOW` elements per tensor the Anderson solver copies each gradient into
    one flat buffer; above it reduces tensor by tensor. Either way six float64 steps are the
    reference's to 1e-12."""
    torch.manual_seed(0)
    if layout == "many small tensors":
        sizes, bias = [6, 16, 16, 3], True
    else:  # 76,800 + 512 elements in two tensors: 38,656 per tensor on average
        sizes, bias = [300, 256, 2], False
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [nn.Linear(fan_in, fan_out, bias=bias), nn.Tanh()]
    model = nn.Sequential(*layers[:-1]).double()
    params = list(model.parameters())
    average = sum(p.numel() for p in params) / len(params)
    assert (average < GATHER_BELOW) == (layout == "many small tensors")
    x = torch.randn(64, sizes[0], dtype=torch.float64)
    y = torch.randint(0, sizes[-1], (64,))

    fast, slow, model, twin = trajectories(
        model, cross_entropy_on(x, y), 6, lr=0.5, radius=0.3, anderson_memory=memory
    )
    assert_same_steps(fast, slow)
    assert_same_parameters(model, twin, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("lr", "options"),
    [(0.5, {}), (0.5, {"projection_steps": 5, "anderson_memory": 2}), (8.0, {})],
)
def test_a_first_newton_step_left_as_a_multiple_of_the_offset_gives_the_reference_steps(
    lr, options
):
    """The fast path keeps p₀ = (s + c)/s' · u unformed after its first move along g, and
    forms it from u only to go back from a rejected first trial point; the reference forms
    p₀ at θ: six steps agree, whether the first trial point is accepted (lr 0.5) or rejected
    (lr 8)."""
    model, closure_for = small_mlp()
    fast, slow, model, twin = trajectories(model, closure_for, 6, lr=lr, radius=0.3, **options)
    assert_same_steps(fast, slow)
    rejected = sum(stats["safeguard_steps"] for stats in fast)
    assert (rejected > 0) == (lr == 8.0)  # lr 8: the first trial point is rejected
    assert_same_parameters(model, twin, rtol=1e-12, atol=1e-14)


def test_the_reference_refuses_a_non_finite_loss_and_restores_the_parameters():
    """A trial point where the loss is not finite ends the step: FloatingPointError, and the
    parameters are those before the step, as with `RBO`'s on_nonfinite="raise"."""
    w = torch.tensor([0.5, -0.25], dtype=torch.float64, requires_grad=True)
    before = w.detach().clone()

    def closure() -> Tensor:  # finite at θ only
        loss = (w**2).sum() + (0.0 if torch.equal(w.detach(), before) else torch.inf)
        loss.backward()
        return loss

    with pytest.raises(FloatingPointError, match="non-finite"):
        rbo_step([w], closure, lr=0.1, radius=0.3)
    assert torch.equal(w.detach(), before)


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_a_mismatch_beyond_float32_range_is_a_non_finite_step(on_nonfinite):
    # gd with γ(1 + ‖g‖²) far above 2 diverges on a float32 quadratic: at the second step a
    # trial point's loss is finite but its height mismatch m is beyond float32's range, so
    # r = u + m g overflows; the step is non-finite and the parameters stay where they were
    model = landscape("quadratic", 3, torch.float32)
    opt = RBO(
        [{"params": g, "lr": 0.5} for g in groups(model)],
        radius=0.05,
        projection="gd",
        projection_steps=3,
        projection_step_size=0.1,
        projection_tol=0.0,
        weight_decay=0.3,
        loss_scale=2.0,
        on_nonfinite=on_nonfinite,
    )
    closure = closure_of(model, False)
    opt.step(closure)
    start = [p.detach().clone() for p in model.parameters()]
    if on_nonfinite == "raise":
        with pytest.raises(FloatingPointError, match=r"beyond the range of torch\.float32"):
            opt.step(closure)
    else:
        opt.step(closure)
        assert opt.last_stats["skipped"]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), start, strict=True))
