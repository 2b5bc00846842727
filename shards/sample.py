"""The records a corpus reader yields: a sample to pack, or a row it had to quarantine.

Every corpus packer (``shards.corpora.*``, ``shards.manifest``) yields these, so the writer,
the quarantine log and the packer summary are shared by all corpora.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_\-]")


def sanitize_key(video_id: str) -> str:
    """WebDataset splits a tar member name at its first dot into key and extension, so a key
    must hold no dots (and no path separators)."""
    return _UNSAFE_KEY.sub("_", video_id)


@dataclass
class VideoSample:
    """One retrieval sample: a video (or a clip of it) and its captions."""

    video_id: str
    video_path: Path
    captions: list[str]
    split: str
    corpus: str
    start: float | None = None  # clip window in seconds; None = whole video
    end: float | None = None
    key: str = ""  # tar key; derived from video_id (+ clip / caption index) when empty
    rows: int = 1  # annotation rows this sample was made of (manifest rows merging their captions)

    def __post_init__(self) -> None:
        self.video_path = Path(self.video_path)
        if not self.key:
            self.key = sanitize_key(self.video_id)

    def meta(self) -> dict:
        """The sample's ``json`` member (everything but the video bytes)."""
        return {
            "video_id": self.video_id,
            "captions": list(self.captions),
            "split": self.split,
            "corpus": self.corpus,
            "start": self.start,
            "end": self.end,
        }


@dataclass
class Quarantined:
    """A row that could not become a sample, and why. Written to ``<split>.quarantine.jsonl``."""

    source: str  # the file or video the problem is in
    reason: str
    video_id: str | None = None
    detail: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)
