"""Loss slices: filter normalisation, exact restoration, agreement with direct evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rollingball.landscape.ironing import iron
from rollingball.landscape.sharpness import dataset_loss
from rollingball.landscape.slices import filter_normalized_direction, ironed_slices, loss_slice


def small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    model = model.double().eval()
    x = torch.randn(50, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (50,))
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    return model, dataset_loss(model, nn.functional.cross_entropy, batches)


def test_filter_normalisation():
    model, _ = small_model()
    params = list(model.parameters())
    d = filter_normalized_direction(params, generator=torch.Generator().manual_seed(0))
    for p, v in zip(params, d, strict=True):
        assert v.shape == p.shape
        if p.dim() == 1:
            assert torch.equal(v, torch.zeros_like(p))  # biases and BatchNorm left out
        else:
            torch.testing.assert_close(v.norm(dim=1), p.norm(dim=1), rtol=1e-12, atol=0)
    included = filter_normalized_direction(
        params, include_1d=True, generator=torch.Generator().manual_seed(0)
    )
    for p, v in zip(params, included, strict=True):
        if p.dim() == 1:  # rescaled as one filter; a zero tensor (BatchNorm bias) stays zero
            assert float(v.norm()) == pytest.approx(float(p.detach().norm()), rel=1e-12)
            assert float(p.detach().norm()) == 0 or not torch.equal(v, p.detach())


def test_direction_is_reproducible_with_a_generator():
    model, _ = small_model()
    params = list(model.parameters())
    a = filter_normalized_direction(params, generator=torch.Generator().manual_seed(5))
    b = filter_normalized_direction(params, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_slice_restores_parameters_and_matches_direct_evaluation():
    model, loss_fn = small_model()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    buffers = [b.clone() for b in model.buffers()]
    g = torch.Generator().manual_seed(1)
    d1 = filter_normalized_direction(params, generator=g)
    d2 = filter_normalized_direction(params, generator=g)
    alphas, betas = np.linspace(-1, 1, 5), np.linspace(-0.5, 0.5, 4)
    values = loss_slice(loss_fn, params, [d1, d2], [alphas, betas])
    assert values.shape == (5, 4)
    for p, q in zip(params, before, strict=True):
        assert torch.equal(p, q)
        assert p.grad is None
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers, strict=True))
    for i, j in [(0, 0), (2, 1), (4, 3), (1, 2)]:
        with torch.no_grad():
            for p, q, u, v in zip(params, before, d1, d2, strict=True):
                p.copy_(q + alphas[i] * u + betas[j] * v)
            direct = float(loss_fn())
            for p, q in zip(params, before, strict=True):
                p.copy_(q)
        assert values[i, j] == pytest.approx(direct, rel=1e-13, abs=1e-15)
    assert values[2, 0] != values[2, 3]  # the slice moves along β too


def test_one_dimensional_slice_at_zero_is_the_trained_loss():
    model, loss_fn = small_model()
    params = list(model.parameters())
    d = filter_normalized_direction(params, generator=torch.Generator().manual_seed(2))
    alphas = np.linspace(-1, 1, 7)
    values = loss_slice(loss_fn, params, [d], [alphas], progress=True)
    with torch.no_grad():
        assert values[3] == float(loss_fn())
    assert values.shape == (7,)
    assert np.all(np.isfinite(values))


def test_parameters_restored_when_the_loss_raises():
    model, loss_fn = small_model()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    calls = 0

    def failing() -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("out of memory")
        return loss_fn()

    d = filter_normalized_direction(params)
    with pytest.raises(RuntimeError, match="out of memory"):
        loss_slice(failing, params, [d], [np.linspace(-1, 1, 5)])
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))


def test_ironed_slices_use_the_grid_spacing():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(9, 7))
    a, b = np.linspace(-1, 1, 9), np.linspace(-0.3, 0.3, 7)
    out = ironed_slices(values, [a, b], [0.1, 0.45])
    assert set(out) == {0.1, 0.45}
    np.testing.assert_allclose(out[0.45], iron(values, (0.25, 0.1), 0.45), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="evenly spaced"):
        ironed_slices(values, [np.geomspace(1, 2, 9), b], [0.1])


def test_refuses_wrong_number_of_directions():
    model, loss_fn = small_model()
    params = list(model.parameters())
    d = filter_normalized_direction(params)
    with pytest.raises(ValueError, match="one or two"):
        loss_slice(loss_fn, params, [d, d], [np.zeros(2)])
