"""A second generated corpus, of another make than ``synthetic.py``: several textured objects on a
coloured field, counted, each clip with one action, captioned in its own vocabulary ("three
striped rings grow on a purple field").

It differs from the embedded corpus in what a model must see: the number of objects (1-3, a
global property no single patch shows), their texture (plain, striped, checkered: fine spatial
frequency), an action that changes size or visibility rather than position (grow, shrink, blink,
drift), the background colour, and the frame size and rate. Every test video has a distinct
combination (chance R@1 = 1 / n_test); train videos draw combinations freely, with jittered
placement, scale and timing. Same on-disk result as ``synthetic.py``: ``videos/<id>.mp4`` and
``{train,test}.jsonl`` manifests.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shards.probe import encode_h264
from shards.synthetic import is_generated, write_manifests

COUNTS = {"one": 1, "two": 2, "three": 3}
OBJECTS = ("ring", "bar", "diamond")
TEXTURES = ("plain", "striped", "checkered")
ACTIONS = ("grow", "shrink", "blink", "drift")
FIELDS = {"purple": (110, 50, 140), "teal": (30, 120, 120), "orange": (200, 110, 30)}
INK = (245, 245, 235)  # objects are light on every field; texture alternates ink and a dark tone
COMBOS = list(itertools.product(COUNTS, OBJECTS, TEXTURES, ACTIONS, FIELDS))  # 324

_PLURAL = {"ring": "rings", "bar": "bars", "diamond": "diamonds"}
_VERB = {"grow": ("grows", "grow"), "shrink": ("shrinks", "shrink"), "blink": ("blinks", "blink"),
         "drift": ("drifts", "drift")}


def captions_for(count: str, obj: str, texture: str, action: str, field: str, n: int) -> list[str]:
    """``n`` paraphrases (templates cycle when ``n`` exceeds them)."""
    one = count == "one"
    noun = obj if one else _PLURAL[obj]
    verb = _VERB[action][0 if one else 1]
    templates = [
        f"{count} {texture} {noun} {verb} on a {field} field",
        f"on a {field} background, {count} {noun} with a {texture} pattern {verb}",
        f"we see {count} {texture} {noun} that {verb} over {field}",
    ]
    return [templates[i % len(templates)] for i in range(n)]


def _object_mask(obj: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    if obj == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if obj == "bar":
        return (np.abs(dx) <= 0.35 * r) & (np.abs(dy) <= r)
    return np.abs(dx) + np.abs(dy) <= r  # diamond


def _texture(texture: str, xx: np.ndarray, yy: np.ndarray, period: float) -> np.ndarray:
    """True where the ink shows (False: the dark tone) for a texture over pixel coordinates."""
    if texture == "plain":
        return np.ones_like(xx, dtype=bool)
    stripes_x = (np.floor(xx / period) % 2) == 0
    if texture == "striped":
        return stripes_x
    return stripes_x ^ ((np.floor(yy / period) % 2) == 0)  # checkered


def render_clip(count: str, obj: str, texture: str, action: str, field: str, rng: np.random.Generator,
                side: int, num_frames: int) -> np.ndarray:
    """uint8 ``[T, side, side, 3]``: ``count`` objects placed apart, animated by ``action``."""
    n = COUNTS[count]
    base_r = side * rng.uniform(0.11, 0.14)
    t = np.linspace(0.0, 1.0, num_frames)
    # Centres on a jittered row/column layout so that objects never overlap (counting must stay exact).
    slots = np.linspace(0.22, 0.78, n) if n > 1 else np.array([0.5])
    horizontal = rng.random() < 0.5
    across = rng.uniform(0.3, 0.7)
    cx0 = (slots if horizontal else np.full(n, across)) * side + rng.uniform(-0.03, 0.03, n) * side
    cy0 = (np.full(n, across) if horizontal else slots) * side + rng.uniform(-0.03, 0.03, n) * side
    scale = np.ones(num_frames)
    visible = np.ones(num_frames, dtype=bool)
    shift = np.zeros(num_frames)
    if action == "grow":
        scale = 0.45 + 0.75 * t
    elif action == "shrink":
        scale = 1.2 - 0.75 * t
    elif action == "blink":
        phase = rng.integers(0, 2)  # on and off in eighths of the clip: every other sampled frame at 2 fps
        visible = ((np.floor(t * 7.999) + phase) % 2) == 0
    else:  # drift: a slow common shift, perpendicular to the row
        shift = (t - 0.5) * 0.16 * side * (1 if rng.random() < 0.5 else -1)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    period = max(2.0, side / rng.uniform(11, 14))
    ink = _texture(texture, xx, yy, period)
    frames = np.empty((num_frames, side, side, 3), dtype=np.float64)
    background = np.asarray(FIELDS[field], dtype=np.float64) + rng.uniform(-15, 15, 3)
    for f in range(num_frames):
        mask = np.zeros((side, side), dtype=bool)
        if visible[f]:
            for i in range(n):
                cx = cx0[i] + (0 if horizontal else shift[f])
                cy = cy0[i] + (shift[f] if horizontal else 0)
                mask |= _object_mask(obj, xx - cx, yy - cy, np.float32(base_r * scale[f]))
        noise = rng.normal(0.0, 8.0, size=(side, side, 1))
        frame = background + noise
        frame = np.where((mask & ink)[..., None], np.asarray(INK, dtype=np.float64), frame)
        frame = np.where((mask & ~ink)[..., None], np.asarray((25, 25, 30), dtype=np.float64), frame)
        frames[f] = frame
    return np.clip(frames, 0, 255).astype(np.uint8)


def generate_counting_corpus(
    root: Path,
    n_train: int = 640,
    n_test: int = 96,
    seed: int = 0,
    size: int = 80,
    fps: int = 6,
    seconds: float = 4.0,
    captions_per_video: int = 2,
    n_val: int = 0,
) -> Path:
    """Write ``root/videos/<id>.mp4`` and ``root/{train,test}.jsonl`` (``val.jsonl`` carved from train
    with ``n_val``); returns ``root``. Returns at once when ``root/corpus.json`` records the same
    parameters (written last)."""
    root = Path(root)
    if not 1 <= n_test <= len(COMBOS):
        raise ValueError(f"n_test={n_test}: must be in [1, {len(COMBOS)}] (distinct attribute combinations)")
    if size % 2:
        raise ValueError(f"size={size}: H.264 yuv420p needs an even frame size")
    params = dict(kind="counting", n_train=n_train, n_test=n_test, seed=seed, size=size, fps=fps, seconds=seconds,
                  captions_per_video=captions_per_video, n_val=n_val,
                  version=2 if n_val else 1)  # 2: val of distinct combinations (carve_val)
    if is_generated(root, params):
        return root
    (root / "corpus.json").unlink(missing_ok=True)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 7])
    test_combos = [COMBOS[i] for i in rng.permutation(len(COMBOS))[:n_test]]
    train_combos = [COMBOS[i] for i in rng.integers(0, len(COMBOS), size=n_train)]
    num_frames = max(1, round(seconds * fps))
    jobs = [("train", i, c) for i, c in enumerate(train_combos)] + [("test", i, c) for i, c in enumerate(test_combos)]
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    for split, i, combo in tqdm(jobs, desc=f"counting corpus -> {root}", unit="clip"):
        video_id = f"{split}{i:05d}"
        clip_rng = np.random.default_rng([seed, 7, 0 if split == "train" else 1, i])
        frames = render_clip(*combo, clip_rng, size, num_frames)
        encode_h264(frames, str(root / "videos" / f"{video_id}.mp4"), fps=fps, width=size, height=size, gop=fps)
        count, obj, texture, action, field = combo
        rows[split].append({
            "video": f"videos/{video_id}.mp4", "video_id": video_id,
            "captions": captions_for(*combo, captions_per_video),
            "attributes": {"count": count, "object": obj, "texture": texture, "action": action, "field": field},
        })
    return write_manifests(root, rows, params, n_val)
