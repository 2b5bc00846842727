"""Which samples each optimizer step trained on (``run.sample_log``): an audit of the data path.

``<run_dir>/samples/<stage>.rank<r>.jsonl``, one line per micro-batch: ``{"step", "epoch",
"keys"}``. Each line is flushed as it is written, and a resumed stage first drops the lines of
the steps after its checkpoint, which it is about to redo: the file is always the history of the
weights being trained, so "each sample of an epoch exactly once, across preemptions and worker
restarts" is a count over it (tests/test_ray_fault.py), and "what did step 1234 see" a grep.
"""
from __future__ import annotations

import json
from pathlib import Path

from trainer.components.rundir import atomic_write


class SampleLog:
    def __init__(self, run_dir: Path, stage: str, rank: int, enabled: bool) -> None:
        self.path = Path(run_dir) / "samples" / f"{stage}.rank{rank}.jsonl"
        self.enabled = enabled
        self._file = None

    def resume_at(self, step: int) -> None:
        """Keep the lines of steps ``<= step`` (the checkpoint resumed from; 0: a fresh stage)."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if step > 0 and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        atomic_write(self.path, "".join(f"{line}\n" for line in kept))
        self._file = self.path.open("a")

    def write(self, step: int, epoch: int, keys: list[str]) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"step": step, "epoch": epoch, "keys": list(keys)}) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_sample_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]
