"""Losses of both stages against direct computations in float64."""
import math

import torch

from trainer.models.losses import contrastive_loss, diffusion_loss


def test_contrastive_loss_single_positive_is_symmetric_cross_entropy():
    torch.manual_seed(0)
    sim = torch.randn(4, 4, dtype=torch.float64)
    groups = torch.arange(4)
    scale = torch.tensor(10.0, dtype=torch.float64)
    expected = 0
    for logits in (scale * sim, scale * sim.t()):
        expected += -torch.mean(torch.stack([torch.log_softmax(logits[i], 0)[i] for i in range(4)]))
    torch.testing.assert_close(contrastive_loss(sim, scale, groups, groups), expected / 2)


def test_contrastive_loss_uses_every_caption_of_a_video_as_a_positive():
    sim = torch.randn(3, 3, dtype=torch.float64)
    groups = torch.tensor([7, 7, 9])  # rows/cols 0 and 1 are captions/copies of one video
    scale = torch.tensor(1.0, dtype=torch.float64)
    logp = torch.log_softmax(sim, 1)
    t2v_row0 = -(0.5 * logp[0, 0] + 0.5 * logp[0, 1])
    t2v = (t2v_row0 + -(0.5 * logp[1, 0] + 0.5 * logp[1, 1]) + -logp[2, 2]) / 3
    logp_t = torch.log_softmax(sim.t(), 1)
    v2t = (-(0.5 * logp_t[0, 0] + 0.5 * logp_t[0, 1]) - (0.5 * logp_t[1, 0] + 0.5 * logp_t[1, 1]) - logp_t[2, 2]) / 3
    torch.testing.assert_close(contrastive_loss(sim, scale, groups, groups), (t2v + v2t) / 2)


def test_diffusion_kl_loss_is_cross_entropy_of_scaled_prediction():
    x0_hat = torch.tensor([[0.2, -0.1, 0.05]], dtype=torch.float64)
    positive = torch.tensor([0])
    logits = 100 * x0_hat[0]
    expected = -(logits[0] - torch.logsumexp(logits, 0))
    torch.testing.assert_close(diffusion_loss(x0_hat, positive, "kl", 100.0), expected)
    mse = diffusion_loss(x0_hat, positive, "mse", 100.0)
    assert math.isclose(mse.item(), ((0.2 - 1) ** 2 + 0.01 + 0.0025) / 3, rel_tol=1e-9)
