"""Two-stage mining: paired WTI equals the all-pairs kernel, the pooled first stage equals brute
force, and stage gen's shortlisted pools equal the exact ones when the shortlist holds everything."""
from __future__ import annotations

import torch

from ops import pooled_topk, shortlist_recall, top_per_key, wti_paired, wti_similarity
from tests.support import TINY
from tests.test_generation_task import bank_from_encoder
from trainer.models import build_encoder
from trainer.stages.pools import TopKPools


def features(n: int, length: int, d: int, g: torch.Generator):
    x = torch.nn.functional.normalize(torch.randn(n, length, d, generator=g), dim=-1)
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    mask = torch.arange(length) < lengths[:, None]
    w = torch.rand(n, length, generator=g).masked_fill(~mask, 0)
    return x, w / w.sum(1, keepdim=True), mask


def test_paired_wti_equals_the_all_pairs_kernel_in_both_orientations():
    g = torch.Generator().manual_seed(0)
    text, video = features(6, 5, 8, g), features(9, 4, 8, g)
    full = wti_similarity(*text, *video)
    cands = torch.randint(0, 9, (6, 3), generator=g)
    t2v = wti_paired(*text, *(t[cands] for t in video))
    torch.testing.assert_close(t2v, full.gather(1, cands), atol=1e-6, rtol=0)
    texts = torch.randint(0, 6, (9, 2), generator=g)
    v2t = wti_paired(*(t[texts] for t in text), *video)
    torch.testing.assert_close(v2t, full.t().gather(1, texts), atol=1e-6, rtol=0)


def test_pooled_topk_equals_brute_force_across_candidate_blocks():
    g = torch.Generator().manual_seed(1)
    q, c = torch.randn(7, 4, generator=g), torch.randn(23, 4, generator=g)
    qg, cg = torch.randint(0, 5, (7,), generator=g), torch.randint(0, 5, (23,), generator=g)
    got = pooled_topk(q, c.half(), 6, qg, cg, block=3, candidate_block=5)
    dense = (q @ c.half().float().T).masked_fill(qg[:, None] == cg[None], float("-inf"))
    assert torch.equal(got, dense.topk(6, dim=1).indices)
    assert not (cg[got] == qg[:, None]).any()  # never the query's own group


def test_shortlist_recall_counts_found_candidates():
    exact = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert shortlist_recall(exact, torch.tensor([[4, 3, 2, 1], [5, 9, 9, 9]])) == 0.625


def test_shortlisted_pools_equal_exact_ones_when_the_shortlist_holds_every_candidate():
    encoder = build_encoder(TINY, max_frames=4).requires_grad_(False).eval()
    bank = bank_from_encoder(encoder, n_videos=10)
    exact = TopKPools(encoder, bank, pool=4, shortlist=0)
    everything = torch.arange(bank.num_texts)
    exact.shortlist = bank.num_texts
    t2v = exact.t2v_shortlisted(everything)
    assert torch.equal(t2v[:, 0], exact.t2v[:, 0])
    assert torch.equal(t2v[:, 1:].sort(1).values, exact.t2v[:, 1:].sort(1).values)
    v2t = exact.v2t_shortlisted(torch.arange(bank.num_videos))
    assert torch.equal(v2t.sort(1).values, exact.v2t_negatives.sort(1).values)


def test_a_short_shortlist_still_gives_valid_pools_and_reports_its_recall():
    encoder = build_encoder(TINY, max_frames=4).requires_grad_(False).eval()
    bank = bank_from_encoder(encoder, n_videos=12)
    pools = TopKPools(encoder, bank, pool=4, shortlist=5)
    assert not pools.exact
    assert torch.equal(pools.t2v[:, 0], bank.text_to_video)  # own video first
    assert not (pools.t2v[:, 1:] == bank.text_to_video[:, None]).any()
    assert not (bank.text_to_video[pools.v2t_negatives] == torch.arange(12)[:, None]).any()
    recall = pools.recall(sample=8, seed=0)
    assert set(recall) == {"shortlist_recall_t2v", "shortlist_recall_v2t"}
    assert all(0.0 <= v <= 1.0 for v in recall.values())


def test_top_per_key_equals_brute_force():
    g = torch.Generator().manual_seed(2)
    keys, items, scores = torch.randint(0, 5, (40,), generator=g), torch.arange(40), torch.randn(40, generator=g)
    got_items, got_scores = top_per_key(keys, items, scores, num_keys=6, k=3)
    for key in range(6):
        mine = scores.masked_fill(keys != key, float("-inf"))
        n = min(3, int((keys == key).sum()))
        want = mine.topk(n).indices
        assert torch.equal(got_items[key, :n], items[want]) and torch.equal(got_scores[key, :n], scores[want])
        assert (got_items[key, n:] == -1).all()  # key 5 has no pairs


def test_inverting_the_t2v_scores_finds_v2t_negatives_and_compacting_changes_nothing(monkeypatch):
    encoder = build_encoder(TINY, max_frames=4).requires_grad_(False).eval()
    bank = bank_from_encoder(encoder, n_videos=16)
    exact = TopKPools(encoder, bank, pool=4, shortlist=0)
    short = TopKPools(encoder, bank, pool=4, block=4, shortlist=5)
    pooled_only = short.v2t_shortlisted(torch.arange(16))
    recall = lambda v2t: shortlist_recall(exact.v2t_negatives, v2t)  # noqa: E731
    assert recall(short.v2t_negatives) >= recall(pooled_only)  # the inverted scores only add candidates
    monkeypatch.setattr(TopKPools, "invert_slack", 0)  # compact after every block
    again = TopKPools(encoder, bank, pool=4, block=4, shortlist=5)
    assert torch.equal(again.v2t_negatives, short.v2t_negatives) and torch.equal(again.t2v, short.t2v)
