"""Stage ``con``: the dual encoder trained with the symmetric WTI contrastive loss over the
global batch (every rank's texts and videos, gathered with gradients)."""
from __future__ import annotations

import dataclasses
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ops import gather_with_grad
from shards.decode import video_to_device
from trainer.components.checkpoint import ResumePoint
from trainer.components.collapse import CollapseWatch, report_collapse
from trainer.components.data import TrainSource
from trainer.components.engine import build_engine, engine_dtype
from trainer.components.export import export_stage
from trainer.components.loop import LoopState, epochs, run_stage
from trainer.components.sample_log import SampleLog
from trainer.config import ConConfig
from trainer.models import RetrievalEncoder, TextFeatures, VideoFeatures
from trainer.models.encoder import TEXT_FUSION_INPUTS, VIDEO_FUSION_INPUTS
from trainer.models.laff import multihead_similarity
from trainer.models.losses import contrastive_loss
from trainer.models.momentum import FeatureQueue, MomentumTeacher, distilled_contrastive_loss


def video_groups(video_ids: list[str], device: torch.device) -> torch.Tensor:
    """Stable integer ids (equal across ranks and runs) of each sample's video, so that several
    captions of one video in the pool are recognised as positives."""
    return torch.tensor([zlib.crc32(v.encode()) for v in video_ids], dtype=torch.long, device=device)


def gather_features(text: TextFeatures, video: VideoFeatures) -> tuple[TextFeatures, VideoFeatures]:
    """The candidate pool is the global batch: features from every rank, gradients flowing back."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return text, video

    def gather(feats):
        return dataclasses.replace(feats, **{f.name: gather_with_grad(getattr(feats, f.name))
                                             for f in dataclasses.fields(feats) if getattr(feats, f.name) is not None})

    return gather(text), gather(video)


class ContrastiveTask(nn.Module):
    """What the DeepSpeed engine wraps in stage con: batch -> loss.

    With ``momentum`` (CLIP2TV) an EMA teacher of the encoder gives soft targets, and queues of
    the teacher's recent global-batch features extend the candidate pool past the batch."""

    def __init__(self, encoder: RetrievalEncoder, con: ConConfig | None = None, max_words: int = 0,
                 max_frames: int = 0):
        super().__init__()
        self.encoder = encoder
        self.teacher = MomentumTeacher(encoder, con.momentum_m) if con is not None and con.momentum else None
        self.alpha = con.distill_alpha if con is not None else 0.0
        if self.teacher is not None and encoder.laff_video is not None:
            raise ValueError("stage.con.momentum with model.laff is not supported yet: turn one of them off")
        self.fusion_weights: dict[str, float] = {}  # mean LAFF attention per fused feature, for logging
        self.sim_std: float | None = None  # spread of the latest pool's similarities (collapse: ~0)
        self.text_queue = self.video_queue = None
        if self.teacher is not None and con.queue_size > 0:
            dim = encoder.text_weight[0].in_features
            dtypes = {"weights": torch.float32, "mask": torch.bool, "group": torch.long}
            self.text_queue = FeatureQueue(con.queue_size, {"words": (max_words, dim), "weights": (max_words,),
                                                            "mask": (max_words,), "group": ()},
                                           dict(dtypes, words=torch.float32))
            self.video_queue = FeatureQueue(con.queue_size, {"frames": (max_frames, dim), "weights": (max_frames,),
                                                             "mask": (max_frames,), "group": ()},
                                            dict(dtypes, frames=torch.float32))

    def forward(self, video: torch.Tensor, video_mask: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        t, v = gather_features(self.encoder.encode_text(text, text_mask), self.encoder.encode_video(video, video_mask))
        all_groups = gather_with_grad(groups) if torch.distributed.is_initialized() else groups
        scale = self.encoder.scale().float()
        if t.fused is not None:
            return self._laff_loss(t, v, scale, all_groups)
        if self.teacher is None:
            sim = self.encoder.similarity(t, v)
            self.sim_std = float(sim.detach().std())
            return contrastive_loss(sim, scale, all_groups, all_groups)
        with torch.no_grad():
            tt, tv = gather_features(self.teacher.module.encode_text(text, text_mask),
                                     self.teacher.module.encode_video(video, video_mask))
        pool_t, pool_tt, text_groups = self._with_queue(t, tt, all_groups, self.text_queue, "words")
        pool_v, pool_tv, pool_video_groups = self._with_queue(v, tv, all_groups, self.video_queue, "frames")
        sim = self.encoder.similarity
        loss_t2v = distilled_contrastive_loss(sim(t, pool_v), sim(tt, pool_tv), all_groups, pool_video_groups,
                                              scale, self.alpha)
        loss_v2t = distilled_contrastive_loss(sim(pool_t, v).t(), sim(pool_tt, tv).t(), all_groups, text_groups,
                                              scale, self.alpha)
        if self.text_queue is not None:
            self.text_queue.push(words=tt.words, weights=tt.weights, mask=tt.mask, group=all_groups)
            self.video_queue.push(frames=tv.frames, weights=tv.weights, mask=tv.mask, group=all_groups)
        return (loss_t2v + loss_v2t) / 2

    def _laff_loss(self, t: TextFeatures, v: VideoFeatures, scale: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """WTI's contrastive loss plus one per LAFF head (LAFF sums its loss over heads)."""
        wti = self.encoder.similarity(dataclasses.replace(t, fused=None), dataclasses.replace(v, fused=None))
        _, per_head = multihead_similarity(t.fused.float(), v.fused.float())
        with torch.no_grad():
            for side, names, weights in (("video", VIDEO_FUSION_INPUTS, v.fusion_weights),
                                         ("text", TEXT_FUSION_INPUTS, t.fusion_weights)):
                mean = weights.float().mean(dim=(0, 1))
                self.fusion_weights.update({f"laff_{side}_{n}": float(w) for n, w in zip(names, mean)})
        return contrastive_loss(wti, scale, groups, groups) + sum(
            contrastive_loss(head, scale, groups, groups) for head in per_head)

    @staticmethod
    def _with_queue(student, teacher, groups, queue, tokens: str):
        """(student pool, teacher pool, pool groups): this batch, then the queued teacher features."""
        if queue is None or len(queue) == 0:
            return student, teacher, groups
        q = queue.items()

        def extend(feats):
            return dataclasses.replace(feats, **{
                name: torch.cat([getattr(feats, name), q[name].to(getattr(feats, name).dtype)])
                for name in (tokens, "weights", "mask")})

        return extend(student), extend(teacher), torch.cat([groups, q["group"]])

    def after_step(self) -> None:
        if self.teacher is not None:
            self.teacher.update(self.encoder)


def param_groups(encoder: RetrievalEncoder, lr: float, clip_lr_coef: float) -> list[dict]:
    """CLIP at lr * clip_lr_coef (fine-tuning pretrained weights gently), the rest at lr."""
    return [
        {"params": encoder.clip_parameters(), "lr": lr * clip_lr_coef, "name": "clip"},
        {"params": encoder.new_parameters(), "lr": lr, "name": "new"},
    ]


def contrastive_step(engine, batch: dict, dtype: torch.dtype, device: torch.device) -> float:
    """One optimisation step; returns the loss."""
    loss = engine(
        video_to_device(batch["video"], batch["video_mask"], device, dtype),
        batch["video_mask"].to(device),
        batch["text"].to(device),
        batch["text_mask"].to(device),
        video_groups(batch["video_id"], device),
    )
    engine.backward(loss)
    boundary = engine.is_gradient_accumulation_boundary()
    engine.step()
    if boundary:
        engine.module.after_step()  # the EMA teacher follows the optimiser steps
    return loss.item()


def train_con(ctx, encoder: RetrievalEncoder, source: TrainSource, resume: ResumePoint | None = None,
              evaluate: Callable[[int], float | None] | None = None) -> Path:
    """Stage con on ``source``'s batches; resumable exactly. ``evaluate(step)`` (``run.eval_every``)
    scores the encoder mid-stage: the best checkpoint is then the best evaluated one."""
    cfg, con = ctx.cfg, ctx.cfg.stage.con
    # Steps are optimiser steps (stage.con.max_steps, the LR schedule, logging, checkpoints): each
    # takes deepspeed.grad_accum micro-batches of data.batch_size per rank.
    total = con.max_steps or max(1, con.epochs * len(source) // cfg.deepspeed.grad_accum)
    # The small CLIP learning rate protects pretrained weights; a randomly initialised CLIP
    # (model.weights unset: tests, the synthetic job) must learn at the full rate.
    clip_coef = con.clip_lr_coef if cfg.model.weights else 1.0
    task = ContrastiveTask(encoder, con, cfg.data.max_words, cfg.data.max_frames)
    engine = build_engine(task, param_groups(encoder, con.lr, clip_coef), cfg.deepspeed,
                          micro_batch=cfg.data.batch_size, total_steps=total, warmup_ratio=con.warmup_ratio,
                          weight_decay=con.weight_decay)
    eval_every = cfg.run.eval_every if evaluate is not None else 0
    ckpt = ctx.checkpoints("con", best_by="eval" if eval_every else "loss")
    state = ckpt.track("loop", LoopState())
    ckpt.track("stream", source)
    if resume is not None:
        ckpt.restore(engine, resume)
    dtype, world = engine_dtype(engine), ctx.dist.world_size
    samples = SampleLog(ctx.run_dir, "con", ctx.dist.rank, cfg.run.sample_log)
    samples.resume_at(state.step)

    def micro_step(batch: dict) -> tuple[dict[str, float], int]:
        samples.write(state.step + 1, source.epoch, batch["key"])
        return {"loss": contrastive_step(engine, batch, dtype, ctx.dist.device)}, len(batch["video_id"]) * world

    def extra_metrics() -> dict[str, float]:
        spread = {} if task.sim_std is None else {"sim_std": task.sim_std}
        return {"epoch": source.epoch, "logit_scale": encoder.scale().item(), **spread, **task.fusion_weights,
                **{f"data_{k}": v for k, v in source.counters.items()}}

    run = cfg.run
    watch = CollapseWatch("con", pool=cfg.data.batch_size * world + con.queue_size,
                          start_step=max(int(total * con.warmup_ratio) + 1, run.collapse_min_step),
                          patience=run.collapse_patience,
                          margin=run.collapse_margin)

    def monitor(step: int, logged: dict[str, float]) -> None:
        if watch.check(step, logged["loss"], logged.get("sim_std")):
            report_collapse(ctx, watch, step, logged["loss"], logged.get("sim_std"))
            watch.flagged = -10**9  # said once; training goes on only with run.stop_on_collapse=false

    tag_dir = run_stage(ctx, "con", engine, ckpt, state, total=total, micro_batches=epochs(source),
                        micro_step=micro_step, log_every=con.log_every, extra_metrics=extra_metrics,
                        evaluate=evaluate, eval_every=eval_every, monitor=monitor)
    samples.close()
    return export_stage(engine, "con", tag_dir, ctx.run_dir, step=state.step, model_config=asdict(cfg.model),
                        max_frames=cfg.data.max_frames)
