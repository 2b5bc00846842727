"""Inference-only re-scoring of a finished similarity matrix (method.md section 5): the dual
softmax of CLIP2TV / CAMoE and QB-Norm (querybank normalisation, Bogolin et al. 2022) with the
dynamic inverted softmax. Both counter "hubs": gallery items that score high for every query.

Convention throughout: sim [Nq, Nc], rows are queries, a query ranks the columns of its row. For
text-to-video evaluation sim is s_t2v [Ntexts, Nvideos].
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dual_softmax", "qb_norm", "qb_norm_from_stats", "querybank_stats"]

_DIRECTIONS = ("both", "t2v", "v2t")


def _acc(sim: Tensor) -> Tensor:
    """fp32 at least: exp(100 * s) differences vanish in bf16; fp64 stays fp64 for exact tests."""
    return sim.to(torch.promote_types(sim.dtype, torch.float32))


def _check_2d(sim: Tensor, who: str, name: str = "sim") -> None:
    if sim.dim() != 2:
        raise ValueError(f"{who}: {name} must be [Nq, Nc], got shape {tuple(sim.shape)}")


def dual_softmax(sim: Tensor, temperature: float = 100.0, direction: str = "both") -> Tensor:
    """Dual softmax re-scoring, sim [Nt, Nv] (rows texts) -> [Nt, Nv] in fp32 (fp64 stays fp64).

    With P_t = softmax(temperature * sim, dim=0) (over texts, within each video column) and
    P_v = softmax(temperature * sim, dim=1) (over videos, within each text row):

    - ``"t2v"``: sim * P_t. The CAMoE prior for text->video: a video that many other texts also
      match spreads its column mass and is demoted. Rank along rows.
    - ``"v2t"``: sim * P_v, the mirror image for video->text; rank along columns.
      (Equal to ``dual_softmax(sim.T, direction="t2v").T``.)
    - ``"both"`` (default, the symmetric variant): sim * P_t * P_v, so that one matrix serves both
      directions of ``ops.retrieval_metrics`` and ``dual_softmax(sim.T) == dual_softmax(sim).T``.
      Within a text row, P_v[a, :] = exp(temperature * sim[a, :]) / Z_a has a constant
      normaliser, i.e. it is only a monotone re-weighting of the raw score, while P_t carries
      the per-video (hub) normaliser in full; symmetrically within a video column. For exactly
      the CAMoE numbers, evaluate t2v on ``"t2v"`` and v2t on ``"v2t"``.

    Uses the whole matrix (the softmax over texts needs every text of a column): inference only.
    """
    _check_2d(sim, "dual_softmax")
    if direction not in _DIRECTIONS:
        raise ValueError(f"dual_softmax: direction must be one of {_DIRECTIONS}, got {direction!r}")
    s = _acc(sim)
    logits = temperature * s
    if direction == "t2v":
        return s * logits.softmax(dim=0)
    if direction == "v2t":
        return s * logits.softmax(dim=1)
    return s * logits.softmax(dim=0) * logits.softmax(dim=1)


@torch.no_grad()
def querybank_stats(bank_sim: Tensor, k: int = 1, beta: float = 20.0,
                    block: int = 4096) -> tuple[Tensor, Tensor]:
    """What QB-Norm needs from the querybank, computed over bank rows in blocks.

    bank_sim [Nb, Nc]: querybank (e.g. training captions) x the test gallery. Returns
    (log_norm [Nc] = logsumexp_b(beta * bank_sim[b, c]), active [Nc] bool = c is in the top-k of
    at least one bank query: the activation set). Memory is O(block * Nc). Stats of separately
    computed bank parts combine as (torch.logaddexp(l1, l2), a1 | a2), so the bank never has to
    be one matrix."""
    _check_2d(bank_sim, "querybank_stats", "bank_sim")
    nb, nc = bank_sim.shape
    if nb == 0:
        raise ValueError("querybank_stats: the querybank is empty (bank_sim has 0 rows)")
    if not 1 <= k <= nc:
        raise ValueError(f"querybank_stats: k must be in [1, {nc}] (gallery size), got {k}")
    if block < 1:
        raise ValueError(f"querybank_stats: block must be >= 1, got {block}")
    acc = torch.promote_types(bank_sim.dtype, torch.float32)
    log_norm = torch.full((nc,), float("-inf"), dtype=acc, device=bank_sim.device)
    active = torch.zeros(nc, dtype=torch.bool, device=bank_sim.device)
    for b0 in range(0, nb, block):
        part = bank_sim[b0:b0 + block].to(acc)
        log_norm = torch.logaddexp(log_norm, torch.logsumexp(beta * part, dim=0))
        active[part.topk(k, dim=1).indices.reshape(-1)] = True
    return log_norm, active


@torch.no_grad()
def qb_norm_from_stats(sim: Tensor, log_norm: Tensor, active: Tensor, beta: float = 20.0) -> Tensor:
    """QB-Norm (dynamic inverted softmax) of sim [Nq, Nc] given ``querybank_stats``.

    A query whose top-1 gallery item is in the activation set gets the inverted softmax over its
    whole row, sim'[q, c] = exp(beta * sim[q, c]) / sum_b exp(beta * bank_sim[b, c]) (computed as
    exp(beta * sim - log_norm), no overflow); every other query keeps its raw scores. The two
    kinds of rows live on different scales, so the result is for ranking along rows only; for
    the other direction call it on the transposed problem with its own bank."""
    _check_2d(sim, "qb_norm")
    nc = sim.shape[1]
    if log_norm.shape != (nc,) or active.shape != (nc,):
        raise ValueError(f"qb_norm: bank stats must be [{nc}] (one per gallery column of sim); got "
                         f"log_norm {tuple(log_norm.shape)}, active {tuple(active.shape)}")
    s = _acc(sim)
    normalised = torch.exp(beta * s - log_norm.to(s.dtype))
    # The dynamic rule (paper section 3.3): normalise only queries that would retrieve an item
    # the bank shows to be a candidate hub; elsewhere the inverted softmax only adds noise.
    apply = active[s.argmax(dim=1)]
    return torch.where(apply[:, None], normalised, s)


def qb_norm(sim: Tensor, bank_sim: Tensor, k: int = 1, beta: float = 20.0, block: int = 4096) -> Tensor:
    """QB-Norm with the dynamic inverted softmax (Bogolin et al., CVPR 2022).

    sim [Nq, Nc]: test queries x gallery; bank_sim [Nb, Nc]: querybank (training captions) x the
    same gallery. The activation set is every gallery item in the top-k of some bank query. A
    test query whose own top-1 item is activated has each gallery item's score normalised by
    that item's bank scores: exp(beta * sim[q, c]) / sum_b exp(beta * bank_sim[b, c]); a hub
    (high for every bank query) gets a large denominator and is demoted. Queries whose top-1 is
    not activated keep their raw scores. Vectorised over queries; the bank in row blocks (see
    ``querybank_stats``). Returns [Nq, Nc] in fp32 (fp64 stays fp64), for ranking along rows.
    """
    _check_2d(bank_sim, "qb_norm", "bank_sim")
    if bank_sim.shape[1] != sim.shape[-1]:
        raise ValueError(f"qb_norm: sim has {sim.shape[-1]} gallery columns but bank_sim has "
                         f"{bank_sim.shape[1]}; both must score the same gallery")
    log_norm, active = querybank_stats(bank_sim, k=k, beta=beta, block=block)
    return qb_norm_from_stats(sim, log_norm, active, beta=beta)
