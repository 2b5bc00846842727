"""MSVD in the CLIP4Clip layout: one sample per video holding all its captions (about 41 each).
Training picks one caption per epoch; evaluation ranks each caption against the videos (t2v) and
each video among videos, rivals represented by their best caption (v2t; method.md section 6).
A gallery with one sample per caption would hold every video ~41 times, competing with itself."""
from __future__ import annotations

import io
import pickle
from collections.abc import Iterator
from pathlib import Path

from shards.corpora.common import (
    MALFORMED_ROW,
    NO_CAPTIONS,
    NOT_UTF8,
    AnnotationError,
    CorpusReader,
    Record,
    check_caption,
    check_size,
    check_id,
    read_lines,
    require_files,
)
from shards.sample import Quarantined, VideoSample, sanitize_key

CAPTIONS_PKL = "raw-captions.pkl"

LAYOUT = f"""  train_list.txt, val_list.txt, test_list.txt  one video id per line
  {CAPTIONS_PKL}  {{video_id: [caption, ...]}}, each caption a string or a list of tokens
  YouTubeClips/<video_id>.avi  (YouTubeClips.tar unpacked; or data.video_dir, searched recursively)"""


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles only builtin containers and strings: a captions file has no reason to import
    anything, and refusing lets a tampered file fail instead of running code."""

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain dicts/lists/strings are expected")


def load_captions(path: Path) -> dict[str, list]:
    """The ``{video_id: captions}`` dict of raw-captions.pkl (Python 3 or Python 2 pickles)."""
    check_size(path)
    raw = Path(path).read_bytes()
    try:
        try:
            data = _PlainDataUnpickler(io.BytesIO(raw)).load()
        except UnicodeDecodeError:  # a Python 2 pickle with non-ASCII str: keep bytes, decode per caption
            data = _PlainDataUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise AnnotationError(f"{path}: cannot unpickle the captions ({err}); expected {{video_id: [caption, ...]}}") from err
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a dict {{video_id: [caption, ...]}}, got {type(data).__name__}")
    return {
        (key.decode("utf-8", errors="surrogateescape") if isinstance(key, bytes) else key): value
        for key, value in data.items()
    }


def caption_text(caption: object) -> object:
    """A token list becomes its words joined by spaces; anything else is checked as it is."""
    if isinstance(caption, list | tuple):
        if not all(isinstance(token, str | bytes) for token in caption):
            return None  # check_caption reports it as malformed
        tokens = [token.decode("utf-8") if isinstance(token, bytes) else token for token in caption]
        return " ".join(tokens)
    return caption


class MsvdCorpus(CorpusReader):
    """Splits: ``train``, ``val``, ``test``; one sample per video, key ``<video_id>`` (tar-safe)."""

    corpus = "msvd"
    splits = ("train", "val", "test")
    video_dirs = ("YouTubeClips", "videos", ".")

    def _check_layout(self) -> None:
        require_files(self.root, self.corpus, [f"{split}_list.txt" for split in self.splits] + [CAPTIONS_PKL], LAYOUT)

    def _samples(self, split: str) -> Iterator[Record]:
        list_path = self.root / f"{split}_list.txt"
        pkl_path = self.root / CAPTIONS_PKL
        captions = load_captions(pkl_path)
        for line, text in read_lines(list_path):
            video_id = check_id(text, list_path, {"line": line})
            if isinstance(video_id, Quarantined):
                yield video_id
                continue
            raw_captions = captions.get(video_id)
            if not isinstance(raw_captions, list) or not raw_captions:
                problem = "absent" if raw_captions is None else f"not a non-empty list: {type(raw_captions).__name__}"
                yield Quarantined(str(pkl_path), NO_CAPTIONS, video_id, {"listed_in": str(list_path), "line": line, "problem": problem})
                continue
            path = self._locate((video_id,), video_id, list_path, {"line": line})
            if isinstance(path, Quarantined):
                yield path
                continue
            good = []
            for index, raw in enumerate(raw_captions):
                where = {"video_id": video_id, "caption_index": index}
                try:
                    text_or_none = caption_text(raw)
                except UnicodeDecodeError:
                    yield Quarantined(str(pkl_path), NOT_UTF8, video_id, {**where, "caption": repr(raw)})
                    continue
                if text_or_none is None:
                    yield Quarantined(str(pkl_path), MALFORMED_ROW, video_id, {**where, "problem": "token list holds non-strings"})
                    continue
                caption = check_caption(text_or_none, pkl_path, video_id, where)
                if isinstance(caption, Quarantined):
                    yield caption
                    continue
                good.append(caption)
            if not good:
                yield Quarantined(str(pkl_path), NO_CAPTIONS, video_id,
                                  {"listed_in": str(list_path), "line": line, "problem": "no usable caption"})
                continue
            yield VideoSample(video_id, path, good, split, self.corpus, key=sanitize_key(video_id))
