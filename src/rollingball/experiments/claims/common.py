"""What the claims experiments share: tasks, models, optimizers, a training loop, figures."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from rollingball.experiments.optimizers import CountingClosure, build_optimizer

Loss = Callable[[Tensor, Tensor], Tensor]

# The exact ("converged") projection and the authors' truncated one, always spelled out:
# the library's defaults may change, these experiments must not.
EXACT: dict[str, Any] = {
    "projection": "anderson",
    "projection_steps": 100,
    "projection_tol": 1e-8,
    "anderson_memory": 5,
}


def truncated(step_size: float, steps: int) -> dict[str, Any]:
    """The authors' projection: K plain steps of size γ from θ, no stopping test."""
    return {
        "projection": "gd",
        "projection_step_size": step_size,
        "projection_steps": steps,
        "projection_tol": 0.0,
    }


@dataclass
class Task:
    """A small classification problem held in memory (float64)."""

    name: str
    x: Tensor
    y: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def features(self) -> int:
        return int(self.x.shape[1])


def load_task(name: str, n_train: int | None = None, n_test: int | None = None) -> Task:
    """MNIST-1D or sklearn digits from the project's data module, flattened, float64."""
    from rollingball.experiments.data import load_data

    bundle = load_data(name)
    x, y = bundle.train.inputs, bundle.train.targets  # type: ignore[attr-defined]
    xt, yt = bundle.test.inputs, bundle.test.targets  # type: ignore[attr-defined]
    x, xt = x.reshape(len(x), -1).double(), xt.reshape(len(xt), -1).double()
    return Task(name, x[:n_train], y[:n_train], xt[:n_test], yt[:n_test])


def mlp(features: int, hidden: Sequence[int], seed: int, activation: str = "tanh") -> nn.Module:
    """Linear → activation per hidden width, then a linear head (10 classes), float64."""
    torch.manual_seed(seed)
    act = {"tanh": nn.Tanh, "gelu": nn.GELU}[activation]
    layers: list[nn.Module] = []
    width = features
    for h in hidden:
        layers += [nn.Linear(width, h), act()]
        width = h
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers).double()


def cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out, y)


def square_loss(out: Tensor, y: Tensor) -> Tensor:
    """½ Σ_classes (out − onehot)², averaged over examples."""
    target = nn.functional.one_hot(y, out.shape[1]).to(out.dtype)
    return 0.5 * ((out - target) ** 2).sum(1).mean()


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def set_params(model: nn.Module, vector: Tensor) -> None:
    start = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(vector[start : start + p.numel()].view_as(p))
            start += p.numel()


def flat_grad(model: nn.Module, loss_fn: Loss, x: Tensor, y: Tensor) -> tuple[float, Tensor]:
    """(f, ∇f) at the model's current parameters."""
    params = list(model.parameters())
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, params)
    return float(loss.detach()), torch.cat([g.reshape(-1) for g in grads])


def hvp(model: nn.Module, loss_fn: Loss, x: Tensor, y: Tensor, vector: Tensor) -> Tensor:
    """∇²f v at the model's current parameters."""
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    out = torch.autograd.grad(flat @ vector, params)
    return torch.cat([o.reshape(-1) for o in out])


def top_eigenvalue(model: nn.Module, loss_fn: Loss, x: Tensor, y: Tensor) -> float:
    """λ_max of the full-batch Hessian (Lanczos, rollingball.landscape.hessian_top_eigenvalue)."""
    from rollingball.landscape.sharpness import hessian_top_eigenvalue

    return hessian_top_eigenvalue(
        lambda: loss_fn(model(x), y),
        list(model.parameters()),
        iterations=30,
        tol=1e-4,
        generator=torch.Generator().manual_seed(0),
    )


def top_eigenpair(
    model: nn.Module,
    loss_fn: Loss,
    x: Tensor,
    y: Tensor,
    start: Tensor | None = None,
    iterations: int = 30,
    tol: float = 1e-4,
    seed: int = 0,
) -> tuple[float, Tensor]:
    """(λ_max, its unit eigenvector) of the full-batch Hessian by Lanczos, warm-startable.

    The same Lanczos as ``hessian_top_eigenvalue`` (full re-orthogonalisation, stop when the
    top Ritz pair's residual β_j |s_j| ≤ tol·|θ_j|), started from ``start`` — the previous
    eigenvector along a trajectory — mixed with a seeded random vector of a third of its
    weight, so that a start orthogonal to the new top eigenvector cannot stop Lanczos at a
    lower one. It takes at least 3 products. Along a slowly moving trajectory the warm start
    needs a few products instead of tens.
    """
    params = list(model.parameters())
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])

    def product(vector: Tensor) -> Tensor:
        out = torch.autograd.grad(flat, params, vector, retain_graph=True)
        return torch.cat([o.reshape(-1) for o in out])

    from rollingball.landscape.sharpness import lanczos_top

    q = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(seed), dtype=flat.dtype)
    q = q / q.norm()
    if start is not None:
        q = start / start.norm() + q / 3
    return lanczos_top(product, q, iterations, tol, min_products=3)


def make_optimizer(name: str, params: Any, **hparams: Any) -> Optimizer:
    """RBO directly (every projection setting, anderson_memory too), others from the registry."""
    if name == "rbo":
        from rollingball import RBO

        return RBO(params, **hparams)
    return build_optimizer(name, params, **hparams)


def make_closure(
    model: nn.Module, opt: Optimizer, loss_fn: Loss, x: Tensor, y: Tensor
) -> Callable[[], Any]:
    def closure() -> Any:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return closure


def one_step(
    model: nn.Module,
    start: Tensor,
    name: str,
    loss_fn: Loss,
    x: Tensor,
    y: Tensor,
    buffer: Tensor | None = None,
    **hparams: Any,
) -> tuple[Tensor, dict[str, Any]]:
    """The step Δθ one optimizer takes from ``start`` on (x, y); the model is left at start.

    ``buffer`` (flat) is the heavy-ball momentum buffer the optimizer holds before the step
    (``momentum_buffer`` in its state, as torch.optim.SGD, USAM and RBO all keep it).
    """
    set_params(model, start)
    opt = make_optimizer(name, model.parameters(), **hparams)
    if buffer is not None:
        begin = 0
        for p in model.parameters():
            piece = buffer[begin : begin + p.numel()].view_as(p)
            opt.state[p]["momentum_buffer"] = piece.clone()
            begin += p.numel()
    opt.step(make_closure(model, opt, loss_fn, x, y))
    delta = flat_params(model) - start
    set_params(model, start)
    return delta, dict(getattr(opt, "last_stats", {}))


def evaluate(model: nn.Module, loss_fn: Loss, task: Task) -> tuple[float, float]:
    """(mean training loss over the whole training set, test accuracy in %)."""
    with torch.no_grad():
        loss = float(loss_fn(model(task.x), task.y))
        accuracy = float((model(task.x_test).argmax(1) == task.y_test).double().mean()) * 100
    return loss, accuracy


def train(
    model: nn.Module,
    name: str,
    task: Task,
    epochs: int,
    batch_size: int,
    seed: int,
    loss_fn: Loss = cross_entropy,
    **hparams: Any,
) -> dict[str, Any]:
    """Minibatch training with a constant learning rate, one shuffle per epoch (seeded).

    Returns per-epoch curves (epoch 0 = the start): full training loss, test accuracy,
    closure calls so far; and the fraction of RBO steps whose projection converged. A
    non-finite loss (or RBO's refusal of a non-finite step) ends the run as diverged.
    """
    opt = make_optimizer(name, model.parameters(), **hparams)
    generator = torch.Generator().manual_seed(seed)
    loss, acc = evaluate(model, loss_fn, task)
    curve: dict[str, list[float]] = {
        "epoch": [0],
        "train_loss": [loss],
        "test_accuracy": [acc],
        "calls": [0],
    }
    calls, steps, converged, diverged = 0, 0, 0, False
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(task.y), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            counted = CountingClosure(make_closure(model, opt, loss_fn, task.x[idx], task.y[idx]))
            try:
                value = opt.step(counted)  # type: ignore[arg-type]
            except FloatingPointError:
                diverged = True
                break
            calls += counted.calls
            steps += 1
            converged += bool(getattr(opt, "last_stats", {}).get("converged", True))
            if not math.isfinite(float(torch.as_tensor(value).detach())):
                diverged = True
                break
        loss, acc = evaluate(model, loss_fn, task)
        diverged = diverged or not math.isfinite(loss)
        if diverged:
            break
        for key, value in (("epoch", epoch), ("train_loss", loss), ("test_accuracy", acc)):
            curve[key].append(value)
        curve["calls"].append(calls)
    return {
        **curve,
        "diverged": diverged,
        "steps": steps,
        "converged_fraction": converged / max(steps, 1),
    }


def figure(rows: int, cols: int, width: float = 4.2, height: float = 3.4) -> tuple[Any, Any]:
    """A matplotlib Figure (no pyplot state) and its axes, always a 2-D array."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def save(fig: Any, out: Path, stem: str, results: dict[str, Any]) -> Path:
    """Write ``stem``.png (palette PNG) and ``stem``.json (the numbers behind it) in ``out``."""
    from rollingball.landscape.plots import save_png

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.png"
    save_png(fig, path)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    return path


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table with numbers rounded for reading."""

    def cell(v: Any) -> str:
        if isinstance(v, bool) or not isinstance(v, float):
            return str(v)
        if v == 0 or not math.isfinite(v):
            return str(v)
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4g}"

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
