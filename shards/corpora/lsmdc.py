"""LSMDC 2016 (movie description): one sample per clip; each clip file is already cut, so the
window is the whole file."""
from __future__ import annotations

from collections.abc import Iterator

from shards.corpora.common import (
    MALFORMED_ROW,
    CorpusReader,
    Record,
    check_caption,
    check_id,
    read_lines,
    require_files,
)
from shards.sample import Quarantined, VideoSample

ANNOTATIONS = {
    "train": "LSMDC16_annos_training.csv",
    "val": "LSMDC16_annos_val.csv",
    "test": "LSMDC16_challenge_1000_publictect.csv",  # sic: the released file name has this typo
}
COLUMNS = ("clip_id", "start", "end", "start_aligned", "end_aligned", "sentence")

LAYOUT = f"""  {ANNOTATIONS['train']}, {ANNOTATIONS['val']}, {ANNOTATIONS['test']}
      tab-separated, no header: {' '.join(COLUMNS)}
  avi/<movie>/<clip_id>.avi  (or data.video_dir, searched recursively), movie = clip_id without its last "_..." part,
      e.g. 0001_American_Beauty/0001_American_Beauty_00.00.51.926-00.00.54.129.avi"""


def movie_of(clip_id: str) -> str:
    """``0001_American_Beauty_00.00.51.926-00.00.54.129`` -> ``0001_American_Beauty``."""
    return clip_id.rsplit("_", 1)[0]


class LsmdcCorpus(CorpusReader):
    """Splits: ``train``, ``val``, ``test`` (the 1,000-clip public test)."""

    corpus = "lsmdc"
    splits = ("train", "val", "test")
    video_dirs = ("avi", "videos", ".")

    def _check_layout(self) -> None:
        require_files(self.root, self.corpus, ANNOTATIONS.values(), LAYOUT)

    def _samples(self, split: str) -> Iterator[Record]:
        ann_path = self.root / ANNOTATIONS[split]
        # A clip annotated on several lines is one video: its sentences become one sample's captions.
        captions: dict[str, list[str]] = {}
        first_line: dict[str, int] = {}
        for line, text in read_lines(ann_path):
            where = {"line": line}
            fields = text.split("\t", len(COLUMNS) - 1)  # a stray tab inside the sentence stays in it
            if len(fields) != len(COLUMNS):
                yield Quarantined(
                    str(ann_path), MALFORMED_ROW, None,
                    {**where, "problem": f"{len(fields)} tab-separated fields, expected {len(COLUMNS)}: {' '.join(COLUMNS)}"},
                )
                continue
            clip_id = check_id(fields[0], ann_path, where, field="clip_id")
            if isinstance(clip_id, Quarantined):
                yield clip_id
                continue
            if "_" not in clip_id:
                yield Quarantined(str(ann_path), MALFORMED_ROW, clip_id, {**where, "problem": "clip_id has no '_<time span>' suffix"})
                continue
            caption = check_caption(fields[-1], ann_path, clip_id, where)
            if isinstance(caption, Quarantined):
                yield caption
                continue
            first_line.setdefault(clip_id, line)
            captions.setdefault(clip_id, []).append(caption)

        for clip_id, clip_captions in captions.items():
            path = self._locate((clip_id,), clip_id, ann_path, {"line": first_line[clip_id]})
            if isinstance(path, Quarantined):
                yield path
                continue
            yield VideoSample(clip_id, path, clip_captions, split, self.corpus)
