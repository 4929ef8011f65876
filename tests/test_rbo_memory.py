"""The extra memory of a step, measured by tracking every tensor the optimizer allocates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rollingball import RBO
from rollingball.optim.memory import peak_step_memory

SCALARS = 0.05  # the step's few 0-dim results (norms, inner products), in parameter sizes


def measure(**options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 5))
    x, y = torch.randn(32, 20), torch.randint(0, 5, (32,))
    opt = RBO(model.parameters(), **{"lr": 0.5, "radius": 0.5, "projection_steps": 6, **options})

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    return peak_step_memory(opt, closure)


def test_sgd_path_allocates_nothing():
    memory = measure(radius=0.0)
    assert memory.peak_buffers < SCALARS and memory.state_bytes == 0


@pytest.mark.parametrize(("momentum", "buffers"), [(0.0, 2), (0.9, 3)])
def test_gd_mode_holds_at_most_two_parameter_sized_buffers(momentum, buffers):
    """The snapshot for the no-damage guarantee and the offset x − θ̃ (plus v with momentum)."""
    memory = measure(projection="gd", projection_tol=0.0, momentum=momentum)
    assert memory.peak_buffers == pytest.approx(buffers, abs=SCALARS)
    assert memory.state_buffers == pytest.approx(1.0 if momentum else 0.0)


@pytest.mark.parametrize("m", [1, 2, 5])
def test_anderson_memory_is_2m_plus_3_buffers(m):
    """Snapshot, offset, p_k and p_{k+1}, the step in flight and m − 1 kept differences of
    each kind, at the peak; the first gradient is not held once the next call replaces it."""
    memory = measure(projection_tol=0.0, anderson_memory=m)
    assert memory.peak_buffers == pytest.approx(2 * m + 3, abs=SCALARS)
