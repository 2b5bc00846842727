"""Hard-negative candidate pools for the generator stage (method.md section 4)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mine_candidate_pools"]


def mine_candidate_pools(sim: Tensor, positive: Tensor, pool_size: int,
                         query_group: Tensor | None = None,
                         candidate_group: Tensor | None = None) -> Tensor:
    """Per query: the positive followed by the pool_size - 1 hardest negatives.

    sim [Nq, Nc]; positive [Nq] long (column of the true candidate). Returns long [Nq, pool_size]:
    column 0 = positive, then the highest-sim candidates, best first, excluding the positive and
    every candidate whose group id equals the query's (other captions / copies of the same video).
    query_group [Nq] and candidate_group [Nc] are given together or not at all.
    Raises ValueError when some query has fewer than pool_size - 1 eligible negatives."""
    if sim.dim() != 2:
        raise ValueError(f"mine_candidate_pools: sim must be [Nq, Nc], got {tuple(sim.shape)}")
    nq, nc = sim.shape
    if positive.shape != (nq,):
        raise ValueError(f"mine_candidate_pools: positive must be [Nq]={nq}, got {tuple(positive.shape)}")
    if pool_size < 1:
        raise ValueError(f"mine_candidate_pools: pool_size must be >= 1, got {pool_size}")
    if (query_group is None) != (candidate_group is None):
        raise ValueError("mine_candidate_pools: pass query_group and candidate_group together "
                         "(both or neither)")
    positive = positive.to(device=sim.device, dtype=torch.long)
    if nq and (int(positive.min()) < 0 or int(positive.max()) >= nc):
        raise ValueError(f"mine_candidate_pools: positive indices must lie in [0, {nc})")

    excluded = torch.zeros(nq, nc, dtype=torch.bool, device=sim.device)
    excluded.scatter_(1, positive[:, None], True)
    if query_group is not None:
        if query_group.shape != (nq,) or candidate_group.shape != (nc,):
            raise ValueError(f"mine_candidate_pools: query_group must be [{nq}] and candidate_group "
                             f"[{nc}], got {tuple(query_group.shape)} and {tuple(candidate_group.shape)}")
        excluded |= query_group.to(sim.device)[:, None] == candidate_group.to(sim.device)[None, :]

    n_neg = pool_size - 1
    eligible = nc - excluded.sum(dim=1)
    if nq and int(eligible.min()) < n_neg:
        q = int(eligible.argmin())
        raise ValueError(f"mine_candidate_pools: query {q} has only {int(eligible[q])} eligible negatives "
                         f"but pool_size={pool_size} needs {n_neg}; lower pool_size or widen the candidates")
    # Eligible -inf scores are lifted to the lowest finite value so that excluded cells (-inf)
    # always lose the topk even against genuinely -inf candidates.
    scores = sim.float().clamp_min(torch.finfo(torch.float32).min)
    scores = scores.masked_fill(excluded, float("-inf"))
    negatives = scores.topk(n_neg, dim=1).indices
    return torch.cat([positive[:, None], negatives], dim=1)
