"""Reaching an MLflow store, without importing mlflow (ranks other than 0 never do): what MLflow
accepts as names and params, pinning sqlite URIs, probing a server, and the one error a run
reports when the store is unreachable at start."""
from __future__ import annotations

import base64
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from trainer.components.secrets import redact, redact_tree

# MLflow's own limits (mlflow.utils.validation); copied so rank != 0 never imports mlflow.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_KEY_LENGTH = 250
PROBE_TIMEOUT_S = 3.0

_FORBIDDEN_NAME_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


def sanitize_metric_name(name: str) -> str:
    """Make ``name`` a valid MLflow metric/param key: ``"t2v_R@1" -> "t2v_R_at_1"``.

    Keeps ``[A-Za-z0-9_-. /]``; every other character becomes ``_``. Slashes are kept for grouping
    (``eval/con/t2v_R1``) but empty, ``.`` and ``..`` path segments are dropped because MLflow
    rejects names that normalise to a different path.
    """
    name = str(name).replace("@", "_at_")
    name = _FORBIDDEN_NAME_CHARS.sub("_", name)
    segments = [s for s in name.split("/") if s not in ("", ".", "..")]
    name = "/".join(segments) or "_"
    return name[:MAX_KEY_LENGTH]


def flatten_params(cfg: dict, prefix: str = "") -> dict[str, str]:
    """Flatten a nested config into MLflow params: ``{"data": {"batch_size": 32}}`` ->
    ``{"data.batch_size": "32"}``. Values become strings cut to MLflow's 6000-character limit;
    secrets are masked (``trainer.components.secrets``)."""
    flat: dict[str, str] = {}
    for key, value in redact_tree(cfg).items() if not prefix else cfg.items():  # no secret reaches MLflow
        full_key = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten_params(value, full_key))
        else:
            flat[full_key] = str(value)[:MAX_PARAM_VALUE_LENGTH]
    return flat


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store could not be reached or opened when starting the run."""


def _describe(exc: BaseException) -> str:
    """One line: MLflow/SQLAlchemy errors carry whole SQL statements and tracebacks."""
    lines = redact(str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _unavailable(uri: str, cause: object) -> TrackingUnavailable:
    return TrackingUnavailable(
        f"MLflow tracking store {redact(uri)!r} is unavailable ({redact(cause)}). Start the server "
        f"(e.g. `mlflow server --host 127.0.0.1 --port 5000`), fix the tracking URI in the config, "
        f"or use a local store such as 'sqlite:///mlflow.db'."
    )


def _probe_http(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast on an unreachable server: MLflow's own client retries for minutes."""
    parts = urllib.parse.urlsplit(uri)
    request = urllib.request.Request(uri.rstrip("/") + "/health")
    if parts.username is not None:  # urllib takes no credentials in the URL: send them as basic auth
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=netloc)).rstrip("/") + "/health")
        token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        urllib.request.urlopen(request, timeout=timeout_s).close()
    except urllib.error.HTTPError:
        pass  # the server answered; auth or routing problems surface from MLflow itself
    except OSError as exc:  # URLError, refused, timed out (limit timeout_s), DNS failure
        reason = getattr(exc, "reason", exc)
        raise _unavailable(uri, f"probe of {redact(uri.rstrip('/'))}/health failed: {reason}") from exc


def _absolute_sqlite_uri(uri: str) -> tuple[str, Path | None]:
    """Pin a relative ``sqlite:///mlflow.db`` to the current directory, so a later chdir
    (Hydra, launchers) cannot split one run across two databases. Returns (uri, db path)."""
    if not uri.startswith("sqlite:///"):
        return uri, None
    rest = uri[len("sqlite:///"):]
    path_part, sep, query = rest.partition("?")
    if path_part in ("", ":memory:"):
        return uri, None
    db_path = Path(path_part).expanduser().resolve()
    return "sqlite:///" + db_path.as_posix() + (sep + query), db_path
