"""No secret reaches MLflow, a log line or an artifact: a tracking URI with credentials, a storage
URL with a signed query, a config value under a secret-bearing name."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import TINY_RUN, free_port, launch_train, wait_for_http
from trainer.components.mlflow_store import flatten_params
from trainer.components.secrets import redact, redact_tree


def test_credentials_and_secret_values_are_masked() -> None:
    assert redact("http://user:tok3n@host:5000/x") == "http://***@host:5000/x"
    assert redact("https://b.s3.amazonaws.com/k?X-Amz-Signature=abc123&x=1") == \
        "https://b.s3.amazonaws.com/k?X-Amz-Signature=***&x=1"
    tree = {"tracking": {"uri": "http://u:pw@h"}, "aws_secret_access_key": "AKIA", "data": {"caption_keys": ["c"]}}
    assert redact_tree(tree) == {"tracking": {"uri": "http://***@h"}, "aws_secret_access_key": "***",
                                 "data": {"caption_keys": ["c"]}}
    assert flatten_params(tree)["tracking.uri"] == "http://***@h"


@pytest.fixture
def tracking_server(tmp_path):
    """`mlflow server` on 127.0.0.1 with its own sqlite store and artifact root; stopped after."""
    port = free_port()
    store, artifacts = tmp_path / "server.db", tmp_path / "server-artifacts"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}",
                               "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_http(f"http://127.0.0.1:{port}/health", server, 120, "mlflow server")
    yield port, store, artifacts
    server.terminate()
    server.wait(timeout=30)


@pytest.mark.slow
def test_a_run_against_a_tracking_server_stores_no_secret(tracking_server, s3_shards, trained_run, tmp_path) -> None:
    """One tiny run, two claims (a run costs half a minute here): trained from s3:// shards it gives
    the local-disk run's figures, and logged to a real tracking server with credentials in its URI
    it leaves the credentials nowhere."""
    import json

    port, store, artifacts = tracking_server
    run_dir = tmp_path / "run"
    # A token no schema holds (MLflow's own sqlite schema has a "secrets" table, so the word itself is in any store)
    secret = "s3cr3t-9f2b7d"
    proc = launch_train(f"data.shards={s3_shards}", f"run.dir={run_dir}", "stage=con",
                        f"tracking.uri=http://user:{secret}@127.0.0.1:{port}", *TINY_RUN, "tracking.promote_at_chance=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "registered streamret" in proc.stdout  # params, metrics, artifacts and a model all went to the server
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    for variant in ("con", "con_dual_softmax"):  # same seed, byte-identical shards: the local run's figures
        for direction in ("t2v", "v2t"):
            assert metrics[variant][direction] == pytest.approx(trained_run.metrics[variant][direction])
    assert secret not in proc.stdout + proc.stderr and "http://***@127.0.0.1" in proc.stdout
    assert secret.encode() not in store.read_bytes()
    written = [p for p in [*artifacts.rglob("*"), *run_dir.rglob("*")] if p.is_file()]
    assert any(p.name == "config.yaml" for p in written) and any(p.name == "MLmodel" for p in written)
    leaks = [p for p in written if secret.encode() in p.read_bytes()]
    assert not leaks
