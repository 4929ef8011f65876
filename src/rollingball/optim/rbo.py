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
import sys
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from rollingball import defaults
from rollingball.optim.batchnorm import first_call_updates_batchnorm
from rollingball.optim.closure import StepClosure
from rollingball.optim.geometry import copy_, squared_norm
from rollingball.optim.problem import (
    CentreProjection,
    Evaluated,
    Landscape,
    NonFinite,
    flat,
    many_small_tensors,
    moved_centre,
)
from rollingball.optim.projection import make_solver
from rollingball.optim.workspace import Workspace
from rollingball.spec import validate

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
    "max_update",
)
# Every key of `last_stats`, whatever the step did (see RBO's docstring).
STATS_KEYS = (
    "grad_evals",
    "projection_steps",
    "residual",
    "converged",
    "safeguard_steps",
    "blind_step",
    "skipped",
    "loss",
    "update_bounded",
    "moved",
    "stall",
)
# The settings a state dict's param groups must hold to be RBO's (max_update may be absent:
# state dicts saved before it existed load with no bound).
STATE_KEYS = ("lr", "momentum", "weight_decay", *SHARED_SETTINGS[:-1])
# The poor-projection warning: a step whose relative residual stays above POOR_RESIDUAL made
# poor progress, unless its residual is below POOR_OFFSET times the centre's offset ‖θ − θ̃‖
# (r(θ) shrinks with η, so as a schedule anneals η → 0 the relative residual measures
# round-off, while the ball's geometry is still met to within 1% of its offset); warn once
# when more than half of the last POOR_WINDOW steps were poor.
POOR_RESIDUAL = 0.5
POOR_OFFSET = 0.01
POOR_WINDOW = 20
# When it warns, RBO tests the closure's gradient against its loss by central differences
# along it: a slope ratio outside [1/GRADIENT_RATIO, GRADIENT_RATIO] means the gradient is not
# the loss's (clipping or rescaling in the closure).
GRADIENT_RATIO = 1.5


class ProjectionWarning(UserWarning):
    """Many recent RBO steps ended far from the contact point the projection looks for."""


class RBO(Optimizer):
    """The Rolling Ball Optimizer.

    Args:
        params: parameters or param groups, as for any torch.optim optimizer.
        lr: η, the tangent step of the ball centre (per group). The defaults (lr=1e-3,
            radius=1) are safe, not fast: start from the learning rate SGD trains well with
            (at the first step RBO moves by about (η + ρ/s)‖g‖, SGD by η‖g‖), e.g. 0.05 with
            momentum=0.9, and a radius of the order of that step, e.g. 0.1.
        radius: ρ >= 0, the ball's radius; one ball, so every group holds the same radius.
            `radius=0` is exactly torch.optim.SGD (one closure call per step, and `step()`
            without a closure takes SGD's step on the gradients already in `.grad`).
        projection: "anderson" (accelerated, default) or "gd" (the authors' scheme).
        projection_steps: K, the projection trial points per step; each rejected trial point
            adds one more, up to 2 (a step costs at most 1 + K + 2 closure calls; gd: K
            iterations, K calls); when the budget runs out the solver still takes the step its
            last evaluation points to, unevaluated (`blind_step`).
        projection_step_size: γ, the step of the fixed-point iteration x ← x − γ r(x); "gd"
            is stable only while γ(1 + ‖∇f‖²) < 2 (the default γ = 1 suits Anderson, whose
            safeguard rejects bad trial points; gd with a steep loss needs a smaller γ, and a
            divergence it causes is refused with this condition in the message).
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
            small CPU tensors, see `problem.GATHER_BELOW`; gd: 2). On the CPU they are kept between
            steps in `opt.workspace` and reused, which saves the page faults of fresh large
            allocations; `opt.workspace.clear()` releases them.
        on_nonfinite: "raise" (FloatingPointError) or "skip" the step; either way the
            parameters are left bit-for-bit as they were before the step.
        max_update: None, or the most the parameters may move in one step: an update
            d = θ_new − θ longer than it is shortened to θ + (max_update/‖d‖) d, over all
            groups (`last_stats["update_bounded"]`). It is what gradient clipping does for
            SGD; clipping inside the closure breaks RBO (the gradients are then not the
            loss's, and the projection cannot find the contact point). The momentum buffer
            keeps the full v.
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
    step's figures, the same keys (`STATS_KEYS`) after every step, skipped or not:
    grad_evals (closure calls), projection_steps (trial points), residual (‖r‖ relative to
    ‖r(θ)‖; 0 at radius 0, NaN when skipped), converged, safeguard_steps (trial points
    rejected), blind_step (the step ended with the unevaluated step of the last
    evaluation), skipped, loss (at the starting point; NaN when unknown), update_bounded
    (max_update shortened the update), moved and stall (below). A step that did not happen
    (a non-finite value, or an exception raised by the closure) has skipped=True and counts
    the closure calls it spent. RBO sets the gradients to None before every closure call,
    and after a step at radius > 0 (the last call's `.grad` is a trial point's gradient or a
    residual, not the gradient at the new θ); at radius 0 `.grad` keeps ∇f(θ) =
    κ(±∇loss + λθ). If the relative residual stays above 0.5 (and the residual above 1% of
    the centre's offset ‖θ − θ̃‖) on more than half of the last 20 steps, RBO warns once
    (`ProjectionWarning`); that step spends 3 more closure calls testing the closure's
    gradient against its loss, to name clipping when it is not the loss's. projection_tol=0
    (a fixed K, as in the authors' code) turns the watch off. `closure_call` is the number
    of the closure call running now (1 at θ), 0 outside a step.

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
        max_update: float | None = None,
        process_group: Any = None,
        fixed_randomness: bool = True,
        model: nn.Module | None = None,
    ) -> None:
        group_defaults = dict(
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
            max_update=max_update,
        )
        validate(group_defaults)
        super().__init__(params, group_defaults)
        self._shared_settings()
        self.process_group = process_group
        self.fixed_randomness = fixed_randomness
        self.model = model
        self.workspace = Workspace()  # the step's buffers, kept for the next step (CPU only)
        self.last_stats: dict[str, Any] = {}
        self._poor_steps: deque[bool] = deque(maxlen=POOR_WINDOW)
        self._warned = False
        self._poor = False  # the last step's projection ended far from its contact point
        self._caller: StepClosure | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        validate(group)
        for p in group["params"]:
            if torch.is_complex(p):
                raise ValueError("RBO does not support complex parameters")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("max_update", None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's load, refusing first a state dict that is not RBO's (its param groups
        lack RBO's settings: another optimizer's) or whose settings RBO refuses."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise ValueError("not an optimizer state dict: it has no list of param_groups")
        for group in groups:
            missing = [key for key in STATE_KEYS if key not in group]
            if missing:
                raise ValueError(
                    "not an RBO state dict: its param groups lack "
                    f"{', '.join(missing)} (it was saved by another optimizer, e.g. "
                    "torch.optim.SGD); load only what RBO.state_dict() saved, or start RBO afresh"
                )
            validate(group)
        super().load_state_dict(state_dict)

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
            validate(group)
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
        """One RBO step on the closure's minibatch; returns the loss at the starting point.

        At `radius=0` the closure may be left out: the step is then torch.optim.SGD's on the
        gradients already in `.grad` and returns None."""
        settings = self._shared_settings()
        if closure is None:
            if settings["radius"] != 0:
                raise RuntimeError(
                    "RBO needs a closure at radius > 0: step(closure) where closure() runs "
                    "forward and backward on one minibatch and returns the loss, because a "
                    "step evaluates the loss and its gradient at up to 1 + projection_steps "
                    "points (at radius=0 step() uses the gradients already in .grad, as SGD)"
                )
            return self._sgd_step_from_grads(settings)
        groups = self.param_groups
        params = [[p for p in group["params"] if p.requires_grad] for group in groups]
        if self.model is not None:
            closure = first_call_updates_batchnorm(self.model, closure)
        fixed = self.fixed_randomness and settings["radius"] > 0  # radius 0: one call anyway
        caller = StepClosure(closure, flat(params), fixed)
        landscape = Landscape(caller, groups, params, settings, self._resolved_process_group())
        snapshot = self.workspace.copy(flat(params)) if settings["radius"] else None
        loss: Any = None
        slope_ratio: float | None = None
        self._caller = caller
        try:
            first = landscape.evaluate()
            loss, active = first.loss, landscape.params
            directions = self._tangent_directions(active, first.grads)
            if settings["radius"] == 0:
                moved = _sgd_moves(groups, first.grad_sq)
                bounded = self._sgd_update(settings, active, directions)
                stats = _sgd_stats(moved)
            else:
                stats = self._roll(landscape, settings, active, first, directions)
                if snapshot is not None and not stats["moved"]:  # x + δ − δ: undo round-off
                    copy_(flat(params), snapshot)
                bounded = self._bound_update(settings, flat(active), snapshot)
                if settings["projection_tol"] and self._watch_projection():  # tol 0: fixed K
                    slope_ratio = self._gradient_check(landscape)
        except BaseException as error:  # a bad value, a bad closure, Ctrl-C: nothing is lost
            if snapshot is not None:
                copy_(flat(params), snapshot)
            if isinstance(error, NonFinite):
                message = str(error)
                if settings["projection"] == "gd" and landscape.calls > 1:
                    gamma = settings["projection_step_size"]
                    product = gamma * (1.0 + landscape.first_grad_sq)
                    message += _GD_HINT.format(gamma=gamma, product=product)
                return self._skip_or_raise(message, settings["on_nonfinite"], landscape.calls, loss)
            self._refused(landscape.calls, loss)
            raise
        finally:
            self._caller = None
            caller.finish()
            if snapshot is not None:  # radius > 0: `.grad` holds a trial point's or a residual
                self.workspace.give(snapshot)
                for p in flat(params):
                    p.grad = None
        self._commit_momentum(groups, active, directions)
        self._count_step(landscape.calls)
        self.last_stats = {
            **stats,
            "grad_evals": landscape.calls,
            "skipped": False,
            "loss": _as_float(loss),
            "update_bounded": bounded,
        }
        if slope_ratio is not None:
            self._warn_poor_projection(slope_ratio)
        return loss

    @property
    def closure_call(self) -> int:
        """The number of the closure call running now within a step (1 at the step's starting
        point θ, more at the projection's trial points), 0 outside a step."""
        return 0 if self._caller is None else self._caller.calls

    def _count_step(self, calls: int) -> None:
        counters = self._counters
        counters["steps"] += 1
        counters["grad_evals"] += calls

    def _sgd_update(
        self, settings: dict[str, Any], params: list[list[Tensor]], directions: list[list[Tensor]]
    ) -> bool:
        """θ ← θ − η v per group, the whole update shortened to max_update if it is longer;
        returns whether it was."""
        scale = 1.0
        if settings["max_update"] is not None:
            norm_sq = sum(
                group["lr"] ** 2 * squared_norm(v)
                for group, v in zip(self.param_groups, directions, strict=True)
            )
            scale = _shortening(math.sqrt(norm_sq), settings["max_update"])
        for group, group_params, v in zip(self.param_groups, params, directions, strict=True):
            torch._foreach_add_(group_params, v, alpha=-group["lr"] * scale)
        return scale < 1.0

    def _bound_update(
        self, settings: dict[str, Any], params: list[Tensor], start: list[Tensor] | None
    ) -> bool:
        """With max_update: θ ← θ₀ + min(1, max_update/‖d‖) d, d = θ − θ₀ the step's update
        (what `optax.clip_by_global_norm` does to an optax update); returns whether the
        update was shortened."""
        bound = settings["max_update"]
        if bound is None or start is None:
            return False
        update = self.workspace.copy(params)
        torch._foreach_sub_(update, start)
        scale = _shortening(math.sqrt(squared_norm(update)), bound)
        if scale < 1.0:
            copy_(params, start)
            torch._foreach_add_(params, update, alpha=scale)
        self.workspace.give(update)
        return scale < 1.0

    def _sgd_step_from_grads(self, settings: dict[str, Any]) -> None:
        """radius=0 without a closure: SGD's step on the `.grad` tensors, which it leaves as
        they are (the landscape's gradient κ(±g + λθ) is formed out of place when it differs)."""
        params, grads = [], []
        for group in self.param_groups:
            group_params = [p for p in group["params"] if p.grad is not None]
            group_grads = []
            for p in group_params:
                if p.grad.is_sparse:
                    raise RuntimeError(
                        "RBO does not support sparse gradients, at any radius (the ball's "
                        "geometry needs dense ones): use nn.Embedding(..., sparse=False)"
                    )
                g = p.grad if not settings["maximize"] else -p.grad
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                if settings["loss_scale"] != 1.0:
                    g = g.mul(settings["loss_scale"])
                group_grads.append(g)
            params.append(group_params)
            grads.append(group_grads)
        grad_sq = squared_norm(flat(grads))
        if not math.isfinite(grad_sq):
            policy = settings["on_nonfinite"]
            return self._skip_or_raise("non-finite gradient in .grad", policy, 0, None)
        directions = self._tangent_directions(params, grads)
        bounded = self._sgd_update(settings, params, directions)
        self._commit_momentum(self.param_groups, params, directions)
        self._count_step(0)
        self.last_stats = {
            **_sgd_stats(_sgd_moves(self.param_groups, grad_sq)),
            "grad_evals": 0,
            "skipped": False,
            "loss": math.nan,
            "update_bounded": bounded,
        }
        return None

    def _watch_projection(self) -> bool:
        """Whether to warn now: once, when most recent steps ended far from their contact
        point (`POOR_RESIDUAL`, `POOR_OFFSET`)."""
        self._poor_steps.append(self._poor)
        poor = sum(self._poor_steps)
        return not (self._warned or len(self._poor_steps) < POOR_WINDOW or 2 * poor <= POOR_WINDOW)

    def _gradient_check(self, landscape: Landscape) -> float:
        """The closure's slope along its own gradient at θ over ‖∇f(θ)‖, 1 for a true gradient:
        (f(θ + hĝ) − f(θ − hĝ)) / (2h‖∇f‖), ĝ = ∇f/‖∇f‖, with the step
        h = √eps·min(max(1, |f|)/‖∇f‖, max(1, ‖θ‖)): large enough that f changes well above
        its round-off, and local where ‖∇f‖ is small (three closure calls, θ restored bit for
        bit); NaN when a value is not finite or ∇f = 0."""
        params = flat(landscape.params)
        start = self.workspace.copy(params)
        grads: list[Tensor] = []
        try:
            at = landscape.evaluate()
            norm = math.sqrt(at.grad_sq)
            if norm == 0:
                return math.nan
            grads = self.workspace.copy(flat(at.grads))  # `.grad` may be reused (DDP views)
            scale = min(max(1.0, abs(at.value)) / norm, max(1.0, math.sqrt(squared_norm(start))))
            step = math.sqrt(torch.finfo(params[0].dtype).eps) * scale
            values = []
            for sign in (1.0, -1.0):
                copy_(params, start)
                torch._foreach_add_(params, grads, alpha=sign * step / norm)
                values.append(landscape.evaluate().value)
            return (values[0] - values[1]) / (2 * step * norm)
        except NonFinite:
            return math.nan
        finally:
            copy_(params, start)
            self.workspace.give(start)
            if grads:
                self.workspace.give(grads)

    def _warn_poor_projection(self, slope_ratio: float) -> None:
        """The warning, with the causes that fit and for each the setting that changes it."""
        self._warned = True
        poor = sum(self._poor_steps)
        if math.isnan(slope_ratio):
            gradient = "The test of the closure's gradient met a non-finite value. Likely causes: "
        elif 1 / GRADIENT_RATIO <= slope_ratio <= GRADIENT_RATIO:
            gradient = (
                f"The closure's gradient matches its loss (slope ratio {slope_ratio:.3g}, "
                "1 for a true gradient), so the likely causes are: "
            )
        else:
            gradient = (
                "The closure's gradient is not the gradient of its loss: along it the loss "
                f"changes at {slope_ratio:.3g} times the rate ‖∇f‖ gives (1 for a true "
                "gradient). Gradient clipping (clip_grad_norm_, clip_grad_value_) or any "
                "rescaling of .grad in the closure does this (and so does cause 1 below): "
                "remove it, and bound the step with RBO(max_update=...) instead. Other causes: "
            )
        warnings.warn(
            f"RBO: on {poor} of the last {POOR_WINDOW} steps the projection removed less "
            f"than half of the residual it started from (last_stats['residual'] > "
            f"{POOR_RESIDUAL}), so the ball's steps are not the ones the radius describes. "
            f"{gradient}"
            "(1) a closure whose loss changes from call to call within a step: it must "
            "recompute the loss on the same minibatch at every call, and draw Dropout masks "
            "and random augmentations from torch's generator with fixed_randomness=True "
            "(the default); (2) a radius too large for the landscape at this budget: lower "
            "radius, to the order of the step lr·‖g‖ (e.g. lr=0.05, momentum=0.9, "
            "radius=0.1). The test cost 3 closure calls, counted in last_stats['grad_evals']. "
            "This warning is shown once.",
            ProjectionWarning,
            stacklevel=_caller_level(),
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
            "blind_step": False,
            "moved": False,
            "stall": "skipped",
            "skipped": True,
            "loss": math.nan if loss is None else _as_float(loss),
            "update_bounded": False,
        }

    def _skip_or_raise(self, error: str, policy: str, calls: int, loss: Any) -> Any:
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

    def _roll(
        self,
        landscape: Landscape,
        settings: dict[str, Any],
        params: list[list[Tensor]],
        first: Evaluated,
        directions: list[list[Tensor]],
    ) -> dict[str, Any]:
        """Seat the ball, move its centre along the tangent, project it back onto the graph.

        The first gradient is handed over to the solver (`first.grads` and the directions of
        groups without momentum are emptied), so that no reference keeps it alive once the
        next closure call replaces the `.grad` tensors.
        """
        centre = moved_centre(
            self.param_groups, settings["radius"], first, directions, self.workspace
        )
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
        active = flat(params)
        gathers = settings["projection"] == "anderson" and many_small_tensors(active)
        problem = CentreProjection(landscape, active, centre, first, self.workspace, gathers)
        result = solver.solve(problem)
        self.workspace.give(problem.offset)
        problem.release_grads()
        norm = result.initial_norm
        relative = result.final_norm / norm if norm > 0 else 0.0
        offset = POOR_OFFSET * math.sqrt(centre.offset_sq)
        self._poor = not (relative <= POOR_RESIDUAL or result.final_norm <= offset)
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


def _sgd_moves(groups: list[dict[str, Any]], grad_sq: float) -> bool:
    """Whether SGD's step θ ← θ − η v moves: a gradient or a momentum, and a learning rate
    (a zero momentum buffer with a zero gradient is counted as moving)."""
    pushed = grad_sq > 0 or any(group["momentum"] for group in groups)
    return pushed and any(group["lr"] > 0 for group in groups)


def _sgd_stats(moved: bool) -> dict[str, Any]:
    """The projection's figures of a step at radius 0, which has no projection."""
    return {
        "projection_steps": 0,
        "safeguard_steps": 0,
        "residual": 0.0,
        "converged": True,
        "blind_step": False,
        "moved": moved,
        "stall": None if moved else "stationary",
    }


def _shortening(norm: float, bound: float) -> float:
    """min(1, bound/‖d‖): the factor that brings an update d of norm ‖d‖ within the bound."""
    return bound / norm if norm > bound else 1.0


# Modules whose frames a warning skips to reach the code that called `step`: RBO's own,
# torch's wrappers of `step` (no_grad, profiling, LR schedulers' counting) and Lightning's.
_WRAPPER_MODULES = (
    "rollingball.optim",
    "rollingball.integrations",
    "torch",
    "lightning",
    "pytorch_lightning",
    "contextlib",
    "functools",
)


def _caller_level() -> int:
    """The `stacklevel` that makes a warning issued by the function calling this one point at
    the first frame outside `_WRAPPER_MODULES`: the user's `step` call (or `trainer.fit`)."""
    frame = sys._getframe(2)
    level = 2
    while frame.f_back is not None:
        name = frame.f_globals.get("__name__", "")
        if not any(name == m or name.startswith(m + ".") for m in _WRAPPER_MODULES):
            break
        frame = frame.f_back
        level += 1
    return level


_GD_HINT = (
    "; projection='gd' iterates x ← x − γ r(x), which is stable only while "
    "γ(1 + ‖∇f‖²) < 2 near the contact point, and γ = projection_step_size = {gamma} "
    "(γ(1 + ‖∇f(θ)‖²) = {product:.3g} at this step's start): lower projection_step_size below "
    "2/(1 + ‖∇f‖²) or use projection='anderson', which needs no step size"
)


def _as_float(loss: Any) -> float:
    return float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
