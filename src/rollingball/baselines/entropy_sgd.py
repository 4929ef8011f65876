"""Entropy-SGD (Chaudhari et al., ICLR 2017, Algorithm 1), written from the paper.

One step runs L Langevin (SGLD) iterations on the local-entropy objective around the current
weights x, starting from x' = x:

    dx' = ∇f(x') + λ_wd x' − γ (x − x')
    x'  ← x' − η' dx' + √η' · ε · N(0, I)
    μ   ← (1 − α) μ + α x'

and then moves the weights along the local-entropy gradient γ (x − μ):

    x ← x − η γ (x − μ)          (optionally through heavy-ball / Nesterov momentum)

The scope γ grows after each step, γ_t = γ_0 (1 + γ_1)^t ("scoping"). Each Langevin iteration
is one closure call on the step's minibatch, so a step costs L gradient evaluations. (The
paper draws a fresh minibatch for each Langevin iteration; with a closure, the caller decides
what each call sees. The project's runner passes the same minibatch, like every other
multi-evaluation optimizer here.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from rollingball.spec import require_number

__all__ = ["EntropySGD"]


class EntropySGD(Optimizer):
    """Entropy-SGD: gradient descent on the local entropy, estimated by L Langevin steps.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer.
        lr: outer learning rate η on the local-entropy gradient γ (x − μ).
        langevin_steps: L, the Langevin iterations (closure calls) per step.
        inner_lr: η', the SGLD step size.
        gamma: γ_0, the initial scope (coupling of x' to x).
        scoping: γ_1; the scope is γ_0 (1 + γ_1)^t at step t.
        noise: ε, the thermal noise; the SGLD noise is √η' · ε · N(0, I).
        alpha: α, the weight of the newest Langevin iterate in the running mean μ.
        momentum: heavy-ball momentum on the outer update (0 = Algorithm 1).
        nesterov: use Nesterov momentum for the outer update.
        weight_decay: L2 penalty added to the inner gradient.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        langevin_steps: int = 20,
        inner_lr: float = 0.1,
        gamma: float = 0.03,
        scoping: float = 1e-3,
        noise: float = 1e-4,
        alpha: float = 0.75,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        rates = dict(
            lr=lr,
            inner_lr=inner_lr,
            gamma=gamma,
            scoping=scoping,
            noise=noise,
            momentum=momentum,
            weight_decay=weight_decay,
        )
        for name, value in rates.items():
            require_number(value, f"EntropySGD: {name}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"EntropySGD: alpha must be in (0, 1], got {alpha}")
        if int(langevin_steps) != langevin_steps or langevin_steps < 1:
            raise ValueError(
                f"EntropySGD: langevin_steps must be an integer >= 1, got {langevin_steps}"
            )
        if nesterov and momentum <= 0:
            raise ValueError("EntropySGD: nesterov momentum needs momentum > 0")
        defaults = rates | dict(alpha=alpha, nesterov=nesterov, langevin_steps=int(langevin_steps))
        super().__init__(params, defaults)
        if len({g["langevin_steps"] for g in self.param_groups}) != 1:
            raise ValueError("EntropySGD: every parameter group must use the same langevin_steps")
        self.last_stats: dict[str, Any] = {}

    def _global_state(self) -> dict[str, Any]:
        # the step counter lives in the first parameter's state, so state_dict() carries it
        first = self.param_groups[0]["params"][0]
        return self.state[first]

    def _step_count_value(self) -> int:
        return int(self._global_state().get("step", 0))

    def scope(self, group: dict[str, Any]) -> float:
        """The scope γ for the next step of ``group``: γ_0 (1 + γ_1)^t."""
        return float(group["gamma"] * (1.0 + group["scoping"]) ** self._step_count_value())

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """Run L Langevin iterations (L closure calls) and update the weights.

        Returns the loss of the first closure call, i.e. at the weights before the step.
        """
        if closure is None:
            raise RuntimeError("EntropySGD.step needs a closure (it evaluates the loss L times)")
        langevin_steps = int(self.param_groups[0]["langevin_steps"])
        groups = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.requires_grad]
            anchor = [p.detach().clone() for p in params]  # x
            groups.append((group, params, anchor, [a.clone() for a in anchor]))  # μ ← x

        first_loss: Tensor | None = None
        for _ in range(langevin_steps):
            with torch.enable_grad():
                loss = closure()
            if first_loss is None:
                first_loss = loss.detach() if isinstance(loss, Tensor) else torch.tensor(loss)
            for group, params, anchor, mean in groups:
                self._langevin_update(group, params, anchor, mean)

        for group, params, anchor, mean in groups:
            gamma = self.scope(group)
            for p, x, mu in zip(params, anchor, mean, strict=True):
                update = (x - mu).mul_(gamma)  # local-entropy gradient
                if group["momentum"]:
                    buf = self.state[p].get("momentum_buffer")
                    if buf is None:
                        buf = self.state[p]["momentum_buffer"] = update.clone()
                    else:
                        buf.mul_(group["momentum"]).add_(update)
                    update = update.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                p.copy_(x.sub_(update, alpha=group["lr"]))
        state = self._global_state()
        state["step"] = int(state.get("step", 0)) + 1
        assert first_loss is not None
        self.last_stats = {"grad_evals": langevin_steps, "loss": float(first_loss)}
        return first_loss

    def _langevin_update(
        self, group: dict[str, Any], params: list[Tensor], anchor: list[Tensor], mean: list[Tensor]
    ) -> None:
        """One SGLD iteration on x' (``params``) and the running mean μ, for one group."""
        live = [i for i, p in enumerate(params) if p.grad is not None]
        if not live:
            return
        ps = [params[i] for i in live]
        grads = [params[i].grad for i in live]
        if any(g.is_sparse for g in grads):  # type: ignore[union-attr]
            raise RuntimeError("EntropySGD does not support sparse gradients")
        xs, mus = [anchor[i] for i in live], [mean[i] for i in live]
        gamma, inner_lr, noise = self.scope(group), group["inner_lr"], group["noise"]
        direction = torch._foreach_sub(ps, xs)  # x' − x, so −γ (x − x') = γ (x' − x)
        torch._foreach_mul_(direction, gamma)
        torch._foreach_add_(direction, grads)  # type: ignore[arg-type]
        if group["weight_decay"]:
            torch._foreach_add_(direction, ps, alpha=group["weight_decay"])
        torch._foreach_add_(ps, direction, alpha=-inner_lr)
        if noise:
            torch._foreach_add_(
                ps, [torch.randn_like(p) for p in ps], alpha=math.sqrt(inner_lr) * noise
            )
        torch._foreach_mul_(mus, 1.0 - group["alpha"])
        torch._foreach_add_(mus, ps, alpha=group["alpha"])
