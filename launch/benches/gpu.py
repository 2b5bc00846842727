"""The GPU check, one command: `python launch/bench.py gpu` (under 8 minutes on one H100/H200).

In order, each part timed and written to the JSON as it finishes:
1. stage-con training (``launch/benches/train.py``, one rank): ``model=clip_b32`` from random init
   at 224 px, 12 frames, bf16, batch 64 and 128: step time, samples/s, peak memory, and MFU (FLOPs
   of one step counted op by op with ``torch.utils.flop_counter``, over ``--peak-tflops``: 989 is
   the dense bf16 peak of an H100 / H200 SXM);
2. JPEG decode of frame shards: clips/s of 12 frames at 224 px, batched nvJPEG on the GPU against
   libjpeg-turbo on one core (``shards.frames.decode_jpegs``);
3. the video path's GPU decode actors (``shards.ray_source``, ``use_gpu``) and the frame path's
   nvJPEG actors on a local Ray cluster: rows/s;
4. WTI forward + backward at N=4096 and ActivityNet-scale (4,917 videos) evaluation and
   re-ranking (``launch/benches/ops.py``): time and memory;
5. the ``gpu``-marked tests (``pytest -m gpu``): passed / failed / skipped.

``--tiny`` runs every part on CPU at toy sizes (the tiny model, 32 px, a few clips): the smoke test
in ``make test`` (tests/test_gpu_bench.py) runs it so the script is known to work before a GPU is lent.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("gpu", help="the GPU check: training MFU, nvJPEG, decode actors, WTI, re-ranking, gpu tests")
    p.add_argument("--tiny", action="store_true", help="toy sizes on CPU: the smoke test")
    p.add_argument("--batches", default="64,128", help="stage-con batch sizes")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU, for MFU")
    p.add_argument("--clips", type=int, default=64, help="clips packed as frame shards for the decode parts")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: train,jpeg,ray,ops,tests")
    return p


def _train(args, device: str) -> dict:
    from launch.benches import train

    overrides = (["model=tiny", "data.max_frames=4", "deepspeed.precision=fp32"] if args.tiny else
                 ["model=clip_b32", "data.max_frames=12", "deepspeed.precision=bf16"])
    out = {"overrides": overrides, "runs": []}
    for batch in [int(b) for b in args.batches.split(",")]:
        ns = argparse.Namespace(ranks="1", batch_size=batch, steps=2 if args.tiny else 10, warmup=1 if args.tiny else 3,
                                threads=0, overrides=overrides, formats="")  # the data path is the jpeg part's
        row = train.run(ns)["runs"][0]
        flops = row["flops_per_step_rank0"]
        row["mfu"] = (flops / row["step_s"] / (args.peak_tflops * 1e12)) if flops and device == "cuda" else None
        row["batch"] = batch
        out["runs"].append(row)
    return out


def _frame_shards(work: Path, args) -> Path:
    """``--clips`` generated 30 s clips (6 s with --tiny) packed as frame shards at 224 px (32)."""
    from launch.benches.decode import make_corpus, pack
    from shards.probe import FrameSpec

    ns = argparse.Namespace(clips=args.clips, seconds=6.0 if args.tiny else 30.0, size="320x240", fps=25, gop=250)
    manifest = make_corpus(work / "videos", ns)
    pack(manifest, work / "frames", None, workers=2, shard_mb=64, frames=FrameSpec(short_side=32 if args.tiny else 224))
    return work / "frames"


def _jpeg(shards: Path, device: str) -> dict:
    from shards.frames import decode_jpegs, pick_positions
    from shards.stream import ShardStream

    stream = ShardStream(shards, "bench", max_frames=12, image_size=8, training=False)
    clips = []
    for raw in stream.raw_samples(0, 1, 0, None):
        meta = json.loads(raw["json"])
        clips.append([raw["frames"][p] for p in pick_positions(meta["frames"], 12, 1.0, None, None)])
    out, threads = {}, torch.get_num_threads()
    for where in ["cpu"] + (["cuda"] if device == "cuda" else []):
        torch.set_num_threads(1)
        decode_jpegs(clips[0], where)  # warm-up (nvJPEG handle, CUDA context)
        if where == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for clip in clips:
            decode_jpegs(clip, where)
        if where == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        out[where] = {"clips": len(clips), "seconds": dt, "clips_per_s": len(clips) / dt}
    torch.set_num_threads(threads)  # one core for the measurement only, not for what runs after
    if "cuda" in out:
        out["cuda_vs_one_cpu_core"] = out["cuda"]["clips_per_s"] / out["cpu"]["clips_per_s"]
    return out


def _ray(shards: Path, video_shards: Path, device: str) -> dict:
    import ray

    from shards.ray_source import split_dataset

    use_gpu = device == "cuda"
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as tmp:
        ray.init(num_cpus=4, num_gpus=1 if use_gpu else 0, include_dashboard=False, _temp_dir=tmp,
                 log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            out = {"use_gpu": use_gpu}
            for name, path in (("frames_nvjpeg" if use_gpu else "frames_cpu", shards),
                               ("video_gpu_actors" if use_gpu else "video_cpu_actors", video_shards)):
                t0 = time.perf_counter()
                rows = split_dataset(path, "bench", max_frames=12, image_size=224 if use_gpu else 32, sample_fps=1.0,
                                     use_gpu=use_gpu).count()
                dt = time.perf_counter() - t0
                out[name] = {"rows": rows, "seconds": dt, "rows_per_s": rows / dt}
        finally:
            ray.shutdown()
    return out


def _ops(args, device: str) -> dict:
    from launch.benches import ops

    ns = ops.add_parser(argparse.ArgumentParser().add_subparsers()).parse_args(
        ["--sizes", "4096", "--eval-n", "4917"] if not args.tiny else ["--quick"])
    ns.device = device
    return ops.run(ns)


def _tests(args) -> dict:
    # --tiny: one file, so the smoke test checks the call without collecting the whole suite again
    where = ["tests/test_ops_wti.py"] if args.tiny else []
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *where],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    return {"returncode": proc.returncode, "summary": summary}


def run(args: argparse.Namespace) -> dict:
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.tiny:
        args.batches, args.clips = "2", min(args.clips, 3)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    results: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "tiny": args.tiny,
                     "parts_s": {}}
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        work = Path(tmp)
        parts = [("train", lambda: _train(args, device))]
        if not {"jpeg", "ray"} <= skip:
            shards = _frame_shards(work, args)
            parts.append(("jpeg", lambda: _jpeg(shards, device)))
            video = work / "video"
            from launch.benches.decode import pack

            pack(work / "videos" / "bench.jsonl", video, None, workers=2, shard_mb=64)
            parts.append(("ray", lambda: _ray(shards, video, device)))
        parts += [("ops", lambda: _ops(args, device)), ("tests", lambda: _tests(args))]
        for name, part in parts:
            if name in skip:
                continue
            t0 = time.perf_counter()
            results[name] = part()
            results["parts_s"][name] = time.perf_counter() - t0
            print(f"gpu bench: {name} done in {results['parts_s'][name]:.0f} s", flush=True)
    _print(results)
    return results


def _print(r: dict) -> None:
    print(f"device: {r['device']}")
    for row in r.get("train", {}).get("runs", []):
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        mem = f"{row['peak_memory_gb_rank0']:.1f} GB" if row["peak_memory_gb_rank0"] is not None else "-"
        print(f"stage con batch {row['batch']}: {row['step_s'] * 1e3:.0f} ms/step, {row['samples_per_s']:.0f} samples/s, "
              f"peak {mem}, MFU {mfu}")
    for where, x in r.get("jpeg", {}).items():
        if isinstance(x, dict):
            print(f"JPEG decode on {where}: {x['clips_per_s']:.0f} clips/s (12 frames)")
    for name, x in r.get("ray", {}).items():
        if isinstance(x, dict):
            print(f"Ray {name}: {x['rows_per_s']:.1f} rows/s")
    if "tests" in r:
        print(f"gpu tests: {r['tests']['summary']}")
