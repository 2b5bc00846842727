"""Checkpoints of a run directory, written so that a preempted run comes back exactly.

``<run_dir>/checkpoints/<stage>/<tag>/`` holds a DeepSpeed engine checkpoint (module, optimizer,
LR schedule, loss scaler) plus our client state (stream position, step, samples seen, MLflow run
id) and each rank's RNG states. A tag counts only once its ``COMPLETE`` marker exists, and
``latest`` is replaced atomically after that, so a crash mid-write never corrupts what resume
finds. ``<run_dir>/<stage>.pt`` is the stage's exported fp32 weights plus the model config needed
to rebuild them: what stage gen, eval.py and the registry load.

Retention: the last ``keep_last`` complete tags, plus the best one by the metric the loop recorded
in each marker (lower is better), named by ``<stage dir>/best``. The stages evaluate only after
training, so that metric is the training loss of the saved step's batch (the global batch in stage
con, rank 0's batch in stage gen): a noisy proxy, not an evaluation score.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

EXPORT_FORMAT = 1
MARKER = "COMPLETE"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class ResumePoint:
    stage: str
    tag_dir: Path
    marker: dict

    @property
    def finished(self) -> bool:
        """The stage ran to its end (the next stage starts fresh)."""
        return bool(self.marker.get("finished"))


def complete_tags(stage_dir: Path) -> list[Path]:
    tags = [p for p in stage_dir.glob("step*") if (p / MARKER).is_file()] if stage_dir.is_dir() else []
    return sorted(tags, key=lambda p: p.name)


def find_resume_point(resume: str, run_dir: Path, shape_key: dict) -> ResumePoint | None:
    """``none`` -> None; ``auto`` -> the newest complete checkpoint of the run dir (gen after con);
    a path -> that tag dir. Refuses a checkpoint whose model/data shapes differ from this config."""
    if resume == "none":
        return None
    if resume == "auto":
        for stage in ("gen", "con"):
            tags = complete_tags(run_dir / "checkpoints" / stage)
            if tags:
                point = ResumePoint(stage, tags[-1], json.loads((tags[-1] / MARKER).read_text()))
                break
        else:
            return None  # nothing to resume: a fresh run
    else:
        tag = Path(resume)
        if not (tag / MARKER).is_file():
            raise FileNotFoundError(f"run.resume={resume}: not a complete streamret checkpoint (no {MARKER} "
                                    "marker); use run.resume=auto or a <run_dir>/checkpoints/<stage>/step* dir")
        point = ResumePoint(tag.parent.name, tag, json.loads((tag / MARKER).read_text()))
    saved = point.marker.get("shapes", {})
    changed = {k: (saved.get(k), v) for k, v in shape_key.items() if saved.get(k) != v}
    if changed:
        detail = ", ".join(f"{k}: saved {a} vs now {b}" for k, (a, b) in changed.items())
        raise ValueError(f"cannot resume from {point.tag_dir}: shapes changed ({detail}); resume with the "
                         "config the run was started with, or start a new run.dir")
    return point


def retained_tags(complete: list[Path], keep_last: int) -> list[Path]:
    """Of the complete tags (oldest first): the last ``keep_last``, and the best by recorded metric."""
    keep = complete[-keep_last:] if keep_last > 0 else []
    best = best_tag(complete)
    return sorted(set(keep) | ({best} if best is not None else set()), key=lambda p: p.name)


def best_tag(complete: list[Path]) -> Path | None:
    """The complete tag whose marker records the lowest ``metric`` (the later one on a tie); None if
    no marker records one."""
    scored = []
    for tag in complete:
        metric = json.loads((tag / MARKER).read_text()).get("metric")
        if metric is not None:
            scored.append((float(metric), tag.name, tag))
    if not scored:
        return None
    low = min(m for m, _, _ in scored)
    return max((t for m, _, t in scored if m == low), key=lambda p: p.name)


class CheckpointManager:
    """Save/restore one stage's engine + client state; keep the last ``keep_last`` complete tags and
    the best by the metric passed to :meth:`save` (lower is better)."""

    def __init__(self, run_dir: Path, stage: str, keep_last: int, shapes: dict, before_save=None,
                 after_save=None):
        self.dir = run_dir / "checkpoints" / stage
        self.stage, self.keep_last, self.shapes = stage, max(1, keep_last), shapes
        # Called first on every save: the metrics logger flushes, so a run killed right after a
        # checkpoint has every step up to it in MLflow and the resumed run continues the history.
        self.before_save = before_save
        # Called last on every rank with (tag_dir, step): a launcher that tracks checkpoints
        # itself (Ray Train) is told about each complete one.
        self.after_save = after_save

    def save(self, engine, step: int, client_state: dict, *, finished: bool = False,
             metric: float | None = None) -> Path:
        """Checkpoint ``step``; ``metric`` (lower is better, e.g. the step's training loss) makes the
        tag a candidate for the best one, which pruning keeps besides the last ``keep_last``."""
        tag = f"step{step:08d}"
        tag_dir = self.dir / tag
        if (tag_dir / MARKER).is_file():
            return tag_dir  # this step is already saved (e.g. SIGTERM right after a periodic save)
        if self.before_save is not None:
            self.before_save()
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        torch.save(rng_state(), tag_dir / f"rng_rank{engine.global_rank}.pt")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank's files are on disk before the marker
        if engine.global_rank == 0:
            marker = {"stage": self.stage, "step": step, "finished": finished, "shapes": self.shapes,
                      "mlflow_run_id": client_state.get("mlflow_run_id"),
                      "metric": None if metric is None else float(metric)}
            _atomic_write(tag_dir / MARKER, json.dumps(marker, indent=2))
            _atomic_write(self.dir / "latest", tag)
            self.prune(keep=tag_dir)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        if self.after_save is not None:
            self.after_save(tag_dir, step)
        return tag_dir

    def prune(self, keep: Path | None = None) -> list[Path]:
        """Delete complete tags that are neither among the last ``keep_last`` nor the best, and torn
        ones (no marker) other than ``keep``; point ``best`` at the best tag. Returns what was deleted."""
        complete = complete_tags(self.dir)
        retained = retained_tags(complete, self.keep_last)
        removed = [tag for tag in complete if tag not in retained]
        removed += [p for p in self.dir.glob("step*")  # torn writes of a crashed save
                    if p != keep and p not in complete]
        for tag in removed:
            shutil.rmtree(tag, ignore_errors=True)
        best = best_tag(retained)
        if best is not None:
            _atomic_write(self.dir / "best", best.name)
        return sorted(removed, key=lambda p: p.name)

    def restore(self, engine, point: ResumePoint) -> dict:
        """Load engine state from ``point``; returns our client state; restores this rank's RNG."""
        _, client = engine.load_checkpoint(str(point.tag_dir.parent), tag=point.tag_dir.name,
                                           load_optimizer_states=True, load_lr_scheduler_states=True)
        if client is None:
            raise RuntimeError(f"DeepSpeed could not load {point.tag_dir}")
        rng_file = point.tag_dir / f"rng_rank{engine.global_rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return client


class GracefulStop:
    """SIGTERM/SIGINT ask the loop to finish its step, checkpoint and exit 0 (preemption)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "GracefulStop":
        # Python installs handlers from the main thread only; Ray Train runs the loop in another
        # thread (preemption there comes through Ray, not a signal to this process).
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def should_stop(self) -> bool:
        """True on every rank as soon as one rank was signalled."""
        flag = torch.tensor([int(self.requested)])
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Preempted(SystemExit):
    """Raised after the checkpoint on SIGTERM/SIGINT: the process exits 0 and resumes later."""

    def __init__(self, step: int):
        super().__init__(0)
        self.step = step


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


def export_stage(engine, manager: CheckpointManager, tag_dir: Path, run_dir: Path, export: dict) -> Path:
    """``<run_dir>/<stage>.pt``: fp32 weights + what is needed to rebuild the model."""
    path = run_dir / f"{manager.stage}.pt"
    if engine.global_rank == 0:
        payload = dict(export, format=EXPORT_FORMAT, stage=manager.stage,
                       state_dict=fp32_state_dict(engine, tag_dir.parent, tag_dir.name))
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
