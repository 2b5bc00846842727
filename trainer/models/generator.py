"""The DiffusionRet generator (method.md section 3): given a query and its candidate pool, predict
the clean distribution x0 over the candidates from a noisy one x_t.

Two instances are trained: ``t2v`` (query text, candidate videos) and ``v2t`` (query video,
candidate texts). Both are permutation-equivariant over candidates. Their inputs are the raw
features (the sentence feature and F' before L2 normalisation), as in the reference: with
tau = 1, normalised inputs would make the text-frame attention nearly uniform.

``stage1_prior`` (``model.gen_prior``; off = the reference's formulation): the generator is also
given each candidate's stage-1 score s_c and predicts a residual over it, x0_hat[c] =
MLP_dec([h ; pair_c]) + beta * s_c, with the decoder's last layer zero at init and no "+ a_c" skip
(a_c carries the sampling noise x_t): a generator that has learned nothing then returns a
monotone function of s, and re-ranking with it leaves the stage-1 ranking unchanged. beta is
learned; it starts at the encoder's logit scale / kl_scale, so that at init the training loss is
stage 1's own cross-entropy over the pool. Such a generator's distribution over candidates is
softmax(kl_scale x x0_hat), the one its loss trains (``output_scale``, a buffer, so an exported
generator carries it); the reference's re-ranking takes softmax(x0_hat).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(k: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=k.device, dtype=torch.float32) / half)
    angles = k.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def attend_frames(query: torch.Tensor, frames: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """sum_f softmax_f(<query, frame_f> / tau) frame_f over real frames only.

    query [..., D], frames [..., F, D], mask [..., F]. Padded frames are excluded before the
    softmax, so the weights renormalise over real frames (the reference masked after it).
    """
    logits = torch.einsum("...d,...fd->...f", query, frames) / tau
    weights = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return torch.einsum("...f,...fd->...d", weights, frames)


class _Generator(nn.Module):
    """Shared layers of both directions; subclasses say what the query and candidates are."""

    def __init__(self, dim: int, tau: float = 1.0, stage1_prior: bool = False):
        super().__init__()
        self.dim = dim
        self.tau = tau
        self.stage1_prior = stage1_prior
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim)
        self.decoder = nn.Sequential(nn.Linear(2 * dim, 2 * dim), nn.ReLU(inplace=True), nn.Linear(2 * dim, 1))
        self.apply(self._init)
        if stage1_prior:
            # [1], not 0-d: DeepSpeed's flat buffers cannot view a 0-d bf16 tensor
            self.prior_scale = nn.Parameter(torch.ones(1))
            self.register_buffer("output_scale", torch.ones(1))
            nn.init.zeros_(self.decoder[-1].weight)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def time_embedding(self, k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.time_mlp(sinusoidal_embedding(k, self.dim).to(dtype))[:, None]  # [B, 1, D]

    def score(self, q: torch.Tensor, cand: torch.Tensor, pair: torch.Tensor, e: torch.Tensor,
              x_t: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        """a = softmax_c(q.k_c + x_t[c]); x0_hat[c] = MLP_dec([Wo(sum_c a_c u_c) ; pair_c]) + a_c, or
        + beta * prior[c] instead of + a_c with ``stage1_prior``."""
        keys = self.wk(cand + e)
        values = self.wv(cand + e)
        attn = ((q * keys).sum(-1) + x_t).softmax(dim=-1)  # [B, K]
        h = self.wo(torch.einsum("bk,bkd->bd", attn, values))
        out = self.decoder(torch.cat([h[:, None].expand_as(pair), pair], dim=-1)).squeeze(-1)
        if not self.stage1_prior:
            return out + attn
        if prior is None:
            raise ValueError("this generator was built with stage1_prior (model.gen_prior=true): pass the "
                             "candidates' stage-1 scores as `prior` [B, K]")
        return out + self.prior_scale * prior.to(out.dtype)


class TextToVideoGenerator(_Generator):
    """``forward`` = ``denoise(text, pool(...), ...)``. The pooling does not depend on the diffusion
    step, so sampling pools once and denoises every step (50 DDIM steps: 50x fewer frame gathers)."""

    def pool(self, text: torch.Tensor, cand_frames: torch.Tensor, cand_mask: torch.Tensor) -> torch.Tensor:
        """v [B, K, D]: candidate video c pooled by the query text (both key source and pair feature)."""
        return attend_frames(text[:, None].expand(-1, cand_frames.shape[1], -1), cand_frames, cand_mask, self.tau)

    def denoise(self, text: torch.Tensor, pooled: torch.Tensor, x_t: torch.Tensor, k: torch.Tensor,
                prior: torch.Tensor | None = None) -> torch.Tensor:
        e = self.time_embedding(k, x_t.dtype)
        return self.score(self.wq(text[:, None] + e), pooled, pooled, e, x_t, prior)

    def forward(self, text: torch.Tensor, cand_frames: torch.Tensor, cand_mask: torch.Tensor,
                x_t: torch.Tensor, k: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """text [B, D] query sentences; cand_frames [B, K, F, D], cand_mask [B, K, F]; x_t [B, K];
        k [B] long; prior [B, K] stage-1 scores (``stage1_prior`` only) -> x0_hat [B, K]."""
        return self.denoise(text, self.pool(text, cand_frames, cand_mask), x_t, k, prior)


class VideoToTextGenerator(_Generator):
    """``forward`` = ``denoise(pool(...), cand_text, ...)``; see ``TextToVideoGenerator``."""

    def pool(self, frames: torch.Tensor, frame_mask: torch.Tensor, cand_text: torch.Tensor) -> torch.Tensor:
        """v [B, K, D]: the query video pooled by candidate text c."""
        n = cand_text.shape[1]
        return attend_frames(cand_text, frames[:, None].expand(-1, n, -1, -1), frame_mask[:, None].expand(-1, n, -1),
                             self.tau)

    def denoise(self, pooled: torch.Tensor, cand_text: torch.Tensor, x_t: torch.Tensor, k: torch.Tensor,
                prior: torch.Tensor | None = None) -> torch.Tensor:
        e = self.time_embedding(k, x_t.dtype)
        # The decoder pairs h with the candidate's own feature: the candidate sentence t_c here,
        # as v_c in t2v (method.md section 3; the reference decodes [h ; t_c]).
        return self.score(self.wq(pooled + e), cand_text, cand_text, e, x_t, prior)

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor, cand_text: torch.Tensor,
                x_t: torch.Tensor, k: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """frames [B, F, D], frame_mask [B, F] of the query videos; cand_text [B, K, D] candidate
        sentences; x_t [B, K]; k [B] long; prior [B, K] (see ``TextToVideoGenerator``) -> x0_hat [B, K]."""
        return self.denoise(self.pool(frames, frame_mask, cand_text), cand_text, x_t, k, prior)


class Generators(nn.Module):
    """Both directions, trained together in stage gen (L_gen = L_t2v + L_v2t)."""

    def __init__(self, dim: int, tau: float = 1.0, stage1_prior: bool = False):
        super().__init__()
        self.stage1_prior = stage1_prior
        self.t2v = TextToVideoGenerator(dim, tau, stage1_prior)
        self.v2t = VideoToTextGenerator(dim, tau, stage1_prior)

    @torch.no_grad()
    def init_prior(self, logit_scale: float, kl_scale: float) -> None:
        """``stage1_prior``: beta = stage 1's logit scale / the loss's kl_scale, and the output scale."""
        for m in (self.t2v, self.v2t):
            m.prior_scale.fill_(logit_scale / kl_scale)
            m.output_scale.fill_(kl_scale)

    def sharpness(self) -> float:
        """What x0_hat is multiplied by before the softmax that re-ranking adds (1 = the reference's)."""
        return float(self.t2v.output_scale) if self.stage1_prior else 1.0

    def num_parameters(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in m.parameters()) for name, m in (("t2v", self.t2v), ("v2t", self.v2t))}
