"""DeepSpeed engines for both stages: ZeRO stage, precision, accumulation, clipping and the
warmup-cosine schedule all come from the ``deepspeed`` and ``stage`` config groups.

The optimizer is torch's AdamW, handed to DeepSpeed as a client optimizer with two parameter
groups (CLIP at lr x clip_lr_coef, the rest at lr), so no compiled optimizer op is needed on CPU.
DeepSpeed keeps fp32 master weights for bf16/fp16 (the reference kept CLIP in pure fp16 and lost
small updates).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trainer.config import DeepSpeedConfig

PRECISIONS = ("bf16", "fp16", "fp32")


def deepspeed_config(ds: DeepSpeedConfig, micro_batch: int, total_steps: int, warmup_ratio: float) -> dict[str, Any]:
    if ds.precision not in PRECISIONS:
        raise ValueError(f"deepspeed.precision must be one of {PRECISIONS}, got {ds.precision!r}")
    if ds.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage must be 0-3, got {ds.zero_stage}")
    total_steps = max(total_steps, 1)
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": ds.grad_accum,
        "gradient_clipping": ds.grad_clip,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": {"stage": ds.zero_stage},
        "zero_allow_untested_optimizer": True,
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": total_steps,
                "warmup_num_steps": max(1, int(total_steps * warmup_ratio)),
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": 0.0,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(model: nn.Module, param_groups: list[dict], ds: DeepSpeedConfig, *, micro_batch: int,
                 total_steps: int, warmup_ratio: float, weight_decay: float):
    """-> DeepSpeed engine wrapping ``model``; ``param_groups`` are AdamW groups with their lr."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed's CPU accelerator has no fp16 kernels (is_fp16_supported() is falsy there); fail
    # here, before initialize(), instead of deep inside the first fp16 step.
    if ds.precision == "fp16" and not get_accelerator().is_fp16_supported():
        raise ValueError(f"deepspeed.precision=fp16 needs a GPU; use bf16 or fp32 on CPU "
                         f"(the {get_accelerator().device_name()!r} accelerator does not support fp16)")
    groups = [dict(g, weight_decay=g.get("weight_decay", weight_decay)) for g in param_groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-6)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=deepspeed_config(ds, micro_batch, total_steps, warmup_ratio),
    )
    return engine


def engine_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


def learning_rates(engine) -> dict[str, float]:
    return {f"lr_group{i}": g["lr"] for i, g in enumerate(engine.optimizer.param_groups)}
