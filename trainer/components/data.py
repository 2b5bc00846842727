"""The data of a training run: corpus -> shards (packed once) -> streams -> batches.

``TrainSource`` is the seam between a stage loop and where its batches come from: what a loop may
read. ``local_train_source`` (``shards.ShardStream`` in DataLoader workers) implements it; the Ray
launcher's source (``trainer.launchers.ray``) implements it too and is handed to ``run.train`` by
that launcher, so nothing here knows about Ray.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

from shards import storage
from shards.corpora.common import UnknownSplit
from shards.external import expand_shards, index_webdataset
from shards.index import ShardsNotFound, VerifyReport, index_path, read_index, verify_split
from shards.manifest import ManifestCorpus
from shards.probe import FrameSpec, Transcode
from shards.cache import ShardCache
from shards.counting import generate_counting_corpus
from shards.synthetic import generate_synthetic_corpus
from shards.tarread import Members
from shards.writer import PackReport, pack_split
from trainer.components.distributed import DistInfo
from trainer.config import DataConfig, ModelConfig, PackFormat

if TYPE_CHECKING:  # the stream pulls in torch, decord and open_clip: packing does not need them
    from shards.loader import StreamLoader

# Corpora generated procedurally on first use (data.synthetic holds their sizes): the embedded one
# and a second of another make (shards/counting.py), so every learning claim is checked on two.
GENERATED = {"synthetic": generate_synthetic_corpus, "counting": generate_counting_corpus}


def corpus_records(data: DataConfig, split: str):
    """The records (VideoSample | Quarantined) of one split of the configured corpus."""
    root = Path(data.root)
    if data.corpus in GENERATED:
        s = data.synthetic
        GENERATED[data.corpus](root, n_train=s.n_train, n_test=s.n_test, seed=s.seed, size=s.size, fps=s.fps,
                               seconds=s.seconds, captions_per_video=s.captions_per_video, n_val=s.n_val)
        return ManifestCorpus(root / f"{split}.jsonl", corpus=data.corpus).samples(split)
    if data.corpus == "manifest":
        for suffix in (".jsonl", ".csv"):
            if (root / f"{split}{suffix}").is_file():
                return ManifestCorpus(root / f"{split}{suffix}", video_dir=data.video_dir).samples(split)
        raise FileNotFoundError(f"data=manifest: no {root}/{split}.jsonl or {split}.csv; write one manifest per split "
                                "(rows: video, caption(s), optional start/end) or set data.root")
    from shards.corpora import open_corpus

    return open_corpus(data.corpus, root, data.video_dir).samples(split)


def transcode_spec(data: DataConfig) -> Transcode | None:
    p = data.pack
    if not p.transcode_short_side:
        return None
    return Transcode(short_side=p.transcode_short_side, fps=int(p.transcode_fps or 8), gop=p.transcode_gop or 8,
                     fastdecode=p.transcode_fastdecode)


def frame_spec(data: DataConfig) -> FrameSpec | None:
    p = data.pack
    if PackFormat(p.format) is not PackFormat.frames:
        return None
    return FrameSpec(fps=p.frames_fps, short_side=p.frames_short_side, quality=p.frames_quality,
                     center_crop=p.frames_center_crop)


@dataclass
class SplitPack:
    """One split's outcome in :func:`pack_corpus`."""

    split: str
    report: PackReport | None  # None: it was packed already and left alone
    verified: VerifyReport | None  # with data.pack.verify: every shard re-read against the index


def webdataset_urls(data: DataConfig) -> dict[str, str]:
    """data=webdataset: split name -> its shard pattern."""
    w = data.webdataset
    pairs = ((data.train_split, w.train), (data.val_split, w.val), (data.test_split, w.test))
    return {split: pattern for split, pattern in pairs if split and pattern}


def _webdataset_members(data: DataConfig) -> Members:
    w = data.webdataset
    return Members(caption_member=w.caption_member, caption_keys=tuple(w.caption_keys), id_key=w.id_key)


def pack_corpus(data: DataConfig, splits: list[str], *, progress: bool, force: bool = False) -> list[SplitPack]:
    """Pack each split that has no shards yet (all of them with ``force`` or ``data.pack.force``),
    through Ray tasks when ``data.pack.ray_address`` is set; verify each with ``data.pack.verify``.
    ``data.corpus=webdataset`` indexes existing shards in place instead (``shards.external``).

    Every split's annotations are read and checked before any split is written: a malformed test
    file fails the pack before hours go into the train split."""
    shard_dir, outcomes = data.shards, []  # a local folder or an fsspec URL (shards.storage)
    todo = [s for s in splits if force or data.pack.force or not storage.exists(index_path(shard_dir, s))]
    urls = webdataset_urls(data)
    if data.corpus == "webdataset":
        unknown = [s for s in todo if not urls.get(s)]
        if unknown:
            raise UnknownSplit(f"data=webdataset: no shards for split(s) {unknown}; set data.webdataset.train / val / "
                               f"test (for data.train_split / val_split / test_split) to a shard pattern such as "
                               f"\"'/data/cc/{{00000..00099}}.tar'\"")
        for split in todo:
            expand_shards(urls[split])  # every pattern checked before any split is counted
        records = {}
    else:
        records = {split: list(corpus_records(data, split)) for split in todo}
    for split in splits:
        report = None
        if split in records:
            report = pack_split(records.pop(split), shard_dir, split,
                                shard_bytes=data.pack.shard_mb * 2**20, workers=data.pack.workers,
                                transcode=transcode_spec(data), progress=progress,
                                ray_address=data.pack.ray_address, max_quarantine=data.pack.max_quarantine,
                                frames=frame_spec(data))
        elif split in todo:
            report = index_webdataset(urls[split], shard_dir, split, _webdataset_members(data),
                                      progress=progress, max_quarantine=data.pack.max_quarantine)
        outcomes.append(SplitPack(split, report, verify_split(shard_dir, split) if data.pack.verify else None))
    return outcomes


def ensure_shards(data: DataConfig, *, progress: bool) -> None:
    """The generated corpora are generated and packed on first use; any other corpus must already
    be packed (``python launch/pack.py``). Every split is checked here, before anything is written,
    so a wrong path or an empty split fails at once, not mid-run."""
    splits = [data.train_split, data.test_split] + ([data.val_split] if data.val_split else [])
    if data.corpus in GENERATED:
        for outcome in pack_corpus(data, splits, progress=progress):
            if outcome.verified is not None and not outcome.verified.ok:
                raise RuntimeError(f"verification of {data.shards}/{outcome.split} failed: {outcome.verified}")
    for split in splits:
        read_index(data.shards, split)  # raises ShardsNotFound with the fix in its message


def quarantine_counts(data: DataConfig) -> dict[str, int]:
    """Rows each split lost at pack time (``<split>.quarantine.jsonl``), for the run's metrics."""
    counts = {}
    for split in (data.train_split, data.test_split):
        try:
            text = storage.read_bytes(storage.join(data.shards, f"{split}.quarantine.jsonl")).decode("utf-8")
        except FileNotFoundError:
            text = ""
        counts[f"quarantined_{split}"] = sum(1 for line in text.splitlines() if line.strip())
    return counts


class TrainSource(Protocol):
    """Batches for one rank: each ``iter`` is the rest of the current epoch (the next ``iter``
    starts the next one); batch dicts as ``shards.loader.StreamLoader`` yields them. It may also
    have ``epochs()``, all epochs from its state on in one stream (``trainer.components.loop.epochs``
    then uses it: ``RayStreamLoader`` starts its decode pipeline once instead of once per epoch)."""

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def __len__(self) -> int: ...  # batches per epoch on this rank

    @property
    def epoch(self) -> int: ...

    @property
    def counters(self) -> dict[str, int]: ...  # samples skipped so far, by reason (data_* metrics)

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


TrainSourceFactory = Callable[[DataConfig, ModelConfig, DistInfo, int], TrainSource]


def shard_cache(data: DataConfig) -> ShardCache | None:
    """``data.cache_dir`` as the streams' cache of remote shards (None: stream every time)."""
    return ShardCache(str(Path(data.cache_dir).resolve()), int(data.cache_gb * 2**30)) if data.cache_dir else None


def local_train_source(data: DataConfig, model: ModelConfig, dist: DistInfo, seed: int) -> "StreamLoader":
    """This rank's part of the train split, read by ``ShardStream`` in DataLoader workers."""
    from shards.loader import build_loader
    from shards.stream import ShardStream

    stream = ShardStream(data.shards, data.train_split, max_frames=data.max_frames,
                         image_size=model.image_size, sample_fps=data.sample_fps, training=True, seed=seed,
                         shuffle_buffer=data.shuffle_buffer, rank=dist.rank, world_size=dist.world_size,
                         cache=shard_cache(data))
    return build_loader(stream, batch_size=data.batch_size, max_words=data.max_words,
                        num_workers=data.num_workers, training=True, seed=seed, normalise=False)


def eval_loader(data: DataConfig, model: ModelConfig, split: str, shards: list[str] | None = None) -> "StreamLoader":
    """Every sample of ``split`` (of its ``shards`` only, when given) exactly once, in file order
    when ``data.num_workers`` <= 1 (else each worker's batches in turn)."""
    from shards.loader import build_loader
    from shards.stream import ShardStream

    stream = ShardStream(data.shards, split, max_frames=data.max_frames, image_size=model.image_size,
                         sample_fps=data.sample_fps, training=False, shards=shards, cache=shard_cache(data))
    return build_loader(stream, batch_size=data.eval_batch_size, max_words=data.max_words,
                        num_workers=data.num_workers, training=False, seed=0, normalise=False)


__all__ = ["ShardsNotFound", "TrainSource", "corpus_records", "ensure_shards", "eval_loader", "local_train_source",
           "pack_corpus"]
