"""Manifest reading, packing, quarantine, index and verification on real tars and real mp4s."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from shards.index import ShardsNotFound, read_index, verify_split
from shards.manifest import ManifestCorpus
from shards.probe import Transcode, probe_video
from shards.sample import Quarantined, VideoSample
from shards.stream import ShardStream
from shards.writer import PackRefused, pack_split


def _manifest_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tar_metas(shard_dir: Path, split: str) -> dict[str, dict]:
    metas = {}
    for tar_path in sorted(shard_dir.glob(f"{split}-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    metas[member.name.split(".", 1)[0]] = json.load(tar.extractfile(member))
    return metas


def test_round_trip_counts_and_captions(synthetic_corpus, synthetic_shards) -> None:
    for split, n in (("train", 24), ("test", 12)):
        rows = _manifest_rows(synthetic_corpus / f"{split}.jsonl")
        index = read_index(synthetic_shards, split)
        assert index["total_samples"] == n == len(rows)
        assert index["corpus"] == "synthetic" and index["split"] == split and index["transcode"] is None
        assert (synthetic_shards / f"{split}.quarantine.jsonl").read_text() == ""
        stream = ShardStream(synthetic_shards, split, max_frames=4, image_size=16, training=False)
        got = {s["video_id"]: s["captions"] for s in stream}
        assert got == {r["video_id"]: r["captions"] for r in rows}
    # packing keeps input order across shards
    metas = _tar_metas(synthetic_shards, "train")
    assert list(metas) == [r["video_id"] for r in _manifest_rows(synthetic_corpus / "train.jsonl")]
    meta = metas["train00000"]
    assert meta["num_frames"] == 16 and meta["fps"] == 8.0 and abs(meta["duration"] - 2.0) < 0.2
    assert meta["corpus"] == "synthetic" and meta["start"] is None


def test_index_shards_respect_size_cap_and_verify(synthetic_shards) -> None:
    index = read_index(synthetic_shards, "train")
    names = [s["name"] for s in index["shards"]]
    assert len(names) >= 3 and names[0] == "train-000000.tar" and names[1] == "train-000001.tar"
    assert sum(s["samples"] for s in index["shards"]) == 24
    assert len({s["samples"] for s in index["shards"]}) > 1  # uneven: the streaming tests rely on it
    for entry in index["shards"]:
        assert (synthetic_shards / entry["name"]).stat().st_size == entry["bytes"]
    report = verify_split(synthetic_shards, "train")
    assert report.ok, str(report)
    assert (report.shards_checked, report.samples) == (len(names), 24)
    assert not list(synthetic_shards.glob(".packing-*"))  # temp dir cleaned up


def test_verify_detects_tampering(shard_copy, bad_inputs) -> None:
    shard = shard_copy / "train-000001.tar"
    bad_inputs.truncate_file(shard, shard, 0.6)
    report = verify_split(shard_copy, "train")
    assert not report.ok
    assert any("train-000001.tar" in p and "sha256" in p for p in report.problems)


def test_read_index_errors_say_what_to_do(tmp_path, clip_maker, bad_inputs) -> None:
    with pytest.raises(ShardsNotFound, match=r"launch/pack\.py") as info:
        read_index(tmp_path, "train")
    assert str(tmp_path / "train.index.json") in str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    # a split whose every row was quarantined is refused: no 0-sample index blocks the rerun
    zero = bad_inputs.write_zero_frame_video(tmp_path / "zero.mp4")
    with pytest.raises(PackRefused, match=r"'val': 1 of 1 rows quarantined.*unreadable video 1.*zero\.mp4"):
        pack_split([VideoSample("z", zero, ["c"], "val", "manifest")], tmp_path, "val", progress=False,
                   max_quarantine=1.0)
    assert not (tmp_path / "val.index.json").exists()
    assert json.loads((tmp_path / "val.refused.jsonl").read_text())["reason"] == "unreadable video"
    # a hand-made index of 0 samples (an older streamret wrote those) still says what to do
    (tmp_path / "val.index.json").write_text(json.dumps({"split": "val", "total_samples": 0, "shards": []}))
    with pytest.raises(ShardsNotFound, match="0 samples.*val.quarantine.jsonl"):
        read_index(tmp_path, "val")


def test_manifest_jsonl_quarantines_bad_rows_keeps_good(tmp_path, clip_maker) -> None:
    clip_maker(tmp_path / "videos" / "a.mp4")
    clip_maker(tmp_path / "videos" / "b.mp4")
    lines = [
        json.dumps({"video": "videos/a.mp4", "captions": ["first", " second "]}).encode(),
        json.dumps({"video": "videos/missing.mp4", "caption": "gone"}).encode(),
        json.dumps({"video": "videos/b.mp4", "captions": ["  "]}).encode(),
        b'{"video": "videos/b.mp4", "caption": "caf\xe9"}',
        b'{"video": "videos/b.mp4", "caption": ',
        json.dumps({"video": "videos/b.mp4", "caption": "clip", "start": 1.0, "end": 0.5}).encode(),
        json.dumps({"video": "videos/b.mp4", "caption": "clip", "start": "soon"}).encode(),
        json.dumps({"video": str(tmp_path / "videos" / "b.mp4"), "caption": "abs", "video_id": "v.b",
                    "start": 0.5, "end": 1.5}).encode(),
        json.dumps({"video": "videos/a.mp4", "caption": "third"}).encode(),
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    records = list(ManifestCorpus(manifest).samples("train"))
    quarantined = [r for r in records if isinstance(r, Quarantined)]
    samples = [r for r in records if isinstance(r, VideoSample)]
    assert [(q.reason, q.source) for q in quarantined] == [
        ("video missing", f"{manifest}:2"),
        ("empty caption", f"{manifest}:3"),
        ("caption not valid UTF-8", f"{manifest}:4"),
        ("malformed row", f"{manifest}:5"),
        ("bad start/end", f"{manifest}:6"),
        ("bad start/end", f"{manifest}:7"),
    ]
    assert [(s.video_id, s.key, s.captions, s.start, s.end) for s in samples] == [
        ("a", "a", ["first", "second", "third"], None, None),  # rows of one video merge
        ("v.b", "v_b_0_5_1_5", ["abs"], 0.5, 1.5),
    ]
    assert all(s.corpus == "manifest" and s.split == "train" for s in samples)


def test_manifest_csv_merges_captions(tmp_path, clip_maker) -> None:
    clip_maker(tmp_path / "a.mp4")
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b'video,caption,video_id\na.mp4,"one, with comma",A\na.mp4,two,A\n'
                         b"a.mp4\nnope.mp4,lost,N\na.mp4,\xff\xfe,A\na.mp4,,B\n")
    records = list(ManifestCorpus(manifest, corpus="mine").samples("test"))
    assert [(q.reason, q.source) for q in records if isinstance(q, Quarantined)] == [
        ("malformed row", f"{manifest}:4"), ("video missing", f"{manifest}:5"),
        ("caption not valid UTF-8", f"{manifest}:6"), ("empty caption", f"{manifest}:7"),
    ]
    samples = [r for r in records if isinstance(r, VideoSample)]
    assert [(s.video_id, s.captions, s.corpus) for s in samples] == [("A", ["one, with comma", "two"], "mine")]
    bad_header = tmp_path / "h.csv"
    bad_header.write_text("path,text\na.mp4,x\n")
    with pytest.raises(ValueError, match=r"h\.csv:1.*video,caption"):
        list(ManifestCorpus(bad_header).samples("test"))


def test_pack_quarantines_unusable_videos(tmp_path, clip_maker, bad_inputs) -> None:
    good = clip_maker(tmp_path / "good.mp4")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(bad_inputs.corrupt_mp4_bytes(good.read_bytes()))
    zero = bad_inputs.write_zero_frame_video(tmp_path / "zero.mp4")
    assert zero.stat().st_size > 0  # a real (empty) container, not a missing file
    records = [
        VideoSample("good", good, ["ok"], "train", "t"),
        Quarantined("m.jsonl:3", "empty caption", "x"),
        VideoSample("corrupt", corrupt, ["c"], "train", "t"),
        VideoSample("zero", zero, ["z"], "train", "t"),
        VideoSample("gone", tmp_path / "gone.mp4", ["g"], "train", "t"),
        VideoSample("late", good, ["w"], "train", "t", start=30.0),
        VideoSample("good", good, ["again"], "train", "t"),
        VideoSample("good2", good, ["ok2"], "train", "t"),
    ]
    out = tmp_path / "out"
    report = pack_split(records, out, "train", progress=False, max_quarantine=1.0)  # a defect matrix
    assert (report.packed, report.quarantined, report.shards) == (2, 6, 1)
    assert "8 rows in = 2 packed + 6 quarantined" in str(report)
    logged = [json.loads(line) for line in (out / "train.quarantine.jsonl").read_text().splitlines()]
    assert [(q["reason"], q["video_id"]) for q in logged] == [
        ("empty caption", "x"), ("unreadable video", "corrupt"), ("unreadable video", "zero"),
        ("video missing", "gone"), ("clip window outside video", "late"), ("duplicate key", "good"),
    ]
    assert list(_tar_metas(out, "train")) == ["good", "good2"]


def test_repack_removes_stale_shards_and_workers_match(tmp_path, synthetic_corpus) -> None:
    def samples():
        return ManifestCorpus(synthetic_corpus / "test.jsonl").samples("test")

    small = pack_split(samples(), tmp_path / "a", "test", shard_bytes=40_000, progress=False)
    assert small.shards >= 3
    big = pack_split(samples(), tmp_path / "a", "test", progress=False)
    assert big.shards == 1 and sorted(p.name for p in (tmp_path / "a").glob("test-*.tar")) == ["test-000000.tar"]
    pooled = pack_split(samples(), tmp_path / "b", "test", workers=2, progress=False)
    assert (tmp_path / "a" / "test-000000.tar").read_bytes() == (tmp_path / "b" / "test-000000.tar").read_bytes()
    assert read_index(tmp_path / "b", "test")["shards"][0]["sha256"] == big_sha(tmp_path / "a")
    assert pooled.packed == 12


def big_sha(shard_dir: Path) -> str:
    return read_index(shard_dir, "test")["shards"][0]["sha256"]


@pytest.mark.parametrize("fastdecode", [True, False])
def test_transcode(tmp_path, clip_maker, fastdecode) -> None:
    src = clip_maker(tmp_path / "v.mp4", frames=16, size=48, fps=8)
    spec = Transcode(short_side=32, fps=4, gop=4, fastdecode=fastdecode)  # decord misreads widths 16, 24, 48, 72
    report = pack_split([VideoSample("v", src, ["c"], "train", "t")], tmp_path / "o", "train",
                        transcode=spec, progress=False)
    assert report.packed == 1
    assert read_index(tmp_path / "o", "train")["transcode"] == {"short_side": 32, "fps": 4, "gop": 4,
                                                                 "fastdecode": fastdecode}
    with tarfile.open(tmp_path / "o" / "train-000000.tar") as tar:
        data = tar.extractfile("v.mp4").read()
    info = probe_video(data)
    assert (info.width, info.height, info.num_frames, info.fps) == (32, 32, 8, 4.0)
    # x264 writes its settings into the stream: fastdecode means CAVLC and no deblocking filter.
    assert (b"cabac=0" in data, b"deblock=0" in data) == (fastdecode, fastdecode)
