"""Frames from mp4 bytes: which frames to take, decord decoding in memory, CLIP preprocessing."""
from __future__ import annotations

import io
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

# decord must be imported after torch in the same process, or its bundled libs can clash.
import decord  # noqa: E402

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def window_frame_indices(
    num_frames: int, fps: float, sample_fps: float = 1.0, start: float | None = None, end: float | None = None
) -> np.ndarray:
    """Frame indices at ``sample_fps`` inside ``[start, end]`` seconds (whole video when None).

    Never empty for a non-empty video: a window shorter than one sampling step still gets its
    first frame, and a window past the end falls back to the last frame.
    """
    if num_frames <= 0:
        raise ValueError(f"num_frames={num_frames}: the video has no frames to sample")
    if sample_fps <= 0:
        raise ValueError(f"sample_fps={sample_fps}: must be > 0")
    fps = float(fps) if fps and fps > 0 else 1.0
    duration = num_frames / fps
    t0 = 0.0 if start is None else max(0.0, float(start))
    t1 = duration if end is None else min(duration, float(end))
    if t1 <= t0:
        t1 = t0 + 1.0 / fps
    times = np.arange(t0, t1, 1.0 / sample_fps)
    idx = np.clip(np.floor(times * fps).astype(np.int64), 0, num_frames - 1)
    if idx.size == 0:
        idx = np.array([min(int(t0 * fps), num_frames - 1)], dtype=np.int64)
    return idx


def sample_frame_indices(
    num_frames: int,
    fps: float,
    max_frames: int,
    sample_fps: float = 1.0,
    start: float | None = None,
    end: float | None = None,
) -> np.ndarray:
    """``window_frame_indices`` thinned uniformly (linspace) to ``max_frames`` when there are more:
    the reference's sampling (method.md section 1). Frame shards store the unthinned set."""
    if max_frames <= 0:
        raise ValueError(f"max_frames={max_frames}: must be > 0")
    idx = window_frame_indices(num_frames, fps, sample_fps, start, end)
    if idx.size > max_frames:
        pick = np.linspace(0, idx.size - 1, max_frames).round().astype(np.int64)
        idx = idx[pick]
    return idx


def decode_frames(mp4: bytes, indices_fn: Callable[[int, float], np.ndarray]) -> np.ndarray:
    """Decode the frames ``indices_fn(num_frames, fps)`` picks, straight from memory (no temp
    files). Returns uint8 ``[T, H, W, 3]``. decord's own frame count is authoritative: indices
    past it are clipped, since containers sometimes over-report their length."""
    reader = decord.VideoReader(io.BytesIO(mp4), ctx=decord.cpu(0), num_threads=1)
    n = len(reader)
    if n == 0:
        raise ValueError("decord found 0 frames in the mp4 bytes")
    indices = np.clip(np.asarray(indices_fn(n, reader.get_avg_fps()), dtype=np.int64), 0, n - 1)
    return reader.get_batch(indices.tolist()).asnumpy()


class ClipTransform:
    """CLIP preprocessing for a clip: short side to ``image_size`` (bicubic, antialiased),
    centre crop, [0, 1], CLIP mean/std. Pads to ``max_frames`` with zeros and returns the mask
    of real frames.

    Two halves, so that DataLoader workers can ship 4x smaller uint8 frames and the consumer
    normalises once per batch: ``crop`` (resize + crop + pad, uint8) then ``normalise``.
    On CPU the resize runs on uint8 channels-last (torch's vectorised path, ~2.5x faster than
    float); it differs from a float bicubic resize by rounding only: 640x480 -> 299x224 of the decode
    bench's block texture, mean 0.3 and max 8 grey levels (tests/test_shards_decode.py bounds it).
    """

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __call__(
        self, frames: np.ndarray | torch.Tensor, max_frames: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``frames`` uint8 ``[T, H, W, 3]`` -> (float ``[max_frames, 3, S, S]``, bool ``[max_frames]``)."""
        video, mask = self.crop(frames, max_frames)
        return self.normalise(video, mask), mask

    def crop(
        self, frames: np.ndarray | torch.Tensor | list[torch.Tensor], max_frames: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``frames`` uint8 ``[T, H, W, 3]`` (decord), or a list of planar ``[3, H, W]`` frames (JPEG
        decode) -> (uint8 ``[max_frames, 3, S, S]`` resized, centre-cropped and zero-padded; bool
        ``[max_frames]`` mask of real frames). Stored channels-last for HWC input, planar for planar
        input: whichever makes the crop a plain copy."""
        if isinstance(frames, (list, tuple)):
            return self._crop_planar(list(frames), max_frames)
        x = torch.as_tensor(frames)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected frames [T, H, W, 3], got shape {tuple(x.shape)}")
        if x.dtype != torch.uint8:
            raise ValueError(f"expected uint8 frames, got {x.dtype}; decode_frames returns uint8")
        t, max_frames = self._count(x.shape[0], max_frames)
        x = x.permute(0, 3, 1, 2)  # a channels-last view: no copy
        x, top, left = self._resized(x)
        s = self.image_size
        # Channels-last storage behind the [T, 3, S, S] shape: decord's frames are HWC, and a planar
        # copy here cost 1 ms a clip (~4% of a transcoded decode). The loader batches clips in this
        # layout too (shards.loader._stack); normalise_clip writes the planar batch on the device.
        out = torch.zeros(max_frames, s, s, 3, dtype=torch.uint8, device=x.device).permute(0, 3, 1, 2)
        out[:t] = x[:, :, top : top + s, left : left + s]
        return out, self._mask(t, max_frames, x.device)

    def _crop_planar(self, frames: list[torch.Tensor], max_frames: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[3, H, W]`` frames each copied once into the output, stored as the frames are (libjpeg
        writes interleaved pixels: decode_jpeg's CHW tensors are HWC in memory). Stacking them
        first, then a transposing copy, cost 5.5 ms of a 15 ms 12-frame clip on the decode bench."""
        if not frames or any(f.ndim != 3 or f.shape[0] != 3 or f.dtype != torch.uint8 for f in frames):
            raise ValueError(f"expected uint8 [3, H, W] frames, got {[(tuple(f.shape), f.dtype) for f in frames[:3]]}")
        t, max_frames = self._count(len(frames), max_frames)
        s, device = self.image_size, frames[0].device
        if frames[0].permute(1, 2, 0).is_contiguous():
            out = torch.zeros(max_frames, s, s, 3, dtype=torch.uint8, device=device).permute(0, 3, 1, 2)
        else:
            out = torch.zeros(max_frames, 3, s, s, dtype=torch.uint8, device=device)
        h, w = frames[0].shape[-2:]
        if min(h, w) != s:
            x, top, left = self._resized(torch.stack(frames))
            out[:t] = x[:, :, top : top + s, left : left + s]
        else:
            top, left = (h - s) // 2, (w - s) // 2
            for i, f in enumerate(frames):
                out[i] = f[:, top : top + s, left : left + s]
        return out, self._mask(t, max_frames, device)

    @staticmethod
    def _count(t: int, max_frames: int | None) -> tuple[int, int]:
        max_frames = t if max_frames is None else max_frames
        if t > max_frames:
            raise ValueError(f"{t} frames but max_frames={max_frames}: sample fewer frames first")
        return t, max_frames

    @staticmethod
    def _mask(t: int, max_frames: int, device: torch.device) -> torch.Tensor:
        mask = torch.zeros(max_frames, dtype=torch.bool, device=device)
        mask[:t] = True
        return mask

    def _resized(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """``[T, 3, H, W]`` with its short side at ``image_size``, and the top-left of the centre crop."""
        h, w = x.shape[-2:]
        s = self.image_size
        scale = s / min(h, w)
        new_h, new_w = max(s, round(h * scale)), max(s, round(w * scale))
        if (new_h, new_w) != (h, w):
            x = _resize_bicubic_uint8(x, new_h, new_w)
        return x, (new_h - s) // 2, (new_w - s) // 2

    def normalise(self, video: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """uint8 ``[..., T, 3, S, S]`` from ``crop`` -> float32 CLIP-normalised, padded frames
        (``mask`` False) exactly 0."""
        return normalise_clip(video, mask)


def normalise_clip(video: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., T, 3, S, S]`` (resized, cropped) -> contiguous float32 CLIP-normalised on ``video``'s device,
    frames where ``mask`` is False exactly 0. One fused multiply-add: ``x * 1/(255 std) - mean/std``."""
    if video.dtype != torch.uint8:
        raise ValueError(f"normalise takes the uint8 frames ClipTransform.crop returns, got {video.dtype}")
    std = torch.tensor(CLIP_STD, device=video.device).view(3, 1, 1)
    shift = (torch.tensor(CLIP_MEAN, device=video.device).view(3, 1, 1) / std).neg_()
    # uint8 straight into addcmul: the cast happens inside the one pass (2.5x faster than .float() first),
    # and so does the transpose of a channels-last batch (the loader's): the output is contiguous.
    x = torch.addcmul(shift, video, 1.0 / (255.0 * std), out=torch.empty(video.shape, dtype=torch.float32, device=video.device))
    mask = mask.to(video.device)
    if not bool(mask.all()):
        x[~mask] = 0.0
    return x


def video_to_device(video: torch.Tensor, mask: torch.Tensor, device: torch.device,
                    dtype: torch.dtype) -> torch.Tensor:
    """A loader batch's ``video`` as model input on ``device``. uint8 frames (``build_loader(...,
    normalise=False)``) cross to the device as uint8, 4x fewer bytes than float32, and are
    normalised there, off the data workers' cores; float frames (already normalised) only move."""
    if video.dtype == torch.uint8:
        return normalise_clip(video.to(device, non_blocking=True), mask).to(dtype)
    return video.to(device, dtype, non_blocking=True)


def _resize_bicubic_uint8(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bicubic resize of uint8 ``[T, 3, H, W]``. CPU: torch's uint8 channels-last kernel.
    Elsewhere (no uint8 bicubic kernel on every device) in float32, clamped and rounded back."""
    if x.device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
        return F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    y = F.interpolate(x.float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return y.clamp_(0.0, 255.0).round_().to(torch.uint8)  # bicubic overshoots at edges
