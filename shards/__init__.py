"""Pack corpora into WebDataset shards and stream them back as decoded, CLIP-ready batches.

Names are imported lazily: pack workers and corpus readers import ``shards.sample`` /
``shards.probe`` and should not pay for torch, decord and open_clip on start-up.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "CaptionTokenizer": "shards.tokenize",
    "ClipTransform": "shards.decode",
    "decode_frames": "shards.decode",
    "sample_frame_indices": "shards.decode",
    "ShardsNotFound": "shards.index",
    "VerifyReport": "shards.index",
    "read_index": "shards.index",
    "verify_split": "shards.index",
    "StreamLoader": "shards.loader",
    "build_loader": "shards.loader",
    "ManifestCorpus": "shards.manifest",
    "Transcode": "shards.probe",
    "Quarantined": "shards.sample",
    "VideoSample": "shards.sample",
    "sanitize_key": "shards.sample",
    "ShardStream": "shards.stream",
    "generate_synthetic_corpus": "shards.synthetic",
    "PackReport": "shards.writer",
    "pack_split": "shards.writer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'shards' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
