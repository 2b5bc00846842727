"""MetricsLogger against a real MLflow sqlite store (no mocks).

Creating a fresh MLflow sqlite DB runs its schema migrations (~7 s on this machine), so one
migrated DB is made per test session and each test copies it into its own tmp_path.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import pytest

from trainer.components.mlflow_store import TrackingUnavailable, flatten_params, sanitize_metric_name
from trainer.components.tracking import MetricsLogger

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()  # creates + migrates the schema
    return db


@pytest.fixture
def store(tmp_path, migrated_db) -> tuple[str, Path]:
    """(sqlite URI, db path) of a private copy of the migrated DB."""
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    db = store_dir / "mlflow.db"
    shutil.copy(migrated_db, db)
    return f"sqlite:///{db}", db


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_sanitize_metric_name():
    assert sanitize_metric_name("t2v_R@1") == "t2v_R_at_1"
    assert sanitize_metric_name("eval/gen_rerank/v2t_R@10") == "eval/gen_rerank/v2t_R_at_10"
    assert sanitize_metric_name("loss (x%)") == "loss _x__"
    # MLflow rejects names that normalise to another path
    assert sanitize_metric_name("/a//b/./c/") == "a/b/c"
    assert sanitize_metric_name("é") == "_"
    assert len(sanitize_metric_name("x" * 400)) == 250


def test_flatten_params():
    flat = flatten_params({"data": {"batch_size": 32, "aug": {"crop": True}}, "lr": 1e-4,
                           "empty": {}, "long": "y" * 7000, "frames": [12, 64]})
    assert flat == {"data.batch_size": "32", "data.aug.crop": "True", "lr": "0.0001",
                    "empty": "{}", "long": "y" * 6000, "frames": "[12, 64]"}


def test_session_params_metrics_artifacts_finished(store, tmp_path):
    uri, db = store
    params = {"model": {f"p{i:03d}": i for i in range(150)}, "data": {"batch_size": 32}}
    artifact = tmp_path / "notes.txt"
    artifact.write_text("hello")
    with MetricsLogger(uri, "exp", run_name="tiny", flush_every_s=60.0, tags={"stage": "con"}) as logger:
        run_id = logger.run_id
        logger.log_params(params)
        for step in range(5):
            logger.log_metrics({"con/loss": 1.0 / (step + 1), "eval/con/t2v_R@1": 10.0 * step}, step=step)
        assert logger.pending_points == 10  # buffered, nothing written yet (flush_every_s=60)
        logger.flush()
        assert logger.pending_points == 0
        logger.log_metrics({"gen/loss": 0.5}, step=7)  # written by close()
        logger.log_artifact(artifact, artifact_path="notes")
        logger.log_dict({"t2v": {"R1": 12.5}}, "eval/metrics.json")
        logger.set_tags({"stage": "gen"})

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "tiny"
    assert run.data.tags["stage"] == "gen"
    assert len(run.data.params) == 151
    assert run.data.params["model.p149"] == "149"
    assert run.data.params["data.batch_size"] == "32"
    assert _history(client, run_id, "con/loss") == [(s, 1.0 / (s + 1)) for s in range(5)]
    assert _history(client, run_id, "eval/con/t2v_R_at_1") == [(s, 10.0 * s) for s in range(5)]
    assert _history(client, run_id, "gen/loss") == [(7, 0.5)]
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/notes.txt"]
    assert [a.path for a in client.list_artifacts(run_id, "eval")] == ["eval/metrics.json"]
    # artifacts of a sqlite store live beside the DB
    artifact_root = db.parent / "mlartifacts"
    assert (artifact_root / run_id / "artifacts" / "notes" / "notes.txt").read_text() == "hello"
    assert json.loads((artifact_root / run_id / "artifacts" / "eval" / "metrics.json").read_text()) \
        == {"t2v": {"R1": 12.5}}


def test_background_thread_flushes_without_explicit_flush(store):
    uri, _ = store
    logger = MetricsLogger(uri, "exp", flush_every_s=0.1)
    logger.log_metrics({"con/loss": 2.0}, step=1)
    deadline = time.monotonic() + 5.0
    while logger.pending_points and time.monotonic() < deadline:
        time.sleep(0.05)
    client = MlflowClient(tracking_uri=uri)
    assert _history(client, logger.run_id, "con/loss") == [(1, 2.0)]  # before close()
    logger.close()


def test_non_finite_skipped_with_one_warning(store, caplog):
    uri, _ = store
    with caplog.at_level(logging.WARNING, logger="trainer.components.tracking"):
        with MetricsLogger(uri, "exp", flush_every_s=60.0) as logger:
            for step in range(3):
                logger.log_metrics({"con/loss": math.nan, "con/lr": 1e-4, "x": math.inf}, step=step)
            run_id = logger.run_id
            assert logger.skipped_non_finite == 6
    non_finite_warnings = [r for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(non_finite_warnings) == 2  # once per metric name, not once per step
    client = MlflowClient(tracking_uri=uri)
    assert client.get_metric_history(run_id, "con/loss") == []
    assert len(client.get_metric_history(run_id, "con/lr")) == 3


def test_resume_same_run(store):
    uri, _ = store
    with MetricsLogger(uri, "exp", flush_every_s=60.0) as first:
        run_id = first.run_id
        first.log_params({"lr": 1e-4})
        first.log_metrics({"con/loss": 3.0}, step=0)
    with MetricsLogger(uri, "exp", run_id=run_id, flush_every_s=60.0) as resumed:
        assert resumed.run_id == run_id
        assert MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "RUNNING"
        resumed.log_params({"lr": 1e-4, "resumed_from_step": 1})  # same value again is fine
        resumed.log_params({"lr": 5e-5})  # changed value: kept old, warned, no exception
        resumed.log_metrics({"con/loss": 2.0}, step=1)
    client = MlflowClient(tracking_uri=uri)
    assert len(client.search_runs([client.get_experiment_by_name("exp").experiment_id])) == 1
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.0001", "resumed_from_step": "1"}
    assert _history(client, run_id, "con/loss") == [(0, 3.0), (1, 2.0)]


def test_a_resumed_run_does_not_log_a_step_twice(store):
    """The interrupted process logged steps 1..5 but checkpointed at 3: the resumed one redoes 4
    and 5 and logs them again; MLflow keeps one point per step (the first), new steps go through."""
    uri, _ = store
    with MetricsLogger(uri, "exp", flush_every_s=60.0) as first:
        run_id = first.run_id
        for step in range(1, 6):
            first.log_metrics({"con/loss": float(step)}, step=step)
    with MetricsLogger(uri, "exp", run_id=run_id, flush_every_s=60.0) as resumed:
        for step in range(4, 8):
            resumed.log_metrics({"con/loss": float(step), "con/lr": 0.1}, step=step)
        resumed.log_metrics({"con/loss": 99.0}, step=7)  # this process's own points are not filtered
        assert resumed.skipped_logged == 2
    client = MlflowClient(tracking_uri=uri)
    assert [s for s, _ in _history(client, run_id, "con/loss")] == [1, 2, 3, 4, 5, 6, 7, 7]
    assert _history(client, run_id, "con/lr") == [(4, 0.1), (5, 0.1), (6, 0.1), (7, 0.1)]


def test_resume_unknown_run_id_is_a_clear_error(store):
    uri, _ = store
    with pytest.raises(ValueError, match="does not exist"):
        MetricsLogger(uri, "exp", run_id="0" * 32)


def test_exception_marks_run_failed(store):
    uri, _ = store
    with pytest.raises(RuntimeError, match="boom"):
        with MetricsLogger(uri, "exp", flush_every_s=60.0) as logger:
            run_id = logger.run_id
            logger.log_metrics({"con/loss": 1.0}, step=0)
            raise RuntimeError("boom")
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).info.status == "FAILED"
    assert _history(client, run_id, "con/loss") == [(0, 1.0)]  # buffered points still written


def test_nonzero_rank_logs_nothing(store, tmp_path):
    uri, _ = store
    artifact = tmp_path / "a.txt"
    artifact.write_text("x")
    with MetricsLogger(uri, "rank1-exp", rank=1) as logger:
        assert logger.run_id is None
        logger.log_params({"a": 1})
        logger.log_metrics({"con/loss": 1.0}, step=0)
        logger.log_artifact(artifact)
        logger.log_dict({"a": 1}, "a.json")
        logger.set_tags({"a": "b"})
        logger.flush()
    client = MlflowClient(tracking_uri=uri)
    assert client.get_experiment_by_name("rank1-exp") is None
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_unreachable_server_raises_fast():
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=r"127\.0\.0\.1:9") as info:
        MetricsLogger("http://127.0.0.1:9", "exp")
    assert time.monotonic() - start < 5.0
    assert "mlflow server" in str(info.value)  # the message says how to fix it


def test_unopenable_local_store_raises_tracking_unavailable(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    uri = f"sqlite:///{not_a_dir}/mlflow.db"
    with pytest.raises(TrackingUnavailable) as info:
        MetricsLogger(uri, "exp")
    assert uri in str(info.value)


def test_relative_sqlite_uri_is_pinned_to_start_directory(tmp_path, migrated_db, monkeypatch):
    # chdir (a Python builtin, not a tracked library) to exercise the relative-URI path
    workdir = tmp_path / "work"
    workdir.mkdir()
    shutil.copy(migrated_db, workdir / "mlflow.db")
    monkeypatch.chdir(workdir)
    logger = MetricsLogger("sqlite:///mlflow.db", "exp", flush_every_s=60.0)
    monkeypatch.chdir(tmp_path)  # a later chdir (e.g. Hydra) must not move the store
    logger.log_metrics({"con/loss": 1.0}, step=0)
    logger.close()
    assert logger.uri == f"sqlite:///{(workdir / 'mlflow.db').as_posix()}"
    client = MlflowClient(tracking_uri=logger.uri)
    assert _history(client, logger.run_id, "con/loss") == [(0, 1.0)]
    assert client.get_experiment_by_name("exp").artifact_location == (workdir / "mlartifacts").as_uri()
    assert not (tmp_path / "mlflow.db").exists()


def test_mid_run_outage_warns_keeps_buffer_and_recovers(store, caplog):
    """Outage = the store's directory is renamed away (root ignores read-only permissions, so
    chmod would not fail writes); sqlite then cannot open its journal and every write fails.
    Renaming it back is the server coming back."""
    uri, db = store
    store_dir = db.parent
    away = store_dir.with_name("store_away")
    logger = MetricsLogger(uri, "exp", flush_every_s=60.0)
    logger.log_metrics({"con/loss": 1.0}, step=0)
    logger.flush()

    os.rename(store_dir, away)
    try:
        with caplog.at_level(logging.WARNING, logger="trainer.components.tracking"):
            for step in range(1, 4):  # training keeps stepping and flushing through the outage
                logger.log_metrics({"con/loss": 1.0 / (step + 1)}, step=step)
                logger.flush()
        outage_warnings = [r for r in caplog.records
                           if r.name == "trainer.components.tracking" and "failed" in r.getMessage()]
        assert len(outage_warnings) == 1  # once per outage, not once per flush
        assert uri in outage_warnings[0].getMessage()
        assert logger.pending_points == 3
    finally:
        os.rename(away, store_dir)

    logger.log_metrics({"con/loss": 0.1}, step=4)
    logger.close()
    client = MlflowClient(tracking_uri=uri)
    assert _history(client, logger.run_id, "con/loss") == [
        (0, 1.0), (1, 0.5), (2, 1.0 / 3), (3, 0.25), (4, 0.1)]
    assert client.get_run(logger.run_id).info.status == "FINISHED"


def test_buffer_is_bounded_and_counts_drops(store):
    uri, _ = store
    logger = MetricsLogger(uri, "exp", flush_every_s=60.0, max_buffered_points=2500)
    for step in range(2505):
        logger.log_metrics({"con/loss": float(step)}, step=step)
    assert logger.pending_points == 2500
    assert logger.dropped_points == 5
    logger.flush()  # 3 log_batch requests (MLflow takes at most 1000 metrics per request)
    history = MlflowClient(tracking_uri=uri).get_metric_history(logger.run_id, "con/loss")
    assert sorted(m.step for m in history) == list(range(5, 2505))  # the oldest were dropped
    logger.close()


def test_system_metrics_logged(store):
    uri, _ = store
    # MLflow's monitor publishes after its first full sampling interval; leave it a few
    with MetricsLogger(uri, "exp", flush_every_s=0.2, system_metrics=True) as logger:
        time.sleep(1.5)
        run_id = logger.run_id
    keys = MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics
    assert any(k.startswith("system/") for k in keys), keys


def test_process_metrics_fallback_sample():
    from trainer.components.tracking import _sample_process_metrics

    sample = _sample_process_metrics()
    assert 0.0 <= sample["system/cpu_percent"]
    assert 0.001 < sample["system/rss_gb"] < 1024
