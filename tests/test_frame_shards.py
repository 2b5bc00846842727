"""Frame shards (data.pack.format=frames): packed from real H.264 clips, they train on the very
timestamps the video path decodes, with the same masks; the video path's bad inputs (corrupt,
zero-frame, short, rotated) have their frame-path outcomes; damaged JPEG members are counted."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from shards.decode import decode_frames, sample_frame_indices
from shards.frames import decode_jpegs, pick_positions
from shards.index import read_index
from shards.probe import FrameSpec
from shards.sample import VideoSample
from shards.stream import ShardStream
from shards.writer import pack_split
from tests.test_download_layouts import rotate_display_matrix, write_clip


def _samples(clips: dict[str, tuple[Path, float | None, float | None]]) -> list[VideoSample]:
    return [VideoSample(key, path, [f"caption of {key}"], "train", "manifest", start=start, end=end)
            for key, (path, start, end) in clips.items()]


@pytest.fixture(scope="module")
def both_formats(tmp_path_factory, clip_maker):
    """One corpus packed twice: a 20 s clip (more 1 fps frames than max_frames), a window inside
    it (an ActivityNet segment), a 3-frame clip (shorter than one sampling step) and a 2 s one."""
    tmp = tmp_path_factory.mktemp("frame_shards")
    long = clip_maker(tmp / "long.mp4", frames=160, size=32, fps=8)
    clips = {"long": (long, None, None), "segment": (long, 3.5, 17.2),
             "short": (clip_maker(tmp / "short.mp4", frames=3, size=32, fps=8), None, None),
             "two": (clip_maker(tmp / "two.mp4", frames=16, size=40, fps=8), None, None)}
    out = {}
    for fmt, spec in (("video", None), ("frames", FrameSpec(short_side=32))):
        out[fmt] = tmp / fmt
        report = pack_split(_samples(clips), out[fmt], "train", progress=False, frames=spec)
        assert (report.packed, report.quarantined) == (4, 0)
    return out


def _tar_members(shard_dir: Path) -> dict[str, bytes]:
    members = {}
    for tar_path in sorted(shard_dir.glob("train-*.tar")):
        with tarfile.open(tar_path) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return members


def _rewrite_tar(tar_path: Path, edit) -> None:
    """Rewrite the tar at ``tar_path`` member by member: ``edit(name, data)`` returns the new bytes,
    or None to drop the member."""
    rebuilt = io.BytesIO()
    with tarfile.open(tar_path) as src, tarfile.open(fileobj=rebuilt, mode="w") as dst:
        for m in src.getmembers():
            data = edit(m.name, src.extractfile(m).read())
            if data is not None:
                m.size = len(data)
                dst.addfile(m, io.BytesIO(data))
    tar_path.write_bytes(rebuilt.getvalue())


def test_frame_shards_store_jpeg_frames_and_their_timestamps(both_formats):
    index = read_index(both_formats["frames"], "train")
    assert index["format"] == "frames" and index["frames"] == {"fps": 1.0, "short_side": 32, "quality": 90,
                                                                 "center_crop": True}
    assert read_index(both_formats["video"], "train")["format"] == "video"
    members = _tar_members(both_formats["frames"])
    assert not [name for name in members if name.endswith(".mp4")]
    meta = json.loads(members["long.json"])
    assert meta["frames"]["indices"] == [8 * s for s in range(20)]  # 1 fps over 20 s of 8 fps video
    assert meta["frames"]["times"] == [float(s) for s in range(20)]
    assert len([n for n in members if n.startswith("long.") and n.endswith(".jpg")]) == 20
    segment = json.loads(members["segment.json"])["frames"]["times"]
    assert segment[0] == 3.5 and segment[-1] == 16.5 and len(segment) == 14  # only the window is stored
    # 40 px clip kept at the stored short side 32; JPEG frames decode to what was stored
    two = decode_jpegs([members["two.0000.jpg"], members["two.0001.jpg"]])
    assert [tuple(f.shape) for f in two] == [(3, 32, 32)] * 2 and two[0].dtype == torch.uint8


@pytest.mark.parametrize("max_frames,sample_fps", [(4, 1.0), (12, 1.0), (3, 0.5)])
def test_both_paths_train_on_the_same_timestamps_and_masks(both_formats, max_frames, sample_fps):
    """The video path's indices (decord's count and rate) equal the stored frames the frame path
    picks; at a sampling rate below the stored one the picks are still the video path's frames."""
    video_members, frame_members = _tar_members(both_formats["video"]), _tar_members(both_formats["frames"])
    for key in ("long", "segment", "short", "two"):
        meta = json.loads(frame_members[f"{key}.json"])
        picked = []
        decode_frames(video_members[f"{key}.mp4"], lambda n, fps: picked.append(
            sample_frame_indices(n, fps, max_frames, sample_fps, meta["start"], meta["end"])) or picked[-1])
        stored = np.asarray(meta["frames"]["indices"])
        positions = pick_positions(meta["frames"], max_frames, sample_fps, meta["start"], meta["end"])
        assert stored[positions].tolist() == picked[0].tolist(), key
    streams = {fmt: {s["key"]: s for s in ShardStream(d, "train", max_frames=max_frames, image_size=32,
                                                        sample_fps=sample_fps, training=False)}
               for fmt, d in both_formats.items()}
    assert streams["video"].keys() == streams["frames"].keys()
    for key, v in streams["video"].items():
        f = streams["frames"][key]
        assert torch.equal(v["frame_mask"], f["frame_mask"]), key
        assert int(v["frame_mask"].sum()) == {"long": min(max_frames, 20 if sample_fps == 1 else 10),
                                              "segment": min(max_frames, 14 if sample_fps == 1 else 7),
                                              "short": 1, "two": min(max_frames, 2 if sample_fps == 1 else 1)}[key]
        # same timestamps, different codec: the pixels agree up to JPEG's and H.264's losses
        real = v["frame_mask"]
        assert (v["frames"][real] - f["frames"][real]).abs().mean() < 0.15  # normalised units (~10 grey levels)


def test_frame_path_bad_inputs(tmp_path, clip_maker, bad_inputs):
    """Corrupt and zero-frame videos are quarantined with the video path's reasons; a rotated phone
    video is stored upright; a damaged JPEG at train time is a counted decode error."""
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(bad_inputs.corrupt_mp4_bytes(clip_maker(tmp_path / "c.mp4").read_bytes()))
    zero = bad_inputs.write_zero_frame_video(tmp_path / "zero.mp4")
    phone = rotate_display_matrix(write_clip(tmp_path / "phone.mp4", width=64, height=96, marker=True))
    good = clip_maker(tmp_path / "good.mp4", frames=16)
    clips = {"corrupt": (corrupt, None, None), "zero": (zero, None, None), "phone": (phone, None, None),
             "good": (good, None, None), "good2": (good, 0.0, 1.0)}
    out = tmp_path / "shards"
    # whole frames (no centre crop) so the orientation shows on all of the frame
    report = pack_split(_samples(clips), out, "train", progress=False, frames=FrameSpec(center_crop=False),
                        max_quarantine=0.5)
    assert (report.packed, report.quarantined) == (3, 2) and report.reasons == {"unreadable video": 2}
    members = _tar_members(out)
    phone_frame = decode_jpegs([members["phone.0000.jpg"]])[0].permute(1, 2, 0)
    # stored upright (landscape after the -90 turn), the white corner top-right, as the video path shows it
    assert phone_frame.shape == (64, 96, 3) and phone_frame[:8, -8:].float().mean() > 200
    assert phone_frame[:8, :8].float().mean() < 160

    # damage one JPEG member of one sample: that sample is skipped and counted, the others decode
    _rewrite_tar(sorted(out.glob("train-*.tar"))[0],
                 lambda name, data: b"\xff\xd8" + bytes(len(data) - 2) if name == "good.0000.jpg" else data)
    stream = ShardStream(out, "train", max_frames=4, image_size=32, training=False)
    assert sorted(s["key"] for s in stream) == ["good2", "phone"]
    assert stream.counters["decode_error"] == 1


def test_a_frame_sample_without_its_frames_is_an_incomplete_sample(both_formats, tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    for p in both_formats["frames"].iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    # the json stays, its frames are gone
    _rewrite_tar(sorted(out.glob("train-*.tar"))[0],
                 lambda name, data: None if name.startswith("short.") and name.endswith(".jpg") else data)
    stream = ShardStream(out, "train", max_frames=4, image_size=32, training=False)
    keys = [s["key"] for s in stream]
    assert "short" not in keys and len(keys) == 3 and stream.counters["incomplete_sample"] == 1


def test_frame_stream_resumes_exactly(both_formats):
    """In-process, the stream resumes sample-exactly on frame shards as on video shards."""
    def stream():
        return ShardStream(both_formats["frames"], "train", max_frames=4, image_size=32, training=True, seed=3,
                           shuffle_buffer=4)

    full = [s["key"] for s in stream()]
    first = stream()
    it = iter(first)
    head = [next(it)["key"] for _ in range(2)]
    resumed = stream()
    resumed.load_state_dict(first.state_dict())
    assert head + [s["key"] for s in resumed] == full and len(full) == 4


@pytest.mark.slow
def test_train_evaluate_and_search_on_frame_shards(frame_shards, trained_run, tmp_path):
    """launch/train.py, eval.py and search.py on frame shards of the corpus trained_run used as video
    shards: same seed and config, so R@1 is within noise of the video run's (one test video of 12
    either way: both runs are 3 steps from random, what differs is only the decoded pixels)."""
    from tests.support import TINY_RUN, launch_train
    from tests.test_eval_search import launch

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = launch_train(f"data.root={trained_run.corpus}", f"data.shards={frame_shards}", f"run.dir={tmp_path / 'run'}",
                        f"tracking.uri={uri}", *TINY_RUN, "tracking.promote_at_chance=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    for variant in ("con", "gen_rerank"):
        for direction in ("t2v", "v2t"):
            assert abs(metrics[variant][direction]["R1"] - trained_run.metrics[variant][direction]["R1"]) <= 100 / 12 + 1e-6

    out_json = tmp_path / "eval.json"
    common = [f"tracking.uri={uri}", f"data.root={trained_run.corpus}", "run.progress=false", "run.device=cpu",
              "data.num_workers=0"]
    proc = launch("eval.py", ["--model", "models:/streamret@champion", f"data.shards={frame_shards}",
                              "eval.rerank_topk=4", "--out", str(out_json), *common], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for direction in ("t2v", "v2t"):  # the same model on the same frames reproduces the run's own evaluation
        assert json.loads(out_json.read_text())["metrics"]["con"][direction] == pytest.approx(metrics["con"][direction])
    query = json.loads((trained_run.corpus / "test.jsonl").read_text().splitlines()[0])["captions"][0]
    proc = launch("search.py", ["model=models:/streamret@champion", f"shards={frame_shards}", f"query={query}",
                                "--topk", "2", *common], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len([line for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]) == 2


def test_sampling_faster_than_the_stored_frames_says_so(frame_shards, caplog):
    import logging

    from shards.stream import ShardStream

    with caplog.at_level(logging.WARNING, logger="shards.stream"):
        ShardStream(frame_shards, "test", max_frames=4, image_size=32, sample_fps=2.0, training=False)
    assert "data.pack.frames_fps=2.0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shards.stream"):
        ShardStream(frame_shards, "test", max_frames=4, image_size=32, sample_fps=1.0, training=False)
    assert "frames_fps" not in caplog.text
