"""Hard-negative pools."""

import pytest
import torch

from ops.mining import mine_candidate_pools


def test_positive_first_then_hardest_eligible_negatives():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(12, 9, generator=g)
    positive = torch.randint(0, 9, (12,), generator=g)
    candidate_group = torch.tensor([0, 0, 1, 2, 2, 3, 4, 5, 6])
    query_group = candidate_group[positive]
    pools = mine_candidate_pools(sim, positive, 4, query_group, candidate_group)
    assert pools.shape == (12, 4) and pools.dtype == torch.long
    for q in range(12):
        eligible = [c for c in range(9) if candidate_group[c] != query_group[q]]
        expected = sorted(eligible, key=lambda c: -float(sim[q, c]))[:3]
        assert pools[q].tolist() == [int(positive[q])] + expected


def test_without_groups_only_the_positive_is_excluded():
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.5], [0.0, 0.2, 0.3, 0.1]])
    pools = mine_candidate_pools(sim, torch.tensor([0, 2]), 3)
    assert pools.tolist() == [[0, 1, 3], [2, 1, 3]]


def test_too_few_negatives_is_a_clear_error():
    sim = torch.zeros(2, 4)
    group = torch.tensor([0, 0, 0, 1])
    with pytest.raises(ValueError, match="query 0 has only 1 eligible"):
        mine_candidate_pools(sim, torch.tensor([0, 3]), 3, torch.tensor([0, 1]), group)
    with pytest.raises(ValueError, match="together"):
        mine_candidate_pools(sim, torch.tensor([0, 3]), 2, torch.tensor([0, 1]), None)
