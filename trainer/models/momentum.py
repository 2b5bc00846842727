"""CLIP2TV momentum distillation (method.md section 5): an EMA teacher of the encoder, queues of
its recent text and video features that extend the candidate pool past the batch, and soft
targets y_hat = alpha * y_teacher + (1 - alpha) * y.

A step, for a student encoder ``enc`` and its teacher (features of the global batch):

    s_t2v = sim(student texts, student videos + queued videos)      [B, B + Qv]
    s_v2t = sim(student texts + queued texts, student videos).T     [B, B + Qt]
    the teacher's similarities likewise from its own batch features and the same queues;
    loss = (distilled_contrastive_loss(scale * s_t2v, teacher_t2v, ...) + the v2t one) / 2
    teacher.update(enc); push the teacher's batch features into the queues.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FeatureQueue", "MomentumTeacher", "distillation_targets", "soft_cross_entropy",
           "distilled_contrastive_loss"]


class FeatureQueue(nn.Module):
    """Ring buffer of past features, one buffer per field, so it is saved in ``state_dict``
    (checkpoints resume with a full queue).

    shapes/dtypes give each field's per-item shape and dtype, e.g. for texts
    ``{"words": (Lw, D), "weights": (Lw,), "mask": (Lw,), "group": ()}`` with
    ``{"words": torch.bfloat16, "weights": torch.float32, "mask": torch.bool, "group": torch.long}``.
    Under data parallelism push the *gathered* global batch, so every rank holds the same queue
    (DDP's buffer broadcast from rank 0 then changes nothing).
    """

    def __init__(self, size: int, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype]):
        super().__init__()
        if size < 1:
            raise ValueError(f"FeatureQueue: size must be >= 1, got {size}")
        if not shapes or set(shapes) != set(dtypes):
            raise ValueError(f"FeatureQueue: shapes and dtypes must name the same non-empty fields; "
                             f"got shapes {sorted(shapes)}, dtypes {sorted(dtypes)}")
        self.size = size
        self.fields = tuple(shapes)
        for name in self.fields:
            if not name.isidentifier():
                raise ValueError(f"FeatureQueue: field name {name!r} must be a Python identifier")
            self.register_buffer(self._key(name), torch.zeros(size, *shapes[name], dtype=dtypes[name]))
        # Write position and fill level as buffers too: a resumed queue continues where it was.
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @staticmethod
    def _key(name: str) -> str:
        return f"queue_{name}"

    def buffer(self, name: str) -> Tensor:
        return getattr(self, self._key(name))

    def __len__(self) -> int:
        return int(self.filled)

    @torch.no_grad()
    def push(self, **tensors: Tensor) -> None:
        """Enqueue a batch (every field, leading dim B), overwriting the oldest entries. With
        B > size only the last ``size`` items are kept. Stored detached, in the queue's dtype."""
        if set(tensors) != set(self.fields):
            raise ValueError(f"FeatureQueue.push: expected fields {sorted(self.fields)}, got {sorted(tensors)}")
        batch = {len(t) for t in tensors.values()}
        if len(batch) != 1:
            raise ValueError(f"FeatureQueue.push: fields have different batch sizes "
                             f"{ {k: len(t) for k, t in tensors.items()} }")
        n = batch.pop()
        if n == 0:
            return
        for name, t in tensors.items():
            buf = self.buffer(name)
            if tuple(t.shape[1:]) != tuple(buf.shape[1:]):
                raise ValueError(f"FeatureQueue.push: field {name!r} items must have shape "
                                 f"{tuple(buf.shape[1:])}, got {tuple(t.shape[1:])} (pad to the same length)")
        keep = min(n, self.size)
        ptr = int(self.ptr)
        index = (ptr + torch.arange(keep, device=self.ptr.device)) % self.size
        for name, t in tensors.items():
            buf = self.buffer(name)
            buf.index_copy_(0, index.to(buf.device), t[n - keep:].detach().to(buf.device, buf.dtype))
        self.ptr.fill_((ptr + keep) % self.size)
        self.filled.fill_(min(int(self.filled) + keep, self.size))

    def items(self) -> dict[str, Tensor]:
        """The valid entries, oldest first (views/copies of the buffers, no grad)."""
        filled, ptr = int(self.filled), int(self.ptr)
        out = {}
        for name in self.fields:
            buf = self.buffer(name)
            # Full: the oldest entry is the one the next push overwrites.
            out[name] = torch.cat([buf[ptr:], buf[:ptr]]) if filled == self.size else buf[:filled]
        return out


class MomentumTeacher(nn.Module):
    """Deep-copied EMA of a student, never trained by the optimiser: p_t = m p_t + (1 - m) p_s.

    Always in eval mode and without gradients. Only parameters are averaged (the encoder has no
    running statistics). Not for ZeRO-3, which would partition the copied parameters."""

    def __init__(self, student: nn.Module, momentum: float = 0.995):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"MomentumTeacher: momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.module = copy.deepcopy(student)
        self.module.requires_grad_(False)
        self.module.eval()

    def train(self, mode: bool = True) -> "MomentumTeacher":
        # The teacher gives targets; switching the whole task to train() must not change that.
        return super().train(False)

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """p_t = m p_t + (1 - m) p_s for every parameter, matched by name."""
        teacher = dict(self.module.named_parameters())
        student_params = dict(student.named_parameters())
        if teacher.keys() != student_params.keys():
            missing = sorted(teacher.keys() ^ student_params.keys())[:5]
            raise ValueError(f"MomentumTeacher.update: the student's parameters differ from the "
                             f"teacher's copy (e.g. {missing}); pass the module the teacher was built from")
        for name, p_t in teacher.items():
            p_t.lerp_(student_params[name].detach().to(p_t.dtype), 1.0 - self.momentum)


def distillation_targets(teacher_sim: Tensor, hard_targets: Tensor, alpha: float = 0.4,
                         scale: float = 100.0) -> Tensor:
    """y_hat = alpha * softmax(scale * teacher_sim, dim=1) + (1 - alpha) * hard_targets.

    teacher_sim [Nq, Nc]; hard_targets [Nq, Nc] with rows summing to 1 (e.g.
    ``trainer.models.losses.positive_targets``), so y_hat rows sum to 1. No gradient."""
    if teacher_sim.shape != hard_targets.shape:
        raise ValueError(f"distillation_targets: teacher_sim {tuple(teacher_sim.shape)} and hard_targets "
                         f"{tuple(hard_targets.shape)} must have the same shape [Nq, Nc]")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation_targets: alpha must be in [0, 1], got {alpha}")
    soft = (scale * teacher_sim.detach().float()).softmax(dim=1)
    return alpha * soft + (1.0 - alpha) * hard_targets.detach().float()


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """mean over rows of -sum_c targets[q, c] * log_softmax(logits)[q, c]."""
    if logits.shape != targets.shape:
        raise ValueError(f"soft_cross_entropy: logits {tuple(logits.shape)} and targets "
                         f"{tuple(targets.shape)} must have the same shape")
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def distilled_contrastive_loss(sim: Tensor, teacher_sim: Tensor, query_group: Tensor, pool_group: Tensor,
                               scale: Tensor | float, alpha: float = 0.4, teacher_scale: float = 100.0) -> Tensor:
    """One direction of the pooled loss: queries [Nq] against a pool [Nc] (batch + queue).

    sim, teacher_sim [Nq, Nc]; query_group [Nq], pool_group [Nc]: video ids, equal ids are
    positives (several captions of one video). With alpha = 0 and no queue this is one direction
    of ``trainer.models.losses.contrastive_loss``."""
    pos = (query_group[:, None] == pool_group[None, :]).float()
    if not bool(pos.any(dim=1).all()):
        raise ValueError("distilled_contrastive_loss: a query has no positive in the pool; the pool "
                         "must contain the query's own batch items")
    hard = pos / pos.sum(dim=1, keepdim=True)
    return soft_cross_entropy(scale * sim, distillation_targets(teacher_sim, hard, alpha, teacher_scale))
