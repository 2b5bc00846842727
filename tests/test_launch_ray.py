"""launcher=ray on a real local Ray cluster: `ray start --head` with token auth on 127.0.0.1,
`ray job submit` of a tiny stage-con run (2 Ray Train workers reading the Ray Data train split),
job SUCCEEDED and its metrics in the MLflow sqlite store. The cluster is this test's own (own
ports, own temp dir) and is stopped by terminating its `ray start --block` process."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.support import NO_VAL, free_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY_RUN = [
    "data.max_frames=4", "data.max_words=16", "data.batch_size=4", "data.eval_batch_size=8", "data.num_workers=0",
    "data.shuffle_buffer=0", "stage.con.max_steps=3", "run.progress=false", "tracking.flush_every_s=0.5", NO_VAL,
]


def ray_cli(*args: str, env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A head node on 127.0.0.1 with the job server; yields (dashboard address, env for the CLI).

    Ray >= 2.59 enables token auth for new clusters: the head and every client (`ray job ...`)
    need RAY_AUTH_MODE=token and the same token (RAY_AUTH_TOKEN), or the client is refused."""
    temp_dir = Path(f"/tmp/ray_lx_{os.getpid()}")  # short: Ray's unix socket paths must fit 107 bytes
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), DS_ACCELERATOR="cpu",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    dash = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dash, "--node-manager-port": free_port(),
             "--object-manager-port": free_port(), "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port()}
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "6", "--node-ip-address", "127.0.0.1",
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--temp-dir", str(temp_dir),
           "--disable-usage-stats", *[f"{k}={v}" for k, v in ports.items()]]
    log = open(tmp_path_factory.mktemp("ray") / "head.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 240
        while True:  # the job server answers once the dashboard is up
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited {head.returncode}; see {log.name}")
            if ray_cli("job", "list", "--address", address, env=env, timeout=60).returncode == 0:
                break
            if time.time() > deadline:
                raise RuntimeError(f"Ray job server at {address} did not come up in 240 s; see {log.name}")
            time.sleep(3)
        yield address, env
    finally:
        # SIGTERM to `ray start --block` makes it stop the processes of this head node only.
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        log.close()
        _kill_leftovers(str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_leftovers(marker: str) -> None:
    """Processes of this cluster that left the head's process group (their command line names its
    temp dir): killed by pid, so other Ray clusters on the machine are untouched."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_ray_job_submit_trains_with_ray_train_and_logs_to_mlflow(ray_cluster, synthetic_corpus, synthetic_shards,
                                                                 tmp_path):
    from mlflow.tracking import MlflowClient

    address, env = ray_cluster
    job_id = f"streamret-test-{secrets.token_hex(4)}"
    runtime_env = {"env_vars": {"PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}}
    overrides = ["launcher=ray", "launcher.num_workers=2", "launcher.decode_actors=1", "--stage", "con",
                 f"data.root={synthetic_corpus}", f"data.shards={synthetic_shards}", f"run.dir={tmp_path / 'run'}",
                 f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *TINY_RUN]
    submit = ray_cli("job", "submit", "--address", address, "--submission-id", job_id,
                     "--runtime-env-json", json.dumps(runtime_env), "--",
                     sys.executable, str(REPO / "launch" / "train.py"), *overrides, env=env, timeout=900)
    status = ray_cli("job", "status", "--address", address, job_id, env=env)
    # The CLI reports the terminal state as "Job '<id>' succeeded" (JobStatus.SUCCEEDED).
    assert submit.returncode == 0 and f"Job '{job_id}' succeeded" in status.stdout, (
        status.stdout[-1000:] + submit.stdout[-6000:] + submit.stderr[-3000:])

    payload = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert payload["stages"] == ["con"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.run_id == payload["mlflow_run_id"]  # rank 0 alone logs
    metrics = runs[0].data.metrics
    assert "con/loss" in metrics and "eval/con/t2v_R1" in metrics
    # 2 workers x 4 per worker x 3 steps: both Ray Train ranks stepped on their own split.
    assert metrics["con/samples_seen"] == 3 * 2 * 4
    assert runs[0].data.params["launcher.name"] == "ray"
    # each complete checkpoint was reported to Ray Train, which persisted it in its storage path
    reported = [p for p in (tmp_path / "run" / "ray").rglob("checkpoint_*") if (p / "COMPLETE").is_file()]
    assert reported, sorted(str(p) for p in (tmp_path / "run" / "ray").rglob("*"))[:20]
