"""Pure-torch numeric kernels: WTI similarity, cross-rank gathers, retrieval metrics,
hard-negative mining and DDIM re-ranking. No Hydra, Ray or MLflow here."""

from ops.ddim import (alphas_cumprod, cosine_alphas_cumprod, ddim_sample, ddim_timesteps, linear_alphas_cumprod,
                      q_sample, rerank_topk)
from ops.gather import gather_with_grad, local_rows
from ops.inference import dual_softmax, qb_norm, qb_norm_from_stats, querybank_stats
from ops.metrics import ranks_from_similarity, recall_metrics, retrieval_metrics
from ops.mining import mine_candidate_pools
from ops.shortlist import pooled_topk, shortlist_recall, top_per_key, wti_paired
from ops.wti import wti_similarity, wti_similarity_naive, wti_topk

__all__ = [
    "alphas_cumprod", "cosine_alphas_cumprod", "ddim_sample", "dual_softmax", "qb_norm", "qb_norm_from_stats", "querybank_stats", "ddim_timesteps", "linear_alphas_cumprod", "q_sample",
    "rerank_topk", "gather_with_grad", "local_rows", "ranks_from_similarity", "recall_metrics",
    "retrieval_metrics", "mine_candidate_pools", "pooled_topk", "shortlist_recall", "top_per_key", "wti_paired", "wti_similarity", "wti_similarity_naive", "wti_topk",
]
