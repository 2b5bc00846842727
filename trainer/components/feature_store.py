"""A split's frozen-encoder features on disk, encoded once across ranks, read memory-mapped.

Layout of ``<cache_dir>/features-<key digest>/``::

    parts/00003/        one part = ``data.num_workers`` consecutive shards of the split, encoded
      <field>.bin       by rank ``part % world_size``, appended batch by batch (memory: one batch)
      part.json         written last: the part is complete (a killed extraction resumes by part)
    <field>.npy         the parts concatenated in shard order (rank 0, after every part is in)
    strings.json        video ids and captions, row-aligned with the tensors
    index.json          written last of all: a half-written bank is never read

Fields are numpy arrays (``np.load(mmap_mode="r")``): token features ragged, real tokens only
(``features.Tokens``), in ``store_dtype`` (fp16 by default for the train bank: a unit-norm
feature's fp16 rounding is 5e-4 relative); weights, norms and lengths in fp32 / int64. The row
order is the parts' shard order, so it does not depend on the number of ranks: 1 and 2 ranks
write the same bank. A reading rank's resident memory is what it gathers, plus the page cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from trainer.components.export import UnsafeFile
from trainer.components.features import EncodedBatch, FeatureBank, Tokens

FORMAT = 1
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# numpy has no bf16: bf16 arrays are stored as their int16 bit patterns and viewed back on read.
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16, torch.int64: np.int64}
# (field, dtype: "store" = the bank's store dtype) in file order; None-valued fields are skipped.
FIELDS = (("words", "store"), ("word_weights", torch.float32), ("word_lengths", torch.int64),
          ("sentence", "store"), ("sentence_norm", torch.float32), ("text_fused", "store"),
          ("text_to_video", torch.int64), ("frames", "store"), ("frame_weights", torch.float32),
          ("frame_norm", torch.float32), ("frame_lengths", torch.int64), ("video_fused", "store"),
          ("video_pooled", "store"))


def bank_dir(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"features-{digest}"


def store_dtype(name: str) -> torch.dtype:
    if name not in STORE_DTYPES:
        raise ValueError(f"feature store dtype must be one of {sorted(STORE_DTYPES)}, got {name!r}")
    return STORE_DTYPES[name]


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def batch_fields(b: EncodedBatch, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One encoded batch as the store's flat fields (``text_to_video`` local to the batch)."""
    words = Tokens.from_padded(b.text.words, b.text.weights, b.text.mask)
    frames = Tokens.from_padded(b.video.frames, b.video.weights, b.video.mask, b.video.frame_norm)
    out = {"words": words.x.to(dtype), "word_weights": words.weights, "word_lengths": words.lengths(),
           "sentence": b.text.sentence.to(dtype), "sentence_norm": b.text.sentence_norm,
           "text_fused": None if b.text.fused is None else b.text.fused.to(dtype),
           "text_to_video": torch.repeat_interleave(torch.arange(len(b.captions)),
                                                    torch.tensor([len(c) for c in b.captions])),
           "frames": frames.x.to(dtype), "frame_weights": frames.weights, "frame_norm": frames.norm,
           "frame_lengths": frames.lengths(), "video_fused": None if b.video.fused is None else b.video.fused.to(dtype),
           "video_pooled": b.video.pooled().to(dtype)}
    return {k: v for k, v in out.items() if v is not None}


def write_part(path: Path, batches: Iterable[EncodedBatch], dtype: torch.dtype, shards: list[str], rank: int,
               counters: Callable[[], dict[str, int]]) -> dict:
    """Append every batch's fields to ``path``'s .bin files, then write part.json (the part is complete)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files, shapes, video_ids, captions, widths, started = {}, {}, [], [], {}, time.time()
    try:
        for b in batches:
            for name, t in batch_fields(b, dtype).items():
                if name == "text_to_video":
                    t = t + len(video_ids)
                if name not in files:
                    files[name] = open(tmp / f"{name}.bin", "wb")
                    shapes[name] = [0, *t.shape[1:]]
                files[name].write(_numpy(t).tobytes())
                shapes[name][0] += t.shape[0]
            video_ids.extend(b.video_ids)
            captions.extend(c for caps in b.captions for c in caps)
            widths = {"text": b.text.words.shape[1], "video": b.video.frames.shape[1]}
    finally:
        for f in files.values():
            f.close()
    meta = {"shards": shards, "rank": rank, "videos": len(video_ids), "texts": len(captions), "shapes": shapes,
            "widths": widths,
            "seconds": round(time.time() - started, 3), "counters": counters(), "video_ids": video_ids,
            "captions": captions}
    (tmp / "part.json").write_text(json.dumps(meta))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return meta


def read_part(path: Path, shards: list[str]) -> dict | None:
    """A complete part's metadata, or None (absent, half-written, or made of other shards)."""
    try:
        meta = json.loads((path / "part.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return meta if meta.get("shards") == shards else None


def assemble(root: Path, parts: list[dict], key: dict, dtype: torch.dtype, total_samples: int) -> None:
    """Concatenate the complete parts (in order) into one .npy per field, then write index.json."""
    widths = next((p["widths"] for p in parts if p["widths"]), None)
    if widths is None:
        raise RuntimeError(f"{root}: no part yielded a sample; check the split's shards and quarantine log")
    fields = {}
    for name, kind in FIELDS:
        present = [p for p in parts if name in p["shapes"]]
        if not present:
            continue
        tdtype = dtype if kind == "store" else kind
        trailing = present[0]["shapes"][name][1:]
        rows = sum(p["shapes"][name][0] for p in present)
        out = np.lib.format.open_memmap(root / f"{name}.npy", mode="w+", dtype=_NUMPY[tdtype], shape=(rows, *trailing))
        at, videos_before = 0, 0
        for p in parts:
            n = p["shapes"].get(name, [0])[0]
            if n:
                chunk = np.fromfile(root / "parts" / p["dir"] / f"{name}.bin", dtype=_NUMPY[tdtype]).reshape(n, *trailing)
                out[at:at + n] = chunk + videos_before if name == "text_to_video" else chunk
                at += n
            videos_before += p["videos"]
        out.flush()
        del out
        fields[name] = {"dtype": str(tdtype).removeprefix("torch."), "shape": [rows, *trailing]}
    strings = {"video_ids": [v for p in parts for v in p["video_ids"]],
               "captions": [c for p in parts for c in p["captions"]]}
    (root / "strings.json").write_text(json.dumps(strings))
    counters: dict[str, int] = {}
    for p in parts:
        for k, v in p["counters"].items():
            counters[k] = counters.get(k, 0) + int(v)
    index = {"format": FORMAT, "key": key, "fields": fields, "widths": widths, "total_samples": total_samples,
             "videos": len(strings["video_ids"]), "texts": len(strings["captions"]), "counters": counters,
             "parts": [{k: p[k] for k in ("dir", "shards", "rank", "videos", "texts", "seconds")} for p in parts]}
    tmp = root / f"index.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, root / "index.json")
    shutil.rmtree(root / "parts", ignore_errors=True)


def read_index(root: Path) -> dict | None:
    try:
        index = json.loads((root / "index.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return index if index.get("format") == FORMAT else None


def _load(path: Path) -> np.ndarray:
    """A plain numeric array, memory-mapped; an object array (a pickle: code) is refused unread."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exn:
        raise UnsafeFile(f"{path}: refused, not a plain numeric array ({exn}); delete the features folder and "
                         f"extract it again") from None
    if arr.dtype.kind not in "fiub":
        raise UnsafeFile(f"{path}: refused, dtype {arr.dtype} is not numeric; delete it and extract again")
    return arr


def open_bank(root: Path, device: torch.device) -> FeatureBank:
    """The bank at ``root`` memory-mapped (nothing is read until gathered); reads land on ``device``."""
    index = read_index(root)
    if index is None:
        raise FileNotFoundError(f"{root}: no complete feature bank (index.json is written last); extract it again")
    arrays = {}
    with warnings.catch_warnings():  # read-only maps: torch warns that it cannot write to them, which it never does
        warnings.simplefilter("ignore", UserWarning)
        for name, spec in index["fields"].items():
            arr = torch.from_numpy(_load(root / f"{name}.npy"))
            arrays[name] = arr.view(torch.bfloat16) if spec["dtype"] == "bfloat16" else arr
    strings = json.loads((root / "strings.json").read_text())

    widths = index["widths"]
    text = Tokens(arrays["words"], arrays["word_weights"], Tokens.offsets_of(arrays["word_lengths"]), widths["text"])
    video = Tokens(arrays["frames"], arrays["frame_weights"], Tokens.offsets_of(arrays["frame_lengths"]), widths["video"],
                   arrays.get("frame_norm"))
    return FeatureBank(text, arrays["sentence"], video, arrays["text_to_video"].clone(),
                       strings["video_ids"], strings["captions"], arrays.get("text_fused"), arrays.get("video_fused"),
                       arrays.get("sentence_norm"), arrays.get("video_pooled"), device=device)
