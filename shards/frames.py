"""Frame shards (``data.pack.format=frames``): each clip decoded once at pack time into JPEG frames,
so training decodes JPEGs (libjpeg-turbo on CPU, batched nvJPEG on a GPU) instead of video.

Why: on the same 30 s of content, 12 frames at 224 px, decoding 12 JPEGs took 3.1 ms of CPU
against 30.6 ms for decord on an mp4 already transcoded for speed (224 px, 8 fps, GOP 8,
fastdecode), and the JPEGs of the whole clip were 20% smaller (issue 16's measurement;
``launch/bench.py decode`` re-measures it on every run).

A sample is ``<key>.json`` plus ``<key>.0000.jpg``, ``<key>.0001.jpg``, ... (WebDataset's
convention for several images in one sample: the extension is everything after the key's dot).
The frames are those the video path would decode before thinning: times ``t0, t0 + 1/fps, ...``
inside the clip window at ``data.pack.frames_fps``, mapped to source frames by decord's own frame
count and rate (``shards.decode.window_frame_indices``), which is the reference's 1 fps sampling
(method.md section 1). Their source indices and timestamps go into the json (``frames``), and
training picks ``max_frames`` of them by the rule the video path uses (:func:`pick_positions`):
with ``data.sample_fps == data.pack.frames_fps`` (both 1 by default) both paths train on exactly
the same timestamps, with the same masks for short clips.
"""
from __future__ import annotations

import io

import numpy as np
import torch

from shards.decode import _resize_bicubic_uint8, decode_frames, decord, sample_frame_indices, window_frame_indices
from shards.probe import FrameSpec
from shards.tarread import frame_member

_CHUNK = 16  # frames decoded and resized at a time at pack time: a 3-minute 720p video stays ~40 MB


def _short_side(x: torch.Tensor, short_side: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if min(h, w) <= short_side:
        return x
    scale = short_side / min(h, w)
    return _resize_bicubic_uint8(x, max(short_side, round(h * scale)), max(short_side, round(w * scale)))


def extract_frames(video: bytes, spec: FrameSpec, start: float | None = None,
                   end: float | None = None) -> tuple[dict[str, bytes], dict]:
    """Decode the frames of ``[start, end]`` at ``spec.fps`` with decord (the reader the video path
    trains with, so the same frame count and rate decide the indices), resize, encode as JPEG.
    Returns (``{"0000.jpg": bytes, ...}``, the ``frames`` entry of the sample's json)."""
    from torchvision.io import encode_jpeg  # see decode_jpegs

    reader = decord.VideoReader(io.BytesIO(video), ctx=decord.cpu(0), num_threads=1)
    n, fps = len(reader), float(reader.get_avg_fps())
    if n == 0:
        raise ValueError("decord found 0 frames")
    indices = window_frame_indices(n, fps, spec.fps, start, end)
    jpegs: list[bytes] = []
    for first in range(0, len(indices), _CHUNK):
        frames = torch.from_numpy(reader.get_batch(indices[first : first + _CHUNK].tolist()).asnumpy())
        x = _short_side(frames.permute(0, 3, 1, 2), spec.short_side)
        if spec.center_crop:
            side = min(x.shape[-2:])
            top, left = (x.shape[-2] - side) // 2, (x.shape[-1] - side) // 2
            x = x[:, :, top : top + side, left : left + side]
        jpegs.extend(bytes(j.numpy()) for j in encode_jpeg([f.contiguous() for f in x], quality=spec.quality))
    rate = fps if fps > 0 else 1.0  # sample_frame_indices' own fallback
    meta = {"num_frames": n, "fps": fps, "indices": indices.tolist(),
            "times": [round(i / rate, 6) for i in indices.tolist()]}
    return {frame_member(i): j for i, j in enumerate(jpegs)}, meta


def pick_positions(frames_meta: dict, max_frames: int, sample_fps: float, start: float | None,
                   end: float | None) -> np.ndarray:
    """Which stored frames a clip trains on: the frames the video path would decode
    (``sample_frame_indices`` on the source's frame count and rate), each mapped to the stored
    frame at or before it. Identical to the video path when ``sample_fps`` is the stored rate."""
    stored = np.asarray(frames_meta["indices"], dtype=np.int64)
    if stored.size == 0:
        raise ValueError("the sample stores no frames")
    wanted = sample_frame_indices(int(frames_meta["num_frames"]), float(frames_meta["fps"]), max_frames,
                                  sample_fps, start, end)
    return np.clip(np.searchsorted(stored, wanted, side="right") - 1, 0, stored.size - 1)


def decode_jpegs(jpegs: list[bytes], device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """JPEG bytes of one clip -> uint8 planar ``[3, H, W]`` frames (``ClipTransform.crop`` takes the
    list as it is: stacking would be one more copy). ``device="cuda"``: one batched nvJPEG call."""
    # Imported here, not with the module: torchvision's import pulls in torch._dynamo (2.6 s of a
    # process start on 2 cores), and every Ray epoch starts a read task and decode actors that
    # import this module; on video shards they never decode a JPEG.
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    frames = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    if len({tuple(f.shape) for f in frames}) > 1:
        raise ValueError(f"frames of one clip differ in size: {sorted({tuple(f.shape) for f in frames})}")
    return frames


def sampled_frames(sample: dict, meta: dict, max_frames: int, sample_fps: float,
                   device: str | torch.device = "cpu") -> np.ndarray | list[torch.Tensor]:
    """The uint8 frames one sample trains on, whichever way it is stored: decord on its ``video``
    bytes (``[T, H, W, 3]``), or the picked JPEGs of its ``frames`` (planar ``[3, H, W]`` each; only
    those are decoded, on ``device``). The rule is ``sample_frame_indices`` either way; both forms
    go to ``ClipTransform.crop`` as they are."""
    start, end = meta.get("start"), meta.get("end")
    if "frames" in sample:
        jpegs = sample["frames"]
        return decode_jpegs([jpegs[p] for p in pick_positions(meta["frames"], max_frames, sample_fps, start, end)],
                            device)
    return decode_frames(sample["video"],
                         lambda n, fps: sample_frame_indices(n, fps, max_frames, sample_fps, start, end))
