"""The per-split shard index (``<split>.index.json``): reading it with actionable errors, and
re-verifying the shards it lists."""
from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path


class ShardsNotFound(FileNotFoundError):
    """No usable index for a split: it was never packed, or packing failed."""


def index_path(shard_dir: Path, split: str) -> Path:
    return Path(shard_dir) / f"{split}.index.json"


def read_index(shard_dir: Path, split: str) -> dict:
    """The index dict; raises ``ShardsNotFound`` naming the path and how to create it."""
    path = index_path(shard_dir, split)
    fix = f"run `python launch/pack.py` for split '{split}' with its output dir set to {Path(shard_dir)}"
    if not path.is_file():
        raise ShardsNotFound(f"no shard index at {path}: split '{split}' was never packed there; {fix}")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as exn:
        raise ShardsNotFound(f"shard index {path} is not valid JSON ({exn}); {fix}") from exn
    if not index.get("shards") or int(index.get("total_samples", 0)) <= 0:
        raise ShardsNotFound(
            f"shard index {path} lists 0 samples: every row of split '{split}' was quarantined; "
            f"read {Path(shard_dir) / f'{split}.quarantine.jsonl'} for the reasons, fix the corpus, then {fix}"
        )
    return index


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def count_tar_samples(path: Path) -> int:
    """Distinct keys in a tar (a sample is several members sharing the key before the first dot)."""
    keys: list[str] = []
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            if member.isreg():
                key = member.name.split("/")[-1].split(".", 1)[0]
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
        path = Path(shard_dir) / entry["name"]
        report.shards_checked += 1
        if not path.is_file():
            report.problems.append(f"{path}: missing")
            continue
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            report.problems.append(f"{path}: sha256 {digest[:12]} != index {entry['sha256'][:12]}")
        try:
            n = count_tar_samples(path)
        except (tarfile.TarError, OSError, EOFError) as exn:
            report.problems.append(f"{path}: unreadable tar ({exn})")
            continue
        report.samples += n
        if n != entry["samples"]:
            report.problems.append(f"{path}: {n} samples, index says {entry['samples']}")
    if report.samples != index["total_samples"] and not report.problems:
        report.problems.append(f"{report.samples} samples in shards, index total says {index['total_samples']}")
    return report


