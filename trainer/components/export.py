"""Stage exports, written in one place: ``<run_dir>/<stage>.pt`` holds a stage's fp32 weights and
what is needed to rebuild its model (model config, frame count). Stage gen, eval.py, search.py
and the registry load these; resuming uses the engine checkpoints instead (``checkpoint.py``)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

EXPORT_FORMAT = 1


class UnsafeFile(ValueError):
    """A file that a weights-only load refuses: loading it would run code from its pickle."""


def safe_load(path: Path):
    """``torch.load`` with ``weights_only=True``: tensors, numbers, strings and containers only.
    Everything streamret writes (exports, RNG states, feature banks) loads this way; a file whose
    pickle asks for anything else is refused, and nothing in it runs."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeFile(f"{path}: refused, its pickle holds more than tensors and plain data ({first[:160]}); "
                         "streamret never unpickles code: use a file this version of streamret wrote, or "
                         "re-export it from a trusted run dir") from None


def write_export(path: Path, stage: str, state_dict: dict[str, torch.Tensor], **meta) -> Path:
    """The export payload, written atomically: a crash mid-write never leaves a torn file under
    the real name."""
    payload = dict(meta, format=EXPORT_FORMAT, stage=stage, state_dict=state_dict)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def fp32_state_dict(engine, save_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The module's weights in fp32: with bf16/fp16 the exact values live in ZeRO's fp32 master
    copy, so read them back from the checkpoint just written rather than upcasting 16-bit ones."""
    if engine.zero_optimization_stage() > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag=tag)
        # Frozen parameters (no master copy) and buffers come from the module itself.
        for k, v in engine.module.state_dict().items():
            state.setdefault(k, v)
    else:
        state = engine.module.state_dict()
    # ZeRO-2/3 hand back frozen parameters in the module's 16-bit dtype: everything leaves as fp32.
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def export_stage(engine, stage: str, tag_dir: Path, run_dir: Path, **meta) -> Path:
    """``<run_dir>/<stage>.pt``: fp32 weights + what is needed to rebuild the model."""
    path = run_dir / f"{stage}.pt"
    if engine.global_rank == 0:
        write_export(path, stage, fp32_state_dict(engine, tag_dir.parent, tag_dir.name), **meta)
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
    payload = safe_load(path)
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
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
