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

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array], Any]
ScalarOrSchedule = float | Schedule

SOLVERS = ("anderson", "gd")
# The Anderson solver's ridge on its normal equations, relative to the largest ‖ΔP_j‖²
# (`rollingball.optim.projection.AndersonProjection.regularization`).
ANDERSON_REGULARIZATION = 1e-10


class RBOState(NamedTuple):
    """The momentum buffer, the step count and the last step's statistics.

    Read them with `optax.tree_utils.tree_get(state, name)`. `grad_evals` counts the calls
    of `value_fn` in the step plus the caller's own evaluation at θ; `residual` is
    ‖r(x)‖/‖r(θ)‖ at the last evaluated point of the projection; `skipped` is set when a
    non-finite loss or gradient made the update zero.
    """

    count: jax.Array  # type: ignore[assignment]  # optax calls the step count `count`
    momentum: Any
    grad_evals: jax.Array
    projection_steps: jax.Array
    safeguard_steps: jax.Array
    residual: jax.Array
    converged: jax.Array
    skipped: jax.Array


class _Point(NamedTuple):
    """What the solvers keep of an evaluated point x (see `_Problem.evaluate`)."""

    direction: Any  # r(x), or the Gauss–Newton direction (I + ∇f ∇fᵀ)⁻¹ r(x)
    norm: jax.Array  # ‖r(x)‖
    phi: jax.Array  # φ(x)
    noise: jax.Array  # round-off level of φ(x)
    bad: jax.Array  # non-finite loss or residual


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _validate(
    learning_rate: ScalarOrSchedule,
    radius: ScalarOrSchedule,
    projection: str,
    projection_steps: int,
    projection_step_size: float,
    projection_tol: float,
    momentum: float,
    weight_decay: float,
    loss_scale: float,
    anderson_memory: int,
) -> None:
    """Refuse hyperparameters that have no meaning, with the messages of `rollingball.RBO`."""
    if not callable(learning_rate):
        _require(
            math.isfinite(learning_rate) and learning_rate >= 0,
            f"learning rate must be a finite number >= 0, got {learning_rate}",
        )
    if not callable(radius):
        _require(
            math.isfinite(radius) and radius >= 0,
            f"radius must be a finite number >= 0, got {radius}",
        )
    _require(momentum >= 0, f"momentum must be >= 0, got {momentum}")
    _require(weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay}")
    _require(
        math.isfinite(loss_scale) and loss_scale > 0,
        f"loss_scale must be a finite number > 0, got {loss_scale}",
    )
    _require(
        projection in SOLVERS,
        f"unknown projection solver {projection!r}; choose one of {SOLVERS}",
    )
    _require(
        isinstance(projection_steps, int) and projection_steps >= 1,
        f"projection_steps must be an int >= 1, got {projection_steps}",
    )
    _require(
        projection_step_size > 0, f"projection_step_size must be > 0, got {projection_step_size}"
    )
    _require(projection_tol >= 0, f"projection_tol must be >= 0, got {projection_tol}")
    _require(
        isinstance(anderson_memory, int) and anderson_memory >= 1,
        f"anderson_memory must be an int >= 1, got {anderson_memory}",
    )


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


# --- the landscape and the projection problem (`rollingball.optim.rbo._Projection`) ---


class _Problem:
    """The projection seen from the solvers: evaluations of r at θ + d.

    Keeps the offset u = x − θ̃ and the height mismatch f(x) − ỹ = (f(x) − f(θ)) − h with
    h = ỹ − f(θ) = ρ/s − η⟨g, v⟩. Residual r(x) = u + (f(x) − ỹ) ∇f(x); Gauss–Newton
    direction (I + ∇f ∇fᵀ)⁻¹ r = u + ∇f (f(x) − ỹ − ⟨∇f, u⟩)/(1 + ‖∇f‖²).
    """

    def __init__(
        self,
        landscape: Callable[[Any], tuple[jax.Array, Any]],
        params: Any,
        start_value: jax.Array,
        lift: jax.Array,
        acc: Any,
    ) -> None:
        self.landscape = landscape
        self.params = params
        self.start_value = start_value
        self.lift = lift
        self.acc = acc
        self.eps = jnp.finfo(jax.tree.leaves(params)[0].dtype).eps

    def evaluate(self, displacement: Any) -> tuple[jax.Array, Any]:
        """One call of value_fn at x = θ + d: (f(x), ∇f(x))."""
        return self.landscape(_combine((1, self.params), (1, displacement)))

    def point(self, value: jax.Array, grad: Any, offset: Any, newton: bool) -> _Point:
        """r or the Gauss–Newton direction at a point with f = value, ∇f = grad, u = offset."""
        acc = self.acc
        mismatch = (value - self.start_value) - self.lift
        residual = _combine((mismatch, grad), (1, offset))
        norm = jnp.sqrt(_inner(residual, residual, acc))
        bad = ~jnp.isfinite(value) | ~jnp.isfinite(norm)
        if not newton:
            nan = jnp.full((), jnp.nan, acc)
            return _Point(residual, norm, nan, nan, bad)
        shift = (mismatch - _inner(grad, offset, acc)) / (1 + _inner(grad, grad, acc))
        direction = _combine((1, offset), (shift, grad))
        phi = 0.5 * (_inner(offset, offset, acc) + mismatch**2)
        heights = jnp.abs(value) + jnp.abs(self.start_value) + jnp.abs(self.lift)
        noise = 4 * self.eps * (phi + jnp.abs(mismatch) * heights)
        return _Point(direction, norm, phi, noise, bad)


class _Outcome(NamedTuple):
    displacement: Any  # x* − θ
    steps: jax.Array
    calls: jax.Array
    initial_norm: jax.Array
    final_norm: jax.Array
    safeguard_steps: jax.Array
    bad: jax.Array


def _gd_projection(
    problem: _Problem,
    offset: Any,
    start: _Point,
    max_steps: int,
    step_size: float,
    tol: float,
) -> _Outcome:
    """The authors' scheme x ← x − γ r(x), at most K iterations
    (`rollingball.optim.projection.GradientDescentProjection`).

    Stops when ‖r(x)‖ ≤ tol·‖r(θ)‖. With tol = 0 it runs all K iterations and does not
    evaluate after the last one: K calls of value_fn per step in all, the caller's included.
    """
    initial = start.norm
    zero = jnp.zeros((), jnp.int32)
    # with tol = 0 the K-th iteration is taken after the loop, without an evaluation
    loop_steps = max_steps - 1 if tol == 0 else max_steps

    def cond(carry: tuple[Any, ...]) -> jax.Array:
        _, _, _, norm, steps, bad = carry
        return (steps < loop_steps) & (norm > tol * initial) & ~bad

    def body(carry: tuple[Any, ...]) -> tuple[Any, ...]:
        displacement, offset, residual, _, steps, _ = carry
        displacement = _combine((1, displacement), (-step_size, residual))
        offset = _combine((1, offset), (-step_size, residual))
        value, grad = problem.evaluate(displacement)
        point = problem.point(value, grad, offset, newton=False)
        return displacement, offset, point.direction, point.norm, steps + 1, point.bad

    carry = (_zero_like(offset), offset, start.direction, initial, zero, start.bad)
    displacement, _, residual, norm, steps, bad = jax.lax.while_loop(cond, body, carry)
    calls = steps
    if tol == 0:
        moving = norm > 0
        displacement = _combine((1, displacement), (jnp.where(moving, -step_size, 0), residual))
        steps = steps + moving.astype(jnp.int32)
    return _Outcome(displacement, steps, calls, initial, norm, zero, bad)


def _anderson_projection(
    problem: _Problem,
    offset: Any,
    start: _Point,
    max_steps: int,
    step_size: float,
    tol: float,
    memory: int,
) -> _Outcome:
    """Anderson-accelerated Gauss–Newton iteration with a safeguard
    (`rollingball.optim.projection.AndersonProjection`).

    With the last m differences ΔX_j = x_{j+1} − x_j, ΔP_j = p_{j+1} − p_j:
        α = argmin ‖p_k − ΔP α‖ (ridge 1e-10·max_j ‖ΔP_j‖²),  x_{k+1} = x_k − ΔX α − γ (p_k − ΔP α).
    A trial point with φ(x_{k+1}) > φ(x_k) + round-off is rejected: back to x_k, history
    cleared, and a rejected plain step halves γ. Stops when ‖r‖ ≤ tol·‖r(θ)‖ or after K calls.
    The history is a ring of m slots; `valid` marks the slots that hold live differences.
    """
    acc = problem.acc
    initial = start.norm
    zero = jnp.zeros((), jnp.int32)
    ring = jax.tree.map(lambda leaf: jnp.zeros((memory, *leaf.shape), leaf.dtype), offset)

    def trial_step(
        direction: Any,
        x_steps: Any,
        p_steps: Any,
        gram: jax.Array,
        valid: jax.Array,
        gamma: jax.Array,
    ) -> Any:
        """δ = −ΔX α − γ (p − ΔP α), α from the regularised normal equations of ‖p − ΔP α‖."""
        plain = _combine((-gamma, direction))

        def accelerated() -> Any:
            rhs = _ring_inners(p_steps, direction, acc)
            diagonal = jnp.where(valid, jnp.diagonal(gram), -jnp.inf)
            ridge = ANDERSON_REGULARIZATION * diagonal.max() + jnp.maximum(
                jnp.asarray(1e-300, acc), jnp.finfo(acc).tiny
            )
            both = valid[:, None] & valid[None, :]
            matrix = jnp.where(both, gram, 0) + jnp.diag(jnp.where(valid, ridge, 1))
            alpha = jnp.where(valid, jnp.linalg.solve(matrix, jnp.where(valid, rhs, 0)), 0)
            return jax.tree.map(
                lambda step, dx, dp: _ring_sum(step, -alpha, dx, gamma * alpha, dp),
                plain,
                x_steps,
                p_steps,
            )

        return jax.lax.cond(valid.any(), accelerated, lambda: plain)

    def cond(carry: tuple[Any, ...]) -> jax.Array:
        calls, norm, bad = carry[0], carry[4], carry[-1]
        return (calls < max_steps) & (norm > tol * initial) & ~bad

    def body(carry: tuple[Any, ...]) -> tuple[Any, ...]:
        (calls, displacement, offset, previous, norm, phi, gamma, safeguards,
         x_steps, p_steps, gram, valid, head, _) = carry  # fmt: skip
        accelerated = valid.any()
        step = trial_step(previous, x_steps, p_steps, gram, valid, gamma)
        trial_displacement = _combine((1, displacement), (1, step))
        trial_offset = _combine((1, offset), (1, step))
        value, grad = problem.evaluate(trial_displacement)
        point = problem.point(value, grad, trial_offset, newton=True)
        reject = point.phi > phi + point.noise

        def pick(rejected: Any, accepted: Any) -> Any:
            return jax.tree.map(lambda a, b: jnp.where(reject, a, b), rejected, accepted)

        # accepted: ΔX = δ and ΔP = p_{k+1} − p_k go to the oldest slot (rejected: it stays)
        delta_p = _combine((1, point.direction), (-1, previous))
        x_steps = _ring_put(x_steps, head, pick(_slot(x_steps, head), step))
        p_steps = _ring_put(p_steps, head, pick(_slot(p_steps, head), delta_p))
        products = _ring_inners(p_steps, delta_p, acc)
        new_gram = gram.at[head, :].set(products).at[:, head].set(products)

        return (
            calls + 1,
            pick(_combine((1, trial_displacement), (-1, step)), trial_displacement),
            pick(_combine((1, trial_offset), (-1, step)), trial_offset),
            pick(previous, point.direction),
            jnp.where(reject, norm, point.norm),
            jnp.where(reject, phi, point.phi),
            jnp.where(reject & ~accelerated, gamma / 2, gamma),
            safeguards + reject.astype(jnp.int32),
            x_steps,
            p_steps,
            jnp.where(reject, gram, new_gram),
            jnp.where(reject, jnp.zeros_like(valid), valid.at[head].set(True)),
            jnp.where(reject, head, (head + 1) % memory),
            point.bad,
        )

    carry = (
        zero,
        _zero_like(offset),
        offset,
        start.direction,
        initial,
        start.phi,
        jnp.asarray(step_size, acc),
        zero,
        ring,
        ring,
        jnp.zeros((memory, memory), acc),
        jnp.zeros((memory,), bool),
        zero,
        start.bad,
    )
    out = jax.lax.while_loop(cond, body, carry)
    calls, displacement, norm, safeguards, bad = out[0], out[1], out[4], out[7], out[-1]
    return _Outcome(displacement, calls, calls, initial, norm, safeguards, bad)


def _slot(ring: Any, j: jax.Array) -> Any:
    return jax.tree.map(lambda stack: stack[j], ring)


def _ring_inners(ring: Any, tree: Any, acc: Any) -> jax.Array:
    """[⟨slot_j, tree⟩ for every slot j of the ring], accumulated in `acc`."""
    terms = [
        jnp.sum(stack.astype(acc) * leaf.astype(acc)[None], axis=tuple(range(1, stack.ndim)))
        for stack, leaf in zip(jax.tree.leaves(ring), jax.tree.leaves(tree), strict=True)
    ]
    return sum(terms, jnp.zeros(jax.tree.leaves(ring)[0].shape[:1], acc))


def _ring_put(ring: Any, head: jax.Array, tree: Any) -> Any:
    return jax.tree.map(lambda stack, leaf: stack.at[head].set(leaf), ring, tree)


def _ring_sum(base: jax.Array, a: jax.Array, x: jax.Array, b: jax.Array, p: jax.Array) -> jax.Array:
    """base + Σ_j a_j x_j + Σ_j b_j p_j over the ring's slots, in float32 or wider."""
    wide = jnp.promote_types(base.dtype, jnp.float32)
    shape = (-1,) + (1,) * base.ndim
    total = (
        base.astype(wide)
        + jnp.sum(a.astype(wide).reshape(shape) * x.astype(wide), axis=0)
        + jnp.sum(b.astype(wide).reshape(shape) * p.astype(wide), axis=0)
    )
    return total.astype(base.dtype)


# --- the transformation ---


def rbo(
    learning_rate: ScalarOrSchedule = 1e-3,
    radius: ScalarOrSchedule = 1.0,
    projection: str = "anderson",
    projection_steps: int = 20,
    projection_step_size: float = 1.0,
    projection_tol: float = 1e-4,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    loss_scale: float = 1.0,
    anderson_memory: int = 5,
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

    `update(grad, state, params, *, value, grad, value_fn, **extra_args)` takes the loss
    `value` and its gradient at `params` (`grad` defaults to the first argument) and calls
    `value_fn(x, **extra_args)` at every trial point, differentiated with `jax.value_and_grad`.
    A non-finite loss or gradient at any evaluation gives a zero update, keeps the momentum
    and the step count, and sets `skipped` in the state.
    """
    _validate(
        learning_rate,
        radius,
        projection,
        projection_steps,
        projection_step_size,
        projection_tol,
        momentum,
        weight_decay,
        loss_scale,
        anderson_memory,
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
            skipped=jnp.zeros((), bool),
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
        acc = _accumulator(params)
        grad = updates if grad is None else grad
        value_and_grad = jax.value_and_grad(value_fn)

        def landscape(x: Any) -> tuple[jax.Array, Any]:
            loss, loss_grad = value_and_grad(x, **extra_args)
            return landscape_at(loss, loss_grad, x, acc)

        f0, g = landscape_at(value, grad, params, acc)
        grad_sq = _inner(g, g, acc)
        start_bad = ~jnp.isfinite(f0) | ~jnp.isfinite(grad_sq)
        v = g if not momentum else jax.tree.map(lambda gi, b: gi + momentum * b, g, state.momentum)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate

        def sgd() -> tuple[Any, _Outcome]:
            """radius 0: −η v, computed as optax.sgd computes it."""
            if callable(learning_rate):
                step = jax.tree.map(lambda vi: jnp.array(-lr, dtype=vi.dtype) * vi, v)
            else:
                step = jax.tree.map(lambda vi: -learning_rate * vi, v)
            zero = jnp.zeros((), jnp.int32)
            norm = jnp.zeros((), acc)
            return step, _Outcome(None, zero, zero, norm, norm, zero, start_bad)

        def roll(rho: Any) -> tuple[Any, _Outcome]:
            """Seat the ball, move its centre along the tangent, project it onto the graph."""
            s = jnp.sqrt(1 + grad_sq)
            offset = _combine((rho / s, g), (lr, v))  # u = θ − θ̃ = ρ g/s + η v
            lift = rho / s - lr * (grad_sq if not momentum else _inner(g, v, acc))
            problem = _Problem(landscape, params, f0, jnp.asarray(lift, acc), acc)
            start = problem.point(f0, g, offset, newton=projection == "anderson")
            start = start._replace(bad=start.bad | start_bad)
            if projection == "gd":
                outcome = _gd_projection(
                    problem, offset, start, projection_steps, projection_step_size,
                    projection_tol,
                )  # fmt: skip
            else:
                outcome = _anderson_projection(
                    problem, offset, start, projection_steps, projection_step_size,
                    projection_tol, anderson_memory,
                )  # fmt: skip
            return outcome.displacement, outcome._replace(displacement=None)

        if callable(radius):
            rho = jnp.asarray(radius(state.count), acc)
            step, outcome = jax.lax.cond(rho == 0, sgd, lambda: roll(rho))
        elif radius == 0:
            step, outcome = sgd()
        else:
            step, outcome = roll(radius)

        bad = outcome.bad
        initial = outcome.initial_norm
        relative = jnp.where(
            initial > 0, outcome.final_norm / jnp.where(initial > 0, initial, 1), 0
        )
        new_updates = jax.tree.map(lambda s: jnp.where(bad, jnp.zeros_like(s), s), step)
        new_state = RBOState(
            count=jnp.where(bad, state.count, optax.safe_increment(state.count)),
            momentum=None
            if not momentum
            else jax.tree.map(lambda old, new: jnp.where(bad, old, new), state.momentum, v),
            grad_evals=1 + outcome.calls,
            projection_steps=jnp.where(bad, 0, outcome.steps),
            safeguard_steps=jnp.where(bad, 0, outcome.safeguard_steps),
            residual=jnp.where(bad, jnp.nan, relative).astype(acc),
            converged=~bad & (relative <= projection_tol),
            skipped=bad,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init, update)
