"""Helpers shared by the corpus readers: strict text decoding, layout checks, video lookup,
caption validation and the per-split key uniqueness guard.

Annotation files are read as bytes and decoded with ``surrogateescape``: a file with a few bad
bytes still parses, and each string that carries them fails :func:`is_valid_utf8`, so only the
rows holding them are quarantined instead of the whole corpus being rejected.
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from shards.corpora.videos import VideoIndex, resolve_video_dir
from shards.sample import Quarantined, VideoSample

Record = VideoSample | Quarantined

# Quarantine reasons, shared so the packer summary can count them across corpora.
VIDEO_MISSING = "video missing"
EMPTY_CAPTION = "empty caption"
NOT_UTF8 = "caption not valid UTF-8"
MALFORMED_ROW = "malformed row"
NO_CAPTIONS = "no captions"
DUPLICATE_KEY = "duplicate key"
AMBIGUOUS_VIDEO = "ambiguous video"


class AnnotationError(ValueError):
    """An annotation file is unusable as a whole (unparsable, wrong top-level shape)."""


class UnknownSplit(ValueError):
    """A split the corpus does not have."""


def read_text(path: Path) -> str:
    """The file's text; undecodable bytes survive as lone surrogates (see module doc)."""
    check_size(path)
    return Path(path).read_bytes().decode("utf-8", errors="surrogateescape")


def is_valid_utf8(text: str) -> bool:
    """False when ``text`` holds bytes that were not UTF-8 (or lone surrogates from JSON escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# The largest annotation file read whole: the biggest real one (MSRVTT_data.json) is ~20 MB, so a
# file 10x larger than any corpus ships is refused before it is read into memory.
MAX_ANNOTATION_BYTES = 256 * 2**20


def check_size(path: Path, limit: int = MAX_ANNOTATION_BYTES) -> None:
    size = Path(path).stat().st_size
    if size > limit:
        raise AnnotationError(f"{path}: {size / 2**20:.0f} MB, over the {limit / 2**20:.0f} MB an annotation file may "
                              f"be (real ones are < 30 MB); is this the right file?")


def load_json(path: Path) -> Any:
    """Parse a JSON annotation file; an unparsable, oversized or absurdly nested file raises
    :class:`AnnotationError` naming it."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise AnnotationError(
            f"{path}: not valid JSON ({err}); re-download or re-export this annotation file"
        ) from err
    except RecursionError:
        raise AnnotationError(f"{path}: JSON nested deeper than any annotation file is (the parser's recursion "
                              f"limit); re-download or re-export this annotation file") from None


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline) for every non-blank line. Lines are not
    stripped: an empty last field of a tab-separated row must stay an (empty) field."""
    # split("\n"), not splitlines(): the latter also breaks at U+2028, form feeds etc. inside captions
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            yield number, line


def read_csv_rows(
    path: Path, required: Sequence[str], delimiter: str = ","
) -> Iterator[tuple[int, dict[str, str] | None]]:
    """(line number, row) for each data row of a CSV with a header holding ``required`` columns.

    A row whose field count differs from the header's comes back as ``None`` so the caller can
    quarantine it with its line number; a header missing a column raises :class:`AnnotationError`.
    """
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        raise AnnotationError(f"{path}: empty file; expected a header row with columns {list(required)}")
    header = [name.strip().lstrip("\ufeff") for name in header]
    missing = [name for name in required if name not in header]
    if missing:
        raise AnnotationError(
            f"{path}: header {header} lacks column(s) {missing}; expected columns {list(required)}"
        )
    for row in reader:
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            yield reader.line_num, None
        else:
            yield reader.line_num, dict(zip(header, row))


def require_files(root: Path, corpus: str, names: Iterable[str], layout: str) -> None:
    """Raise FileNotFoundError naming the first missing annotation file and the expected layout."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{corpus}: corpus root {root} is not a directory. Expected layout:\n{layout}")
    for name in names:
        if not (root / name).is_file():
            raise FileNotFoundError(
                f"{corpus}: annotation file {root / name} not found. Expected layout under {root}:\n{layout}"
            )


def video_missing(folder: Path, names: Sequence[str], video_id: str, annotation: Path, where: dict) -> Quarantined:
    return Quarantined(
        source=str(Path(folder) / names[0]),
        reason=VIDEO_MISSING,
        video_id=video_id,
        detail={"annotation": str(annotation), **where, "searched": str(folder), "names": list(names),
                "fix": "put the video under the searched folder or set data.video_dir"},
    )


def check_caption(value: Any, annotation: Path, video_id: str | None, where: dict) -> str | Quarantined:
    """The stripped caption, or the Quarantined record saying why ``value`` is not one."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return Quarantined(str(annotation), NOT_UTF8, video_id, {**where, "caption": repr(value)})
    if not isinstance(value, str):
        return Quarantined(
            str(annotation), MALFORMED_ROW, video_id,
            {**where, "problem": f"caption is {type(value).__name__}, expected a string"},
        )
    if not is_valid_utf8(value):
        return Quarantined(str(annotation), NOT_UTF8, video_id, {**where, "caption": ascii(value)})
    value = value.strip()
    if not value:
        return Quarantined(str(annotation), EMPTY_CAPTION, video_id, dict(where))
    return value


def check_id(value: Any, annotation: Path, where: dict, field: str = "video_id") -> str | Quarantined:
    """A non-empty, valid UTF-8 identifier, or the Quarantined record saying what is wrong."""
    if not isinstance(value, str) or not value.strip():
        return Quarantined(
            str(annotation), MALFORMED_ROW, None, {**where, "problem": f"{field} missing or not a string: {value!r}"}
        )
    if not is_valid_utf8(value):
        return Quarantined(str(annotation), MALFORMED_ROW, None, {**where, "problem": f"{field} not valid UTF-8: {ascii(value)}"})
    return value.strip()


def unique_keys(records: Iterable[Record], corpus: str, split: str) -> Iterator[Record]:
    """Pass records through, quarantining a sample whose tar key was already used in the split:
    two members with one key would silently merge in the tar."""
    seen: dict[str, str] = {}
    for record in records:
        if isinstance(record, VideoSample):
            if record.key in seen:
                yield Quarantined(
                    str(record.video_path), DUPLICATE_KEY, record.video_id,
                    {"key": record.key, "first_video_id": seen[record.key], "corpus": corpus, "split": split},
                )
                continue
            seen[record.key] = record.video_id
        yield record


class CorpusReader:
    """Base of the readers: ``samples(split)`` checks the split eagerly, then streams records
    with unique keys. Subclasses set ``corpus``/``splits``/``video_dirs`` (the download layout's
    video folders, relative to the root, first existing one wins) and implement ``_check_layout``
    and ``_samples``, finding videos with ``_locate``."""

    corpus: ClassVar[str]
    splits: ClassVar[tuple[str, ...]]
    video_dirs: ClassVar[tuple[str, ...]]

    def __init__(self, root: Path, video_dir: str = "") -> None:
        self.root = Path(root)
        self._check_layout()
        self.video_folder = resolve_video_dir(self.root, video_dir, self.video_dirs, self.corpus)
        self._videos: VideoIndex | None = None

    def _locate(self, names: Sequence[str], video_id: str, annotation: Path, where: dict) -> Path | Quarantined:
        """The one file answering to the first of ``names`` that has any; quarantined when there
        is none, or more than one (both paths named: which is the right one is the user's call)."""
        if self._videos is None:
            self._videos = VideoIndex(self.video_folder)  # walked once, on first use, for all splits
        paths = self._videos.find(names)
        if not paths:
            return video_missing(self.video_folder, names, video_id, annotation, where)
        if len(paths) > 1:
            return Quarantined(str(paths[0]), AMBIGUOUS_VIDEO, video_id,
                               {"annotation": str(annotation), **where, "paths": [str(p) for p in paths],
                                "fix": "keep one file per id, or set data.video_dir to the folder of the right ones"})
        return paths[0]

    def _check_layout(self) -> None:
        raise NotImplementedError

    def _samples(self, split: str) -> Iterator[Record]:
        raise NotImplementedError

    def samples(self, split: str) -> Iterator[Record]:
        """Every record of ``split``: a VideoSample per good item, a Quarantined per dropped one."""
        if split not in self.splits:
            raise UnknownSplit(f"{self.corpus}: unknown split {split!r}; this corpus has splits {list(self.splits)} "
                               f"(pass --splits {','.join(self.splits)} or a subset)")
        return unique_keys(self._samples(split), self.corpus, split)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r})"
