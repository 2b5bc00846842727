"""Secrets stay out of MLflow, logs and artifacts.

A tracking URI with credentials (``http://user:token@host``), a storage URL with a key in its
query string, or a config value under a secret-bearing name would otherwise be stored in clear
text: params are the flattened config, ``config.yaml`` and ``metrics.json`` are artifacts, and
URIs appear in log lines and error messages. Everything streamret writes or prints about a run
goes through :func:`redact` / :func:`redact_tree`; the real values are used only to connect.
"""
from __future__ import annotations

import re
from typing import Any

from shards.storage import redact as redact_credentials

MASK = "***"
# Names of config keys or query parameters whose values are secrets, wherever they appear.
_SECRET_NAME = re.compile(r"(password|passwd|secret|token|api[_-]?key|access[_-]?key|credential|signature|"
                          r"session[_-]?key|private[_-]?key)", re.IGNORECASE)
_QUERY_SECRET = re.compile(r"([?&][^=&\s]*(?:password|secret|token|signature|key)[^=&\s]*=)[^&\s]+", re.IGNORECASE)


def redact(text: Any) -> str:
    """``text`` with URL credentials (``user:pw@``) and secret query parameters masked."""
    return _QUERY_SECRET.sub(rf"\g<1>{MASK}", redact_credentials(str(text)))


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name.rsplit(".", 1)[-1]))


def redact_tree(tree: Any, name: str = "") -> Any:
    """A copy of a nested dict/list config with secret-named values masked and every string redacted."""
    if isinstance(tree, dict):
        return {k: redact_tree(v, str(k)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [redact_tree(v, name) for v in tree]
    if name and is_secret_name(name) and tree not in (None, ""):
        return MASK
    return redact(tree) if isinstance(tree, str) else tree
