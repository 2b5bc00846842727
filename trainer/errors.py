"""Problems with the user's input (paths, corpora, tracking server) end a run with one line that
names the problem and the fix, and exit code 2; anything else is a bug and keeps its traceback."""
from __future__ import annotations

import contextlib
import sys

from shards.corpora.common import AnnotationError
from shards.manifest import ManifestError
from trainer.tracking import TrackingUnavailable

USER_ERRORS = (FileNotFoundError, AnnotationError, ManifestError, TrackingUnavailable)


@contextlib.contextmanager
def user_errors():
    try:
        yield
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
