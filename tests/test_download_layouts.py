"""The five corpora as their downloads lay them out (real H.264 clips in mp4, avi and mkv
containers), packed through the config as `launch/pack.py` packs them, with exact counts; and the
ways a first pack used to go wrong: videos not found and exit 0, an empty index that blocked the
rerun, a bad test file found after the train split was written, two files merged under one id,
rotated phone videos that decord cannot read, stale temporary folders."""
from __future__ import annotations

import json
import pickle
import struct
import tarfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from shards.corpora.common import AnnotationError
from shards.index import read_index
from shards.manifest import ManifestCorpus
from shards.writer import PackRefused, pack_split
from trainer.components.data import pack_corpus
from trainer.launchers.cli import compose


def write_clip(path: Path, container: str = "mp4", frames: int = 8, width: int = 32, height: int = 32,
               marker: bool = False) -> Path:
    """A real H.264 clip in ``container`` (mp4, avi, matroska); ``marker`` paints the top-left
    corner white so orientation can be checked after decoding."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format=container) as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            rgb = np.full((height, width, 3), 40 + i * 20, dtype=np.uint8)
            if marker:
                rgb[: height // 4, : width // 4] = 255
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 8)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def rotate_display_matrix(path: Path) -> Path:
    """Give the mp4's track the display matrix a phone writes for a portrait video (-90 degrees)."""
    data = bytearray(path.read_bytes())
    at = data.index(b"tkhd")
    version = data[at + 4]
    matrix = at + 8 + (20 if version == 0 else 32) + 8 + 8
    data[matrix:matrix + 36] = struct.pack(">9i", 0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30)
    path.write_bytes(bytes(data))
    return path


def pack(corpus: str, root: Path, *overrides: str, splits: tuple[str, ...] = ("train", "test")):
    cfg = compose([f"data={corpus}", f"data.root={root}", "data.pack.workers=0", "run.progress=false", *overrides])
    return {o.split: o.report for o in pack_corpus(cfg.data, list(splits), progress=False)}


def counts(report) -> tuple[int, int, int]:
    return report.rows, report.packed, report.quarantined


# --------------------------------------------------------------------------- the five layouts


def msrvtt_layout(root: Path) -> Path:
    """msrvtt_data.zip's annotations beside MSRVTT.zip unpacked: MSRVTT/videos/all/videoN.mp4."""
    for i in range(5):
        write_clip(root / "MSRVTT" / "videos" / "all" / f"video{i}.mp4")
    sentences = [{"video_id": f"video{i}", "caption": f"clip {i} caption {j}", "sen_id": 2 * i + j}
                 for i in range(6) for j in range(2)]
    (root / "MSRVTT_data.json").write_text(json.dumps({"videos": [{"video_id": f"video{i}"} for i in range(6)],
                                                       "sentences": sentences}))
    (root / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\nvideo1\nvideo2\nvideo5\n")  # video5: never downloaded
    (root / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,sentence\nret0,msr3,video3,a test\n"
                                                   "ret1,msr4,video4,another test\n")
    return root


def test_msrvtt_download_layout(tmp_path) -> None:
    reports = pack("msrvtt", msrvtt_layout(tmp_path / "msrvtt"), "data.pack.max_quarantine=0.3")
    assert counts(reports["train"]) == (4, 3, 1) and reports["train"].reasons == {"video missing": 1}
    assert counts(reports["test"]) == (2, 2, 0)
    assert read_index(tmp_path / "msrvtt" / "shards", "train")["total_samples"] == 3


def test_msvd_download_layout_keeps_the_avi_container(tmp_path) -> None:
    """YouTubeClips.tar unpacks to YouTubeClips/<id>.avi; the member is stored as .avi, not .mp4."""
    root = tmp_path / "msvd"
    ids = ["-4wsuPCjDBc_5_15", "abc_1_2", "xyz_3_9", "tst_0_4"]
    for vid in ids:
        write_clip(root / "YouTubeClips" / f"{vid}.avi", container="avi")
    (root / "raw-captions.pkl").write_bytes(pickle.dumps({vid: [["a", "man", vid[:3]], ["someone", "plays"]]
                                                          for vid in ids}))
    (root / "train_list.txt").write_text("\n".join(ids[:3]) + "\n")
    (root / "val_list.txt").write_text("")
    (root / "test_list.txt").write_text(ids[3] + "\n")
    reports = pack("msvd", root)
    assert counts(reports["train"]) == (3, 3, 0) and counts(reports["test"]) == (1, 1, 0)
    with tarfile.open(root / "shards" / "test-000000.tar") as tar:
        assert sorted(tar.getnames()) == ["tst_0_4.avi", "tst_0_4.json"]


def test_activitynet_download_layout(tmp_path) -> None:
    """Activity_Videos/v_<id>.mp4|.mkv, ids annotated with their v_ prefix."""
    root = tmp_path / "anet"
    write_clip(root / "Activity_Videos" / "v_aaa.mp4")
    write_clip(root / "Activity_Videos" / "v_bbb.mkv", container="matroska")
    write_clip(root / "Activity_Videos" / "v_ccc.mp4")
    write_clip(root / "Activity_Videos" / "v_ddd.mp4")
    entry = {"duration": 1.0, "timestamps": [[0, 0.5], [0.5, 1.0]], "sentences": ["A man.", " He runs."]}
    (root / "train.json").write_text(json.dumps({"v_aaa": entry, "v_bbb": entry, "v_ccc": entry}))
    (root / "val_1.json").write_text(json.dumps({"v_ddd": entry}))
    reports = pack("activitynet", root, "data.test_split=val_1", splits=("train", "val_1"))
    assert counts(reports["train"]) == (3, 3, 0) and counts(reports["val_1"]) == (1, 1, 0)
    with tarfile.open(root / "shards" / "train-000000.tar") as tar:
        assert "v_bbb.mkv" in tar.getnames()  # matroska bytes under their own extension


def test_didemo_download_layout(tmp_path) -> None:
    """DiDeMo_Videos/ holds what the download script wrote: x.mov.mp4 for an annotated x.mov."""
    root = tmp_path / "didemo"
    write_clip(root / "DiDeMo_Videos" / "111@N00_1_a.mov.mp4")
    write_clip(root / "DiDeMo_Videos" / "222@N00_2_b.mp4")
    write_clip(root / "DiDeMo_Videos" / "333@N00_3_c.m4v.mp4")
    rows = [{"video": "111@N00_1_a.mov", "description": "a dog", "times": [[0, 0]]},
            {"video": "222@N00_2_b.mp4", "description": "a cat", "times": [[0, 0]]}]
    (root / "train_data.json").write_text(json.dumps(rows))
    (root / "val_data.json").write_text("[]")
    (root / "test_data.json").write_text(json.dumps([{"video": "333@N00_3_c.m4v", "description": "x",
                                                      "times": [[0, 1]]}]))
    reports = pack("didemo", root)
    assert counts(reports["train"]) == (2, 2, 0) and counts(reports["test"]) == (1, 1, 0)


def test_lsmdc_download_layout(tmp_path) -> None:
    """avi/<movie>/<clip>.avi, one folder per movie."""
    root = tmp_path / "lsmdc"
    clips = ["0001_American_Beauty_00.00.51.926-00.00.54.129", "0001_American_Beauty_00.01.00.000-00.01.02.000",
             "1012_Unbreakable_00.02.00.000-00.02.03.000"]
    for clip in clips:
        write_clip(root / "avi" / clip.rsplit("_", 1)[0] / f"{clip}.avi", container="avi")
    line = "\t0\t1\t0\t1\t{}\n"
    (root / "LSMDC16_annos_training.csv").write_text("".join(c + line.format(f"caption {i}") for i, c in enumerate(clips[:2])))
    (root / "LSMDC16_annos_val.csv").write_text("")
    (root / "LSMDC16_challenge_1000_publictect.csv").write_text(clips[2] + line.format("the test"))
    reports = pack("lsmdc", root)
    assert counts(reports["train"]) == (2, 2, 0) and counts(reports["test"]) == (1, 1, 0)


# --------------------------------------------------------------------------- where videos are


def test_videos_elsewhere_are_refused_then_found_with_video_dir(tmp_path) -> None:
    """Videos outside the corpus root: once every row was 'video missing', pack exited 0 and its
    0-sample index made the next run say 'already packed'."""
    root = msrvtt_layout(tmp_path / "msrvtt")
    (root / "MSRVTT").rename(tmp_path / "downloads")
    with pytest.raises(PackRefused, match=r"'train': 4 of 4 rows quarantined .*video missing 4.*data\.video_dir"):
        pack("msrvtt", root)
    assert not (root / "shards" / "train.index.json").exists()
    videos = tmp_path / "downloads" / "videos" / "all"
    reports = pack("msrvtt", root, f"data.video_dir={videos}", "data.pack.max_quarantine=0.3")
    assert counts(reports["train"]) == (4, 3, 1)  # the rerun packs: nothing was left to block it
    with pytest.raises(FileNotFoundError, match="data.video_dir=nowhere .* is not a directory"):
        pack("msrvtt", root, "data.video_dir=nowhere", "data.pack.force=true")


def test_two_files_for_one_id_are_quarantined_with_both_paths(tmp_path) -> None:
    root = msrvtt_layout(tmp_path / "msrvtt")
    write_clip(root / "MSRVTT" / "videos" / "all" / "copies" / "video1.mkv", container="matroska")
    reports = pack("msrvtt", root, "data.pack.max_quarantine=0.5", splits=("train",))
    assert counts(reports["train"]) == (4, 2, 2)
    logged = [json.loads(line) for line in (root / "shards" / "train.quarantine.jsonl").read_text().splitlines()]
    ambiguous = [q for q in logged if q["reason"] == "ambiguous video"]
    assert [q["video_id"] for q in ambiguous] == ["video1"]
    assert sorted(Path(p).name for p in ambiguous[0]["detail"]["paths"]) == ["video1.mkv", "video1.mp4"]


def test_all_annotations_are_checked_before_any_split_is_written(tmp_path) -> None:
    root = msrvtt_layout(tmp_path / "msrvtt")
    (root / "MSRVTT_JSFUSION_test.csv").write_text("video,words\nvideo3,x\n")  # wrong header
    with pytest.raises(AnnotationError, match="MSRVTT_JSFUSION_test.csv"):
        pack("msrvtt", root)
    assert not (root / "shards" / "train.index.json").exists()  # train was not packed first


def test_stale_temporary_folders_of_killed_packs_are_removed(tmp_path, clip_maker) -> None:
    clip = clip_maker(tmp_path / "a.mp4")
    stale = tmp_path / "out" / ".packing-train-999999999"  # a pid no process has
    stale.mkdir(parents=True)
    (stale / "train-000000.tar").write_bytes(b"half")
    pack_split([_sample(clip)], tmp_path / "out", "train", progress=False)
    assert not stale.exists() and not list((tmp_path / "out").glob(".packing-*"))


def _sample(path: Path):
    from shards.sample import VideoSample

    return VideoSample("a", path, ["a caption"], "train", "manifest")


# --------------------------------------------------------------------------- nothing merged, nothing lost


def test_duplicate_ids_are_kept_apart_or_quarantined_and_every_row_is_counted(tmp_path, clip_maker) -> None:
    """22 rows once gave 11 packed + 8 quarantined: 3 rows merged away, counted nowhere."""
    for folder in ("a", "b"):
        for i in range(5):
            clip_maker(tmp_path / folder / f"clip{i}.mp4", frames=8)
    rows = [{"video": f"{folder}/clip{i}.mp4", "caption": f"{folder} {i}"} for folder in ("a", "b") for i in range(5)]
    rows += [{"video": "a/clip0.mp4", "caption": "a second caption of a/clip0"}]  # same file: merged, counted
    rows += [{"video": "a/clip1.mp4", "video_id": "same", "caption": "x"},
             {"video": "b/clip1.mp4", "video_id": "same", "caption": "y"}]  # one id, two files: quarantined
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = pack_split(ManifestCorpus(tmp_path / "train.jsonl").samples("train"), tmp_path / "out", "train",
                        progress=False)
    assert (report.rows, report.packed_rows, report.packed, report.quarantined) == (13, 12, 11, 1)
    assert "13 rows in = 12 packed (as 11 samples) + 1 quarantined" in str(report)
    metas = {}
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        for member in tar.getmembers():
            if member.name.endswith(".json"):
                meta = json.load(tar.extractfile(member))
                metas[meta["video_id"]] = meta["captions"]
    assert metas["clip0"] == ["a 0", "a second caption of a/clip0"] and metas["b/clip0"] == ["b 0"]
    assert len(metas) == 11 and metas["same"] == ["x"]
    (logged,) = [json.loads(line) for line in (tmp_path / "out" / "train.quarantine.jsonl").read_text().splitlines()]
    assert logged["reason"] == "duplicate video_id" and logged["detail"]["first_video"].endswith("a/clip1.mp4")


# --------------------------------------------------------------------------- decodable by decord


def test_rotated_phone_video_is_packed_upright(tmp_path) -> None:
    """A display matrix is metadata every reader must honour; the packed bytes carry none: the
    frames are turned at pack time, so PyAV, decord and any later reader see the same upright clip."""
    from shards.decode import decode_frames
    from shards.probe import probe_video

    src = rotate_display_matrix(write_clip(tmp_path / "phone.mp4", width=64, height=96, marker=True))
    assert probe_video(src).rotation == 270  # -90: turn clockwise to show
    report = pack_split([_sample(src)], tmp_path / "out", "train", progress=False)
    assert report.packed == 1
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        data = tar.extractfile("a.mp4").read()
    info = probe_video(data)
    assert (info.rotation, info.width, info.height, info.num_frames) == (0, 96, 64, 8)
    frame = decode_frames(data, lambda n, fps: [0])[0]
    # the white corner stored top-left shows top-right once turned clockwise
    assert frame.shape == (64, 96, 3) and frame[:8, -8:].mean() > 200 and frame[:8, :8].mean() < 160


def test_video_decord_cannot_read_is_quarantined_at_pack_time(tmp_path) -> None:
    """Pack probed with PyAV only: a clip decord cannot read (decord 0.6 fails every read of frames
    16, 24, 48 or 72 pixels wide, "from_size == to_size"; a phone video turned upright can land
    there) packed and passed --verify, then was skipped every epoch and dropped from evaluation."""
    narrow = write_clip(tmp_path / "narrow.mp4", width=48, height=32)
    report = pack_split([_sample(narrow), _sample(write_clip(tmp_path / "b.mp4"))], tmp_path / "out", "train",
                        progress=False, max_quarantine=0.5)
    (logged,) = [json.loads(line) for line in (tmp_path / "out" / "train.quarantine.jsonl").read_text().splitlines()]
    assert report.packed == 1 and logged["reason"] == "not decodable by decord"
    assert "from_size == to_size" in logged["detail"]["error"] and "transcode_short_side" in logged["detail"]["fix"]


def test_audio_only_file_is_quarantined_with_transcode_on(tmp_path) -> None:
    """Once "IndexError: tuple index out of range" with transcode on."""
    from shards.probe import Transcode

    path = tmp_path / "talk.mp4"
    with av.open(str(path), mode="w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    records = [_sample(path), _sample(write_clip(tmp_path / "b.mp4"))]
    records[1].key = records[1].video_id = "b"
    report = pack_split(records, tmp_path / "out", "train", progress=False, transcode=Transcode(short_side=32),
                        max_quarantine=0.5)
    (logged,) = [json.loads(line) for line in (tmp_path / "out" / "train.quarantine.jsonl").read_text().splitlines()]
    assert report.packed == 1 and logged["reason"] == "unreadable video" and "no video stream" in logged["detail"]["error"]


def test_pack_cli_unknown_split_is_one_line(tmp_path) -> None:
    """`--splits val` for msrvtt was a traceback (exit 1)."""
    from tests.test_pack_cli import run_pack

    root = msrvtt_layout(tmp_path / "msrvtt")
    proc = run_pack("data=msrvtt", f"data.root={root}", "--splits", "val")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == ("error: msrvtt: unknown split 'val'; this corpus has splits ['train', 'test'] "
                                   "(pass --splits train,test or a subset)")
    assert not (root / "shards" / "train.index.json").exists()
