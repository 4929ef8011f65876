"""RBO with the closures of real training code: Dropout, augmentation, BatchNorm, mistakes."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from rollingball import RBO
from rollingball.optim.batchnorm import running_stat_buffers
from rollingball.optim.rbo import ProjectionWarning
from stepping import model_closure

# the projection's settings are explicit, so that the counts below do not follow the defaults
SOLVER = dict(projection="anderson", projection_steps=20, projection_tol=1e-4)


def data(rows: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(rows, 10, generator=g), torch.randint(0, 3, (rows,), generator=g)


def dropout_net(p: float = 0.2) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Dropout(p), nn.Linear(32, 3))


class Masks:
    """The Dropout mask of every forward pass, grouped by optimizer step."""

    def __init__(self, dropout: nn.Module) -> None:
        self.steps: list[list[torch.Tensor]] = []
        dropout.register_forward_hook(lambda _m, inputs, out: self.steps[-1].append(out == 0))

    def new_step(self) -> None:
        self.steps.append([])


def train_with_dropout(fixed: bool, steps: int, lr: float = 0.05) -> tuple[RBO, Masks, list]:
    model = dropout_net()
    x, y = data()
    masks = Masks(model[2])
    opt = RBO(model.parameters(), lr=lr, radius=0.2, fixed_randomness=fixed, **SOLVER)

    def closure() -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    stats = []
    for _ in range(steps):
        masks.new_step()
        opt.step(closure)
        stats.append(opt.last_stats)
    return opt, masks, stats


def test_every_call_of_a_step_sees_the_same_dropout_mask_and_the_projection_converges() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProjectionWarning)
        _, masks, stats = train_with_dropout(fixed=True, steps=8)
    assert all(s["converged"] for s in stats)
    assert sum(s["grad_evals"] for s in stats) <= 6 * 8  # measured: 40, 5 calls per step
    for step in masks.steps:
        assert len(step) >= 2
        assert all(torch.equal(mask, step[0]) for mask in step)
    assert not torch.equal(masks.steps[0][0], masks.steps[1][0])  # a new mask every step


def test_without_fixed_randomness_every_call_draws_a_new_mask() -> None:
    _, masks, stats = train_with_dropout(fixed=False, steps=4)
    assert not any(s["converged"] for s in stats)
    # the whole budget, every step: K = 20, and 2 more for rejected trial points
    assert [s["grad_evals"] for s in stats] == [23] * 4
    assert all(s["residual"] > 0.5 for s in stats)  # measured: 1.0 to 2.6 over 8 steps
    for step in masks.steps:
        assert not torch.equal(step[0], step[1])


def test_a_random_augmentation_inside_the_closure_repeats_within_a_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = data()
    opt = RBO(model.parameters(), lr=0.1, radius=0.2, **SOLVER)
    seen: list[list[torch.Tensor]] = []

    def closure() -> torch.Tensor:
        view = x + 0.1 * torch.randn_like(x)  # noise, then a random flip of the features
        view = view.flip(1) if torch.rand(()) < 0.5 else view
        seen[-1].append(view)
        loss = nn.functional.cross_entropy(model(view), y)
        loss.backward()
        return loss

    for _ in range(3):
        seen.append([])
        opt.step(closure)
        assert opt.last_stats["converged"]
    for step in seen:
        assert len(step) >= 2 and all(torch.equal(view, step[0]) for view in step)
    assert not torch.equal(seen[0][0], seen[1][0])


def test_a_step_leaves_the_generator_where_one_closure_call_leaves_it() -> None:
    model = dropout_net()
    x, y = data()
    opt = RBO(model.parameters(), lr=0.05, radius=0.2, **SOLVER)

    def closure() -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    torch.manual_seed(5)
    opt.step(closure)
    assert opt.last_stats["grad_evals"] >= 3
    after_step = torch.rand(4)
    torch.manual_seed(5)
    closure()
    torch.testing.assert_close(torch.rand(4), after_step, rtol=0, atol=0)


def test_radius_zero_is_sgd_with_dropout_including_the_random_stream() -> None:
    x, y = data()
    nets, draws = [], []
    for make in (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: RBO(p, lr=0.1, radius=0.0, momentum=0.9),
    ):
        model = dropout_net(p=0.5)
        opt = make(model.parameters())
        torch.manual_seed(3)
        for _ in range(5):
            opt.step(model_closure(opt, model, x, y))
        nets.append(model)
        draws.append(torch.rand(4))
    for p, q in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(draws[0], draws[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dropout_masks_repeat_on_cuda() -> None:
    model = dropout_net().cuda()
    x, y = (t.cuda() for t in data())
    masks = Masks(model[2])
    opt = RBO(model.parameters(), lr=0.05, radius=0.2, **SOLVER)

    def closure() -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        masks.new_step()
        opt.step(closure)
        assert opt.last_stats["converged"]
    for step in masks.steps:
        assert len(step) >= 2 and all(torch.equal(mask, step[0]) for mask in step)


def test_a_closure_that_forgets_zero_grad_takes_the_same_steps() -> None:
    x, y = data()
    runs = []
    for forget in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
        opt = RBO(model.parameters(), lr=0.5, radius=0.5, **SOLVER)

        def closure(model: nn.Module = model, opt: RBO = opt, forget: bool = forget):
            if not forget:
                opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        calls = []
        for _ in range(3):
            opt.step(closure)
            calls.append(opt.last_stats["grad_evals"])
        runs.append((calls, [p.detach().clone() for p in model.parameters()]))
    (calls, params), (forgot_calls, forgot_params) = runs
    assert forgot_calls == calls and max(calls) < 21
    assert all(torch.equal(p, q) for p, q in zip(params, forgot_params, strict=True))


def steps_with_warnings(fixed: bool, steps: int, **options) -> tuple[list, list]:
    model = dropout_net()
    x, y = data()
    opt = RBO(model.parameters(), **{"lr": 0.05, "radius": 0.2, **options}, fixed_randomness=fixed)

    def closure() -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    residuals = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            opt.step(closure)
            residuals.append(opt.last_stats["residual"])
    return [w for w in caught if issubclass(w.category, ProjectionWarning)], residuals


def test_poor_projection_progress_warns_once_and_names_the_causes() -> None:
    caught, residuals = steps_with_warnings(fixed=False, steps=25)
    assert sum(r > 0.5 for r in residuals) == 25  # every step poor, the budget spent
    assert len(caught) == 1
    message = str(caught[0].message)
    for knob in ("Dropout", "fixed_randomness", "same minibatch", "radius", "max_update"):
        assert knob in message
    assert caught[0].filename == __file__  # it points at the caller of step


@pytest.mark.parametrize("options", [{}, {"projection_steps": 1}, {"radius": 1.0, **SOLVER}])
def test_a_clean_closure_does_not_warn_at_any_budget(options) -> None:
    caught, residuals = steps_with_warnings(fixed=True, steps=25, **options)
    assert caught == []
    assert max(residuals) < 0.5


@pytest.mark.parametrize("radius", [0.0, 0.5])
def test_a_closure_without_backward_is_refused_with_the_reason(radius) -> None:
    model = nn.Linear(10, 3)
    x, y = data()
    before = [p.detach().clone() for p in model.parameters()]
    opt = RBO(model.parameters(), lr=0.1, radius=radius)
    with pytest.raises(RuntimeError, match=r"must call loss\.backward\(\)"):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert opt.last_stats["skipped"] and opt.grad_evals == 1


def test_a_closure_returning_per_sample_losses_is_refused_with_the_reason() -> None:
    model = nn.Linear(10, 3)
    x, y = data()
    opt = RBO(model.parameters(), lr=0.1, radius=0.5)

    def closure() -> torch.Tensor:
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()
        return losses

    with pytest.raises(ValueError, match=r"must return a scalar loss, got a tensor of shape \(32"):
        opt.step(closure)


def test_an_exception_in_the_closure_is_recorded_as_a_step_that_did_not_happen() -> None:
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = data()
    opt = RBO(model.parameters(), lr=0.5, radius=0.5, **SOLVER)
    calls = [0]
    fail_at = [0]

    def closure() -> torch.Tensor:
        calls[0] += 1
        if calls[0] == fail_at[0]:
            raise OSError("the data server went away")
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.last_stats["skipped"] is False and opt.last_stats["converged"] is True
    evals = opt.grad_evals
    calls[0], fail_at[0] = 0, 3
    with pytest.raises(OSError, match="went away"):
        opt.step(closure)
    assert opt.last_stats["skipped"] is True and opt.last_stats["converged"] is False
    assert opt.last_stats["grad_evals"] == 3 and opt.grad_evals == evals + 3
    assert math.isfinite(opt.last_stats["loss"])  # the loss at the start point was known


def batchnorm_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))


@pytest.mark.parametrize("give_model", [True, False])
def test_running_statistics_move_once_per_step_when_rbo_knows_the_model(give_model) -> None:
    model = batchnorm_net()
    x, y = data()
    opt = RBO(model.parameters(), lr=0.1, radius=0.5, model=model if give_model else None, **SOLVER)

    def closure() -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    calls = 0
    for _ in range(6):
        opt.step(closure)
        calls += opt.last_stats["grad_evals"]
    tracked = int(running_stat_buffers(model)[2])
    assert calls >= 12
    assert tracked == (6 if give_model else calls)


def test_a_fixed_number_of_iterations_is_not_watched() -> None:
    # projection_tol=0 asks for K iterations whatever the residual (the authors' scheme)
    caught, residuals = steps_with_warnings(
        fixed=False, steps=25, projection="gd", projection_steps=3, projection_tol=0.0
    )
    assert sum(r > 0.5 for r in residuals) > 12 and caught == []
