"""Checkpoints of a run directory, written so that a preempted run comes back exactly.

``<run_dir>/checkpoints/<stage>/<tag>/`` holds a DeepSpeed engine checkpoint (module, optimizer,
LR schedule, loss scaler) plus our client state (stream position, step, samples seen, MLflow run
id) and each rank's RNG states. A tag counts only once its ``COMPLETE`` marker exists, and
``latest`` is replaced atomically after that, so a crash mid-write never corrupts what resume
finds. ``<run_dir>/<stage>.pt`` is the stage's exported fp32 weights plus the model config needed
to rebuild them: what stage gen, eval.py and the registry load.

The manager owns its cadence (``maybe_save`` saves every ``every`` optimizer steps) and the state
it saves: stage loops register their stateful parts once (``track("stream", source)``: anything
with ``state_dict``/``load_state_dict``) and the manager writes and restores them all together.

Retention: the last ``keep_last`` complete tags, plus the best one by the metric recorded in each
marker (lower is better), named by ``<stage dir>/best``. With ``best_by="eval"`` (stage con under
``run.eval_every``) the metric is the negated evaluation score of the checkpoints saved after an
evaluation; otherwise it is the training loss of the saved step (the global batch in stage con,
rank 0's batch in stage gen): a noisy proxy, not an evaluation score.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from trainer.components.export import safe_load
from trainer.components.rundir import atomic_write, check_same_run

MARKER = "COMPLETE"


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def rng_state() -> dict:
    """Every generator's state as tensors and plain data, so that it loads with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
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


def find_resume_point(resume: str, run_dir: Path, shape_key: dict, run_uid: str = "") -> ResumePoint | None:
    """``none`` -> None; ``auto`` -> the newest complete checkpoint of the run dir (gen after con);
    a path -> that tag dir. Refuses a checkpoint whose model/data shapes differ from this config,
    and (with ``auto``) one another run wrote."""
    if resume == "none":
        return None
    if resume == "auto":
        for stage in ("gen", "con"):
            tags = complete_tags(run_dir / "checkpoints" / stage)
            if tags:
                point = ResumePoint(stage, tags[-1], json.loads((tags[-1] / MARKER).read_text()))
                check_same_run(point.marker, run_uid, tags[-1])
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
    """Save/restore one stage's engine + the state registered with :meth:`track`; save on the
    cadence ``every`` (optimizer steps, 0 = only when told); keep the last ``keep_last`` complete
    tags and the best by recorded metric (lower is better)."""

    def __init__(self, run_dir: Path, stage: str, keep_last: int, shapes: dict, *, every: int = 0,
                 best_by: str = "loss", run_id: Callable[[], str | None] = lambda: None, run_uid: str = "",
                 before_save: Callable[[], None] | None = None,
                 after_save: Callable[[Path, int], None] | None = None):
        if best_by not in ("loss", "eval"):
            raise ValueError(f"best_by must be 'loss' or 'eval', got {best_by!r}")
        self.dir = run_dir / "checkpoints" / stage
        self.stage, self.keep_last, self.shapes = stage, max(1, keep_last), shapes
        self.every, self.best_by, self.run_id, self.run_uid = every, best_by, run_id, run_uid
        self.tracked: dict[str, Stateful] = {}
        # Called first on every save: the metrics logger flushes, so a run killed right after a
        # checkpoint has every step up to it in MLflow and the resumed run continues the history.
        self.before_save = before_save
        # Called last on every rank with (tag_dir, step): a launcher that tracks checkpoints
        # itself (Ray Train) is told about each complete one.
        self.after_save = after_save

    def track(self, name: str, obj: Stateful) -> Stateful:
        """Save ``obj.state_dict()`` under ``name`` with every checkpoint and restore it on resume."""
        self.tracked[name] = obj
        return obj

    def maybe_save(self, engine, step: int, loss: float | None) -> Path | None:
        """Checkpoint when ``step`` is on the cadence."""
        if self.every and step % self.every == 0:
            return self.save(engine, step, loss=loss)
        return None

    def save_scored(self, engine, step: int, score: float | None) -> Path:
        """Checkpoint right after an evaluation, ranked by its score (higher is better)."""
        return self._save(engine, step, finished=False, metric=None if score is None else -score)

    def save(self, engine, step: int, *, finished: bool = False, loss: float | None = None) -> Path:
        """Checkpoint ``step``; under ``best_by="loss"`` the loss makes it a candidate for ``best``."""
        return self._save(engine, step, finished=finished, metric=loss if self.best_by == "loss" else None)

    def _save(self, engine, step: int, *, finished: bool, metric: float | None) -> Path:
        tag = f"step{step:08d}"
        tag_dir = self.dir / tag
        if (tag_dir / MARKER).is_file():
            return tag_dir  # this step is already saved (e.g. SIGTERM right after a periodic save)
        if self.before_save is not None:
            self.before_save()
        client_state = {name: obj.state_dict() for name, obj in self.tracked.items()}
        client_state.update(step=step, mlflow_run_id=self.run_id())
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        torch.save(rng_state(), tag_dir / f"rng_rank{engine.global_rank}.pt")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank's files are on disk before the marker
        if engine.global_rank == 0:
            marker = {"stage": self.stage, "step": step, "finished": finished, "shapes": self.shapes,
                      "mlflow_run_id": client_state["mlflow_run_id"], "run_uid": self.run_uid,
                      "metric": None if metric is None else float(metric)}
            atomic_write(tag_dir / MARKER, json.dumps(marker, indent=2))
            atomic_write(self.dir / "latest", tag)
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
            atomic_write(self.dir / "best", best.name)
        return sorted(removed, key=lambda p: p.name)

    def restore(self, engine, point: ResumePoint) -> int:
        """Load the engine state and every tracked object from ``point``, restore this rank's RNG;
        returns the step the checkpoint was taken at."""
        _, client = engine.load_checkpoint(str(point.tag_dir.parent), tag=point.tag_dir.name,
                                           load_optimizer_states=True, load_lr_scheduler_states=True)
        if client is None:
            raise RuntimeError(f"DeepSpeed could not load {point.tag_dir}")
        missing = [name for name in self.tracked if name not in client]
        if missing:
            raise ValueError(f"{point.tag_dir}: the checkpoint holds no {', '.join(missing)} state (written by an "
                             "older streamret?); start a new run.dir or resume with the version that wrote it")
        for name, obj in self.tracked.items():
            obj.load_state_dict(client[name])
        rng_file = point.tag_dir / f"rng_rank{engine.global_rank}.pt"
        if rng_file.is_file():
            set_rng_state(safe_load(rng_file))
        return int(client["step"])
