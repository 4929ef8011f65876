"""The optimizer registry: one closure interface, honest closure-call counts."""

import pytest
import torch
from torch import nn

from rollingball import RBO
from rollingball.baselines.entropy_sgd import EntropySGD
from rollingball.experiments.optimizers import (
    OPTIMIZERS,
    CountingClosure,
    build_optimizer,
    optimizer_defaults,
)
from rollingball.experiments.runner import train_step


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    return model, x, y


def _closure(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


EXPECTED_CALLS = {"sgd": 1, "momentum": 1, "adamw": 1, "sam": 2, "usam": 2, "entropy_sgd": 7}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_closure_calls_per_step(name):
    model, x, y = _problem()
    hparams = {"langevin_steps": 7} if name == "entropy_sgd" else {}
    if name == "rbo":
        hparams = {"lr": 0.5, "radius": 0.5}
    opt = build_optimizer(name, model.parameters(), **hparams)
    closure = _closure(model, opt, x, y)
    start_loss = closure().item()
    for step in range(3):
        counted = CountingClosure(closure)
        loss = opt.step(counted)
        if step == 0:  # every optimizer returns the loss at the weights it started from
            assert loss.item() == pytest.approx(start_loss, rel=1e-6)
        if name == "rbo":
            assert counted.calls == opt.last_stats["grad_evals"]
            assert counted.calls == 1 + opt.last_stats["projection_steps"] >= 2
        else:
            assert counted.calls == EXPECTED_CALLS[name]
        if hasattr(opt, "last_stats") and "grad_evals" in opt.last_stats:
            assert opt.last_stats["grad_evals"] == counted.calls
    assert closure().item() < start_loss  # and they all descend


def test_train_step_counts_through_the_same_wrapper():
    model, x, y = _problem()
    opt = RBO(model.parameters(), lr=0.5, radius=1.0)
    total = 0
    for _ in range(3):
        result = train_step(model, opt, x, y, nn.functional.cross_entropy)
        assert result.grad_evals == opt.last_stats["grad_evals"] == result.stats["grad_evals"]
        total += result.grad_evals
        assert result.count == 32 and 0 <= result.correct <= 32
    assert total == opt.grad_evals


def test_rbo_at_radius_zero_in_the_registry_is_sgd():
    model, x, y = _problem()
    clone = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    rbo = build_optimizer("rbo", model.parameters(), lr=0.3, radius=0.0)
    counted = CountingClosure(_closure(model, rbo, x, y))
    rbo.step(counted)
    assert counted.calls == 1
    sgd_model, _, _ = _problem()
    sgd = build_optimizer("sgd", sgd_model.parameters(), lr=0.3)
    sgd.step(_closure(sgd_model, sgd, x, y))
    for a, b in zip(model.parameters(), sgd_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), clone, strict=True))


def test_defaults_are_documented_and_applied():
    assert optimizer_defaults("sam")["rho"] == 0.05
    assert optimizer_defaults("momentum")["momentum"] == 0.9
    assert optimizer_defaults("entropy_sgd")["langevin_steps"] == 20
    model, _, _ = _problem()
    sam = build_optimizer("sam", model.parameters())
    assert sam.param_groups[0]["rho"] == 0.05 and sam.param_groups[0]["momentum"] == 0.9
    esgd = build_optimizer("entropy_sgd", model.parameters(), gamma=0.1)
    assert isinstance(esgd, EntropySGD) and esgd.param_groups[0]["gamma"] == 0.1
    nesterov = build_optimizer("momentum", model.parameters(), nesterov=True)
    assert nesterov.param_groups[0]["nesterov"] is True


@pytest.mark.parametrize(
    "name, hparams, message",
    [
        ("lbfgs", {}, "unknown optimizer 'lbfgs'"),
        ("sgd", {"lr": -0.1}, "lr must be a finite number >= 0"),
        ("sgd", {"lr": 0.0}, "lr must be > 0"),
        ("adamw", {"lr": float("nan")}, "lr"),
        ("rbo", {"radius": -1.0}, "radius"),
        ("sam", {"rhoo": 0.1}, "no hyperparameter"),
    ],
)
def test_bad_optimizer_settings_are_refused(name, hparams, message):
    model, _, _ = _problem()
    with pytest.raises(ValueError, match=message):
        build_optimizer(name, model.parameters(), **hparams)
