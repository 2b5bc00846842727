"""Retrieval metrics (method.md section 6): ranks, R@k, median and mean rank.

A rank is 1 + the number of other candidates scoring at least as high as the true one: a tie is
not a hit (pessimistic), so a collapsed model scoring every candidate equally ranks last, never
first. With several captions per video the gallery holds each video once: t2v ranks each caption
against the videos; v2t represents each rival video by its best-scoring caption and ranks the
query video among videos (the reference's and the published convention)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["ranks_from_similarity", "recall_metrics", "retrieval_metrics", "video_scores"]


def _check_sim_target(sim: Tensor, target: Tensor, who: str) -> None:
    if sim.dim() != 2:
        raise ValueError(f"{who}: similarity must be [Nq, Nc], got shape {tuple(sim.shape)}")
    if target.dim() != 1 or target.shape[0] != sim.shape[0]:
        raise ValueError(f"{who}: target must be [Nq]={sim.shape[0]} long, got shape {tuple(target.shape)}")
    if target.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{who}: target must be an integer tensor, got {target.dtype}")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= sim.shape[1]):
        raise ValueError(f"{who}: target indices must lie in [0, {sim.shape[1]}), got range "
                         f"[{int(target.min())}, {int(target.max())}]")


def ranks_from_similarity(sim: Tensor, target: Tensor, block: int = 1024) -> Tensor:
    """Rank of column target[q] in row q of sim [Nq, Nc], best first, starting at 1.

    rank = 1 + #other candidates scoring at least as high: a tie is not a hit (method.md section 6),
    so a collapsed model that scores everything equally ranks last, not first. Rows are processed in blocks of
    `block` so memory stays O(block * Nc). Returns long [Nq] on sim's device."""
    _check_sim_target(sim, target, "ranks_from_similarity")
    target = target.to(device=sim.device, dtype=torch.long)
    ranks = torch.empty(sim.shape[0], dtype=torch.long, device=sim.device)
    for r0 in range(0, sim.shape[0], block):
        rows = sim[r0:r0 + block]
        true_score = rows.gather(1, target[r0:r0 + block, None])
        ranks[r0:r0 + block] = (rows >= true_score).sum(dim=1)  # counts the true item itself once
    return ranks


def recall_metrics(ranks: Tensor, ks: Sequence[int] = (1, 5, 10, 50)) -> dict[str, float]:
    """{"R1", "R5", ...} in percent, "MdR" (median rank), "MnR" (mean rank) from 1-based ranks.

    The median of an even count is the mean of the two middle ranks (numpy's convention)."""
    if ranks.numel() == 0:
        raise ValueError("recall_metrics: ranks is empty; nothing to evaluate")
    r = ranks.detach().double().flatten()
    out = {f"R{k}": 100.0 * float((r <= k).double().mean()) for k in ks}
    out["MdR"] = float(r.quantile(0.5)) if r.numel() <= 16_000_000 else float(r.median())
    out["MnR"] = float(r.mean())
    return out


def video_scores(sim_t2v: Tensor, text_to_video: Tensor, block: int = 1024) -> Tensor:
    """[Nv query videos, Nv candidate videos]: each candidate video's score for a query video is its
    best-scoring caption's (the reference reshapes to [videos, videos, captions] and maxes)."""
    n_videos = sim_t2v.shape[1]
    captions_per_video = torch.bincount(text_to_video, minlength=n_videos)
    if bool((captions_per_video == 0).any()):
        missing = torch.nonzero(captions_per_video == 0).flatten()[:10].tolist()
        raise ValueError(f"retrieval_metrics: videos {missing} (first 10 shown) have no caption in "
                         "text_to_video; v2t needs at least one true caption per video column")
    best = torch.full((n_videos, n_videos), float("-inf"), dtype=sim_t2v.dtype, device=sim_t2v.device)
    for r0 in range(0, sim_t2v.shape[0], block):  # best[u, v] = max over captions c of u of sim[c, v]
        rows = sim_t2v[r0:r0 + block]
        best.scatter_reduce_(0, text_to_video[r0:r0 + block, None].expand_as(rows), rows, "amax")
    return best.t()


def retrieval_metrics(sim_t2v: Tensor, text_to_video: Tensor,
                      ks: Sequence[int] = (1, 5, 10, 50), block: int = 1024) -> dict[str, Any]:
    """Text-to-video and video-to-text metrics from one similarity matrix.

    sim_t2v [Ntexts, Nvideos]; text_to_video [Ntexts] long = the video of each caption (several
    captions per video allowed). t2v ranks every caption against the videos; v2t rank of video v =
    1 + #other videos whose best caption scores at least as high as v's best caption (ties are
    not hits; method.md section 6). Returns
    {"t2v": {R.., MdR, MnR, Rsum}, "v2t": {...}, "t2v_ranks": long [Ntexts], "v2t_ranks": long [Nvideos]},
    Rsum = R1 + R5 + R10 (whichever of those are in ks)."""
    _check_sim_target(sim_t2v, text_to_video, "retrieval_metrics")
    text_to_video = text_to_video.to(device=sim_t2v.device, dtype=torch.long)
    t2v_ranks = ranks_from_similarity(sim_t2v, text_to_video, block)
    n_videos = sim_t2v.shape[1]
    v2t_ranks = ranks_from_similarity(video_scores(sim_t2v, text_to_video, block),
                                      torch.arange(n_videos, device=sim_t2v.device), block)
    out: dict[str, Any] = {}
    for name, ranks in (("t2v", t2v_ranks), ("v2t", v2t_ranks)):
        m = recall_metrics(ranks, ks)
        m["Rsum"] = sum(m.get(f"R{k}", 0.0) for k in (1, 5, 10))
        out[name] = m
    out["t2v_ranks"], out["v2t_ranks"] = t2v_ranks, v2t_ranks
    return out
