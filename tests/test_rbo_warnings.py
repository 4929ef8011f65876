"""The first hour with RBO on a small BatchNorm CNN: the README's settings train without a
warning, and every piece of advice the `ProjectionWarning` gives changes what it is given for."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from rollingball import RBO
from rollingball.optim.rbo import GRADIENT_RATIO, POOR_RESIDUAL, ProjectionWarning
from stepping import model_closure

QUICK_START = dict(lr=0.05, momentum=0.9, radius=0.1)  # README's quick start
STEPS = 40


def images(rows: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes of noisy 12 × 12 one-channel images around four random templates."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (rows,), generator=g)
    templates = torch.randn(4, 1, 12, 12, generator=g)
    return templates[y] + 0.8 * torch.randn(rows, 1, 12, 12, generator=g), y


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(64, 4),
    )


Closure = Callable[[RBO, nn.Module, torch.Tensor, torch.Tensor], Callable[[], torch.Tensor]]


def plain(opt: RBO, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    return model_closure(opt, model, x, y)


def bf16(opt: RBO, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    def closure() -> torch.Tensor:  # the forward pass in bfloat16, the parameters float32
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def clipping(opt: RBO, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        return loss

    return closure


def new_batch_every_call(opt: RBO, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    rows = torch.Generator().manual_seed(2)

    def closure() -> torch.Tensor:  # the mistake: a fresh minibatch at every call
        pick = torch.randint(0, len(x), (len(x),), generator=rows)
        loss = nn.functional.cross_entropy(model(x[pick]), y[pick])
        loss.backward()
        return loss

    return closure


def train(closure_for: Closure = plain, steps: int = STEPS, **options):
    """`steps` RBO steps on 32-image minibatches with random shifts (drawn inside the step,
    from torch's generator) and a cosine schedule; the warnings, the per-step stats and the
    loss of the final model on all the images."""
    x, y = images()
    model = cnn()
    opt = RBO(model.parameters(), model=model, **options)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    stats = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            rows = slice(32 * step % len(x), 32 * step % len(x) + 32)
            shifted = torch.roll(x[rows], int(torch.randint(-1, 2, ())), dims=-1)
            opt.step(closure_for(opt, model, shifted, y[rows]))
            schedule.step()
            stats.append(opt.last_stats)
    model.eval()
    with torch.no_grad():
        final = nn.functional.cross_entropy(model(x), y).item()
    return [w for w in caught if issubclass(w.category, ProjectionWarning)], stats, final


def poor(stats: list[dict]) -> int:
    return sum(s["residual"] > POOR_RESIDUAL for s in stats)


@pytest.mark.parametrize("closure_for", [plain, bf16], ids=["float32", "bf16-autocast"])
def test_the_quick_start_settings_train_a_batchnorm_cnn_without_a_warning(closure_for) -> None:
    caught, stats, final = train(closure_for, **QUICK_START)
    assert caught == []
    assert poor(stats) <= STEPS // 8 and final < 0.5 * stats[0]["loss"]


def test_a_clipping_closure_is_diagnosed_by_name_and_max_update_trains_instead() -> None:
    caught, stats, clipped = train(clipping, **QUICK_START)
    assert len(caught) == 1 and poor(stats) > STEPS // 2
    message = str(caught[0].message)
    ratio = float(message.split("changes at ")[1].split(" times")[0])
    assert ratio > GRADIENT_RATIO  # the clipped gradient is shorter than the loss's slope
    assert "not the gradient of its loss" in message and "clip_grad_norm_" in message
    assert "max_update" in message
    # the advice: no clipping in the closure, the step bounded by max_update
    caught, stats, bounded = train(**QUICK_START, max_update=0.05)
    assert caught == [] and poor(stats) <= STEPS // 8
    assert sum(s["update_bounded"] for s in stats) >= 5  # the bound was active
    _, _, unclipped = train(**QUICK_START)
    print(
        f"loss on all images after {STEPS} steps: clip_grad_norm_(0.1) in the closure "
        f"{clipped:.3f}, max_update=0.05 {bounded:.3f}, neither {unclipped:.3f}"
    )
    assert bounded < 0.5 * clipped and unclipped < 0.5 * clipped


def test_a_radius_too_large_warns_with_a_true_gradient_and_the_lower_radius_does_not() -> None:
    caught, stats, _ = train(lr=0.1, radius=0.5)  # the README's earlier quick start
    assert len(caught) == 1 and poor(stats) > STEPS // 2
    message = str(caught[0].message)
    assert "gradient matches its loss" in message and "lower radius" in message
    caught, stats, _ = train(lr=0.1, radius=0.1)  # the advice: lower radius
    assert caught == [] and poor(stats) <= STEPS // 8


def test_a_new_minibatch_at_every_call_warns_and_the_same_minibatch_does_not() -> None:
    caught, stats, _ = train(new_batch_every_call, **QUICK_START)
    assert len(caught) == 1 and poor(stats) > STEPS // 2
    assert "same minibatch" in str(caught[0].message)
    caught, _, _ = train(plain, **QUICK_START)  # the advice: the same minibatch at each call
    assert caught == []


def test_fixed_randomness_is_the_advice_for_dropout_and_augmentation_drawn_per_call() -> None:
    caught, stats, _ = train(**QUICK_START, fixed_randomness=False)
    assert len(caught) == 1 and poor(stats) > 10
    assert "fixed_randomness=True" in str(caught[0].message)
    caught, _, _ = train(**QUICK_START, fixed_randomness=True)
    assert caught == []


def test_the_warning_points_at_the_line_that_calls_step_under_a_scheduler() -> None:
    caught, _, _ = train(lr=0.1, radius=0.5)
    assert caught[0].filename == __file__
    with open(__file__) as source:
        assert "opt.step(" in source.readlines()[caught[0].lineno - 1]


def test_steps_at_a_vanishing_learning_rate_do_not_count_as_poor() -> None:
    # r(θ) shrinks with η: at η = 1e-9 the relative residual measures round-off (far above
    # 0.5), while the contact point is met to within 1% of the centre's offset
    x, y = images(32)
    model = cnn()
    opt = RBO(model.parameters(), model=model, lr=1e-9, radius=0.1)
    residuals = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProjectionWarning)
        for _ in range(25):
            opt.step(plain(opt, model, x, y))
            residuals.append(opt.last_stats["residual"])
    assert min(residuals) > POOR_RESIDUAL and all(map(math.isfinite, residuals))


def test_a_fixed_budget_turns_the_watch_off() -> None:
    caught, stats, _ = train(clipping, **QUICK_START, projection_tol=0.0)
    assert caught == [] and poor(stats) > STEPS // 2
    # no gradient test (3 more calls) is spent: a step costs 1 + K, and up to 2 more when
    # trial points are rejected, as the clipping closure's are
    assert max(s["grad_evals"] for s in stats) <= 1 + 2 + 2


def test_the_gradient_test_costs_3_calls_and_leaves_the_run_as_it_was() -> None:
    runs = []
    for watched in (True, False):
        x, y = images()
        model = cnn()
        opt = RBO(model.parameters(), model=model, lr=0.1, radius=0.5)
        opt._warned = not watched  # a warned optimizer never tests again
        calls, points, draws = [], [], []
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            for step in range(25):
                rows = slice(32 * step % len(x), 32 * step % len(x) + 32)
                opt.step(plain(opt, model, x[rows], y[rows]))
                calls.append(opt.last_stats["grad_evals"])
                points.append([p.detach().clone() for p in model.parameters()])
                draws.append(torch.rand(()))  # the generator after the step (Dropout draws)
        runs.append((calls, points, draws, model.state_dict()))
    (calls, points, draws, state), (plain_calls, plain_points, plain_draws, plain_state) = runs
    assert [a - b for a, b in zip(calls, plain_calls, strict=True)].count(3) == 1
    assert sum(calls) == sum(plain_calls) + 3
    for ours, theirs in zip(points, plain_points, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(ours, theirs, strict=True))
    assert draws == plain_draws
    assert all(torch.equal(state[k], plain_state[k]) for k in state)  # BatchNorm statistics
