"""MLflow experiment tracking for streamret training runs.

Design decision: ONE MLflow run per training run. Stages are metric-name prefixes, not separate
runs: ``con/loss``, ``gen/loss``, ``eval/con/t2v_R1``, ``eval/gen/t2v_R1``,
``eval/gen_rerank/t2v_R1`` ... so stage ``con`` and stage ``gen`` (and the re-ranked scores) land on
the same chart in the MLflow UI and a run's stage-1 vs stage-2 gain is one comparison away. A run
preempted mid-training is resumed by passing its ``run_id`` back in; the same run continues.

Only rank 0 talks to MLflow; every other rank gets a logger whose methods are cheap no-ops.
``MlflowClient`` is used with explicit run ids (never the fluent ``mlflow.start_run`` global), so
nothing else in the process can collide with the training run.

Metrics are buffered in memory and written by a background thread every ``flush_every_s``, so
``log_metrics`` never blocks a training step on I/O. A failed flush (server or store gone) warns
once per outage, keeps the points (bounded; oldest dropped and counted) and retries next flush.
Against an http server MLflow's own retry loop (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
``MLFLOW_HTTP_REQUEST_TIMEOUT``) decides how long one failed request takes; that time is spent in
the background thread, but ``close()`` and the synchronous calls (params, tags, artifacts) wait
for it, so training jobs may want to lower those two variables.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from trainer.components.secrets import redact
from trainer.components.mlflow_store import (TrackingUnavailable, _absolute_sqlite_uri, _describe, _probe_http,
                                             _unavailable, flatten_params, sanitize_metric_name)

log = logging.getLogger(__name__)

MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_BUFFERED_POINTS = 100_000


class MetricsLogger:
    """Rank-0 MLflow logger for one training run; see the module docstring for the design.

    ``uri`` may be an ``http(s)://`` server or a local store (``sqlite:///mlflow.db``; its artifacts
    go to ``<db dir>/mlartifacts`` when this logger creates the experiment). ``run_id`` resumes an
    existing run instead of starting a new one. At most ``max_buffered_points`` unsent metric points
    are kept during an outage (oldest dropped, counted in ``dropped_points``). Raises :class:`TrackingUnavailable` if the store
    cannot be reached at start.
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        *,
        run_name: str | None = None,
        run_id: str | None = None,
        rank: int = 0,
        flush_every_s: float = 5.0,
        system_metrics: bool = False,
        tags: dict | None = None,
        max_buffered_points: int = MAX_BUFFERED_POINTS,
    ) -> None:
        self.run_id: str | None = None
        self.rank = rank
        self.enabled = rank == 0
        self.uri = uri
        self.experiment_id: str | None = None
        self.dropped_points = 0
        self.skipped_non_finite = 0
        self._closed = False
        if not self.enabled:
            return

        self.uri, db_path = _absolute_sqlite_uri(uri)
        self.shown_uri = redact(self.uri)  # what messages print: never the credentials
        if self.shown_uri != self.uri:  # MLflow prints "View run at <uri>" itself, credentials and all
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self._flush_every_s = flush_every_s
        self._max_buffered_points = max_buffered_points
        self._buffer: collections.deque = collections.deque()
        self._buffer_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._in_outage = False
        self._warned_non_finite: set[str] = set()
        self._mlflow_system_monitor = None
        self._sample_process = False
        self._system_step = 0
        self._in_flight = 0
        # A resumed run redoes the steps after its checkpoint, which the interrupted process may
        # have logged already: per metric, the steps MLflow holds are not logged again (fetched
        # once per name), so no step of the run's history is counted twice.
        self._logged_through: dict[str, int] | None = {} if run_id is not None else None
        self.skipped_logged = 0

        if self.uri.startswith(("http://", "https://")):
            _probe_http(self.uri)
        try:
            self._start_run(experiment, db_path, run_name, run_id, tags)
        except (TrackingUnavailable, ValueError):
            raise
        except Exception as exc:  # MlflowException, sqlalchemy, OS errors: all mean "can't track"
            raise _unavailable(self.uri, _describe(exc)) from exc

        if system_metrics:
            self._start_system_metrics(resumed=run_id is not None)
        self._thread = threading.Thread(target=self._background_loop, name="mlflow-flush", daemon=True)
        self._thread.start()

    # -- setup ---------------------------------------------------------------------------------

    def _start_run(self, experiment: str, db_path: Path | None, run_name: str | None,
                   run_id: str | None, tags: dict | None) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)
        if run_id is not None:
            try:
                run = self._client.get_run(run_id)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                raise ValueError(
                    f"MLflow run_id {run_id!r} does not exist in {self.shown_uri}; check the run id saved "
                    f"with the checkpoint and the tracking URI, or pass run_id=None for a new run"
                ) from exc
            if run.info.status != "RUNNING":
                self._client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            self.experiment_id = run.info.experiment_id
            if tags:
                self.set_tags(tags)
            log.info("MLflow: resumed run %s at %s", run_id, self.shown_uri)
            return

        self.experiment_id = self._get_or_create_experiment(experiment, db_path)
        str_tags = {sanitize_metric_name(k): str(v) for k, v in (tags or {}).items()}
        run = self._client.create_run(self.experiment_id, tags=str_tags, run_name=run_name)
        self.run_id = run.info.run_id
        log.info("MLflow: started run %s (%s) in experiment %r at %s",
                 self.run_id, run.info.run_name, experiment, self.shown_uri)

    def _get_or_create_experiment(self, name: str, db_path: Path | None) -> str:
        from mlflow.exceptions import MlflowException

        existing = self._client.get_experiment_by_name(name)
        if existing is not None and existing.lifecycle_stage == "deleted":
            raise ValueError(f"MLflow experiment {name!r} is deleted in {self.shown_uri}; restore it "
                             f"(`mlflow experiments restore --experiment-id {existing.experiment_id}`) "
                             f"or choose another experiment name")
        if existing is not None:
            return existing.experiment_id
        artifact_location = (db_path.parent / "mlartifacts").as_uri() if db_path else None
        try:
            return self._client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:
            # Another process may have created it between our lookup and create.
            existing = self._client.get_experiment_by_name(name)
            if existing is None:
                raise
            return existing.experiment_id

    def _start_system_metrics(self, resumed: bool) -> None:
        """Prefer MLflow's monitor (it takes an explicit run id); fall back to psutil samples."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=self._flush_every_s,
                resume_logging=resumed,
                tracking_uri=self.uri,
            )
            monitor.start()
            self._mlflow_system_monitor = monitor
        except Exception as exc:
            log.warning("MLflow system metrics monitor unavailable (%s); sampling psutil instead", exc)
            self._sample_process = True

    # -- logging API -----------------------------------------------------------------------------

    def log_params(self, params: dict) -> None:
        """Log a (nested) config as flattened params, 100 per request.

        On a resumed run MLflow refuses to change a param's value; such keys are kept as they
        were and named in a warning instead of failing the run.
        """
        if not self.enabled:
            return
        from mlflow.entities import Param

        flat = {sanitize_metric_name(k): v for k, v in flatten_params(params).items()}
        items = [Param(k, v) for k, v in flat.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            chunk = items[start:start + MAX_PARAMS_PER_BATCH]
            try:
                self._client.log_batch(self.run_id, params=chunk)
            except Exception:  # usually a resumed run with a changed value; the fallback warns
                self._log_params_keeping_existing(chunk)

    def _log_params_keeping_existing(self, chunk: list) -> None:
        try:
            existing = self._client.get_run(self.run_id).data.params
            new = [p for p in chunk if p.key not in existing]
            changed = [p.key for p in chunk if p.key in existing and existing[p.key] != p.value]
            if new:
                self._client.log_batch(self.run_id, params=new)
            if changed:
                log.warning("MLflow run %s already has different values for params %s; "
                            "MLflow params are immutable, keeping the old values", self.run_id, changed)
        except Exception as exc:
            log.warning("MLflow: could not log %d params to %s: %s", len(chunk), self.shown_uri, _describe(exc))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer ``metrics`` at ``step``; returns at once (no I/O). Names are sanitized;
        NaN/inf values are skipped with one warning per name. Values may be 0-d tensors."""
        if not self.enabled:
            return
        if self._closed:
            raise RuntimeError(f"log_metrics called after close() on MLflow run {self.run_id}")
        from mlflow.entities import Metric

        timestamp_ms = int(time.time() * 1000)
        points = []
        for name, value in metrics.items():
            value = float(value)
            key = sanitize_metric_name(name)
            if not math.isfinite(value):
                self.skipped_non_finite += 1
                if key not in self._warned_non_finite:
                    self._warned_non_finite.add(key)
                    log.warning("MLflow: skipping non-finite value %r for metric %r at step %d "
                                "(warned once per metric)", value, key, step)
                continue
            if self._logged_through is not None and int(step) <= self._held_through(key):
                self.skipped_logged += 1
                continue
            points.append(Metric(key, value, timestamp_ms, int(step)))
        self._enqueue(points, at_front=False)

    def _held_through(self, key: str) -> int:
        """The last step of ``key`` the resumed MLflow run held when this logger opened it (-1: none)."""
        if key not in self._logged_through:
            try:
                steps = [m.step for m in self._client.get_metric_history(self.run_id, key)]
            except Exception as exc:  # tracking never kills a run: log everything rather than fail
                log.warning("MLflow: could not read the history of %r (%s); logging it again", key, _describe(exc))
                steps = []
            self._logged_through[key] = max(steps, default=-1)
        return self._logged_through[key]

    def _enqueue(self, points: list, *, at_front: bool) -> None:
        with self._buffer_lock:
            if at_front:
                self._buffer.extendleft(reversed(points))
            else:
                self._buffer.extend(points)
            overflow = len(self._buffer) - self._max_buffered_points
            for _ in range(max(overflow, 0)):
                self._buffer.popleft()
            if overflow > 0:
                self.dropped_points += overflow

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or directory to the run's artifacts (warns instead of raising on I/O)."""
        if not self.enabled:
            return
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"log_artifact: {path} does not exist; write it before logging it")
        self._guarded("log artifact", lambda: (
            self._client.log_artifacts(self.run_id, str(path), artifact_path) if path.is_dir()
            else self._client.log_artifact(self.run_id, str(path), artifact_path)))

    def log_dict(self, d: dict, artifact_file: str) -> None:
        """Store ``d`` as a JSON (or ``.yaml``/``.yml``) artifact at ``artifact_file``."""
        if not self.enabled:
            return
        self._guarded("log dict", lambda: self._client.log_dict(self.run_id, _jsonable(d), artifact_file))

    def set_tags(self, tags: dict) -> None:
        if not self.enabled or not tags:
            return
        from mlflow.entities import RunTag

        run_tags = [RunTag(sanitize_metric_name(k), str(v)) for k, v in tags.items()]
        self._guarded("set tags", lambda: self._client.log_batch(self.run_id, tags=run_tags))

    def _guarded(self, what: str, action) -> None:
        """Tracking must never kill a training run: store errors after start become warnings."""
        try:
            action()
        except Exception as exc:
            log.warning("MLflow: could not %s for run %s at %s: %s", what, self.run_id, self.shown_uri,
                        _describe(exc))

    # -- flushing --------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write buffered metrics now (``log_batch``, 1000 per request). On failure keep them for
        the next flush and warn once per outage; never raises."""
        if not self.enabled:
            return
        with self._flush_lock:
            with self._buffer_lock:
                pending = list(self._buffer)
                self._buffer.clear()
                self._in_flight = len(pending)
            sent = 0
            try:
                for start in range(0, len(pending), MAX_METRICS_PER_BATCH):
                    self._client.log_batch(self.run_id, metrics=pending[start:start + MAX_METRICS_PER_BATCH])
                    sent = start + MAX_METRICS_PER_BATCH
            except Exception as exc:
                self._enqueue(pending[sent:], at_front=True)
                self._in_flight = 0
                if not self._in_outage:
                    self._in_outage = True
                    log.warning("MLflow: flushing metrics to %s failed (%s); keeping %d points in "
                                "memory and retrying every flush. Training continues.", self.shown_uri,
                                _describe(exc), len(pending) - sent)
                return
            self._in_flight = 0
            if self._in_outage:
                self._in_outage = False
                log.warning("MLflow: %s reachable again; sent %d buffered points (%d dropped while down)",
                            self.shown_uri, len(pending), self.dropped_points)

    @property
    def pending_points(self) -> int:
        """Metric points buffered or being written, i.e. not yet confirmed by the store."""
        if not self.enabled:
            return 0
        with self._buffer_lock:
            return len(self._buffer) + self._in_flight

    def _background_loop(self) -> None:
        while not self._stop.wait(self._flush_every_s):
            if self._sample_process:
                self.log_metrics(_sample_process_metrics(), step=self._system_step)
                self._system_step += 1
            self.flush()

    # -- shutdown --------------------------------------------------------------------------------

    def close(self, status: str = "FINISHED") -> None:
        """Flush, stop the background thread and mark the run ``status``
        (FINISHED, FAILED or KILLED). Idempotent."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join()
        if self._mlflow_system_monitor is not None:
            self._mlflow_system_monitor.finish()
        self.flush()
        if self.pending_points:
            log.warning("MLflow: %d metric points could not be written to %s and are lost",
                        self.pending_points, self.shown_uri)
        self._guarded("terminate run", lambda: self._client.set_terminated(self.run_id, status=status))

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("FINISHED")
        elif issubclass(exc_type, SystemExit) and exc.code in (0, None):
            self.close("KILLED")  # preempted after a checkpoint: resume=auto continues this run
        else:
            self.close("FAILED")


def _sample_process_metrics() -> dict[str, float]:
    """CPU%, resident memory and (if used) CUDA memory of this process, for the psutil fallback."""
    import psutil

    proc = psutil.Process()
    metrics = {
        "system/cpu_percent": psutil.cpu_percent(interval=None),
        "system/rss_gb": proc.memory_info().rss / 2**30,
    }
    torch = sys.modules.get("torch")  # only if training already imported it; never import it here
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        metrics["system/cuda_allocated_gb"] = torch.cuda.memory_allocated() / 2**30
        metrics["system/cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return metrics


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON so tensors / numpy scalars in ``log_dict`` payloads don't fail."""
    def default(o: Any) -> Any:
        if hasattr(o, "tolist"):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        return repr(o)

    return json.loads(json.dumps(obj, default=default))
