"""Checkpoints of a run directory.

``<run_dir>/checkpoints/<stage>/`` holds DeepSpeed engine checkpoints (module, optimizer, schedule,
our client state); ``<run_dir>/<stage>.pt`` is the stage's exported fp32 weights plus the model
config needed to rebuild them, which is what stage gen, eval.py and the registry load.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

EXPORT_FORMAT = 1


def fp32_state_dict(engine, save_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The module's weights in fp32: with bf16/fp16 the exact values live in ZeRO's fp32 master
    copy, so read them back from the checkpoint just written rather than upcasting 16-bit ones."""
    if engine.zero_optimization_stage() > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag=tag)
        # Frozen parameters (no master copy) and buffers come from the module itself.
        for k, v in engine.module.state_dict().items():
            state.setdefault(k, v.float() if v.is_floating_point() else v)
        return state
    return {k: v.float() if v.is_floating_point() else v for k, v in engine.module.state_dict().items()}


def save_stage(engine, run_dir: Path, stage: str, step: int, client_state: dict, export: dict) -> Path:
    """Engine checkpoint + exported weights. ``export`` holds the metadata to rebuild the model."""
    save_dir = run_dir / "checkpoints" / stage
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state)
    path = run_dir / f"{stage}.pt"
    if engine.global_rank == 0:
        payload = dict(export, format=EXPORT_FORMAT, stage=stage, step=step,
                       state_dict=fp32_state_dict(engine, save_dir, tag))
        tmp = path.with_suffix(".pt.tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)  # a crash mid-write never leaves a torn file under the real name
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return path


def load_export(path: Path) -> dict:
    if path.is_dir():
        path = path / "con.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"no stage checkpoint at {path}: run stage con first (stage=con or stage=all) or set "
            "stage.gen.init=<run_dir | path to con.pt>"
        )
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: not a streamret stage export (format {payload.get('format')!r})")
    return payload


def load_into(module: nn.Module, payload: dict, prefix: str, source: Path) -> None:
    """Load the ``prefix``-ed part of an exported state dict into ``module``, refusing shape changes."""
    state = {k.removeprefix(prefix): v for k, v in payload["state_dict"].items() if k.startswith(prefix)}
    own = module.state_dict()
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError(f"{source}: shapes differ from this config's model ({'; '.join(bad[:3])}); "
                         "use the model/data config the checkpoint was trained with")
    module.load_state_dict(state, strict=True)
