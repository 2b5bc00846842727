"""Plain helpers the tests share (fixtures are in conftest.py): the repo root, a free loopback
port, the tiny model architecture, a tiny training run's overrides and how to launch it, and
readers of a finished run's losses and weights."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from trainer.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]

# The CLIP architecture, as small as it goes: what the model and task tests build.
TINY = ModelConfig(name="tiny", embed_dim=32, image_size=32, patch_size=16, vision_width=32, vision_layers=1,
                   vision_head_width=16, text_width=32, text_layers=2, text_heads=2, quick_gelu=False,
                   temporal_layers=2, weight_mlp_hidden=16)

# The test corpus (conftest's TINY_CORPUS) has no val split; the default job's data.val_split=val
# would generate and pack one into the shared fixture.
NO_VAL = "data.val_split="

# A tiny but complete training run (stage con -> stage gen -> evaluation -> MLflow -> registry).
TINY_RUN = [
    "data.max_frames=4", "data.max_words=16", "data.batch_size=8", "data.eval_batch_size=8", "data.num_workers=0",
    "stage.con.max_steps=3", "stage.gen.max_steps=3", "stage.gen.batch_size=12", "stage.gen.timesteps=5",
    "eval.rerank_topk=4", "run.progress=false", "run.device=cpu", "tracking.flush_every_s=0.5",
]


def wait_for_http(url: str, server: subprocess.Popen, timeout_s: float, what: str) -> None:
    """Poll ``url`` until it answers; fail (with the server's stderr when it kept it) if ``server``
    exits or ``timeout_s`` passes first."""
    import time
    import urllib.request

    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                err = server.stderr.read()[-3000:] if server.stderr else ""
                raise AssertionError(f"{what} did not come up at {url}: {err}")
            time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_train(*overrides: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """``launch/train.py`` with ``overrides`` (and no val split unless they name one: see NO_VAL)."""
    if not any(o.startswith("data.val_split=") for o in overrides):
        overrides = (*overrides, NO_VAL)
    return subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), *overrides], cwd=cwd,
                          env=dict(os.environ, DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=timeout)


def contrastive_batch(b: int = 3, frames: int = 4, words: int = 6) -> tuple:
    """ContrastiveTask's inputs for a tiny batch of ``b`` distinct videos (32 px, random)."""
    from trainer.stages.con import video_groups

    ids = torch.randint(1, 1000, (b, words))
    ids[:, -1] = 49407
    return (torch.randn(b, frames, 3, 32, 32), torch.ones(b, frames, dtype=torch.bool), ids,
            torch.ones(b, words, dtype=torch.bool), video_groups([f"v{i}" for i in range(b)], torch.device("cpu")))


def run_losses(run_dir: Path) -> dict[int, float]:
    """con/loss per step of a finished run whose store is ``<run_dir>.db``; a step logged twice
    (before a kill and after the resume) keeps the last value."""
    from mlflow.tracking import MlflowClient

    run_id = json.loads((run_dir / "metrics.json").read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / (run_dir.name + '.db')}")
    history = sorted(client.get_metric_history(run_id, "con/loss"), key=lambda m: m.timestamp)
    return {m.step: m.value for m in history}


def export_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "con.pt", weights_only=False)["state_dict"]
