"""A ``ShardStream``'s samples decoded by a Ray Data actor pool: the stream under ``launcher=ray``.

Every Ray Train worker owns its rank's stream, as a local rank does (``shards.stream``: the same
shard order per epoch, rank split, shuffle buffer and quota), and hands only the decoding to the
cluster::

    one read task (the rank's epochs, in the stream's order)  ->  decode actors (a pool of
    decode_actors = (min, max), anywhere in the cluster)  ->  rows, in read order, to the worker

Reading is sequential per rank because the shuffle buffer is: one task per rank and stage (it
reads epoch after epoch, each padded to whole batches, so the pipeline starts once), which ships
tar bytes only (frame shards: only the JPEGs the clip trains on) and is accounted as 0 CPUs,
so a cluster that holds the workers and the pool's minimum always runs it (a read task waiting
for a CPU held by its own consumers once hung a 2-CPU job forever). ``preserve_order`` keeps the
rows in read order, so batch ``j`` of an epoch is raw samples ``[j*B, (j+1)*B)``, as with a local
stream without DataLoader workers: resume is exact (``RayStreamLoader``) and a Ray epoch trains
on the samples a local epoch trains on.

A sample that cannot be decoded stays a row (``ok`` false) and its batch is one shorter, as
locally: later batches do not shift. What the read skipped (damaged shards) and what the actors
could not decode travel in the rows (``skips``, counts since the previous row), so the worker's
``counters`` count every loss exactly once, whichever task or retried task saw it.

Rows hold ``video`` uint8 ``[T,3,S,S]`` (resized, cropped, padded: the trainer normalises on its
device, as for local batches; 4x fewer bytes through the object store), ``video_mask`` [T] bool,
``video_id``, ``key``, ``captions`` (JSON list), ``ok``, ``skips`` (JSON dict), ``epoch`` and
``pad`` (a row that only fills an epoch's last batch).
Shard paths must be readable from every node (shared storage or object storage).
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Any, Iterable, Iterator

import numpy as np
import ray

from shards.stream import ShardStream

log = logging.getLogger(__name__)

DECODE_BATCH = 8  # samples per actor call: enough to amortise the call, small enough to stream
# Read blocks this large (bytes) leave the read task for the actors: ~8 frame-shard clips or one
# or two mp4s, so decoding starts after the first clips are read, not after Ray Data's default
# 128 MB, and a pool's actors share an epoch's blocks.
READ_BLOCK_BYTES = 2 * 2**20


class PipelineStalled(RuntimeError):
    """The decode pipeline yielded nothing for ``launcher.stall_timeout_s``."""


def read_rank_epochs(item: dict[str, Any], stream: ShardStream) -> Iterator[dict[str, Any]]:
    """Raw rows of ``stream`` for ``item["epochs"]`` epochs from ``item["epoch"]``, each in its
    training order: the first with ``item["skip"]`` samples dropped and at most ``item["count"]``
    given (< 0: one pass, an eval stream), later ones the rank's quota. Each epoch ends padded with
    ``pad`` rows to a multiple of ``item["pad_to"]``, so no batch holds two epochs. Frame shards:
    only the picked JPEGs leave this task. ``skips``: what was lost since the last row."""
    from shards.frames import pick_positions

    base = dict(stream.counters)

    def delta() -> str:
        nonlocal base
        out = {k: v - base.get(k, 0) for k, v in stream.counters.items() if v != base.get(k, 0)}
        base = dict(stream.counters)
        return json.dumps(out)

    for n in range(int(item["epochs"])):
        epoch = int(item["epoch"]) + n
        stream.set_epoch(epoch)
        skip, count = (int(item["skip"]), int(item["count"])) if n == 0 else (0, stream.samples_per_rank)
        rows = 0
        for raw in stream.raw_samples(0, 1, skip, None if count < 0 else count):
            row = {"key": raw["__key__"], "video": raw.get("video", b""), "meta": raw["json"].decode("utf-8"),
                   "frames": [], "ok": True, "pad": False, "epoch": epoch}
            if "frames" in raw:
                try:
                    meta = json.loads(row["meta"])
                    picked = pick_positions(meta["frames"], stream.max_frames, stream.sample_fps, meta.get("start"),
                                            meta.get("end"))
                    row["frames"] = [raw["frames"][p] for p in picked]
                except (ValueError, KeyError, TypeError, IndexError) as exn:
                    stream.counters["decode_error"] += 1
                    log.warning("%s: sample %s: bad frames entry (%s); skipped", raw.get("__url__"), raw["__key__"],
                                exn)
                    row["ok"] = False
            row["skips"] = delta()
            rows += 1
            yield row
        for _ in range(-rows % int(item["pad_to"])):
            yield {"key": "", "video": b"", "meta": "{}", "frames": [], "ok": False, "pad": True, "epoch": epoch,
                   "skips": delta()}


class DecodeClips:
    """Actor body: decode the sampled frames and resize + crop them (on the GPU when ``use_gpu``;
    frame shards' JPEGs are then decoded there too, by nvJPEG). Rows keep their order and number."""

    def __init__(self, *, max_frames: int, image_size: int, sample_fps: float, use_gpu: bool) -> None:
        import torch

        from shards.decode import ClipTransform

        self.max_frames, self.image_size, self.sample_fps = max_frames, image_size, sample_fps
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.transform = ClipTransform(image_size)

    def _frames(self, video: bytes, jpegs, meta: dict):
        """decord on the CPU for video shards; the picked JPEGs for frame shards, on ``self.device``
        (one batched nvJPEG call per clip with use_gpu). Either form goes to ``ClipTransform.crop``."""
        import torch

        from shards.frames import decode_jpegs, sampled_frames

        if len(jpegs):
            return decode_jpegs([bytes(j) for j in jpegs], self.device)
        frames = sampled_frames({"video": video}, meta, self.max_frames, self.sample_fps)
        return torch.from_numpy(frames).to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        s, t = self.image_size, self.max_frames
        n = len(batch["key"])
        videos = np.zeros((n, t, 3, s, s), np.uint8)
        masks = np.zeros((n, t), bool)
        ids, captions, ok, skips = [""] * n, ["[]"] * n, list(batch["ok"]), list(batch["skips"])
        for i, (key, video_bytes, jpegs, meta_text) in enumerate(zip(batch["key"], batch["video"], batch["frames"],
                                                                     batch["meta"])):
            if not ok[i]:
                continue
            try:
                meta = json.loads(meta_text)
                video, mask = self.transform.crop(self._frames(bytes(video_bytes), jpegs, meta), t)
                videos[i], masks[i] = video.cpu().numpy(), mask.cpu().numpy()
                ids[i], captions[i] = str(meta["video_id"]), json.dumps(meta["captions"])
            except Exception as exn:  # noqa: BLE001 - decord raises its own DECORDError and friends
                log.warning("cannot decode sample %s (%s: %s); skipped", key, type(exn).__name__, exn)
                ok[i] = False
                lost = json.loads(skips[i])
                lost["decode_error"] = lost.get("decode_error", 0) + 1
                skips[i] = json.dumps(lost)
        return {"video": videos, "video_mask": masks, "video_id": np.array(ids, dtype=object),
                "key": np.array([str(k) for k in batch["key"]], dtype=object),
                "captions": np.array(captions, dtype=object), "ok": np.array(ok, bool),
                "skips": np.array(skips, dtype=object), "pad": np.asarray(batch["pad"], bool),
                "epoch": np.asarray(batch["epoch"], np.int64)}


def ray_dataset(stream: ShardStream, *, skip: int = 0, count: int | None = None, epochs: int = 1, pad_to: int = 1,
                decode_actors: tuple[int, int] = (1, 1), use_gpu: bool = False) -> "ray.data.Dataset":
    """``stream``'s rows from its current epoch on as a lazy ``ray.data.Dataset`` in read order:
    ``skip`` raw samples dropped, at most ``count`` (None: the rank's quota when training, one pass
    for an eval stream), then ``epochs - 1`` more whole epochs, each padded to a multiple of
    ``pad_to`` rows (``read_rank_epochs``). Needs ``ray.init()``; the cluster must hold
    ``decode_actors[0]`` actors (1 CPU each, and 1 GPU with ``use_gpu``)."""
    lo, hi = decode_actors
    if not 1 <= lo <= hi:
        raise ValueError(f"decode_actors must be (min, max) with 1 <= min <= max, got {decode_actors}")
    if count is None:
        count = stream.samples_per_rank - skip if stream.training else -1
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # batch j = raw samples [j*B, (j+1)*B): exact resume
    context.target_max_block_size = READ_BLOCK_BYTES
    context.enable_progress_bars = False  # a training epoch has the stage's bar; these would repeat per epoch
    if epochs > 1 and not stream.training:
        raise ValueError("an eval stream is one pass: ray_dataset(epochs > 1) needs a training stream")
    item = {"epoch": stream.epoch, "skip": skip, "count": count, "epochs": epochs, "pad_to": pad_to}
    return (
        ray.data.from_items([item], override_num_blocks=1)
        .flat_map(read_rank_epochs, fn_kwargs={"stream": stream}, num_cpus=0)
        .map_batches(DecodeClips,
                     fn_constructor_kwargs=dict(max_frames=stream.max_frames, image_size=stream.image_size,
                                                sample_fps=stream.sample_fps, use_gpu=use_gpu),
                     batch_size=DECODE_BATCH, batch_format="numpy",
                     compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
                     num_gpus=1 if use_gpu else 0, num_cpus=1)
    )


def split_dataset(shard_dir, split: str, *, max_frames: int, image_size: int, sample_fps: float,
                  decode_actors: tuple[int, int] = (1, 1), use_gpu: bool = False, cache=None) -> "ray.data.Dataset":
    """Every sample of a packed split once, in file order (an eval stream through ``ray_dataset``)."""
    stream = ShardStream(shard_dir, split, max_frames=max_frames, image_size=image_size, sample_fps=sample_fps,
                         training=False, cache=cache)
    return ray_dataset(stream, decode_actors=decode_actors, use_gpu=use_gpu)


def add_skips(counters: dict[str, int], skips: Iterable[str]) -> dict[str, int]:
    """``counters`` plus the ``skips`` column of some rows."""
    out = dict(counters)
    for text in skips:
        for kind, n in json.loads(text).items():
            out[kind] = out.get(kind, 0) + int(n)
    return out


def within_deadline(batches: Iterator, seconds: float, what: str) -> Iterator:
    """``batches``, pulled in a thread; raises ``PipelineStalled`` naming ``what`` when none comes
    for ``seconds`` (<= 0: wait forever). Closing this generator stops the thread and closes
    ``batches`` (a Ray Data iterator then releases its actors)."""
    if seconds <= 0:
        yield from batches
        return
    slot: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def pull() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        slot.put(("batch", batch), timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    break
            slot.put(("end", None))
        except BaseException as exn:  # noqa: BLE001 - handed to the consumer, which raises it
            slot.put(("error", exn))
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=pull, name="ray-batches", daemon=True)
    thread.start()
    try:
        while True:
            started = time.monotonic()
            try:
                kind, value = slot.get(timeout=seconds)
            except queue.Empty:
                raise PipelineStalled(
                    f"{what}: no batch for {time.monotonic() - started:.0f} s (launcher.stall_timeout_s={seconds:g}); "
                    "the decode actors may be waiting for CPUs the cluster does not have (`ray status` shows pending "
                    "demands): lower launcher.decode_actors_min or launcher.num_workers, or add nodes") from None
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        try:
            slot.get_nowait()  # unblock a put in progress
        except queue.Empty:
            pass


class TrainBatchCollate:
    """Numpy rows -> the ``StreamLoader`` training batch dict, with one caption per sample for the
    rows' epoch, chosen and tokenised as the local loader does; rows that failed to decode (and
    padding) drop out."""

    def __init__(self, *, max_words: int, seed: int) -> None:
        from shards.loader import _tokenizer

        self.tokenizer, self.seed = _tokenizer(max_words), seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        from shards.loader import pick_caption

        ok, epoch = np.asarray(batch["ok"], bool), int(batch["epoch"][0])
        keys = [str(k) for k, good in zip(batch["key"], ok) if good]
        captions = [json.loads(c) for c, good in zip(batch["captions"], ok) if good]
        chosen = [caps[pick_caption(caps, self.seed, epoch, key)] for caps, key in zip(captions, keys)]
        text, text_mask = self.tokenizer(chosen)
        return {
            "video": torch.from_numpy(np.ascontiguousarray(batch["video"][ok])),
            "video_mask": torch.from_numpy(np.ascontiguousarray(batch["video_mask"][ok])),
            "text": text,
            "text_mask": text_mask,
            "video_id": [str(v) for v, good in zip(batch["video_id"], ok) if good],
            "key": keys,
            "captions": captions,
        }


# Epochs one pipeline of ``RayStreamLoader.epochs`` streams before it starts the next: a stage
# ends long before on any corpus (the items are a few bytes each; rows are read as they are pulled).
PIPELINE_EPOCHS = 1000


class RayStreamLoader:
    """A rank's training batches decoded by a Ray Data actor pool: ``shards.loader.StreamLoader``'s
    interface (a ``TrainSource``) and layout without DataLoader workers, so its state resumes
    exactly, on Ray or locally. ``video`` stays uint8 (``shards.decode.video_to_device``).

    ``iter`` is the rest of the current epoch; ``epochs()`` (what a stage loop pulls) is every
    epoch from there on through one pipeline: its read task and decode actors start once per stage,
    not once per epoch (each start is two processes importing torch: 8-10 s of a 10 s epoch of
    a 2-core test job, ``tests/test_ray_launch.py``)."""

    def __init__(self, stream: ShardStream, *, batch_size: int, max_words: int, seed: int,
                 decode_actors: tuple[int, int], use_gpu: bool = False, stall_timeout_s: float = 0) -> None:
        if not stream.training:
            raise ValueError("RayStreamLoader trains: build its ShardStream with training=True")
        self.stream, self.batch_size, self.max_words, self.seed = stream, batch_size, max_words, seed
        self.decode_actors, self.use_gpu, self.stall_timeout_s = decode_actors, use_gpu, stall_timeout_s
        stream.batch_size, stream.num_workers = batch_size, 0
        self.counters: dict[str, int] = dict(stream.counters)

    def __len__(self) -> int:
        return self.stream.num_batches(self.batch_size)

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from self._batches(1)

    def epochs(self) -> Iterator[dict[str, Any]]:
        """Batches of every epoch from the stream's state on, without end; raises when a whole
        epoch yields none (as ``trainer.components.loop.epochs`` does for a local source)."""
        while True:
            yield from self._batches(PIPELINE_EPOCHS)

    def _batches(self, epochs: int) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch and ``epochs - 1`` more, through one pipeline. The stream's
        state moves to the next epoch when that epoch's first batch is handed out, as a local
        loader's next ``iter`` does (``ShardStream.begin_pass``)."""
        stream, size = self.stream, self.batch_size
        skip = stream.begin_pass(size, 0) * size
        first, last = stream.epoch, stream.epoch + epochs - 1
        dataset = ray_dataset(stream, skip=skip, epochs=epochs, pad_to=size, decode_actors=self.decode_actors,
                              use_gpu=self.use_gpu)
        collate = TrainBatchCollate(max_words=self.max_words, seed=self.seed)
        what = f"{stream.split} epoch {first} rank {stream.rank}"
        rows = dataset.iter_batches(batch_size=size, batch_format="numpy", prefetch_batches=2)
        for batch in within_deadline(rows, self.stall_timeout_s, what):
            epoch = int(batch["epoch"][0])
            if epoch != stream.epoch:  # the previous epoch is spent: move on as a local loader's next iter does
                self._check_spent(stream.epoch, stream.samples_consumed)
                stream.begin_pass(size, 0)
            if epoch != stream.epoch:  # a whole epoch came without a row
                self._check_spent(stream.epoch, 0)
            assert int(batch["epoch"][-1]) == epoch, "read_rank_epochs pads every epoch to whole batches"
            self.counters = add_skips(self.counters, batch["skips"])
            stream.samples_consumed += int((~np.asarray(batch["pad"], bool)).sum())
            yield collate(batch)
        if epochs > 1:  # the pipeline's epochs are spent: the last one too
            self._check_spent(stream.epoch, stream.samples_consumed)
            if stream.epoch != last:
                self._check_spent(stream.epoch + 1, 0)

    def _check_spent(self, epoch: int, got: int) -> None:
        """Raise unless ``got`` samples are a whole epoch on this rank."""
        if got < self.stream.samples_per_rank:
            raise RuntimeError(f"{self.stream.split} rank {self.stream.rank}: epoch {epoch} yielded {got} of its "
                               f"{self.stream.samples_per_rank} samples; check its shards and quarantine log, or "
                               "lower data.batch_size below the samples per rank")
