"""The projection problem of one RBO step: the closure seen as the landscape, the moved centre
and the problem a projection solver sees (`projection.ProjectionProblem`).

The landscape is f = κ (±loss + Σ_groups λ/2 ‖θ‖²); the moved centre is c̃ = (θ̃, ỹ) with
u = θ − θ̃ = a g + η v per group, a = ρ/s, s = √(1 + ‖g‖²), and h = ỹ − f(θ) = a − Σ η⟨g, v⟩;
the problem is the contact point x minimising φ(x) = ½‖x − θ̃‖² + ½(f(x) − ỹ)².
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from rollingball.optim.closure import StepClosure
from rollingball.optim.geometry import (
    inner_device,
    plain_cpu,
    slope_factor,
    squared_norm_device,
    to_host,
)
from rollingball.optim.projection import Evaluation, NonFinite, Reductions
from rollingball.optim.workspace import Workspace
from rollingball.spec import phi_noise

# Below this many elements per parameter tensor on average, the Anderson solver's gradient is
# copied into one flat buffer after each closure call: one pass, which costs less than the
# microseconds of Python that each of its per-tensor reductions and updates takes per tensor.
GATHER_BELOW = 1 << 15


def gradient_norm(grads: list[Tensor]) -> list[Tensor]:
    return [squared_norm_device(grads)]


class Landscape:
    """The closure seen as the landscape f = κ(±loss + Σ λ/2‖θ‖²) and its gradient."""

    def __init__(
        self,
        closure: StepClosure,
        groups: list[dict[str, Any]],
        params: list[list[Tensor]],
        settings: dict[str, Any],
        process_group: Any,
    ) -> None:
        self.closure = closure
        self.groups = groups
        self.params = params
        self.sign = -1.0 if settings["maximize"] else 1.0
        self.scale = float(settings["loss_scale"])
        self.process_group = process_group
        self.first_grad_sq = math.nan  # ‖∇f(θ)‖², known after the first call

    @property
    def calls(self) -> int:
        return self.closure.calls

    def evaluate(self, reductions: Reductions = gradient_norm) -> Evaluated:
        """One closure call: the closure's loss, f(x), the per-group ∇f(x) in `.grad` and the
        caller's device `reductions` of the flat gradient (by default ‖∇f‖²), all transferred
        to the host in one synchronisation; a non-finite reduction is a non-finite gradient."""
        loss = self.closure()
        if self.calls == 1:  # as in torch.optim, a parameter with no gradient at θ sits out
            self.params = [[p for p in params if p.grad is not None] for params in self.params]
        grads = [[self._grad(p) for p in params] for params in self.params]
        scalars = [self._reduced(loss)]
        decays = []
        for group, params, group_grads in zip(self.groups, self.params, grads, strict=True):
            if self.sign < 0:
                torch._foreach_neg_(group_grads)
            decay = group["weight_decay"]
            if decay:
                decays.append(decay)
                scalars.append(squared_norm_device(params))
                torch._foreach_add_(group_grads, params, alpha=decay)
            if self.scale != 1.0:
                torch._foreach_mul_(group_grads, self.scale)
        scalars += reductions(flat(grads))
        host = to_host(scalars)
        value = host[0]
        if not math.isfinite(value):
            raise NonFinite(f"non-finite loss {value} at closure call {self.calls}")
        value *= self.sign
        value += sum(0.5 * d * norm_sq for d, norm_sq in zip(decays, host[1:], strict=False))
        values = host[1 + len(decays) :]
        if self.calls == 1:
            self.first_grad_sq = values[0] if values else math.nan
        if not all(map(math.isfinite, values)):
            raise NonFinite(f"non-finite gradient at closure call {self.calls}")
        return Evaluated(loss, value * self.scale, grads, values)

    def _reduced(self, loss: Any) -> Tensor:
        """The loss as a scalar tensor on the parameters' device (float64 when it must be
        converted), averaged over the process group when training is distributed."""
        device = next(p for params in self.params for p in params).device  # NCCL needs GPU
        if self.process_group is None and isinstance(loss, Tensor) and loss.device == device:
            return loss.detach().reshape(1)  # `to_host` sums in float64 anyway
        total = torch.as_tensor(loss, device=device).detach().reshape(()).to(torch.float64)
        if self.process_group is None:
            return total
        total = total.clone()
        dist.all_reduce(total, group=self.process_group)
        return total / dist.get_world_size(self.process_group)

    @staticmethod
    def _grad(param: Tensor) -> Tensor:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grad = param.grad
        if grad.is_sparse:
            raise RuntimeError(
                "RBO does not support sparse gradients, at any radius (the ball's geometry "
                "needs dense ones): use nn.Embedding(..., sparse=False)"
            )
        return grad


@dataclass
class Evaluated:
    """One closure call seen by the step: the closure's loss, f(x), the per-group ∇f(x) and
    the values of the caller's reductions (by default ‖∇f‖²)."""

    loss: Any
    value: float
    grads: list[list[Tensor]]
    values: list[float]

    @property
    def grad_sq(self) -> float:
        return self.values[0]


@dataclass
class MovedCentre:
    """The moved centre as the projection starts from it: u = θ − θ̃ (empty while it is the
    multiple `offset_scale` of g, formed only when the solver first moves), h = ỹ − f(θ),
    and ⟨g, u⟩ and ‖u‖² at θ."""

    offset: list[Tensor]
    offset_scale: float | None
    lift: float
    grad_offset: float
    offset_sq: float


class CentreProjection:
    """The problem a projection solver sees (see `projection.ProjectionProblem`).

    It caches the offset u = x − θ̃, which stays small and exact as x moves, and the height
    mismatch m = f(x) − ỹ = (f(x) − f(θ)) − h with h = ỹ − f(θ) = ρ/s − Σ η⟨g, v⟩.
    """

    def __init__(
        self,
        landscape: Landscape,
        params: list[Tensor],
        centre: MovedCentre,
        first: Evaluated,
        workspace: Workspace,
        gathers: bool,
    ) -> None:
        self.landscape = landscape
        self.params = params
        self.offset = centre.offset  # formed by `seat_offset` when u = s g
        self.offset_scale = centre.offset_scale
        self.start_products = [centre.grad_offset, centre.offset_sq]
        self.workspace = workspace
        self.gathers = gathers
        self.grads = self._gathered(flat(first.grads))
        first.grads = []  # handed over: see RBO._roll
        self.start_value = first.value
        self.start_grad_sq = first.grad_sq
        self.lift = centre.lift
        self.eps = torch.finfo(params[0].dtype).eps

    @property
    def calls(self) -> int:
        return self.landscape.calls

    def start(self) -> Evaluation:
        return Evaluation(-self.lift, [self.start_grad_sq, *self.start_products])

    def seat_offset(self, scale: float) -> None:
        """u = scale · g at θ, in a workspace buffer (before the first evaluation)."""
        if self.offset_scale is None or self.landscape.calls != 1:
            raise RuntimeError("the offset is formed from the gradient at θ, once")
        self.offset = self.workspace.scaled(self.grads, scale)
        self.offset_scale = None

    def evaluate(self, reductions: Reductions) -> Evaluation:
        self.release_grads()  # the closure may replace the `.grad` tensors

        def reduce(grads: list[Tensor]) -> list[Tensor]:  # right after the closure call
            self.grads = self._gathered(grads)
            return reductions(self.grads)

        evaluated = self.landscape.evaluate(reduce)
        mismatch = (evaluated.value - self.start_value) - self.lift
        return Evaluation(mismatch, evaluated.values)

    def _gathered(self, grads: list[Tensor]) -> list[Tensor]:
        """The gradient copied into one flat workspace buffer when the parameters are many
        small CPU tensors (`GATHER_BELOW`), so that every reduction and update with it runs
        over the flat tensor; else the `.grad` tensors themselves."""
        return self.workspace.copy(grads) if self.gathers else grads

    def release_grads(self) -> None:
        """Drop the gradient (a gathered copy goes back to the workspace)."""
        if self.gathers and self.grads:
            self.workspace.give(self.grads)
        self.grads = []

    def phi_noise(self, mismatch: float, phi: float) -> float:
        """φ's round-off level (`rollingball.spec.phi_noise`)."""
        return phi_noise(mismatch, phi, self.start_value, self.lift, self.eps)


def moved_centre(
    groups: list[dict[str, Any]],
    radius: float,
    first: Evaluated,
    directions: list[list[Tensor]],
    workspace: Workspace,
) -> MovedCentre:
    """u = θ − θ̃ = a g + η v per group, a = ρ/s, and h = ỹ − f(θ) = a − Σ η ⟨g, v⟩.

    The start's ⟨g, u⟩ = a‖g‖² + Σ η⟨g, v⟩ and ‖u‖² = a²‖g‖² + 2a Σ η⟨g, v⟩ + Σ η²‖v‖² come
    from one reduction per group (v = g without momentum, none for a single group: it is
    ‖g‖²; two with momentum). Without momentum and with one learning rate u = (a + η) g:
    it is left to the solver, whose first step is along g too (`CentreProjection.seat_offset`)."""
    a = radius / slope_factor(first.grad_sq)
    per_group = list(zip(groups, first.grads, directions, strict=True))
    scales = [a + group["lr"] if v is g else a for group, g, v in per_group for _ in g]
    along_g = all(v is g for _, g, v in per_group) and len(set(scales)) == 1  # u = s g
    offset = [] if along_g else workspace.scaled(flat(first.grads), scales)
    reductions = []
    start = 0
    single = len(per_group) == 1  # then ⟨g, g⟩ of the group is ‖g‖², known already
    for group, g, v in per_group:
        if v is g and single:
            continue
        if v is g:
            reductions.append(squared_norm_device(g))
        else:
            torch._foreach_add_(offset[start : start + len(g)], v, alpha=group["lr"])
            reductions += [inner_device(g, v), squared_norm_device(v)]
        start += len(g)
    host = iter(to_host(reductions))
    tangent = velocity = 0.0  # Σ η⟨g, v⟩ and Σ η²‖v‖²
    for group, g, v in per_group:
        lr = group["lr"]
        g_v = first.grad_sq if v is g and single else next(host)
        v_sq = g_v if v is g else next(host)
        tangent += lr * g_v
        velocity += lr * lr * v_sq
    return MovedCentre(
        offset,
        scales[0] if along_g else None,
        lift=a - tangent,
        grad_offset=a * first.grad_sq + tangent,
        offset_sq=a * a * first.grad_sq + 2 * a * tangent + velocity,
    )


def many_small_tensors(params: list[Tensor]) -> bool:
    """CPU parameters of fewer than `GATHER_BELOW` elements per tensor on average: then the
    Anderson solver gathers each gradient into one flat buffer (one more parameter copy)."""
    return plain_cpu(params) and sum(p.numel() for p in params) < GATHER_BELOW * len(params)


def flat(groups: list[list[Tensor]]) -> list[Tensor]:
    return [t for group in groups for t in group]
