"""Readers for the public retrieval corpora, each parsing its own on-disk annotation layout
(method.md §7) into :class:`~shards.sample.VideoSample` / :class:`~shards.sample.Quarantined`
records for ``shards.writer.pack_split``. Readers never decode video; the writer probes it."""
from __future__ import annotations

from pathlib import Path

from shards.corpora.activitynet import ActivityNetCorpus, DurationVideoSample
from shards.corpora.common import AnnotationError, CorpusReader
from shards.corpora.didemo import DidemoCorpus
from shards.corpora.lsmdc import LsmdcCorpus
from shards.corpora.msrvtt import MsrvttCorpus
from shards.corpora.msvd import MsvdCorpus

CORPORA: dict[str, type[CorpusReader]] = {
    reader.corpus: reader for reader in (MsrvttCorpus, ActivityNetCorpus, DidemoCorpus, MsvdCorpus, LsmdcCorpus)
}


def open_corpus(name: str, root: Path, video_dir: str = "") -> CorpusReader:
    """The reader for corpus ``name`` (case-insensitive) over the annotations under ``root``, its
    videos under ``video_dir`` (absolute or relative to ``root``; "" = the download layout's)."""
    reader = CORPORA.get(name.lower())
    if reader is None:
        raise ValueError(f"unknown corpus {name!r}; known corpora: {', '.join(sorted(CORPORA))}")
    return reader(Path(root), video_dir)


__all__ = [
    "CORPORA",
    "ActivityNetCorpus",
    "AnnotationError",
    "CorpusReader",
    "DidemoCorpus",
    "DurationVideoSample",
    "LsmdcCorpus",
    "MsrvttCorpus",
    "MsvdCorpus",
    "open_corpus",
]
