"""DiDeMo for paragraph retrieval: all moment descriptions of a video joined into one caption,
over the first 30 s (DiDeMo annotated only the first 30 s of longer videos)."""
from __future__ import annotations

from collections.abc import Iterator

from shards.corpora.common import (
    MALFORMED_ROW,
    NO_CAPTIONS,
    AnnotationError,
    CorpusReader,
    Record,
    check_caption,
    check_id,
    load_json,
    read_lines,
    require_files,
)
from shards.sample import Quarantined, VideoSample

CLIP_START, CLIP_END = 0.0, 30.0

LAYOUT = """  train_data.json, val_data.json, test_data.json  [{"video": "<name>", "description": ..., "times": [[a, b], ...]}, ...]
  train_list.txt, val_list.txt, test_list.txt     optional: one video name per line (keeps only those)
  DiDeMo_Videos/<name>  (as named, or with .mp4/.mov/... in place of or after its extension, e.g. x.mov.mp4;
      or data.video_dir, searched recursively)"""


class DidemoCorpus(CorpusReader):
    """Splits: ``train``, ``val``, ``test``."""

    corpus = "didemo"
    splits = ("train", "val", "test")
    video_dirs = ("DiDeMo_Videos", "videos", ".")

    def _check_layout(self) -> None:
        require_files(self.root, self.corpus, [f"{split}_data.json" for split in self.splits], LAYOUT)

    def _listed(self, split: str) -> Iterator[tuple[str, int] | Quarantined]:
        list_path = self.root / f"{split}_list.txt"
        for line, text in read_lines(list_path):
            name = check_id(text, list_path, {"line": line}, field="video name")
            yield name if isinstance(name, Quarantined) else (name, line)

    def _samples(self, split: str) -> Iterator[Record]:
        data_path = self.root / f"{split}_data.json"
        rows = load_json(data_path)
        if not isinstance(rows, list):
            raise AnnotationError(
                f"{data_path}: expected a JSON list of {{video, description, times}} objects, got {type(rows).__name__}"
            )
        descriptions: dict[str, list[str]] = {}
        first_row: dict[str, int] = {}
        for index, row in enumerate(rows):
            where = {"row": index}
            if not isinstance(row, dict) or "description" not in row:
                yield Quarantined(str(data_path), MALFORMED_ROW, None, {**where, "problem": "not an object with 'video' and 'description'"})
                continue
            name = check_id(row.get("video"), data_path, where, field="video")
            if isinstance(name, Quarantined):
                yield name
                continue
            description = check_caption(row["description"], data_path, name, where)
            if isinstance(description, Quarantined):
                yield description
                continue
            first_row.setdefault(name, index)
            descriptions.setdefault(name, []).append(description)

        if (self.root / f"{split}_list.txt").is_file():
            order: list[str] = []
            for item in self._listed(split):
                if isinstance(item, Quarantined):
                    yield item
                    continue
                name, line = item
                if name not in descriptions:
                    yield Quarantined(str(data_path), NO_CAPTIONS, name, {"listed_in": f"{split}_list.txt", "line": line})
                    continue
                order.append(name)
        else:
            order = list(descriptions)

        for name in dict.fromkeys(order):
            path = self._locate((name,), name, data_path, {"row": first_row[name]})
            if isinstance(path, Quarantined):
                yield path
                continue
            yield VideoSample(
                name, path, [" ".join(descriptions[name])], split, self.corpus, start=CLIP_START, end=CLIP_END
            )
