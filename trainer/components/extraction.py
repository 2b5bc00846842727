"""Encode a split once across ranks into the on-disk feature store, and open it memory-mapped.

Every rank calls :func:`extract_split` with the same arguments. The split's shards are cut into
parts of ``data.num_workers`` consecutive shards (one per loader worker); rank r encodes parts
r, r + W, ... and skips any part a killed earlier extraction completed; rank 0 concatenates
them in shard order and writes the index last; then every rank maps the bank.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

import torch

from shards.tokenize import CaptionTokenizer
from trainer.components import feature_store as store
from trainer.components.distributed import DistInfo, barrier
from trainer.components.features import FeatureBank, encoded_batches

log = logging.getLogger(__name__)


def split_parts(shard_names: list[str], shards_per_part: int) -> list[list[str]]:
    n = max(1, shards_per_part)
    return [shard_names[i:i + n] for i in range(0, len(shard_names), n)]


def extract_split(encoder, *, shard_names: list[str], loader_for: Callable[[list[str]], object], max_words: int,
                  shards_per_part: int, root: Path, key: dict, dtype: torch.dtype, dist: DistInfo, desc: str,
                  progress: bool, total_samples: int, reuse: bool = True) -> FeatureBank:
    """The bank of ``key`` at ``root``, encoded first unless a complete one is there (``reuse``).
    ``loader_for(shards)`` is an eval-mode loader over those shards of the split."""
    if dist.is_main and not reuse:
        shutil.rmtree(root, ignore_errors=True)
    barrier()
    index = store.read_index(root)
    if index is not None and index["key"] == key:
        return store.open_bank(root, dist.device)
    parts = split_parts(shard_names, shards_per_part)
    tokenizer = CaptionTokenizer(max_words)
    encoded = 0
    for p in range(dist.rank, len(parts), dist.world_size):
        path = root / "parts" / f"{p:05d}"
        if store.read_part(path, parts[p]) is not None:
            continue  # done by an earlier, interrupted extraction
        loader = loader_for(parts[p])
        batches = encoded_batches(encoder, loader, tokenizer, dist.device, torch.float32,
                                  f"{desc} part {p + 1}/{len(parts)}", progress)
        store.write_part(path, batches, dtype, parts[p], dist.rank, lambda: dict(loader.counters))
        encoded += 1
    log.info("%s: rank %d encoded %d of %d parts", desc, dist.rank, encoded, len(parts))
    barrier()
    if dist.is_main:
        metas = []
        for p, shards in enumerate(parts):
            meta = store.read_part(root / "parts" / f"{p:05d}", shards)
            if meta is None:
                raise RuntimeError(f"{root}/parts/{p:05d}: part missing after every rank finished; extract again")
            metas.append({**meta, "dir": f"{p:05d}"})
        store.assemble(root, metas, key, dtype, total_samples)
    barrier()
    return store.open_bank(root, dist.device)
