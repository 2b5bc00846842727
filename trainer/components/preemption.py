"""Preemption: SIGTERM/SIGINT, or a ``<run_dir>/PREEMPT`` file (``rundir.STOP_FILE``), ask a stage loop to finish its
step, checkpoint and exit 0.

The file is how a request reaches a loop that no signal reaches: Ray Train runs it in a thread
of a worker actor, so the Ray driver turns the SIGTERM of ``ray job stop`` into the file
(``trainer.launchers.ray.StopOnSignal``); ``touch <run_dir>/PREEMPT`` stops any run the same way.
One ``stat`` per optimizer step.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch


class GracefulStop:
    """SIGTERM/SIGINT ask the loop to finish its step, checkpoint and exit 0 (preemption)."""

    def __init__(self, stop_file: Path | None = None) -> None:
        self.requested = False
        self.stop_file = stop_file
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
        if self.stop_file is not None and not self.requested and self.stop_file.exists():
            self.requested = True
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
