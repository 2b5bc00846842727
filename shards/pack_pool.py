"""Pack-time work on each sample (``prepare_sample``: probe, transcode, extract frames) and where
it runs: in-process, in local processes or as Ray tasks, bounded and in order."""
from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Iterable, Iterator

from shards.probe import FrameSpec, Transcode, check_decodes, probe_video, transcode_video, upright_spec
from shards.sample import Quarantined, VideoSample


def prepare_sample(sample: VideoSample, transcode: Transcode | None = None,
                   frames: FrameSpec | None = None) -> tuple[dict, dict[str, bytes]] | Quarantined:
    """Everything pack time needs for one sample: ``(json meta, {member extension: bytes})`` or the
    reason it cannot be packed. The members are the video (``mp4``, ``mkv``, ...) or, with
    ``frames``, its JPEG frames (``shards.frames``). Runs in a worker process, so it must never raise."""
    path = sample.video_path
    try:
        if not path.is_file():
            return Quarantined(str(path), "video missing", sample.video_id)
        if transcode:
            data, extension = transcode_video(path, transcode), "mp4"
            info = probe_video(data)
        else:
            data = path.read_bytes()
            info = probe_video(path)
            extension = info.extension
            if info.rotation:
                data, extension = transcode_video(path, upright_spec(info)), "mp4"
                info = probe_video(data)
    except Exception as exn:  # noqa: BLE001 - any decoder failure means "unusable video"
        return Quarantined(str(path), "unreadable video", sample.video_id, {"error": f"{type(exn).__name__}: {exn}"})
    try:
        check_decodes(data)
    except Exception as exn:  # noqa: BLE001 - decord raises DECORDError and friends
        return Quarantined(str(path), "not decodable by decord", sample.video_id,
                           {"error": f"{type(exn).__name__}: {str(exn)[:300]}",
                            "fix": "set data.pack.transcode_short_side (e.g. 256) to re-encode it at pack time"})
    if sample.start is not None and info.duration > 0 and sample.start >= info.duration:
        return Quarantined(
            str(path), "clip window outside video", sample.video_id,
            {"start": sample.start, "end": sample.end, "duration": info.duration},
        )
    meta = sample.meta()
    meta.update(duration=info.duration, fps=info.fps, num_frames=info.num_frames)
    if frames is None:
        return meta, {extension: data}
    from shards.frames import extract_frames  # torch + torchvision: only where packing runs

    try:
        members, meta["frames"] = extract_frames(data, frames, sample.start, sample.end)
    except Exception as exn:  # noqa: BLE001 - a frame decord can seek to but not decode, a JPEG encoder error
        return Quarantined(str(path), "frames not extractable", sample.video_id,
                           {"error": f"{type(exn).__name__}: {str(exn)[:300]}"})
    return meta, members


class _RayTasks:
    """The executor interface of ``ProcessPoolExecutor`` (``submit`` -> a future with ``result``)
    on Ray tasks, so the same bounded, in-order loop packs on a Ray cluster."""

    def __init__(self, address: str) -> None:
        import ray

        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            ray.init(address=None if address == "local" else address, include_dashboard=False,
                     log_to_driver=False)
        self._task = ray.remote(prepare_sample)

    def submit(self, fn, *args) -> "_RayFuture":
        return _RayFuture(self._ray, self._task.remote(*args))

    def __enter__(self) -> "_RayTasks":
        return self

    def __exit__(self, *exc) -> None:
        if self._started:
            self._ray.shutdown()


class _RayFuture:
    def __init__(self, ray, ref) -> None:
        self._ray, self._ref = ray, ref

    def result(self):
        return self._ray.get(self._ref)


def prepared(
    records: Iterable[VideoSample | Quarantined], workers: int, transcode: Transcode | None,
    ray_address: str = "", frames: FrameSpec | None = None,
) -> Iterator[tuple[dict, dict[str, bytes], str, int] | Quarantined]:
    """Probe (transcode, extract frames of) samples -> ``(meta, members, key, rows)``, in order, with
    at most ``4 * workers`` in flight so memory stays bounded however long the corpus is: in
    ``workers`` local processes, or as Ray tasks when ``ray_address`` names a cluster ("local"
    starts one in-process, "auto" joins the running one)."""
    def finish(item: VideoSample, out) -> tuple[dict, dict[str, bytes], str, int] | Quarantined:
        return out if isinstance(out, Quarantined) else (*out, item.key, item.rows)

    if workers <= 0 and not ray_address:
        for record in records:
            yield record if isinstance(record, Quarantined) else finish(record, prepare_sample(record, transcode, frames))
        return
    workers = max(workers, 1)
    # spawn, not fork: the parent may hold torch / decord threads that fork would copy mid-lock.
    executor = (_RayTasks(ray_address) if ray_address
                else ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")))
    with executor as pool:
        pending: deque[tuple[VideoSample | Quarantined, Future | None]] = deque()
        for record in records:
            future = None if isinstance(record, Quarantined) else pool.submit(prepare_sample, record, transcode, frames)
            pending.append((record, future))
            while len(pending) > 4 * workers:
                rec, fut = pending.popleft()
                yield rec if fut is None else finish(rec, fut.result())
        while pending:
            rec, fut = pending.popleft()
            yield rec if fut is None else finish(rec, fut.result())
