"""Losses of both stages (method.md sections 2 and 4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def positive_targets(query_group: torch.Tensor, cand_group: torch.Tensor) -> torch.Tensor:
    """Soft targets over a pool: every candidate of the query's video is a positive, with equal
    mass (several captions of one video in a pool are positives of each other; the reference
    builds this and then uses the diagonal)."""
    pos = (query_group[:, None] == cand_group[None, :]).float()
    return pos / pos.sum(dim=1, keepdim=True)


def contrastive_loss(sim: torch.Tensor, scale: torch.Tensor, text_group: torch.Tensor,
                     video_group: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over the pool with multi-positive soft targets.

    sim [Nt, Nv]; text_group [Nt], video_group [Nv]: ids of the video each row/column belongs to.
    """
    logits = scale * sim
    loss_t2v = torch.sum(-positive_targets(text_group, video_group) * F.log_softmax(logits, dim=1), dim=1).mean()
    loss_v2t = torch.sum(-positive_targets(video_group, text_group) * F.log_softmax(logits.t(), dim=1), dim=1).mean()
    return (loss_t2v + loss_v2t) / 2


def diffusion_loss(x0_hat: torch.Tensor, positive: torch.Tensor, kind: str, kl_scale: float) -> torch.Tensor:
    """x0_hat [B, K]; positive [B] = the true candidate's column.

    ``kl``: cross-entropy(kl_scale * x0_hat, positive) = KL(one-hot || softmax(kl_scale x0_hat));
    ``mse``: the ablation, against the one-hot x0.
    """
    if kind == "kl":
        return F.cross_entropy(kl_scale * x0_hat, positive)
    if kind == "mse":
        return F.mse_loss(x0_hat, F.one_hot(positive, x0_hat.shape[1]).to(x0_hat.dtype))
    raise ValueError(f"stage.gen.loss must be 'kl' or 'mse', got {kind!r}")
