"""JAX: jitted step time of `rollingball.optax.rbo` against the authors' update, side by side.

    python benchmarks/bench_jax.py [--steps 5]

MLP 784-1024-1024-10 (ReLU, float32), batch 256, K = 8 projection iterations with γ = 0.02
(the plain iteration needs γ(1 + ‖∇f‖²) < 2; here ‖∇f‖² ≈ 48 at the start).
The authors' update is re-implemented the way their JAX code runs it: ∇f at θ, then
`lax.fori_loop` of K steps x ← x − γ r(x) with an optax.sgd inner optimizer, each step
re-evaluating f and ∇f at x (K + 1 evaluations, the gradient norm through `ravel_pytree`).
`rbo` in gd mode with projection_tol=0 makes the same update with K evaluations. The default
solver ("anderson", with the budget of the converged projection: K = 20, m = 5) then runs
with projection_tol set to the accuracy the gd update reached (‖r(x)‖/‖r(θ)‖ at the
returned point), so both rows end equally close to the contact point; then `rbo` with the
default projection settings (`rollingball.defaults`) and with radius 0 (SGD). Prints ms per
step, gradient evaluations per step and that accuracy, all in one run, and next to them how
many of the timed steps moved the parameters (each timed step starts from the same point,
after two warm-up steps) and the loss after a timed step, so that a step which moves nothing
cannot pass for a cheap one.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

LR, RADIUS, K, GAMMA = 0.1, 0.5, 8, 0.02


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    return parser.parse_args()


def main() -> None:
    args = parse()
    import jax
    import jax.numpy as jnp
    import optax
    from jax.flatten_util import ravel_pytree

    from rollingball.optax import rbo

    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    sizes = [(784, 1024), (1024, 1024), (1024, 10)]
    params = {
        f"layer{i}": {
            "w": jax.random.normal(keys[i], shape) * jnp.sqrt(2.0 / shape[0]),
            "b": jnp.zeros(shape[1]),
        }
        for i, shape in enumerate(sizes)
    }
    inputs = jax.random.normal(keys[3], (256, 784))
    labels = jax.random.randint(keys[4], (256,), 0, 10)

    def loss_fn(params: Any, inputs: jax.Array, labels: jax.Array) -> jax.Array:
        x = inputs
        for i in range(len(sizes)):
            x = x @ params[f"layer{i}"]["w"] + params[f"layer{i}"]["b"]
            x = jax.nn.relu(x) if i < len(sizes) - 1 else x
        return optax.softmax_cross_entropy_with_integer_labels(x, labels).mean()

    value_and_grad = jax.value_and_grad(loss_fn)

    def authors_step(params: Any, inputs: jax.Array, labels: jax.Array) -> tuple[Any, Any]:
        """Their scheme: centre and target from ∇f(θ), then K re-evaluating sgd steps."""
        value, grad = value_and_grad(params, inputs, labels)
        g2 = jnp.linalg.norm(ravel_pytree(grad)[0]) ** 2
        s = jnp.sqrt(1 + g2)
        target = jax.tree.map(lambda p, g: p - RADIUS * g / s - LR * g, params, grad)
        height = value + RADIUS / s - LR * g2
        inner = optax.sgd(GAMMA)

        def body(_: int, carry: tuple[Any, Any]) -> tuple[Any, Any]:
            state, x = carry
            fx, gx = value_and_grad(x, inputs, labels)
            r = jax.tree.map(lambda xi, ti, gi: (xi - ti) + (fx - height) * gi, x, target, gx)
            update, state = inner.update(r, state, x)
            return state, optax.apply_updates(x, update)

        _, x = jax.lax.fori_loop(0, K, body, (inner.init(params), params))
        return x, None

    def rbo_step(tx: optax.GradientTransformationExtraArgs) -> Callable[..., tuple[Any, Any]]:
        def step(params: Any, state: Any, inputs: jax.Array, labels: jax.Array) -> Any:
            value, grad = value_and_grad(params, inputs, labels)
            updates, state = tx.update(
                grad, state, params, value=value, grad=grad, value_fn=loss_fn, inputs=inputs,
                labels=labels,
            )  # fmt: skip
            return optax.apply_updates(params, updates), state

        return step

    def accuracy(start: Any, end: Any) -> float:
        """‖r(x)‖/‖r(θ)‖ of the projection from θ = start, at x = end (float32)."""
        value, grad = value_and_grad(start, inputs, labels)
        flat_grad, _ = ravel_pytree(grad)
        g2 = flat_grad @ flat_grad
        s = jnp.sqrt(1 + g2)
        theta = ravel_pytree(start)[0]
        target = theta - RADIUS * flat_grad / s - LR * flat_grad
        height = value + RADIUS / s - LR * g2
        fx, gx = value_and_grad(end, inputs, labels)
        x = ravel_pytree(end)[0]
        r = (x - target) + (fx - height) * ravel_pytree(gx)[0]
        r0 = (theta - target) + (value - height) * flat_grad
        return float(jnp.linalg.norm(r) / jnp.linalg.norm(r0))

    def measure(
        name: str,
        step: Callable[..., Any],
        state: Any,
        evals: Callable[[Any], float] | None,
        projects: bool = True,
    ) -> float:
        jitted = jax.jit(step)
        current, current_state = params, state
        for _ in range(2):  # compile and warm up
            current, current_state = jitted(current, current_state, inputs, labels)
        jax.block_until_ready(current)
        start_point = current
        calls, elapsed, moved = 0.0, 0.0, 0
        end = current
        for _ in range(args.steps):
            begin = time.perf_counter()
            end, new_state = jitted(start_point, current_state, inputs, labels)
            jax.block_until_ready(end)
            elapsed += time.perf_counter() - begin
            calls += evals(new_state) if evals else K + 1
            changed = jax.tree.map(lambda a, b: jnp.any(a != b), end, start_point)
            moved += any(bool(c) for c in jax.tree.leaves(changed))
        error = accuracy(start_point, end) if projects else float("nan")
        per_step = elapsed / args.steps * 1e3
        shown = f"{error:11.2e}" if projects else f"{'-':>11s}"
        loss = f"{float(loss_fn(start_point, inputs, labels)):.3f}→"
        loss += f"{float(loss_fn(end, inputs, labels)):.3f}"
        print(
            f"{name:44s} {calls / args.steps:6.1f} {per_step:9.1f} {shown} "
            f"{moved:>3d}/{args.steps:<3d} {loss:>12s}"
        )
        return error

    def grad_evals(state: Any) -> float:
        return float(optax.tree_utils.tree_get(state, "grad_evals"))

    print(f"MLP 784-1024-1024-10, batch 256, K={K}, γ={GAMMA}, lr={LR}, radius={RADIUS}")
    print(f"backend {jax.default_backend()}, {args.steps} timed steps per row")
    print(f"{'update':44s} {'evals':>6s} {'ms/step':>9s} {'‖r‖/‖r₀‖':>11s} moved {'loss':>12s}")

    def authors(params: Any, state: Any, inputs: jax.Array, labels: jax.Array) -> Any:
        return authors_step(params, inputs, labels)

    measure("authors' update (fori_loop, K + 1 evals)", authors, None, None)
    gd = rbo(LR, RADIUS, projection="gd", projection_steps=K, projection_step_size=GAMMA,
             projection_tol=0)  # fmt: skip
    reached = measure("rbo gd, tol=0 (K evals)", rbo_step(gd), gd.init(params), grad_evals)
    anderson = rbo(LR, RADIUS, projection_steps=20, projection_tol=reached, anderson_memory=5)
    measure(
        f"rbo anderson K=20 m=5, tol={reached:.2e}", rbo_step(anderson), anderson.init(params),
        grad_evals,
    )  # fmt: skip
    default = rbo(LR, RADIUS)
    measure("rbo with the default projection", rbo_step(default), default.init(params), grad_evals)
    sgd = rbo(LR, 0.0)
    measure("rbo radius=0 (SGD)", rbo_step(sgd), sgd.init(params), grad_evals, projects=False)


if __name__ == "__main__":
    main()
