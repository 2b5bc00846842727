"""CLIP2TV momentum distillation (queue, EMA teacher, soft targets) and LAFF fusion."""

import pytest
import torch
from torch import nn

from ops.wti import wti_similarity
from trainer.models.losses import contrastive_loss, positive_targets
from trainer.models.laff import LAFF, multihead_similarity
from trainer.models.momentum import (FeatureQueue, MomentumTeacher, distillation_targets,
                                     distilled_contrastive_loss, soft_cross_entropy)

LW, D = 3, 4


def _text_queue(size: int) -> FeatureQueue:
    return FeatureQueue(size, {"words": (LW, D), "weights": (LW,), "mask": (LW,), "group": ()},
                        {"words": torch.float32, "weights": torch.float32, "mask": torch.bool,
                         "group": torch.long})


def _batch(ids: list[int]) -> dict[str, torch.Tensor]:
    """Item n has words filled with n, so contents identify it."""
    n = torch.tensor(ids, dtype=torch.long)
    return {"words": n[:, None, None].float().expand(-1, LW, D).clone(),
            "weights": torch.full((len(ids), LW), 1.0 / LW),
            "mask": (torch.arange(LW)[None] < (n[:, None] % LW + 1)),
            "group": n}


# --- FeatureQueue ---------------------------------------------------------------------------

def test_queue_wraparound_keeps_newest_oldest_first():
    q = _text_queue(5)
    assert len(q) == 0 and q.items()["group"].shape == (0,)
    q.push(**_batch([0, 1, 2]))
    assert q.items()["group"].tolist() == [0, 1, 2]
    q.push(**_batch([3, 4, 5, 6]))  # wraps: 5 and 6 overwrite 0 and 1
    items = q.items()
    assert items["group"].tolist() == [2, 3, 4, 5, 6]
    assert items["words"][:, 0, 0].tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert torch.equal(items["mask"], _batch([2, 3, 4, 5, 6])["mask"])
    assert items["words"].shape == (5, LW, D) and items["mask"].dtype == torch.bool


def test_queue_batch_larger_than_queue_keeps_the_last_items():
    q = _text_queue(4)
    q.push(**_batch([0]))
    q.push(**_batch(list(range(10, 17))))
    assert q.items()["group"].tolist() == [13, 14, 15, 16]
    q.push(**_batch([20]))
    assert q.items()["group"].tolist() == [14, 15, 16, 20]


def test_queue_state_dict_round_trip_resumes_in_place():
    q = _text_queue(4)
    q.push(**_batch([0, 1, 2, 3, 4, 5]))
    state = q.state_dict()
    assert {"queue_words", "queue_mask", "queue_group", "ptr", "filled"} <= set(state)
    restored = _text_queue(4)
    restored.load_state_dict(state)
    for name, t in q.items().items():
        assert torch.equal(restored.items()[name], t)
    q.push(**_batch([9]))
    restored.push(**_batch([9]))
    assert restored.items()["group"].tolist() == q.items()["group"].tolist() == [3, 4, 5, 9]


def test_queue_rejects_wrong_fields_and_shapes():
    q = _text_queue(4)
    with pytest.raises(ValueError, match="expected fields"):
        q.push(words=torch.zeros(1, LW, D))
    bad = _batch([1])
    bad["words"] = torch.zeros(1, LW + 1, D)
    with pytest.raises(ValueError, match="'words'"):
        q.push(**bad)


# --- MomentumTeacher ------------------------------------------------------------------------

def test_teacher_is_a_frozen_copy_and_follows_the_ema_formula():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    teacher = MomentumTeacher(student, momentum=0.9)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not teacher.train().training
    before = {k: p.clone() for k, p in teacher.module.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    teacher.update(student)
    for name, p_s in student.named_parameters():
        expected = 0.9 * before[name] + 0.1 * p_s
        torch.testing.assert_close(dict(teacher.module.named_parameters())[name], expected)
    # The student is untouched and independent of the copy.
    assert not torch.equal(dict(teacher.module.named_parameters())["0.weight"], student[0].weight)
    x = torch.randn(5, 3)
    assert not teacher(x).requires_grad
    with pytest.raises(ValueError, match="differ"):
        teacher.update(nn.Linear(3, 4))


# --- targets and losses ---------------------------------------------------------------------

def test_distillation_targets_rows_sum_to_one_and_reduce_to_hard_targets():
    g = torch.Generator().manual_seed(1)
    teacher_sim = torch.rand(4, 6, generator=g)
    hard = positive_targets(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 3, 2, 5]))
    y = distillation_targets(teacher_sim, hard, alpha=0.4)
    torch.testing.assert_close(y.sum(dim=1), torch.ones(4))
    torch.testing.assert_close(distillation_targets(teacher_sim, hard, alpha=0.0), hard)
    torch.testing.assert_close(y, 0.4 * (100 * teacher_sim).softmax(dim=1) + 0.6 * hard)
    with pytest.raises(ValueError, match="same shape"):
        distillation_targets(teacher_sim, hard[:, :5])


def test_soft_cross_entropy_matches_hard_cross_entropy_on_one_hot():
    logits = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([4, 0, 2])
    torch.testing.assert_close(soft_cross_entropy(logits, nn.functional.one_hot(target, 5).float()),
                               nn.functional.cross_entropy(logits, target))


def _features(n: int, seed: int, lw: int = LW, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = nn.functional.normalize(torch.randn(n, lw, d, generator=g), dim=-1)
    mask = torch.ones(n, lw, dtype=torch.bool)
    mask[::2, -1] = False
    w = torch.randn(n, lw, generator=g).masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return x, w, mask


def test_queue_extends_the_candidate_pool_end_to_end():
    b, d = 4, 8
    words, tw, tm = _features(b, seed=3, d=d)
    frames, vw, vm = _features(b, seed=4, d=d)
    words.requires_grad_()
    group = torch.arange(b)
    shapes = {"tokens": (LW, d), "weights": (LW,), "mask": (LW,), "group": ()}
    dtypes = {"tokens": torch.float32, "weights": torch.float32, "mask": torch.bool, "group": torch.long}
    video_queue = FeatureQueue(6, shapes, dtypes)
    old_frames, old_vw, old_vm = _features(5, seed=5, d=d)
    video_queue.push(tokens=old_frames, weights=old_vw, mask=old_vm, group=torch.arange(100, 105))
    queued = video_queue.items()
    pool = (torch.cat([frames, queued["tokens"]]), torch.cat([vw, queued["weights"]]),
            torch.cat([vm, queued["mask"]]))
    pool_group = torch.cat([group, queued["group"]])

    sim_pool = wti_similarity(words, tw, tm, *pool, block=3)
    assert sim_pool.shape == (b, b + 5)
    scale = torch.tensor(100.0)
    loss_pool = distilled_contrastive_loss(sim_pool, sim_pool.detach(), group, pool_group, scale, alpha=0.4)
    sim_batch = sim_pool[:, :b]
    loss_batch = distilled_contrastive_loss(sim_batch, sim_batch.detach(), group, group, scale, alpha=0.4)
    assert not torch.isclose(loss_pool, loss_batch)
    # With hard targets the queue adds negatives only: mass in the denominator, a larger loss.
    hard_pool = distilled_contrastive_loss(sim_pool, sim_pool, group, pool_group, scale, alpha=0.0)
    hard_batch = distilled_contrastive_loss(sim_batch, sim_batch, group, group, scale, alpha=0.0)
    assert hard_pool.item() > hard_batch.item()
    (grad,) = torch.autograd.grad(loss_pool, words)
    assert grad.abs().sum() > 0

    # alpha = 0 over the batch alone is exactly the existing symmetric contrastive loss.
    sim_v2t = sim_batch.T
    ours = (distilled_contrastive_loss(sim_batch, sim_batch, group, group, scale, alpha=0.0)
            + distilled_contrastive_loss(sim_v2t, sim_v2t, group, group, scale, alpha=0.0)) / 2
    torch.testing.assert_close(ours, contrastive_loss(sim_batch, scale, group, group))
    with pytest.raises(ValueError, match="no positive"):
        distilled_contrastive_loss(sim_pool[:, b:], sim_pool[:, b:], group, queued["group"], scale)


# --- LAFF ------------------------------------------------------------------------------------

def _laff_inputs(lead: tuple[int, ...], dims: list[int], dtype=torch.float32, seed: int = 6):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*lead, d, generator=g, dtype=dtype) for d in dims]


def test_laff_shapes_and_attention_is_a_distribution():
    torch.manual_seed(0)
    laff = LAFF([5, 7, 3], out_dim=12, heads=4)
    fused, attention = laff(_laff_inputs((2, 6), [5, 7, 3]))
    assert fused.shape == (2, 6, 4, 3) and attention.shape == (2, 6, 4, 3)
    torch.testing.assert_close(attention.sum(dim=-1), torch.ones(2, 6, 4))
    assert (attention > 0).all() and not torch.allclose(attention, torch.full_like(attention, 1 / 3))


def test_laff_single_feature_has_attention_one():
    laff = LAFF([5], out_dim=6, heads=2)
    (f,) = _laff_inputs((3,), [5])
    fused, attention = laff([f])
    assert torch.equal(attention, torch.ones(3, 2, 1))
    torch.testing.assert_close(fused, torch.tanh(laff.project[0](f)).view(3, 2, 3))


def test_laff_matches_hand_computation_float64():
    torch.manual_seed(1)
    dims, heads, out_dim = [4, 6], 3, 6
    laff = LAFF(dims, out_dim, heads).double()
    feats = _laff_inputs((5,), dims, torch.float64)
    fused, attention = laff(feats)
    dh = out_dim // heads
    for h in range(heads):
        rows = slice(h * dh, (h + 1) * dh)
        # Head h: its own Linear_i (the rows of project[i] for that head) and its own Linear(d_h, 1).
        proj = [torch.tanh(f @ lin.weight[rows].T + lin.bias[rows]) for lin, f in zip(laff.project, feats)]
        logits = torch.stack([p @ laff.attend[h] for p in proj], dim=-1)  # [5, k]
        a = torch.exp(logits) / torch.exp(logits).sum(dim=-1, keepdim=True)
        expected = sum(a[:, i:i + 1] * proj[i] for i in range(len(dims)))
        torch.testing.assert_close(attention[:, h], a, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fused[:, h], expected, rtol=1e-12, atol=1e-12)


def test_laff_gradient_reaches_every_linear():
    torch.manual_seed(2)
    laff = LAFF([5, 7, 3], out_dim=8, heads=2)
    fused, _ = laff(_laff_inputs((4,), [5, 7, 3]))
    (fused * torch.randn_like(fused)).sum().backward()
    for name, p in laff.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"


def test_laff_rejects_bad_config_and_inputs():
    with pytest.raises(ValueError, match="multiple of heads"):
        LAFF([4], out_dim=10, heads=3)
    laff = LAFF([4, 5], out_dim=4, heads=2)
    with pytest.raises(ValueError, match="feature 1"):
        laff([torch.zeros(2, 4), torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="built for 2"):
        laff([torch.zeros(2, 4)])


def test_multihead_similarity_is_the_mean_of_per_head_cosines():
    g = torch.Generator().manual_seed(3)
    text, video = torch.randn(3, 2, 4, generator=g), torch.randn(5, 2, 4, generator=g)
    mean, per_head = multihead_similarity(text, video)
    assert mean.shape == (3, 5) and per_head.shape == (2, 3, 5)
    for h in range(2):
        for a in range(3):
            for b in range(5):
                expected = nn.functional.cosine_similarity(text[a, h], video[b, h], dim=0)
                torch.testing.assert_close(per_head[h, a, b], expected)
    torch.testing.assert_close(mean, per_head.mean(dim=0))
    with pytest.raises(ValueError, match="same H and d"):
        multihead_similarity(text, torch.randn(5, 3, 4))
