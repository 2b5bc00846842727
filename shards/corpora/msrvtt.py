"""MSR-VTT in the CLIP4Clip layout: the 9k training videos with all their captions, and the
1k-A test (one caption per video, taken from the JSFusion CSV)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from shards.corpora.common import (
    MALFORMED_ROW,
    NO_CAPTIONS,
    AnnotationError,
    CorpusReader,
    Record,
    check_caption,
    check_id,
    load_json,
    read_csv_rows,
    require_files,
)
from shards.sample import Quarantined, VideoSample

DATA_JSON = "MSRVTT_data.json"
TRAIN_CSV = "MSRVTT_train.9k.csv"
TEST_CSV = "MSRVTT_JSFUSION_test.csv"

LAYOUT = f"""  {DATA_JSON}      {{"videos": [{{"video_id": ...}}], "sentences": [{{"video_id": ..., "caption": ...}}]}}
  {TRAIN_CSV}    column video_id
  {TEST_CSV}  columns key,vid_key,video_id,sentence
  MSRVTT/videos/all/<video_id>.mp4  (MSRVTT.zip unpacked beside them; or data.video_dir, searched recursively)"""


class MsrvttCorpus(CorpusReader):
    """Splits: ``train`` (one sample per 9k video, all its captions), ``test`` (1k-A)."""

    corpus = "msrvtt"
    splits = ("train", "test")
    video_dirs = ("MSRVTT/videos/all", "videos/all", "videos", ".")

    def _check_layout(self) -> None:
        require_files(self.root, self.corpus, (DATA_JSON, TRAIN_CSV, TEST_CSV), LAYOUT)

    def _samples(self, split: str) -> Iterator[Record]:
        return self._train() if split == "train" else self._test()

    def _train(self) -> Iterator[Record]:
        ids_path = self.root / TRAIN_CSV
        video_ids: list[str] = []
        listed_at: dict[str, int] = {}
        for line, row in read_csv_rows(ids_path, ("video_id",)):
            where = {"line": line}
            if row is None:
                yield Quarantined(str(ids_path), MALFORMED_ROW, None, {**where, "problem": "field count differs from header"})
                continue
            video_id = check_id(row["video_id"], ids_path, where)
            if isinstance(video_id, Quarantined):
                yield video_id
                continue
            if video_id not in listed_at:  # a repeated id is the same video, not a second sample
                listed_at[video_id] = line
                video_ids.append(video_id)

        data_path = self.root / DATA_JSON
        captions: dict[str, list[str]] = {vid: [] for vid in video_ids}
        for index, sentence in enumerate(self._sentences(data_path)):
            where = {"sentence_index": index}
            if not isinstance(sentence, dict):
                yield Quarantined(str(data_path), MALFORMED_ROW, None, {**where, "problem": "sentence is not an object"})
                continue
            video_id = check_id(sentence.get("video_id"), data_path, where)
            if isinstance(video_id, Quarantined):
                yield video_id
                continue
            if video_id not in captions:  # a test/val video: not part of this split
                continue
            if "caption" not in sentence:
                yield Quarantined(str(data_path), MALFORMED_ROW, video_id, {**where, "problem": "no 'caption' field"})
                continue
            caption = check_caption(sentence["caption"], data_path, video_id, where)
            if isinstance(caption, Quarantined):
                yield caption
                continue
            captions[video_id].append(caption)

        for video_id in video_ids:
            where = {"line": listed_at[video_id]}
            if not captions[video_id]:
                yield Quarantined(str(data_path), NO_CAPTIONS, video_id, {"listed_in": str(ids_path), **where})
                continue
            path = self._locate((video_id,), video_id, ids_path, where)
            if isinstance(path, Quarantined):
                yield path
                continue
            yield VideoSample(video_id, path, captions[video_id], "train", self.corpus)

    def _sentences(self, data_path: Path) -> list:
        data = load_json(data_path)
        if not isinstance(data, dict) or not isinstance(data.get("sentences"), list) or not isinstance(data.get("videos"), list):
            raise AnnotationError(
                f"{data_path}: expected an object with lists 'videos' and 'sentences' "
                f"(the MSRVTT_data.json of CLIP4Clip); got {type(data).__name__}"
                + (f" with keys {sorted(data)[:10]}" if isinstance(data, dict) else "")
            )
        return data["sentences"]

    def _test(self) -> Iterator[Record]:
        test_path = self.root / TEST_CSV
        for line, row in read_csv_rows(test_path, ("key", "vid_key", "video_id", "sentence")):
            where = {"line": line}
            if row is None:
                yield Quarantined(str(test_path), MALFORMED_ROW, None, {**where, "problem": "field count differs from header"})
                continue
            video_id = check_id(row["video_id"], test_path, where)
            if isinstance(video_id, Quarantined):
                yield video_id
                continue
            caption = check_caption(row["sentence"], test_path, video_id, where)
            if isinstance(caption, Quarantined):
                yield caption
                continue
            path = self._locate((video_id,), video_id, test_path, where)
            if isinstance(path, Quarantined):
                yield path
                continue
            yield VideoSample(video_id, path, [caption], "test", self.corpus)
