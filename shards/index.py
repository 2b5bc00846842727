"""The per-split shard index (``<split>.index.json``): reading it with actionable errors, and
re-verifying the shards it lists."""
from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from shards import storage


class ShardsNotFound(FileNotFoundError):
    """No usable index for a split: it was never packed, or packing failed."""


def index_path(shard_dir: str | Path, split: str) -> Path | str:
    """``<shard_dir>/<split>.index.json``: a Path for a local folder, the URL for object storage."""
    location = storage.join(shard_dir, f"{split}.index.json")
    return location if storage.is_url(location) else Path(location)


def read_index(shard_dir: str | Path, split: str) -> dict:
    """The index dict; raises ``ShardsNotFound`` naming the path and how to create it."""
    path = index_path(shard_dir, split)
    shown = storage.redact(str(path))
    fix = f"run `python launch/pack.py` for split '{split}' with its output dir set to {storage.redact(str(shard_dir))}"
    try:
        raw = storage.read_bytes(path)
    except (FileNotFoundError, NotADirectoryError):
        raise ShardsNotFound(f"no shard index at {shown}: split '{split}' was never packed there; {fix}") from None
    try:
        index = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise ShardsNotFound(f"shard index {shown} is not valid JSON ({exn}); {fix}") from exn
    if not index.get("shards") or int(index.get("total_samples", 0)) <= 0:
        raise ShardsNotFound(
            f"shard index {shown} lists 0 samples: every row of split '{split}' was quarantined; "
            f"read {storage.redact(storage.join(shard_dir, f'{split}.quarantine.jsonl'))} for the reasons, fix the "
            f"corpus, then {fix}"
        )
    return index


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with (storage.open_stream(str(path)) if storage.is_url(path) else open(path, "rb")) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def count_tar_samples(path: str | Path) -> int:
    """Distinct keys in a tar (a sample is several members sharing the key before the first dot)."""
    from shards.tarread import tar_members

    keys: list[str] = []
    for member in tar_members(path, str(path)):
        key = member["fname"].split("/")[-1].split(".", 1)[0]
        if not keys or keys[-1] != key:
            keys.append(key)
    return len(keys)


@dataclass
class VerifyReport:
    split: str
    shards_checked: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        state = "OK" if self.ok else f"{len(self.problems)} problem(s): " + "; ".join(self.problems)
        return f"verify {self.split}: {self.shards_checked} shards, {self.samples} samples, {state}"


def verify_split(shard_dir: Path, split: str) -> VerifyReport:
    """Re-read every shard the index lists, recount its samples and recompute its sha256."""
    index = read_index(shard_dir, split)
    report = VerifyReport(split)
    for entry in index["shards"]:
        path = storage.join(shard_dir, entry["name"])
        report.shards_checked += 1
        if not storage.exists(path):
            report.problems.append(f"{storage.redact(path)}: missing")
            continue
        if "sha256" in entry:  # shards indexed in place (shards.external) are not hashed: that is a full read
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                report.problems.append(f"{path}: sha256 {digest[:12]} != index {entry['sha256'][:12]}")
        try:
            n = count_tar_samples(path)
        except (tarfile.TarError, OSError, EOFError) as exn:
            report.problems.append(f"{path}: unreadable tar ({exn})")
            continue
        expected = entry.get("keys", entry["samples"])  # keys: every sample, usable or not (shards.external)
        report.samples += n if "keys" not in entry else entry["samples"] * (n == expected)
        if n != expected:
            report.problems.append(f"{path}: {n} samples, index says {expected}")
    if report.samples != index["total_samples"] and not report.problems:
        report.problems.append(f"{report.samples} samples in shards, index total says {index['total_samples']}")
    return report


