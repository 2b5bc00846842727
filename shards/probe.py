"""Pack-time video work with PyAV: probe a video (is it decodable, how long, how many frames, is
it rotated), optionally transcode it to a small, seek-friendly H.264 mp4, and check that decord,
the reader that trains, decodes what is stored.

decord ignores display matrices and fails on every read of a rotated video ("from_size ==
to_size"): a phone video that PyAV probes fine would be skipped every epoch and dropped from
evaluation. Such a video is re-encoded upright at pack time (at its own size and frame rate when
no transcode is configured), so what is packed is what trains."""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import av
import numpy as np

from shards.sample import Quarantined, VideoSample
from shards.tarread import VIDEO_MEMBERS


@dataclass(frozen=True)
class Transcode:
    """Re-encode videos at pack time: short side in pixels, frame rate, keyframe interval, and
    ``fastdecode`` (x264 ``tune=fastdecode``: CAVLC instead of CABAC entropy coding, no
    deblocking). Decoding is entropy-bound once the GOP is short: fastdecode made decord 1.7x faster
    on the decode bench's 298x224 clips (42 -> 24 ms per 12-frame clip, same error against the
    source frames) for ~14% more bytes."""

    short_side: int = 256
    fps: int = 8
    gop: int = 8
    fastdecode: bool = True

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FrameSpec:
    """Frame shards (``shards.frames``): the sampling rate (frames per second of video), the short
    side in pixels (never upscaled: a smaller video keeps its size), the JPEG quality, and
    ``center_crop``: keep only the centre square, the part CLIP preprocessing trains on (method.md
    section 1: short side resize, centre crop), so no decode time goes to pixels that are cropped
    away (a quarter of a 4:3 frame, 44% of a 16:9 one)."""

    fps: float = 1.0
    short_side: int = 224
    quality: int = 90
    center_crop: bool = True

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class ProbeInfo:
    duration: float
    fps: float
    num_frames: int
    width: int
    height: int
    rotation: int = 0  # display rotation in degrees (PyAV's sign: -90 = turn clockwise to show)
    extension: str = "mp4"  # the container's own file extension, for the tar member name


# PyAV container format names -> the member extension the bytes are stored under.
_FORMAT_EXTENSIONS = {"mov,mp4,m4a,3gp,3g2,mj2": "mp4", "matroska,webm": "mkv", "avi": "avi", "mpeg": "mpg",
                      "flv": "flv", "asf": "wmv"}


def container_extension(format_name: str, path: Path | None) -> str:
    """The extension for bytes in container ``format_name``; the file's own suffix when it is one
    of the names of that container (``.webm`` for matroska, ``.mov`` for mp4)."""
    ext = _FORMAT_EXTENSIONS.get(format_name, format_name.split(",")[0])
    suffix = path.suffix.lower().lstrip(".") if path is not None else ""
    if suffix in VIDEO_MEMBERS and (suffix == ext or suffix in format_name.split(",") or
                                    (ext == "mkv" and suffix == "webm") or (ext == "mp4" and suffix in ("mov", "m4v"))):
        return suffix
    return ext if ext in VIDEO_MEMBERS else "mp4"


def encode_h264(frames: Iterable[np.ndarray], out, fps: int, width: int, height: int, gop: int = 8,
                fastdecode: bool = False) -> None:
    """Encode uint8 ``[H, W, 3]`` RGB frames to an H.264/yuv420p mp4 at ``out`` (path or binary
    file object). Frame ``i`` gets pts ``i`` in time base ``1/fps``; no B-frames and a fixed GOP,
    so decoders can seek cheaply and timestamps are monotonic. ``fastdecode``: see ``Transcode``."""
    if width % 2 or height % 2:
        raise ValueError(f"H.264 yuv420p needs even dimensions, got {width}x{height}")
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        stream.options = {
            "preset": "veryfast",
            "threads": "1",  # clips are tiny: per-clip thread start-up costs more than it saves
            "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0",
            **({"tune": "fastdecode"} if fastdecode else {}),
        }
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def probe_video(data: bytes | Path) -> ProbeInfo:
    """Open, decode the first frame, and count frames by demuxing (no full decode).
    Raises ``ValueError``/``av.FFmpegError`` when the video is unusable."""
    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else str(data)
    with av.open(src) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        first = next(container.decode(stream), None)
        if first is None:
            raise ValueError("no decodable frame")
        width, height = first.width, first.height
        rotation = int(round(getattr(first, "rotation", 0) or 0))
        format_name = container.format.name
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        container.seek(0)
        num_frames = sum(1 for p in container.demux(stream) if p.size > 0)
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = num_frames / fps if fps else 0.0
    if num_frames == 0:
        raise ValueError("zero frames")
    if fps <= 0:
        fps = num_frames / duration if duration > 0 else 1.0
    return ProbeInfo(duration=duration, fps=fps, num_frames=num_frames, width=width, height=height,
                     rotation=rotation % 360,
                     extension=container_extension(format_name, data if isinstance(data, Path) else None))


def transcode_video(path: Path, spec: Transcode) -> bytes:
    """Resample to ``spec.fps`` (nearest earlier frame by timestamp), turn upright by the display
    rotation, scale the short side to ``spec.short_side`` (even dimensions), re-encode with
    ``encode_h264``."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream (audio only?)")
        stream = container.streams.video[0]
        turns = 0
        first = None
        frames: list[np.ndarray] = []
        next_t = 0.0
        for frame in container.decode(stream):
            t = float(frame.time) if frame.time is not None else len(frames) / spec.fps
            if first is None:
                first = frame
                turns = round((getattr(frame, "rotation", 0) or 0) / 90) % 4  # np.rot90 turns counter-clockwise
                h, w = frame.height, frame.width
                scale = spec.short_side / min(h, w)
                out_w, out_h = max(2, round(w * scale / 2) * 2), max(2, round(h * scale / 2) * 2)
            while t + 1e-6 >= next_t:
                rgb = frame.reformat(width=out_w, height=out_h, format="rgb24").to_ndarray()
                frames.append(np.rot90(rgb, turns) if turns else rgb)
                next_t = len(frames) / spec.fps
    if not frames:
        raise ValueError("no decodable frame")
    buf = io.BytesIO()
    height, width = frames[0].shape[:2]
    encode_h264(frames, buf, fps=spec.fps, width=width, height=height, gop=spec.gop, fastdecode=spec.fastdecode)
    return buf.getvalue()


def upright_spec(info: ProbeInfo) -> Transcode:
    """Re-encode a rotated video at its own size and (rounded) frame rate."""
    return Transcode(short_side=min(info.width, info.height) // 2 * 2, fps=max(1, round(info.fps)), gop=8)


def check_decodes(data: bytes) -> None:
    """Decode the first and last frame with decord, as the training stream will; raises if it cannot."""
    from shards.decode import decode_frames  # torch + decord: only where probing runs

    decode_frames(data, lambda n, fps: [0, n - 1])
