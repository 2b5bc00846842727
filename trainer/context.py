"""What every stage of a run shares: the typed config, ranks, the run dir, the metrics logger,
and a small in-memory loss history for the plots."""
from __future__ import annotations

import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from trainer.config import RootConfig
from trainer.distributed import DistInfo


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class RunContext:
    cfg: RootConfig
    dist: DistInfo
    run_dir: Path
    tracker: object  # trainer.tracking.MetricsLogger (no-op off rank 0)
    shapes: dict = field(default_factory=dict)  # what a checkpoint must match to be resumed
    after_checkpoint: Callable[[Path, int], None] | None = None  # the launcher's hook (Ray Train reports)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=lambda: defaultdict(list))

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


class StepTimer:
    """Samples/s and the fraction of wall time spent waiting for data, per logging window."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = self.mark = time.perf_counter()
        self.wait = 0.0
        self.samples = 0

    def data_ready(self) -> None:
        now = time.perf_counter()
        self.wait += now - self.mark
        self.mark = now

    def step_done(self, samples: int) -> None:
        self.samples += samples
        self.mark = time.perf_counter()

    def read(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"samples_per_s": self.samples / elapsed, "data_wait_frac": self.wait / elapsed}
        self.reset()
        return out
