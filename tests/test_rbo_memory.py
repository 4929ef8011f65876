"""The extra memory of a step, measured by tracking every tensor the optimizer allocates."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

from rollingball import RBO
from rollingball.diagnostics.memory import peak_step_memory
from rollingball.optim import problem, projection
from stepping import model_closure

SCALARS = 0.2  # the step's small results (per-tensor norms, inner products), in parameter sizes


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 5))
    return model, torch.randn(32, 20), torch.randint(0, 5, (32,))


def measure(**options):
    model, x, y = _mlp()
    opt = RBO(model.parameters(), **{"lr": 0.5, "radius": 0.5, "projection_steps": 6, **options})
    closure = model_closure(opt, model, x, y)
    opt.step(closure)
    return peak_step_memory(opt, closure)


def test_sgd_path_allocates_nothing():
    memory = measure(radius=0.0)
    assert memory.step_buffers < SCALARS and memory.state_bytes == 0


@pytest.mark.parametrize(("momentum", "buffers"), [(0.0, 2), (0.9, 3)])
def test_gd_mode_holds_at_most_two_parameter_sized_buffers(momentum, buffers):
    """The snapshot for the no-damage guarantee and the offset x − θ̃ (plus v with momentum)."""
    memory = measure(projection="gd", projection_tol=0.0, momentum=momentum)
    assert memory.step_buffers == pytest.approx(buffers, abs=SCALARS)
    assert memory.state_buffers == pytest.approx(1.0 if momentum else 0.0)


@pytest.fixture(params=[False, True], ids=["per-tensor", "gathered"])
def gathered(request, monkeypatch):
    """Whether the Anderson solver gathers the gradient into a flat buffer: this small MLP's
    tensors are below `GATHER_BELOW`, so it does unless the threshold is lowered to 0."""
    if not request.param:
        monkeypatch.setattr(problem, "GATHER_BELOW", 0)
    return request.param


@pytest.mark.parametrize("m", [1, 2, 5])
def test_anderson_memory_is_2m_plus_3_buffers(m, gathered, monkeypatch):
    """Snapshot, offset, p_k and p_{k+1}, the step in flight and m − 1 kept differences of
    each kind, at the peak; the first gradient is not held once the next call replaces it.
    A gathered gradient is one more buffer. At m = 5 the peak is a blind step formed after the
    last trial point, which the blind rule builds only when its first test passes: that test
    is made to pass wherever a blind step is possible, so that the peak is reached."""

    def model_test_passes(self, problem, before, point, check):
        return None if before is None or not check else 0.0

    monkeypatch.setattr(projection.AndersonProjection, "_last_prediction", model_test_passes)
    memory = measure(projection_tol=0.0, anderson_memory=m)
    assert memory.step_buffers == pytest.approx(2 * m + 3 + gathered, abs=SCALARS)


@pytest.mark.parametrize("projection", ["gd", "anderson"])
def test_on_the_cpu_a_step_reuses_the_last_steps_buffers(projection, gathered):
    """After the first step the workspace serves every parameter-sized buffer: a step
    allocates none (only the new momentum buffer would be), and keeps its working set."""
    memory = measure(projection=projection, projection_tol=0.0, anderson_memory=2)
    assert memory.peak_buffers < SCALARS
    assert memory.workspace_bytes / memory.param_bytes == pytest.approx(
        2 if projection == "gd" else 2 * 2 + 3 + gathered
    )


@pytest.mark.parametrize("projection", ["gd", "anderson"])
def test_no_gradient_outlives_the_next_closure_call(projection):
    """A gradient the closure made is free once RBO clears `.grad` for the next call: holding
    it (say, by a loop variable) costs a parameter copy in peak RSS that the tracker cannot
    see."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 5))
    x, y = torch.randn(32, 20), torch.randint(0, 5, (32,))
    opt = RBO(
        model.parameters(),
        lr=0.5,
        radius=0.5,
        projection=projection,
        projection_steps=4,
        projection_tol=0.0,
    )
    alive_at_call = []
    earlier: list[weakref.ref] = []

    def closure():
        alive_at_call.append(sum(ref() is not None for ref in earlier))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        earlier.extend(weakref.ref(p.grad) for p in model.parameters())
        return loss

    opt.step(closure)
    opt.step(closure)
    assert len(alive_at_call) >= 6
    assert alive_at_call == [0] * len(alive_at_call)


def test_the_workspace_stays_at_the_working_set_when_the_parameters_change():
    """Steps whose active parameters differ (a parameter without a gradient sits out) keep one
    working set, not one per parameter list, and stay exact."""
    model, x, y = _mlp()
    opt = RBO(model.parameters(), lr=0.5, radius=0.5, projection_steps=4, anderson_memory=1)
    closure = model_closure(opt, model, x, y)
    param_bytes = sum(p.nbytes for p in model.parameters())
    for step in range(8):
        frozen = step % 2 == 1  # every other step the last layer's bias gets no gradient
        model[2].bias.requires_grad_(not frozen)
        reference = RBO(
            [p for p in model.parameters() if p.requires_grad],
            lr=0.5,
            radius=0.5,
            projection_steps=4,
            anderson_memory=1,
        )
        twin = [p.detach().clone() for p in model.parameters()]
        opt.step(closure)
        held = sum(t.nbytes for t in opt.workspace.held())
        assert held <= 6 * param_bytes  # 2m + 3 copies and the gathered gradient at most
        moved = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():  # the same step by a fresh optimizer, from the same point
            for p, t in zip(model.parameters(), twin, strict=True):
                p.copy_(t)
        reference.step(closure)
        for p, m in zip(model.parameters(), moved, strict=True):
            torch.testing.assert_close(p.detach(), m, rtol=0, atol=0)
    model[2].bias.requires_grad_(True)
