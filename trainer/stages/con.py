"""Stage ``con``: the dual encoder trained with the symmetric WTI contrastive loss over the
global batch (every rank's texts and videos, gathered with gradients)."""
from __future__ import annotations

import zlib
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ops import gather_with_grad
from trainer.checkpoint import CheckpointManager, GracefulStop, Preempted, ResumePoint, export_stage
from trainer.context import StepTimer
from trainer.data import train_loader
from trainer.engine import build_engine, engine_dtype, learning_rates
from trainer.losses import contrastive_loss
from trainer.models import RetrievalEncoder, TextFeatures, VideoFeatures


def video_groups(video_ids: list[str], device: torch.device) -> torch.Tensor:
    """Stable integer ids (equal across ranks and runs) of each sample's video, so that several
    captions of one video in the pool are recognised as positives."""
    return torch.tensor([zlib.crc32(v.encode()) for v in video_ids], dtype=torch.long, device=device)


def gather_features(text: TextFeatures, video: VideoFeatures) -> tuple[TextFeatures, VideoFeatures]:
    """The candidate pool is the global batch: features from every rank, gradients flowing back."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return text, video
    return (
        TextFeatures(gather_with_grad(text.words), gather_with_grad(text.weights),
                     gather_with_grad(text.mask), gather_with_grad(text.sentence)),
        VideoFeatures(gather_with_grad(video.frames), gather_with_grad(video.weights),
                      gather_with_grad(video.mask)),
    )


class ContrastiveTask(nn.Module):
    """What the DeepSpeed engine wraps in stage con: batch -> loss."""

    def __init__(self, encoder: RetrievalEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, video: torch.Tensor, video_mask: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        t = self.encoder.encode_text(text, text_mask)
        v = self.encoder.encode_video(video, video_mask)
        t, v = gather_features(t, v)
        all_groups = gather_with_grad(groups) if torch.distributed.is_initialized() else groups
        sim = self.encoder.similarity(t, v)
        return contrastive_loss(sim, self.encoder.scale().float(), all_groups, all_groups)


def param_groups(encoder: RetrievalEncoder, lr: float, clip_lr_coef: float) -> list[dict]:
    """CLIP at lr * clip_lr_coef (fine-tuning pretrained weights gently), the rest at lr."""
    return [
        {"params": encoder.clip_parameters(), "lr": lr * clip_lr_coef, "name": "clip"},
        {"params": encoder.new_parameters(), "lr": lr, "name": "new"},
    ]


def contrastive_step(engine, batch: dict, dtype: torch.dtype, device: torch.device) -> float:
    """One optimisation step; returns the loss."""
    loss = engine(
        batch["video"].to(device, dtype, non_blocking=True),
        batch["video_mask"].to(device),
        batch["text"].to(device),
        batch["text_mask"].to(device),
        video_groups(batch["video_id"], device),
    )
    engine.backward(loss)
    engine.step()
    return loss.item()


def train_con(ctx, encoder: RetrievalEncoder, resume: ResumePoint | None = None) -> Path:
    """The stage-con loop: stream batches, step the engine, log, checkpoint; resumable exactly."""
    cfg, con = ctx.cfg, ctx.cfg.stage.con
    loader = train_loader(cfg.data, cfg.model, ctx.dist, cfg.run.seed)
    total = con.max_steps or con.epochs * len(loader)
    # The small CLIP learning rate protects pretrained weights; a randomly initialised CLIP
    # (model.weights unset: tests, the synthetic job) must learn at the full rate.
    clip_coef = con.clip_lr_coef if cfg.model.weights else 1.0
    engine = build_engine(ContrastiveTask(encoder), param_groups(encoder, con.lr, clip_coef), cfg.deepspeed,
                          micro_batch=cfg.data.batch_size, total_steps=total, warmup_ratio=con.warmup_ratio,
                          weight_decay=con.weight_decay)
    ckpt = CheckpointManager(ctx.run_dir, "con", cfg.run.keep_last, ctx.shapes)
    step = samples = 0
    if resume is not None:
        client = ckpt.restore(engine, resume)
        step, samples = client["step"], client["samples_seen"]
        loader.load_state_dict(client["stream"])

    def state() -> dict:
        return {"stream": loader.state_dict(), "step": step, "samples_seen": samples,
                "mlflow_run_id": ctx.tracker.run_id}

    dtype, timer = engine_dtype(engine), StepTimer()
    progress = tqdm(total=total, initial=step, desc="stage con", disable=not (cfg.run.progress and ctx.dist.is_main))
    with GracefulStop() as stop:
        while step < total:
            for batch in loader:  # the rest of the current epoch; the next pass starts the next epoch
                timer.data_ready()
                loss = contrastive_step(engine, batch, dtype, ctx.dist.device)
                step, n = step + 1, len(batch["video_id"]) * ctx.dist.world_size
                samples += n
                timer.step_done(n)
                progress.update()
                progress.set_postfix(loss=f"{loss:.3f}", epoch=loader.stream.epoch)
                if step % con.log_every == 0 or step == total:
                    ctx.log("con", {"loss": loss, "epoch": loader.stream.epoch, "samples_seen": samples,
                                    "logit_scale": encoder.scale().item(), **learning_rates(engine), **timer.read(),
                                    **{f"data_{k}": v for k, v in loader.stream.counters.items()}}, step)
                if step >= total:
                    break
                if stop.should_stop():
                    ckpt.save(engine, step, state())
                    raise Preempted(step)
                if cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0:
                    ckpt.save(engine, step, state())
    progress.close()
    tag_dir = ckpt.save(engine, step, state(), finished=True)
    return export_stage(engine, ckpt, tag_dir, ctx.run_dir,
                        export={"step": step, "model_config": asdict(cfg.model), "max_frames": cfg.data.max_frames})
