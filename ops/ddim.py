"""Diffusion over candidate distributions: schedules, q_sample, DDIM (eta 0), re-ranking.

method.md section 4. Timestep k is 0-based: k = 0 is the least noisy step and
alphas_cumprod[k] = abar_{k+1} in the papers' 1-based notation. The network predicts x0.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

__all__ = ["alphas_cumprod", "cosine_alphas_cumprod", "linear_alphas_cumprod", "q_sample", "ddim_sample", "rerank_topk"]

Denoiser = Callable[[Tensor, Tensor], Tensor]


def cosine_alphas_cumprod(T: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal): [T] float64, entry k-1 = abar_k, decreasing in (0, 1].

    betas are capped at max_beta so the last step keeps some signal."""
    if T < 1:
        raise ValueError(f"cosine_alphas_cumprod: T must be >= 1, got {T}")
    t = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(0, max_beta)
    return torch.cumprod(1 - betas, dim=0)


def linear_alphas_cumprod(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Linear-beta schedule as improved-diffusion (and the reference) scale it: betas =
    linspace(beta_start * 1000/T, beta_end * 1000/T, T), [T] float64, entry k-1 = abar_k. The
    scaling makes every T end near abar = 0 (7.7e-6 at T = 50; unscaled it would end at 0.60, and
    DDIM from N(0, I) would not match the forward process)."""
    if T < 1:
        raise ValueError(f"linear_alphas_cumprod: T must be >= 1, got {T}")
    scale = 1000.0 / T
    betas = torch.linspace(beta_start * scale, beta_end * scale, T, dtype=torch.float64).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0)


SCHEDULES = ("cosine", "linear")


def alphas_cumprod(schedule: str, T: int) -> Tensor:
    """The named noise schedule (``stage.gen.schedule``): [T] float64 abar."""
    if schedule == "cosine":
        return cosine_alphas_cumprod(T)
    if schedule == "linear":
        return linear_alphas_cumprod(T)
    raise ValueError(f"stage.gen.schedule must be one of {SCHEDULES}, got {schedule!r}")


def _abar_at(alphas_cumprod: Tensor, k: Tensor, like: Tensor) -> Tensor:
    """alphas_cumprod[k] shaped [B, 1, ...] to broadcast over like's trailing dims."""
    a = alphas_cumprod.to(device=like.device)[k.to(like.device)].to(like.dtype)
    return a.view(-1, *([1] * (like.dim() - 1)))


def q_sample(x0: Tensor, k: Tensor, alphas_cumprod: Tensor, noise: Tensor) -> Tensor:
    """x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) noise; k long [B] in 0..T-1, broadcast over x0's
    trailing dims."""
    T = alphas_cumprod.shape[0]
    if k.dim() != 1 or k.shape[0] != x0.shape[0]:
        raise ValueError(f"q_sample: k must be [B]={x0.shape[0]}, got {tuple(k.shape)}")
    if k.numel() and (int(k.min()) < 0 or int(k.max()) >= T):
        raise ValueError(f"q_sample: timesteps must lie in [0, {T - 1}], got [{int(k.min())}, {int(k.max())}]")
    abar = _abar_at(alphas_cumprod, k, x0)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def ddim_timesteps(T: int, steps: int) -> list[tuple[int, int]]:
    """(k, k_next) pairs from k = T-1 down to k_next = -1 (meaning "return x0"), evenly spaced.

    Same spacing as the DiffusionRet reference (linspace(-1, T-1, steps+1), truncated)."""
    if not 1 <= steps <= T:
        raise ValueError(f"ddim: steps must be in [1, T={T}], got {steps}")
    times = [int(t) for t in torch.linspace(-1, T - 1, steps + 1, dtype=torch.float64).tolist()]
    times = times[::-1]
    return list(zip(times[:-1], times[1:]))


def ddim_sample(denoise: Denoiser, shape: tuple[int, ...], alphas_cumprod: Tensor,
                steps: int | None = None, generator: torch.Generator | None = None,
                clamp: float = 1.0, *, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """Deterministic DDIM (eta = 0) from x_T ~ N(0, I) with an x0-predicting denoiser.

    denoise(x_t [B, K], k [B] long) -> x0_hat [B, K]; x0_hat is clamped to [-clamp, clamp] each
    step; `steps` (<= T, default T) timesteps evenly spaced. Returns the last x0_hat. T = 1 gives a
    single denoiser call. device defaults to the generator's device (else CPU)."""
    T = alphas_cumprod.shape[0]
    steps = T if steps is None else steps
    pairs = ddim_timesteps(T, steps)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    abar = alphas_cumprod.to(device=device, dtype=torch.float64)
    x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    x0_hat = x
    for k, k_next in pairs:
        k_batch = torch.full((shape[0],), k, dtype=torch.long, device=device)
        x0_hat = denoise(x, k_batch).clamp(-clamp, clamp)
        if k_next < 0:
            break
        a, a_next = float(abar[k]), float(abar[k_next])
        eps = (x - math.sqrt(a) * x0_hat) / math.sqrt(1 - a)
        x = math.sqrt(a_next) * x0_hat + math.sqrt(1 - a_next) * eps
    return x0_hat


@torch.no_grad()
def rerank_topk(sim: Tensor, denoise_for: Callable[[Tensor, Tensor, Tensor], Denoiser],
                alphas_cumprod: Tensor, k: int = 32, alpha: float = 1.0, steps: int | None = None,
                block: int = 256, generator: torch.Generator | None = None, sharpness: float = 1.0) -> Tensor:
    """Re-rank each row's top-k candidates with the generator, vectorised over query blocks.

    sim [Nq, Nc]. For each block of queries q (long [b]): top, idx = topk(sim[q], k) [b, k];
    den = denoise_for(q, idx, top) (top: the candidates' scores, for a generator that takes them);
    x0 = ddim_sample(den, (b, k), ...);
    out[q, idx] = sim[q, idx] + alpha * softmax(sharpness * x0, -1). Entries outside the top-k are
    unchanged. sharpness 1 is the reference's; a generator trained with a scaled loss may say otherwise.
    The generator (if given) must live on sim's device."""
    if sim.dim() != 2:
        raise ValueError(f"rerank_topk: sim must be [Nq, Nc], got {tuple(sim.shape)}")
    nq, nc = sim.shape
    if not 1 <= k <= nc:
        raise ValueError(f"rerank_topk: k must be in [1, {nc}] (number of candidates), got {k}")
    work_dtype = torch.promote_types(sim.dtype, torch.float32)
    out = sim.clone()
    for q0 in range(0, nq, block):
        q = torch.arange(q0, min(q0 + block, nq), device=sim.device)
        top_vals, idx = sim[q].topk(k, dim=1)
        den = denoise_for(q, idx, top_vals)
        x0 = ddim_sample(den, (q.shape[0], k), alphas_cumprod, steps=steps, generator=generator,
                         device=sim.device, dtype=work_dtype)
        bonus = alpha * (sharpness * x0).softmax(dim=-1)
        out[q[:, None], idx] = (top_vals.to(work_dtype) + bonus).to(sim.dtype)
    return out
