"""Stream bench: the same packed shards read from local disk and from an S3 endpoint on loopback
(moto's server, started here), decoded as training decodes them; clips/s and peak memory per
reader (each reader a fresh process: its ``ru_maxrss``), as ratios remote / local.

    python launch/bench.py stream [--clips 96] [--size 64] [--repeats 3]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

READER = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from shards.stream import ShardStream
from shards.tarread import shard_samples
from shards.index import read_index
from shards.storage import join
shards, split, decode = sys.argv[2], sys.argv[3], sys.argv[4] == "1"
def samples():
    if decode:
        yield from ShardStream(shards, split, max_frames=8, image_size=64, training=False)
        return
    for entry in read_index(shards, split)["shards"]:
        yield from shard_samples(join(shards, entry["name"]), entry["name"], entry["samples"], lambda k: None)
started, first, n = time.perf_counter(), None, 0
for _ in samples():
    n += 1
    first = first or time.perf_counter()
elapsed = time.perf_counter() - started
print(json.dumps({"clips": n, "s": elapsed, "first_s": first - started, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def add_parser(sub):
    parser = sub.add_parser("stream", help="clips/s and memory per reader: loopback S3 vs local disk")
    parser.add_argument("--clips", type=int, default=96)
    parser.add_argument("--size", type=int, default=64, help="clip side in pixels")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3, help="runs per (source, mode); the median is kept")
    parser.add_argument("--shard-mb", type=int, default=4)
    return parser


def _read(shards: str, decode: bool, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", READER, str(REPO), shards, "bench", "1" if decode else "0"],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args) -> dict:
    from moto.server import ThreadedMotoServer

    from shards.manifest import ManifestCorpus
    from shards.synthetic import generate_synthetic_corpus
    from shards.writer import pack_split

    tmp = Path(tempfile.mkdtemp(prefix="streambench-"))
    generate_synthetic_corpus(tmp / "corpus", n_train=args.clips, n_test=1, seed=0, size=args.size, fps=8,
                              seconds=args.seconds, captions_per_video=1)
    rows = ManifestCorpus(tmp / "corpus" / "train.jsonl", corpus="bench").samples("bench")
    local = tmp / "shards"
    pack_split(rows, local, "bench", shard_bytes=args.shard_mb * 2**20, progress=False)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = dict(os.environ, AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench",
               AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1", OMP_NUM_THREADS="1")
    os.environ.update({k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                           "AWS_DEFAULT_REGION")})
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        for path in sorted(local.iterdir()):
            fs.put_file(str(path), f"bench/shards/{path.name}")
        remote = "s3://bench/shards"
        results: dict = {"clips": args.clips, "size": args.size, "seconds": args.seconds,
                         "shard_bytes": sum(p.stat().st_size for p in local.glob("*.tar"))}
        for mode, decode in (("read", False), ("decode", True)):
            for name, shards in (("local", str(local)), ("s3", remote)):
                runs = sorted((_read(shards, decode, env) for _ in range(args.repeats)), key=lambda r: r["s"])
                best = runs[len(runs) // 2]
                # steady: after the first clip (index read, client and connection set up once per reader)
                results[f"{mode}_{name}"] = {"clips_per_s": round(best["clips"] / best["s"], 1),
                                             "steady_clips_per_s": round((best["clips"] - 1) / (best["s"] - best["first_s"]), 1),
                                             "first_clip_s": round(best["first_s"], 3),
                                             "maxrss_mb": round(best["maxrss_mb"], 1), "clips": best["clips"]}
            for kind in ("clips_per_s", "steady_clips_per_s"):
                prefix = "" if kind == "clips_per_s" else "steady_"
                results[f"{mode}_{prefix}ratio_s3_over_local"] = round(
                    results[f"{mode}_s3"][kind] / results[f"{mode}_local"][kind], 3)
    finally:
        server.stop()
    for mode in ("read", "decode"):
        loc, rem = results[f"{mode}_local"], results[f"{mode}_s3"]
        print(f"{mode:6s} local {loc['clips_per_s']:8.1f} clips/s ({loc['maxrss_mb']:.0f} MB)   "
              f"s3 {rem['clips_per_s']:8.1f} clips/s ({rem['maxrss_mb']:.0f} MB)   "
              f"ratio {results[f'{mode}_ratio_s3_over_local']:.2f}x; after the first clip (local "
              f"{loc['first_clip_s']:.2f} s, s3 {rem['first_clip_s']:.2f} s to it) "
              f"{results[f'{mode}_steady_ratio_s3_over_local']:.2f}x")
    results["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return results
