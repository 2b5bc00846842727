"""Problems with the user's input (paths, corpora, tracking server) end a run with one line that
names the problem and the fix, and exit code 2; anything else is a bug and keeps its traceback."""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, TypeVar

from shards.corpora.common import AnnotationError, UnknownSplit
from shards.manifest import ManifestError
from shards.tarread import ShardMembersMissing
from shards.writer import PackRefused
from trainer.components.collapse import TrainingCollapsed
from trainer.components.export import UnsafeFile
from trainer.components.mlflow_store import TrackingUnavailable
from trainer.components.rundir import RunDirTaken

class ClusterTooSmall(ValueError):
    """launcher=ray: the cluster cannot hold the training workers and the decode pools' minimum."""


# TrainingCollapsed is not the user's input, but it is the user's to act on, in one line.
USER_ERRORS = (FileNotFoundError, AnnotationError, ManifestError, TrackingUnavailable, TrainingCollapsed,
               UnsafeFile, UnknownSplit, PackRefused, ShardMembersMissing, RunDirTaken, ClusterTooSmall)
Loaded = TypeVar("Loaded")


@contextlib.contextmanager
def user_errors():
    try:
        yield
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def run_entry_point(load: Callable[[], Loaded], body: Callable[[Loaded], object]) -> int:
    """An entry point's frame: ``load`` parses argv and composes the config (a ConfigError is one
    line and exit 2), then ``body`` runs with user-input problems reported the same way. The exit
    code is what ``body`` returns when that is an int, else 0."""
    from trainer.launchers.cli import ConfigError

    try:
        loaded = load()
    except ConfigError as err:
        print(err.message, file=sys.stderr)
        return 2
    with user_errors():
        code = body(loaded)
    return code if isinstance(code, int) else 0
