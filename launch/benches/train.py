"""Training throughput: stage-con samples/s of the configured model (default: the tiny config) with
1 and 2 DeepSpeed ranks (gloo on CPU, nccl on CUDA).

Each rank is a process started with torch.multiprocessing and set up through
``trainer.components.distributed.init_distributed``; it runs the real ``ContrastiveTask`` under the real
engine (ZeRO stage, precision from the config) on fixed in-memory batches, so the figure is the
optimisation step (encoders, global-batch gather, WTI loss, backward, gradient all-reduce, AdamW)
without video decoding. ``--batch-size`` is per rank (weak scaling, like data.batch_size): the global
batch grows with the ranks. The first ``--warmup`` steps are not timed (DeepSpeed's first steps
allocate buffers).

With ``--formats`` (default ``video,frames``) the same step is then fed by the real data path:
``launch/train.py`` trains stage con for ``--feed-steps`` steps on one corpus of ``--feed-clips``
long-GOP 320x240 clips of ``--feed-seconds`` s (the decode bench's), packed once per format
(video: transcoded to the model's input size, 8 fps, GOP 8, fastdecode; frames: JPEGs at
``data.sample_fps``), and the run's own MLflow metrics ``con/samples_per_s`` and
``con/data_wait_frac`` (``trainer.components.loop.StepTimer``: the share of wall time the loop
waited for its next batch) are read back, averaged over the log windows after the first (worker
start-up). Measured on 2 cores (48 clips, batch 8, 2 loader workers): transcoded video 9.6
samples/s at 0.12 data wait, frames 26.4 at 0.11 (2.76x), the engine step alone 46.2. Workers that
share the cores with the step slow the step rather than make it wait, so compare samples/s.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="stage-con training samples/s with 1..N DeepSpeed ranks")
    p.add_argument("--ranks", default="1,2", help="comma-separated world sizes")
    p.add_argument("--batch-size", type=int, default=8, help="samples per rank per step")
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the last one counts FLOPs)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0 = cores // ranks)")
    p.add_argument("--formats", default="video,frames", help="shard formats fed through launch/train.py ('' = skip)")
    p.add_argument("--feed-clips", type=int, default=48)
    p.add_argument("--feed-seconds", type=float, default=30.0)
    p.add_argument("--feed-steps", type=int, default=24, help="stage-con steps per format (log every 4)")
    p.add_argument("--feed-work-dir", type=Path, default=None, help="corpus + shards (default: a temp dir, removed)")
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

    formats = [f for f in args.formats.split(",") if f]
    unknown = [f for f in formats if f not in ("video", "frames")]
    if unknown:  # one line, exit 2, before anything runs
        print(f"train bench: --formats takes video and/or frames, got {','.join(unknown)!r}", file=sys.stderr)
        raise SystemExit(2)
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
    if formats:
        with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
            results["feed"] = feed(args, formats, args.feed_work_dir or Path(tmp))
    return results


def feed(args: argparse.Namespace, formats: list[str], work: Path) -> list[dict]:
    """Stage con through ``launch/train.py`` on each format of one packed corpus; see the module doc."""
    from launch.benches.decode import make_corpus, pack
    from shards.probe import FrameSpec, Transcode
    from trainer.launchers.cli import compose

    corpus = argparse.Namespace(clips=args.feed_clips, seconds=args.feed_seconds, size="320x240", fps=25, gop=250)
    manifest = make_corpus(work / "videos", corpus)
    corpus_overrides = ["data=manifest", f"data.root={manifest.parent}"]
    cfg = compose([*corpus_overrides, *args.overrides])  # what the runs below train with
    size = cfg.model.image_size
    rows = []
    print(f"{'format':>7} {'pack s/clip':>11} {'samples/s':>10} {'data wait':>9}")
    for fmt in formats:
        shards = work / f"shards-{fmt}"
        if fmt == "video":
            pack_s = pack(manifest, shards, Transcode(short_side=size, fps=8, gop=8), workers=2, shard_mb=1.0)
        else:
            pack_s = pack(manifest, shards, None, workers=2, shard_mb=1.0,
                          frames=FrameSpec(fps=cfg.data.sample_fps, short_side=size))
        run_dir, db = work / f"run-{fmt}", work / f"{fmt}.db"
        cmd = [sys.executable, str(REPO / "launch" / "train.py"), *corpus_overrides, f"data.shards={shards}",
               "data.train_split=bench", "data.test_split=bench", f"data.batch_size={args.batch_size}",
               "stage.run=[con]", f"stage.con.max_steps={args.feed_steps}", "stage.con.log_every=4",
               f"run.dir={run_dir}", "run.overwrite=true", "run.progress=false",
               "run.stop_on_collapse=false", f"tracking.uri=sqlite:///{db}", "tracking.register=false", *args.overrides]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              env=dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu")))
        if proc.returncode != 0:
            raise RuntimeError(f"train bench, {fmt} shards: launch/train.py exited {proc.returncode}: "
                               f"{proc.stderr.strip()[-2000:]}")
        run_id = json.loads((run_dir / "metrics.json").read_text())["mlflow_run_id"]
        windows = _metric_windows(f"sqlite:///{db}", run_id)
        steady = windows[1:] or windows
        row = {"format": fmt, "clips": args.feed_clips, "clip_seconds": args.feed_seconds, "steps": args.feed_steps,
               "pack_s_per_clip": pack_s / args.feed_clips,
               "samples_per_s": sum(w[0] for w in steady) / len(steady),
               "data_wait_frac": sum(w[1] for w in steady) / len(steady), "log_windows": len(windows)}
        rows.append(row)
        print(f"{fmt:>7} {row['pack_s_per_clip']:>11.2f} {row['samples_per_s']:>10.1f} {row['data_wait_frac']:>9.2f}")
    return rows


def _metric_windows(uri: str, run_id: str) -> list[tuple[float, float]]:
    """(samples/s, data-wait fraction) of each stage-con log window of the run, in step order."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    sps = {m.step: m.value for m in client.get_metric_history(run_id, "con/samples_per_s")}
    wait = {m.step: m.value for m in client.get_metric_history(run_id, "con/data_wait_frac")}
    return [(sps[k], wait[k]) for k in sorted(sps) if k in wait]
