"""Index WebDataset shards that streamret did not write (video2dataset's ``key.mp4`` + ``key.txt``
caption + ``key.json`` metadata, ``{00000..01234}.tar``) in place: ``<split>.index.json`` lists
each shard by absolute path with its exact count of usable samples, and records where captions
and ids are (:class:`shards.tarread.Members`), so ``ShardStream`` and the Ray source read the
shards as they are; nothing is unpacked or repacked.

Counting reads each tar once (headers, and every member of a sample: a caption can only be
checked by reading it). A sample without a video member or a caption is quarantined with its
shard and key, and the split is refused as ``pack_split`` refuses one (nothing usable, or more than
``max_quarantine`` of the samples lost).
"""
from __future__ import annotations

import json
import tarfile
import time
from pathlib import Path

import webdataset as wds
from braceexpand import braceexpand
from tqdm import tqdm

from shards.index import index_path
from shards.sample import Quarantined
from shards.storage import write_bytes
from shards.tarread import Members, tar_members
from shards.writer import PackReport, refusal, write_quarantine


class ShardListError(FileNotFoundError):
    """A shard pattern names no file, or a file that is not there."""


def expand_shards(pattern: str) -> list[Path]:
    """Brace-expanded (``{000..012}``), comma- or space-separated local shard paths; each must exist."""
    paths: list[Path] = []
    for part in pattern.replace(",", " ").split() if "{" not in pattern else [pattern]:
        paths.extend(Path(p).expanduser().absolute() for p in braceexpand(part))
    if not paths:
        raise ShardListError(f"shard pattern {pattern!r} names no file; e.g. /data/cc/{{00000..00099}}.tar")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ShardListError(f"{len(missing)} of {len(paths)} shards of {pattern!r} do not exist, first {missing[0]}; "
                             f"check the pattern (brace ranges are inclusive) and the path")
    return paths


def count_shard(path: Path, members: Members, quarantine: list[Quarantined]) -> tuple[int, int]:
    """(usable samples, all keys) of one shard; unusable samples go to ``quarantine``."""
    usable = keys = 0
    try:
        for sample in wds.tariterators.group_by_keys(tar_members(path, str(path))):
            keys += 1
            normal = members.normalise(sample)
            if isinstance(normal, str):
                quarantine.append(Quarantined(str(path), "incomplete sample", sample.get("__key__"), {"problem": normal}))
            else:
                usable += 1
    except (tarfile.TarError, OSError, EOFError, ValueError) as exn:
        quarantine.append(Quarantined(str(path), "unreadable shard", None,
                                      {"error": f"{type(exn).__name__}: {exn}", "samples_before": keys}))
    return usable, keys


def index_webdataset(pattern: str, out_dir: Path, split: str, members: Members, *, progress: bool = True,
                     max_quarantine: float = 0.25) -> PackReport:
    """Write ``<split>.index.json`` and ``<split>.quarantine.jsonl`` for the shards of ``pattern``
    into ``out_dir``; raises ``PackRefused`` as ``pack_split`` does."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = expand_shards(pattern)
    quarantine: list[Quarantined] = []
    shards = []
    for path in tqdm(paths, desc=f"index {split}", unit="shard", disable=not progress):
        usable, keys = count_shard(path, members, quarantine)
        if usable:
            shards.append({"name": str(path), "samples": usable, "keys": keys, "bytes": path.stat().st_size})
    total = sum(s["samples"] for s in shards)
    rows = total + len(quarantine)
    reasons: dict[str, int] = {}
    for q in quarantine:
        reasons[q.reason] = reasons.get(q.reason, 0) + 1
    if total == 0 or len(quarantine) > max_quarantine * rows:
        log = out_dir / f"{split}.refused.jsonl"
        write_quarantine(log, quarantine)
        raise refusal(split, rows, quarantine, reasons, max_quarantine, log)
    write_quarantine(out_dir / f"{split}.quarantine.jsonl", quarantine)
    index = {"split": split, "corpus": "webdataset", "total_samples": total, "shards": shards,
             "members": members.to_json(), "source": pattern, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "transcode": None}
    write_bytes(index_path(out_dir, split), json.dumps(index, indent=1).encode())  # atomic: tmp + replace
    (out_dir / f"{split}.refused.jsonl").unlink(missing_ok=True)
    return PackReport(split, total, len(quarantine), len(shards), out_dir, reasons, "indexed in place", rows, total)
