"""RBO, the Rolling Ball Optimizer, as an optax gradient transformation (JAX; torch not needed).

    tx = rbo(learning_rate=0.1, radius=1.0)
    updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=loss_fn)

The same step as `rollingball.RBO`, decision for decision (docs/algorithm.md): with the landscape
f = κ(loss + λ/2 ‖θ‖²) and g = ∇f at θ,

    s = √(1 + ‖g‖²),  v = g or v ← μ v + g,
    θ̃ = θ − ρ g/s − η v,  ỹ = f + ρ/s − η ⟨g, v⟩,
    θ ← argmin_x φ(x),  φ(x) = ½‖x − θ̃‖² + ½(f(x) − ỹ)²,

the projection run by the same solvers ("anderson" or "gd") inside `jax.lax.while_loop`, each
evaluation of f being one call of `value_fn(x, **extra_args)` (forward and backward).
`radius=0` is exactly `optax.sgd`. Scalars (norms, inner products, φ) are accumulated in
float32 or the widest parameter dtype, whichever is wider.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rollingball import defaults
from rollingball.spec import (
    ANDERSON_BACKTRACK,
    ANDERSON_CONTRACTION,
    ANDERSON_EXTENSION,
    ANDERSON_REGULARIZATION,
    ANDERSON_TRUST,
    RIDGE_FLOOR,
    phi_noise,
    validate,
)

Schedule = Callable[[jax.Array], Any]
ScalarOrSchedule = float | Schedule

STALLS = (None, "rejected", "stationary", "skipped")  # RBOState.stall indexes this


class RBOState(NamedTuple):
    """The momentum buffer, the step count and the last step's statistics.

    Read them with `optax.tree_utils.tree_get(state, name)`. `grad_evals` counts the calls
    of `value_fn` in the step plus the caller's own evaluation at θ; `residual` is
    ‖r(x)‖/‖r(θ)‖ at the last evaluated point of the projection; `blind_step` says whether
    the solver took a last step without evaluating it; `skipped` is set when a non-finite
    loss or gradient made the update zero; `update_bounded` when `max_update` shortened it;
    `moved` says whether the update is nonzero, and `stall` why not: an index into `STALLS`
    (0 None: it moved; 1 "rejected": every trial point raised φ; 2 "stationary": θ met the
    tolerance, e.g. r(θ) = 0; 3 "skipped"), the reasons `rollingball.RBO.last_stats["stall"]`
    gives.
    """

    count: jax.Array  # type: ignore[assignment]  # optax calls the step count `count`
    momentum: Any
    grad_evals: jax.Array
    projection_steps: jax.Array
    safeguard_steps: jax.Array
    residual: jax.Array
    converged: jax.Array
    blind_step: jax.Array
    skipped: jax.Array
    update_bounded: jax.Array
    moved: jax.Array
    stall: jax.Array


# --- pytree arithmetic: scalars accumulated in `acc`, leaves kept in their own dtype ---


def _accumulator(tree: Any) -> Any:
    """float32, or the widest floating dtype among the leaves if that is wider."""
    return jnp.result_type(jnp.float32, *(leaf.dtype for leaf in jax.tree.leaves(tree)))


def _inner(a: Any, b: Any, acc: Any) -> jax.Array:
    """⟨a, b⟩ = Σ_leaves Σ a·b, products and sums in `acc` (no matmul: exact on any device)."""
    terms = [
        jnp.sum(x.astype(acc) * y.astype(acc))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return sum(terms, jnp.zeros((), acc))


def _combine(*terms: tuple[Any, Any]) -> Any:
    """Σ_i c_i·t_i leaf by leaf, computed in float32 or wider and stored in the leaf's dtype."""
    coefficients = [c for c, _ in terms]
    trees = [t for _, t in terms]

    def leaf(*xs: jax.Array) -> jax.Array:
        wide = jnp.promote_types(xs[0].dtype, jnp.float32)
        total = sum(
            jnp.asarray(c, wide) * x.astype(wide) for c, x in zip(coefficients, xs, strict=True)
        )
        return jnp.asarray(total).astype(xs[0].dtype)

    return jax.tree.map(leaf, *trees)


def _zero_like(tree: Any) -> Any:
    return jax.tree.map(jnp.zeros_like, tree)


# --- the projection (`rollingball.optim.problem.CentreProjection` and `optim.projection`) ---


class _Problem:
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
        grad_sq = _inner(grad, grad, self.acc)
        bad = ~jnp.isfinite(value) | ~jnp.isfinite(grad_sq)
        return (value - self.start_value) - self.lift, grad, grad_sq, bad

    def phi_noise(self, mismatch: jax.Array, phi: jax.Array) -> jax.Array:
        """φ's round-off level (`rollingball.spec.phi_noise`)."""
        return phi_noise(mismatch, phi, self.start_value, self.lift, self.eps, jnp.abs)


class _Outcome(NamedTuple):
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


def _gd_projection(
    problem: _Problem,
    offset: Any,
    grad: Any,
    start_bad: jax.Array,
    max_steps: int,
    step_size: float,
    tol: float,
) -> tuple[Any, _Outcome]:
    """The authors' scheme x ← x − γ r(x), r = u + m ∇f, K iterations from x₀ = θ
    (`rollingball.optim.projection.GradientDescentProjection`); returns (x − θ, outcome).

    r(θ) is free and the K-th iteration is taken blind: at most K calls of value_fn per step,
    the caller's included. With tol > 0 it stops when ‖r(x)‖ ≤ tol·‖r(θ)‖; with tol = 0 ‖r‖
    only decides at θ and at the last evaluated point, as in the torch solver.
    """
    acc = problem.acc
    zero = jnp.zeros((), jnp.int32)

    def residual(mismatch: jax.Array, grad: Any, offset: Any) -> tuple[Any, jax.Array]:
        r = _combine((mismatch, grad), (1, offset))
        return r, jnp.sqrt(_inner(r, r, acc))

    r, initial = residual(-problem.lift, grad, offset)
    bad = start_bad | ~jnp.isfinite(initial)

    def cond(carry: tuple[Any, ...]) -> jax.Array:
        _, _, _, norm, moves, bad = carry
        going = norm > tol * initial if tol > 0 else initial > 0
        return (moves < max_steps - 1) & going & ~bad

    def body(carry: tuple[Any, ...]) -> tuple[Any, ...]:
        x, offset, r, _, moves, _ = carry
        x = _combine((1, x), (-step_size, r))
        offset = _combine((1, offset), (-step_size, r))
        mismatch, grad, _, bad = problem.evaluate(x)
        r, norm = residual(mismatch, grad, offset)
        return x, offset, r, norm, moves + 1, bad | ~jnp.isfinite(norm)

    carry = (problem.params, offset, r, initial, zero, bad)
    x, _, r, norm, moves, bad = jax.lax.while_loop(cond, body, carry)
    blind = (moves == max_steps - 1) & (norm > tol * initial) & ~bad
    displacement = _combine((1, x), (-1, problem.params), (jnp.where(blind, -step_size, 0), r))
    return displacement, _Outcome(moves, initial, norm, zero, blind, bad, (moves > 0) | blind)


class _Point(NamedTuple):
    """An evaluated point as the Anderson solver sees it: m, ‖∇f‖², ⟨∇f, u⟩, ‖u‖²."""

    mismatch: jax.Array
    grad_sq: jax.Array
    grad_offset: jax.Array
    offset_sq: jax.Array

    @property
    def phi(self) -> jax.Array:
        """φ = ½(‖u‖² + m²)."""
        return 0.5 * (self.offset_sq + self.mismatch**2)

    @property
    def newton_shift(self) -> jax.Array:
        """c in p = (I + g gᵀ)⁻¹ r = u + c g (Sherman–Morrison): c = (m − ⟨g, u⟩)/(1 + ‖g‖²)."""
        return (self.mismatch - self.grad_offset) / (1 + self.grad_sq)

    def residual_norm(self, newton_sq: jax.Array) -> jax.Array:
        """‖r‖ from ‖p‖²: r = (I + g gᵀ) p, so ‖r‖² = ‖p‖² + ⟨g, p⟩²(2 + ‖g‖²),
        with ⟨g, p⟩ = (⟨g, u⟩ + m‖g‖²)/(1 + ‖g‖²)."""
        g_p = (self.grad_offset + self.mismatch * self.grad_sq) / (1 + self.grad_sq)
        return jnp.sqrt(jnp.maximum(newton_sq, 0) + g_p**2 * (2 + self.grad_sq))


def _anderson_projection(
    problem: _Problem,
    offset: Any,
    grad: Any,
    grad_sq: jax.Array,
    start_bad: jax.Array,
    max_steps: int,
    step_size: float,
    tol: float,
    memory: int,
) -> tuple[Any, _Outcome]:
    """Anderson-accelerated Gauss–Newton iteration with a safeguard and a blind last step
    (`rollingball.optim.projection.AndersonProjection`); returns (x − θ, outcome).

    p = u + c g; with the last m differences ΔX_j = x_{j+1} − x_j and D_j = p_j − p_{j+1},
        α = argmin ‖p_k + D α‖ (ridge 1e-10·max_j ‖D_j‖²),  x_{k+1} = x_k − ΔX α − γ (p_k + D α).
    A trial point with φ(x_{k+1}) > φ(x_k) + round-off is rejected: back to x_k, history
    cleared, and a rejected plain step shrinks γ by quadratic interpolation (`_backtrack`);
    each rejection adds one evaluation to the budget of K, up to `ANDERSON_EXTENSION`. After
    the budget's last evaluation the next step is taken unevaluated if the Gauss–Newton model
    predicted the last accepted step well (`_blind_is_safe`). The history is a ring of m
    slots; `valid` marks the live ones.
    """
    acc = problem.acc
    zero = jnp.zeros((), jnp.int32)
    ring = jax.tree.map(lambda leaf: jnp.zeros((memory, *leaf.shape), leaf.dtype), offset)

    def newton(point: _Point, offset: Any, grad: Any) -> Any:
        return _combine((1, offset), (point.newton_shift, grad))

    def trial_step(p: Any, x_steps: Any, d_steps: Any, gram: jax.Array, valid: jax.Array,
                   gamma: jax.Array) -> Any:  # fmt: skip
        """δ = −ΔX α − γ (p + D α), α from the regularised normal equations of ‖p + D α‖."""

        def accelerated() -> Any:
            rhs = -_ring_inners(d_steps, p, acc)
            diagonal = jnp.where(valid, jnp.diagonal(gram), -jnp.inf)
            ridge = ANDERSON_REGULARIZATION * diagonal.max() + _smallest(acc)
            both = valid[:, None] & valid[None, :]
            matrix = jnp.where(both, gram, 0) + jnp.diag(jnp.where(valid, ridge, 1))
            alpha = jnp.where(valid, jnp.linalg.solve(matrix, jnp.where(valid, rhs, 0)), 0)
            return jax.tree.map(
                lambda pi, dx, d: _ring_sum(pi, -gamma, -alpha, dx, -gamma * alpha, d),
                p,
                x_steps,
                d_steps,
            )

        return jax.lax.cond(valid.any(), accelerated, lambda: _combine((-gamma, p)))

    def budget(safeguards: jax.Array) -> jax.Array:
        """K evaluations, plus one for each rejected trial point up to `ANDERSON_EXTENSION`."""
        return max_steps + jnp.minimum(safeguards, ANDERSON_EXTENSION)

    def cond(carry: dict[str, Any]) -> jax.Array:
        going = carry["norm"] > tol * initial
        going = going & (carry["calls"] < budget(carry["safeguards"]))
        return going & ~carry["bad"]

    def body(c: dict[str, Any]) -> dict[str, Any]:
        point: _Point = c["point"]
        p, step = newton(point, c["offset"], c["grad"]), c["step"]
        # ⟨g, δ⟩ and ‖δ‖²: what the blind-step rule checks if this is the last evaluation
        check = jnp.stack([_inner(c["grad"], step, acc), _inner(step, step, acc)])
        trial_x = _combine((1, c["x"]), (1, step))
        trial_offset = _combine((1, c["offset"]), (1, step))
        mismatch, trial_grad, trial_grad_sq, bad = problem.evaluate(trial_x)
        trial = _Point(
            mismatch,
            trial_grad_sq,
            _inner(trial_grad, trial_offset, acc),
            _inner(trial_offset, trial_offset, acc),
        )
        reject = trial.phi > point.phi + problem.phi_noise(trial.mismatch, trial.phi)

        def pick(rejected: Any, accepted: Any) -> Any:
            return jax.tree.map(lambda a, b: jnp.where(reject, a, b), rejected, accepted)

        # accepted: ΔX = δ and D = p_k − p_{k+1} go to the oldest slot (rejected: it stays)
        head = c["head"]
        trial_p = newton(trial, trial_offset, trial_grad)
        d = _combine((1, p), (-1, trial_p))
        x_steps = _ring_put(c["x_steps"], head, pick(_slot(c["x_steps"], head), step))
        d_steps = _ring_put(c["d_steps"], head, pick(_slot(c["d_steps"], head), d))
        products = _ring_inners(d_steps, d, acc)
        gram = c["gram"].at[head, :].set(products).at[:, head].set(products)
        trial_newton_sq = _inner(trial_p, trial_p, acc)
        norm = trial.residual_norm(trial_newton_sq)
        # a rejected plain step shrinks γ; a rejected accelerated one (any kept difference) not
        accelerated = c["valid"].sum() > 0
        shrink = _backtrack(point, c["newton_sq"], trial.phi, c["gamma"])
        gamma = jnp.where(reject & ~accelerated, c["gamma"] * shrink, c["gamma"])
        valid = jnp.where(reject, jnp.zeros_like(c["valid"]), c["valid"].at[head].set(True))
        gram = jnp.where(reject, c["gram"], gram)
        next_step = trial_step(pick(p, trial_p), x_steps, d_steps, gram, valid, gamma)
        return {
            "calls": c["calls"] + 1,
            "step": next_step,
            "x": pick(_combine((1, trial_x), (-1, step)), trial_x),
            "offset": pick(_combine((1, trial_offset), (-1, step)), trial_offset),
            "grad": pick(c["grad"], trial_grad),
            "point": pick(point, trial),
            "norm": jnp.where(reject, c["norm"], norm),
            "newton_sq": jnp.where(reject, c["newton_sq"], trial_newton_sq),
            "gamma": gamma,
            "safeguards": c["safeguards"] + reject.astype(jnp.int32),
            "x_steps": x_steps,
            "d_steps": d_steps,
            "gram": gram,
            "valid": valid,
            "head": jnp.where(reject, head, (head + 1) % memory),
            "before": pick(c["before"], point),
            # the rule needs ⟨g, δ⟩ with g at x_k: not after a rejection, where the torch
            # solver holds the rejected point's gradient
            "has_before": ~reject & c["fresh"],
            "fresh": ~reject,
            "check": jnp.where(reject, c["check"], check),
            "bad": bad | (~reject & ~jnp.isfinite(norm)),
        }

    start = _Point(-problem.lift, grad_sq, _inner(grad, offset, acc), _inner(offset, offset, acc))
    p0 = newton(start, offset, grad)
    start_newton_sq = _inner(p0, p0, acc)
    initial = start.residual_norm(start_newton_sq)
    carry = {
        "calls": zero,
        "step": _combine((-step_size, p0)),  # no history yet: the plain step −γ p
        "x": problem.params,
        "offset": offset,
        "grad": grad,
        "point": start,
        "norm": initial,
        "newton_sq": start_newton_sq,
        "gamma": jnp.asarray(step_size, acc),
        "safeguards": zero,
        "x_steps": ring,
        "d_steps": ring,
        "gram": jnp.zeros((memory, memory), acc),
        "valid": jnp.zeros((memory,), bool),
        "head": zero,
        "before": start,
        "has_before": jnp.zeros((), bool),
        "fresh": jnp.ones((), bool),
        "check": jnp.zeros((2,), acc),
        "bad": start_bad | ~jnp.isfinite(initial),
    }
    c = jax.lax.while_loop(cond, body, carry)
    spent = c["calls"] == budget(c["safeguards"])
    blind = spent & (c["norm"] > tol * initial) & c["has_before"] & ~c["bad"]
    blind = blind & _blind_is_safe(
        problem, c["before"], c["point"], c["check"], c["offset"], c["grad"], c["step"]
    )
    displacement = _combine((1, c["x"]), (-1, problem.params), (blind.astype(acc), c["step"]))
    moved = (c["calls"] > c["safeguards"]) | blind
    outcome = _Outcome(c["calls"], initial, c["norm"], c["safeguards"], blind, c["bad"], moved)
    return displacement, outcome


def _blind_is_safe(
    problem: _Problem, before: _Point, point: _Point, check: jax.Array, offset: Any, grad: Any,
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
    offset_step, grad_step = _inner(offset, step, acc), _inner(grad, step, acc)
    step_sq = _inner(step, step, acc)
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


def _slot(ring: Any, j: jax.Array) -> Any:
    return jax.tree.map(lambda stack: stack[j], ring)


def _ring_put(ring: Any, head: jax.Array, tree: Any) -> Any:
    return jax.tree.map(lambda stack, leaf: stack.at[head].set(leaf), ring, tree)


def _ring_inners(ring: Any, tree: Any, acc: Any) -> jax.Array:
    """[⟨slot_j, tree⟩ for every slot j of the ring], accumulated in `acc`."""
    terms = [
        jnp.sum(stack.astype(acc) * leaf.astype(acc)[None], axis=tuple(range(1, stack.ndim)))
        for stack, leaf in zip(jax.tree.leaves(ring), jax.tree.leaves(tree), strict=True)
    ]
    return sum(terms, jnp.zeros(jax.tree.leaves(ring)[0].shape[:1], acc))


def _ring_sum(
    base: jax.Array, c: jax.Array, a: jax.Array, x: jax.Array, b: jax.Array, y: jax.Array
) -> jax.Array:
    """c·base + Σ_j a_j x_j + Σ_j b_j y_j over the ring's slots, in float32 or wider (one
    elementwise pass: the slots are summed one by one, not reduced over the ring's axis)."""
    wide = jnp.promote_types(base.dtype, jnp.float32)
    total = c.astype(wide) * base.astype(wide)
    for j in range(x.shape[0]):
        total = (
            total + a[j].astype(wide) * x[j].astype(wide) + b[j].astype(wide) * y[j].astype(wide)
        )
    return total.astype(base.dtype)


# --- the transformation ---


def rbo(
    learning_rate: ScalarOrSchedule = 1e-3,
    radius: ScalarOrSchedule = 1.0,
    projection: str = defaults.PROJECTION,
    projection_steps: int = defaults.PROJECTION_STEPS,
    projection_step_size: float = defaults.PROJECTION_STEP_SIZE,
    projection_tol: float = defaults.PROJECTION_TOL,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    loss_scale: float = 1.0,
    anderson_memory: int = defaults.ANDERSON_MEMORY,
    max_update: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The Rolling Ball Optimizer as an optax transformation; arguments as `rollingball.RBO`.

    Args:
        learning_rate: η, the tangent step of the ball centre; a number or an optax schedule.
        radius: ρ >= 0, the ball's radius; a number or a schedule. `radius=0` is `optax.sgd`.
        projection: "anderson" (accelerated, default) or "gd" (the authors' scheme).
        projection_steps: K, the most projection iterations per step.
        projection_step_size: γ, the step of the fixed-point iteration.
        projection_tol: stop when ‖r(x)‖ <= tol·‖r(θ)‖; 0 runs all K iterations.
        momentum: μ, heavy ball on the centre's tangent step: v ← μ v + g.
        weight_decay: λ, part of the landscape: f + λ/2 ‖θ‖².
        loss_scale: κ, scale of the vertical axis: the landscape is κ f.
        anderson_memory: m, the differences the Anderson solver keeps.
        max_update: None, or the most the parameters may move in one step: an update d
            longer than it becomes (max_update/‖d‖) d (the formula of
            `optax.clip_by_global_norm`; the momentum keeps the full v).

    `update(grad, state, params, *, value, grad, value_fn, **extra_args)` takes the loss
    `value` and its gradient at `params` (`grad` defaults to the first argument) and calls
    `value_fn(x, **extra_args)` at every trial point, differentiated with `jax.value_and_grad`.
    A non-finite loss or gradient at any evaluation gives a zero update, keeps the momentum
    and the step count, and sets `skipped` in the state.
    """
    validate(
        {
            "lr": learning_rate,
            "radius": radius,
            "projection": projection,
            "projection_steps": projection_steps,
            "projection_step_size": projection_step_size,
            "projection_tol": projection_tol,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "loss_scale": loss_scale,
            "anderson_memory": anderson_memory,
            "max_update": max_update,
        },
        schedules=("lr", "radius"),
    )
    projection_tol = float(projection_tol)

    def init(params: Any) -> RBOState:
        acc = _accumulator(params)
        zero = jnp.zeros((), jnp.int32)
        return RBOState(
            count=zero,
            momentum=_zero_like(params) if momentum else None,
            grad_evals=zero,
            projection_steps=zero,
            safeguard_steps=zero,
            residual=jnp.zeros((), acc),
            converged=jnp.ones((), bool),
            blind_step=jnp.zeros((), bool),
            skipped=jnp.zeros((), bool),
            update_bounded=jnp.zeros((), bool),
            moved=jnp.zeros((), bool),
            stall=jnp.zeros((), jnp.int32),
        )

    def landscape_at(value: Any, grad: Any, x: Any, acc: Any) -> tuple[jax.Array, Any]:
        """(f, ∇f) of the landscape κ(loss + λ/2 ‖x‖²) from the loss and its gradient at x."""
        value = jnp.asarray(value, acc)
        if weight_decay:
            value = value + 0.5 * weight_decay * _inner(x, x, acc)
            grad = jax.tree.map(lambda g, p: g + weight_decay * p, grad, x)
        if loss_scale != 1.0:
            grad = jax.tree.map(lambda g: g * loss_scale, grad)
        return value * loss_scale, grad

    def step(
        updates: Any,
        state: RBOState,
        params: Any,
        value: Any,
        grad: Any,
        value_fn: Callable[..., Any],
        extra_args: dict[str, Any],
    ) -> tuple[Any, RBOState]:
        acc = _accumulator(params)
        grad = updates if grad is None else grad
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate

        def tangent(g: Any, buffer: Any) -> Any:
            """v = g, or v = g + μ v_prev (v_prev = 0 before the first step)."""
            return g if not momentum else jax.tree.map(lambda gi, b: gi + momentum * b, g, buffer)

        def sgd(v: Any) -> Any:
            """radius 0: −η v, computed as optax.sgd computes it."""
            if callable(learning_rate):
                return jax.tree.map(lambda vi: jnp.array(-lr, dtype=vi.dtype) * vi, v)
            return jax.tree.map(lambda vi: -learning_rate * vi, v)

        def sgd_moves(grad_sq: jax.Array) -> jax.Array:
            """radius 0: the step −η v is nonzero (η > 0, and g ≠ 0 or momentum)."""
            return (jnp.asarray(lr) > 0) & ((grad_sq > 0) | (momentum > 0))

        if not callable(radius) and radius == 0:  # no projection: on the leaves themselves
            f0, g = landscape_at(value, grad, params, acc)
            v = tangent(g, state.momentum)
            zero, norm = jnp.zeros((), jnp.int32), jnp.zeros((), acc)
            grad_sq = _inner(g, g, acc)
            bad = ~jnp.isfinite(f0) | ~jnp.isfinite(grad_sq)
            moved = sgd_moves(grad_sq)
            outcome = _Outcome(zero, norm, norm, zero, jnp.zeros((), bool), bad, moved)
            return _finish(sgd(v), v, outcome, state, acc)

        value_and_grad = jax.value_and_grad(value_fn)

        def landscape(x: Any) -> tuple[jax.Array, Any]:
            loss, loss_grad = value_and_grad(x, **extra_args)
            return landscape_at(loss, loss_grad, x, acc)

        f0, g = landscape_at(value, grad, params, acc)
        grad_sq = _inner(g, g, acc)
        start_bad = ~jnp.isfinite(f0) | ~jnp.isfinite(grad_sq)
        v = tangent(g, state.momentum)

        def roll(rho: Any) -> tuple[Any, _Outcome]:
            """Seat the ball, move its centre along the tangent, project it onto the graph."""
            s = jnp.sqrt(1 + grad_sq)
            offset = _combine((rho / s, g), (lr, v))  # u = θ − θ̃ = ρ g/s + η v
            lift = rho / s - lr * (grad_sq if not momentum else _inner(g, v, acc))
            problem = _Problem(landscape, params, f0, jnp.asarray(lift, acc), acc, eps)
            if projection == "gd":
                displacement, outcome = _gd_projection(
                    problem, offset, g, start_bad, projection_steps, projection_step_size,
                    projection_tol,
                )  # fmt: skip
            else:
                displacement, outcome = _anderson_projection(
                    problem, offset, g, grad_sq, start_bad, projection_steps, projection_step_size,
                    projection_tol, anderson_memory,
                )  # fmt: skip
            return displacement, outcome

        eps = jnp.finfo(jax.tree.leaves(params)[0].dtype).eps  # as torch: the first parameter's
        if callable(radius):
            rho = jnp.asarray(radius(state.count), acc)
            no = jnp.zeros((), jnp.int32), jnp.zeros((), acc), jnp.zeros((), bool)
            skip = _Outcome(no[0], no[1], no[1], no[0], no[2], start_bad, sgd_moves(grad_sq))
            delta, outcome = jax.lax.cond(rho == 0, lambda: (sgd(v), skip), lambda: roll(rho))
        else:
            delta, outcome = roll(radius)
        return _finish(delta, v, outcome, state, acc)

    def _finish(
        delta: Any, v: Any, outcome: _Outcome, state: RBOState, acc: Any
    ) -> tuple[Any, RBOState]:
        """The update (zero when a value was not finite; shortened to max_update) and the new
        state."""
        bad = outcome.bad
        still = bad | ~outcome.moved  # x + δ − δ after rejections: the update is exactly zero
        delta = jax.tree.map(lambda d: jnp.where(still, jnp.zeros_like(d), d), delta)
        bounded = jnp.zeros((), bool)
        if max_update is not None:
            norm = jnp.sqrt(_inner(delta, delta, acc))
            bounded = ~bad & (norm > max_update)
            scale = jnp.where(bounded, max_update / jnp.where(bounded, norm, 1), 1)
            delta = jax.tree.map(lambda d: (d * scale).astype(d.dtype), delta)
        initial = outcome.initial_norm
        relative = jnp.where(
            initial > 0, outcome.final_norm / jnp.where(initial > 0, initial, 1), 0
        )
        new_state = RBOState(
            count=jnp.where(bad, state.count, optax.safe_increment(state.count)),
            momentum=None
            if not momentum
            else jax.tree.map(lambda old, new: jnp.where(bad, old, new), state.momentum, v),
            grad_evals=1 + outcome.steps,
            projection_steps=jnp.where(bad, 0, outcome.steps),
            safeguard_steps=jnp.where(bad, 0, outcome.safeguard_steps),
            residual=jnp.where(bad, jnp.nan, relative).astype(acc),
            converged=~bad & (relative <= projection_tol),
            blind_step=~bad & outcome.blind_step,
            skipped=bad,
            update_bounded=bounded,
            moved=~bad & outcome.moved,
            stall=jnp.where(
                bad, 3, jnp.where(outcome.moved, 0, jnp.where(outcome.steps > 0, 1, 2))
            ).astype(jnp.int32),
        )
        return delta, new_state

    # a projection loop is compiled once per value_fn, also when the caller does not jit
    compiled_step = step if radius == 0 else jax.jit(step, static_argnames="value_fn")

    def update(
        updates: Any,
        state: RBOState,
        params: Any = None,
        *,
        value: Any,
        grad: Any = None,
        value_fn: Callable[..., Any],
        **extra_args: Any,
    ) -> tuple[Any, RBOState]:
        if params is None:
            raise ValueError("rbo needs the parameters: update(grad, state, params, ...)")
        return compiled_step(updates, state, params, value, grad, value_fn, extra_args)

    return optax.GradientTransformationExtraArgs(init, update)
