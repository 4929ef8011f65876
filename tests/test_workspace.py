"""The workspace's flat buffers: views into one tensor, and reductions and updates over it that
equal the per-tensor ones and cost a few kernels whatever the number of parameter tensors."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from rollingball import RBO
from rollingball.optim import problem, projection
from rollingball.optim.geometry import (
    add_,
    inner_device,
    scale_,
    squared_norm_device,
    to_host,
)
from rollingball.optim.workspace import FlatBuffer, Workspace, flat_pair
from stepping import model_closure


def _params(dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(300, 700), (700,), (1000, 300), (3,), (5, 2, 3)]
    return [torch.randn(shape, generator=generator, dtype=dtype) for shape in shapes]


def _filled(workspace: Workspace, like: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    values = [torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in like]
    return workspace.scaled(values, 1.0)


def test_a_buffer_is_views_into_one_flat_tensor():
    params = _params(torch.float32)
    buffer = _filled(Workspace(), params, 1)
    assert isinstance(buffer, FlatBuffer)
    assert [t.shape for t in buffer] == [p.shape for p in params]
    assert all(
        t.untyped_storage().data_ptr() == buffer.flat.untyped_storage().data_ptr() for t in buffer
    )
    assert buffer.flat.numel() == sum(p.numel() for p in params)


def test_mixed_dtypes_or_strides_get_a_tensor_per_parameter():
    mixed = [torch.zeros(3, 4), torch.zeros(5, dtype=torch.float64)]
    channels_last = [torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last)]
    for like in (mixed, channels_last):
        buffer = Workspace().scaled(like, 2.0)
        assert not isinstance(buffer, FlatBuffer)
        assert [t.stride() for t in buffer] == [t.stride() for t in like]


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-14), (torch.float32, 1e-6)])
def test_flat_reductions_and_updates_equal_the_per_tensor_ones(dtype, tol):
    """‖a‖² and ⟨a, b⟩ within tol·‖a‖‖b‖ of the float64 sums; updates to one rounding.

    The flat kernels and torch's foreach kernels are different arithmetic paths (a fused
    multiply-add in one, a multiply then an add in the other, by the CPU's vector width), so
    a + αb may differ by one rounding of each term: |Δ| ≤ 2ε(|a| + |αb|).
    """
    workspace = Workspace()
    params = _params(dtype)
    a, b = _filled(workspace, params, 1), _filled(workspace, params, 2)
    plain_a, plain_b = [t.clone() for t in a], [t.clone() for t in b]
    exact = [
        sum(float((x.double() * y.double()).sum()) for x, y in zip(u, v, strict=True))
        for u, v in ((plain_a, plain_a), (plain_a, plain_b))
    ]
    flat = to_host([squared_norm_device(a), inner_device(a, b)])
    scale = [exact[0], (exact[0] * sum(float(t.double().square().sum()) for t in plain_b)) ** 0.5]
    for got, want, size in zip(flat, exact, scale, strict=True):
        assert abs(got - want) <= tol * size
    add_(a, b, -0.5)
    scale_(b, 3.0)
    bound = [
        2 * torch.finfo(dtype).eps * (x.abs() + 0.5 * y.abs())
        for x, y in zip(plain_a, plain_b, strict=True)
    ]
    torch._foreach_add_(plain_a, plain_b, alpha=-0.5)
    torch._foreach_mul_(plain_b, 3.0)
    for got, want, most in zip(a, plain_a, bound, strict=True):
        assert bool(((got - want).abs() <= most).all())
    for got, want in zip(b, plain_b, strict=True):  # one multiplication: correctly rounded
        torch.testing.assert_close(got, want, rtol=0, atol=0)


class _DotCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.dots = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("vdot", "dot"):
            self.dots += 1
        return func(*args, **(kwargs or {}))


def _default_rbo_on_layers(layers: int) -> tuple[RBO, Callable[[], torch.Tensor]]:
    """RBO's defaults (lr 0.1, ρ 0.5) on `layers` 8 × 8 linear layers, and its closure."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(layers)])
    x, y = torch.randn(16, 8), torch.randn(16, 8)
    opt = RBO(model.parameters(), lr=0.1, radius=0.5)
    return opt, model_closure(opt, model, x, y, nn.functional.mse_loss)


def _dots_per_default_step(layers: int) -> int:
    opt, closure = _default_rbo_on_layers(layers)
    opt.step(closure)
    with _DotCounter() as counter:
        opt.step(closure)
    return counter.dots


def test_reductions_between_buffers_do_not_grow_with_the_number_of_parameter_tensors():
    """Per default step, only the reductions that involve the gradient (‖g‖² at θ and at each
    trial point, ⟨g, u⟩, ⟨g, D⟩ for the blind rule: at most 6) take one kernel per tensor; the
    seven between buffers (‖u‖² at the second trial point, ‖p‖², ‖D‖², ⟨D, p⟩ at each) take one
    per chunk of the flat buffer, whatever the number of tensors."""
    few, many = _dots_per_default_step(2), _dots_per_default_step(40)
    per_tensor = (many - few) / (80 - 4)
    assert per_tensor <= 6
    assert many <= 6 * 80 + 7


def test_a_gathered_gradient_leaves_one_reduction_per_tensor(monkeypatch):
    """These 8 × 8 layers are below `GATHER_BELOW`: the Anderson solver copies each trial
    point's gradient into a flat buffer, so only ‖g‖² at θ (the first call's check) stays per
    tensor; with the threshold at 0 the per-tensor reductions come back."""
    few, many = _dots_per_default_step(2), _dots_per_default_step(40)
    assert (many - few) / (80 - 4) <= 1
    monkeypatch.setattr(problem, "GATHER_BELOW", 0)
    few_apart, many_apart = _dots_per_default_step(2), _dots_per_default_step(40)
    assert (many_apart - few_apart) / (80 - 4) > 4


def test_a_blind_step_that_the_model_test_refuses_costs_no_reduction(monkeypatch):
    """The blind rule's first test (was the Gauss–Newton model right about the last step?)
    needs host numbers only, so it is taken before the last synchronisation: where it refuses,
    the default step does not reduce ⟨g, D⟩ for the rule. Per step on 8 gathered tensors: ‖g‖²
    at θ per tensor, then 5 reductions at the first trial point and 6 at the second, one flat
    `vdot` each, and ⟨g, D⟩ only where the test holds."""
    decided: list[bool] = []
    last_prediction = projection.AndersonProjection._last_prediction

    def spy(self, *args):
        error = last_prediction(self, *args)
        decided.append(error is not None)
        return error

    monkeypatch.setattr(projection.AndersonProjection, "_last_prediction", spy)
    opt, closure = _default_rbo_on_layers(4)
    held = []
    for _ in range(6):
        decided.clear()
        with _DotCounter() as counter:
            opt.step(closure)
        assert opt.last_stats["grad_evals"] == 3 and len(set(decided)) == 1
        held.append(decided[0])
        assert counter.dots == 8 + 11 + decided[0]
    assert set(held) == {False, True}


def test_buffers_of_different_layouts_are_not_paired_element_by_element():
    """Same number of elements, different shapes: the flat tensors would pair the wrong
    elements, so the per-tensor path computes ⟨a, b⟩."""
    workspace = Workspace()
    a = _filled(workspace, [torch.zeros(2, 3), torch.zeros(4)], 1)
    b = _filled(workspace, [torch.zeros(4), torch.zeros(2, 3)], 2)
    assert isinstance(a, FlatBuffer) and isinstance(b, FlatBuffer)
    assert flat_pair(a, b) is None
    assert flat_pair(a, a) is not None
