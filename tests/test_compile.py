"""torch.compile: a compiled model inside RBO's closure takes the same steps as the eager one.

The default suite traces with the "aot_eager" backend (dynamo + AOTAutograd, no C++ build,
a few seconds); the inductor backend compiles C++ and takes about 30 s here, so it is slow.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from rollingball import RBO
from stepping import model_closure

STEPS = 3


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def train(backend: str | None) -> tuple[nn.Module, list[int], list[float]]:
    net = make_net()
    model = net if backend is None else torch.compile(net, backend=backend)
    opt = RBO(model.parameters(), lr=0.5, radius=0.5, momentum=0.5)
    generator = torch.Generator().manual_seed(5)
    calls, losses = [], []
    for _ in range(STEPS):
        x = torch.randn(16, 6, generator=generator)
        y = torch.randint(0, 3, (16,), generator=generator)
        closure = model_closure(opt, model, x, y)
        losses.append(float(opt.step(closure).detach()))
        calls.append(opt.last_stats["grad_evals"])
    return net, calls, losses


def _check_same_run(backend: str) -> None:
    torch._dynamo.reset()
    counters.clear()
    net, calls, losses = train(backend)
    # one graph for all closure calls: RBO's in-place parameter updates cause no recompilation
    assert counters["stats"]["unique_graphs"] == 1
    ref_net, ref_calls, ref_losses = train(None)
    assert calls == ref_calls and min(calls) >= 3
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for ours, theirs in zip(net.parameters(), ref_net.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_compiled_model_in_the_closure() -> None:
    _check_same_run("aot_eager")


@pytest.mark.slow
def test_inductor_compiled_model_in_the_closure() -> None:
    _check_same_run("inductor")
