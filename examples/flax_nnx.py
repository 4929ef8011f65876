"""RBO on a Flax NNX model: `nnx.Optimizer` with `rollingball.optax.rbo`, one jitted step.

    pip install 'rollingball[flax]'      # jax, optax and flax (the jax extra has no flax)
    python examples/flax_nnx.py [--steps 200] [--radius 0.1] [--lr 1.0] [--projection gd]

A small MLP learns to tell two noisy rings apart (generated here, no download). RBO evaluates the
loss at several points per step, so `update` needs the loss as a function of the parameters:
`value_fn(params, x, y)` rebuilds the model from its graph definition and the parameters it
is given. Prints the loss and the gradient evaluations RBO spent.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

try:
    from flax import nnx
except ModuleNotFoundError:
    raise SystemExit("examples/flax_nnx.py needs Flax: pip install 'rollingball[flax]'") from None

from rollingball import defaults
from rollingball.optax import rbo


class MLP(nnx.Module):
    def __init__(self, width: int, rngs: nnx.Rngs) -> None:
        self.hidden = nnx.Linear(2, width, rngs=rngs)
        self.middle = nnx.Linear(width, width, rngs=rngs)
        self.out = nnx.Linear(width, 2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.gelu(self.hidden(x))
        x = nnx.gelu(self.middle(x))
        return self.out(x)


@jax.jit(static_argnames="n")
def rings(key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Two noisy concentric rings in the plane (radii 0.5 and 1); labels 0 (inner), 1 (outer)."""
    angle_key, noise_key = jax.random.split(key)
    angle = jax.random.uniform(angle_key, (n,), maxval=2 * jnp.pi)
    labels = jnp.arange(n) % 2
    radius = jnp.where(labels == 0, 0.5, 1.0)[:, None]
    points = radius * jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=1)
    return points + 0.1 * jax.random.normal(noise_key, points.shape), labels


def loss(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit(static_argnames="batch")
def train_step(
    model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array, key: jax.Array, batch: int
) -> jax.Array:
    """One RBO step on a random minibatch of (x, y); returns the loss before the step."""
    index = jax.random.choice(key, x.shape[0], (batch,), replace=False)
    x, y = x[index], y[index]
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def value_fn(params: nnx.State, x: jax.Array, y: jax.Array) -> jax.Array:
        return loss(nnx.merge(graphdef, params, rest), x, y)

    value, grad = jax.value_and_grad(value_fn)(params, x, y)
    # every evaluation inside the step sees the same minibatch: x and y go to value_fn
    optimizer.update(model, grad, value=value, grad=grad, value_fn=value_fn, x=x, y=y)
    return value


@nnx.jit(static_argnums=0)
def create_model(width: int) -> MLP:
    return MLP(width, rngs=nnx.Rngs(0))


@nnx.jit
def accuracy(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return (model(x).argmax(-1) == y).mean()


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--radius", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--projection", choices=["anderson", "gd"], default="anderson")
    parser.add_argument("--projection-steps", type=int, default=defaults.PROJECTION_STEPS)
    args = parser.parse_args(argv)

    model = create_model(args.width)
    tx = rbo(
        learning_rate=args.lr,
        radius=args.radius,
        projection=args.projection,
        projection_steps=args.projection_steps,
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x_all, y_all = rings(jax.random.PRNGKey(1), 2048)
    losses, grad_evals = [], 0
    keys = jax.random.split(jax.random.PRNGKey(2), args.steps)
    for step in range(args.steps):
        losses.append(float(train_step(model, optimizer, x_all, y_all, keys[step], args.batch)))
        grad_evals += int(optax.tree_utils.tree_get(optimizer.opt_state, "grad_evals"))
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.4f}  grad evals so far {grad_evals}")
    train_accuracy = float(accuracy(model, x_all, y_all))
    per_step = grad_evals / args.steps
    print(f"train accuracy {train_accuracy:.3f}, {per_step:.2f} gradient evaluations per step")
    return losses


if __name__ == "__main__":
    main()
