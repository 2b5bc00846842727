"""Schedules, q_sample, DDIM sampling vs a hand-written loop, top-k re-ranking."""

import math

import pytest
import torch

from ops.ddim import (cosine_alphas_cumprod, ddim_sample, linear_alphas_cumprod, q_sample,
                      rerank_topk)


@pytest.mark.parametrize("make", [cosine_alphas_cumprod, linear_alphas_cumprod])
@pytest.mark.parametrize("T", [1, 10, 50, 1000])
def test_schedules_are_decreasing_in_unit_interval(make, T):
    abar = make(T)
    assert abar.shape == (T,)
    assert bool((abar > 0).all()) and bool((abar <= 1).all())
    assert bool((abar[1:] < abar[:-1]).all())


@pytest.mark.parametrize("T", [50, 100, 1000])
def test_linear_schedule_is_improved_diffusions(T):
    """method.md section 4: betas = linspace(1e-4 * 1000/T, 0.02 * 1000/T, T), so every T ends near
    abar = 0 (unscaled, T = 50 would end at 0.60 and DDIM from N(0, I) would not match)."""
    import numpy as np

    scale = 1000 / T
    expected = np.cumprod(1 - np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64))
    abar = linear_alphas_cumprod(T)
    np.testing.assert_allclose(abar.numpy(), expected, rtol=1e-12)
    assert float(abar[-1]) < 1e-4
    if T == 50:
        assert float(abar[-1]) == pytest.approx(7.7e-6, rel=0.05)


def test_cosine_schedule_caps_beta():
    abar = cosine_alphas_cumprod(50, max_beta=0.999)
    betas = 1 - abar / torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    assert float(betas.max()) <= 0.999 + 1e-12
    assert float(abar[0]) > 0.99  # almost no noise at the first step


def test_q_sample_broadcasts_per_row():
    abar = linear_alphas_cumprod(10)
    x0, noise = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    k = torch.tensor([0, 5, 9])
    x = q_sample(x0, k, abar, noise)
    for b in range(3):
        a = float(abar[k[b]])
        torch.testing.assert_close(x[b], math.sqrt(a) * x0[b] + math.sqrt(1 - a) * noise[b])
    with pytest.raises(ValueError, match="timesteps"):
        q_sample(x0, torch.tensor([0, 1, 10]), abar, noise)


def _denoiser():
    w = torch.linspace(-1, 1, 6, dtype=torch.float64)

    def denoise(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return torch.tanh(0.7 * x + w * (k[:, None].double() / 10 + 0.3))

    return denoise


def _reference_ddim(denoise, x, abar, steps):
    """Direct DDIM eta=0 loop, written out from the paper's update."""
    T = abar.shape[0]
    times = [int(t) for t in torch.linspace(-1, T - 1, steps + 1).tolist()][::-1]
    x0 = None
    for t, t_next in zip(times[:-1], times[1:]):
        x0 = denoise(x, torch.full((x.shape[0],), t)).clamp(-1, 1)
        if t_next < 0:
            return x0
        eps = (x - abar[t].sqrt() * x0) / (1 - abar[t]).sqrt()
        x = abar[t_next].sqrt() * x0 + (1 - abar[t_next]).sqrt() * eps
    return x0


@pytest.mark.parametrize("T,steps", [(1, None), (50, None), (50, 10), (50, 7)])
def test_ddim_matches_hand_written_loop_float64(T, steps):
    abar = cosine_alphas_cumprod(T)
    calls = []
    denoise = _denoiser()

    def counting(x, k):
        calls.append(int(k[0]))
        return denoise(x, k)

    out = ddim_sample(counting, (4, 6), abar, steps=steps,
                      generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x_T = torch.randn((4, 6), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = _reference_ddim(denoise, x_T, abar, steps or T)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert len(calls) == (steps or T) and calls[0] == T - 1
    assert all(a > b for a, b in zip(calls, calls[1:]))
    if steps is None:
        assert calls[-1] == 0


def test_ddim_rejects_too_many_steps():
    with pytest.raises(ValueError, match="steps"):
        ddim_sample(_denoiser(), (1, 6), cosine_alphas_cumprod(5), steps=6)


def test_rerank_changes_only_topk_and_promotes_the_favoured_candidate():
    g = torch.Generator().manual_seed(0)
    nq, nc, k = 7, 40, 8
    sim = torch.rand(nq, nc, generator=g)
    top_idx = sim.topk(k, dim=1).indices
    favoured = top_idx[:, k - 1]  # the weakest of each row's top-k
    seen_queries = []

    def denoise_for(q, idx, scores):
        seen_queries.append(q.clone())
        assert idx.shape == (q.shape[0], k)
        assert torch.equal(scores, sim[q[:, None], idx])  # the candidates' own scores, for a generator that takes them
        hit = idx == favoured[q][:, None]

        def denoise(x, t):
            return torch.where(hit, 1.0, -1.0).to(x.dtype)
        return denoise

    out = rerank_topk(sim, denoise_for, cosine_alphas_cumprod(50), k=k, alpha=10.0, block=3,
                      generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.cat(seen_queries), torch.arange(nq))  # blocks of 3, every query once
    in_topk = torch.zeros(nq, nc, dtype=torch.bool).scatter_(1, top_idx, True)
    assert torch.equal(out[~in_topk], sim[~in_topk])
    assert bool((out[in_topk] > sim[in_topk]).all())
    assert torch.equal(out.argmax(dim=1), favoured)
    # softmax bonus sums to alpha over each row's top-k
    torch.testing.assert_close((out - sim).sum(dim=1), torch.full((nq,), 10.0))
