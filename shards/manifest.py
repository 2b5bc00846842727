"""The generic ``manifest`` corpus: a JSONL or CSV list of videos and captions.

JSONL rows: ``{"video": path, "captions": [...] | "caption": str, "video_id"?, "start"?, "end"?}``.
CSV: header with ``video,caption`` and optional ``video_id,start,end``. Video paths are relative to
the manifest's folder (or ``data.video_dir``) unless absolute. Rows naming the same file and
(video_id, start, end) merge their captions (the pack report counts them as rows of one sample).
Two files that would share an id are never merged: when the id is the default (the file name
without its extension, ``a/clip1.mp4`` and ``b/clip1.mp4``) the later file takes its path as its
id (``b/clip1``); when the manifest gives both the same ``video_id``, the later row is quarantined
(``duplicate video_id``) naming both files. Every bad row becomes a ``Quarantined`` record with the manifest path and line number;
good rows are never dropped because of a bad neighbour.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Iterator

from shards.corpora.videos import bare_name
from shards.sample import Quarantined, VideoSample, sanitize_key

_CSV_REQUIRED = ("video", "caption")
DUPLICATE_ID = "duplicate video_id"
UNSAFE_PATH = "unsafe path"
MAX_ROW_CHARS = 1 << 20  # a row is a path and a few captions: a megabyte is not one


class ManifestError(ValueError):
    """The manifest as a whole cannot be read (wrong header, unknown extension)."""


class ManifestCorpus:
    """Reads one manifest file; ``samples(split)`` labels every sample with ``split``."""

    def __init__(self, path: Path, corpus: str = "manifest", video_dir: str = "") -> None:
        self.path = Path(path)
        self.corpus = corpus
        # relative video paths resolve against data.video_dir when set, else the manifest's folder
        self.base = Path(video_dir) if video_dir and Path(video_dir).is_absolute() else self.path.parent / video_dir
        if self.path.suffix.lower() not in (".jsonl", ".csv"):
            raise ManifestError(f"{self.path}: manifest must be .jsonl or .csv")

    def samples(self, split: str) -> Iterator[VideoSample | Quarantined]:
        if not self.path.is_file():
            raise FileNotFoundError(f"manifest {self.path} does not exist; check the corpus path in the config")
        merged: dict[tuple, VideoSample] = {}
        for item in self._rows():
            if isinstance(item, Quarantined):
                yield item
                continue
            line, row = item
            parsed = self._parse(line, row, split)
            if isinstance(parsed, Quarantined):
                yield parsed
                continue
            parsed, explicit_id = parsed
            ident = (parsed.video_id, parsed.start, parsed.end)
            first = merged.get(ident)
            if first is not None and first.video_path != parsed.video_path:
                if explicit_id:  # the manifest says these two files are one video: which one is for the user to say
                    yield Quarantined(self._where(line), DUPLICATE_ID, parsed.video_id,
                                      {"video": str(parsed.video_path), "first_video": str(first.video_path),
                                       "fix": "give each file its own video_id"})
                    continue
                parsed = self._renamed(parsed)  # two files share a stem: the later one is named by its path
                ident, first = (parsed.video_id, parsed.start, parsed.end), None
            if first is not None:
                first.captions.extend(c for c in parsed.captions if c not in first.captions)
                first.rows += 1
            else:
                merged[ident] = parsed
        keys: set[str] = set()
        for sample in merged.values():  # dicts keep first-appearance order
            key, n = sample.key, 1
            while key in keys:  # distinct ids can collide after sanitising ("a.b" vs "a_b")
                n += 1
                key = f"{sample.key}-{n}"
            sample.key = key
            keys.add(key)
            yield sample

    def _renamed(self, sample: VideoSample) -> VideoSample:
        try:
            relative = sample.video_path.relative_to(self.base)
        except ValueError:
            relative = sample.video_path
        video_id = relative.with_suffix("").as_posix().lstrip("/")
        key = video_id if sample.start is None and sample.end is None else f"{video_id}_{sample.start}_{sample.end}"
        sample.video_id, sample.key = video_id, sanitize_key(key)
        return sample

    # --- reading -------------------------------------------------------------------------------
    def _where(self, line: int) -> str:
        return f"{self.path}:{line}"

    def _decoded_lines(self) -> Iterator[tuple[int, str | Quarantined]]:
        """Lines decoded one by one, so a single non-UTF-8 line only costs that line."""
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    yield number, raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as exn:
                    yield number, Quarantined(self._where(number), "caption not valid UTF-8", detail={"error": str(exn)})

    def _rows(self) -> Iterator[tuple[int, dict] | Quarantined]:
        if self.path.suffix.lower() == ".jsonl":
            yield from self._jsonl_rows()
        else:
            yield from self._csv_rows()

    def _jsonl_rows(self) -> Iterator[tuple[int, dict] | Quarantined]:
        for number, text in self._decoded_lines():
            if isinstance(text, Quarantined):
                yield text
                continue
            if not text.strip():
                continue
            if len(text) > MAX_ROW_CHARS:
                yield Quarantined(self._where(number), "malformed row", detail={"error": f"{len(text)} characters"})
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exn:
                yield Quarantined(self._where(number), "malformed row", detail={"error": str(exn)})
                continue
            except RecursionError:
                yield Quarantined(self._where(number), "malformed row", detail={"error": "nested too deeply"})
                continue
            if not isinstance(row, dict):
                yield Quarantined(self._where(number), "malformed row")
                continue
            yield number, row

    def _csv_rows(self) -> Iterator[tuple[int, dict] | Quarantined]:
        lines = self._decoded_lines()
        header: list[str] | None = None
        for number, text in lines:
            if isinstance(text, Quarantined):
                yield text
                continue
            if not text.strip():
                continue
            cells = next(csv.reader([text]))
            if header is None:
                header = [c.strip() for c in cells]
                missing = [c for c in _CSV_REQUIRED if c not in header]
                if missing:
                    raise ManifestError(
                        f"{self.path}:{number}: CSV header {header} lacks columns {missing}; "
                        f"expected video,caption[,video_id,start,end]"
                    )
                continue
            if len(cells) != len(header):
                yield Quarantined(self._where(number), "malformed row",
                                  detail={"expected": len(header), "got": len(cells)})
                continue
            yield number, dict(zip(header, cells))

    # --- validation ----------------------------------------------------------------------------
    def _parse(self, line: int, row: dict, split: str) -> tuple[VideoSample, bool] | Quarantined:
        """The row's sample and whether its video_id was given (not defaulted to the file stem)."""
        where = self._where(line)
        video = row.get("video")
        if not isinstance(video, str) or not video.strip():
            return Quarantined(where, "malformed row")
        video_path = Path(video)
        if not video_path.is_absolute():
            if ".." in video_path.parts:  # a relative path stays under its folder; absolute paths say where
                return Quarantined(where, UNSAFE_PATH, None, {"video": video, "problem": "relative path leaves "
                                   f"{self.base} ('..'); write the absolute path if the file is elsewhere"})
            video_path = self.base / video_path
        explicit_id = str(row.get("video_id") or "").strip()
        video_id = explicit_id or bare_name(Path(video).name)
        if "captions" in row:
            captions = row["captions"]
        else:
            captions = [row.get("caption")] if row.get("caption") is not None else []
        if isinstance(captions, str) or not isinstance(captions, list):
            return Quarantined(where, "malformed row", video_id)
        if not all(isinstance(c, str) for c in captions):
            return Quarantined(where, "malformed row", video_id)
        captions = [c.strip() for c in captions if c.strip()]
        try:
            for c in captions:
                c.encode("utf-8")  # JSON escapes can smuggle in lone surrogates
        except UnicodeEncodeError as exn:
            return Quarantined(where, "caption not valid UTF-8", video_id, {"error": str(exn)})
        if not captions:
            return Quarantined(where, "empty caption", video_id)
        try:
            start, end = _seconds(row.get("start")), _seconds(row.get("end"))
        except ValueError as exn:
            return Quarantined(where, "bad start/end", video_id, {"error": str(exn)})
        if start is not None and end is not None and end <= start:
            return Quarantined(where, "bad start/end", video_id, {"error": f"end {end} <= start {start}"})
        if not video_path.is_file():
            return Quarantined(where, "video missing", video_id, {"video": str(video_path)})
        key = video_id if start is None and end is None else f"{video_id}_{start}_{end}"
        return VideoSample(video_id=video_id, video_path=video_path, captions=captions, split=split,
                           corpus=self.corpus, start=start, end=end, key=sanitize_key(key)), bool(explicit_id)


def _seconds(value) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a time in seconds")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a time in seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r} must be a finite time >= 0 seconds")
    return seconds
