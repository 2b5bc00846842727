"""The packed shards of a split as a Ray Data pipeline: read tars -> decode in an actor pool -> rows.

Rows hold numpy columns ``video`` [T,3,S,S] float32, ``video_mask`` [T] bool, ``video_id``,
``key`` and ``captions`` (the sample's captions as a JSON list, so the column stays a flat
string). ``iter_train_batches`` turns a Ray Train dataset shard back into the batch dict
``shards.loader.StreamLoader`` yields, so the trainer does not care which source feeds it; it
picks each sample's caption for the epoch it is told (``shards.loader.pick_caption``, the local
loader's rule) and tokenises it there. The pipeline is built once per job and re-executed each
epoch, so the caption cannot be chosen inside it: the decode actors do not know the epoch.

Why not ``ray.data.read_webdataset``: a truncated or corrupt shard makes its read task raise,
which fails the whole dataset. Here the shards listed in the index are read by a tolerant tar
reader (the same member grouping as ``ShardStream``): a damaged shard yields the samples before
the damage and is counted. Samples that cannot be decoded are dropped and counted too. Counts
live in a small Ray actor (``skip_counts(dataset)``); a retried task may count twice.

Shard paths must be readable from every node (local disk on one machine, shared storage on a
cluster), as for ``read_webdataset`` on paths.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import ray

from shards.cache import ShardCache
from shards.index import read_index
from shards.storage import join
from shards.tarread import Members, shard_samples

log = logging.getLogger(__name__)

DECODE_BATCH = 8  # samples per actor call: enough to amortise the call, small enough to stream
SKIP_KINDS = ("corrupt_shard", "short_shard", "incomplete_sample", "decode_error")


@ray.remote(num_cpus=0)
class SkipCounter:
    """Counts of what the pipeline dropped, by kind (``SKIP_KINDS``)."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(SKIP_KINDS, 0)

    def add(self, kind: str, n: int = 1) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n

    def get(self) -> dict[str, int]:
        return dict(self.counts)


def read_shard_samples(row: dict[str, Any], counter, max_frames: int, sample_fps: float,
                       cache: ShardCache | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples (``key``, ``video`` bytes, ``meta`` JSON text) of the shard at ``row["path"]``, which
    its index says holds ``row["samples"]``; damage goes to ``counter`` (``shards.tarread.shard_samples``).
    Frame shards: ``frames``, only the JPEGs the clip trains on (``shards.frames.pick_positions``), so
    the rest never cross to the decode actors; ``video`` is then empty."""
    path = row["path"]
    members = Members.from_index(row)  # row["members"]: Members.to_json()
    for sample in shard_samples(path, path, row["samples"], lambda kind: counter.add.remote(kind), members, cache):
        out = {"key": sample["__key__"], "video": sample.get("video", b""), "meta": sample["json"].decode("utf-8"),
               "frames": []}
        if "frames" in sample:
            from shards.frames import pick_positions  # torch: in the read task's process only

            try:
                meta = json.loads(out["meta"])
                picked = pick_positions(meta["frames"], max_frames, sample_fps, meta.get("start"), meta.get("end"))
            except (ValueError, KeyError, TypeError) as exn:
                counter.add.remote("decode_error")
                log.warning("%s: sample %s: bad frames entry (%s); skipped", path, sample["__key__"], exn)
                continue
            out["frames"] = [sample["frames"][p] for p in picked]
        yield out


class DecodeClips:
    """Actor body: decode the sampled frames, CLIP-preprocess (on the GPU when ``use_gpu``; frame
    shards' JPEGs are then decoded there too, by nvJPEG)."""

    def __init__(self, *, max_frames: int, image_size: int, sample_fps: float, use_gpu: bool, counter) -> None:
        import torch

        from shards.decode import ClipTransform

        self.max_frames, self.image_size, self.sample_fps = max_frames, image_size, sample_fps
        self.counter = counter
        self.device = torch.device("cuda" if use_gpu else "cpu")
        # With use_gpu the resize, crop and normalisation run on the GPU (ClipTransform works on the
        # frames' device); only the final [T, 3, S, S] comes back to host memory.
        self.transform = ClipTransform(image_size)

    def _frames(self, video: bytes, jpegs: list[bytes], meta: dict):
        """uint8 ``[T, H, W, 3]`` on ``self.device``: decord on the CPU for video shards; for frame
        shards the picked JPEGs, on the GPU with nvJPEG when ``use_gpu`` (one batched call per clip)."""
        import torch

        from shards.frames import decode_jpegs, sampled_frames

        if len(jpegs):  # picked at read time already; planar frames on self.device
            return decode_jpegs([bytes(j) for j in jpegs], self.device)
        frames = sampled_frames({"video": video}, meta, self.max_frames, self.sample_fps)
        return torch.from_numpy(frames).to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        videos, masks, ids, keys, captions = [], [], [], [], []
        for key, video_bytes, jpegs, meta_text in zip(batch["key"], batch["video"], batch["frames"], batch["meta"]):
            try:
                meta = json.loads(meta_text)
                frames = self._frames(bytes(video_bytes), jpegs, meta)
                video, mask = self.transform(frames, self.max_frames)
            except Exception as exn:  # noqa: BLE001 - decord raises its own DECORDError and friends
                self.counter.add.remote("decode_error")
                log.warning("cannot decode sample %s (%s: %s); skipped", key, type(exn).__name__, exn)
                continue
            videos.append(video.cpu().numpy())  # from the GPU when use_gpu
            masks.append(mask.cpu().numpy())
            ids.append(meta["video_id"])
            keys.append(str(key))
            captions.append(json.dumps(meta["captions"]))
        s, t = self.image_size, self.max_frames
        return {
            "video": np.stack(videos) if videos else np.zeros((0, t, 3, s, s), np.float32),
            "video_mask": np.stack(masks) if masks else np.zeros((0, t), bool),
            "video_id": np.array(ids, dtype=object),
            "key": np.array(keys, dtype=object),
            "captions": np.array(captions, dtype=object),
        }


def ray_dataset(
    shard_dir: str | Path,  # a local folder or an fsspec URL readable from every node
    split: str,
    *,
    max_frames: int,
    image_size: int,
    sample_fps: float,
    num_actors: int,
    use_gpu: bool = False,
    cache: ShardCache | None = None,  # each node's local copies of remote shards (data.cache_dir)
) -> "ray.data.Dataset":
    """The decoded samples of a packed split as a lazy ``ray.data.Dataset`` (see module doc).
    Needs ``ray.init()`` first; the cluster needs ``num_actors`` CPUs (GPUs with ``use_gpu``) for
    decoding plus one for reading."""
    index = read_index(shard_dir, split)  # raises ShardsNotFound with the fix
    counter = SkipCounter.remote()
    members = Members.from_index(index).to_json()
    paths = [{"path": join(shard_dir, s["name"]), "samples": int(s["samples"]), "members": members}
             for s in index["shards"]]
    dataset = (
        ray.data.from_items(paths, override_num_blocks=len(paths))
        .flat_map(read_shard_samples, fn_kwargs={"counter": counter, "max_frames": max_frames, "sample_fps": sample_fps,
                                              "cache": cache})
        .map_batches(
            DecodeClips,
            fn_constructor_kwargs=dict(max_frames=max_frames, image_size=image_size, sample_fps=sample_fps,
                                       use_gpu=use_gpu, counter=counter),
            batch_size=DECODE_BATCH,
            batch_format="numpy",
            concurrency=num_actors,
            num_gpus=1 if use_gpu else 0,
            num_cpus=1,
        )
    )
    dataset._streamret_skips = counter  # the Dataset is a plain object; transforms of it lose this
    return dataset


def skip_counts(dataset: "ray.data.Dataset") -> dict[str, int]:
    """What a ``ray_dataset`` dropped so far, by kind (after it has been consumed)."""
    counter = getattr(dataset, "_streamret_skips", None)
    if counter is None:
        raise ValueError("skip_counts takes the Dataset returned by shards.ray_source.ray_dataset itself; "
                         "derived datasets (after .map, .random_shuffle, ...) do not carry its counter")
    return ray.get(counter.get.remote())


class TrainBatchCollate:
    """A numpy batch of ``ray_dataset`` rows -> the ``StreamLoader`` training batch dict, with one
    caption per sample for ``epoch``, chosen and tokenised as the local loader does."""

    def __init__(self, *, max_words: int, seed: int, epoch: int) -> None:
        from shards.loader import _tokenizer

        self.tokenizer, self.seed, self.epoch = _tokenizer(max_words), seed, epoch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        from shards.loader import pick_caption

        keys = [str(k) for k in batch["key"]]
        captions = [json.loads(c) for c in batch["captions"]]
        chosen = [caps[pick_caption(caps, self.seed, self.epoch, key)] for caps, key in zip(captions, keys)]
        text, text_mask = self.tokenizer(chosen)
        return {
            "video": torch.as_tensor(batch["video"]),
            "video_mask": torch.as_tensor(batch["video_mask"]),
            "text": text,
            "text_mask": text_mask,
            "video_id": [str(v) for v in batch["video_id"]],
            "key": keys,
            "captions": captions,
        }


def iter_train_batches(dataset_shard, batch_size: int, *, max_words: int, seed: int, epoch: int,
                       drop_last: bool = False, local_shuffle_buffer_size: int | None = None) -> Iterator[dict[str, Any]]:
    """Batches of a Ray Train dataset shard (``ray.train.get_dataset_shard(name)``, or any Dataset)
    in the ``StreamLoader`` layout for ``epoch``: ``video``, ``video_mask``, ``text``, ``text_mask``
    tensors and ``video_id``, ``key``, ``captions`` lists."""
    collate = TrainBatchCollate(max_words=max_words, seed=seed, epoch=epoch)
    yield from dataset_shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate, drop_last=drop_last,
                                                local_shuffle_buffer_size=local_shuffle_buffer_size)
