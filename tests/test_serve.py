"""The registered model is code, not a pickle (MLflow models-from-code), and serves as users serve
it: `mlflow models serve` on 127.0.0.1, queried over HTTP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.support import free_port, wait_for_http

pytestmark = pytest.mark.slow


def test_registered_model_is_loaded_from_code(trained_run, tmp_path) -> None:
    import mlflow
    import yaml

    mlflow.set_tracking_uri(trained_run.uri)
    mlflow.set_registry_uri(trained_run.uri)  # models:/ resolves in the registry, not ./mlflow.db
    local = Path(mlflow.artifacts.download_artifacts("models:/streamret@champion", dst_path=str(tmp_path)))
    files = {p.name for p in local.rglob("*")}
    assert "python_model.pkl" not in files and "model_code.py" in files  # nothing to unpickle
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor.get("model_code_path", "").endswith("model_code.py")


def test_mlflow_models_serve_answers_queries(trained_run) -> None:
    import mlflow

    port = free_port()
    # the scoring server is `uvicorn`, found on PATH: the environment's own bin first
    env = dict(os.environ, MLFLOW_TRACKING_URI=trained_run.uri, MLFLOW_REGISTRY_URI=trained_run.uri,
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/streamret@champion",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, 180, "mlflow models serve")
        captions = ["a small red square moves right", "a big blue circle"]
        body = json.dumps({"dataframe_split": {"columns": ["text"], "data": [[c] for c in captions]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        served = np.array(json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"])
    finally:
        server.terminate()
        server.wait(timeout=30)
    mlflow.set_tracking_uri(trained_run.uri)
    mlflow.set_registry_uri(trained_run.uri)
    local = np.array(mlflow.pyfunc.load_model("models:/streamret@champion").predict({"text": captions}))
    assert served.shape == local.shape and served.shape[0] == 2
    assert np.allclose(served, local, atol=1e-5) and np.allclose(np.linalg.norm(served, axis=1), 1, atol=1e-4)
