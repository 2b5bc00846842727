"""launcher=ray on a real local Ray cluster: `ray start --head` with token auth on 127.0.0.1,
`ray job submit` of a tiny stage-con run (2 Ray Train workers, each decoding through its Ray
Data actor pool), preempted with `ray job stop`, resubmitted with run.resume=auto: the second job
SUCCEEDED, the two jobs together trained each step once on the local rule's samples, and one MLflow
run in the sqlite store holds it all. The cluster is this test's own (own ports, own temp dir) and
is stopped by terminating its `ray start --block` process."""
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
from trainer.launchers.ray import ARMED

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY_RUN = [
    "data.max_frames=4", "data.max_words=16", "data.batch_size=4", "data.eval_batch_size=8", "data.num_workers=0",
    "data.shuffle_buffer=8", "stage.con.max_steps=12", "stage.con.log_every=1", "run.progress=false",
    "tracking.flush_every_s=0.5", "run.sample_log=true", "tracking.register=false", NO_VAL,
]

# The preemption test's run: 3 epochs of 6 steps per rank (24 train videos, 2 ranks, batch 2); the
# resubmitted job streams the rest of them through one decode pipeline per rank.
STOP_TEST_BATCH, STOP_TEST_STEPS = 2, 18
STOP_TEST_EPOCHS = STOP_TEST_STEPS // (24 // 2 // STOP_TEST_BATCH)


def ray_cli(*args: str, env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A head node on 127.0.0.1 with the job server; yields (dashboard address, env for the CLI).

    Ray >= 2.59 enables token auth for new clusters: the head and every client (`ray job ...`)
    need RAY_AUTH_MODE=token and the same token (RAY_AUTH_TOKEN), or the client is refused."""
    temp_dir = Path(f"/tmp/ray_lx_{os.getpid()}")  # short: Ray's unix socket paths must fit 107 bytes
    # RAY_JOB_STOP_WAIT_TIME_S: how long `ray job stop` lets the driver end before SIGKILL (3 s by
    # default); it is read by the head's job supervisor, so a cluster sets it when it starts. The test
    # stops a job whose workers are still starting: it ended 92 s after the request on 2 cores.
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), DS_ACCELERATOR="cpu",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               RAY_JOB_STOP_WAIT_TIME_S="400")
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
        # SIGTERM to `ray start --block` makes it stop the processes of this head node only. Its
        # graceful stop took 29 s on 2 cores (the dashboard's agents); nothing is kept, so 5 s, then kill.
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
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


def _submit(address: str, env: dict, overrides: list[str], *, wait: bool) -> tuple[str, subprocess.CompletedProcess]:
    job_id = f"streamret-test-{secrets.token_hex(4)}"
    runtime_env = {"env_vars": {"PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}}
    submit = ray_cli("job", "submit", "--address", address, "--submission-id", job_id,
                     "--runtime-env-json", json.dumps(runtime_env), *([] if wait else ["--no-wait"]), "--",
                     sys.executable, str(REPO / "launch" / "train.py"), *overrides, env=env, timeout=900)
    return job_id, submit


@pytest.mark.slow
def test_ray_job_stop_preempts_and_a_resubmitted_job_finishes_the_run(ray_cluster, synthetic_corpus, synthetic_shards,
                                                                     tmp_path):
    from mlflow.tracking import MlflowClient

    from tests.test_ray_fault import _plan
    from trainer.components.sample_log import read_sample_log

    address, env = ray_cluster
    run_dir = tmp_path / "run"
    overrides = ["launcher=ray", "launcher.num_workers=2", "--stage", "con", f"data.root={synthetic_corpus}",
                 f"data.shards={synthetic_shards}", f"run.dir={run_dir}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                 *[o for o in TINY_RUN if not o.startswith("data.batch_size=")], f"data.batch_size={STOP_TEST_BATCH}",
                 f"stage.con.max_steps={STOP_TEST_STEPS}"]
    first, submit = _submit(address, env, overrides, wait=False)
    assert submit.returncode == 0, submit.stderr[-3000:]
    deadline = time.time() + 300
    # Stop as soon as the driver handles SIGTERM: the request (CLI -> job supervisor -> SIGTERM ->
    # PREEMPT file) took 5.6-12 s to land, while the worker group starts (tens of seconds on 2 cores),
    # so the workers see it at their first step checks. Waiting for a step instead raced the job:
    # with one decode pipeline for all epochs, 36 steps ran in seconds (stopped at step 21 once).
    while ARMED not in (logs := ray_cli("job", "logs", "--address", address, first, env=env).stdout):
        status = ray_cli("job", "status", "--address", address, first, env=env).stdout
        assert "RUNNING" in status or "PENDING" in status, status + logs[-5000:]
        assert time.time() < deadline, "the first job's driver did not start in 300 s"
        time.sleep(0.5)
    asked_at = time.time()
    stopped = ray_cli("job", "stop", "--address", address, first, env=env, timeout=450)
    written = (run_dir / "PREEMPT").stat().st_mtime - asked_at
    print(f"ray job stop once the driver was armed: PREEMPT written after {written:.1f} s, the job stopped after "
          f"{time.time() - asked_at:.1f} s")
    logs = ray_cli("job", "logs", "--address", address, first, env=env).stdout
    assert stopped.returncode == 0 and "preempted: the workers checkpointed" in logs, stopped.stdout + logs[-5000:]
    tags = sorted(p for p in (run_dir / "checkpoints" / "con").glob("step*") if (p / "COMPLETE").is_file())
    marker = json.loads((tags[-1] / "COMPLETE").read_text())
    assert 1 <= marker["step"] < STOP_TEST_STEPS and not marker["finished"]  # a mid-stage checkpoint, taken on the SIGTERM
    print(f"checkpointed at step {marker['step']} of {STOP_TEST_STEPS}")

    second, submit = _submit(address, env, [*overrides, "run.resume=auto"], wait=True)
    status = ray_cli("job", "status", "--address", address, second, env=env)
    # The CLI reports the terminal state as "Job '<id>' succeeded" (JobStatus.SUCCEEDED).
    assert submit.returncode == 0 and f"Job '{second}' succeeded" in status.stdout, (
        status.stdout[-1000:] + submit.stdout[-6000:] + submit.stderr[-3000:])

    # the two jobs trained every step once, on each rank's local-rule samples (6 steps per epoch and rank)
    for rank in (0, 1):
        lines = read_sample_log(run_dir / "samples" / f"con.rank{rank}.jsonl")
        assert [line["step"] for line in lines] == list(range(1, STOP_TEST_STEPS + 1))
        assert [line["keys"] for line in lines] == _plan(synthetic_shards, rank, 2, STOP_TEST_EPOCHS, STOP_TEST_BATCH)
    payload = json.loads((run_dir / "metrics.json").read_text())
    assert payload["stages"] == ["con"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.run_id == payload["mlflow_run_id"]  # rank 0 alone logs; one run
    metrics = runs[0].data.metrics
    assert "con/loss" in metrics and "eval/con/t2v_R1" in metrics and "con/data_decode_error" in metrics
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "con/loss")]
    assert steps == sorted(set(steps)) and set(steps) == set(range(1, STOP_TEST_STEPS + 1))
    # 2 workers x the batch per worker x every step: both Ray Train ranks stepped on their own split.
    assert metrics["con/samples_seen"] == STOP_TEST_STEPS * 2 * STOP_TEST_BATCH
    assert runs[0].data.params["launcher.name"] == "ray"
    # each complete checkpoint was reported to Ray Train, which persisted it in its storage path
    reported = [p for p in (run_dir / "ray").rglob("checkpoint_*") if (p / "COMPLETE").is_file()]
    assert reported, sorted(str(p) for p in (run_dir / "ray").rglob("*"))[:20]


@pytest.mark.slow
def test_the_default_ray_launcher_runs_on_the_machine_it_starts_ray_on(synthetic_corpus, synthetic_shards, tmp_path):
    """`launcher=ray` with its defaults and no cluster: the launcher starts Ray on this machine
    (2 CPUs in CI) and the job fits: 1 worker + 1 decode actor, the read task at 0 CPUs. (It once
    sat at 0 rows for 10 minutes: worker and actor held both CPUs, the read task waited for one.)"""
    env = dict(os.environ, DS_ACCELERATOR="cpu", RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR="/tmp")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "launcher=ray", "--stage", "con",
                           f"data.root={synthetic_corpus}", f"data.shards={synthetic_shards}", f"run.dir={tmp_path / 'run'}",
                           f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *TINY_RUN, "stage.con.max_steps=3",
                           "launcher.stall_timeout_s=240"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "launcher=ray: 1 workers x 1 CPU (PACK), decode actors 1.." in proc.stdout
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["stages"] == ["con"]


def test_the_fit_check_names_the_numbers_and_caps_the_pools():
    from trainer.config import LauncherConfig
    from trainer.launchers.errors import ClusterTooSmall
    from trainer.launchers.ray import decode_range

    # the defaults on a 2-CPU machine: 1 worker + 1 decode actor; no CPU left to grow the pool into
    assert decode_range(LauncherConfig(name="ray"), {"CPU": 2.0}) == (1, 1)
    # 2 workers on 16 CPUs: 7 left per worker, the pool may grow to its max of 4
    assert decode_range(LauncherConfig(name="ray", num_workers=2), {"CPU": 16.0}) == (1, 4)
    assert decode_range(LauncherConfig(name="ray", num_workers=2), {"CPU": 7.0}) == (1, 2)
    with pytest.raises(ClusterTooSmall, match=r"needs 6 CPUs and 6 GPUs .* cluster has 8 CPUs and 4 GPUs"):
        decode_range(LauncherConfig(name="ray", num_workers=3, use_gpu=True), {"CPU": 8.0, "GPU": 4.0})
    # an autoscaling cluster: taken as configured
    assert decode_range(LauncherConfig(name="ray", num_workers=8, check_fit=False), {"CPU": 2.0}) == (1, 4)
