"""RBO, the Rolling Ball Optimizer (Belgoumri et al., arXiv 2505.19527), as a torch.optim.Optimizer.

One step on one minibatch, with f and g = ∇f at θ from the first closure call:

    s = √(1 + ‖g‖²)                       the graph's upward normal is ν = (−g, 1)/s
    c = (θ − ρ g/s, f + ρ/s)               the centre of the ball resting on the graph at θ
    c̃ = c − η (v, ⟨g, v⟩)                  tangent step; v = g, or v ← μ v + g with momentum
    θ ← argmin_x ½‖x − θ̃‖² + ½(f(x) − ỹ)²  projection of c̃ = (θ̃, ỹ) back onto the graph

The landscape is f = κ (±loss + Σ_groups λ/2 ‖θ‖²): weight decay λ is part of it, κ is the
loss scale and the sign is − when maximizing. `radius=0` is exactly torch.optim.SGD.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from rollingball import defaults
from rollingball.optim.batchnorm import first_call_updates_batchnorm
from rollingball.optim.closure import StepClosure
from rollingball.optim.geometry import (
    copy_,
    inner_device,
    plain_cpu,
    slope_factor,
    squared_norm_device,
    to_host,
)
from rollingball.optim.projection import SOLVERS, Evaluation, NonFinite, Reductions, make_solver
from rollingball.optim.workspace import Workspace

Closure = Callable[[], Any]

# Settings that describe the one ball and its landscape: every param group must agree on them.
SHARED_SETTINGS = (
    "radius",
    "loss_scale",
    "maximize",
    "projection",
    "projection_steps",
    "projection_step_size",
    "projection_tol",
    "anderson_memory",
    "on_nonfinite",
)
NONFINITE_POLICIES = ("raise", "skip")
# The poor-projection warning: a step whose relative residual stays above POOR_RESIDUAL made
# poor progress; warn once when more than half of the last POOR_WINDOW steps did.
POOR_RESIDUAL = 0.5
POOR_WINDOW = 20
# Below this many elements per parameter tensor on average, the Anderson solver's gradient is
# copied into one flat buffer after each closure call: one pass, which costs less than the
# microseconds of Python that each of its per-tensor reductions and updates takes per tensor.
GATHER_BELOW = 1 << 15


class ProjectionWarning(UserWarning):
    """Many recent RBO steps ended far from the contact point the projection looks for."""


_NonFinite = NonFinite  # a closure call produced a non-finite loss or gradient


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _validate_group(group: dict[str, Any]) -> None:
    """Refuse hyperparameters that have no meaning, with the reason."""
    lr = float(group["lr"])
    _require(lr >= 0, f"learning rate must be a finite number >= 0, got {group['lr']}")
    _require(math.isfinite(lr), f"learning rate must be finite, got {group['lr']}")
    radius = group["radius"]
    _require(
        isinstance(radius, (int, float)) and math.isfinite(radius) and radius >= 0,
        f"radius must be a finite number >= 0, got {radius}",
    )
    _require(group["momentum"] >= 0, f"momentum must be >= 0, got {group['momentum']}")
    _require(group["weight_decay"] >= 0, f"weight_decay must be >= 0, got {group['weight_decay']}")
    _require(
        math.isfinite(group["loss_scale"]) and group["loss_scale"] > 0,
        f"loss_scale must be a finite number > 0, got {group['loss_scale']}",
    )
    _require(
        group["projection"] in SOLVERS,
        f"unknown projection solver {group['projection']!r}; choose one of {SOLVERS}",
    )
    steps = group["projection_steps"]
    _require(
        isinstance(steps, int) and steps >= 1, f"projection_steps must be an int >= 1, got {steps}"
    )
    _require(
        group["projection_step_size"] > 0,
        f"projection_step_size must be > 0, got {group['projection_step_size']}",
    )
    _require(
        group["projection_tol"] >= 0, f"projection_tol must be >= 0, got {group['projection_tol']}"
    )
    memory = group["anderson_memory"]
    _require(
        isinstance(memory, int) and memory >= 1,
        f"anderson_memory must be an int >= 1, got {memory}",
    )
    _require(
        group["on_nonfinite"] in NONFINITE_POLICIES,
        f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {group['on_nonfinite']!r}",
    )


def _gradient_norm(grads: list[Tensor]) -> list[Tensor]:
    return [squared_norm_device(grads)]


class _Landscape:
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

    @property
    def calls(self) -> int:
        return self.closure.calls

    def evaluate(self, reductions: Reductions = _gradient_norm) -> _Evaluated:
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
        scalars += reductions(_flat(grads))
        host = to_host(scalars)
        value = host[0]
        if not math.isfinite(value):
            raise _NonFinite(f"non-finite loss {value} at closure call {self.calls}")
        value *= self.sign
        value += sum(0.5 * d * norm_sq for d, norm_sq in zip(decays, host[1:], strict=False))
        values = host[1 + len(decays) :]
        if not all(map(math.isfinite, values)):
            raise _NonFinite(f"non-finite gradient at closure call {self.calls}")
        return _Evaluated(loss, value * self.scale, grads, values)

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
class _Evaluated:
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
class _MovedCentre:
    """The moved centre as the projection starts from it: u = θ − θ̃ (empty while it is the
    multiple `offset_scale` of g, formed only when the solver first moves), h = ỹ − f(θ),
    and ⟨g, u⟩ and ‖u‖² at θ."""

    offset: list[Tensor]
    offset_scale: float | None
    lift: float
    grad_offset: float
    offset_sq: float


class _Projection:
    """The problem a projection solver sees (see `projection.ProjectionProblem`).

    It caches the offset u = x − θ̃, which stays small and exact as x moves, and the height
    mismatch m = f(x) − ỹ = (f(x) − f(θ)) − h with h = ỹ − f(θ) = ρ/s − Σ η⟨g, v⟩.
    """

    def __init__(
        self,
        landscape: _Landscape,
        params: list[Tensor],
        centre: _MovedCentre,
        first: _Evaluated,
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
        self.grads = self._gathered(_flat(first.grads))
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
        """Relative round-off on φ itself and on the heights the mismatch is made of."""
        value = mismatch + self.start_value + self.lift
        heights = abs(value) + abs(self.start_value) + abs(self.lift)
        return 4 * self.eps * (phi + abs(mismatch) * heights)


class RBO(Optimizer):
    """The Rolling Ball Optimizer.

    Args:
        params: parameters or param groups, as for any torch.optim optimizer.
        lr: η, the tangent step of the ball centre (per group).
        radius: ρ >= 0, the ball's radius; one ball, so every group holds the same radius.
            `radius=0` is exactly torch.optim.SGD (one closure call per step).
        projection: "anderson" (accelerated, default) or "gd" (the authors' scheme).
        projection_steps: K, the projection trial points per step; each rejected trial point
            adds one more, up to 2 (a step costs at most 1 + K + 2 closure calls; gd: K
            iterations, K calls); when the budget runs out the solver still takes the step its
            last evaluation points to, unevaluated (`blind_step`).
        projection_step_size: γ, the step of the fixed-point iteration x ← x − γ r(x).
        projection_tol: stop when ‖r(x)‖ <= tol·‖r(θ)‖; 0 runs all K iterations. The
            defaults (K = 2, tol = 1e-4, m = 1: 3 closure calls, up to 5 when trial points are
            rejected) come from the cost frontier in docs/results.md; K = 20 with m = 5 is the
            converged projection.
        momentum: μ, heavy ball on the centre's tangent step: v ← μ v + g (per group).
        weight_decay: λ, part of the landscape: f + λ/2 ‖θ‖² (per group).
        loss_scale: κ, scale of the vertical axis: the landscape is κ f.
        maximize: roll on −f.
        anderson_memory: m, the differences the Anderson solver keeps; a step holds 2m + 3
            parameter-sized buffers at its peak (2m + 4 when it gathers the gradient of many
            small CPU tensors, see `GATHER_BELOW`; gd: 2). On the CPU they are kept between
            steps in `opt.workspace` and reused, which saves the page faults of fresh large
            allocations; `opt.workspace.clear()` releases them.
        on_nonfinite: "raise" (FloatingPointError) or "skip" the step; either way the
            parameters are left bit-for-bit as they were before the step.
        process_group: under torch.distributed, the group over which the closure's loss is
            averaged (one scalar all-reduce per closure call); by default the default group
            when torch.distributed is initialised with more than one process.
        fixed_randomness: every closure call of a step starts from the random state of the
            first (torch's CPU generator, and the CUDA generators of the parameters' devices),
            so Dropout masks and random augmentations repeat and the ball rolls on one
            landscape; after the step the generators are where one call left them.
        model: the module whose BatchNorm running statistics the closure updates; if given,
            only the first closure call of a step updates them, as one SGD step would.

    `step(closure)` returns the closure's loss at the starting point; `last_stats` holds the
    step's figures: grad_evals (closure calls), projection_steps, residual (‖r‖ relative to
    ‖r(θ)‖), converged, safeguard_steps, blind_step, skipped, loss, moved, stall (below). A
    step that did not happen (a
    non-finite value, or an exception raised by the closure) has skipped=True and counts
    the closure calls it spent. RBO sets the gradients to None before every closure call.
    If the relative residual stays above 0.5 on more than half of the last 20 steps, RBO
    warns once (`ProjectionWarning`); projection_tol=0 (a fixed K, as in the authors' code)
    turns the watch off.

    `moved` says whether the step changed the parameters, `stall` why not: None when it
    moved; "rejected", every trial point raised φ (the parameters are left bit for bit at θ);
    "stationary", θ already met the projection tolerance (r(θ) = 0), or a zero step at
    radius 0; "skipped", a step that did not happen.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        radius: float = 1.0,
        projection: str = defaults.PROJECTION,
        projection_steps: int = defaults.PROJECTION_STEPS,
        projection_step_size: float = defaults.PROJECTION_STEP_SIZE,
        projection_tol: float = defaults.PROJECTION_TOL,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        loss_scale: float = 1.0,
        maximize: bool = False,
        anderson_memory: int = defaults.ANDERSON_MEMORY,
        on_nonfinite: str = "raise",
        process_group: Any = None,
        fixed_randomness: bool = True,
        model: nn.Module | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            radius=radius,
            projection=projection,
            projection_steps=projection_steps,
            projection_step_size=projection_step_size,
            projection_tol=projection_tol,
            momentum=momentum,
            weight_decay=weight_decay,
            loss_scale=loss_scale,
            maximize=maximize,
            anderson_memory=anderson_memory,
            on_nonfinite=on_nonfinite,
        )
        _validate_group(defaults)
        super().__init__(params, defaults)
        self._shared_settings()
        self.process_group = process_group
        self.fixed_randomness = fixed_randomness
        self.model = model
        self.workspace = Workspace()  # the step's buffers, kept for the next step (CPU only)
        self.last_stats: dict[str, Any] = {}
        self._poor_steps: deque[bool] = deque(maxlen=POOR_WINDOW)
        self._warned = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_group(group)
        for p in group["params"]:
            if torch.is_complex(p):
                raise ValueError("RBO does not support complex parameters")

    def _shared_settings(self) -> dict[str, Any]:
        """The settings of the one ball, checked to be the same in every group."""
        first = self.param_groups[0]
        for group in self.param_groups[1:]:
            for key in SHARED_SETTINGS:
                if group[key] != first[key]:
                    raise ValueError(
                        f"every param group must hold the same {key} (one ball, one landscape): "
                        f"got {first[key]!r} and {group[key]!r}"
                    )
        for group in self.param_groups:
            _validate_group(group)
        return {key: first[key] for key in SHARED_SETTINGS}

    @property
    def _counters(self) -> dict[str, Any]:
        """Optimizer-wide counters, kept in the state of the first parameter (like LBFGS)."""
        state = self.state[self.param_groups[0]["params"][0]]
        for key in ("steps", "grad_evals", "skipped_steps"):
            state.setdefault(key, 0)
        return state

    @property
    def grad_evals(self) -> int:
        """Closure calls made by this optimizer since it was created (survives state_dict)."""
        return int(self._counters["grad_evals"])

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because of a non-finite loss or gradient (on_nonfinite="skip")."""
        return int(self._counters["skipped_steps"])

    def _resolved_process_group(self) -> Any:
        if self.process_group is not None:
            return self.process_group
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:
        """One RBO step on the closure's minibatch; returns the loss at the starting point."""
        if closure is None:
            raise RuntimeError(
                "RBO needs a closure: step(closure) where closure() runs forward and backward "
                "on one minibatch and returns the loss"
            )
        settings = self._shared_settings()
        groups = self.param_groups
        params = [[p for p in group["params"] if p.requires_grad] for group in groups]
        if self.model is not None:
            closure = first_call_updates_batchnorm(self.model, closure)
        fixed = self.fixed_randomness and settings["radius"] > 0  # radius 0: one call anyway
        caller = StepClosure(closure, _flat(params), fixed)
        landscape = _Landscape(caller, groups, params, settings, self._resolved_process_group())
        snapshot = self.workspace.copy(_flat(params)) if settings["radius"] else None
        loss: Any = None
        try:
            first = landscape.evaluate()
            loss, active = first.loss, landscape.params
            directions = self._tangent_directions(active, first.grads)
            if settings["radius"] == 0:
                for group, group_params, v in zip(groups, active, directions, strict=True):
                    torch._foreach_add_(group_params, v, alpha=-group["lr"])
                moved = first.grad_sq > 0 or any(g["momentum"] for g in groups)
                moved = moved and any(g["lr"] > 0 for g in groups)
                stats: dict[str, Any] = {
                    "projection_steps": 0,
                    "safeguard_steps": 0,
                    "residual": 0.0,
                    "converged": True,
                    "blind_step": False,
                    "moved": moved,
                    "stall": None if moved else "stationary",
                }
            else:
                stats = self._roll(landscape, settings, active, first, directions)
                if snapshot is not None and not stats["moved"]:  # x + δ − δ: undo round-off
                    copy_(_flat(params), snapshot)
        except BaseException as error:  # a bad value, a bad closure, Ctrl-C: nothing is lost
            if snapshot is not None:
                copy_(_flat(params), snapshot)
            if isinstance(error, _NonFinite):
                return self._skip_or_raise(error, settings["on_nonfinite"], landscape.calls, loss)
            self._refused(landscape.calls, loss)
            raise
        finally:
            caller.finish()
            if snapshot is not None:
                self.workspace.give(snapshot)
        self._commit_momentum(groups, active, directions)
        counters = self._counters
        counters["steps"] += 1
        counters["grad_evals"] += landscape.calls
        self.last_stats = {
            **stats,
            "grad_evals": landscape.calls,
            "skipped": False,
            "loss": _as_float(loss),
        }
        if settings["radius"] and settings["projection_tol"]:  # tol 0: a fixed K, by request
            self._watch_projection(stats["residual"])
        return loss

    def _watch_projection(self, residual: float) -> None:
        """Warn once when most recent steps ended far from their contact point."""
        self._poor_steps.append(not residual <= POOR_RESIDUAL)
        poor = sum(self._poor_steps)
        if self._warned or len(self._poor_steps) < POOR_WINDOW or 2 * poor <= POOR_WINDOW:
            return
        self._warned = True
        warnings.warn(
            f"RBO: on {poor} of the last {POOR_WINDOW} steps the projection ended with a "
            f"relative residual above {POOR_RESIDUAL} (last_stats['residual']), so the "
            "ball's steps are not the ones the radius describes. Likely causes: Dropout or "
            "random augmentation in the closure with fixed_randomness=False; a closure that "
            "does not recompute the loss on the same minibatch at every call; bfloat16 or "
            "float16 round-off with a small projection_tol (use 1e-2 or more); a radius too "
            "large for the landscape (lower radius or lr, or raise projection_steps). "
            "This warning is shown once.",
            ProjectionWarning,
            stacklevel=5,  # the caller of step, past torch's no_grad and profiling wrappers
        )

    def _refused(self, calls: int, loss: Any) -> None:
        """Record a step that did not happen, with the closure calls it spent."""
        self._counters["grad_evals"] += calls
        self.last_stats = {
            "grad_evals": calls,
            "projection_steps": 0,
            "safeguard_steps": 0,
            "residual": math.nan,
            "converged": False,
            "moved": False,
            "stall": "skipped",
            "skipped": True,
            "loss": math.nan if loss is None else _as_float(loss),
        }

    def _skip_or_raise(self, error: _NonFinite, policy: str, calls: int, loss: Any) -> Any:
        """Count a refused step (the parameters are already restored) and raise or skip it."""
        self._refused(calls, loss)
        if policy == "raise":
            raise FloatingPointError(
                f"RBO step refused: {error}; the parameters are left as they were before the step"
            ) from None
        self._counters["skipped_steps"] += 1
        return loss

    def _tangent_directions(
        self, params: list[list[Tensor]], grads: list[list[Tensor]]
    ) -> list[list[Tensor]]:
        """v = g, or v = μ v_prev + g with momentum (v_prev = g at the first step), per group.

        The buffers are not touched here: `_commit_momentum` stores v once the step succeeded.
        """
        directions = []
        for group, group_params, group_grads in zip(self.param_groups, params, grads, strict=True):
            mu = group["momentum"]
            if mu == 0:
                directions.append(group_grads)
                continue
            v = []
            for p, g in zip(group_params, group_grads, strict=True):
                buffer = self.state[p].get("momentum_buffer")
                v.append(g.clone() if buffer is None else buffer.mul(mu).add_(g))
            directions.append(v)
        return directions

    def _commit_momentum(
        self,
        groups: list[dict[str, Any]],
        params: list[list[Tensor]],
        directions: list[list[Tensor]],
    ) -> None:
        for group, group_params, v in zip(groups, params, directions, strict=True):
            if group["momentum"] != 0:
                for p, buffer in zip(group_params, v, strict=True):
                    self.state[p]["momentum_buffer"] = buffer

    def _moved_centre(
        self, radius: float, first: _Evaluated, directions: list[list[Tensor]]
    ) -> _MovedCentre:
        """u = θ − θ̃ = a g + η v per group, a = ρ/s, and h = ỹ − f(θ) = a − Σ η ⟨g, v⟩.

        The start's ⟨g, u⟩ = a‖g‖² + Σ η⟨g, v⟩ and ‖u‖² = a²‖g‖² + 2a Σ η⟨g, v⟩ + Σ η²‖v‖² come
        from one reduction per group (v = g without momentum, none for a single group: it is
        ‖g‖²; two with momentum). Without momentum and with one learning rate u = (a + η) g:
        it is left to the solver, whose first step is along g too (`seat_offset`)."""
        a = radius / slope_factor(first.grad_sq)
        groups = list(zip(self.param_groups, first.grads, directions, strict=True))
        scales = [a + group["lr"] if v is g else a for group, g, v in groups for _ in g]
        lazy = all(v is g for _, g, v in groups) and len(set(scales)) == 1  # u = s g
        offset = [] if lazy else self.workspace.scaled(_flat(first.grads), scales)
        reductions = []
        start = 0
        single = len(groups) == 1  # then ⟨g, g⟩ of the group is ‖g‖², known already
        for group, g, v in groups:
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
        for group, g, v in groups:
            lr = group["lr"]
            g_v = first.grad_sq if v is g and single else next(host)
            v_sq = g_v if v is g else next(host)
            tangent += lr * g_v
            velocity += lr * lr * v_sq
        return _MovedCentre(
            offset,
            scales[0] if lazy else None,
            lift=a - tangent,
            grad_offset=a * first.grad_sq + tangent,
            offset_sq=a * a * first.grad_sq + 2 * a * tangent + velocity,
        )

    def _roll(
        self,
        landscape: _Landscape,
        settings: dict[str, Any],
        params: list[list[Tensor]],
        first: _Evaluated,
        directions: list[list[Tensor]],
    ) -> dict[str, Any]:
        """Seat the ball, move its centre along the tangent, project it back onto the graph.

        The first gradient is handed over to the solver (`first.grads` and the directions of
        groups without momentum are emptied), so that no reference keeps it alive once the
        next closure call replaces the `.grad` tensors.
        """
        centre = self._moved_centre(settings["radius"], first, directions)
        for index, group in enumerate(self.param_groups):
            if group["momentum"] == 0:
                directions[index] = []
        solver = make_solver(
            settings["projection"],
            settings["projection_steps"],
            settings["projection_step_size"],
            settings["projection_tol"],
            settings["anderson_memory"],
        )
        flat = _flat(params)
        gathers = settings["projection"] == "anderson" and _many_small_tensors(flat)
        problem = _Projection(landscape, flat, centre, first, self.workspace, gathers)
        result = solver.solve(problem)
        self.workspace.give(problem.offset)
        problem.release_grads()
        norm = result.initial_norm
        relative = result.final_norm / norm if norm > 0 else 0.0
        moved = result.moved
        return {
            "projection_steps": result.steps,
            "safeguard_steps": result.safeguard_steps,
            "residual": relative,
            "converged": relative <= settings["projection_tol"],
            "blind_step": result.blind_step,
            "moved": moved,
            "stall": None if moved else ("rejected" if result.steps else "stationary"),
        }


def _many_small_tensors(params: list[Tensor]) -> bool:
    """CPU parameters of fewer than `GATHER_BELOW` elements per tensor on average: then the
    Anderson solver gathers each gradient into one flat buffer (one more parameter copy)."""
    return plain_cpu(params) and sum(p.numel() for p in params) < GATHER_BELOW * len(params)


def _as_float(loss: Any) -> float:
    return float(loss.detach()) if isinstance(loss, Tensor) else float(loss)


def _flat(groups: list[list[Tensor]]) -> list[Tensor]:
    return [t for group in groups for t in group]
