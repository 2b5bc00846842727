"""Preemption: SIGTERM/SIGINT ask a stage loop to finish its step, checkpoint and exit 0."""
from __future__ import annotations

import signal
import threading

import torch


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
