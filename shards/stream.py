"""Stream a packed split: shard order, rank/worker split, shuffle, quota, resume skip, decode.

Order of operations (per DataLoader worker, or in-process):

1. shard list from the index; when training, shuffled by ``(seed, epoch)`` (same on every rank);
2. split by rank, then by worker: whole shards when there are at least as many shards as
   consumers, else every consumer reads all shards and keeps every n-th sample (so any number of
   shards works with any number of ranks x workers);
3. when training, a shuffle buffer seeded by ``(seed, epoch, rank, worker)``; a consumer whose
   shards run out reads its own shards again, so every rank yields exactly ``samples_per_rank``
   samples per epoch (a rank with more stops early) and DDP never waits on a short rank;
4. skip the samples a resumed run already consumed, before decoding (only tar bytes are read);
5. decode (decord for video shards, libjpeg-turbo for frame shards: ``shards.frames``) and CLIP-preprocess.

Resume granularity: one sample when iterated in-process; one batch through
``shards.loader.build_loader`` (which tracks consumed batches in the main process). Resuming is
exact when ``world_size``, ``batch_size`` and ``num_workers`` are unchanged. Eval streams
(``training=False``) always start from the beginning.

Batch layout: for an epoch of ``N`` samples on a rank, batch ``j`` holds samples
``[j*B, (j+1)*B)`` of the epoch (the last one is shorter) and comes from worker ``j % W``: that is
the order in which ``torch.utils.data.DataLoader`` collects from its workers. A worker therefore
owns a fixed, known set of batches, which is what makes exact resume possible with workers.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import random
from pathlib import Path
from typing import Iterator

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from shards.cache import ShardCache
from shards.decode import ClipTransform
from shards.frames import sampled_frames
from shards.index import read_index
from shards.storage import is_url, join, redact
from shards.tarread import Members, check_members, shard_samples

log = logging.getLogger(__name__)

Split = tuple[list[str], list[tuple[int, int]]]  # shard names, sample filters (keep i-th of every n)


def _split(names: list[str], filters: list[tuple[int, int]], part: int, parts: int) -> Split:
    """Whole shards when there are enough of them, else every ``parts``-th sample. Once a split is
    by sample, later ones must be too: a sample filter counts positions across all the shards."""
    if parts == 1:
        return names, filters
    if len(names) >= parts and not filters:
        return names[part::parts], filters
    return names, [*filters, (part, parts)]


class ShardStream(IterableDataset):
    """One split of packed shards as an ``IterableDataset`` of decoded samples:
    ``{"key", "video_id", "captions", "frames" [T,3,S,S], "frame_mask" [T], "meta"}``."""

    def __init__(
        self,
        shard_dir: str | Path,  # a local folder or an fsspec URL (shards.storage)
        split: str,
        *,
        max_frames: int,
        image_size: int,
        sample_fps: float = 1.0,
        training: bool,
        seed: int = 0,
        shuffle_buffer: int = 256,
        rank: int = 0,
        world_size: int = 1,
        samples_per_rank: int | None = None,
        shards: list[str] | None = None,
        cache: ShardCache | None = None,  # local copies of remote shards (data.cache_dir)
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.shard_dir, self.split = shard_dir if is_url(shard_dir) else Path(shard_dir), split
        self.index = read_index(self.shard_dir, split)
        self.shard_names = [s["name"] for s in self.index["shards"]]
        self.shard_sizes = {s["name"]: int(s["samples"]) for s in self.index["shards"]}
        if shards is not None:  # a part of the split (feature extraction encodes one part per call)
            unknown = [name for name in shards if name not in self.shard_sizes]
            if unknown or not shards:
                raise ValueError(f"{split}: shards {unknown or shards} are not in its index ({len(self.shard_names)} shards)")
            self.shard_names = list(shards)
        self.total_samples = sum(self.shard_sizes[name] for name in self.shard_names)
        self.members = Members.from_index(self.index)
        stored_fps = (self.index.get("frames") or {}).get("fps")
        if stored_fps and sample_fps > stored_fps:
            log.warning("%s/%s: frame shards store %s frames per second but sample_fps=%s: clips get the stored frames "
                        "only; re-pack with data.pack.frames_fps=%s or lower data.sample_fps", redact(str(shard_dir)),
                        split, stored_fps, sample_fps, sample_fps)
        self.cache = cache  # consulted for remote shards only (shards.tarread.tar_members)
        check_members(join(self.shard_dir, self.shard_names[0]), self.members, self.cache)
        self.max_frames, self.image_size, self.sample_fps = max_frames, image_size, sample_fps
        self.training, self.seed, self.shuffle_buffer = training, seed, shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.samples_per_rank = self.total_samples // world_size if samples_per_rank is None else samples_per_rank
        self.transform = ClipTransform(image_size)
        self.epoch = 0
        self.samples_consumed = 0
        self.counters: dict[str, int] = {"corrupt_shard": 0, "short_shard": 0, "incomplete_sample": 0,
                                         "decode_error": 0, "starved": 0}
        # Set by build_loader; standalone iteration is one "batch" per sample in one worker.
        self.batch_size, self.num_workers = 1, 0
        self._resume_layout: tuple[int | None, int] | None = None

    # --- epoch and resume state ------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.samples_consumed = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "seed": self.seed, "samples_consumed": self.samples_consumed,
                "batch_size": self.batch_size, "num_workers": self.num_workers, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"stream state was saved with seed={state['seed']} but this stream has seed={self.seed}; "
                             f"resume with the same data seed or the remaining samples cannot be reproduced")
        self.epoch, self.samples_consumed = int(state["epoch"]), int(state["samples_consumed"])
        if state.get("world_size", self.world_size) != self.world_size:
            log.warning("resuming %s with world_size %s (saved %s): the rest of epoch %s will not be exactly the "
                        "samples the saved run had left", self.split, self.world_size, state["world_size"], self.epoch)
        self._resume_layout = batch_layout(int(state.get("batch_size", 1)), int(state.get("num_workers", 0)))

    def check_resume_layout(self, batch_size: int, num_workers: int) -> None:
        """Warn once when a loaded state was saved under a batch layout that yields other samples."""
        saved, self._resume_layout = self._resume_layout, None
        if saved not in (None, batch_layout(batch_size, num_workers)):
            log.warning("resuming %s with batch_size=%d, num_workers=%d but the state was saved with layout %s; the "
                        "remaining samples will differ from the saved run's", self.split, batch_size, num_workers,
                        saved)

    def begin_pass(self, batch_size: int, num_workers: int) -> int:
        """Where a training loader's next ``iter`` starts: the next epoch when this one is spent,
        else the batch boundary at or below what was consumed (snapped to it). Returns the batches of
        the epoch already consumed; warns once when a loaded state had another batch layout."""
        self.check_resume_layout(batch_size, num_workers)
        if self.samples_consumed >= self.samples_per_rank > 0:
            self.set_epoch(self.epoch + 1)
        done = self.batches_consumed(batch_size)
        self.samples_consumed = done * batch_size
        return done

    # --- layout ----------------------------------------------------------------------------------
    def num_batches(self, batch_size: int) -> int:
        """Batches per epoch on this rank when training."""
        return math.ceil(self.samples_per_rank / batch_size)

    def batches_consumed(self, batch_size: int) -> int:
        if self.samples_consumed >= self.samples_per_rank:
            return self.num_batches(batch_size)
        if self.samples_consumed % batch_size:
            log.warning("samples_consumed=%d is not a multiple of batch_size=%d; resuming from the batch boundary "
                        "below it", self.samples_consumed, batch_size)
        return self.samples_consumed // batch_size

    def _worker_batches(self, batch_size: int, workers: int, worker: int, start: int, stop: int) -> list[int]:
        """Sizes of the batches ``j`` in ``[start, stop)`` that worker ``worker`` owns (``j % W``)."""
        n, nb = self.samples_per_rank, self.num_batches(batch_size)
        return [batch_size if j < nb - 1 else n - (nb - 1) * batch_size for j in range(worker, min(stop, nb), workers)
                if j >= start]

    def plan(self, worker: int, workers: int) -> Split:
        """Shards (in epoch order) and sample filters of one (rank, worker)."""
        names = list(self.shard_names)
        if self.training:
            random.Random(f"shards/{self.seed}/{self.epoch}").shuffle(names)
        names, filters = _split(names, [], self.rank, self.world_size)
        return _split(names, filters, worker, workers)

    def samples_this_rank(self) -> int:
        """Samples an eval pass yields on this rank (all workers together), from the index alone."""
        names, filters = self.plan(0, 1)
        counters = [0] * len(filters)
        kept = 0
        for name in names:
            for _ in range(self.shard_sizes[name]):
                kept += _keep(counters, filters)
        return kept

    # --- reading ---------------------------------------------------------------------------------
    def _read_shard(self, name: str) -> Iterator[dict]:
        """Raw samples (``__key__``, ``mp4``, ``json`` bytes) of one shard; damage is counted in
        ``counters`` and skipped (``shards.tarread.shard_samples``)."""
        yield from shard_samples(join(self.shard_dir, name), name, self.shard_sizes[name], self._count_skip,
                                 self.members, self.cache)

    def _count_skip(self, kind: str) -> None:
        self.counters[kind] = self.counters.get(kind, 0) + 1

    def _one_pass(self, names: list[str], filters: list[tuple[int, int]]) -> Iterator[dict]:
        counters = [0] * len(filters)
        for name in names:
            for sample in self._read_shard(name):
                if _keep(counters, filters):
                    yield sample

    def raw_samples(self, worker: int, workers: int, skip: int, count: int | None) -> Iterator[dict]:
        """Undecoded samples of a (rank, worker) for this epoch: shuffled, then ``skip`` dropped,
        then at most ``count`` (None = one pass, eval).

        Training reads the consumer's shards in passes, each pass shuffled on its own (the buffer
        drains at the end of a pass), so a consumer with enough data sees each sample at most once
        per epoch, and one that needs more starts a second pass only after the first is spent."""
        names, filters = self.plan(worker, workers)
        rng = random.Random(f"samples/{self.seed}/{self.epoch}/{self.rank}/{worker}")

        def passes() -> Iterator[dict]:
            while True:
                one: Iterator[dict] = self._one_pass(names, filters)
                if self.training and self.shuffle_buffer > 1:
                    one = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(one)
                got = 0
                for sample in one:
                    got += 1
                    yield sample
                if not self.training:
                    return
                if got == 0:
                    self.counters["starved"] += 1
                    log.warning("%s rank %d worker %d: a whole pass over shards %s yielded no sample; this worker "
                                "stops early", self.split, self.rank, worker, names)
                    return

        stream = passes()
        for _ in range(skip):
            if next(stream, None) is None:
                return
        yield from itertools.islice(stream, count)

    def decode(self, raw: dict, normalise: bool = True) -> dict | None:
        """Decode and preprocess one raw sample; None (counted, logged) when it cannot be decoded.
        ``normalise=False`` leaves ``frames`` uint8 (resized, cropped, padded): ``build_loader`` ships
        those from its workers (4x less IPC) and normalises whole batches with ``transform.normalise``."""
        try:
            meta = json.loads(raw["json"])
            frames = sampled_frames(raw, meta, self.max_frames, self.sample_fps)
        except Exception as exn:  # noqa: BLE001 - decord raises its own DECORDError and friends
            self.counters["decode_error"] += 1
            log.warning("%s/%s: cannot decode sample %s (%s: %s); skipped", redact(str(self.shard_dir)), raw.get("__url__"),
                        raw.get("__key__"), type(exn).__name__, exn)
            return None
        video, mask = self.transform.crop(frames, self.max_frames)
        if normalise:
            video = self.transform.normalise(video, mask)
        return {"key": raw["__key__"], "video_id": meta["video_id"], "captions": list(meta["captions"]),
                "frames": video, "frame_mask": mask, "meta": meta}

    # --- iteration -------------------------------------------------------------------------------
    def worker_slot(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def iter_batches(self, batch_size: int, batches_done: int,
                     normalise: bool = True) -> Iterator[tuple[int, list[dict]]]:
        """This DataLoader worker's batches as ``(size in raw samples, decoded samples)``; ``normalise``
        as in ``decode``.

        Training: the worker at slot ``w`` plays the original worker ``(w + batches_done) % W``, so
        that after a resume the DataLoader's round robin (which always starts at worker 0) still
        returns the original batch ``batches_done + i`` as its ``i``-th batch. A sample that fails
        to decode leaves its batch one shorter rather than shifting every later batch.
        Eval: consecutive ``batch_size`` samples, the last batch of each worker shorter.
        """
        slot, workers = self.worker_slot()
        if not self.training:
            raws = self.raw_samples(slot, workers, 0, None)
            while True:
                chunk = [r for _, r in zip(range(batch_size), raws)]
                if not chunk:
                    return
                yield len(chunk), [s for s in (self.decode(r, normalise) for r in chunk) if s is not None]
        worker = (slot + batches_done) % workers
        done = self._worker_batches(batch_size, workers, worker, 0, batches_done)
        todo = self._worker_batches(batch_size, workers, worker, batches_done, self.num_batches(batch_size))
        if not todo:
            return
        raws = self.raw_samples(worker, workers, skip=sum(done), count=sum(todo))
        for size in todo:
            chunk = [r for _, r in zip(range(size), raws)]
            yield size, [s for s in (self.decode(r, normalise) for r in chunk) if s is not None]

    def __iter__(self) -> Iterator[dict]:
        """Decoded samples. In-process this also advances ``samples_consumed`` (exact per-sample
        resume); inside DataLoader workers use ``build_loader`` to track consumption instead."""
        in_process = get_worker_info() is None
        if in_process:
            self.check_resume_layout(1, 0)
        if self.training and self.samples_consumed >= self.samples_per_rank > 0 and in_process:
            log.info("%s epoch %d already consumed; moving to epoch %d", self.split, self.epoch, self.epoch + 1)
            self.set_epoch(self.epoch + 1)
        done = self.batches_consumed(1) if self.training else 0
        for size, samples in self.iter_batches(1, done):
            if in_process:
                self.samples_consumed += size
            yield from samples


def batch_layout(batch_size: int, num_workers: int) -> tuple[int | None, int]:
    """What decides which samples a worker yields: with one worker (or none) the epoch is a single
    sequence whatever the batch size; with several, batch ``j`` belongs to worker ``j % W``."""
    workers = max(1, num_workers)
    return (batch_size if workers > 1 else None, workers)


def _keep(counters: list[int], filters: list[tuple[int, int]]) -> bool:
    """Apply nested "keep the i-th of every n" filters; each counts only what the outer ones kept."""
    for f, (part, parts) in enumerate(filters):
        position = counters[f]
        counters[f] += 1
        if position % parts != part:
            return False
    return True
