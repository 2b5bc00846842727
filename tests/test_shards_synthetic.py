"""The embedded synthetic corpus: distinct test combinations, cached generation, real motion."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shards.decode import decode_frames
from shards.synthetic import COLOURS, COMBOS, captions_for, carve_val, generate_synthetic_corpus


def rows(root: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]


def test_test_split_has_distinct_combinations_and_unique_captions(synthetic_corpus) -> None:
    test = rows(synthetic_corpus, "test")
    assert len(test) == 12 and len(rows(synthetic_corpus, "train")) == 24
    combos = [tuple(r["attributes"][k] for k in ("shape", "colour", "size", "direction")) for r in test]
    assert len(set(combos)) == 12 and set(combos) <= set(COMBOS)
    captions = [c for r in test for c in r["captions"]]
    assert len(captions) == len(set(captions)) == 24  # every test caption names exactly one test video
    assert all((synthetic_corpus / r["video"]).is_file() for r in test)
    assert len(COMBOS) == 96
    assert captions_for("square", "red", "small", "left->right", 2) == [
        "a small red square moves from the left to the right", "a red square, small, slides to the right"]


def test_val_is_carved_from_train_with_distinct_combinations_as_test_has() -> None:
    # repeats at the end of train, as free draws give: the last n_val rows would hold "a" twice
    train = [{"video_id": f"v{i}", "attributes": {"shape": s, "size": "small"}}
             for i, s in enumerate(["a", "b", "c", "a", "b", "a"])]
    rest, val = carve_val(train, 3)
    assert [r["video_id"] for r in val] == ["v2", "v4", "v5"]  # the last of each combination, in train order
    assert [r["video_id"] for r in rest] == ["v0", "v1", "v3"]  # nothing lost, nothing in both
    with pytest.raises(ValueError, match="only 3 distinct attribute combinations"):
        carve_val(train, 4)
    with pytest.raises(ValueError, match="n_val=6"):
        carve_val(train, 6)


def test_generation_is_cached_by_parameters(tmp_path) -> None:
    root = generate_synthetic_corpus(tmp_path, n_train=2, n_test=3, size=16, fps=4, seconds=1.0)
    video = root / "videos" / "train00000.mp4"
    stamp = video.stat().st_mtime_ns
    assert generate_synthetic_corpus(tmp_path, n_train=2, n_test=3, size=16, fps=4, seconds=1.0) == root
    assert video.stat().st_mtime_ns == stamp  # not regenerated
    generate_synthetic_corpus(tmp_path, n_train=2, n_test=3, size=16, fps=4, seconds=1.0, seed=1)
    assert video.stat().st_mtime_ns != stamp
    assert json.loads((root / "corpus.json").read_text())["seed"] == 1


def _centroid(frame: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    close = np.abs(frame.astype(int) - np.array(colour)).sum(-1) < 90
    ys, xs = np.nonzero(close)
    assert len(xs) > 0, "object not found in frame"
    return np.array([xs.mean(), ys.mean()])


def test_object_moves_in_the_captioned_direction(synthetic_corpus) -> None:
    expected = {"left->right": (0, 1), "right->left": (0, -1), "top->bottom": (1, 1), "bottom->top": (1, -1)}
    for row in rows(synthetic_corpus, "test"):
        attrs = row["attributes"]
        frames = decode_frames((synthetic_corpus / row["video"]).read_bytes(), lambda n, fps: np.array([0, n - 1]))
        assert frames.shape == (2, 32, 32, 3)
        start, end = (_centroid(f, COLOURS[attrs["colour"]]) for f in frames)
        axis, sign = expected[attrs["direction"]]
        assert sign * (end[axis] - start[axis]) > 8, (row["video_id"], attrs, start, end)
        assert abs(end[1 - axis] - start[1 - axis]) < 3
