"""LAFF: lightweight attentional feature fusion (Hu et al., ECCV 2022; method.md section 5).

k features f_i (several video-level or frame-level features, or several text encoders) are fused
per head h: f_i' = tanh(Linear_i^h(f_i)), a^h = softmax_i(w_h . f_i'), fused_h = sum_i a^h_i f_i'.
Each head has its own space of size out_dim // heads (paper: 2048 / 8). The attention weights are
returned so users can see which feature matters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LAFF", "multihead_similarity"]


class LAFF(nn.Module):
    """Multi-head LAFF block.

    Per feature i there is one ``nn.Linear(in_dims[i], out_dim)`` whose output rows are split into
    ``heads`` consecutive chunks of out_dim // heads: chunk h *is* head h's own Linear_i^h into its
    own space (independent weights, the same init as separate Linears), computed in one matmul.
    Per head the attention is a Linear(d_h, 1) shared by the k features, without bias: a bias
    common to all k logits cancels in the softmax and would never receive a gradient.
    """

    def __init__(self, in_dims: list[int], out_dim: int, heads: int = 1):
        super().__init__()
        if not in_dims:
            raise ValueError("LAFF: in_dims is empty; give the size of each feature to fuse")
        if heads < 1 or out_dim % heads:
            raise ValueError(f"LAFF: out_dim ({out_dim}) must be a positive multiple of heads ({heads})")
        self.in_dims = list(in_dims)
        self.heads = heads
        self.head_dim = out_dim // heads
        self.project = nn.ModuleList(nn.Linear(d, out_dim) for d in in_dims)
        # Row h is head h's Linear(d_h, 1); initialised like nn.Linear(d_h, 1).
        bound = self.head_dim ** -0.5
        self.attend = nn.Parameter(torch.empty(heads, self.head_dim).uniform_(-bound, bound))

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, Tensor]:
        """feats: k tensors [..., in_dims[i]] with equal leading shapes ->
        (fused [..., heads, out_dim // heads], attention [..., heads, k])."""
        if len(feats) != len(self.in_dims):
            raise ValueError(f"LAFF: built for {len(self.in_dims)} features, got {len(feats)}")
        lead = feats[0].shape[:-1]
        for i, (f, d) in enumerate(zip(feats, self.in_dims)):
            if f.shape[-1] != d or f.shape[:-1] != lead:
                raise ValueError(f"LAFF: feature {i} must be [{', '.join(map(str, lead))}, {d}] "
                                 f"(leading dims of feature 0, in_dims[{i}]), got {tuple(f.shape)}")
        # [..., k, heads, d_h]
        projected = torch.stack([torch.tanh(lin(f)).unflatten(-1, (self.heads, self.head_dim))
                                 for lin, f in zip(self.project, feats)], dim=-3)
        logits = (projected * self.attend).sum(dim=-1)  # [..., k, heads]
        attention = logits.softmax(dim=-2)
        fused = (attention.unsqueeze(-1) * projected).sum(dim=-3)  # [..., heads, d_h]
        return fused, attention.transpose(-1, -2)


def multihead_similarity(text_fused: Tensor, video_fused: Tensor) -> tuple[Tensor, Tensor]:
    """Cosine similarity per head: text_fused [Nt, H, d], video_fused [Nv, H, d] ->
    (mean over heads [Nt, Nv], per head [H, Nt, Nv]). LAFF sums the contrastive loss over
    heads (one loss per ``per_head[h]``) and ranks with the mean."""
    if text_fused.dim() != 3 or text_fused.shape[1:] != video_fused.shape[1:] or video_fused.dim() != 3:
        raise ValueError(f"multihead_similarity: expected [Nt, H, d] and [Nv, H, d] with the same H and d, "
                         f"got {tuple(text_fused.shape)} and {tuple(video_fused.shape)}")
    per_head = torch.einsum("ahd,bhd->hab", F.normalize(text_fused, dim=-1), F.normalize(video_fused, dim=-1))
    return per_head.mean(dim=0), per_head
