"""Stage con with CLIP2TV momentum distillation: teacher, queues and the pooled loss, on a tiny encoder."""
import dataclasses

import torch

from trainer.config import ConConfig
from trainer.stages.con import ContrastiveTask
from tests.support import TINY, contrastive_batch as batch
from trainer.models import build_encoder




def test_plain_task_equals_contrastive_loss_and_momentum_task_uses_queue():
    torch.manual_seed(0)
    encoder = build_encoder(TINY, max_frames=4)
    plain = ContrastiveTask(encoder)
    con = dataclasses.replace(ConConfig(), momentum=True, queue_size=5, momentum_m=0.5, distill_alpha=0.0)
    task = ContrastiveTask(encoder, con, max_words=6, max_frames=4)
    first = batch()
    # alpha = 0 and an empty queue: exactly the plain multi-positive contrastive loss
    torch.testing.assert_close(task(*first), plain(*first))
    assert len(task.text_queue) == 3 and len(task.video_queue) == 3  # the teacher's features were queued
    loss = task(*batch())  # now 3 batch + 3 queued candidates per direction
    loss.backward()
    assert torch.isfinite(loss) and len(task.video_queue) == 5
    assert all(p.grad is None for p in task.teacher.parameters())
    assert encoder.text_weight[0].weight.grad is not None


def test_teacher_follows_the_student_as_an_ema():
    torch.manual_seed(0)
    encoder = build_encoder(TINY, max_frames=4)
    task = ContrastiveTask(encoder, dataclasses.replace(ConConfig(), momentum=True, momentum_m=0.9), 6, 4)
    before = task.teacher.module.logit_scale.detach().clone()
    with torch.no_grad():
        encoder.logit_scale.add_(1.0)
    task.after_step()
    torch.testing.assert_close(task.teacher.module.logit_scale, 0.9 * before + 0.1 * encoder.logit_scale)
