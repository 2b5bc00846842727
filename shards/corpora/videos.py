"""Where a corpus keeps its videos: its folder (``data.video_dir`` or the download layout's default)
walked once, recursively, into a name -> paths map.

Real video folders hold 10k-100k files, often in sub-folders (LSMDC ``avi/<movie>/``, MSRVTT
``videos/all/``): one ``os.walk`` is a few directory reads where a stat per candidate name and
extension is ``ids x extensions`` syscalls (100k ids x 11 extensions on network storage is minutes).
A name is matched with every known video extension stripped (``x.mov.mp4``, ``x.mov`` and
``x.MP4`` are all ``x``: DiDeMo's download script writes ``.mov.mp4``), so two files answering
to one id are found, reported with both paths, and never silently picked between.
"""
from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".3gp", ".wmv", ".flv")


def bare_name(name: str) -> str:
    """``name`` with every trailing known video extension removed (case-insensitive)."""
    while True:
        stem, dot, ext = name.rpartition(".")
        if not dot or not stem or f".{ext.lower()}" not in VIDEO_EXTENSIONS:
            return name
        name = stem


def resolve_video_dir(root: Path, video_dir: str, defaults: Sequence[str], corpus: str) -> Path:
    """The folder to walk: ``video_dir`` (absolute, or relative to ``root``) when set, else the
    first of the corpus' download-layout ``defaults`` that exists under ``root``."""
    if video_dir:
        path = Path(video_dir) if Path(video_dir).is_absolute() else Path(root) / video_dir
        if not path.is_dir():
            raise FileNotFoundError(f"{corpus}: data.video_dir={video_dir} -> {path} is not a directory; point it at "
                                    f"the folder holding the videos (absolute, or relative to data.root={root})")
        return path
    for candidate in defaults:
        if (Path(root) / candidate).is_dir():
            return Path(root) / candidate
    raise FileNotFoundError(f"{corpus}: no video folder under {root} (looked for {', '.join(defaults)}); "
                            f"set data.video_dir=<folder holding the videos>")


class VideoIndex:
    """Every video file under ``folder`` (recursively, following links, skipping hidden folders)
    by its bare name."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._paths: dict[str, list[Path]] = defaultdict(list)
        for dirpath, dirnames, filenames in os.walk(self.folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # .packing-* and friends
            for name in filenames:
                bare = bare_name(name)
                if bare != name:
                    self._paths[bare].append(Path(dirpath) / name)

    def __len__(self) -> int:
        return sum(len(paths) for paths in self._paths.values())

    def find(self, names: Sequence[str]) -> list[Path]:
        """The files of the first of ``names`` that has any (one = found, several = ambiguous,
        none = missing); ``names`` are ids as annotated, with or without extensions."""
        for name in names:
            paths = self._paths.get(bare_name(name))
            if paths:
                return sorted(paths)
        return []
