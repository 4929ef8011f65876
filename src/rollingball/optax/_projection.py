"""The projection θ ← argmin_x φ(x), φ(x) = ½‖x − θ̃‖² + ½(f(x) − ỹ)², by the gd and the
Anderson solvers inside `jax.lax.while_loop` (`rollingball.optim.projection`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rollingball import spec
from rollingball.optax._tree import (
    combine,
    inner,
    ring_inners,
    ring_like,
    ring_put,
    ring_sum,
    slot,
)
from rollingball.spec import (
    ANDERSON_BACKTRACK,
    ANDERSON_CONTRACTION,
    ANDERSON_EXTENSION,
    ANDERSON_REGULARIZATION,
    ANDERSON_TRUST,
    RIDGE_FLOOR,
    phi_noise,
)


class Problem:
    """The projection problem: evaluations at x, with u = x − θ̃ kept alongside.

    The height mismatch is m = f(x) − ỹ = (f(x) − f(θ)) − h with h = ỹ − f(θ) = ρ/s − η⟨g, v⟩;
    the residual is r = ∇φ = u + m ∇f.
    """

    def __init__(
        self,
        landscape: Callable[[Any], tuple[jax.Array, Any]],
        params: Any,
        start_value: jax.Array,
        lift: jax.Array,
        acc: Any,
        eps: Any,
    ) -> None:
        self.landscape = landscape
        self.params = params
        self.start_value = start_value
        self.lift = lift
        self.acc = acc
        self.eps = eps

    def evaluate(self, x: Any) -> tuple[jax.Array, Any, jax.Array, jax.Array]:
        """One call of value_fn at x: (m, ∇f, ‖∇f‖², non-finite loss or gradient)."""
        value, grad = self.landscape(x)
        grad_sq = inner(grad, grad, self.acc)
        bad = ~jnp.isfinite(value) | ~jnp.isfinite(grad_sq)
        return (value - self.start_value) - self.lift, grad, grad_sq, bad

    def phi_noise(self, mismatch: jax.Array, phi: jax.Array) -> jax.Array:
        """φ's round-off level (`rollingball.spec.phi_noise`)."""
        return phi_noise(mismatch, phi, self.start_value, self.lift, self.eps, jnp.abs)


class Outcome(NamedTuple):
    """Evaluated trial points, residual norms at θ and at the last evaluated point, rejected
    trial points, whether a blind last step was taken, a non-finite value, and whether the
    step left θ (a trial point accepted or a blind step taken; at radius 0, a nonzero step)."""

    steps: jax.Array
    initial_norm: jax.Array
    final_norm: jax.Array
    safeguard_steps: jax.Array
    blind_step: jax.Array
    bad: jax.Array
    moved: jax.Array


# --- the authors' scheme ---


def gd_projection(
    problem: Problem,
    offset: Any,
    grad: Any,
    start_bad: jax.Array,
    max_steps: int,
    step_size: float,
    tol: float,
) -> tuple[Any, Outcome]:
    """The authors' scheme x ← x − γ r(x), r = u + m ∇f, K iterations from x₀ = θ
    (`rollingball.optim.projection.GradientDescentProjection`); returns (x − θ, outcome).

    r(θ) is free and the K-th iteration is taken blind: at most K calls of value_fn per step,
    the caller's included. With tol > 0 it stops when ‖r(x)‖ ≤ tol·‖r(θ)‖; with tol = 0 ‖r‖
    only decides at θ and at the last evaluated point, as in the torch solver.
    """
    acc = problem.acc
    zero = jnp.zeros((), jnp.int32)

    def residual(mismatch: jax.Array, grad: Any, offset: Any) -> tuple[Any, jax.Array]:
        r = combine((mismatch, grad), (1, offset))
        return r, jnp.sqrt(inner(r, r, acc))

    r, initial = residual(-problem.lift, grad, offset)
    bad = start_bad | ~jnp.isfinite(initial)

    def cond(carry: tuple[Any, ...]) -> jax.Array:
        _, _, _, norm, moves, bad = carry
        going = norm > tol * initial if tol > 0 else initial > 0
        return (moves < max_steps - 1) & going & ~bad

    def body(carry: tuple[Any, ...]) -> tuple[Any, ...]:
        x, offset, r, _, moves, _ = carry
        x = combine((1, x), (-step_size, r))
        offset = combine((1, offset), (-step_size, r))
        mismatch, grad, _, bad = problem.evaluate(x)
        r, norm = residual(mismatch, grad, offset)
        return x, offset, r, norm, moves + 1, bad | ~jnp.isfinite(norm)

    carry = (problem.params, offset, r, initial, zero, bad)
    x, _, r, norm, moves, bad = jax.lax.while_loop(cond, body, carry)
    blind = (moves == max_steps - 1) & (norm > tol * initial) & ~bad
    displacement = combine((1, x), (-1, problem.params), (jnp.where(blind, -step_size, 0), r))
    return displacement, Outcome(moves, initial, norm, zero, blind, bad, (moves > 0) | blind)


# --- Anderson ---


class _Point(NamedTuple):
    """An evaluated point as the Anderson solver sees it: m, ‖∇f‖², ⟨∇f, u⟩, ‖u‖²."""

    mismatch: jax.Array
    grad_sq: jax.Array
    grad_offset: jax.Array
    offset_sq: jax.Array

    @property
    def phi(self) -> jax.Array:
        """φ = ½(‖u‖² + m²) (`rollingball.spec.phi`)."""
        return spec.phi(self.offset_sq, self.mismatch)

    @property
    def newton_shift(self) -> jax.Array:
        """c in p = u + c g (`rollingball.spec.newton_shift`)."""
        return spec.newton_shift(self.mismatch, self.grad_offset, self.grad_sq)

    def residual_norm(self, newton_sq: jax.Array) -> jax.Array:
        """‖r‖ from ‖p‖² without cancellation (`rollingball.spec.residual_sq`)."""
        positive = jnp.maximum(newton_sq, 0)
        return jnp.sqrt(spec.residual_sq(positive, self.mismatch, self.grad_offset, self.grad_sq))


def _newton(point: _Point, offset: Any, grad: Any) -> Any:
    """p = u + c g, the Gauss–Newton direction at `point`."""
    return combine((1, offset), (point.newton_shift, grad))


class _History(NamedTuple):
    """The last m accepted steps ΔX_j and differences D_j = p_{j+1} − p_j in a ring of m
    slots, their Gram matrix G_ij = ⟨D_i, D_j⟩, the live slots and the oldest one."""

    x_steps: Any
    d_steps: Any
    gram: jax.Array
    valid: jax.Array
    head: jax.Array


class _Carry(NamedTuple):
    """The Anderson loop's state at x_k (the current accepted point)."""

    calls: jax.Array  # evaluations of value_fn so far
    safeguards: jax.Array  # rejected trial points so far
    gamma: jax.Array  # γ, shrunk by rejected plain steps
    step: Any  # δ, the next trial step from x_k
    x: Any  # x_k
    offset: Any  # u_k = x_k − θ̃
    grad: Any  # ∇f(x_k)
    point: _Point  # x_k's scalars
    norm: jax.Array  # ‖r(x_k)‖
    newton_sq: jax.Array  # ‖p_k‖²
    history: _History
    before: _Point  # x_{k−1}'s scalars, for the blind-step rule
    has_before: jax.Array  # the step to x_k did not follow a rejection
    fresh: jax.Array  # the last trial point was accepted
    check: jax.Array  # [⟨g_{k−1}, δ_last⟩, ‖δ_last‖²]
    bad: jax.Array  # a non-finite value was met


class _Anderson:
    """Anderson-accelerated Gauss–Newton iteration with a safeguard and a blind last step
    (`rollingball.optim.projection.AndersonProjection`).

    p = u + c g; with the last m differences ΔX_j = x_{j+1} − x_j and D_j = p_{j+1} − p_j,
        α = argmin ‖p_k − D α‖ (ridge 1e-10·max_j ‖D_j‖²),  x_{k+1} = x_k − ΔX α − γ (p_k − D α).
    A trial point with φ(x_{k+1}) > φ(x_k) + round-off is rejected: back to x_k, history
    cleared, and a rejected plain step shrinks γ by quadratic interpolation (`_backtrack`);
    each rejection adds one evaluation to the budget of K, up to `ANDERSON_EXTENSION`. After
    the budget's last evaluation the next step is taken unevaluated if the Gauss–Newton model
    predicted the last accepted step well (`_blind_is_safe`). The history is a ring of m
    slots; `valid` marks the live ones.
    """

    def __init__(
        self, problem: Problem, max_steps: int, step_size: float, tol: float, memory: int
    ) -> None:
        self.problem = problem
        self.acc = problem.acc
        self.max_steps = max_steps
        self.step_size = step_size
        self.tol = tol
        self.memory = memory

    def solve(
        self, offset: Any, grad: Any, grad_sq: jax.Array, start_bad: jax.Array
    ) -> tuple[Any, Outcome]:
        """Project from θ (u = offset, ∇f = grad); returns (x − θ, outcome)."""
        carry = self._start(offset, grad, grad_sq, start_bad)
        initial = carry.norm
        c = jax.lax.while_loop(lambda c: self._going(c, initial), self._iterate, carry)
        spent = c.calls == self._budget(c.safeguards)
        blind = spent & (c.norm > self.tol * initial) & c.has_before & ~c.bad
        blind = blind & _blind_is_safe(
            self.problem, c.before, c.point, c.check, c.offset, c.grad, c.step
        )
        displacement = combine(
            (1, c.x), (-1, self.problem.params), (blind.astype(self.acc), c.step)
        )
        moved = (c.calls > c.safeguards) | blind
        return displacement, Outcome(c.calls, initial, c.norm, c.safeguards, blind, c.bad, moved)

    def _start(self, offset: Any, grad: Any, grad_sq: jax.Array, start_bad: jax.Array) -> _Carry:
        """At θ: no history yet, the plain step −γ p₀."""
        acc, zero, memory = self.acc, jnp.zeros((), jnp.int32), self.memory
        start = _Point(
            -self.problem.lift, grad_sq, inner(grad, offset, acc), inner(offset, offset, acc)
        )
        p0 = _newton(start, offset, grad)
        newton_sq = inner(p0, p0, acc)
        initial = start.residual_norm(newton_sq)
        ring = ring_like(offset, memory)
        history = _History(
            ring, ring, jnp.zeros((memory, memory), acc), jnp.zeros((memory,), bool), zero
        )
        return _Carry(
            calls=zero,
            safeguards=zero,
            gamma=jnp.asarray(self.step_size, acc),
            step=combine((-self.step_size, p0)),
            x=self.problem.params,
            offset=offset,
            grad=grad,
            point=start,
            norm=initial,
            newton_sq=newton_sq,
            history=history,
            before=start,
            has_before=jnp.zeros((), bool),
            fresh=jnp.ones((), bool),
            check=jnp.zeros((2,), acc),
            bad=start_bad | ~jnp.isfinite(initial),
        )

    def _budget(self, safeguards: jax.Array) -> jax.Array:
        """K evaluations, plus one for each rejected trial point up to `ANDERSON_EXTENSION`."""
        return self.max_steps + jnp.minimum(safeguards, ANDERSON_EXTENSION)

    def _going(self, c: _Carry, initial: jax.Array) -> jax.Array:
        going = c.norm > self.tol * initial
        going = going & (c.calls < self._budget(c.safeguards))
        return going & ~c.bad

    def _iterate(self, c: _Carry) -> _Carry:
        """Evaluate the trial point x_k + δ; accept it (φ not raised beyond round-off) or go
        back to x_k; then the next trial step."""
        acc, point, step = self.acc, c.point, c.step
        p = _newton(point, c.offset, c.grad)
        # ⟨g, δ⟩ and ‖δ‖²: what the blind-step rule checks if this is the last evaluation
        check = jnp.stack([inner(c.grad, step, acc), inner(step, step, acc)])
        trial_x = combine((1, c.x), (1, step))
        trial_offset = combine((1, c.offset), (1, step))
        mismatch, trial_grad, trial_grad_sq, bad = self.problem.evaluate(trial_x)
        trial = _Point(
            mismatch,
            trial_grad_sq,
            inner(trial_grad, trial_offset, acc),
            inner(trial_offset, trial_offset, acc),
        )
        reject = trial.phi > point.phi + self.problem.phi_noise(trial.mismatch, trial.phi)

        def pick(rejected: Any, accepted: Any) -> Any:
            return jax.tree.map(lambda a, b: jnp.where(reject, a, b), rejected, accepted)

        trial_p = _newton(trial, trial_offset, trial_grad)
        history = _remember(
            c.history, reject, step, combine((1, trial_p), (-1, p)), acc, self.memory
        )
        trial_newton_sq = inner(trial_p, trial_p, acc)
        norm = trial.residual_norm(trial_newton_sq)
        # a rejected plain step shrinks γ; a rejected accelerated one (any kept difference) not
        accelerated = c.history.valid.sum() > 0
        shrink = _backtrack(point, c.newton_sq, trial.phi, c.gamma)
        gamma = jnp.where(reject & ~accelerated, c.gamma * shrink, c.gamma)
        return _Carry(
            calls=c.calls + 1,
            safeguards=c.safeguards + reject.astype(jnp.int32),
            gamma=gamma,
            step=self._trial_step(pick(p, trial_p), history, gamma),
            x=pick(combine((1, trial_x), (-1, step)), trial_x),
            offset=pick(combine((1, trial_offset), (-1, step)), trial_offset),
            grad=pick(c.grad, trial_grad),
            point=pick(point, trial),
            norm=jnp.where(reject, c.norm, norm),
            newton_sq=jnp.where(reject, c.newton_sq, trial_newton_sq),
            history=history,
            before=pick(c.before, point),
            # the rule needs ⟨g, δ⟩ with g at x_k: not after a rejection, where the torch
            # solver holds the rejected point's gradient
            has_before=~reject & c.fresh,
            fresh=~reject,
            check=jnp.where(reject, c.check, check),
            bad=bad | (~reject & ~jnp.isfinite(norm)),
        )

    def _trial_step(self, p: Any, history: _History, gamma: jax.Array) -> Any:
        """δ = −ΔX α − γ (p − D α), α from the regularised normal equations of ‖p − D α‖:
        (DᵀD + ridge) α = Dᵀp; with no history the plain step −γ p."""
        acc, valid, gram = self.acc, history.valid, history.gram

        def accelerated() -> Any:
            rhs = ring_inners(history.d_steps, p, acc)
            diagonal = jnp.where(valid, jnp.diagonal(gram), -jnp.inf)
            ridge = ANDERSON_REGULARIZATION * diagonal.max() + _smallest(acc)
            both = valid[:, None] & valid[None, :]
            matrix = jnp.where(both, gram, 0) + jnp.diag(jnp.where(valid, ridge, 1))
            alpha = jnp.where(valid, jnp.linalg.solve(matrix, jnp.where(valid, rhs, 0)), 0)
            return jax.tree.map(
                lambda pi, dx, d: ring_sum(pi, -gamma, -alpha, dx, gamma * alpha, d),
                p,
                history.x_steps,
                history.d_steps,
            )

        return jax.lax.cond(valid.any(), accelerated, lambda: combine((-gamma, p)))


def anderson_projection(
    problem: Problem,
    offset: Any,
    grad: Any,
    grad_sq: jax.Array,
    start_bad: jax.Array,
    max_steps: int,
    step_size: float,
    tol: float,
    memory: int,
) -> tuple[Any, Outcome]:
    """The Anderson solver (`_Anderson`) from θ; returns (x − θ, outcome)."""
    solver = _Anderson(problem, max_steps, step_size, tol, memory)
    return solver.solve(offset, grad, grad_sq, start_bad)


def _remember(
    history: _History, reject: jax.Array, step: Any, difference: Any, acc: Any, memory: int
) -> _History:
    """Accepted: ΔX = δ and D = p_{k+1} − p_k go to the oldest slot, with their Gram row and
    column, and the slot turns live. Rejected: the slots stay and all turn dead."""
    head = history.head

    def pick(rejected: Any, accepted: Any) -> Any:
        return jax.tree.map(lambda a, b: jnp.where(reject, a, b), rejected, accepted)

    x_steps = ring_put(history.x_steps, head, pick(slot(history.x_steps, head), step))
    d_steps = ring_put(history.d_steps, head, pick(slot(history.d_steps, head), difference))
    products = ring_inners(d_steps, difference, acc)
    gram = history.gram.at[head, :].set(products).at[:, head].set(products)
    valid = history.valid
    return _History(
        x_steps,
        d_steps,
        jnp.where(reject, history.gram, gram),
        jnp.where(reject, jnp.zeros_like(valid), valid.at[head].set(True)),
        jnp.where(reject, head, (head + 1) % memory),
    )


def _blind_is_safe(
    problem: Problem, before: _Point, point: _Point, check: jax.Array, offset: Any, grad: Any,
    step: Any,
) -> jax.Array:  # fmt: skip
    """Trust the Gauss–Newton model for one more, unevaluated step δ.

    On the last step δ_last, from x_{k−1} to x_k, the model predicted
    φ̂ = ½‖u_k‖² + ½(m_{k−1} + ⟨g_{k−1}, δ_last⟩)²; at x_k it predicts for δ
    φ_GN = ½‖u + δ‖² + ½(m + ⟨g, δ⟩)². δ is taken when (1) |φ(x_k) − φ̂| ≤ trust·(φ(x_{k−1}) − φ̂),
    (2) ‖δ‖ ≤ contraction·‖δ_last‖ and (3) φ_GN + 2|φ(x_k) − φ̂|·‖δ‖/‖δ_last‖ < φ(x_k).
    Only when the step to x_k did not follow a rejected trial point.
    """
    acc = problem.acc
    linear, last_sq = check[0], check[1]
    predicted = 0.5 * point.offset_sq + 0.5 * (before.mismatch + linear) ** 2
    decrease = before.phi - predicted
    offset_step, grad_step = inner(offset, step, acc), inner(grad, step, acc)
    step_sq = inner(step, step, acc)
    model = 0.5 * (point.offset_sq + 2 * offset_step + step_sq)
    model = model + 0.5 * (point.mismatch + grad_step) ** 2
    # the model's error on the last step, scaled by the step length, with a margin of 2
    error = 2 * jnp.abs(point.phi - predicted) * jnp.sqrt(step_sq / last_sq)
    return (
        (decrease > problem.phi_noise(point.mismatch, point.phi))
        & (jnp.abs(point.phi - predicted) <= ANDERSON_TRUST * decrease)
        & (step_sq <= ANDERSON_CONTRACTION**2 * last_sq)
        & (model + error < point.phi)
    )


def _backtrack(point: _Point, newton_sq: jax.Array, rejected: jax.Array, gamma: jax.Array
               ) -> jax.Array:  # fmt: skip
    """The factor on γ after a rejected plain step δ = −γ p from `point`: the least point
    t* = −d / (2(φ(1) − φ(0) − d)) of the quadratic through φ(0), φ(1) and the slope
    d = ⟨r, δ⟩ = −γ(‖p‖² + ⟨g, p⟩²) along x + t δ, within [0.1, 0.5]
    (`rollingball.optim.projection.AndersonProjection._shrink`)."""
    grad_newton = point.grad_offset + point.newton_shift * point.grad_sq
    slope = -gamma * (jnp.maximum(newton_sq, 0) + grad_newton**2)
    curvature = rejected - point.phi - slope
    usable = (slope < 0) & (curvature > 0) & jnp.isfinite(curvature)
    t = -slope / jnp.where(usable, 2 * curvature, 1)
    low, high = ANDERSON_BACKTRACK
    return jnp.where(usable, jnp.clip(t, low, high), high)


def _smallest(acc: Any) -> jax.Array:
    """The ridge's absolute floor `RIDGE_FLOOR`, or the tiniest normal number of `acc` where
    it underflows."""
    return jnp.maximum(jnp.asarray(RIDGE_FLOOR, acc), jnp.finfo(acc).tiny)
