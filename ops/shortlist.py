"""Two-stage candidate mining for banks too large for a full WTI pass per query.

Stage one ranks every candidate by one dot product of pooled features (sentence x mean frame),
blocked over queries and candidates, keeping a running top-S per query: memory
O(block x (block + S)) whatever the bank size. Stage two scores only that shortlist with exact
WTI (:func:`wti_paired`: each query against its own S candidates, not all against all), so a
query costs S WTI pairs instead of N. ``shortlist_recall`` measures what stage one loses.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ops.wti import _acc_dtype, _masked

__all__ = ["pooled_topk", "shortlist_recall", "top_per_key", "wti_paired"]


@torch.no_grad()
def wti_paired(text: Tensor, text_weight: Tensor, text_mask: Tensor,
               video: Tensor, video_weight: Tensor, video_mask: Tensor) -> Tensor:
    """WTI of paired items: s[n, k] = WTI(text[n, k], video[n, k]) (``ops.wti`` defines WTI).

    Either side may be a single item per row, broadcast over the other side's k candidates:
    text [n, Lw, d] with video [n, k, Lf, d] (t2v shortlists) or text [n, k, Lw, d] with
    video [n, Lf, d] (v2t shortlists); weights and masks have the features' shape without d.
    Reduced in fp32 like ``wti_similarity``; equal to its entries up to summation order
    (the dot products run as one batched einsum instead of one matmul per tile)."""
    if text.dim() == 3:
        text, text_weight, text_mask = text[:, None], text_weight[:, None], text_mask[:, None]
    if video.dim() == 3:
        video, video_weight, video_mask = video[:, None], video_weight[:, None], video_mask[:, None]
    if text.dim() != 4 or video.dim() != 4 or text.shape[-1] != video.shape[-1]:
        raise ValueError(f"wti_paired: expected text [n, (k,) Lw, d] and video [n, (k,) Lf, d] with one d, "
                         f"got {tuple(text.shape)} and {tuple(video.shape)}")
    acc = _acc_dtype(text.dtype)
    t, v = _masked(text, text_mask).to(acc), _masked(video, video_mask).to(acc)
    k = max(t.shape[1], v.shape[1])
    a = torch.einsum("nkid,nkjd->nkij", t.expand(-1, k, -1, -1), v.expand(-1, k, -1, -1))  # [n, k, Lw, Lf]
    s_t2v = (a.amax(dim=3) * text_weight.to(acc)).sum(dim=2)
    s_v2t = (a.amax(dim=2) * video_weight.to(acc)).sum(dim=2)
    return (s_t2v + s_v2t) * 0.5


@torch.no_grad()
def pooled_topk(query: Tensor, candidates: Tensor, k: int, query_group: Tensor, candidate_group: Tensor,
                block: int = 1024, candidate_block: int = 65536) -> Tensor:
    """Per query row, the ``k`` candidates of highest dot product, excluding candidates of the
    query's own group (a caption's video, a video's captions). query [Nq, d], candidates [Nc, d]
    (any dtype; scored in fp32); groups long [Nq] and [Nc]. Returns long [Nq, k'] with
    k' = min(k, Nc - largest group), best first. ``candidates`` may be a memory-mapped tensor:
    it is read one ``candidate_block`` at a time."""
    nq, nc = query.shape[0], candidates.shape[0]
    if query_group.shape != (nq,) or candidate_group.shape != (nc,):
        raise ValueError(f"pooled_topk: groups must be [{nq}] and [{nc}], got {tuple(query_group.shape)} and "
                         f"{tuple(candidate_group.shape)}")
    largest = int(torch.bincount(candidate_group.cpu()).max()) if nc else 0
    k = min(k, nc - largest)
    if k < 1:
        raise ValueError(f"pooled_topk: no eligible candidate (every candidate shares a query's group; Nc={nc})")
    device = query.device
    out = torch.empty(nq, k, dtype=torch.long, device=device)
    for q0 in range(0, nq, block):
        q = query[q0:q0 + block].float()
        qg = query_group[q0:q0 + block].to(device)
        best_v = torch.full((q.shape[0], 0), float("-inf"), device=device)
        best_i = torch.empty(q.shape[0], 0, dtype=torch.long, device=device)
        for c0 in range(0, nc, candidate_block):
            c = candidates[c0:c0 + candidate_block].to(device).float()
            scores = (q @ c.T).masked_fill(qg[:, None] == candidate_group[c0:c0 + c.shape[0]].to(device)[None], float("-inf"))
            ids = torch.arange(c0, c0 + c.shape[0], device=device).expand(q.shape[0], -1)
            best_v, pick = torch.cat([best_v, scores], 1).topk(min(k, best_v.shape[1] + c.shape[0]), dim=1)
            best_i = torch.cat([best_i, ids], 1).gather(1, pick)
        out[q0:q0 + block] = best_i
    return out


@torch.no_grad()
def top_per_key(keys: Tensor, items: Tensor, scores: Tensor, num_keys: int, k: int) -> tuple[Tensor, Tensor]:
    """For each key in [0, num_keys), the ``k`` (item, score) pairs of highest score among the flat
    pairs given (keys, items, scores: [n] each), best first. Returns (items [num_keys, k] long, -1
    where a key has fewer pairs; scores [num_keys, k], -inf there). Two sorts, no dense matrix:
    what inverts per-caption shortlists into per-video ones."""
    order = scores.argsort(descending=True)
    order = order[keys[order].argsort(stable=True)]  # grouped by key, best first within a key
    k_sorted = keys[order]
    counts = torch.bincount(k_sorted, minlength=num_keys)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(k_sorted.shape[0], device=keys.device) - starts[k_sorted]
    keep = rank < k
    out_items = torch.full((num_keys, k), -1, dtype=torch.long, device=keys.device)
    out_scores = torch.full((num_keys, k), float("-inf"), dtype=scores.dtype, device=keys.device)
    out_items[k_sorted[keep], rank[keep]] = items[order][keep].long()
    out_scores[k_sorted[keep], rank[keep]] = scores[order][keep]
    return out_items, out_scores


def shortlist_recall(exact: Tensor, approx: Tensor) -> float:
    """Mean over queries of |exact_q ∩ approx_q| / |exact_q|: the share of the exactly mined
    candidates [Nq, P] that the shortlisted mining [Nq, P] found too (order ignored)."""
    if exact.shape[0] != approx.shape[0]:
        raise ValueError(f"shortlist_recall: {exact.shape[0]} exact rows but {approx.shape[0]} approximate ones")
    if exact.numel() == 0:
        return 1.0
    hits = (exact[:, :, None] == approx[:, None, :]).any(dim=2).float()
    return float(hits.mean())
