"""Entropy-SGD against quantities known in closed form on a quadratic."""

import pytest
import torch

from rollingball.baselines.entropy_sgd import EntropySGD
from stepping import loss_closure


def _quadratic(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = q @ q.T + 0.5 * torch.eye(n, dtype=torch.float64)  # SPD
    b = torch.randn(n, generator=g, dtype=torch.float64)
    return a, b


def _closure(x, a, b, opt, calls):
    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = 0.5 * x @ a @ x - b @ x
        loss.backward()
        return loss

    return closure


def test_one_step_moves_along_the_proximal_point_gradient():
    # noise 0, alpha 1, many Langevin steps: x' converges to the proximal point
    # p = argmin f(x') + gamma/2 |x - x'|^2 = (A + gamma I)^-1 (b + gamma x), and the update is
    # x <- x - lr * gamma * (x - p)
    a, b = _quadratic()
    x0 = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    x = x0.clone().requires_grad_(True)
    gamma, lr = 0.5, 0.7
    opt = EntropySGD(
        [x], lr=lr, gamma=gamma, scoping=0.0, noise=0.0, alpha=1.0, inner_lr=0.1, langevin_steps=500
    )
    calls = []
    loss = opt.step(_closure(x, a, b, opt, calls))
    prox = torch.linalg.solve(a + gamma * torch.eye(4, dtype=torch.float64), b + gamma * x0)
    expected = x0 - lr * gamma * (x0 - prox)
    torch.testing.assert_close(x.detach(), expected, rtol=0, atol=1e-10)
    assert len(calls) == 500 and opt.last_stats["grad_evals"] == 500
    assert loss.item() == pytest.approx((0.5 * x0 @ a @ x0 - b @ x0).item())


def test_converges_to_the_minimiser_of_a_quadratic():
    # the fixed point of the outer iteration is x = prox(x), i.e. A x = b
    a, b = _quadratic(seed=1)
    x = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = EntropySGD(
        [x],
        lr=1.0,
        gamma=1.0,
        scoping=1e-3,
        noise=0.0,
        alpha=0.75,
        inner_lr=0.05,
        langevin_steps=20,
    )
    for _ in range(150):
        opt.step(_closure(x, a, b, opt, []))
    torch.testing.assert_close(x.detach(), torch.linalg.solve(a, b), rtol=0, atol=1e-6)


def test_scoping_grows_gamma_geometrically_and_survives_state_dict():
    x = torch.zeros(2, requires_grad=True)
    opt = EntropySGD([x], gamma=0.03, scoping=0.1, noise=0.0, langevin_steps=1)
    a, b = torch.eye(2), torch.ones(2)
    for _ in range(3):
        opt.step(_closure(x, a, b, opt, []))
    assert opt.scope(opt.param_groups[0]) == pytest.approx(0.03 * 1.1**3)
    clone = EntropySGD([torch.zeros(2, requires_grad=True)], gamma=0.03, scoping=0.1)
    clone.load_state_dict(opt.state_dict())
    assert clone.scope(clone.param_groups[0]) == pytest.approx(0.03 * 1.1**3)


def test_noise_has_the_sgld_scale():
    # f = 0, gamma = 0, alpha = 1, L = 1: x' = x + sqrt(inner_lr) * noise * N(0, 1) and the
    # outer step multiplies gamma (0) -> x unchanged; check the Langevin iterate via mu instead
    n = 200_000
    x = torch.zeros(n, requires_grad=True)
    opt = EntropySGD(
        [x], lr=1.0, gamma=1.0, scoping=0.0, noise=0.5, inner_lr=0.04, alpha=1.0, langevin_steps=1
    )
    closure = loss_closure(opt, lambda: (x * 0).sum())
    torch.manual_seed(0)
    opt.step(closure)
    # x_new = x - lr * gamma * (x - x') = x' = sqrt(0.04) * 0.5 * N(0, 1): std 0.1
    assert x.detach().std().item() == pytest.approx(0.1, rel=0.01)
    assert abs(x.detach().mean().item()) < 1e-3


def test_momentum_matches_heavy_ball_on_the_local_entropy_gradient():
    a, b = _quadratic(seed=2)
    x = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    kw = dict(lr=0.5, gamma=1.0, scoping=0.0, noise=0.0, alpha=1.0, inner_lr=0.05, langevin_steps=1)
    opt = EntropySGD([x], momentum=0.9, **kw)
    ref_x = torch.zeros(4, dtype=torch.float64)
    buf = None
    for _ in range(3):
        # one Langevin step from x' = x: x' = x - inner_lr * grad f(x); mu = x'
        g = a @ ref_x - b
        update = 1.0 * (ref_x - (ref_x - 0.05 * g))
        buf = update if buf is None else 0.9 * buf + update
        ref_x = ref_x - 0.5 * buf
        opt.step(_closure(x, a, b, opt, []))
    torch.testing.assert_close(x.detach(), ref_x, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), r"EntropySGD: lr must be a finite number >= 0, got -1\.0"),
        (dict(langevin_steps=0), "langevin_steps"),
        (dict(alpha=0.0), "alpha"),
        (dict(noise=float("nan")), "EntropySGD: noise must be a finite number >= 0, got nan"),
        (dict(nesterov=True), "nesterov"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EntropySGD([torch.zeros(1, requires_grad=True)], **kwargs)


def test_a_rate_of_the_wrong_type_is_refused_by_its_type():
    message = "EntropySGD: gamma must be a finite int or float >= 0, got str"
    with pytest.raises(TypeError, match=message):
        EntropySGD([torch.zeros(1, requires_grad=True)], gamma="0.03")


def test_step_needs_a_closure():
    opt = EntropySGD([torch.zeros(1, requires_grad=True)])
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
