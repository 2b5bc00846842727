"""Training throughput: stage-con samples/s of the configured model (default: the tiny config) with
1 and 2 DeepSpeed ranks (gloo on CPU, nccl on CUDA).

Each rank is a process started with torch.multiprocessing and set up through
``trainer.components.distributed.init_distributed``; it runs the real ``ContrastiveTask`` under the real
engine (ZeRO stage, precision from the config) on fixed in-memory batches, so the figure is the
optimisation step (encoders, global-batch gather, WTI loss, backward, gradient all-reduce, AdamW)
without video decoding. ``--batch-size`` is per rank (weak scaling, like data.batch_size): the global
batch grows with the ranks. The first ``--warmup`` steps are not timed (DeepSpeed's first steps
allocate buffers).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="stage-con training samples/s with 1..N DeepSpeed ranks")
    p.add_argument("--ranks", default="1,2", help="comma-separated world sizes")
    p.add_argument("--batch-size", type=int, default=8, help="samples per rank per step")
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the last one counts FLOPs)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0 = cores // ranks)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides (model=..., deepspeed=zero2, deepspeed.precision=fp32)")
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, cfg_yaml: str, batch: int, steps: int, warmup: int, threads: int,
          out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from omegaconf import OmegaConf

    from trainer.config import RootConfig
    from trainer.components.distributed import init_distributed
    from trainer.components.engine import build_engine, engine_dtype
    from trainer.models import build_encoder
    from trainer.stages.con import ContrastiveTask, param_groups

    torch.set_num_threads(threads)
    cfg: RootConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RootConfig), OmegaConf.create(cfg_yaml)))
    dist = init_distributed(cfg.deepspeed.backend, cfg.run.device)
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model, cfg.data.max_frames).to(dist.device)
    engine = build_engine(ContrastiveTask(encoder), param_groups(encoder, cfg.stage.con.lr, 1.0), cfg.deepspeed,
                          micro_batch=batch, total_steps=steps + warmup, warmup_ratio=0.1,
                          weight_decay=cfg.stage.con.weight_decay)
    dtype, s, t, w = engine_dtype(engine), cfg.model.image_size, cfg.data.max_frames, cfg.data.max_words
    g = torch.Generator().manual_seed(rank)
    video = torch.randn(batch, t, 3, s, s, generator=g).to(dist.device, dtype)
    video_mask = torch.ones(batch, t, dtype=torch.bool, device=dist.device)
    text = torch.randint(1, 1000, (batch, w), generator=g).to(dist.device)
    text_mask = torch.ones(batch, w, dtype=torch.bool, device=dist.device)
    groups = (torch.arange(batch) + rank * batch).to(dist.device)

    def step() -> None:
        loss = engine(video, video_mask, text, text_mask, groups)
        engine.backward(loss)
        engine.step()

    from torch.utils.flop_counter import FlopCounterMode

    for i in range(warmup):
        if i == warmup - 1:  # one step counted op by op (forward + backward): the FLOPs behind MFU
            with FlopCounterMode(display=False) as flops:
                step()
        else:
            step()
    torch.distributed.barrier()
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dist.device)
    if dist.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if dist.device.type == "cuda":
        torch.cuda.synchronize()
    torch.distributed.barrier()
    elapsed = time.perf_counter() - start
    if rank == 0:
        Path(out).write_text(json.dumps({
            "seconds": elapsed, "steps": steps, "dtype": str(dtype), "zero_stage": engine.zero_optimization_stage(),
            "flops_per_step": flops.get_total_flops() if warmup else None,
            "peak_memory_gb": torch.cuda.max_memory_allocated(dist.device) / 2**30 if dist.device.type == "cuda" else None}))
    torch.distributed.destroy_process_group()


def run(args: argparse.Namespace) -> dict:
    from omegaconf import OmegaConf

    from trainer.launchers.cli import compose

    cfg = compose(list(args.overrides))
    cfg_yaml = OmegaConf.to_yaml(cfg)
    results = {"model": cfg.model.name, "device": "cuda" if torch.cuda.is_available() else "cpu",
               "precision": cfg.deepspeed.precision, "zero_stage": cfg.deepspeed.zero_stage,
               "batch_per_rank": args.batch_size, "max_frames": cfg.data.max_frames,
               "image_size": cfg.model.image_size, "cpu_cores": os.cpu_count(), "runs": []}
    print(f"{'ranks':>5} {'global batch':>12} {'step s':>8} {'samples/s':>10} {'per rank':>9}")
    for world in (int(r) for r in args.ranks.split(",")):
        threads = args.threads or max(1, (os.cpu_count() or 1) // world)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rank0.json"
            torch.multiprocessing.spawn(_rank, args=(world, _free_port(), cfg_yaml, args.batch_size, args.steps,
                                                     args.warmup, threads, str(out)), nprocs=world, join=True)
            timing = json.loads(out.read_text())
        global_batch = args.batch_size * world
        sps = global_batch * timing["steps"] / timing["seconds"]
        row = {"ranks": world, "threads_per_rank": threads, "global_batch": global_batch,
               "step_s": timing["seconds"] / timing["steps"], "samples_per_s": sps, "samples_per_s_per_rank": sps / world,
               "flops_per_step_rank0": timing["flops_per_step"], "peak_memory_gb_rank0": timing["peak_memory_gb"]}
        results["runs"].append(row)
        print(f"{world:>5} {global_batch:>12} {row['step_s']:>8.3f} {sps:>10.1f} {sps / world:>9.1f}")
    return results
