"""What every stage of a run shares: the typed config, ranks, the run dir, the metrics logger,
and a small in-memory loss history for the plots."""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from trainer.components.checkpoint import CheckpointManager
from trainer.components.distributed import DistInfo
from trainer.config import RootConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class RunContext:
    cfg: RootConfig
    dist: DistInfo
    run_dir: Path
    tracker: object  # trainer.components.tracking.MetricsLogger (no-op off rank 0)
    shapes: dict = field(default_factory=dict)  # what a checkpoint must match to be resumed
    after_checkpoint: Callable[[Path, int], None] | None = None  # the launcher's hook (Ray Train reports)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=lambda: defaultdict(list))
    run_uid: str = ""  # the run's identity (trainer.components.rundir), in every checkpoint marker
    # split -> {"in_split", "scored", <skip kind>: n}: what each evaluated split was scored on
    eval_data: dict[str, dict[str, int]] = field(default_factory=dict)

    def checkpoints(self, stage: str, best_by: str = "loss") -> CheckpointManager:
        """The stage's checkpoint manager: the run's cadence and retention, the metrics logger
        flushed before each save and the run id recorded in it, the launcher told after it."""
        run = self.cfg.run
        return CheckpointManager(self.run_dir, stage, run.keep_last, self.shapes, every=run.checkpoint_every,
                                 best_by=best_by, run_id=lambda: self.tracker.run_id, run_uid=self.run_uid,
                                 before_save=self.tracker.flush, after_save=self.after_checkpoint)

    def note_eval_data(self, split: str, in_split: int, scored: int, skipped: dict[str, int]) -> None:
        """Record and log (``eval/data_<split>_*``) on how many of ``split``'s samples it was scored,
        and why the others were dropped (decode errors, damaged shards)."""
        counts = {"in_split": in_split, "scored": scored, **{k: v for k, v in skipped.items() if v}}
        self.eval_data[split] = counts
        self.tracker.log_metrics({f"eval/data_{split}_{k}": float(v) for k, v in counts.items()}, step=0)
        if scored < in_split:
            print(f"warning: {split}: scored {scored} of its {in_split} samples "
                  f"({', '.join(f'{k} {v}' for k, v in skipped.items() if v) or 'unreadable'}); see the log above")

    def log(self, stage: str, metrics: dict[str, float], step: int) -> None:
        named = {f"{stage}/{k}": float(v) for k, v in metrics.items()}
        self.tracker.log_metrics(named, step=step)
        if "loss" in metrics:
            self.history[f"{stage} loss"].append((step, float(metrics["loss"])))


SHAPE_KEYS = ("embed_dim", "image_size", "patch_size", "vision_width", "vision_layers", "text_width",
              "text_layers", "temporal_layers", "weight_mlp_hidden", "laff", "laff_dim", "laff_heads")


def shape_key(cfg: RootConfig) -> dict:
    """The config values that fix tensor shapes; resuming with different ones is refused."""
    shapes = {k: getattr(cfg.model, k) for k in SHAPE_KEYS}
    return dict(shapes, max_frames=cfg.data.max_frames, max_words=cfg.data.max_words)
