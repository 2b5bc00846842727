"""``launcher=ray``: a Ray Train ``TorchTrainer`` whose workers each run the same ``trainer.run.train``.

The driver (this process: a local script, or the entrypoint of ``ray job submit``) packs the
shards if needed, claims the run dir, checks that the cluster can hold the job and starts the
trainer. Ray Train brings up the gloo/nccl process group and sets RANK/WORLD_SIZE/LOCAL_RANK;
``trainer.components.distributed.init_distributed`` adopts that group. Each worker calls
``run.train`` with this launcher's differences: its train source is its rank's stream decoded by a
Ray Data actor pool (``shards.ray_source.RayStreamLoader``: the local stream's samples, order and
exact resume) and every complete checkpoint is reported to Ray Train. Rank 0 logs to MLflow.

Failures: a lost worker or node makes Ray Train restart the group (``launcher.max_failures``);
the new workers resume from the run dir's newest complete checkpoint, or the one reported to Ray
Train when that is newer, and continue the same MLflow run. Preemption: SIGTERM or SIGINT to the
driver (``ray job stop``) asks the workers to checkpoint at the next step and end; resubmit with
``run.resume=auto``. ``run.dir`` (and ``launcher.storage_path``) must be storage every node reaches.

Run: ``python launch/train.py launcher=ray [overrides]``, or
``ray job submit --address http://<head>:8265 -- python launch/train.py launcher=ray ...``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import uuid
from pathlib import Path

from trainer.components.distributed import DistInfo
from trainer.components.rundir import STOP_FILE, atomic_write
from trainer.config import DataConfig, LauncherConfig, ModelConfig, RootConfig
from trainer.launchers.cli import REPO_ROOT
from trainer.launchers.errors import ClusterTooSmall


def decode_range(lc: LauncherConfig, resources: dict[str, float]) -> tuple[int, int]:
    """Each worker's decode pool (min, max): refuses (``ClusterTooSmall``, naming the numbers and
    the fix) when ``resources`` (``ray.cluster_resources()``) cannot hold the workers and every
    pool's minimum; the maximum is capped at the CPUs left per worker, so pools never wait for CPUs
    the workers hold. Without ``check_fit`` the configured range is taken as it is."""
    lo, hi, n = lc.decode_actors_min, max(lc.decode_actors_min, lc.decode_actors_max), lc.num_workers
    if lo < 1:
        raise ClusterTooSmall(f"launcher.decode_actors_min={lo}: each worker needs at least one decode actor")
    if not lc.check_fit:
        return lo, hi
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    need_cpu = n * lc.cpus_per_worker + n * lo
    need_gpu = n * (1 + lo) if lc.use_gpu else 0
    if need_cpu > cpus or need_gpu > gpus:
        what = f"{need_cpu:g} CPUs" + (f" and {need_gpu} GPUs" if lc.use_gpu else "")
        have = f"{cpus:g} CPUs" + (f" and {gpus:g} GPUs" if lc.use_gpu else "")
        raise ClusterTooSmall(
            f"launcher=ray needs {what} ({n} workers x {lc.cpus_per_worker:g} CPU + {n} x "
            f"launcher.decode_actors_min={lo} decode actors x 1 CPU{' + 1 GPU each' if lc.use_gpu else ''}) but the "
            f"cluster has {have}; lower launcher.num_workers, launcher.cpus_per_worker or launcher.decode_actors_min, "
            "add nodes, or set launcher.check_fit=false on an autoscaling cluster")
    spare = math.floor((cpus - n * lc.cpus_per_worker) / n + 1e-9)
    return lo, max(lo, min(hi, spare))


def ray_train_source(data: DataConfig, model: ModelConfig, dist: DistInfo, seed: int, *, decode: tuple[int, int],
                     launcher: LauncherConfig):
    """A Ray Train worker's train source: its rank's ``ShardStream`` (the local rule for shard
    order, rank split, shuffle and quota), decoded by its Ray Data actor pool."""
    from shards.ray_source import RayStreamLoader
    from shards.stream import ShardStream
    from trainer.components.data import shard_cache

    stream = ShardStream(data.shards, data.train_split, max_frames=data.max_frames, image_size=model.image_size,
                         sample_fps=data.sample_fps, training=True, seed=seed, shuffle_buffer=data.shuffle_buffer,
                         rank=dist.rank, world_size=dist.world_size, cache=shard_cache(data))
    return RayStreamLoader(stream, batch_size=data.batch_size, max_words=data.max_words, seed=seed,
                           decode_actors=decode, use_gpu=launcher.use_gpu, stall_timeout_s=launcher.stall_timeout_s)


def report_checkpoint(tag_dir: Path, step: int) -> None:
    """Tell Ray Train about a complete checkpoint (every worker must call ``report``; rank 0 hands
    over the directory, which Ray Train persists under ``launcher.storage_path``)."""
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(str(tag_dir)) if ray.train.get_context().get_world_rank() == 0 else None
    ray.train.report({"step": step, "stage": tag_dir.parent.name}, checkpoint=checkpoint)


STAGE_ORDER = {"con": 0, "gen": 1}


def adopt_reported_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint last reported to Ray Train, copied into ``run_dir`` when it is newer than
    the run dir's own newest complete one (a run dir that lost it: a node-local disk, a torn copy).
    Returns the adopted tag dir, or None when the run dir's is as new."""
    import ray.train

    from trainer.components.checkpoint import MARKER, find_resume_point

    reported = ray.train.get_checkpoint()
    if reported is None:
        return None
    with reported.as_directory() as path:
        marker_file = Path(path) / MARKER
        if not marker_file.is_file():
            return None
        marker = json.loads(marker_file.read_text())
        stage, step = marker["stage"], int(marker["step"])
        own = find_resume_point("auto", run_dir, {}, "")  # the run dir's newest complete tag (gen after con)
        if own is not None and (STAGE_ORDER[own.stage], int(own.marker["step"])) >= (STAGE_ORDER[stage], step):
            return None
        target = run_dir / "checkpoints" / stage / f"step{step:08d}"
        tmp = target.with_name(f".{target.name}.adopting")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(path, tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        print(f"adopted the checkpoint reported to Ray Train ({stage} step {step}) into {target}")
        return target


def is_restart(run_dir: Path, fit_id: str) -> bool:
    """True in a worker group Ray Train restarted within this fit (rank 0 decides, once per group;
    the first group leaves a marker behind)."""
    from trainer.components.distributed import decided_once

    def pick() -> bool:
        marker = run_dir / "ray" / f"started-{fit_id}"
        if marker.exists():
            adopt_reported_checkpoint(run_dir)
            return True
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        return False

    return decided_once(pick)


def record_workers(run_dir: Path) -> None:
    """``<run_dir>/ray/workers.json``: each rank's node and pid in the current worker group (where
    rank 0 is when a node is to be drained; which process a stuck rank is)."""
    import ray
    import torch

    me = {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
    ranks = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(ranks, me)
    if torch.distributed.get_rank() == 0:
        atomic_write(run_dir / "ray" / "workers.json", json.dumps({str(r): w for r, w in enumerate(ranks)}, indent=1))


def _train_worker(config: dict) -> None:
    """Body of each Ray Train worker: the ordinary training run on this worker's rank."""
    import functools

    import torch
    from omegaconf import OmegaConf

    from trainer.components.distributed import init_distributed
    from trainer.components.preemption import Preempted
    from trainer.run import train

    # Typed again (RootConfig), as trainer.launchers.cli.compose returns it: run.train reads it as dataclasses.
    dcfg = OmegaConf.merge(OmegaConf.structured(RootConfig), config["cfg"])
    init_distributed(dcfg.deepspeed.backend, dcfg.run.device)  # adopts Ray Train's group (train() again: a no-op)
    restarted = is_restart(Path(dcfg.run.dir), config["fit_id"])
    record_workers(Path(dcfg.run.dir))
    if restarted:
        print(f"rank {torch.distributed.get_rank()}: worker group restarted; resuming from the newest checkpoint")
    source = functools.partial(ray_train_source, decode=tuple(config["decode"]),
                               launcher=OmegaConf.to_object(dcfg.launcher))
    try:
        train(dcfg, train_source=source, after_checkpoint=report_checkpoint, dir_claimed=True, restarted=restarted)
    except Preempted as stop:  # checkpointed: end this worker cleanly (an exception would be a failure to retry)
        print(f"rank {torch.distributed.get_rank()}: preempted at step {stop.step}; checkpoint saved")


JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a submitted job


def _worker_env_vars() -> dict[str, str]:
    """Environment the workers and Ray Data tasks need: streamret importable from the repo, and
    DeepSpeed's accelerator choice. Keys the submitted job's runtime env already sets are left to
    it (Ray refuses a driver runtime env that redefines them)."""
    env_vars = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    if os.environ.get("DS_ACCELERATOR"):
        env_vars["DS_ACCELERATOR"] = os.environ["DS_ACCELERATOR"]
    if JOB_CONFIG_ENV in os.environ:
        job_env = (json.loads(os.environ[JOB_CONFIG_ENV]).get("runtime_env") or {}).get("env_vars") or {}
        env_vars = {k: v for k, v in env_vars.items() if k not in job_env}
    return env_vars


ARMED = "SIGTERM/SIGINT (ray job stop) from now on"  # printed once the driver handles them


class StopOnSignal:
    """SIGTERM/SIGINT to the driver (``ray job stop``, Ctrl-C) write ``<run_dir>/PREEMPT``, which
    every worker's stage loop checks after each step: it checkpoints and ends (``GracefulStop``)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / STOP_FILE
        self.previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        self.path.unlink(missing_ok=True)  # a request of an earlier job is not this one's
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        print(f"{ARMED}: the workers checkpoint at their next step and end", flush=True)
        return self

    def _handle(self, signum, frame) -> None:
        print(f"{signal.Signals(signum).name}: asking the workers to checkpoint and stop", flush=True)
        self.path.write_text(signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        return self.path.exists()

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def launch_ray(dcfg) -> int:
    """Start the Ray Train job for config ``dcfg`` (``launcher=ray``) and wait for it."""
    import ray
    from omegaconf import OmegaConf
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainer.components.data import ensure_shards
    from trainer.components.rundir import claim, named
    from trainer.run import check_gen_init

    dcfg = named(dcfg)  # the driver names the run: every worker gets the same run.dir
    cfg = OmegaConf.to_object(dcfg)
    lc, run_dir = cfg.launcher, Path(cfg.run.dir)
    ensure_shards(cfg.data, progress=cfg.run.progress)
    check_gen_init(cfg, run_dir)
    if not ray.is_initialized():
        ray.init(address=lc.address or None, runtime_env={"env_vars": _worker_env_vars()}, log_to_driver=True)
    decode = decode_range(lc, ray.cluster_resources())  # refuses before the run dir is touched
    claim(run_dir, resume=cfg.run.resume, overwrite=cfg.run.overwrite,
          continues="con" not in cfg.stage.run and not cfg.stage.gen.init)
    print(f"launcher=ray: {lc.num_workers} workers x {lc.cpus_per_worker:g} CPU ({lc.placement}), decode actors "
          f"{decode[0]}..{decode[1]} per worker, up to {lc.max_failures} restarts; cluster {ray.cluster_resources()}")
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"cfg": OmegaConf.to_container(dcfg, resolve=True), "fit_id": uuid.uuid4().hex,
                           "decode": list(decode)},
        torch_config=TorchConfig(backend="nccl" if lc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=lc.num_workers, use_gpu=lc.use_gpu, placement_strategy=lc.placement,
                                     resources_per_worker={"CPU": lc.cpus_per_worker}),
        run_config=RunConfig(name=cfg.run.name, storage_path=lc.storage_path or str(run_dir / "ray"),
                             failure_config=FailureConfig(max_failures=lc.max_failures)),
    )
    with StopOnSignal(run_dir) as stop:
        try:
            trainer.fit()
        except ray.train.TrainingFailedError as err:
            cause = str(err).strip().splitlines()
            print(f"error: Ray Train gave up after launcher.max_failures={lc.max_failures} restarts: "
                  f"{cause[-1] if cause else type(err).__name__}", file=sys.stderr)
            return 1
        if stop.requested:
            print(f"preempted: the workers checkpointed into {run_dir}/checkpoints; resubmit the same command with "
                  "run.resume=auto to continue")
    return 0


def main(argv: list[str] | None = None) -> int:
    from trainer.launchers.cli import ConfigError, load_config
    from trainer.launchers.errors import run_entry_point

    def load():
        cfg = load_config(argv)
        if cfg.launcher.name != "ray":
            raise ConfigError(f"error: trainer/launchers/ray.py needs launcher=ray (got launcher={cfg.launcher.name}); "
                              "use launch/train.py for local and deepspeed runs")
        return cfg

    return run_entry_point(load, launch_ray)


if __name__ == "__main__":
    sys.exit(main())
