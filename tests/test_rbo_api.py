"""RBO as a torch.optim citizen: refusals, nothing lost on bad values, state, schedules, stats."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from rollingball import RBO
from rollingball.optim.rbo import STATS_KEYS


def model_and_batch(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    return model, torch.randn(16, 4), torch.randint(0, 2, (16,))


def closure_for(model, optimizer, x, y, poison_at=None, poison=math.nan, where="loss"):
    """A closure that counts its calls and, at call number `poison_at`, returns a bad value."""
    calls = [0]

    def closure():
        calls[0] += 1
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if calls[0] == poison_at and where == "loss":
            loss = loss * poison
        loss.backward()
        if calls[0] == poison_at and where == "grad":
            next(model.parameters()).grad[0, 0] = poison
        return loss

    return closure, calls


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": -0.1}, "learning rate"),
        ({"lr": math.nan}, "learning rate"),
        ({"radius": -1.0}, "radius"),
        ({"radius": math.nan}, "radius"),
        ({"radius": math.inf}, "radius"),
        ({"momentum": -0.5}, "momentum"),
        ({"weight_decay": -1e-3}, "weight_decay"),
        ({"projection_steps": 0}, "projection_steps"),
        ({"projection": "newton"}, "unknown projection solver"),
        ({"projection_step_size": 0.0}, "projection_step_size"),
        ({"projection_step_size": -1.0}, "projection_step_size"),
        ({"projection_tol": -1e-6}, "projection_tol"),
        ({"loss_scale": 0.0}, "loss_scale"),
        ({"anderson_memory": 0}, "anderson_memory"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite"),
    ],
)
def test_bad_hyperparameters_are_refused_with_a_clear_message(options, message):
    model, _, _ = model_and_batch()
    with pytest.raises(ValueError, match=message):
        RBO(model.parameters(), **{"lr": 0.1, **options})


def test_groups_with_different_radii_are_refused():
    model, x, y = model_and_batch()
    first, _, second = model.children()
    with pytest.raises(ValueError, match="same radius"):
        RBO(
            [{"params": first.parameters(), "radius": 1.0}, {"params": second.parameters()}],
            radius=0.5,
        )
    opt = RBO([{"params": first.parameters()}, {"params": second.parameters()}], lr=0.1, radius=0.5)
    opt.param_groups[1]["radius"] = 2.0  # a radius schedule that forgot a group
    before = copy.deepcopy(model.state_dict())
    closure, _ = closure_for(model, opt, x, y)
    with pytest.raises(ValueError, match="same radius"):
        opt.step(closure)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": "0.1"}, r"learning rate \(lr\) must be a finite int or float >= 0, got str '0.1'"),
        ({"radius": "0.5"}, r"radius must be .*, got str '0.5'; pass float"),
        ({"radius": torch.tensor(0.2)}, r"radius must be .*, got Tensor tensor\(0.2000\)"),
        ({"momentum": True}, "momentum must be .*, got bool True"),
        ({"weight_decay": None}, "weight_decay must be .*, got NoneType None"),
        ({"projection_steps": 2.5}, "projection_steps must be an int >= 1, got float 2.5"),
        ({"anderson_memory": "1"}, "anderson_memory must be an int >= 1, got str '1'"),
        ({"max_update": "1.0"}, "max_update must be .*, got str '1.0'"),
    ],
)
def test_a_wrong_type_is_refused_at_construction_naming_the_type(options, message):
    model, _, _ = model_and_batch()
    with pytest.raises(TypeError, match=message):
        RBO(model.parameters(), **{"lr": 0.1, **options})
    opt = RBO(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=message):  # a param group of its own, too
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], **options})


def test_numpy_numbers_and_ints_are_numbers():
    model, x, y = model_and_batch()
    opt = RBO(model.parameters(), lr=np.float32(0.1), radius=1, momentum=np.float64(0.5))
    closure, _ = closure_for(model, opt, x, y)
    opt.step(closure)
    assert not opt.last_stats["skipped"]


def test_a_step_without_closure_is_refused_at_a_positive_radius_with_the_reason():
    model, _, _ = model_and_batch()
    with pytest.raises(RuntimeError, match=r"needs a closure at radius > 0.*at radius=0 step\(\)"):
        RBO(model.parameters(), lr=0.1, radius=0.5).step()


@pytest.mark.parametrize(
    "options",
    [{}, {"momentum": 0.9, "weight_decay": 0.01}, {"maximize": True}, {"loss_scale": 2.0}],
)
def test_a_step_without_closure_at_radius_0_is_sgd_on_the_gradients_present(options):
    model, x, y = model_and_batch()
    twin = copy.deepcopy(model)
    sgd_options = {k: v for k, v in options.items() if k != "loss_scale"}
    scale = options.get("loss_scale", 1.0)
    opt = RBO(model.parameters(), lr=0.1 / scale, radius=0, **options)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, **sgd_options)
    for _ in range(3):
        for net, optimizer in ((model, opt), (twin, sgd)):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        assert opt.step() is None
        sgd.step()
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        # the gradients are left as the caller put them, as SGD leaves them
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert opt.last_stats["grad_evals"] == 0 and opt.grad_evals == 0
    assert set(opt.last_stats) == set(STATS_KEYS)


def test_a_step_without_closure_refuses_a_non_finite_gradient_and_moves_nothing():
    model, x, y = model_and_batch()
    opt = RBO(model.parameters(), lr=0.1, radius=0)
    nn.functional.cross_entropy(model(x), y).backward()
    next(model.parameters()).grad[0, 0] = math.inf
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match=r"non-finite gradient in \.grad"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert opt.last_stats["skipped"] and set(opt.last_stats) == set(STATS_KEYS)


def test_a_foreign_state_dict_is_refused_at_load_with_the_reason():
    model, x, y = model_and_batch()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sgd.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    sgd.step()
    opt = RBO(model.parameters(), lr=0.1, radius=0.5)
    saved = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="not an RBO state dict: its param groups lack radius"):
        opt.load_state_dict(sgd.state_dict())
    assert opt.state_dict() == saved  # nothing loaded
    bad = copy.deepcopy(saved)
    bad["param_groups"][0]["radius"] = "0.5"
    with pytest.raises(TypeError, match="radius"):
        opt.load_state_dict(bad)
    closure, _ = closure_for(model, opt, x, y)
    opt.step(closure)  # the optimizer still works


def test_a_state_dict_saved_before_max_update_loads_without_a_bound():
    model, _, _ = model_and_batch()
    opt = RBO(model.parameters(), lr=0.1, radius=0.5)
    state = copy.deepcopy(opt.state_dict())
    del state["param_groups"][0]["max_update"]
    fresh = RBO(model.parameters(), lr=0.1, radius=0.5, max_update=1.0)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["max_update"] is None


@pytest.mark.parametrize(
    ("radius", "projection"), [(0.0, "anderson"), (0.5, "anderson"), (0.5, "gd")]
)
def test_grad_after_a_step_is_the_gradient_at_radius_0_and_none_otherwise(radius, projection):
    model, x, y = model_and_batch()
    opt = RBO(
        model.parameters(), lr=0.3, radius=radius, projection=projection, projection_step_size=0.1
    )
    closure, _ = closure_for(model, opt, x, y)
    start = [p.detach().clone() for p in model.parameters()]
    twin, _, _ = model_and_batch()
    nn.functional.cross_entropy(twin(x), y).backward()
    opt.step(closure)
    if radius == 0:
        assert all(
            torch.equal(p.grad, q.grad)
            for p, q in zip(model.parameters(), twin.parameters(), strict=True)
        )
    else:
        assert all(p.grad is None for p in model.parameters())
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), start, strict=True))


def test_last_stats_hold_the_same_keys_after_every_kind_of_step():
    model, x, y = model_and_batch()
    opt = RBO(model.parameters(), lr=0.1, radius=0.5, on_nonfinite="skip")
    seen = []
    for poison_at in (None, 1, 2):
        closure, _ = closure_for(model, opt, x, y, poison_at=poison_at)
        opt.step(closure)
        seen.append(opt.last_stats)
    with pytest.raises(ZeroDivisionError):
        opt.step(lambda: 1 / 0)
    seen.append(opt.last_stats)
    assert [s["skipped"] for s in seen] == [False, True, True, True]
    assert all(p.grad is None for p in model.parameters())  # skipped steps too
    assert all(set(s) == set(STATS_KEYS) for s in seen)
    for key in STATS_KEYS:  # every key is in the docstring
        assert key in RBO.__doc__


def test_gd_diverging_at_a_large_step_size_names_it_and_the_stability_condition():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 2))
    x, y = torch.randn(64, 4) * 30, torch.randint(0, 2, (64,))
    opt = RBO(
        model.parameters(),
        lr=0.5,
        radius=0.5,
        projection="gd",
        projection_step_size=50.0,
        projection_steps=20,
        projection_tol=0,
    )
    closure, _ = closure_for(model, opt, x, y)
    with pytest.raises(
        FloatingPointError, match=r"γ\(1 \+ ‖∇f‖²\) < 2.*projection_step_size = 50.0"
    ):
        for _ in range(5):
            opt.step(closure)


def test_complex_parameters_are_refused():
    with pytest.raises(ValueError, match="complex"):
        RBO([torch.zeros(3, dtype=torch.complex64, requires_grad=True)], lr=0.1)


@pytest.mark.parametrize("radius", [0.0, 0.5])
def test_sparse_gradients_are_refused_and_nothing_changes(radius):
    # a limit at radius 0 too (stated in the README): RBO's checks need dense gradients
    embedding = nn.Embedding(10, 3, sparse=True)
    before = embedding.weight.detach().clone()
    opt = RBO(embedding.parameters(), lr=0.1, radius=radius)

    def closure():
        opt.zero_grad()
        loss = embedding(torch.tensor([1, 2])).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="sparse gradients, at any radius"):
        opt.step(closure)
    assert torch.equal(embedding.weight, before)
    assert opt.last_stats["skipped"] and opt.grad_evals == 1


@pytest.mark.parametrize("projection", ["anderson", "gd"])
@pytest.mark.parametrize("where", ["loss", "grad"])
@pytest.mark.parametrize("poison", [math.nan, math.inf])
@pytest.mark.parametrize("call", [1, 2, 4])
def test_non_finite_values_leave_every_parameter_as_it_was(projection, where, poison, call):
    # gd with tol > 0 takes ‖r‖ at every iteration, so it refuses at the poisoned call
    model, x, y = model_and_batch()
    opt = RBO(
        model.parameters(),
        lr=0.5,
        radius=1.0,
        momentum=0.9,
        projection=projection,
        projection_steps=6,
        projection_tol=0.0 if projection == "anderson" else 1e-12,
    )
    warmup, _ = closure_for(model, opt, x, y)
    opt.step(warmup)  # so that there is a momentum buffer to protect too
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    evals = opt.grad_evals
    closure, calls = closure_for(model, opt, x, y, poison_at=call, poison=poison, where=where)
    with pytest.raises(FloatingPointError, match=f"closure call {call}"):
        opt.step(closure)
    assert calls[0] == call
    for p, before, buffer in zip(model.parameters(), params, buffers, strict=True):
        assert torch.equal(p, before)
        assert torch.equal(opt.state[p]["momentum_buffer"], buffer)
    assert opt.grad_evals == evals + call  # the closure calls spent are still counted
    assert opt.last_stats["skipped"] is True


@pytest.mark.parametrize("poisoned", ["used", "unused"])
def test_gd_at_tol_0_refuses_a_gradient_it_did_not_reduce_later_and_restores_everything(poisoned):
    """tol 0 takes no ‖r‖ between the first and the last iteration. A non-finite gradient
    there poisons x: the next loss finds it (a parameter the loss uses) or, at the latest, the
    last iteration's ‖r‖ (a parameter it does not use, whose r enters u)."""
    model, x, y = model_and_batch()
    unused = nn.Parameter(torch.ones(3))
    opt = RBO(
        [*model.parameters(), unused],
        lr=0.5,
        radius=1.0,
        projection="gd",
        projection_steps=6,
        projection_tol=0.0,
    )
    params = [*model.parameters(), unused]
    before = [p.detach().clone() for p in params]
    calls = [0]

    def closure():
        calls[0] += 1
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        unused.grad = torch.zeros(3)
        if calls[0] == 2:
            target = unused.grad if poisoned == "unused" else next(model.parameters()).grad
            target.view(-1)[0] = math.nan
        return loss

    found = "loss nan at closure call 3" if poisoned == "used" else "at or before closure call 6"
    with pytest.raises(FloatingPointError, match=found):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))
    assert opt.last_stats["skipped"] and opt.grad_evals == calls[0]


def test_skip_mode_counts_the_skipped_step_and_training_goes_on():
    model, x, y = model_and_batch()
    opt = RBO(model.parameters(), lr=0.5, radius=1.0, on_nonfinite="skip")
    params = [p.detach().clone() for p in model.parameters()]
    closure, _ = closure_for(model, opt, x, y, poison_at=3, where="grad")
    loss = opt.step(closure)
    assert torch.isfinite(loss)
    assert opt.skipped_steps == 1 and opt.last_stats["skipped"]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    good, _ = closure_for(model, opt, x, y)
    opt.step(good)
    assert not opt.last_stats["skipped"]
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))


def test_an_interrupt_inside_the_projection_restores_the_parameters():
    model, x, y = model_and_batch()
    opt = RBO(model.parameters(), lr=0.5, radius=1.0)
    params = [p.detach().clone() for p in model.parameters()]
    calls = [0]

    def closure():
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))


def train(model, opt, x, y, steps):
    for _ in range(steps):
        closure, _ = closure_for(model, opt, x, y)
        opt.step(closure)


@pytest.mark.parametrize("projection", ["anderson", "gd"])
def test_state_dict_round_trip_mid_training_gives_the_same_trajectory(projection):
    model, x, y = model_and_batch()
    opt = RBO(model.parameters(), lr=0.3, radius=0.5, momentum=0.9, projection=projection)
    train(model, opt, x, y, 5)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, x, y, 5)

    resumed, _, _ = model_and_batch(seed=1)
    resumed.load_state_dict(saved_model)
    resumed_opt = RBO(resumed.parameters(), lr=1.0, radius=3.0, projection=projection)
    resumed_opt.load_state_dict(saved_opt)
    assert resumed_opt.param_groups[0]["radius"] == 0.5
    assert resumed_opt.param_groups[0]["momentum"] == 0.9
    train(resumed, resumed_opt, x, y, 5)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert resumed_opt.grad_evals == opt.grad_evals > 10


def test_lr_scheduler_and_radius_schedule_drive_the_step():
    a = torch.tensor([1.0, 2.0], dtype=torch.float64)
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = RBO([theta], lr=0.4, radius=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def closure():
        opt.zero_grad()
        loss = a @ theta
        loss.backward()
        return loss

    expected = torch.zeros(2, dtype=torch.float64)
    for lr in (0.4, 0.2, 0.1):
        opt.step(closure)
        scheduler.step()
        expected -= lr * a
        torch.testing.assert_close(theta.detach(), expected, rtol=0, atol=1e-12)
    opt.param_groups[0]["radius"] = 0.0  # a radius schedule: the ball shrinks to a point
    opt.step(closure)
    assert opt.last_stats["grad_evals"] == 1


def test_named_parameters_and_param_groups():
    model, x, y = model_and_batch()
    opt = RBO(model.named_parameters(), lr=0.1, radius=0.2)
    assert opt.param_groups[0]["param_names"][0] == "0.weight"
    closure, calls = closure_for(model, opt, x, y)
    opt.step(closure)
    stats = opt.last_stats
    assert stats["grad_evals"] == calls[0] == 1 + stats["projection_steps"]
    assert set(stats) >= {"grad_evals", "projection_steps", "residual", "converged", "loss"}


def test_stats_report_non_convergence_and_the_step_still_completes():
    model, x, y = model_and_batch()
    before = [p.detach().clone() for p in model.parameters()]
    opt = RBO(model.parameters(), lr=2.0, radius=5.0, projection_steps=2, projection_tol=1e-12)
    closure, calls = closure_for(model, opt, x, y)
    opt.step(closure)
    assert opt.last_stats["converged"] is False
    assert 0 < opt.last_stats["residual"] < math.inf
    stats = opt.last_stats
    # K = 2 trial points, and one more for each rejected one, up to 2
    assert calls[0] == stats["grad_evals"] <= 1 + 2 + min(stats["safeguard_steps"], 2)
    assert stats["moved"]
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_the_returned_loss_is_the_closures_loss_at_the_start():
    model, x, y = model_and_batch()
    expected = nn.functional.cross_entropy(model(x), y)
    opt = RBO(model.parameters(), lr=0.3, radius=0.5)
    closure, _ = closure_for(model, opt, x, y)
    loss = opt.step(closure)
    assert torch.equal(loss.detach(), expected.detach())
    assert opt.last_stats["loss"] == pytest.approx(expected.item())


def test_an_integer_projection_step_size_gives_the_float_step():
    """`projection_step_size=1` is the same setting as 1.0 (steps kept as multiples of p
    carry it as a number)."""
    finals = []
    for step_size in (1, 1.0):
        model, x, y = model_and_batch()
        opt = RBO(
            model.parameters(),
            lr=0.5,
            radius=0.3,
            projection_step_size=step_size,
            projection_steps=5,
            anderson_memory=2,
        )
        train(model, opt, x, y, 3)
        finals.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*finals, strict=True):
        assert torch.equal(a, b)
