"""ActivityNet Captions for paragraph retrieval: one sample per video whose caption is all of its
sentences joined, over the whole video."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shards.corpora.common import (
    EMPTY_CAPTION,
    MALFORMED_ROW,
    AnnotationError,
    CorpusReader,
    Record,
    check_caption,
    check_id,
    load_json,
    require_files,
)
from shards.sample import Quarantined, VideoSample

ANNOTATIONS = {"train": "train.json", "val_1": "val_1.json"}
ID_FILTERS = {"train": "train_ids.json", "val_1": "val_ids.json"}

LAYOUT = """  train.json, val_1.json        {"<id>": {"duration": s, "timestamps": [[a, b], ...], "sentences": [...]}}
  train_ids.json, val_ids.json  optional: a list of the ids to keep
  Activity_Videos/v_<id>.mp4|.mkv|.webm  (or data.video_dir, searched recursively)"""


@dataclass
class DurationVideoSample(VideoSample):
    """A VideoSample that also carries the annotated video duration (seconds). Its meta key is
    ``annotated_duration``: the writer stores the probed ``duration`` of the file itself."""

    duration: float | None = None

    def meta(self) -> dict:
        return {**super().meta(), "annotated_duration": self.duration}


def with_v_prefix(video_id: str) -> str:
    """ActivityNet ids appear both as ``v_<youtube id>`` and bare; files are always ``v_<id>``."""
    return video_id if video_id.startswith("v_") else f"v_{video_id}"


class ActivityNetCorpus(CorpusReader):
    """Splits: ``train``, ``val_1`` (the usual 4,917-video test set)."""

    corpus = "activitynet"
    splits = ("train", "val_1")
    video_dirs = ("Activity_Videos", "videos", ".")

    def _check_layout(self) -> None:
        require_files(self.root, self.corpus, ANNOTATIONS.values(), LAYOUT)

    def _id_filter(self, split: str) -> tuple[Path, list] | None:
        path = self.root / ID_FILTERS[split]
        if not path.is_file():
            return None
        ids = load_json(path)
        if not isinstance(ids, list):
            raise AnnotationError(f"{path}: expected a JSON list of video ids, got {type(ids).__name__}")
        return path, ids

    def _samples(self, split: str) -> Iterator[Record]:
        ann_path = self.root / ANNOTATIONS[split]
        annotations = load_json(ann_path)
        if not isinstance(annotations, dict):
            raise AnnotationError(
                f"{ann_path}: expected an object {{id: {{duration, timestamps, sentences}}}}, got {type(annotations).__name__}"
            )
        by_id: dict[str, tuple[str, object]] = {}
        for raw_id, entry in annotations.items():
            video_id = check_id(raw_id, ann_path, {"id": ascii(raw_id)}, field="id")
            if isinstance(video_id, Quarantined):
                yield video_id
                continue
            if with_v_prefix(video_id) in by_id:  # both "<id>" and "v_<id>" present
                yield Quarantined(
                    str(ann_path), MALFORMED_ROW, with_v_prefix(video_id),
                    {"id": raw_id, "problem": f"same video as id {by_id[with_v_prefix(video_id)][0]!r}"},
                )
                continue
            by_id[with_v_prefix(video_id)] = (raw_id, entry)

        wanted: list[str] = list(by_id)
        id_filter = self._id_filter(split)
        if id_filter is not None:
            filter_path, listed = id_filter
            wanted = []
            for index, raw_id in enumerate(listed):
                video_id = check_id(raw_id, filter_path, {"index": index})
                if isinstance(video_id, Quarantined):
                    yield video_id
                    continue
                video_id = with_v_prefix(video_id)
                if video_id not in by_id:
                    yield Quarantined(
                        str(filter_path), MALFORMED_ROW, video_id,
                        {"index": index, "problem": f"id has no entry in {ann_path.name}"},
                    )
                    continue
                wanted.append(video_id)

        for video_id in dict.fromkeys(wanted):
            raw_id, entry = by_id[video_id]
            yield self._sample(split, ann_path, video_id, raw_id, entry)

    def _sample(self, split: str, ann_path: Path, video_id: str, raw_id: str, entry: object) -> Record:
        where = {"id": raw_id}
        if not isinstance(entry, dict) or not isinstance(entry.get("sentences"), list):
            return Quarantined(str(ann_path), MALFORMED_ROW, video_id, {**where, "problem": "entry lacks a 'sentences' list"})
        duration = entry.get("duration")
        if duration is not None and (isinstance(duration, bool) or not isinstance(duration, (int, float))):
            return Quarantined(str(ann_path), MALFORMED_ROW, video_id, {**where, "problem": f"duration {duration!r} is not a number"})
        sentences: list[str] = []
        for index, sentence in enumerate(entry["sentences"]):
            checked = check_caption(sentence, ann_path, video_id, {**where, "sentence_index": index})
            if isinstance(checked, Quarantined):
                if checked.reason == EMPTY_CAPTION:  # a blank sentence adds nothing to the paragraph
                    continue
                return checked  # half a paragraph would be a different caption: drop the video
            sentences.append(checked)
        if not sentences:
            return Quarantined(str(ann_path), EMPTY_CAPTION, video_id, where)
        bare = video_id[2:]
        path = self._locate((video_id, bare), video_id, ann_path, where)
        if isinstance(path, Quarantined):
            return path
        return DurationVideoSample(
            video_id, path, [" ".join(sentences)], split, self.corpus,
            duration=None if duration is None else float(duration),
        )
