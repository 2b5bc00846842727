"""LAFF wired into the encoder and stage con: fused heads, the per-head loss, attention weights."""
import dataclasses

import torch

from ops import wti_similarity
from tests.support import TINY, contrastive_batch as batch
from trainer.models import build_encoder
from trainer.models.laff import multihead_similarity
from trainer.stages.con import ContrastiveTask
from trainer.models.losses import contrastive_loss

LAFF_TINY = dataclasses.replace(TINY, laff=True, laff_dim=16, laff_heads=2)


def test_laff_loss_is_wti_loss_plus_one_loss_per_head_and_reports_attention():
    torch.manual_seed(0)
    encoder = build_encoder(LAFF_TINY, max_frames=4)
    task = ContrastiveTask(encoder)
    video, video_mask, text, text_mask, groups = batch()
    loss = task(video, video_mask, text, text_mask, groups)

    t, v = encoder.encode_text(text, text_mask), encoder.encode_video(video, video_mask)
    assert t.fused.shape == (3, 2, 8) and v.fusion_weights.shape == (3, 2, 3)
    torch.testing.assert_close(v.fusion_weights.sum(-1), torch.ones(3, 2))
    scale = encoder.scale()
    wti = wti_similarity(t.words, t.weights, t.mask, v.frames, v.weights, v.mask)
    _, heads = multihead_similarity(t.fused, v.fused)
    expected = contrastive_loss(wti, scale, groups, groups) + sum(contrastive_loss(h, scale, groups, groups) for h in heads)
    torch.testing.assert_close(loss, expected)

    loss.backward()
    assert all(p.grad is not None for p in encoder.laff_video.parameters())
    assert all(p.grad is not None for p in encoder.laff_text.parameters())
    assert set(task.fusion_weights) == {"laff_video_clip_frames", "laff_video_temporal_frames",
                                        "laff_video_weighted_frames", "laff_text_eot", "laff_text_weighted_words"}
    assert abs(sum(w for k, w in task.fusion_weights.items() if k.startswith("laff_video")) - 1) < 1e-5


def test_evaluation_similarity_adds_the_mean_over_heads():
    torch.manual_seed(0)
    encoder = build_encoder(LAFF_TINY, max_frames=4).eval()
    video, video_mask, text, text_mask, _ = batch()
    with torch.no_grad():
        t, v = encoder.encode_text(text, text_mask), encoder.encode_video(video, video_mask)
        plain = encoder.similarity(dataclasses.replace(t, fused=None), v)
        torch.testing.assert_close(encoder.similarity(t, v), plain + multihead_similarity(t.fused, v.fused)[0])
