"""`rbo`: the optax transformation, its step and its statistics."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rollingball import defaults
from rollingball.optax._projection import Outcome, Problem, anderson_projection, gd_projection
from rollingball.optax._state import RBOState
from rollingball.optax._tree import accumulator, combine, inner
from rollingball.spec import validate

Schedule = Callable[[jax.Array], Any]
ScalarOrSchedule = float | Schedule


@dataclass(frozen=True)
class _Config:
    """The hyperparameters of `rbo`, validated."""

    learning_rate: ScalarOrSchedule
    radius: ScalarOrSchedule
    projection: str
    projection_steps: int
    projection_step_size: float
    projection_tol: float
    momentum: float
    weight_decay: float
    loss_scale: float
    anderson_memory: int
    max_update: float | None


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
    config = _Config(
        learning_rate, radius, projection, projection_steps, projection_step_size,
        float(projection_tol), momentum, weight_decay, loss_scale, anderson_memory, max_update,
    )  # fmt: skip

    init = functools.partial(_init, config)
    step = functools.partial(_step, config)
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


def _init(config: _Config, params: Any) -> RBOState:
    """Zero momentum (if any), step count 0, and the statistics of no step."""
    acc = accumulator(params)
    zero = jnp.zeros((), jnp.int32)
    return RBOState(
        count=zero,
        momentum=optax.tree_utils.tree_zeros_like(params) if config.momentum else None,
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


def _landscape_at(config: _Config, value: Any, grad: Any, x: Any, acc: Any
                  ) -> tuple[jax.Array, Any]:  # fmt: skip
    """(f, ∇f) of the landscape κ(loss + λ/2 ‖x‖²) from the loss and its gradient at x."""
    value = jnp.asarray(value, acc)
    if config.weight_decay:
        value = value + 0.5 * config.weight_decay * inner(x, x, acc)
        grad = jax.tree.map(lambda g, p: g + config.weight_decay * p, grad, x)
    if config.loss_scale != 1.0:
        grad = jax.tree.map(lambda g: g * config.loss_scale, grad)
    return value * config.loss_scale, grad


def _tangent(config: _Config, g: Any, buffer: Any) -> Any:
    """v = g, or v = g + μ v_prev (v_prev = 0 before the first step)."""
    if not config.momentum:
        return g
    return jax.tree.map(lambda gi, b: gi + config.momentum * b, g, buffer)


def _sgd(config: _Config, lr: Any, v: Any) -> Any:
    """radius 0: −η v, computed as optax.sgd computes it."""
    learning_rate = config.learning_rate
    if callable(learning_rate):
        return jax.tree.map(lambda vi: jnp.array(-lr, dtype=vi.dtype) * vi, v)
    return jax.tree.map(lambda vi: -learning_rate * vi, v)


def _sgd_moves(config: _Config, lr: Any, grad_sq: jax.Array) -> jax.Array:
    """radius 0: the step −η v is nonzero (η > 0, and g ≠ 0 or momentum)."""
    return (jnp.asarray(lr) > 0) & ((grad_sq > 0) | (config.momentum > 0))


def _step(
    config: _Config,
    updates: Any,
    state: RBOState,
    params: Any,
    value: Any,
    grad: Any,
    value_fn: Callable[..., Any],
    extra_args: dict[str, Any],
) -> tuple[Any, RBOState]:
    """One RBO step from θ = params: the update θ_new − θ and the new state."""
    acc = accumulator(params)
    grad = updates if grad is None else grad
    learning_rate, radius = config.learning_rate, config.radius
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    f0, g = _landscape_at(config, value, grad, params, acc)
    grad_sq = inner(g, g, acc)
    start_bad = ~jnp.isfinite(f0) | ~jnp.isfinite(grad_sq)
    v = _tangent(config, g, state.momentum)
    if not callable(radius) and radius == 0:  # no projection: on the leaves themselves
        zero, norm = jnp.zeros((), jnp.int32), jnp.zeros((), acc)
        outcome = Outcome(
            zero, norm, norm, zero, jnp.zeros((), bool), start_bad, _sgd_moves(config, lr, grad_sq)
        )
        return _finish(config, _sgd(config, lr, v), v, outcome, state, acc)

    value_and_grad = jax.value_and_grad(value_fn)

    def landscape(x: Any) -> tuple[jax.Array, Any]:
        loss, loss_grad = value_and_grad(x, **extra_args)
        return _landscape_at(config, loss, loss_grad, x, acc)

    def roll(rho: Any) -> tuple[Any, Outcome]:
        return _roll(config, landscape, params, f0, g, grad_sq, v, start_bad, lr, rho, acc)

    if callable(radius):
        rho = jnp.asarray(radius(state.count), acc)
        no = jnp.zeros((), jnp.int32), jnp.zeros((), acc), jnp.zeros((), bool)
        skip = Outcome(
            no[0], no[1], no[1], no[0], no[2], start_bad, _sgd_moves(config, lr, grad_sq)
        )
        delta, outcome = jax.lax.cond(
            rho == 0, lambda: (_sgd(config, lr, v), skip), lambda: roll(rho)
        )
    else:
        delta, outcome = roll(radius)
    return _finish(config, delta, v, outcome, state, acc)


def _roll(
    config: _Config, landscape: Callable[[Any], tuple[jax.Array, Any]], params: Any,
    f0: jax.Array, g: Any, grad_sq: jax.Array, v: Any, start_bad: jax.Array, lr: Any, rho: Any,
    acc: Any,
) -> tuple[Any, Outcome]:  # fmt: skip
    """Seat the ball, move its centre along the tangent, project it onto the graph:
    s = √(1 + ‖g‖²), u = θ − θ̃ = ρ g/s + η v, h = ỹ − f(θ) = ρ/s − η ⟨g, v⟩."""
    s = jnp.sqrt(1 + grad_sq)
    offset = combine((rho / s, g), (lr, v))
    lift = rho / s - lr * (grad_sq if not config.momentum else inner(g, v, acc))
    eps = jnp.finfo(jax.tree.leaves(params)[0].dtype).eps  # as torch: the first parameter's
    problem = Problem(landscape, params, f0, jnp.asarray(lift, acc), acc, eps)
    if config.projection == "gd":
        return gd_projection(
            problem, offset, g, start_bad, config.projection_steps,
            config.projection_step_size, config.projection_tol,
        )  # fmt: skip
    return anderson_projection(
        problem, offset, g, grad_sq, start_bad, config.projection_steps,
        config.projection_step_size, config.projection_tol, config.anderson_memory,
    )  # fmt: skip


def _finish(
    config: _Config, delta: Any, v: Any, outcome: Outcome, state: RBOState, acc: Any
) -> tuple[Any, RBOState]:
    """The update (zero when a value was not finite; shortened to max_update) and the new
    state."""
    bad = outcome.bad
    still = bad | ~outcome.moved  # x + δ − δ after rejections: the update is exactly zero
    delta = jax.tree.map(lambda d: jnp.where(still, jnp.zeros_like(d), d), delta)
    bounded = jnp.zeros((), bool)
    if config.max_update is not None:
        norm = jnp.sqrt(inner(delta, delta, acc))
        bounded = ~bad & (norm > config.max_update)
        scale = jnp.where(bounded, config.max_update / jnp.where(bounded, norm, 1), 1)
        delta = jax.tree.map(lambda d: (d * scale).astype(d.dtype), delta)
    initial = outcome.initial_norm
    relative = jnp.where(initial > 0, outcome.final_norm / jnp.where(initial > 0, initial, 1), 0)
    momentum = None
    if config.momentum:
        momentum = jax.tree.map(lambda old, new: jnp.where(bad, old, new), state.momentum, v)
    new_state = RBOState(
        count=jnp.where(bad, state.count, optax.safe_increment(state.count)),
        momentum=momentum,
        grad_evals=1 + outcome.steps,
        projection_steps=jnp.where(bad, 0, outcome.steps),
        safeguard_steps=jnp.where(bad, 0, outcome.safeguard_steps),
        residual=jnp.where(bad, jnp.nan, relative).astype(acc),
        converged=~bad & (relative <= config.projection_tol),
        blind_step=~bad & outcome.blind_step,
        skipped=bad,
        update_bounded=bounded,
        moved=~bad & outcome.moved,
        stall=jnp.where(
            bad, 3, jnp.where(outcome.moved, 0, jnp.where(outcome.steps > 0, 1, 2))
        ).astype(jnp.int32),
    )
    return delta, new_state
