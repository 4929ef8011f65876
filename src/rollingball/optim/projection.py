"""Projection of the moved ball centre c̃ = (θ̃, ỹ) back onto the graph of the loss.

The new contact point is a stationary point of

    φ(x) = ½‖x − θ̃‖² + ½(f(x) − ỹ)²,   r(x) = ∇φ(x) = u + m g,

with u = x − θ̃, m = f(x) − ỹ (the height mismatch) and g = ∇f(x), found by a local solver
warm-started at x₀ = θ, where r(θ) is known without a closure call. Every evaluation at a new
point costs one closure call (forward + backward). When the budget of K evaluations runs out,
a solver still takes the step its last evaluation points to, without evaluating it (the
"blind" last step): the evaluation would only have been needed to look further.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from rollingball import spec
from rollingball.optim.geometry import (
    add_,
    inner_device,
    plain_cpu,
    scale_,
    squared_norm_device,
    subtract_from_,
    to_host,
)
from rollingball.optim.workspace import Workspace
from rollingball.spec import (
    ANDERSON_BACKTRACK,
    ANDERSON_CONTRACTION,
    ANDERSON_EXTENSION,
    ANDERSON_REGULARIZATION,
    ANDERSON_TRUST,
    RIDGE_FLOOR,
    SOLVERS,
)


class NonFinite(Exception):
    """An evaluation produced a non-finite loss, gradient or residual."""


@dataclass
class Evaluation:
    """Host scalars of one evaluation at x: m = f(x) − ỹ (the height mismatch) and the device
    reductions the solver asked for, transferred in the same synchronisation."""

    mismatch: float
    values: list[float] = field(default_factory=list)


Reductions = Callable[[list[Tensor]], list[Tensor]]
"""Device scalars a solver wants with an evaluation, computed from the new gradient g; the
evaluation fails as non-finite if any of them is."""


class ProjectionProblem(Protocol):
    """What a solver sees: the iterate x (the parameters), u = x − θ̃, the gradient g at the
    last evaluated point (in `.grad`; the next closure call replaces it), evaluations, and
    the workspace its parameter-sized buffers come from and go back to.

    At θ, u may be the multiple `offset_scale` of g and not formed yet (`offset` empty): the
    solver's first step is then along g as well, and it forms u once with `seat_offset`."""

    params: list[Tensor]
    offset: list[Tensor]
    offset_scale: float | None  # not None while u = offset_scale · g is not formed
    grads: list[Tensor]
    workspace: Workspace

    def seat_offset(self, scale: float) -> None:
        """Form u = scale · g from the gradient at θ (before the first evaluation)."""

    @property
    def calls(self) -> int:
        """Closure calls so far."""

    def start(self) -> Evaluation:
        """The evaluation at x₀ = θ, known without a closure call, with ‖g‖², ⟨g, u⟩ and ‖u‖²."""

    def evaluate(self, reductions: Reductions) -> Evaluation:
        """One closure call at the current x."""

    def phi_noise(self, mismatch: float, phi: float) -> float:
        """The round-off level of φ at a point with this mismatch: changes below it are noise."""


@dataclass
class ProjectionResult:
    """Outcome of one projection: evaluated trial points, the residual norms at the start and
    at the last evaluated point, rejected trial points, and whether a blind last step was
    taken."""

    steps: int
    initial_norm: float
    final_norm: float
    safeguard_steps: int = 0
    blind_step: bool = False

    @property
    def moved(self) -> bool:
        """Whether the solver left θ: a trial point was accepted, or a blind step taken."""
        return self.steps > self.safeguard_steps or self.blind_step


WIDE_RANGE = (torch.float32, torch.float64, torch.bfloat16)


def _wide_range(tensors: list[Tensor]) -> bool:
    """Dtypes with float32's exponent range or more, where u = s' g after the first move does
    not underflow while p₀ = (s + c) g is normal, so that p₀ = (s + c)/s' · u (float16
    parameters keep p₀ formed)."""
    return all(t.dtype in WIDE_RANGE for t in tensors)


def _no_reductions(grads: list[Tensor]) -> list[Tensor]:
    return []


def _products(g: list[Tensor], u: list[Tensor], offset_known: bool) -> list[Tensor]:
    """Terms of ‖g‖², ⟨g, u⟩ and, unless it is known on the host, ‖u‖²."""
    products = [squared_norm_device(g), inner_device(g, u)]
    return products if offset_known else [*products, squared_norm_device(u)]


def _newton(
    workspace: Workspace, u: list[Tensor], g: list[Tensor], c: float
) -> tuple[list[Tensor], Tensor]:
    """p = u + c g in a workspace buffer (the next closure call may reuse `.grad`), and the
    terms of ‖p‖²."""
    p = workspace.add(u, g, c)
    return p, squared_norm_device(p)


def _newton_difference(
    workspace: Workspace,
    q: list[Tensor] | None,
    u: list[Tensor],
    g: list[Tensor],
    c: float,
    ratio: float,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """p = u + c g in a workspace buffer and the difference D = p − q from the last p, q, in
    place of q, or, when q is the unformed multiple `ratio` of u (None: p₀ = (s + c₀)/s' · u
    after the first plain step from θ, `AndersonProjection._move`), D = p − ratio · u in a
    buffer of its own: one pass either way. Returns p, D and the terms of ‖p‖², ‖D‖² and
    ⟨D, p⟩."""
    p = workspace.add(u, g, c)
    if q is None:
        q = workspace.add(p, u, -ratio)
    else:
        subtract_from_(q, p)
    return p, q, [squared_norm_device(p), squared_norm_device(q), inner_device(q, p)]


def _form_residual(g: list[Tensor], u: list[Tensor], m: float) -> None:
    """r = u + m g, written over g (one pass on the CPU). A mismatch m beyond the dtype's
    range (a diverging float32 step) makes r non-finite: `NonFinite`, as a NaN would."""
    if g and abs(m) > torch.finfo(g[0].dtype).max:
        raise NonFinite(f"height mismatch {m:.3g} beyond the range of {g[0].dtype}")
    if plain_cpu(g):
        for r, x in zip(g, u, strict=True):
            torch.add(x, r, alpha=m, out=r)
    else:
        torch._foreach_mul_(g, m)
        torch._foreach_add_(g, u)


def _residual(g: list[Tensor], u: list[Tensor], m: float) -> Tensor:
    """r = u + m g, written over g; the terms of ‖r‖²."""
    _form_residual(g, u, m)
    return squared_norm_device(g)


def _move(x: list[Tensor], u: list[Tensor], v: list[Tensor], beta: float) -> None:
    """x += β v and u += β v (one foreach call for both)."""
    torch._foreach_add_([*x, *u], [*v, *v], alpha=beta)


@dataclass
class GradientDescentProjection:
    """The authors' scheme: x_{k+1} = x_k − γ r(x_k), K iterations from x₀ = θ.

    r = u + m g is formed in the `.grad` tensors and x and u move by −γ r. r(θ) is free, and
    the K-th iteration is taken blind (r(x_K) would only decide a step that is not taken), so
    a step costs at most K closure calls where the authors' code spends K + 1. With tol > 0 it
    stops when ‖r(x)‖ ≤ tol·‖r(θ)‖, and ‖r‖² is taken at every iteration (it is also the check
    that the gradient is finite): two host synchronisations per iteration (the loss, ‖r‖).
    With tol = 0 it reproduces the authors' update, and ‖r‖ decides nothing between the first
    iteration and the last: there it is not taken (one pass and one synchronisation fewer). A
    non-finite r there is not lost: it enters u, so every later r, and the last iteration's ‖r‖
    (taken before the blind move) finds it, if the next loss has not. Extra memory: none
    beyond u.
    """

    max_steps: int
    step_size: float
    tol: float

    def solve(self, problem: ProjectionProblem) -> ProjectionResult:
        x, gamma = problem.params, self.step_size
        evaluation = problem.start()
        initial = math.inf
        moves = 0
        unchecked = False  # an r was not reduced: a non-finite one is found later
        while True:
            residual = problem.grads  # r = u + m g, in place
            seat_scale = problem.offset_scale  # s while u = s g is not formed
            decides = self.tol > 0 or moves in (0, self.max_steps - 1)  # tol 0: K iterations
            if seat_scale is not None:  # at θ with u = s g: r = (s + m) g, not formed
                factor = seat_scale + evaluation.mismatch
                norm, along = abs(factor) * math.sqrt(evaluation.values[0]), -gamma * factor
            elif decides:  # ‖r‖² is also the check that the gradient is finite
                terms = _residual(residual, problem.offset, evaluation.mismatch)
                norm, along = math.sqrt(to_host([terms])[0]), -gamma
            else:  # tol 0, between the first iteration and the last: ‖r‖ decides nothing
                _form_residual(residual, problem.offset, evaluation.mismatch)
                norm, along, unchecked = math.nan, -gamma, True
            if decides and not math.isfinite(norm):
                where = "at or before" if unchecked else "at"
                raise NonFinite(f"non-finite gradient {where} closure call {problem.calls}")
            initial = norm if moves == 0 else initial
            if decides and norm <= self.tol * initial:
                return ProjectionResult(moves, initial, norm)
            moves += 1
            if moves == self.max_steps:  # u is not needed after the last move
                torch._foreach_add_(x, residual, alpha=along)
                return ProjectionResult(moves - 1, initial, norm, blind_step=True)
            if seat_scale is not None:  # u − γ r = (s − γ(s + m)) g
                problem.seat_offset(seat_scale + along)
                torch._foreach_add_(x, residual, alpha=along)
            else:
                _move(x, problem.offset, residual, along)
            del residual
            evaluation = problem.evaluate(_no_reductions)


@dataclass
class _Point:
    """An evaluated point as the Anderson solver sees it: m, ‖g‖², ⟨g, u⟩, ‖u‖²."""

    mismatch: float
    grad_sq: float
    grad_offset: float
    offset_sq: float

    @property
    def phi(self) -> float:
        """φ = ½(‖u‖² + m²) (`rollingball.spec.phi`)."""
        return spec.phi(self.offset_sq, self.mismatch)

    @property
    def newton_shift(self) -> float:
        """c in p = u + c g (`rollingball.spec.newton_shift`)."""
        return spec.newton_shift(self.mismatch, self.grad_offset, self.grad_sq)

    def newton_products(self) -> tuple[float, float]:
        """⟨u, p⟩ = ‖u‖² + c⟨g, u⟩ and ⟨g, p⟩ = ⟨g, u⟩ + c‖g‖², from the host scalars."""
        c = self.newton_shift
        return self.offset_sq + c * self.grad_offset, self.grad_offset + c * self.grad_sq

    def residual_norm(self, newton_sq: float) -> float:
        """‖r‖ from ‖p‖² without cancellation (`rollingball.spec.residual_sq`)."""
        sq = spec.residual_sq(max(newton_sq, 0.0), self.mismatch, self.grad_offset, self.grad_sq)
        return math.sqrt(sq)


@dataclass
class AndersonProjection:
    """Anderson-accelerated Gauss–Newton iteration, with a safeguard and a blind last step.

    φ is a least-squares problem whose Gauss–Newton matrix is I + g gᵀ, so the fixed-point
    map is G(x) = x − γ p(x), p = (I + g gᵀ)⁻¹ r = u + c g. One such step from θ is exactly
    the gradient step θ − η g (and the exact projection for an affine f). With the last m
    differences ΔX_j = x_{j+1} − x_j and D_j = p_{j+1} − p_j,
        α = argmin_α ‖p_k − D α‖,   x_{k+1} = x_k − ΔX α − γ (p_k − D α).
    Safeguard: a trial point with φ(x_{k+1}) > φ(x_k) (beyond round-off) is rejected; the solver
    goes back to x_k, forgets its history and takes the plain step x_k − γ p_k. A rejected
    plain step shrinks γ by backtracking: the quadratic in t through φ(x_k), the slope
    ⟨r, δ⟩ and φ(x_k + δ) is least at t*, and γ ← γ·t*, t* kept within `backtrack` (0.1, 0.5)
    (`_shrink`). φ never increases over evaluated points: the solver descends to a local
    minimum of φ, never to a saddle, and a step is never worse in φ than not moving.

    Budget: K evaluations, plus one for each rejected trial point up to `extension` (2): a
    rejection does not use up a budget that would otherwise leave the ball where it was (with
    K = 2 and γ halved, both trial points were rejected on 7 of 8 steps of a He-initialised
    ReLU MLP: `benchmarks/bench_relu_stall.py --rule halving`). At most K + `extension` calls.

    Blind last step: after the budget's last evaluation, if the residual is still above the
    tolerance and that trial point was accepted, the next step δ is taken unevaluated when
    (1) the Gauss–Newton model of φ predicted the last step δ_last well: the observed φ within
    `trust`·(predicted decrease) of the model's φ̂ (to first order the relative error is ρλ,
    the ball against the curvature along the step); (2) the iteration contracts:
    ‖δ‖ ≤ `contraction`·‖δ_last‖; and (3) the model, charged twice the last step's model
    error scaled by ‖δ‖/‖δ_last‖, still predicts that φ decreases.

    Stops when ‖r(x)‖ ≤ tol·‖r(θ)‖. Two host synchronisations per evaluated trial point.
    Extra memory at the peak: 2m + 1 parameter-sized buffers (p, m differences of each kind,
    the step being built), besides the two every step holds (the snapshot and u).
    """

    max_steps: int
    step_size: float
    tol: float
    memory: int
    regularization: float = ANDERSON_REGULARIZATION
    trust: float = ANDERSON_TRUST
    contraction: float = ANDERSON_CONTRACTION
    backtrack: tuple[float, float] = ANDERSON_BACKTRACK
    extension: int = ANDERSON_EXTENSION

    def _budget(self, safeguards: int) -> int:
        """K evaluations, and one more for each rejected trial point, up to `extension`."""
        return self.max_steps + min(safeguards, self.extension)

    def solve(self, problem: ProjectionProblem) -> ProjectionResult:
        state = self._start(problem)
        while state.norm > self.tol * state.initial:
            if state.calls == self._budget(state.safeguards):  # the budget is spent
                self._blind_step(state)
                break
            self._trial(state)
        workspace = problem.workspace
        if state.newton is not None:
            workspace.give(state.newton)
        state.history.clear(workspace)
        return ProjectionResult(
            state.calls, state.initial, state.norm, state.safeguards, state.blind
        )

    def _start(self, problem: ProjectionProblem) -> _Solve:
        """The state at x₀ = θ: p₀ = u + c g and ‖r(θ)‖ from ‖p₀‖² (one pass, one
        synchronisation), or, while u = s g is not formed, p₀ = (s + c) g left unformed with
        ‖p₀‖² = (s + c)²‖g‖² from host numbers."""
        point = self._point(problem.start())
        history = _History()
        seat_scale = problem.offset_scale
        newton: list[Tensor] | None
        if seat_scale is None:
            newton, newton_sq = _newton(
                problem.workspace, problem.offset, problem.grads, point.newton_shift
            )
            factor = math.nan
        else:  # u = s g: p = (s + c) g, and ‖p‖² = (s + c)²‖g‖² without a pass
            factor = seat_scale + point.newton_shift
            newton = None
            newton_sq = torch.tensor([factor * factor * point.grad_sq], dtype=torch.float64)
        norm, products = self._reduce(problem, point, [newton_sq], history, [], False)
        return _Solve(
            problem,
            point,
            initial=norm,
            norm=norm,
            products=products,
            newton=newton,
            step_size=self.step_size,
            history=history,
            seat_scale=seat_scale,
            factor=factor,
        )

    def _blind_step(self, state: _Solve) -> None:
        """After the budget's last evaluation: the step its point leads to, taken unevaluated
        when the blind rules (see the class doc) hold."""
        problem = state.problem
        model_error = self._last_prediction(problem, state.previous, state.point, state.check)
        if model_error is None:  # no pass is spent on a step refused already
            return
        step = self._step(
            problem.workspace,
            state.newton,
            state.history,
            state.products,
            state.step_size,
            state.point,
        )
        newton_sq = state.products[0]
        state.blind = self._blind_is_safe(
            problem, state.point, state.check, step, newton_sq, model_error
        )
        if state.blind:  # u is not needed after the last move
            step.move(problem.params)
        step.release(problem.workspace)

    def _trial(self, state: _Solve) -> None:
        """One trial point x_k + δ, evaluated (one closure call), then accepted or rejected."""
        problem = state.problem
        accelerated = bool(state.history.x_steps)  # before the step drops the oldest difference
        step = self._step(
            problem.workspace, state.newton, state.history, state.products, state.step_size
        )
        # the budget's last trial point decides the blind step: it needs ⟨g, δ⟩ and ‖δ‖²
        last = state.calls + 1 == self._budget(state.safeguards) and state.fresh
        along = step.along(problem, state.point, state.products[0]) if last else ([], [])
        step, offset_sq = self._move(state, step)
        evaluation = problem.evaluate(self._reductions(problem, along[0], offset_sq))
        trial = self._point(evaluation, offset_sq)
        state.calls += 1
        if trial.phi > state.point.phi + problem.phi_noise(trial.mismatch, trial.phi):
            self._reject(state, step, trial.phi, accelerated)
        else:
            check = along[1] or evaluation.values[3 if offset_sq is None else 2 :]
            self._accept(state, step, trial, check)

    @staticmethod
    def _move(state: _Solve, step: _Step) -> tuple[_Step, float | None]:
        """x += δ and u += δ. The first, plain step from θ while u = s g is not formed moves
        along g: x − γ(s + c) g, u = (s − γ(s + c)) g, with p₀ = ratio · u kept unformed where
        the dtype's range allows (`WIDE_RANGE`). Returns the step (p₀ formed or not) and ‖u‖²
        at the trial point when it is known without a pass (= s²‖g‖², as φ(θ)'s)."""
        problem = state.problem
        if state.seat_scale is None:
            step.move(problem.params, problem.offset)
            return step, None
        seated = state.seat_scale + step.scale * state.factor
        state.ratio = state.factor / seated if seated != 0 else math.inf
        if not (math.isfinite(state.ratio) and _wide_range(problem.params)):
            state.newton = problem.workspace.scaled(problem.grads, state.factor)  # p₀ ≠ ratio · u
            step = _Step(state.newton, step.scale)
        torch._foreach_add_(problem.params, problem.grads, alpha=step.scale * state.factor)
        problem.seat_offset(seated)
        state.seat_scale = None
        return step, seated * seated * state.point.grad_sq

    def _reject(self, state: _Solve, step: _Step, rejected_phi: float, accelerated: bool) -> None:
        """Safeguard: back to x_k, the history forgotten; a rejected plain step shrinks γ."""
        problem, workspace = state.problem, state.problem.workspace
        if state.newton is None:  # the plain step from θ, to be undone: form p₀ = ratio · u
            state.newton = workspace.scaled(problem.offset, state.ratio)
            step = _Step(state.newton, step.scale)
        step.move(problem.params, problem.offset, -1.0)  # rejected: back to x_k
        step.release(workspace)
        state.history.clear(workspace)
        state.safeguards += 1
        if not accelerated:
            newton_sq = state.products[0]
            state.step_size *= self._shrink(state.point, newton_sq, rejected_phi, state.step_size)
        state.previous, state.products, state.fresh = None, state.products[:1], False

    def _accept(self, state: _Solve, step: _Step, trial: _Point, check: list[float]) -> None:
        """x_{k+1} = the trial point: p_{k+1} and D_k = p_{k+1} − p_k (in place of p_k, one
        pass), the step kept as ΔX_k, and ‖r‖ with the new Gram row in one synchronisation."""
        problem = state.problem
        newton, difference, pass_terms = _newton_difference(
            problem.workspace,
            state.newton,
            problem.offset,
            problem.grads,
            trial.newton_shift,
            state.ratio,
        )
        state.history.append(step.kept(), difference)
        state.check = check
        state.previous, state.point, state.newton = state.point, trial, newton
        state.fresh = True
        blind_next = (  # the blind rule will want ⟨g, D_i⟩ (rule 1 holds)
            state.calls == self._budget(state.safeguards)
            and state.history.multiples_of_p()
            and self._last_prediction(problem, state.previous, state.point, check) is not None
        )
        state.norm, state.products = self._reduce(
            problem, state.point, pass_terms, state.history, newton, blind_next
        )

    def _shrink(self, point: _Point, newton_sq: float, rejected: float, gamma: float) -> float:
        """The factor on γ after a rejected plain step δ = −γ p. Along x_k + t δ, φ is known at
        t = 0 with slope d = ⟨r, δ⟩ = −γ(‖p‖² + ⟨g, p⟩²) (r = (I + g gᵀ) p) and at t = 1; the
        quadratic through them is least at t* = −d / (2(φ(1) − φ(0) − d)), which is below ½
        since φ(1) > φ(0); kept within `backtrack` (backtracking by quadratic interpolation)."""
        _, grad_newton = point.newton_products()
        slope = -gamma * (max(newton_sq, 0.0) + grad_newton**2)
        return spec.backtrack_factor(slope, rejected - point.phi, self.backtrack)

    @staticmethod
    def _reductions(
        problem: ProjectionProblem, along: list[Tensor], offset_sq: float | None
    ) -> Reductions:
        """‖g‖², ⟨g, u⟩ and ‖u‖² (unless `offset_sq` knows it) at the new point, with the
        device reductions `along`."""
        offset, known = problem.offset, offset_sq is not None
        return lambda grads: [*_products(grads, offset, known), *along]

    @staticmethod
    def _point(evaluation: Evaluation, offset_sq: float | None = None) -> _Point:
        """The point of an evaluation whose values begin ‖g‖², ⟨g, u⟩, then ‖u‖² unless
        `offset_sq` gives it."""
        grad_sq, grad_offset = evaluation.values[:2]
        if offset_sq is None:
            offset_sq = evaluation.values[2]
        return _Point(evaluation.mismatch, grad_sq, grad_offset, offset_sq)

    @staticmethod
    def _reduce(
        problem: ProjectionProblem,
        point: _Point,
        pass_terms: list[Tensor],
        history: _History,
        newton: list[Tensor],
        blind_next: bool,
    ) -> tuple[float, list[float]]:
        """One synchronisation: ‖p‖², the new Gram row ⟨D_i, D_new⟩ and the right-hand side
        ⟨D_i, p⟩. `pass_terms` holds the terms of ‖p‖², and with a history of ‖D_new‖² and
        ⟨D_new, p⟩, from the pass that formed them; the older D_i's products come here.
        Before a blind step that is a combination of p and the D's, also ⟨g, D_i⟩, and
        ⟨u, D_i⟩ = ⟨D_i, p⟩ − c⟨g, D_i⟩ from it (p = u + c g; kept in the history), from which
        the blind rule's products follow.
        Returns (‖r‖, [‖p‖², *right-hand side])."""
        older = history.d_steps[:-1]
        values = list(pass_terms)
        if older:
            last = history.d_steps[-1]
            values += [inner_device(d, last) for d in older]
            values += [inner_device(d, newton) for d in older]
        if blind_next:
            values += [inner_device(problem.grads, d) for d in history.d_steps]
        host = to_host(values)
        if blind_next:
            kept = len(history.d_steps)
            history.grad_d = host[len(host) - kept :]
            host = host[: len(host) - kept]
        norm = point.residual_norm(host[0])
        if not math.isfinite(norm):
            raise NonFinite("non-finite projection residual")
        if not history.d_steps:
            return norm, [host[0]]
        size = len(older)
        history.add_gram_row([*host[3 : 3 + size], host[1]])
        newton_d = [*host[3 + size :], host[2]]  # ⟨D_i, p⟩, oldest first
        if blind_next:  # p = u + c g: ⟨u, D_i⟩ = ⟨D_i, p⟩ − c⟨g, D_i⟩, no pass over u
            shift = point.newton_shift
            history.offset_d = [
                d_p - shift * g_d for d_p, g_d in zip(newton_d, history.grad_d, strict=True)
            ]
        return norm, [host[0], *newton_d]

    def _step(
        self,
        workspace: Workspace,
        newton: list[Tensor] | None,
        history: _History,
        products: list[float],
        step_size: float,
        blind_at: _Point | None = None,
    ) -> _Step:
        """δ = −ΔX α − γ (p − D α), α from the regularised normal equations of ‖p − D α‖.

        A difference kept as a multiple of its p, ΔX_j = β_j p_j = β_j (p − Σ_{i≥j} D_i),
        contributes through p and the D's; δ is kept as the multiple β p while its D terms
        cancel (the plain step −γ p, and the accelerated step after it, −γ(1 − α) p). The blind
        step from `blind_at`, when every ΔX is such a multiple, is kept as the combination
        β p + Σ c_i D_i with its ⟨u, δ⟩, ⟨g, δ⟩ and ‖δ‖² from host numbers (`_History.offset_d`)."""
        if not history.d_steps:  # the plain step (from θ, p₀ may be unformed: newton None)
            return _Step(newton, -float(step_size))
        assert newton is not None  # a difference was formed from it
        alpha = self._coefficients(history.gram, products[1:])
        on_p = -float(step_size)  # the coefficient of p
        on_d = []  # the coefficient of each D_i, oldest first
        from_multiples = 0.0  # Σ_{j ≤ i} α_j β_j over the differences kept as multiples of p
        for a, dx in zip(alpha, history.x_steps, strict=True):
            if isinstance(dx, float):
                from_multiples += a * dx
            on_d.append(step_size * a + from_multiples)
        on_p -= from_multiples
        kept = [
            (a, dx) for a, dx in zip(alpha, history.x_steps, strict=True) if isinstance(dx, list)
        ]
        differences = list(history.d_steps)
        if blind_at is not None and not kept and history.offset_d:
            return self._combination(newton, history, products, blind_at, on_p, on_d)
        oldest = history.pop_oldest() if len(differences) == self.memory else None
        if not kept and all(c == 0 for c in on_d):
            if oldest is not None:
                workspace.give(oldest[1])
            return _Step(newton, on_p)
        if oldest is not None and isinstance(oldest[0], list):  # δ in the oldest ΔX's buffer
            buffer = oldest[0]
            scale_(buffer, -kept.pop(0)[0])
            add_(buffer, newton, on_p)
        else:
            buffer = workspace.scaled(newton, on_p)
        for a, dx in kept:
            add_(buffer, dx, -a)
        for c, d in zip(on_d, differences, strict=True):
            if c != 0:
                add_(buffer, d, c)
        if oldest is not None:
            workspace.give(oldest[1])
        return _Step(newton, 1.0, buffer)

    def _coefficients(self, gram: list[list[float]], newton_d: list[float]) -> list[float]:
        """α = (G + εI)⁻¹⟨D, p⟩, G the Gram matrix of the D's, ε = `regularization`·max
        G_ii; one difference (m = 1) by a division, which is what the 1 × 1 solve does."""
        ridge = self.regularization * max(row[i] for i, row in enumerate(gram)) + RIDGE_FLOOR
        if len(gram) == 1:
            return [newton_d[0] / (gram[0][0] + ridge)]
        rhs = np.array(newton_d, dtype=np.float64)
        matrix = np.array(gram, dtype=np.float64) + ridge * np.eye(len(rhs))
        return np.linalg.solve(matrix, rhs).tolist()

    @staticmethod
    def _combination(
        newton: list[Tensor],
        history: _History,
        products: list[float],
        point: _Point,
        on_p: float,
        on_d: list[float],
    ) -> _Step:
        """δ = β p + Σ c_i D_i, not formed: ⟨u, δ⟩ = β⟨u, p⟩ + Σ c_i⟨u, D_i⟩, ⟨g, δ⟩ likewise,
        ‖δ‖² = β²‖p‖² + 2β Σ c_i⟨D_i, p⟩ + Σ c_i c_j⟨D_i, D_j⟩ (`_Point.newton_products`)."""
        offset_newton, grad_newton = point.newton_products()
        offset_step = on_p * offset_newton
        offset_step += sum(k * v for k, v in zip(on_d, history.offset_d, strict=True))
        grad_step = on_p * grad_newton
        grad_step += sum(k * v for k, v in zip(on_d, history.grad_d, strict=True))
        step_sq = on_p * on_p * products[0]
        step_sq += 2 * on_p * sum(k * v for k, v in zip(on_d, products[1:], strict=True))
        step_sq += sum(
            ki * kj * history.gram[i][j] for i, ki in enumerate(on_d) for j, kj in enumerate(on_d)
        )
        terms = [(k, d) for k, d in zip(on_d, history.d_steps, strict=True) if k != 0]
        return _Step(newton, on_p, terms=terms, known=(offset_step, grad_step, max(step_sq, 0.0)))

    def _last_prediction(
        self, problem: ProjectionProblem, before: _Point | None, point: _Point, check: list[float]
    ) -> float | None:
        """Rule (1) of the blind step, from host numbers alone: on the last step, from x_{k−1}
        to x_k, the Gauss–Newton model predicted φ̂ = ½‖u_k‖² + ½(m_{k−1} + ⟨g_{k−1}, δ_last⟩)²;
        the model's error |φ(x_k) − φ̂| when it is within `trust`·(φ(x_{k−1}) − φ̂), else None
        (no blind step, and no pass spent on one; None too without an accepted last step)."""
        if before is None or not check:
            return None
        linear, _ = check
        predicted = 0.5 * point.offset_sq + 0.5 * (before.mismatch + linear) ** 2
        decrease = before.phi - predicted
        error = abs(point.phi - predicted)
        noise = problem.phi_noise(point.mismatch, point.phi)
        return error if decrease > noise and error <= self.trust * decrease else None

    def _blind_is_safe(
        self,
        problem: ProjectionProblem,
        point: _Point,
        check: list[float],
        step: _Step,
        newton_sq: float,
        model_error: float,
    ) -> bool:
        """Rules (2) and (3) of the blind step (see the class doc), after rule (1) gave the
        model's error on the last step (`_last_prediction`). At x_k the model predicts for the
        blind step φ_GN = ½‖u + δ‖² + ½(m + ⟨g, δ⟩)². For δ = β p + Σ c_i D_i its products come
        from host numbers (`_Step.products`); a formed δ costs one host synchronisation.
        """
        last_sq = check[1]
        offset_step, grad_step, step_sq = step.products(problem, point, newton_sq)
        if step_sq > (self.contraction**2) * last_sq:
            return False
        model = 0.5 * (point.offset_sq + 2 * offset_step + step_sq)
        model += 0.5 * (point.mismatch + grad_step) ** 2
        # the model's error on the last step, scaled by the step length, with a margin of 2
        error = 2 * model_error * math.sqrt(step_sq / last_sq)
        return model + error < point.phi


@dataclass
class _Step:
    """A step δ: `scale` times the current p plus Σ c_i D_i over `terms` (`buffer` None: no
    pass to form it), or the parameter-sized `buffer` (scale 1). `known` holds ⟨u, δ⟩, ⟨g, δ⟩
    and ‖δ‖² when they were found on the host. `newton` is None for the plain step from θ
    while p₀ is not formed (`AndersonProjection._move` moves along g then)."""

    newton: list[Tensor] | None
    scale: float
    buffer: list[Tensor] | None = None
    terms: list[tuple[float, list[Tensor]]] = field(default_factory=list)
    known: tuple[float, float, float] | None = None

    def move(self, x: list[Tensor], u: list[Tensor] | None = None, alpha: float = 1.0) -> None:
        """x += α δ, and u += α δ when given (one pass for both). A combination's D terms move
        x alone: it is only ever the blind step, after which u is not needed."""
        assert u is None or not self.terms
        vector, scale = (self.newton, self.scale) if self.buffer is None else (self.buffer, 1.0)
        assert vector is not None, "p₀ is formed before the step from θ moves as a vector"
        if u is None:
            torch._foreach_add_(x, vector, alpha=alpha * scale)
        else:
            _move(x, u, vector, alpha * scale)
        for c, d in self.terms:
            torch._foreach_add_(x, d, alpha=alpha * c)

    def products(
        self, problem: ProjectionProblem, point: _Point, newton_sq: float
    ) -> tuple[float, float, float]:
        """⟨u, δ⟩, ⟨g, δ⟩ and ‖δ‖² at the point δ starts from; for δ = β p from host values:
        ⟨u, p⟩ = ‖u‖² + c⟨g, u⟩, ⟨g, p⟩ = ⟨g, u⟩ + c‖g‖², ‖p‖² known."""
        if self.known is not None:
            return self.known
        if self.buffer is None:
            offset_newton, grad_newton = point.newton_products()
            return self.scale * offset_newton, self.scale * grad_newton, self.scale**2 * newton_sq
        offset_step, grad_step, step_sq = to_host(
            [
                inner_device(problem.offset, self.buffer),
                inner_device(problem.grads, self.buffer),
                squared_norm_device(self.buffer),
            ]
        )
        return offset_step, grad_step, step_sq

    def kept(self) -> list[Tensor] | float:
        """δ as the history keeps it once p has moved on: the buffer, or β with δ = β p (a
        combination is only ever a blind step, never kept)."""
        assert not self.terms
        return self.scale if self.buffer is None else self.buffer

    def release(self, workspace: Workspace) -> None:
        if self.buffer is not None:
            workspace.give(self.buffer)

    def along(
        self, problem: ProjectionProblem, point: _Point, newton_sq: float
    ) -> tuple[list[Tensor], list[float]]:
        """⟨g, δ⟩ and ‖δ‖² at the point δ starts from: device reductions to go with the next
        evaluation, or, for δ = β p, host values (⟨g, p⟩ = ⟨g, u⟩ + c‖g‖², ‖p‖² known)."""
        if self.buffer is None:
            _, grad_step, step_sq = self.products(problem, point, newton_sq)
            return [], [grad_step, step_sq]
        return [inner_device(problem.grads, self.buffer), squared_norm_device(self.buffer)], []


class _History:
    """The last differences ΔX_j, D_j and their Gram matrix ⟨D_i, D_j⟩ (the new row comes
    with the solver's synchronisation)."""

    def __init__(self) -> None:
        self.x_steps: list[list[Tensor] | float] = []  # a float β: ΔX_j = β p_j
        self.d_steps: list[list[Tensor]] = []
        self.gram: list[list[float]] = []
        self.offset_d: list[float] = []  # ⟨u, D_i⟩ and ⟨g, D_i⟩ before a blind step
        self.grad_d: list[float] = []

    def multiples_of_p(self) -> bool:
        """Whether every kept ΔX is a multiple of its p (then δ needs only p and the D's)."""
        return all(isinstance(dx, float) for dx in self.x_steps)

    def append(self, dx: list[Tensor] | float, d: list[Tensor]) -> None:
        self.x_steps.append(dx)
        self.d_steps.append(d)

    def add_gram_row(self, products: list[float]) -> None:
        """⟨D_i, D_new⟩ for every kept D_i, the new one last."""
        for row, product in zip(self.gram, products, strict=False):
            row.append(product)
        self.gram.append(list(products))

    def pop_oldest(self) -> tuple[list[Tensor] | float, list[Tensor]]:
        del self.gram[0]
        for row in self.gram:
            del row[0]
        return self.x_steps.pop(0), self.d_steps.pop(0)

    def clear(self, workspace: Workspace) -> None:
        """Forget every difference; their buffers go back to the workspace."""
        for buffers in self.x_steps + self.d_steps:
            if isinstance(buffers, list):
                workspace.give(buffers)
        self.x_steps.clear()
        self.d_steps.clear()
        self.gram.clear()
        self.offset_d, self.grad_d = [], []


@dataclass
class _Solve:
    """One Anderson projection's state, carried from trial point to trial point."""

    problem: ProjectionProblem
    point: _Point  # x_k, the last accepted point
    initial: float  # ‖r(θ)‖
    norm: float  # ‖r(x_k)‖
    products: list[float]  # ‖p_k‖², then ⟨D_i, p_k⟩ oldest first
    newton: list[Tensor] | None  # p_k; None: p₀ = ratio · u (or (s + c) g), unformed
    step_size: float  # γ, shrunk by rejected plain steps
    history: _History
    seat_scale: float | None  # s while u = s g at θ is not formed (`problem.offset_scale`)
    factor: float  # s + c₀ while u = s g: p₀ = (s + c₀) g
    ratio: float = math.nan  # p₀ = ratio · u after the first move, while `newton` is None
    calls: int = 0  # evaluated trial points
    safeguards: int = 0  # rejected trial points
    blind: bool = False  # the blind last step was taken
    previous: _Point | None = None  # the point before the last accepted trial
    check: list[float] = field(default_factory=list)  # ⟨g, δ⟩, ‖δ‖² of the last step
    fresh: bool = True  # problem.grads is g at x_k (after a rejection: at the rejected point)


def make_solver(
    name: str, max_steps: int, step_size: float, tol: float, memory: int
) -> GradientDescentProjection | AndersonProjection:
    """The projection solver called `name` ("anderson" or "gd")."""
    if name == "gd":
        return GradientDescentProjection(max_steps, step_size, tol)
    if name == "anderson":
        return AndersonProjection(max_steps, step_size, tol, memory)
    raise ValueError(f"unknown projection solver {name!r}; choose one of {SOLVERS}")
