"""``launcher=ray``: a Ray Train ``TorchTrainer`` whose workers each run the same ``trainer.run.train``.

The driver (this process: a local script, or the entrypoint of ``ray job submit``) packs the
shards if needed, builds the Ray Data pipeline of the train split (``shards.ray_source``) and hands
it to the trainer, which splits it equally across the workers. Ray Train brings up the gloo/nccl
process group and sets RANK/WORLD_SIZE/LOCAL_RANK; ``trainer.components.distributed.init_distributed``
adopts that group. Each worker calls ``run.train`` with this launcher's two differences: its train
source is the worker's dataset shard (``RayTrainLoader``, a ``TrainSource``) and every complete
checkpoint is reported to Ray Train. Rank 0 logs to MLflow, as everywhere.

Run: ``python launch/train.py launcher=ray [overrides]``, or
``ray job submit --address http://<head>:8265 -- python launch/train.py launcher=ray ...``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from trainer.launchers.cli import REPO_ROOT
from trainer.config import DataConfig, ModelConfig, RootConfig
from trainer.components.distributed import DistInfo

TRAIN_DATASET = "train"


class RayTrainLoader:
    """A Ray Train worker's shard of the train dataset, as a ``trainer.components.data.TrainSource``.

    Each ``iter`` is one pass (epoch) over this worker's equal split; batches are dropped at the
    tail so every rank takes the same number of steps (the loss gathers across ranks). Resume
    restores the epoch only: Ray Data streaming has no exact mid-epoch position. Skips happen in
    the decode actors, so ``counters`` stays empty here.
    """

    def __init__(self, dataset_shard, *, batch_size: int, num_samples: int, world_size: int, shuffle_buffer: int,
                 max_words: int, seed: int):
        self.dataset_shard, self.batch_size = dataset_shard, batch_size
        self.num_samples, self.world_size, self.shuffle_buffer = num_samples, world_size, shuffle_buffer
        self.max_words, self.seed = max_words, seed
        self.epoch = 0
        self.counters: dict[str, int] = {}

    def __len__(self) -> int:
        return max(1, self.num_samples // self.world_size // self.batch_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state.get("epoch", 0))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from shards.ray_source import iter_train_batches

        # The caption of each sample is picked for this epoch, by the local loader's rule.
        yield from iter_train_batches(self.dataset_shard, self.batch_size, max_words=self.max_words, seed=self.seed,
                                      epoch=self.epoch, drop_last=True,
                                      local_shuffle_buffer_size=self.shuffle_buffer or None)
        self.epoch += 1


def ray_train_source(data: DataConfig, model: ModelConfig, dist: DistInfo, seed: int) -> RayTrainLoader:
    """The train source of a Ray Train worker (``run.train``'s ``train_source`` under launcher=ray)."""
    import ray.train

    from shards.index import read_index

    shard = ray.train.get_dataset_shard(TRAIN_DATASET)
    if shard is None:
        raise RuntimeError(f"no Ray Train dataset {TRAIN_DATASET!r} in this worker: start Ray runs through "
                           "launch/train.py launcher=ray, which passes it to the TorchTrainer")
    total = int(read_index(data.shards, data.train_split)["total_samples"])
    return RayTrainLoader(shard, batch_size=data.batch_size, num_samples=total, world_size=dist.world_size,
                          shuffle_buffer=data.shuffle_buffer, max_words=data.max_words, seed=seed)


def report_checkpoint(tag_dir: Path, step: int) -> None:
    """Tell Ray Train about a complete checkpoint (every worker must call ``report``; rank 0 hands
    over the directory, which Ray Train persists under ``launcher.storage_path``)."""
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(str(tag_dir)) if ray.train.get_context().get_world_rank() == 0 else None
    ray.train.report({"step": step, "stage": tag_dir.parent.name}, checkpoint=checkpoint)


def _train_worker(config: dict) -> None:
    """Body of each Ray Train worker: the ordinary training run on this worker's rank."""
    from omegaconf import OmegaConf

    from trainer.run import train

    # Typed again (RootConfig), as trainer.launchers.cli.compose returns it: run.train reads it as dataclasses.
    train(OmegaConf.merge(OmegaConf.structured(RootConfig), config["cfg"]), train_source=ray_train_source,
          after_checkpoint=report_checkpoint, dir_claimed=True)


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


def launch_ray(dcfg) -> None:
    """Start the Ray Train job for config ``dcfg`` (``launcher=ray``) and wait for it."""
    import ray
    from omegaconf import OmegaConf
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from shards.ray_source import ray_dataset
    from trainer.components.data import ensure_shards, shard_cache
    from trainer.components.rundir import claim, named
    from trainer.run import check_gen_init

    dcfg = named(dcfg)  # the driver names the run: every worker gets the same run.dir
    cfg = OmegaConf.to_object(dcfg)
    lc = cfg.launcher
    ensure_shards(cfg.data, progress=cfg.run.progress)
    check_gen_init(cfg, Path(cfg.run.dir))
    claim(Path(cfg.run.dir), resume=cfg.run.resume, overwrite=cfg.run.overwrite,
          continues="con" not in cfg.stage.run and not cfg.stage.gen.init)
    if not ray.is_initialized():
        ray.init(address=lc.address or None, runtime_env={"env_vars": _worker_env_vars()}, log_to_driver=True)
    dataset = ray_dataset(cfg.data.shards, cfg.data.train_split, max_frames=cfg.data.max_frames,
                          image_size=cfg.model.image_size, sample_fps=cfg.data.sample_fps,
                          num_actors=lc.decode_actors, use_gpu=lc.use_gpu, cache=shard_cache(cfg.data))
    storage = lc.storage_path or str(Path(cfg.run.dir) / "ray")
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"cfg": OmegaConf.to_container(dcfg, resolve=True)},
        torch_config=TorchConfig(backend="nccl" if lc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=lc.num_workers, use_gpu=lc.use_gpu,
                                     resources_per_worker={"CPU": lc.cpus_per_worker}),
        datasets={TRAIN_DATASET: dataset},
        run_config=RunConfig(name=cfg.run.name, storage_path=storage),
    )
    trainer.fit()


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
