"""Sharpness of a loss at given parameters: Hessian spectrum, trace, average and worst case.

Every routine takes ``loss_fn``, a zero-argument callable returning the scalar loss (it
closes over the model and the data), and ``params``, the list of tensors to perturb or
differentiate. Parameters are left exactly as they were (bit for bit). Evaluation or
training mode (dropout, BatchNorm statistics) is the caller's choice: set it on the model
before calling; these routines never change it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "average_sharpness",
    "dataset_loss",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "worst_case_sharpness",
]

LossFn = Callable[[], Tensor]


def dataset_loss(
    model: nn.Module,
    criterion: Callable[[Tensor, Tensor], Tensor],
    batches: Iterable[tuple[Tensor, Tensor]],
) -> LossFn:
    """L(θ) = Σ_b n_b ℓ_b(θ) / Σ_b n_b: the mean loss over a data set, as a ``loss_fn``.

    ``criterion`` must average over its batch (``reduction="mean"``); batches are weighted by
    their size, so the result is the per-sample mean over the whole data set. ``batches`` is
    iterated on every call (a list of tensors or a ``DataLoader``).
    """

    def loss_fn() -> Tensor:
        total: Tensor | None = None
        count = 0
        for inputs, targets in batches:
            term = criterion(model(inputs), targets) * len(inputs)
            total = term if total is None else total + term
            count += len(inputs)
        if total is None:
            raise ValueError("the data set is empty")
        return total / count

    return loss_fn


def _hvp(loss_fn: LossFn, params: Sequence[Tensor]) -> Callable[[list[Tensor]], list[Tensor]]:
    """v ↦ ∇²f(θ) v by double back-propagation through one retained graph."""
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(), params, create_graph=True)

    def product(vectors: list[Tensor]) -> list[Tensor]:
        with torch.enable_grad():
            return list(torch.autograd.grad(grads, params, vectors, retain_graph=True))

    return product


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _split(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    return [c.view_as(p) for c, p in zip(flat.split([p.numel() for p in like]), like, strict=True)]


def lanczos_top(
    product: Callable[[Tensor], Tensor],
    start: Tensor,
    iterations: int,
    tol: float,
    min_products: int = 1,
) -> tuple[float, Tensor]:
    """(θ, y): the top Ritz pair of a symmetric operator by Lanczos with full
    re-orthogonalisation, from the vector ``start``.

    After j products the largest eigenvalue θ_j of the tridiagonal T_j approximates λ_max with
    residual ‖H y − θ_j y‖ = β_j |s_j| (s the Ritz vector of T_j); it stops when that is
    ≤ tol·|θ_j| (after at least ``min_products``), when the Krylov space is exhausted, or after
    ``iterations`` products. Stores one vector per product; y has unit norm.
    """
    if iterations < 1:
        raise ValueError(f"Lanczos needs iterations >= 1, got {iterations}")
    n = start.numel()
    basis = [start / start.norm()]
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(min(iterations, n)):
        w = product(basis[-1]).detach()
        alphas.append(float(w @ basis[-1]))
        stack = torch.stack(basis)
        for _ in range(2):  # full re-orthogonalisation, twice is enough
            w = w - stack.T @ (stack @ w)
        beta = float(w.norm())
        tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        values, vectors = torch.linalg.eigh(tridiagonal)
        converged = beta * abs(float(vectors[-1, -1])) <= tol * abs(float(values[-1]))
        if (converged and j + 1 >= min_products) or len(basis) == n or beta == 0:
            break
        betas.append(beta)
        basis.append(w / beta)
    ritz = stack.T @ vectors[:, -1].to(stack.dtype)
    return float(values[-1]), ritz / ritz.norm()


def hessian_top_eigenvalue(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    iterations: int = 50,
    tol: float = 1e-7,
    generator: torch.Generator | None = None,
) -> float:
    """λ_max(∇²f(θ)) by Lanczos (`lanczos_top`) on Hessian-vector products, from a random
    start."""
    params = list(params)
    hvp = _hvp(loss_fn, params)
    n = sum(p.numel() for p in params)
    dtype, device = params[0].dtype, params[0].device
    q = torch.randn(n, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    return lanczos_top(lambda v: _flat(hvp(_split(v, params))), q, iterations, tol)[0]


def hessian_trace(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    samples: int = 100,
    generator: torch.Generator | None = None,
) -> float:
    """tr ∇²f(θ) ≈ (1/m) Σ_{i=1}^{m} vᵢᵀ ∇²f(θ) vᵢ, vᵢ Rademacher (Hutchinson).

    Unbiased; the variance of one sample is 2 Σ_{i≠j} H_ij², so the error falls as 1/√m.
    """
    params = list(params)
    hvp = _hvp(loss_fn, params)
    total = 0.0
    for _ in range(samples):
        vs = [
            (torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.dtype) for p in params
        ]
        total += float(sum((v * hv).sum() for v, hv in zip(vs, hvp(vs), strict=True)))
    return total / samples


def _unit_direction(params: Sequence[Tensor], generator: torch.Generator | None) -> list[Tensor]:
    """A direction drawn uniformly from the unit sphere of the joint parameter space."""
    d = [torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype) for p in params]
    norm = math.sqrt(sum(float((t * t).sum()) for t in d))
    return [t / norm for t in d]


@torch.no_grad()
def average_sharpness(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    radius: float,
    samples: int = 100,
    generator: torch.Generator | None = None,
) -> float:
    """E_δ[f(θ + δ)] − f(θ), δ uniform on the sphere ‖δ‖ = ρ (Monte Carlo, ``samples`` draws).

    For a quadratic ½ θᵀAθ at θ = 0 this is ρ² tr(A) / (2n).
    """
    params = list(params)
    saved = [p.detach().clone() for p in params]
    base = float(loss_fn())
    total = 0.0
    try:
        for _ in range(samples):
            for p, p0, u in zip(params, saved, _unit_direction(params, generator), strict=True):
                p.copy_(p0 + radius * u.to(p.device))
            total += float(loss_fn())
    finally:
        for p, p0 in zip(params, saved, strict=True):
            p.copy_(p0)
    return total / samples - base


def worst_case_sharpness(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    radius: float,
    steps: int = 10,
    step_size: float = 0.5,
    generator: torch.Generator | None = None,
) -> float:
    """max_{‖δ‖ ≤ ρ} f(θ + δ) − f(θ), estimated by projected normalised gradient ascent.

    δ₀ = ρ g/‖g‖ (the SAM perturbation; a random direction if g = 0), then
    δ ← Π_ρ(δ + α ρ ∇f(θ+δ)/‖∇f(θ+δ)‖) for ``steps`` steps, Π_ρ the projection on the ball.
    Returns the largest increase seen (a lower bound on the true maximum); costs
    ``steps + 2`` gradient evaluations. For ½ θᵀAθ at θ = 0 the maximum is ½ λ_max ρ².
    """
    params = list(params)
    saved = [p.detach().clone() for p in params]

    def value_and_grad(delta: list[Tensor]) -> tuple[float, list[Tensor]]:
        with torch.no_grad():
            for p, p0, d in zip(params, saved, delta, strict=True):
                p.copy_(p0 + d)
        with torch.enable_grad():
            value = loss_fn()
            grads = torch.autograd.grad(value, params, allow_unused=True)
        return float(value.detach()), [
            torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
        ]

    def unit(vectors: list[Tensor]) -> list[Tensor] | None:
        norm = math.sqrt(sum(float((v * v).sum()) for v in vectors))
        return None if norm == 0 else [v / norm for v in vectors]

    try:
        zero = [torch.zeros_like(p) for p in params]
        base, grads = value_and_grad(zero)
        direction = unit(grads) or _unit_direction(params, generator)
        delta = [radius * u.to(p.device) for u, p in zip(direction, params, strict=True)]
        best = -math.inf
        for _ in range(steps + 1):
            value, grads = value_and_grad(delta)
            best = max(best, value - base)
            ascent = unit(grads)
            if ascent is None:
                break
            delta = [d + step_size * radius * a for d, a in zip(delta, ascent, strict=True)]
            norm = math.sqrt(sum(float((d * d).sum()) for d in delta))
            if norm > radius:
                delta = [d * (radius / norm) for d in delta]
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, saved, strict=True):
                p.copy_(p0)
    return best
