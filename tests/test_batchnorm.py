"""Only the first closure call of a step may update BatchNorm running statistics."""

import copy
import math

import pytest
import torch
from torch import nn

from rollingball import RBO
from rollingball.experiments.optimizers import build_optimizer
from rollingball.optim.batchnorm import first_call_updates_batchnorm, running_stat_buffers
from stepping import model_closure


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 8),
        nn.BatchNorm1d(8, momentum=None),  # cumulative average: uses num_batches_tracked
        nn.Tanh(),
        nn.Linear(8, 3),
    )


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def _stats_after_one_forward(model, x):
    reference = copy.deepcopy(model)
    reference.train()
    with torch.no_grad():
        reference(x)
    return [b.clone() for b in running_stat_buffers(reference)]


@pytest.mark.parametrize("name", ["rbo", "sam", "entropy_sgd"])
def test_running_stats_after_one_step_equal_those_after_one_forward(name):
    model = _model()
    x, y = _batch()
    expected = _stats_after_one_forward(model, x)
    hparams = {"rbo": {"lr": 0.1, "radius": 0.5}, "sam": {}, "entropy_sgd": {"langevin_steps": 5}}
    opt = build_optimizer(name, model.parameters(), **hparams[name])
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(first_call_updates_batchnorm(model, closure))
    assert len(calls) >= 2
    buffers = running_stat_buffers(model)
    assert len(buffers) == 6
    for got, want in zip(buffers, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert int(buffers[2]) == 1  # num_batches_tracked of the first BatchNorm: one update


def test_without_the_helper_every_call_updates_the_statistics():
    model = _model()
    x, y = _batch()
    opt = RBO(model.parameters(), lr=0.1, radius=0.5)
    opt.step(model_closure(opt, model, x, y))
    tracked = int(running_stat_buffers(model)[2])
    assert tracked == opt.last_stats["grad_evals"] >= 2


def test_the_batch_statistics_inside_each_call_are_unchanged():
    # the wrapper restores buffers only; every forward pass still normalises with its batch
    model = _model()
    x, _ = _batch()
    out = []
    wrapped = first_call_updates_batchnorm(model, lambda: out.append(model(x).detach()) or out[-1])
    wrapped()
    wrapped()
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)


def test_a_model_without_batchnorm_gets_its_closure_back():
    model = nn.Linear(2, 2)

    def closure():
        return torch.zeros(())

    assert first_call_updates_batchnorm(model, closure) is closure


def test_a_later_call_that_raises_leaves_the_statistics_of_the_first():
    model = _model()
    x, _ = _batch()
    expected = _stats_after_one_forward(model, x)
    calls = [0]

    def closure():
        calls[0] += 1
        model(x)
        if calls[0] == 2:
            raise KeyboardInterrupt
        return torch.zeros(())

    wrapped = first_call_updates_batchnorm(model, closure)
    wrapped()
    with pytest.raises(KeyboardInterrupt):
        wrapped()
    for got, want in zip(running_stat_buffers(model), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_refused_gd_step_at_tol_0_leaves_the_statistics_of_one_forward():
    # tol 0 takes no ‖r‖ between its first and last iteration: a non-finite gradient there
    # is found at the next call's loss, after a forward from non-finite parameters, whose
    # running statistics `model=` puts back
    model = _model()
    x, y = _batch()
    expected = _stats_after_one_forward(model, x)
    before = [p.detach().clone() for p in model.parameters()]
    opt = RBO(
        model.parameters(),
        lr=0.1,
        radius=0.5,
        projection="gd",
        projection_steps=6,
        projection_tol=0.0,
        model=model,
        on_nonfinite="skip",
    )
    calls = [0]

    def closure():
        calls[0] += 1
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if calls[0] == 2:
            model[0].weight.grad[0, 0, 0, 0] = math.nan
        return loss

    opt.step(closure)
    assert opt.last_stats["skipped"] and calls[0] == 3
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    for got, want in zip(running_stat_buffers(model), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
