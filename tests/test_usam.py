"""USAM: θ ← θ − η ∇L(θ + ρ ∇L(θ)), two closure calls, torch.optim.SGD's momentum and decay."""

import pytest
import torch
from torch import nn

from rollingball.baselines import USAM
from rollingball.experiments.optimizers import CountingClosure, build_optimizer
from stepping import loss_closure, model_closure


def _quadratic(dtype=torch.float64):
    a = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=dtype)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=dtype)
    theta = nn.Parameter(torch.tensor([0.7, -0.3, 1.2], dtype=dtype))
    return a, b, theta


def _quadratic_closure(opt, a, b, theta):
    return loss_closure(opt, lambda: 0.5 * theta @ a @ theta - b @ theta)


def test_quadratic_step_is_closed_form():
    # ∇f = Aθ − b, so θ⁺ = θ − η (A(θ + ρ(Aθ − b)) − b) = θ − η (I + ρA)(Aθ − b)
    a, b, theta = _quadratic()
    lr, rho = 0.2, 0.3
    opt = USAM([theta], lr=lr, rho=rho)
    start = theta.detach().clone()
    counted = CountingClosure(_quadratic_closure(opt, a, b, theta))
    loss = opt.step(counted)
    expected = start - lr * (torch.eye(3, dtype=a.dtype) + rho * a) @ (a @ start - b)
    assert counted.calls == 2
    assert torch.allclose(theta.detach(), expected, rtol=0, atol=1e-15)
    start_loss = 0.5 * start @ a @ start - b @ start
    assert loss.item() == pytest.approx(start_loss.item(), abs=1e-15)
    assert opt.last_stats == {"grad_evals": 2, "loss": pytest.approx(start_loss.item(), abs=1e-15)}


def _mlp_problem():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    return model, x, y


def _grad_at(model, params, x, y):
    """∇L at the point ``params`` (a list of tensors), by autograd, without touching the model."""
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    out = torch.func.functional_call(
        model, dict(zip(dict(model.named_parameters()), leaves, strict=True)), (x,)
    )
    return list(torch.autograd.grad(nn.functional.cross_entropy(out, y), leaves))


def test_mlp_steps_equal_a_hand_computation_with_momentum_and_weight_decay():
    model, x, y = _mlp_problem()
    lr, rho, mu, wd = 0.3, 0.1, 0.9, 0.01
    opt = USAM(model.parameters(), lr=lr, rho=rho, momentum=mu, weight_decay=wd)
    closure = model_closure(opt, model, x, y)
    theta = [p.detach().clone() for p in model.parameters()]
    buffers = None
    for _ in range(3):
        g = _grad_at(model, theta, x, y)
        d = _grad_at(model, [t + rho * gi for t, gi in zip(theta, g, strict=True)], x, y)
        d = [di + wd * t for di, t in zip(d, theta, strict=True)]
        buffers = (
            d if buffers is None else [mu * bi + di for bi, di in zip(buffers, d, strict=True)]
        )
        theta = [t - lr * bi for t, bi in zip(theta, buffers, strict=True)]
        opt.step(closure)
        for p, t in zip(model.parameters(), theta, strict=True):
            assert torch.allclose(p.detach(), t, rtol=0, atol=1e-14)
    assert opt.last_stats["grad_evals"] == 2


def test_rho_zero_is_torch_sgd_with_momentum_and_decay():
    model, x, y = _mlp_problem()
    twin = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    ours = USAM(model.parameters(), lr=0.2, rho=0.0, momentum=0.5, weight_decay=0.1)
    sgd = torch.optim.SGD(twin, lr=0.2, momentum=0.5, weight_decay=0.1)
    names = [name for name, _ in model.named_parameters()]
    for _ in range(3):
        ours.step(model_closure(ours, model, x, y))
        sgd.zero_grad()
        out = torch.func.functional_call(model, dict(zip(names, twin, strict=True)), (x,))
        nn.functional.cross_entropy(out, y).backward()
        sgd.step()
    for p, q in zip(model.parameters(), twin, strict=True):
        assert torch.equal(p.detach(), q.detach())


def test_parameters_are_restored_when_the_second_call_raises():
    a, b, theta = _quadratic()
    opt = USAM([theta], lr=0.1, rho=0.5)
    start = theta.detach().clone()
    inner = _quadratic_closure(opt, a, b, theta)
    calls = []

    def closure():
        calls.append(theta.detach().clone())
        if len(calls) == 2:
            raise KeyboardInterrupt
        return inner()

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert torch.equal(theta.detach(), start)
    # the second call saw θ + ρ∇f(θ)
    assert torch.allclose(calls[1], start + 0.5 * (a @ start - b), rtol=0, atol=1e-15)


def test_registry_builds_usam_and_refuses_bad_values():
    theta = _quadratic()[2]
    opt = build_optimizer("usam", [theta], lr=0.2, rho=0.3)
    assert isinstance(opt, USAM)
    assert opt.param_groups[0]["momentum"] == 0.0 and opt.param_groups[0]["rho"] == 0.3
    for kwargs, error, message in (
        (dict(rho=-1.0), ValueError, r"USAM: rho must be a finite number >= 0, got -1\.0"),
        (dict(weight_decay=float("inf")), ValueError, "USAM: weight_decay must be .* got inf"),
        (dict(lr="0.1"), TypeError, "USAM: lr must be a finite int or float >= 0, got str"),
    ):
        with pytest.raises(error, match=message):
            USAM([theta], **kwargs)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
