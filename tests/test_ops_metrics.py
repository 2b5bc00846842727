"""Retrieval metrics vs direct per-row implementations."""

import pytest
import torch

from ops.metrics import ranks_from_similarity, recall_metrics, retrieval_metrics


def _direct_rank(row: torch.Tensor, true_col: int) -> int:
    """1 + #other candidates scoring at least as high (a tie is not a hit)."""
    return 1 + sum(1 for c in range(row.shape[0]) if c != true_col and row[c] >= row[true_col])


def test_ranks_match_argsort_without_ties():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(37, 23, generator=g)
    target = torch.randint(0, 23, (37,), generator=g)
    order = sim.argsort(dim=1, descending=True)
    expected = 1 + (order == target[:, None]).nonzero()[:, 1]
    assert torch.equal(ranks_from_similarity(sim, target, block=5), expected)


def test_a_tie_is_not_a_hit():
    sim = torch.tensor([[0.5, 0.5, 0.5],
                        [0.1, 0.9, 0.9],
                        [0.3, 0.2, 0.3]])
    target = torch.tensor([1, 0, 2])
    ranks = ranks_from_similarity(sim, target, block=2)
    assert ranks.tolist() == [_direct_rank(sim[i], int(target[i])) for i in range(3)] == [3, 3, 2]
    # a collapsed model that scores everything equally ranks every item last, not first
    flat = ranks_from_similarity(torch.zeros(4, 4), torch.arange(4))
    assert flat.tolist() == [4, 4, 4, 4] and recall_metrics(flat)["R1"] == 0.0


def test_recall_metrics_values():
    m = recall_metrics(torch.tensor([1, 2, 6, 11, 60]), ks=(1, 5, 10, 50))
    assert m == pytest.approx({"R1": 20.0, "R5": 40.0, "R10": 60.0, "R50": 80.0, "MdR": 6.0, "MnR": 16.0})
    assert recall_metrics(torch.tensor([1, 4]))["MdR"] == 2.5


def test_multi_caption_t2v_and_v2t():
    g = torch.Generator().manual_seed(1)
    n_videos = 6
    text_to_video = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5])
    sim = torch.randn(10, n_videos, generator=g)
    sim[3, 1] = sim[4, 2]  # a tie across columns
    out = retrieval_metrics(sim, text_to_video, ks=(1, 5, 10))
    t2v = [_direct_rank(sim[t], int(text_to_video[t])) for t in range(10)]
    v2t = []  # method.md section 6: each rival video is represented by its best caption; rank among videos
    for v in range(n_videos):
        best = {u: max(float(sim[t, v]) for t in range(10) if text_to_video[t] == u) for u in range(n_videos)}
        v2t.append(1 + sum(1 for u in range(n_videos) if u != v and best[u] >= best[v]))
    assert out["t2v_ranks"].tolist() == t2v
    assert out["v2t_ranks"].tolist() == v2t
    assert out["t2v"]["R1"] == pytest.approx(100.0 * sum(r == 1 for r in t2v) / 10)
    assert out["v2t"]["MnR"] == pytest.approx(sum(v2t) / n_videos)
    assert out["t2v"]["Rsum"] == pytest.approx(out["t2v"]["R1"] + out["t2v"]["R5"] + out["t2v"]["R10"])


def test_v2t_ranks_videos_as_the_reference_reshape_and_max_does():
    """The reference's MSVD v2t: sim reshaped to [videos, captions, videos], max over captions, rank
    the diagonal. Ours agrees on R@1, R@10 and MdR; counting rival captions (the old rule) would not:
    here a video whose 3 rival captions all beat it is rank 2 among videos, not rank 4."""
    import numpy as np

    g = torch.Generator().manual_seed(3)
    n_videos, per = 20, 5  # MSVD-like: every video has the same number of captions
    sim = torch.randn(n_videos * per, n_videos, generator=g).double()
    text_to_video = torch.arange(n_videos).repeat_interleave(per)
    ref = sim.numpy().reshape(n_videos, per, n_videos).max(axis=1).T  # [query video, candidate video]
    ref_ranks = [1 + int((np.delete(ref[v], v) >= ref[v, v]).sum()) for v in range(n_videos)]
    out = retrieval_metrics(sim, text_to_video, ks=(1, 5, 10))
    assert out["v2t_ranks"].tolist() == ref_ranks
    assert out["v2t"]["MdR"] == pytest.approx(float(np.median(ref_ranks)))
    assert out["v2t"]["R10"] == pytest.approx(100.0 * np.mean(np.array(ref_ranks) <= 10))

    sim = torch.zeros(4, 2)
    sim[0, 0] = 0.5  # video 0's one caption
    sim[1:, 0] = 0.9  # video 1's three captions all score higher against video 0
    sim[1:, 1] = 1.0
    out = retrieval_metrics(sim, torch.tensor([0, 1, 1, 1]))
    assert out["v2t_ranks"].tolist() == [2, 1]


def test_perfect_and_reversed_diagonal():
    eye = torch.eye(5)
    out = retrieval_metrics(eye, torch.arange(5))
    assert out["t2v"]["R1"] == 100.0 and out["v2t"]["MdR"] == 1.0
    out = retrieval_metrics(-eye, torch.arange(5))
    assert out["t2v_ranks"].tolist() == [5] * 5 and out["v2t"]["R1"] == 0.0


def test_5k_by_5k_is_fast():
    import time
    sim = torch.randn(5000, 5000)
    start = time.perf_counter()
    out = retrieval_metrics(sim, torch.arange(5000))
    assert time.perf_counter() - start < 5.0
    assert out["t2v_ranks"].shape == (5000,)


def test_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="target indices"):
        ranks_from_similarity(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"videos \[1\]"):
        retrieval_metrics(torch.zeros(2, 3), torch.tensor([0, 2]))
