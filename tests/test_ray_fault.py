"""launcher=ray on a real multi-node Ray cluster on this host (``ray.cluster_utils.Cluster``, the
way Ray tests multi-node itself): a head with no CPUs and two 2-CPU nodes, a driver started as
users start it (``python launch/train.py launcher=ray launcher.address=...``).

- one job, two failures: its Ray Train worker killed with SIGKILL, then the node holding it lost
  with the run dir's checkpoints (a replacement node joins); shards and Ray Train's checkpoints on
  S3 (moto's server). The group restarts from the newest checkpoint, then adopts the one Ray Train
  kept in ``launcher.storage_path``; the job ends with every step, the same samples in the same
  steps and bit-equal losses and test metrics as an uninterrupted local run, in one MLflow run
  that logs no step twice (two ranks resuming: ``test_ray_launch``'s preempted job);
- a job the cluster cannot hold is refused in one line, before anything is written.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from shards.stream import ShardStream  # noqa: E402
from tests.support import NO_VAL  # noqa: E402
from trainer.components.sample_log import read_sample_log  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
BATCH = 4
RUN = ["--stage", "con", "data.max_frames=4", "data.max_words=16", f"data.batch_size={BATCH}",
       "data.eval_batch_size=8", "data.num_workers=0", "data.shuffle_buffer=8", "run.progress=false",
       "tracking.flush_every_s=0.2", "run.sample_log=true", "deepspeed.precision=fp32", "stage.con.log_every=1",
       "run.checkpoint_every=3", "tracking.register=false", NO_VAL]
NODE_CPUS = 2


@pytest.fixture(scope="module")
def cluster(s3):
    """Head (the GCS, no CPUs: nothing is scheduled there) + two worker nodes of 2 CPUs. Node death
    is noticed within ~10 s (health checks every 1 s), not Ray's default 15 s; a 2 s window declared
    the head itself dead while the rest of the suite ran beside it on 2 cores. The nodes start
    after the S3 server (``s3``), so their processes reach it as every node of a cloud cluster
    reaches its bucket."""
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="rayf", dir="/tmp")  # Ray's unix sockets need a short path
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "temp_dir": temp_dir, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 10,
                           "health_check_initial_delay_ms": 0}})
    for _ in range(2):
        c.add_node(num_cpus=NODE_CPUS)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)  # this process watches the cluster's actor table
    yield c
    ray.shutdown()
    c.shutdown()


def _driver(cluster, run_dir: Path, shards: Path, corpus: Path, db: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "launcher=ray", f"launcher.address={cluster.address}",
           f"data.root={corpus}", f"data.shards={shards}", f"run.dir={run_dir}", f"tracking.uri=sqlite:///{db}",
           *RUN, *extra]
    log = open(run_dir.parent / f"{run_dir.name}.driver.log", "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=run_dir.parent)


def _wait_for(what: str, check, proc: subprocess.Popen, timeout: float = 480):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = check()
        if got:
            return got
        if proc.poll() is not None:
            raise AssertionError(f"the driver exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _finished(proc: subprocess.Popen, run_dir: Path, timeout: float = 400) -> str:
    proc.wait(timeout=timeout)
    log = (run_dir.parent / f"{run_dir.name}.driver.log").read_text()
    assert proc.returncode == 0, log[-6000:]
    return log


def _logged_steps(run_dir: Path, db: Path, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]  # restarts continued the one MLflow run
    assert runs[0].info.run_id == json.loads((run_dir / "metrics.json").read_text())["mlflow_run_id"]
    return sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, key))


def _resumed(run_dir: Path, old_pid: int):
    """True once a new worker group wrote ``workers.json`` and resumed: restored its checkpoint and
    rewrote the sample log (truncated to that checkpoint: a new file)."""
    path = run_dir / "samples" / "con.rank0.jsonl"
    old_inode = path.stat().st_ino

    def check() -> bool:
        try:
            workers = json.loads((run_dir / "ray" / "workers.json").read_text())
            return workers["0"]["pid"] != old_pid and path.stat().st_ino != old_inode
        except (OSError, ValueError, KeyError):  # caught mid-write
            return False

    return check


def _checkpointed(run_dir: Path, step: int):
    return lambda: (run_dir / "checkpoints" / "con" / f"step{step:08d}" / "COMPLETE").is_file()


def _plan(shards: Path, rank: int, world: int, epochs: int, batch: int = BATCH) -> list[list[str]]:
    """The batches of keys the local rule gives rank ``rank`` for ``epochs`` epochs (tar reads, no decode)."""
    stream = ShardStream(shards, "train", max_frames=4, image_size=32, training=True, seed=0, shuffle_buffer=8,
                         rank=rank, world_size=world)
    batches = []
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        keys = [raw["__key__"] for raw in stream.raw_samples(0, 1, 0, stream.samples_per_rank)]
        batches += [keys[i:i + batch] for i in range(0, len(keys), batch)]
    return batches


def test_a_killed_worker_and_a_lost_node_come_back_and_the_run_is_the_uninterrupted_one(
        cluster, s3, s3_shards, synthetic_corpus, tmp_path):
    """One job, both failures: the worker process SIGKILLed after step 3's checkpoint (the group
    restarts from the run dir's checkpoint), then its whole node lost with the run dir's checkpoints
    (the group adopts the one Ray Train persisted in ``launcher.storage_path`` on S3; a replacement
    node joins). Shards on S3, as every node of a cloud cluster reaches them. The run is then the
    uninterrupted local one: the same samples in the same steps, bit-equal losses and test metrics."""
    import s3fs

    steps = 18  # three epochs of 6 batches: steps after the node loss keep the job running meanwhile
    db = tmp_path / "mlflow.db"
    run_dir = tmp_path / "ray_run"
    run_dir.mkdir()
    storage = f"{s3}/ray-{tmp_path.name}"
    driver = _driver(cluster, run_dir, s3_shards, synthetic_corpus, db, f"stage.con.max_steps={steps}",
                     "launcher.max_failures=2", f"launcher.storage_path={storage}")
    bucket = s3fs.S3FileSystem()

    def reported() -> int:
        bucket.invalidate_cache()
        return len(bucket.glob(f"{storage}/*/checkpoint_*/COMPLETE"))

    _wait_for("the first checkpoint", _checkpointed(run_dir, 3), driver)
    worker = json.loads((run_dir / "ray" / "workers.json").read_text())["0"]
    resumed = _resumed(run_dir, worker["pid"])
    os.kill(worker["pid"], signal.SIGKILL)
    killed = time.time()
    _wait_for("the restarted worker's resume", resumed, driver)
    kill_s = time.time() - killed

    # three checkpoints persisted (step 3's may not be, the worker dies right after writing it):
    # at least one after the restart is registered with Ray Train
    _wait_for("three checkpoints reported to Ray Train", lambda: reported() >= 3, driver)
    worker = json.loads((run_dir / "ray" / "workers.json").read_text())["0"]
    nodes = {n.node_id: n for n in cluster.worker_nodes}
    resumed = _resumed(run_dir, worker["pid"])
    cluster.remove_node(nodes[worker["node_id"]], allow_graceful=False)
    lost_at = time.time()
    for tag in (run_dir / "checkpoints" / "con").glob("step*"):  # as a node-local run dir would lose them
        shutil.rmtree(tag)
    cluster.add_node(num_cpus=NODE_CPUS)  # the replacement a cloud autoscaler would bring
    _wait_for("the restarted group's resume", resumed, driver)
    lost_s = time.time() - lost_at
    log = _finished(driver, run_dir)
    assert log.count("worker group restarted") >= 2 and "adopted the checkpoint reported to Ray Train" in log
    adopted = next(line[line.index("adopted"):line.index(" into")] for line in log.splitlines() if "adopted the" in line)
    print(f"killed worker: {kill_s:.1f} s from SIGKILL to the restarted worker resuming; node lost: {lost_s:.1f} s "
          f"to the restarted group resuming ({adopted})")

    # the uninterrupted reference: the same run on the local launcher, one thread as a Ray worker has
    local_dir = tmp_path / "local_run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    local = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), f"data.root={synthetic_corpus}",
                            f"data.shards={s3_shards}", f"run.dir={local_dir}",
                            f"tracking.uri=sqlite:///{tmp_path / 'local.db'}", *RUN, f"stage.con.max_steps={steps}"],
                           env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]

    ray_log = read_sample_log(run_dir / "samples" / "con.rank0.jsonl")
    local_log = read_sample_log(local_dir / "samples" / "con.rank0.jsonl")
    assert [line["step"] for line in ray_log] == list(range(1, steps + 1))  # no step twice, none missing
    assert ray_log == local_log  # the same samples in the same steps: none replayed, none skipped
    assert [line["keys"] for line in ray_log] == _plan(s3_shards, 0, 1, 3)
    for epoch in (0, 1, 2):  # each sample once per epoch
        keys = [k for line in ray_log if line["epoch"] == epoch for k in line["keys"]]
        assert sorted(keys) == sorted(f"train{i:05d}" for i in range(24))

    ray_losses = _logged_steps(run_dir, db, "con/loss")
    assert [s for s, _ in ray_losses] == list(range(1, steps + 1))  # the redone steps were not logged twice
    local_losses = _logged_steps(local_dir, tmp_path / "local.db", "con/loss")
    assert ray_losses == local_losses  # bit-equal: fp32, deterministic, the same batches and RNG states
    ray_eval = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert ray_eval == json.loads((local_dir / "metrics.json").read_text())["metrics"]


def test_a_job_the_cluster_cannot_hold_is_refused_in_one_line(cluster, synthetic_corpus, synthetic_shards, tmp_path):
    run_dir = tmp_path / "ray_run"
    run_dir.mkdir()
    # 2 nodes x 2 CPUs: 3 workers + 3 decode actors need 6
    driver = _driver(cluster, run_dir, synthetic_shards, synthetic_corpus, tmp_path / "mlflow.db",
                     "launcher.num_workers=3")
    driver.wait(timeout=120)
    log = (run_dir.parent / f"{run_dir.name}.driver.log").read_text()
    assert driver.returncode == 2, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
    assert "needs 6 CPUs (3 workers x 1 CPU + 3 x launcher.decode_actors_min=1" in errors[0]
    assert "cluster has 4 CPUs" in errors[0] and "launcher.num_workers" in errors[0]
    assert list(run_dir.iterdir()) == []  # refused before the run dir was claimed
