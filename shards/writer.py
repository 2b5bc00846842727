"""Pack a stream of ``VideoSample | Quarantined`` records into WebDataset tar shards.

Each sample becomes the tar members ``<key>.mp4`` and ``<key>.json``. Output order is input
order. Everything is written under a temporary directory first; the old index is removed
before the new shards move in and the new index moves in last, so a crash at any point leaves
either the previous complete split or no index at all, never a half one.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
import warnings
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import webdataset as wds
from tqdm import tqdm

from shards.index import index_path, sha256_file
from shards.probe import Transcode, prepare_sample
from shards.sample import Quarantined, VideoSample


@dataclass
class PackReport:
    split: str
    packed: int
    quarantined: int
    shards: int
    out_dir: Path
    reasons: dict[str, int] = field(default_factory=dict)
    executor: str = "in-process"  # where probing/transcoding ran

    def __str__(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items()))
        return (f"{self.split}: packed {self.packed} samples into {self.shards} shards in {self.out_dir}, "
                f"quarantined {self.quarantined}" + (f" ({why})" if why else "") + f"; probed {self.executor}")


class _RayTasks:
    """The executor interface of ``ProcessPoolExecutor`` (``submit`` -> a future with ``result``)
    on Ray tasks, so the same bounded, in-order loop packs on a Ray cluster."""

    def __init__(self, address: str) -> None:
        import ray

        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            ray.init(address=None if address == "local" else address, include_dashboard=False,
                     log_to_driver=False)
        self._task = ray.remote(prepare_sample)

    def submit(self, fn, *args) -> "_RayFuture":
        return _RayFuture(self._ray, self._task.remote(*args))

    def __enter__(self) -> "_RayTasks":
        return self

    def __exit__(self, *exc) -> None:
        if self._started:
            self._ray.shutdown()


class _RayFuture:
    def __init__(self, ray, ref) -> None:
        self._ray, self._ref = ray, ref

    def result(self):
        return self._ray.get(self._ref)


def _prepared(
    records: Iterable[VideoSample | Quarantined], workers: int, transcode: Transcode | None,
    ray_address: str = "",
) -> Iterator[tuple[dict, bytes, str] | Quarantined]:
    """Probe (and transcode) samples, in order, with at most ``4 * workers`` in flight so memory
    stays bounded however long the corpus is: in ``workers`` local processes, or as Ray tasks
    when ``ray_address`` names a cluster ("local" starts one in-process, "auto" joins the running one)."""
    def finish(item: VideoSample, out) -> tuple[dict, bytes, str] | Quarantined:
        return out if isinstance(out, Quarantined) else (out[0], out[1], item.key)

    if workers <= 0 and not ray_address:
        for record in records:
            yield record if isinstance(record, Quarantined) else finish(record, prepare_sample(record, transcode))
        return
    workers = max(workers, 1)
    # spawn, not fork: the parent may hold torch / decord threads that fork would copy mid-lock.
    executor = (_RayTasks(ray_address) if ray_address
                else ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")))
    with executor as pool:
        pending: deque[tuple[VideoSample | Quarantined, Future | None]] = deque()
        for record in records:
            future = None if isinstance(record, Quarantined) else pool.submit(prepare_sample, record, transcode)
            pending.append((record, future))
            while len(pending) > 4 * workers:
                rec, fut = pending.popleft()
                yield rec if fut is None else finish(rec, fut.result())
        while pending:
            rec, fut = pending.popleft()
            yield rec if fut is None else finish(rec, fut.result())


def _member_bytes(n: int) -> int:
    """A tar member: one 512-byte header plus its data padded to 512 bytes."""
    return 512 + -(-n // 512) * 512


def _archive_bytes(members: int) -> int:
    """A tar file: its members, two zero blocks, padded to the 10 KiB record size."""
    return -(-(members + 1024) // 10240) * 10240


class _ShardSink:
    """Tar writer that starts a new shard before a sample would push the current one over
    ``shard_bytes`` (a single oversized sample still gets a shard of its own)."""

    def __init__(self, tmp_dir: Path, split: str, shard_bytes: int) -> None:
        self.tmp_dir, self.split, self.shard_bytes = tmp_dir, split, shard_bytes
        self.shards: list[dict] = []
        self._writer: wds.TarWriter | None = None
        self._bytes = 0

    def write(self, key: str, meta: dict, mp4: bytes) -> None:
        payload = json.dumps(meta).encode("utf-8")
        size = _member_bytes(len(mp4)) + _member_bytes(len(payload))
        if self._writer is not None and _archive_bytes(self._bytes + size) > self.shard_bytes:
            self._close()
        if self._writer is None:
            name = f"{self.split}-{len(self.shards):06d}.tar"
            self.shards.append({"name": name, "samples": 0})
            # A fixed integer mtime keeps members to a single 512-byte header (a float mtime costs a
            # PAX header each) and makes shards byte-identical across re-packs.
            self._writer = wds.TarWriter(str(self.tmp_dir / name), mtime=0)
            self._bytes = 0
        self._writer.write({"__key__": key, "mp4": mp4, "json": payload})
        self.shards[-1]["samples"] += 1
        self._bytes += size

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            path = self.tmp_dir / self.shards[-1]["name"]
            self.shards[-1].update(bytes=path.stat().st_size, sha256=sha256_file(path))

    def close(self) -> list[dict]:
        self._close()
        return self.shards


def pack_split(
    records: Iterable[VideoSample | Quarantined],
    out_dir: Path,
    split: str,
    *,
    shard_bytes: int = 256 * 2**20,
    workers: int = 0,
    transcode: Transcode | None = None,
    progress: bool = True,
    ray_address: str = "",
) -> PackReport:
    """Probe/transcode every sample, write ``<split>-NNNNNN.tar`` shards, ``<split>.index.json``
    and ``<split>.quarantine.jsonl`` (always written, possibly empty) into ``out_dir``. The probing
    runs in ``workers`` processes, or as Ray tasks on ``ray_address``; the output is identical."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir / f".packing-{split}-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    sink = _ShardSink(tmp_dir, split, shard_bytes)
    quarantine: list[Quarantined] = []
    seen_keys: set[str] = set()
    corpora: set[str] = set()
    try:
        bar = tqdm(_prepared(records, workers, transcode, ray_address), desc=f"pack {split}", unit="video", disable=not progress)
        for item in bar:
            if isinstance(item, Quarantined):
                quarantine.append(item)
                continue
            meta, mp4, key = item
            if key in seen_keys:
                quarantine.append(Quarantined(meta.get("video_id", key), "duplicate key", meta.get("video_id"),
                                              {"key": key}))
                continue
            seen_keys.add(key)
            corpora.add(meta.get("corpus", ""))
            sink.write(key, meta, mp4)
        shards = sink.close()
        total = sum(s["samples"] for s in shards)
        index = {
            "split": split,
            "corpus": ",".join(sorted(c for c in corpora if c)) or None,
            "total_samples": total,
            "shards": shards,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "transcode": transcode.to_json() if transcode else None,
        }
        with open(tmp_dir / f"{split}.quarantine.jsonl", "w", encoding="utf-8") as f:
            for q in quarantine:
                f.write(json.dumps(q.to_json(), default=str) + "\n")
        (tmp_dir / f"{split}.index.json").write_text(json.dumps(index, indent=1))
        _publish(tmp_dir, out_dir, split, [s["name"] for s in shards])
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    if total == 0:
        warnings.warn(f"split '{split}': no sample could be packed; see {out_dir / f'{split}.quarantine.jsonl'}",
                      stacklevel=2)
    reasons: dict[str, int] = {}
    for q in quarantine:
        reasons[q.reason] = reasons.get(q.reason, 0) + 1
    executor = (f"as Ray tasks ({ray_address})" if ray_address
                else f"in {workers} processes" if workers > 0 else "in-process")
    return PackReport(split, total, len(quarantine), len(shards), out_dir, reasons, executor)


def _publish(tmp_dir: Path, out_dir: Path, split: str, names: list[str]) -> None:
    index = index_path(out_dir, split)
    index.unlink(missing_ok=True)  # from here until the last replace, the split reads as "not packed"
    for stale in out_dir.glob(f"{split}-*.tar"):
        if stale.name not in names:
            stale.unlink()
    for name in [*names, f"{split}.quarantine.jsonl"]:
        os.replace(tmp_dir / name, out_dir / name)
    os.replace(tmp_dir / index.name, index)
