"""DataLoader over a ``ShardStream`` with batch-exact resume.

Batches are assembled inside the workers (collation and tokenisation included) and the
DataLoader only forwards them (``batch_size=None``). Workers ship video as uint8 (resized and
cropped: a quarter of the float32 bytes through shared memory). With ``normalise=True`` the main
process normalises each batch once, so ``batch["video"]`` is float32 CLIP-normalised; the trainer
asks for ``normalise=False`` and normalises on its device (``shards.decode.video_to_device``),
which keeps that pass off the cores that decode.

The main process counts the batches it has handed out and writes that back into
``stream.samples_consumed``, so ``stream.state_dict()`` is
exact whatever ``num_workers`` is: on resume each worker derives from the consumed-batch count
which of its samples to skip (see ``ShardStream.iter_batches``).
"""
from __future__ import annotations

import functools
import random
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.stream import ShardStream
from shards.tokenize import CaptionTokenizer


def pick_caption(captions: list[str], seed: int, epoch: int, key: str) -> int:
    """The caption trained on for a sample this epoch: fixed by (seed, epoch, key), so it does not
    depend on worker count, shuffle order or resume."""
    return random.Random(f"caption/{seed}/{epoch}/{key}").randrange(len(captions))


@functools.lru_cache(maxsize=4)
def _tokenizer(max_words: int) -> CaptionTokenizer:
    """One tokenizer per length for the process: building the BPE tables costs ~0.2 s of CPU,
    which every epoch's new DataLoader would otherwise pay again."""
    return CaptionTokenizer(max_words)


class _Batches(IterableDataset):
    """Runs in each worker: the stream's batches for that worker, collated."""

    def __init__(self, stream: ShardStream, batch_size: int, max_words: int, training: bool, seed: int,
                 batches_done: int) -> None:
        super().__init__()
        self.stream, self.batch_size, self.training, self.seed = stream, batch_size, training, seed
        self.batches_done = batches_done
        self.tokenizer = _tokenizer(max_words) if training else None

    def __iter__(self) -> Iterator[dict]:
        base = dict(self.stream.counters)
        info = get_worker_info()
        slot = 0 if info is None else info.id
        for size, samples in self.stream.iter_batches(self.batch_size, self.batches_done, normalise=False):
            batch = self.collate(samples)
            batch["_raw_size"] = size
            batch["_slot"] = slot
            batch["_counters"] = {k: v - base.get(k, 0) for k, v in self.stream.counters.items()}
            yield batch

    def collate(self, samples: list[dict]) -> dict:
        s = self.stream
        empty_video = torch.zeros(0, s.max_frames, 3, s.image_size, s.image_size, dtype=torch.uint8)
        batch = {
            "video": _stack([x["frames"] for x in samples]) if samples else empty_video,
            "video_mask": torch.stack([x["frame_mask"] for x in samples]) if samples
            else torch.zeros(0, s.max_frames, dtype=torch.bool),
            "video_id": [x["video_id"] for x in samples],
            "key": [x["key"] for x in samples],
            "captions": [x["captions"] for x in samples],
            "meta": [x["meta"] for x in samples],
        }
        if self.training:
            chosen = [x["captions"][pick_caption(x["captions"], self.seed, s.epoch, x["key"])] for x in samples]
            batch["text"], batch["text_mask"] = self.tokenizer(chosen)
        return batch


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``; inside a DataLoader worker straight into shared memory, which the batch is
    sent through anyway (saves a copy of the batch, as torch's own default_collate does).

    Clips stored channels-last behind their ``[T, 3, S, S]`` shape (decord's frames and decoded
    JPEGs are interleaved pixels; ``ClipTransform.crop`` keeps them so) are stacked as they lie and
    the batch is the same permuted view: a contiguous batch made each clip's copy a transpose,
    17 % of the frames path's time in-process (cProfile, decode bench, 384 clips; decode_jpeg 50 %).
    The transpose is then fused into normalisation on the training device (``normalise_clip``)."""
    interleaved = [t.permute(0, 2, 3, 1) for t in tensors] if tensors[0].ndim == 4 else []
    if interleaved and all(t.is_contiguous() for t in interleaved) and not tensors[0].is_contiguous():
        return _stack_into(interleaved).permute(0, 1, 4, 2, 3)
    return _stack_into(tensors)


def _stack_into(tensors: list[torch.Tensor]) -> torch.Tensor:
    out = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype)  # contiguous, whatever the inputs' layout
    if get_worker_info() is not None:
        out.share_memory_()
    return torch.stack(tensors, out=out)


class StreamLoader:
    """Iterable of batch dicts: ``video`` [B,T,3,S,S], ``video_mask`` [B,T], ``video_id``, ``key``,
    ``captions``, ``meta``; when training also ``text`` / ``text_mask`` [B, max_words] for one
    caption per sample. Iterating past the end of a training epoch's data moves to the next
    epoch; call ``stream.set_epoch`` to choose one explicitly."""

    def __init__(self, stream: ShardStream, *, batch_size: int, max_words: int, num_workers: int, training: bool,
                 seed: int, normalise: bool = True) -> None:
        if training != stream.training:
            raise ValueError(f"build_loader(training={training}) over a stream built with training={stream.training}")
        self.stream, self.batch_size, self.max_words = stream, batch_size, max_words
        self.num_workers, self.training, self.seed = num_workers, training, seed
        self.normalise = normalise
        stream.batch_size, stream.num_workers = batch_size, num_workers

    def __len__(self) -> int:
        if self.training:
            return self.stream.num_batches(self.batch_size)
        raise TypeError("an eval StreamLoader has no fixed batch count; use stream.samples_this_rank()")

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    @property
    def counters(self) -> dict[str, int]:
        """Samples skipped so far, by reason (corrupt shard, decode error, ...)."""
        return self.stream.counters

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def __iter__(self) -> Iterator[dict]:
        stream = self.stream
        done = 0
        if self.training:
            done = stream.begin_pass(self.batch_size, self.num_workers)
        dataset = _Batches(stream, self.batch_size, self.max_words, self.training, self.seed, done)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            persistent_workers=False, prefetch_factor=2 if self.num_workers else None)
        base = dict(stream.counters)
        latest: dict[int, dict] = {}
        for batch in loader:
            latest[batch.pop("_slot")] = batch.pop("_counters")
            stream.counters = {k: base.get(k, 0) + sum(d.get(k, 0) for d in latest.values())
                               for k in set(base) | {k for d in latest.values() for k in d}}
            size = batch.pop("_raw_size")
            if self.normalise:
                batch["video"] = stream.transform.normalise(batch["video"], batch["video_mask"])
            if self.training:
                stream.samples_consumed += size
            yield batch


def build_loader(stream: ShardStream, *, batch_size: int, max_words: int, num_workers: int, training: bool,
                 seed: int, normalise: bool = True) -> StreamLoader:
    """DataLoader over ``stream`` with exact, batch-granular resume via ``stream.state_dict()``.
    ``normalise=False``: ``batch["video"]`` stays uint8, for ``shards.decode.video_to_device``."""
    return StreamLoader(stream, batch_size=batch_size, max_words=max_words, num_workers=num_workers,
                        training=training, seed=seed, normalise=normalise)
