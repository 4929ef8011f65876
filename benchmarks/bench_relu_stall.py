"""RBO on a He-initialised ReLU MLP, torch and optax side by side: does every step move?

    python benchmarks/bench_relu_stall.py [--steps 8] [--batch 256] [--threads 1]
        [--frameworks torch jax] [--rule current|halving|...]
    python benchmarks/bench_relu_stall.py --rules    # the rules side by side, torch, defaults

MLP 784-1024-1024-10 (ReLU, float32; `--widths` for others), weights normal with std
√(2/fan_in) and zero biases (He initialisation), one batch of 256 standard normal inputs with
random labels, lr 0.1, ρ = 0.5: the setting of `benchmarks/bench_jax.py` and
`benchmarks/bench_overhead.py`. The same initial weights and batch in both frameworks. For SGD
and RBO at several projection budgets it prints the loss at the start and after the steps (one
more forward pass, not counted), the mean rejected trial points per step (`safeguard_steps`),
the median relative residual, the closure calls of all steps, and the steps that left the
parameters where they were ("still": ‖θ⁺ − θ‖ ≤ 1e-5‖θ‖, found from the parameters,
independently of `last_stats`; a step that goes to a trial point and back, x + δ − δ, moves
them by round-off only). `--rule` sets the projection's rule for rejected trial points
(`RULES`: the bounds of the backtracking factor on γ after a rejected plain step, and the most
evaluations that rejections add to the budget; `AndersonProjection.backtrack` and
`.extension`, in optax `ANDERSON_BACKTRACK` and `ANDERSON_EXTENSION`): `halving` is RBO's rule
before, which on this MLP leaves the ball where it was on most steps. `--rules` prints RBO at
its default budget under every rule (torch).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from collections.abc import Callable
from typing import Any

import numpy as np

LR, RADIUS, BATCH = 0.1, 0.5, 256
STILL = 1e-5  # a step shorter than this relative to ‖θ‖ moved nothing (round-off only)
SIZES = ((784, 1024), (1024, 1024), (1024, 10))
# name: RBO keyword arguments beyond lr and radius (None: SGD)
ROWS: dict[str, dict[str, Any] | None] = {
    "SGD lr 0.1": None,
    "RBO default": {},
    "projection_steps=3": {"projection_steps": 3},
    "projection_steps=5": {"projection_steps": 5},
    "projection_steps=20, m=5": {"projection_steps": 20, "anderson_memory": 5},
}


def problem(sizes: tuple[tuple[int, int], ...] = SIZES, batch: int = BATCH, seed: int = 0) -> Any:
    """He-initialised weights [(W, b)] (W of shape (out, in), float32) and a batch (x, y)."""
    rng = np.random.default_rng(seed)
    weights = [
        (
            (rng.standard_normal((fan_out, fan_in)) * np.sqrt(2.0 / fan_in)).astype(np.float32),
            np.zeros(fan_out, np.float32),
        )
        for fan_in, fan_out in sizes
    ]
    x = rng.standard_normal((batch, sizes[0][0])).astype(np.float32)
    y = rng.integers(0, sizes[-1][1], batch)
    return weights, x, y


Row = tuple[float, float, float, float, int, int]  # start, end, rejections, residual, calls, still


# rule: (bounds of the factor on γ after a rejected plain step, evaluations rejections add)
RULES: dict[str, tuple[tuple[float, float], int]] = {
    "current": ((0.1, 0.5), 2),  # quadratic interpolation, up to 2 added (RBO's default)
    "halving": ((0.5, 0.5), 0),  # RBO's rule before
    "halving+2": ((0.5, 0.5), 2),
    "interpolation+0": ((0.1, 0.5), 0),
    "interpolation+1": ((0.1, 0.5), 1),
}


def set_rule(name: str) -> None:
    """Make both frameworks' Anderson solvers follow the rule `name` of `RULES`."""
    import rollingball.optim.rbo as torch_rbo
    from rollingball.optim import projection

    backtrack, extension = RULES[name]

    def make_solver(*args: Any) -> Any:
        solver = projection.make_solver(*args)
        if isinstance(solver, projection.AndersonProjection):
            solver.backtrack, solver.extension = backtrack, extension
        return solver

    torch_rbo.make_solver = make_solver  # type: ignore[assignment]
    try:
        import rollingball.optax._projection as optax_rbo
    except ImportError:  # no jax
        return
    optax_rbo.ANDERSON_BACKTRACK, optax_rbo.ANDERSON_EXTENSION = backtrack, extension


def run_torch(weights: Any, x: Any, y: Any, options: dict[str, Any] | None, steps: int) -> Row:
    import torch
    from torch import nn

    from rollingball import RBO

    layers: list[nn.Module] = []
    for w, b in weights:
        linear = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(w))
            linear.bias.copy_(torch.from_numpy(b))
        layers += [linear, nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    opt: Any = (
        torch.optim.SGD(model.parameters(), lr=LR)
        if options is None
        else RBO(model.parameters(), lr=LR, radius=RADIUS, **options)
    )
    calls = [0]

    def closure() -> torch.Tensor:
        calls[0] += 1
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        return loss

    with torch.no_grad():
        start = float(nn.functional.cross_entropy(model(inputs), labels))
    rejections, residuals, still = [], [], 0
    for _ in range(steps):
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        opt.step(closure)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        still += bool(torch.linalg.vector_norm(after - before) <= STILL * before.norm())
        if options is not None:
            rejections.append(opt.last_stats["safeguard_steps"])
            residuals.append(opt.last_stats["residual"])
    with torch.no_grad():
        end = float(nn.functional.cross_entropy(model(inputs), labels))
    return _row(start, end, rejections, residuals, calls[0], still)


def run_jax(weights: Any, x: Any, y: Any, options: dict[str, Any] | None, steps: int) -> Row:
    import jax
    import jax.numpy as jnp
    import optax
    from optax.tree_utils import tree_get

    from rollingball.optax import rbo

    params = [{"w": jnp.asarray(w.T), "b": jnp.asarray(b)} for w, b in weights]
    inputs, labels = jnp.asarray(x), jnp.asarray(y)

    def loss_fn(params: Any, inputs: jax.Array, labels: jax.Array) -> jax.Array:
        h = inputs
        for i, layer in enumerate(params):
            h = h @ layer["w"] + layer["b"]
            h = jax.nn.relu(h) if i < len(params) - 1 else h
        return optax.softmax_cross_entropy_with_integer_labels(h, labels).mean()

    tx: Any = optax.sgd(LR) if options is None else rbo(LR, RADIUS, **options)
    state = tx.init(params)

    @jax.jit
    def step(params: Any, state: Any) -> tuple[Any, Any]:
        value, grad = jax.value_and_grad(loss_fn)(params, inputs, labels)
        if options is None:
            updates, state = tx.update(grad, state, params)
        else:
            updates, state = tx.update(
                grad, state, params, value=value, grad=grad, value_fn=loss_fn, inputs=inputs,
                labels=labels,
            )  # fmt: skip
        return optax.apply_updates(params, updates), state

    start = float(loss_fn(params, inputs, labels))
    rejections, residuals, calls, still = [], [], 0, 0
    for _ in range(steps):
        new, state = step(params, state)
        change = sum(
            float(jnp.sum((a - b) ** 2))
            for a, b in zip(*map(jax.tree.leaves, (new, params)), strict=True)
        )
        size = sum(float(jnp.sum(a**2)) for a in jax.tree.leaves(params))
        still += change <= STILL**2 * size
        params = new
        if options is None:
            calls += 1
        else:
            calls += int(tree_get(state, "grad_evals"))
            rejections.append(int(tree_get(state, "safeguard_steps")))
            residuals.append(float(tree_get(state, "residual")))
    end = float(loss_fn(params, inputs, labels))
    return _row(start, end, rejections, residuals, calls, still)


def _row(
    start: float, end: float, rejections: list[int], residuals: list[float], calls: int, still: int
) -> Row:
    mean = statistics.fmean(rejections) if rejections else float("nan")
    median = statistics.median(residuals) if residuals else float("nan")
    return start, end, mean, median, calls, still


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument(
        "--widths", default="784,1024,1024,10", help="layer widths, inputs first (784,1024,…)"
    )
    parser.add_argument("--rule", choices=tuple(RULES), default="current")
    parser.add_argument("--rules", action="store_true", help="every rule, torch, defaults")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--frameworks", nargs="+", choices=("torch", "jax"), default=["torch", "jax"]
    )
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    if len(widths) < 2 or min(widths) < 1:
        parser.error("--widths needs at least two positive integers, e.g. 64,256,256,10")
    weights, x, y = problem(tuple(itertools.pairwise(widths)), batch=args.batch)
    set_rule(args.rule)
    runners: dict[str, Callable[..., Row]] = {"torch": run_torch, "jax": run_jax}
    if "torch" in args.frameworks:
        import torch

        torch.set_num_threads(args.threads)
    rule = "every rule" if args.rules else f"rule for rejected trial points: {args.rule}"
    print(f"ReLU MLP {'-'.join(map(str, widths))}, He init, batch {args.batch}, lr {LR}, "
          f"radius {RADIUS}, {args.steps} steps, float32, {rule}")  # fmt: skip
    if args.rules:
        header = f"{'rule (torch, RBO defaults)':26s} {'loss start → end':>18s}"
        print(f"{header} {'rejections/step':>16s} {'calls':>6s} {'still':>6s}")
        sgd = run_torch(weights, x, y, None, args.steps)
        print(f"{'SGD lr 0.1':26s} {f'{sgd[0]:.3f} → {sgd[1]:.3f}':>18s} {'–':>16s} "
              f"{sgd[4]:6d} {sgd[5]:6d}")  # fmt: skip
        for name in RULES:
            set_rule(name)
            start, end, rejections, _, calls, still = run_torch(weights, x, y, {}, args.steps)
            loss = f"{start:.3f} → {end:.3f}"
            print(f"{name:26s} {loss:>18s} {rejections:16.2f} {calls:6d} {still:6d}")
        return
    for framework in args.frameworks:
        print(f"\n{framework}")
        header = f"{'optimizer':26s} {'loss start → end':>18s} {'rejections/step':>16s}"
        print(f"{header} {'median residual':>16s} {'calls':>6s} {'still':>6s}")
        for name, options in ROWS.items():
            start, end, rejections, residual, calls, still = runners[framework](
                weights, x, y, options, args.steps
            )
            shown = "–" if options is None else f"{rejections:.2f}"
            shown_r = "–" if options is None else f"{residual:.3g}"
            loss = f"{start:.3f} → {end:.3f}"
            print(f"{name:26s} {loss:>18s} {shown:>16s} {shown_r:>16s} {calls:6d} {still:6d}")


if __name__ == "__main__":
    main()
