"""Decode benchmark: clips/s on the same shards for the reference decoder, raw decord and our pipeline.

Corpus: ``--clips`` generated videos of ``--seconds`` s at ``--size`` and ``--fps`` with a LONG GOP
(``--gop``, like camera / web uploads), a textured pan plus noise so the encoder writes real P-frames.
They are packed twice: as-is, and with pack-time transcode (``Transcode(short_side, fps, gop, fastdecode)``).
On each packing, one process each (torch and the decoders at one thread):

(a) reference: OpenCV (``cv2.VideoCapture``) decodes EVERY frame and keeps one per 1/sample_fps s,
    thinned to max_frames (decode only: no resize or normalisation, which flatters it);
(b) limit: raw decord ``VideoReader`` + ``get_batch`` on exactly the indices our pipeline samples,
    in ``--workers`` processes at once like (c); per core = clips/s / processes;
(c) ours: ``ShardStream`` + ``build_loader`` (tar read, decode, resize + crop, tokenise, batch)
    with ``--workers`` DataLoader workers over ``--pipeline-clips`` clips (the shards re-read as a
    training stream does); per core = clips/s / max(1, workers). The loader is built as the
    trainer builds it (``normalise=False``): the CLIP normalisation is one multiply-add the trainer
    runs on its device (``video_to_device``), so it is not on the decode cores. Steady state
    excludes the time to the first batch (worker start-up: imports, first shard open).

Per core from wall time is only meaningful on an idle machine. Even at ``num_threads=1``
decord's reader keeps a second thread partly busy (~1.35 cores for one process alone: 23 ms of
CPU per 17 ms clip on transcoded shards), so a lone decoder's wall time is per process, not per
core; (b) and (c) therefore both run ``--workers`` processes. Each decoder also reports CPU
seconds (``per_cpu_s`` = clips per CPU second: user + system of the process, and for (c) of its
DataLoader workers too, steady state after the first batch like the wall figure), which stays
comparable when other jobs share the cores.

Shards: ``--shard-mb`` per shard (default 1 MiB, so several shards): a real split has many more
shards than DataLoader workers and each worker reads only its own; with a single shard every
worker would read (and drop) the other workers' samples as well.

Why transcode is the lever: sampling 1 fps inside a 250-frame GOP makes decord decode almost every
frame up to each sampled one; after transcode every sampled frame is (near) a keyframe, and what
is left is entropy decoding, which x264's fastdecode tune (CAVLC, no deblocking) makes ~1.7x cheaper.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("decode", help="video decode throughput: OpenCV reference vs decord vs ShardStream")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--size", default="320x240", help="WIDTHxHEIGHT of the generated clips")
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--gop", type=int, default=250, help="keyframe interval of the generated clips")
    p.add_argument("--transcode", default=None,
                   help="pack-time transcode short_side,fps,gop[,fastdecode 0/1] (default: <image-size>,8,8,1)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for (c)")
    p.add_argument("--batch-size", type=int, default=16, help="per-batch costs (shared memory, IPC) amortise as in training")
    p.add_argument("--pipeline-clips", type=int, default=96,
                   help="clips (c) decodes, re-reading the shards as needed, so start-up is a small share")
    p.add_argument("--max-frames", type=int, default=12)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--sample-fps", type=float, default=1.0)
    p.add_argument("--shard-mb", type=float, default=1.0, help="shard size when packing (MiB)")
    p.add_argument("--work-dir", type=Path, default=None, help="corpus + shards (default: a temp dir, removed)")
    p.add_argument("--frames-quality", type=int, default=90, help="JPEG quality of the frame shards")
    p.add_argument("--long-clips", type=int, default=4, help="ActivityNet-length clips (0 = skip that corpus)")
    p.add_argument("--long-seconds", type=float, default=150.0, help="their length (ActivityNet: 2-3 minutes)")
    p.add_argument("--long-max-frames", type=int, default=64, help="frames per clip there (ActivityNet's 64)")
    p.add_argument("--quick", action="store_true", help="3 clips of 6 s (and 2 of 20 s): a smoke run")
    return p


# --- corpus --------------------------------------------------------------------------------------
def _clip_frames(n: int, width: int, height: int, seed: int):
    """A smooth random texture panning diagonally, plus light per-frame noise."""
    rng = np.random.default_rng(seed)
    tex = rng.integers(0, 256, size=(height // 8 + 64, width // 8 + 64, 3), dtype=np.uint8)
    tex = np.kron(tex, np.ones((8, 8, 1), dtype=np.uint8))  # 8x8 blocks: detail the encoder must keep
    for t in range(n):
        y, x = (2 * t) % (tex.shape[0] - height), (3 * t) % (tex.shape[1] - width)
        frame = tex[y : y + height, x : x + width].astype(np.int16)
        frame += rng.integers(-6, 7, size=frame.shape, dtype=np.int16)
        yield np.clip(frame, 0, 255).astype(np.uint8)


def make_corpus(root: Path, args, clips: int | None = None, seconds: float | None = None) -> Path:
    from shards.probe import encode_h264

    clips, seconds = clips or args.clips, seconds or args.seconds
    width, height = (int(v) for v in args.size.lower().split("x"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(clips):
        path = root / f"clip{i:03d}.mp4"
        if not path.is_file():
            encode_h264(_clip_frames(int(seconds * args.fps), width, height, i), str(path), fps=args.fps,
                        width=width, height=height, gop=args.gop)
        rows.append({"video": path.name, "caption": f"texture pan number {i}"})
    (root / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "bench.jsonl"


def pack(manifest: Path, out: Path, transcode, workers: int, shard_mb: float, frames=None) -> float:
    from shards.manifest import ManifestCorpus
    from shards.writer import pack_split

    t0 = time.perf_counter()
    pack_split(ManifestCorpus(manifest, corpus="bench").samples("bench"), out, "bench", workers=workers,
               transcode=transcode, progress=False, shard_bytes=max(1, int(shard_mb * 2**20)), frames=frames)
    return time.perf_counter() - t0


# --- the three decoders --------------------------------------------------------------------------
def _cpu_s(children: bool = False) -> float:
    """CPU seconds (user + system) of this process, plus its reaped child processes when ``children``."""
    who = [resource.RUSAGE_SELF] + ([resource.RUSAGE_CHILDREN] if children else [])
    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, who))


def _live_children_cpu_s() -> float:
    """CPU seconds so far of this process's running children (the DataLoader workers), from /proc."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for task in Path("/proc/self/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            except OSError:  # exited meanwhile: its CPU is already in RUSAGE_CHILDREN
                continue
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def _raw_samples(shard_dir: Path) -> list[dict]:
    from shards.stream import ShardStream

    stream = ShardStream(shard_dir, "bench", max_frames=1, image_size=8, training=False)
    return list(stream.raw_samples(0, 1, 0, None))


def bench_opencv(raws: list[dict], args) -> dict:
    import cv2

    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for raw in raws:  # the reference reads video files from disk
            paths.append(Path(tmp) / f"{raw['__key__']}.mp4")
            paths[-1].write_bytes(raw["video"])
        params = [cv2.CAP_PROP_N_THREADS, 1] if hasattr(cv2, "CAP_PROP_N_THREADS") else []
        t0, cpu0 = time.perf_counter(), _cpu_s()
        decoded = 0
        for path in paths:
            cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, params)
            fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
            step = max(1, round(fps / args.sample_fps))
            kept, i = [], 0
            while True:
                ok, frame = cap.read()
                if not ok:
                    break
                decoded += 1
                if i % step == 0:
                    kept.append(frame)
                i += 1
            cap.release()
            if not kept:
                raise RuntimeError(f"OpenCV decoded no frame of {path}")
            pick = np.linspace(0, len(kept) - 1, min(args.max_frames, len(kept))).round().astype(int)
            np.stack([kept[j] for j in pick])
        dt, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    return {"clips": len(raws), "seconds": dt, "clips_per_s": len(raws) / dt, "frames_decoded": decoded,
            "per_core": len(raws) / dt, "cpu_s": cpu, "per_cpu_s": len(raws) / cpu}


def _decord_loop(clips: list[dict], args, start, results) -> None:
    """One (b) process: wait for the others, decode ``clips``, report (clips, wall s, CPU s). Video
    shards: decord ``VideoReader`` + ``get_batch``; frame shards: ``decode_jpeg`` of the picked
    JPEGs (``shards.frames.sampled_frames`` either way: the decoder alone, no resize or batching)."""
    import torch

    from shards.frames import sampled_frames  # imports decord after torch

    torch.set_num_threads(1)
    start.wait()
    t0, cpu0 = time.perf_counter(), _cpu_s()
    for raw in clips:
        sampled_frames(raw, json.loads(raw["json"]), args.max_frames, args.sample_fps)
    results.put((len(clips), time.perf_counter() - t0, _cpu_s() - cpu0))


def bench_decord(raws: list[dict], args) -> dict:
    """(b) in ``--workers`` processes at once, as many as (c) decodes in: per core compares like
    with like (two decoders sharing two cores each run ~8% slower per clip than one alone)."""
    import multiprocessing as mp

    procs = max(1, args.workers)
    # As many decodes as (c) makes: a pass over a few clips is too short to time steadily.
    clips = [raws[i % len(raws)] for i in range(max(len(raws), args.pipeline_clips))]
    ctx = mp.get_context("fork")  # like the DataLoader workers of (c)
    start, results = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_decord_loop, args=(clips[i::procs], args, start, results)) for i in range(procs)]
    for w in workers:
        w.start()
    done = [results.get() for _ in workers]
    for w in workers:
        w.join()
    n, wall, cpu = sum(d[0] for d in done), max(d[1] for d in done), sum(d[2] for d in done)
    return {"clips": n, "processes": procs, "seconds": wall, "clips_per_s": n / wall, "per_core": n / wall / procs,
            "cpu_s": cpu, "per_cpu_s": n / cpu}


def bench_pipeline(shard_dir: Path, args) -> dict:
    from shards.loader import build_loader
    from shards.stream import ShardStream

    # A training stream re-reads its shards until it has yielded samples_per_rank samples.
    stream = ShardStream(shard_dir, "bench", max_frames=args.max_frames, image_size=args.image_size,
                         sample_fps=args.sample_fps, training=True, seed=0, shuffle_buffer=1,
                         samples_per_rank=max(args.pipeline_clips, 4 * args.batch_size * max(1, args.workers)))
    loader = build_loader(stream, batch_size=args.batch_size, max_words=32, num_workers=args.workers,
                          training=True, seed=0, normalise=False)
    t0, cpu0 = time.perf_counter(), _cpu_s(children=True)
    first_at, first_n, clips = None, 0, 0
    for batch in loader:
        clips += batch["video"].shape[0]
        if first_at is None:
            first_at, first_n = time.perf_counter(), clips
            cpu_first = _cpu_s(children=True) + _live_children_cpu_s()
    dt = time.perf_counter() - t0
    # The workers have exited and been reaped by now, so RUSAGE_CHILDREN holds all of their CPU.
    cpu_end = _cpu_s(children=True)
    cpu, steady_cpu = cpu_end - cpu0, cpu_end - cpu_first if first_at is not None else cpu_end - cpu0
    steady_clips, steady_dt = clips - first_n, time.perf_counter() - (first_at or t0)
    cores = max(1, args.workers)
    steady = steady_clips / steady_dt if steady_clips and steady_dt > 0 else clips / dt
    return {"clips": clips, "workers": args.workers, "seconds": dt, "clips_per_s": clips / dt,
            "steady_clips_per_s": steady, "per_core": steady / cores, "first_batch_s": (first_at or t0) - t0,
            "cpu_s": cpu, "steady_cpu_s": steady_cpu,
            "per_cpu_s": steady_clips / steady_cpu if steady_clips and steady_cpu > 0 else clips / cpu,
            "skipped": {k: v for k, v in stream.counters.items() if v}}


# --- run -----------------------------------------------------------------------------------------
def _packings(args, transcode, frames, with_original: bool):
    out = [("original", None, None)] if with_original else []
    return out + [("transcoded", transcode, None), ("frames", None, frames)]


def bench_corpus(work: Path, args, cv2, transcode, frames, *, with_original: bool) -> dict:
    """Pack the corpus at ``work`` each way, then run (a) (original only), (b) and (c) on each."""
    manifest = work / "videos" / "bench.jsonl"
    results: dict = {}
    for name, spec, frame_spec in _packings(args, transcode, frames, with_original):
        shard_dir = work / f"shards-{name}"
        pack_s = pack(manifest, shard_dir, spec, workers=min(2, args.workers), shard_mb=args.shard_mb, frames=frame_spec)
        raws = _raw_samples(shard_dir)
        a = bench_opencv(raws, args) if cv2 and name == "original" else None
        b, c = bench_decord(raws, args), bench_pipeline(shard_dir, args)
        stored = sum(len(r.get("video", b"")) + sum(map(len, r.get("frames", []))) for r in raws)
        results[name] = {
            "pack_s": pack_s, "pack_s_per_clip": pack_s / len(raws), "transcode": spec.to_json() if spec else None,
            "frames": frame_spec.to_json() if frame_spec else None,
            "stored_mb": stored / 2**20, "bytes_per_clip": stored / len(raws),
            "raw_decoder": "decode_jpeg (libjpeg-turbo)" if frame_spec else "decord get_batch",
            "opencv_every_frame": a, "decord_get_batch": b, "pipeline": c,
            "pipeline_vs_decord_per_core": c["per_core"] / b["per_core"],
            "pipeline_vs_decord_per_cpu_s": c["per_cpu_s"] / b["per_cpu_s"],
        }
        if a:
            results[name]["pipeline_vs_opencv_per_core"] = c["per_core"] / a["per_core"]
            results[name]["pipeline_vs_opencv_per_cpu_s"] = c["per_cpu_s"] / a["per_cpu_s"]
    tc, fr = results["transcoded"], results["frames"]
    # the frame format against the video format at its fastest (transcoded), through the same pipeline
    results["frames_vs_video_per_core"] = fr["pipeline"]["per_core"] / tc["pipeline"]["per_core"]
    results["frames_vs_video_per_cpu_s"] = fr["pipeline"]["per_cpu_s"] / tc["pipeline"]["per_cpu_s"]
    results["frames_vs_video_bytes"] = fr["bytes_per_clip"] / tc["bytes_per_clip"]
    if "original" in results:
        results["frames_vs_original_bytes"] = fr["bytes_per_clip"] / results["original"]["bytes_per_clip"]
    return results


def run(args: argparse.Namespace) -> dict:
    """The bench measures on one thread; the caller's threads and environment are put back after
    (run in-process by the tests, it once left pytest single-threaded for every later test)."""
    import torch

    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp


def _run(args: argparse.Namespace) -> dict:
    import torch

    from shards.probe import FrameSpec, Transcode

    try:
        import cv2
    except ImportError:  # (a) needs the `bench` extra; (b) and (c) still run
        cv2 = None
    torch.set_num_threads(1)  # per-core numbers: every measured process decodes on one thread
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.quick:
        args.clips, args.seconds, args.pipeline_clips, args.batch_size = 3, 6.0, 16, 4
        args.long_clips, args.long_seconds, args.long_max_frames = min(args.long_clips, 2), 20.0, 16
    # Short side = the model's input size: the CLIP transform then only crops and normalises.
    fields = [int(v) for v in (args.transcode or f"{args.image_size},8,8").split(",")]
    short_side, fps, gop, fastdecode = (fields + [1])[:4]
    transcode = Transcode(short_side=short_side, fps=fps, gop=gop, fastdecode=bool(fastdecode))
    frames = FrameSpec(fps=args.sample_fps, short_side=args.image_size, quality=args.frames_quality)
    with tempfile.TemporaryDirectory(prefix="decode-bench-") as tmp:
        work = args.work_dir or Path(tmp)
        t0 = time.perf_counter()
        make_corpus(work / "clips" / "videos", args)
        generate_s = time.perf_counter() - t0
        results: dict = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                       if k not in ("run", "out")},
            "reference_decoder": (f"opencv {cv2.__version__} (cv2.VideoCapture, every frame)" if cv2 else
                                  "skipped: OpenCV is not installed (pip install -e '.[bench]')"),
            "generate_s": generate_s,
        }
        results.update(bench_corpus(work / "clips", args, cv2, transcode, frames, with_original=True))
        orig, tc = results["original"], results["transcoded"]
        if cv2:
            for unit in ("per_core", "per_cpu_s"):
                results[f"transcoded_pipeline_vs_original_opencv_{unit}"] = (
                    tc["pipeline"][unit] / orig["opencv_every_frame"][unit])
        if args.long_clips:
            # ActivityNet-length clips at 64 frames: the original (long-GOP) path is left out, it
            # decodes nearly every frame of 2-3 minutes per clip.
            short = (args.max_frames, args.pipeline_clips)
            args.max_frames, args.pipeline_clips = args.long_max_frames, max(2 * args.batch_size, args.long_clips)
            make_corpus(work / "long" / "videos", args, clips=args.long_clips, seconds=args.long_seconds)
            results["long"] = bench_corpus(work / "long", args, None, transcode, frames, with_original=False)
            results["long"]["seconds"], results["long"]["max_frames"] = args.long_seconds, args.long_max_frames
            args.max_frames, args.pipeline_clips = short
    results["load_average"] = os.getloadavg()
    _print_table(results)
    return results


def _print_table(r: dict) -> None:
    print(f"{'':<16} {'clips/s per core (wall)':^43} | {'clips per CPU second':^43} | {'KB/clip':>8} {'pack s/clip':>11}")
    cols = f"{'(a) opencv':>10} {'(b) raw':>10} {'(c) ours':>9} {'c/a':>5} {'c/b':>5}"
    print(f"{'shards':<16} {cols} | {cols} |")
    rows = [(name, r[name]) for name in ("original", "transcoded", "frames")]
    if "long" in r:
        rows += [(f"{name} {r['long']['max_frames']}f", r["long"][name]) for name in ("transcoded", "frames")]
    for name, x in rows:
        row = []
        for unit in ("per_core", "per_cpu_s"):
            b, c = x["decord_get_batch"][unit], x["pipeline"][unit]
            if x["opencv_every_frame"]:
                a = x["opencv_every_frame"][unit]
                row.append(f"{a:>10.2f} {b:>10.2f} {c:>9.2f} {c / a:>5.2f} {c / b:>5.2f}")
            else:
                row.append(f"{'-':>10} {b:>10.2f} {c:>9.2f} {'-':>5} {c / b:>5.2f}")
        print(f"{name:<16} {row[0]} | {row[1]} | {x['bytes_per_clip'] / 1024:>8.1f} {x['pack_s_per_clip']:>11.3f}")
    print(f"frames vs transcoded video through the pipeline: {r['frames_vs_video_per_core']:.2f}x per core, "
          f"{r['frames_vs_video_per_cpu_s']:.2f}x per CPU second, {r['frames_vs_video_bytes']:.2f}x the bytes"
          + (f"; {r['long']['max_frames']} frames of {r['long']['seconds']:g} s: {r['long']['frames_vs_video_per_core']:.2f}x "
             f"per core, {r['long']['frames_vs_video_bytes']:.2f}x the bytes" if "long" in r else ""))
    if "transcoded_pipeline_vs_original_opencv_per_core" in r:
        print(f"transcoded (c) vs original (a): {r['transcoded_pipeline_vs_original_opencv_per_core']:.2f}x wall "
              f"per core, {r['transcoded_pipeline_vs_original_opencv_per_cpu_s']:.2f}x per CPU second")
    else:
        print(f"(a) {r['reference_decoder']}")
    print(f"load average during the run: {' '.join(f'{v:.1f}' for v in r['load_average'])} on {os.cpu_count()} cores")
