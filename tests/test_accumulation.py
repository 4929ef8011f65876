"""Gradient accumulation: a closure over micro-batches equals the closure over the batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rollingball import RBO
from rollingball.optim.accumulation import accumulated_loss, micro_batch_closure, split_batch


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()


def make_batch(n: int = 19) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(n, 6, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=generator)


def run(
    accumulate: bool, size: int = 5, steps: int = 3, reduction: str = "mean"
) -> tuple[list[float], list[int], list[torch.Tensor]]:
    model = make_model()
    x, y = make_batch()
    lr = 0.5 if reduction == "mean" else 0.5 / len(x)
    opt = RBO(model.parameters(), lr=lr, radius=0.5, momentum=0.5)

    def loss_fn(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(xb), yb, reduction=reduction)

    def whole() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(x, y)
        loss.backward()
        return loss

    weights = [1.0] * len(split_batch(x, y, size=size)) if reduction == "sum" else None
    closure = (
        micro_batch_closure(opt, loss_fn, split_batch(x, y, size=size), weights=weights)
        if accumulate
        else whole
    )
    losses, calls = [], []
    for _ in range(steps):
        losses.append(float(opt.step(closure).detach()))
        calls.append(opt.last_stats["grad_evals"])
    return losses, calls, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("size", [1, 4, 5, 19])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_micro_batches_equal_the_whole_batch(size: int, reduction: str) -> None:
    losses, calls, params = run(False, reduction=reduction)
    acc_losses, acc_calls, acc_params = run(True, size, reduction=reduction)
    assert acc_calls == calls and sum(calls) > 3  # the same projections, several calls each
    assert acc_losses == pytest.approx(losses, rel=1e-12)
    for ours, theirs in zip(acc_params, params, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-11)
    assert losses[-1] < losses[0]


def test_the_closure_returns_the_batch_loss_and_its_gradient() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = make_batch()
    loss = nn.functional.cross_entropy(model(x), y)
    expected = torch.autograd.grad(loss, list(model.parameters()))
    closure = micro_batch_closure(
        opt, lambda a, b: nn.functional.cross_entropy(model(a), b), split_batch(x, y, size=7)
    )
    for _ in range(2):  # a second call starts from zero gradients again
        value = closure()
        assert not value.requires_grad
        assert float(value) == pytest.approx(float(loss.detach()), rel=1e-14)
        for p, g in zip(model.parameters(), expected, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


def test_a_lone_tensor_micro_batch_is_passed_as_one_argument() -> None:
    w = torch.tensor([2.0], requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    data = torch.arange(6.0)
    closure = micro_batch_closure(opt, lambda b: (w * b).mean(), data.split(4))
    assert float(closure()) == pytest.approx(float((2.0 * data).mean()))
    assert float(w.grad) == pytest.approx(float(data.mean()))


def test_bad_input_is_refused() -> None:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="size must be >= 1"):
        split_batch(torch.zeros(3), size=0)
    with pytest.raises(ValueError, match="share their first dimension"):
        split_batch(torch.zeros(3), torch.zeros(4), size=2)
    with pytest.raises(ValueError, match="at least one micro-batch"):
        micro_batch_closure(opt, lambda x: x.sum(), [])
    with pytest.raises(ValueError, match="2 weights for 1"):
        micro_batch_closure(opt, lambda x: x.sum(), [torch.zeros(2)], weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="pass weights="):
        micro_batch_closure(opt, lambda x: x.sum(), [(torch.tensor(1.0),)])


@pytest.mark.parametrize("size", [4, 19])
def test_accumulated_loss_then_backward_gives_the_whole_batch(size: int) -> None:
    model = make_model()
    x, y = make_batch()

    def loss_fn(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(xb), yb)

    whole = loss_fn(x, y)
    expected = torch.autograd.grad(whole, list(model.parameters()))
    loss = accumulated_loss(loss_fn, split_batch(x, y, size=size))
    assert loss.requires_grad  # the caller's backward adds the last micro-batch
    loss.backward()
    torch.testing.assert_close(loss.detach(), whole.detach(), rtol=1e-12, atol=0)
    for p, g in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-12)
