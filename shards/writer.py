"""Pack a stream of ``VideoSample | Quarantined`` records into WebDataset tar shards.

Each sample becomes the tar members ``<key>.<ext>`` (the container's own extension: mp4, mkv,
webm, avi, ...) and ``<key>.json``. Output order is input order. Everything is written under a
temporary directory first; the old index is removed before the new shards move in and the new
index moves in last, so a crash at any point leaves either the previous complete split or no
index at all, never a half one. A temporary directory left by a killed pack is removed by the next.

A split that packs nothing, or loses more than ``max_quarantine`` of its rows, is refused
(:class:`PackRefused`, no index written): an index of what little survived would read as
"already packed" to the next run. Every row in is accounted for: packed + quarantined.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import webdataset as wds
from tqdm import tqdm

from shards import storage
from shards.index import index_path, sha256_file
from shards.pack_pool import prepared
from shards.probe import FrameSpec, Transcode
from shards.sample import Quarantined, VideoSample


class PackRefused(ValueError):
    """A split packed nothing, or lost more of its rows than ``max_quarantine`` allows."""


@dataclass
class PackReport:
    split: str
    packed: int
    quarantined: int
    shards: int
    out_dir: Path
    reasons: dict[str, int] = field(default_factory=dict)
    executor: str = "probed in-process"  # where probing/transcoding ran
    rows: int = 0  # annotation rows in: rows packed (several can make one sample) + quarantined
    packed_rows: int = 0

    def __str__(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items()))
        merged = f" (as {self.packed} samples)" if self.packed_rows != self.packed else ""
        return (f"{self.split}: {self.rows} rows in = {self.packed_rows} packed{merged} + {self.quarantined} "
                f"quarantined" + (f" ({why})" if why else "") + f"; {self.shards} shards in {storage.redact(str(self.out_dir))}; "
                f"{self.executor}")


def _top_reasons(reasons: dict[str, int], n: int = 3) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])[:n])


def _fix_for(reasons: dict[str, int]) -> str:
    top = max(reasons, key=reasons.get) if reasons else ""
    if top in ("video missing", "ambiguous video"):
        return "set data.video_dir to the folder holding the videos (absolute, or relative to data.root)"
    if top in ("unreadable video", "not decodable by decord"):
        return "re-download the videos, or set data.pack.transcode_short_side=256 to re-encode them"
    return "fix the rows listed in the log"


def refusal(split: str, rows: int, quarantine: list[Quarantined], reasons: dict[str, int], limit: float,
             log: Path) -> PackRefused:
    tried = [q.source for q in quarantine[:3]]
    share = len(quarantine) / max(rows, 1)
    return PackRefused(
        f"split '{split}': {len(quarantine)} of {rows} rows quarantined ({share:.0%} > data.pack.max_quarantine="
        f"{limit:g}): {_top_reasons(reasons)}; first: {', '.join(tried) or 'none'}; all in {log}. Fix: "
        f"{_fix_for(reasons)} (or raise data.pack.max_quarantine to accept the loss). No index was written.")


def _remove_stale_tmp(out_dir: Path, split: str) -> None:
    """Temporary folders of packs of this split that were killed (their process is gone)."""
    for tmp in out_dir.glob(f".packing-{split}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        alive = False
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                alive = True
            except ProcessLookupError:
                pass
            except PermissionError:  # someone else's live process
                alive = True
        if not alive:
            shutil.rmtree(tmp, ignore_errors=True)


def _member_bytes(n: int) -> int:
    """A tar member: one 512-byte header plus its data padded to 512 bytes."""
    return 512 + -(-n // 512) * 512


def _archive_bytes(members: int) -> int:
    """A tar file: its members, two zero blocks, padded to the 10 KiB record size."""
    return -(-(members + 1024) // 10240) * 10240


class _ShardSink:
    """Tar writer that starts a new shard before a sample would push the current one over
    ``shard_bytes`` (a single oversized sample still gets a shard of its own)."""

    def __init__(self, tmp_dir: Path, split: str, shard_bytes: int, remote: str = "") -> None:
        self.tmp_dir, self.split, self.shard_bytes = tmp_dir, split, shard_bytes
        self.remote = remote  # object storage: each finished shard is uploaded as one object, then dropped here
        self.shards: list[dict] = []
        self._writer: wds.TarWriter | None = None
        self._bytes = 0

    def write(self, key: str, meta: dict, members: dict[str, bytes]) -> None:
        payload = json.dumps(meta).encode("utf-8")
        size = sum(_member_bytes(len(data)) for data in members.values()) + _member_bytes(len(payload))
        if self._writer is not None and _archive_bytes(self._bytes + size) > self.shard_bytes:
            self._close()
        if self._writer is None:
            name = f"{self.split}-{len(self.shards):06d}.tar"
            self.shards.append({"name": name, "samples": 0})
            # A fixed integer mtime keeps members to a single 512-byte header (a float mtime costs a
            # PAX header each) and makes shards byte-identical across re-packs.
            self._writer = wds.TarWriter(str(self.tmp_dir / name), mtime=0)
            self._bytes = 0
        self._writer.write({"__key__": key, "json": payload, **members})
        self.shards[-1]["samples"] += 1
        self._bytes += size

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            path = self.tmp_dir / self.shards[-1]["name"]
            self.shards[-1].update(bytes=path.stat().st_size, sha256=sha256_file(path))
            if self.remote:
                storage.upload(path, storage.join(self.remote, path.name))
                path.unlink()

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
    max_quarantine: float = 0.25,
    frames: FrameSpec | None = None,
) -> PackReport:
    """Probe/transcode every sample, write ``<split>-NNNNNN.tar`` shards, ``<split>.index.json``
    and ``<split>.quarantine.jsonl`` (always written, possibly empty) into ``out_dir``. The probing
    runs in ``workers`` processes, or as Ray tasks on ``ray_address``; the output is identical.
    ``frames``: store each clip as JPEG frames (``shards.frames``) instead of its video bytes.
    Raises :class:`PackRefused` (writing ``<split>.refused.jsonl`` instead of an index) when
    nothing packed or more than ``max_quarantine`` of the rows were quarantined."""
    remote = str(out_dir) if storage.is_url(out_dir) else ""
    if remote:  # objects cannot be renamed: shards go up one by one as they close, the index last
        tmp_dir = Path(tempfile.mkdtemp(prefix=f"streamret-pack-{split}-"))
        storage.remove(str(index_path(remote, split)))  # from here until the upload of the new one: "not packed"
    else:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(out_dir, split)
        tmp_dir = out_dir / f".packing-{split}-{os.getpid()}"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir()
    sink = _ShardSink(tmp_dir, split, shard_bytes, remote)
    quarantine: list[Quarantined] = []
    seen_keys: set[str] = set()
    corpora: set[str] = set()
    packed_rows = 0
    refused: PackRefused | None = None
    try:
        bar = tqdm(prepared(records, workers, transcode, ray_address, frames), desc=f"pack {split}", unit="video", disable=not progress)
        for item in bar:
            if isinstance(item, Quarantined):
                quarantine.append(item)
                continue
            meta, members, key, rows = item
            if key in seen_keys:
                quarantine.append(Quarantined(meta.get("video_id", key), "duplicate key", meta.get("video_id"),
                                              {"key": key}))
                continue
            seen_keys.add(key)
            corpora.add(meta.get("corpus", ""))
            sink.write(key, meta, members)
            packed_rows += rows
        shards = sink.close()
        total = sum(s["samples"] for s in shards)
        reasons: dict[str, int] = {}
        for q in quarantine:
            reasons[q.reason] = reasons.get(q.reason, 0) + 1
        rows_in = packed_rows + len(quarantine)
        index = {
            "split": split,
            "corpus": ",".join(sorted(c for c in corpora if c)) or None,
            "total_samples": total,
            "shards": shards,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "transcode": transcode.to_json() if transcode else None,
            "format": "frames" if frames else "video",
            **({"frames": frames.to_json()} if frames else {}),
        }
        if total == 0 or len(quarantine) > max_quarantine * rows_in:
            log = tmp_dir / f"{split}.refused.jsonl"
            write_quarantine(log, quarantine)
            storage.write_bytes(storage.join(out_dir, log.name), log.read_bytes())
            refused = refusal(split, rows_in, quarantine, reasons, max_quarantine,
                              storage.redact(storage.join(out_dir, log.name)))
        else:
            write_quarantine(tmp_dir / f"{split}.quarantine.jsonl", quarantine)
            (tmp_dir / f"{split}.index.json").write_text(json.dumps(index, indent=1))
            if remote:
                _publish_remote(tmp_dir, remote, split, [s["name"] for s in shards])
            else:
                _publish(tmp_dir, out_dir, split, [s["name"] for s in shards])
                (out_dir / f"{split}.refused.jsonl").unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    if refused is not None:
        raise refused
    executor = (f"probed as Ray tasks ({ray_address})" if ray_address
                else f"probed in {workers} processes" if workers > 0 else "probed in-process")
    return PackReport(split, total, len(quarantine), len(shards), out_dir, reasons, executor, rows_in, packed_rows)


def write_quarantine(path: Path, quarantine: list[Quarantined]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for q in quarantine:
            f.write(json.dumps(q.to_json(), default=str) + "\n")


def _publish_remote(tmp_dir: Path, remote: str, split: str, names: list[str]) -> None:
    """The shards are up already; stale shards of an earlier pack go, the quarantine log, then the index."""
    fs, root = storage.filesystem(remote)
    for stale in fs.glob(f"{root.rstrip('/')}/{split}-*.tar"):
        if stale.rsplit("/", 1)[-1] not in names:
            fs.rm_file(stale)
    for name in (f"{split}.quarantine.jsonl", f"{split}.index.json"):  # the index last: it makes the split visible
        storage.upload(tmp_dir / name, storage.join(remote, name))


def _publish(tmp_dir: Path, out_dir: Path, split: str, names: list[str]) -> None:
    index = index_path(out_dir, split)
    index.unlink(missing_ok=True)  # from here until the last replace, the split reads as "not packed"
    for stale in out_dir.glob(f"{split}-*.tar"):
        if stale.name not in names:
            stale.unlink()
    for name in [*names, f"{split}.quarantine.jsonl"]:
        os.replace(tmp_dir / name, out_dir / name)
    os.replace(tmp_dir / index.name, index)
