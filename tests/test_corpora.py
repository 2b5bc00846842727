"""Corpus readers over tiny fake corpora written in each corpus' real on-disk layout.

Each fixture plants one of every defect a reader must quarantine (missing video, empty caption,
non-UTF-8 caption bytes, malformed row) next to good rows, and the tests pin the exact samples
and the exact quarantine records.
"""
from __future__ import annotations

import json
import pickle
import tarfile
from pathlib import Path

import pytest

from shards.corpora import (
    CORPORA,
    ActivityNetCorpus,
    AnnotationError,
    DidemoCorpus,
    LsmdcCorpus,
    MsrvttCorpus,
    MsvdCorpus,
    open_corpus,
)
from shards.sample import Quarantined, VideoSample
from tests.test_download_layouts import write_clip

BAD_BYTES = b"caf\xe9 \xff"  # Latin-1 bytes: not UTF-8


def write_h264(path: Path, frames: int = 8, size: int = 32) -> None:
    """A real, decodable 8-frame 32x32 H.264 mp4."""
    write_clip(path, frames=frames, width=size, height=size)


@pytest.fixture(scope="module")
def clip_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_h264(path)
    return path.read_bytes()


def put(path: Path, data: bytes = b"not decoded by readers") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def json_with_bad_bytes(obj: object) -> bytes:
    """JSON text in which the placeholder string BAD is replaced by raw non-UTF-8 bytes."""
    return json.dumps(obj).encode().replace(b"BAD", BAD_BYTES)


def split_records(records) -> tuple[list[VideoSample], list[Quarantined]]:
    records = list(records)
    assert all(isinstance(r, VideoSample | Quarantined) for r in records)
    return [r for r in records if isinstance(r, VideoSample)], [r for r in records if isinstance(r, Quarantined)]


def reasons(quarantined: list[Quarantined]) -> list[tuple[str, str | None]]:
    return [(q.reason, q.video_id) for q in quarantined]


# --------------------------------------------------------------------------- MSRVTT


@pytest.fixture
def msrvtt_root(tmp_path: Path, clip_bytes: bytes) -> Path:
    root = tmp_path / "msrvtt"
    for vid in ("video0", "video1", "video2", "video7", "video8"):  # MSRVTT.zip's layout, beside the annotations
        put(root / "MSRVTT" / "videos" / "all" / f"{vid}.mp4", clip_bytes)
    sentences = [
        {"video_id": "video0", "caption": "a man cooks", "sen_id": 0},
        {"video_id": "video1", "caption": "a dog runs", "sen_id": 1},
        {"video_id": "video0", "caption": " someone is cooking ", "sen_id": 2},
        {"video_id": "video1", "caption": "   ", "sen_id": 3},
        {"video_id": "video1", "caption": "BAD", "sen_id": 4},
        {"video_id": "video2", "caption": "cars race", "sen_id": 5},
        {"video_id": "video3", "caption": "its video is missing", "sen_id": 6},
        {"caption": "no video id", "sen_id": 7},
        {"video_id": "video7", "caption": "a test caption the train split ignores", "sen_id": 8},
    ]
    videos = [{"video_id": f"video{i}", "id": i} for i in range(10)]
    put(root / "MSRVTT_data.json", json_with_bad_bytes({"videos": videos, "sentences": sentences}))
    put(root / "MSRVTT_train.9k.csv", b"video_id\nvideo0\nvideo1\nvideo2\nvideo3\nvideo4\nvideo5,extra\n")
    put(
        root / "MSRVTT_JSFUSION_test.csv",
        b"key,vid_key,video_id,sentence\n"
        b"ret0,msr7,video7,a woman sings\n"
        b'ret1,msr8,video8,"a song, with a comma"\n'
        b"ret2,msr9,video9,its video is missing\n"
        b"ret3,msr10,video10,\n"
        b"ret4,msr11,video11," + BAD_BYTES + b"\n"
        b"ret5,msr12\n"
        b"ret6,msr7,video7,the same video again\n",
    )
    return root


def test_msrvtt_train(msrvtt_root: Path) -> None:
    samples, quarantined = split_records(MsrvttCorpus(msrvtt_root).samples("train"))
    assert [(s.key, s.captions) for s in samples] == [
        ("video0", ["a man cooks", "someone is cooking"]),
        ("video1", ["a dog runs"]),
        ("video2", ["cars race"]),
    ]
    assert samples[2].video_path == msrvtt_root / "MSRVTT" / "videos" / "all" / "video2.mp4"
    assert samples[0].video_path == msrvtt_root / "MSRVTT" / "videos" / "all" / "video0.mp4"
    assert all(s.start is None and s.end is None and s.split == "train" and s.corpus == "msrvtt" for s in samples)
    assert reasons(quarantined) == [
        ("malformed row", None),  # "video5,extra" in the 9k CSV
        ("empty caption", "video1"),
        ("caption not valid UTF-8", "video1"),
        ("malformed row", None),  # sentence without video_id
        ("video missing", "video3"),
        ("no captions", "video4"),
    ]
    assert quarantined[0].source == str(msrvtt_root / "MSRVTT_train.9k.csv") and quarantined[0].detail["line"] == 7
    assert quarantined[1].source == str(msrvtt_root / "MSRVTT_data.json") and quarantined[1].detail["sentence_index"] == 3
    assert quarantined[2].detail["sentence_index"] == 4
    assert quarantined[4].source == str(msrvtt_root / "MSRVTT" / "videos" / "all" / "video3")
    assert quarantined[4].detail["searched"] == str(msrvtt_root / "MSRVTT" / "videos" / "all")


def test_msrvtt_test_1k(msrvtt_root: Path) -> None:
    samples, quarantined = split_records(MsrvttCorpus(msrvtt_root).samples("test"))
    assert [(s.key, s.captions) for s in samples] == [
        ("video7", ["a woman sings"]),
        ("video8", ["a song, with a comma"]),
    ]
    assert reasons(quarantined) == [
        ("video missing", "video9"),
        ("empty caption", "video10"),
        ("caption not valid UTF-8", "video11"),
        ("malformed row", None),
        ("duplicate key", "video7"),
    ]
    assert [q.detail.get("line") for q in quarantined[:4]] == [4, 5, 6, 7]


def test_msrvtt_packs_end_to_end(msrvtt_root: Path, tmp_path: Path) -> None:
    writer = pytest.importorskip("shards.writer")
    out_dir = tmp_path / "packed"
    with pytest.raises(writer.PackRefused, match=r"5 of 7 rows quarantined \(71% > data.pack.max_quarantine=0.25\)"):
        writer.pack_split(MsrvttCorpus(msrvtt_root).samples("test"), out_dir, "test", progress=False)
    assert not (out_dir / "test.index.json").exists() and (out_dir / "test.refused.jsonl").is_file()
    report = writer.pack_split(MsrvttCorpus(msrvtt_root).samples("test"), out_dir, "test", progress=False,
                               max_quarantine=1.0)  # this fixture is a defect matrix: accept the loss
    assert (report.rows, report.packed, report.quarantined) == (7, 2, 5)
    assert "7 rows in = 2 packed + 5 quarantined" in str(report)
    assert not (out_dir / "test.refused.jsonl").exists()
    metas = {}
    for tar_path in sorted(out_dir.glob("test-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    metas[member.name.split(".", 1)[0]] = json.load(tar.extractfile(member))
    assert {key: meta["captions"] for key, meta in metas.items()} == {
        "video7": ["a woman sings"],
        "video8": ["a song, with a comma"],
    }
    logged = [json.loads(line) for line in (out_dir / "test.quarantine.jsonl").read_text().splitlines()]
    assert sorted(q["reason"] for q in logged) == sorted(
        ["video missing", "empty caption", "caption not valid UTF-8", "malformed row", "duplicate key"]
    )


# --------------------------------------------------------------------------- ActivityNet


@pytest.fixture
def activitynet_root(tmp_path: Path) -> Path:
    root = tmp_path / "anet"
    put(root / "Activity_Videos" / "v_aaa.mp4")
    put(root / "Activity_Videos" / "v_bbb.mkv")
    put(root / "Activity_Videos" / "v_ccc.webm")
    put(root / "Activity_Videos" / "v_eee.mp4")
    put(root / "Activity_Videos" / "v_fff.mp4")
    train = {
        "v_aaa": {"duration": 12.5, "timestamps": [[0, 5], [5, 12]], "sentences": [" A man walks in.", "He sits down. "]},
        "bbb": {"duration": 30, "timestamps": [[0, 30]], "sentences": ["A bare id."]},
        "v_ddd": {"duration": 4.0, "timestamps": [[0, 4]], "sentences": ["Its video is missing."]},
        "v_eee": {"duration": 9.0, "timestamps": [[0, 9]], "sentences": [" ", ""]},
        "v_fff": {"duration": 9.0, "timestamps": [[0, 9]], "sentences": ["Fine.", "BAD"]},
        "v_ggg": {"duration": 9.0, "timestamps": [[0, 9]]},
    }
    put(root / "train.json", json_with_bad_bytes(train))
    put(root / "val_1.json", json.dumps({"v_ccc": {"duration": 3, "timestamps": [], "sentences": ["One."]}, "v_zzz": {"sentences": ["Filtered out."]}}).encode())
    put(root / "val_ids.json", json.dumps(["ccc", "v_nope"]).encode())
    return root


def test_activitynet_train_paragraphs(activitynet_root: Path) -> None:
    samples, quarantined = split_records(ActivityNetCorpus(activitynet_root).samples("train"))
    assert [(s.key, s.captions, s.duration, s.start, s.end) for s in samples] == [
        ("v_aaa", ["A man walks in. He sits down."], 12.5, None, None),
        ("v_bbb", ["A bare id."], 30.0, None, None),
    ]
    assert samples[1].video_path == activitynet_root / "Activity_Videos" / "v_bbb.mkv"
    assert samples[0].meta()["annotated_duration"] == 12.5
    assert reasons(quarantined) == [
        ("video missing", "v_ddd"),
        ("empty caption", "v_eee"),
        ("caption not valid UTF-8", "v_fff"),
        ("malformed row", "v_ggg"),
    ]
    assert quarantined[2].detail == {"id": "v_fff", "sentence_index": 1, "caption": ascii("caf\udce9 \udcff")}
    assert quarantined[0].source == str(activitynet_root / "Activity_Videos" / "v_ddd")


def test_activitynet_val_ids_filter(activitynet_root: Path) -> None:
    samples, quarantined = split_records(ActivityNetCorpus(activitynet_root).samples("val_1"))
    assert [(s.key, s.captions, s.duration) for s in samples] == [("v_ccc", ["One."], 3.0)]
    assert reasons(quarantined) == [("malformed row", "v_nope")]
    assert quarantined[0].source == str(activitynet_root / "val_ids.json")


# --------------------------------------------------------------------------- DiDeMo


@pytest.fixture
def didemo_root(tmp_path: Path) -> Path:
    root = tmp_path / "didemo"
    put(root / "DiDeMo_Videos" / "123@N00_456_abc.mov")
    put(root / "DiDeMo_Videos" / "789@N01_012_def.m4v.mp4")  # annotated as .m4v; the download script appends .mp4
    put(root / "DiDeMo_Videos" / "noext.avi")
    rows = [
        {"video": "123@N00_456_abc.mov", "description": "a girl jumps", "times": [[0, 0]]},
        {"video": "789@N01_012_def.m4v", "description": "a car passes", "times": [[1, 2]]},
        {"video": "123@N00_456_abc.mov", "description": "she lands", "times": [[1, 1]]},
        {"video": "123@N00_456_abc.mov", "description": "", "times": [[2, 2]]},
        {"video": "789@N01_012_def.m4v", "description": "BAD", "times": [[3, 3]]},
        {"video": "noext", "description": "no extension in the name", "times": [[0, 5]]},
        {"video": "gone.mov", "description": "its video is missing", "times": [[0, 1]]},
        {"description": "no video field", "times": [[0, 1]]},
        ["not", "an", "object"],
    ]
    put(root / "train_data.json", json_with_bad_bytes(rows))
    put(root / "val_data.json", json.dumps([{"video": "noext", "description": "val one", "times": [[0, 0]]}]).encode())
    put(root / "val_list.txt", b"noext\n\nunlisted\n")
    put(root / "test_data.json", b"[{\"video\": \"x\", ")  # truncated: unparsable as a whole
    return root


def test_didemo_train(didemo_root: Path) -> None:
    samples, quarantined = split_records(DidemoCorpus(didemo_root).samples("train"))
    assert [(s.key, s.video_id, s.captions, s.start, s.end) for s in samples] == [
        ("123_N00_456_abc_mov", "123@N00_456_abc.mov", ["a girl jumps she lands"], 0.0, 30.0),
        ("789_N01_012_def_m4v", "789@N01_012_def.m4v", ["a car passes"], 0.0, 30.0),
        ("noext", "noext", ["no extension in the name"], 0.0, 30.0),
    ]
    assert samples[1].video_path == didemo_root / "DiDeMo_Videos" / "789@N01_012_def.m4v.mp4"
    assert samples[2].video_path == didemo_root / "DiDeMo_Videos" / "noext.avi"
    assert reasons(quarantined) == [
        ("empty caption", "123@N00_456_abc.mov"),
        ("caption not valid UTF-8", "789@N01_012_def.m4v"),
        ("malformed row", None),
        ("malformed row", None),
        ("video missing", "gone.mov"),
    ]
    assert [q.detail["row"] for q in quarantined] == [3, 4, 7, 8, 6]


def test_didemo_list_filter_and_unparsable_json(didemo_root: Path) -> None:
    samples, quarantined = split_records(DidemoCorpus(didemo_root).samples("val"))
    assert [(s.key, s.captions) for s in samples] == [("noext", ["val one"])]
    assert reasons(quarantined) == [("no captions", "unlisted")]
    assert quarantined[0].detail["line"] == 3
    with pytest.raises(AnnotationError, match="test_data.json: not valid JSON"):
        list(DidemoCorpus(didemo_root).samples("test"))


# --------------------------------------------------------------------------- MSVD


@pytest.fixture
def msvd_root(tmp_path: Path) -> Path:
    root = tmp_path / "msvd"
    put(root / "YouTubeClips" / "-4wsuPCjDBc_5_15.avi")
    put(root / "YouTubeClips" / "abc_1_2.mp4")
    put(root / "YouTubeClips" / "val.vid.avi")
    captions = {
        "-4wsuPCjDBc_5_15": [["a", "squirrel", "eats"], "a squirrel is eating", [], [b"caf\xe9"], ["ok", 3]],
        "abc_1_2": ["a man plays guitar"],
        "gone_0_1": ["its video is missing"],
        "val.vid": ["the val one"],
    }
    put(root / "raw-captions.pkl", pickle.dumps(captions))
    put(root / "train_list.txt", b"-4wsuPCjDBc_5_15\nabc_1_2\ngone_0_1\nno_captions_0_1\n" + BAD_BYTES + b"\n")
    put(root / "val_list.txt", b"val.vid\n")
    put(root / "test_list.txt", b"")
    return root


def test_msvd_one_sample_per_video_with_all_its_captions(msvd_root: Path) -> None:
    """One sample per video (a gallery of one sample per caption holds each video ~41 times)."""
    samples, quarantined = split_records(MsvdCorpus(msvd_root).samples("train"))
    assert [(s.key, s.video_id, s.captions) for s in samples] == [
        ("-4wsuPCjDBc_5_15", "-4wsuPCjDBc_5_15", ["a squirrel eats", "a squirrel is eating"]),
        ("abc_1_2", "abc_1_2", ["a man plays guitar"]),
    ]
    assert samples[0].video_path == msvd_root / "YouTubeClips" / "-4wsuPCjDBc_5_15.avi"
    assert samples[1].video_path == msvd_root / "YouTubeClips" / "abc_1_2.mp4"
    assert reasons(quarantined) == [
        ("empty caption", "-4wsuPCjDBc_5_15"),
        ("caption not valid UTF-8", "-4wsuPCjDBc_5_15"),
        ("malformed row", "-4wsuPCjDBc_5_15"),
        ("video missing", "gone_0_1"),
        ("no captions", "no_captions_0_1"),
        ("malformed row", None),  # the non-UTF-8 id line
    ]
    assert [q.detail.get("caption_index") for q in quarantined[:3]] == [2, 3, 4]
    assert quarantined[5].detail["line"] == 5


def test_msvd_keys_have_no_dots_and_empty_split(msvd_root: Path) -> None:
    corpus = MsvdCorpus(msvd_root)
    samples, quarantined = split_records(corpus.samples("val"))
    assert [(s.key, s.video_id) for s in samples] == [("val_vid", "val.vid")]
    assert split_records(corpus.samples("test")) == ([], [])


def test_msvd_refuses_pickles_that_import(msvd_root: Path) -> None:
    (msvd_root / "raw-captions.pkl").write_bytes(pickle.dumps({"abc_1_2": [Path("x")]}))
    with pytest.raises(AnnotationError, match="raw-captions.pkl: cannot unpickle"):
        list(MsvdCorpus(msvd_root).samples("train"))


# --------------------------------------------------------------------------- LSMDC

CLIP_A = "0001_American_Beauty_00.00.51.926-00.00.54.129"
CLIP_B = "0001_American_Beauty_00.01.02.000-00.01.05.500"
CLIP_C = "1012_Unbreakable_00.02.00.000-00.02.03.000"


@pytest.fixture
def lsmdc_root(tmp_path: Path) -> Path:
    root = tmp_path / "lsmdc"
    put(root / "avi" / "0001_American_Beauty" / f"{CLIP_A}.avi")
    put(root / "avi" / "0001_American_Beauty" / f"{CLIP_B}.mp4")
    times = b"\t00.00.51.926\t00.00.54.129\t00.00.51.000\t00.00.54.000\t"
    put(
        root / "LSMDC16_annos_training.csv",
        CLIP_A.encode() + times + b"SOMEONE walks in.\n"
        + CLIP_B.encode() + times + b"She smiles\tat him.\r\n"
        + CLIP_A.encode() + times + b"He sits.\n"
        + CLIP_C.encode() + times + b"Its video is missing.\n"
        + CLIP_B.encode() + times + b"\n"
        + CLIP_B.encode() + times + BAD_BYTES + b"\n"
        + CLIP_B.encode() + b"\tonly two fields\n",
    )
    put(root / "LSMDC16_annos_val.csv", b"")
    put(root / "LSMDC16_challenge_1000_publictect.csv", CLIP_A.encode() + times + b"The test caption.\n")
    return root


def test_lsmdc_train(lsmdc_root: Path) -> None:
    samples, quarantined = split_records(LsmdcCorpus(lsmdc_root).samples("train"))
    assert [(s.key, s.video_id, s.captions, s.start, s.end) for s in samples] == [
        (
            "0001_American_Beauty_00_00_51_926-00_00_54_129", CLIP_A,
            ["SOMEONE walks in.", "He sits."], None, None,
        ),
        ("0001_American_Beauty_00_01_02_000-00_01_05_500", CLIP_B, ["She smiles\tat him."], None, None),
    ]
    assert samples[0].video_path == lsmdc_root / "avi" / "0001_American_Beauty" / f"{CLIP_A}.avi"
    assert samples[1].video_path == lsmdc_root / "avi" / "0001_American_Beauty" / f"{CLIP_B}.mp4"
    assert reasons(quarantined) == [
        ("empty caption", CLIP_B),
        ("caption not valid UTF-8", CLIP_B),
        ("malformed row", None),
        ("video missing", CLIP_C),
    ]
    assert [q.detail["line"] for q in quarantined] == [5, 6, 7, 4]
    assert quarantined[3].source == str(lsmdc_root / "avi" / CLIP_C)


def test_lsmdc_test_and_empty_val(lsmdc_root: Path) -> None:
    corpus = LsmdcCorpus(lsmdc_root)
    samples, _ = split_records(corpus.samples("test"))
    assert [(s.video_id, s.captions, s.split) for s in samples] == [(CLIP_A, ["The test caption."], "test")]
    assert split_records(corpus.samples("val")) == ([], [])


# --------------------------------------------------------------------------- registry and layout errors


def test_registry_and_open_corpus(lsmdc_root: Path) -> None:
    assert sorted(CORPORA) == ["activitynet", "didemo", "lsmdc", "msrvtt", "msvd"]
    corpus = open_corpus("LSMDC", lsmdc_root)
    assert isinstance(corpus, LsmdcCorpus) and corpus.splits == ("train", "val", "test")
    with pytest.raises(ValueError, match="unknown corpus 'webvid'; known corpora: activitynet, didemo, lsmdc, msrvtt, msvd"):
        open_corpus("webvid", lsmdc_root)
    with pytest.raises(ValueError, match=r"unknown split 'val_1'; this corpus has splits \['train', 'val', 'test'\]"):
        corpus.samples("val_1")


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_missing_annotation_file_names_it(name: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"{name}: annotation file .* not found. Expected layout"):
        open_corpus(name, tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        open_corpus(name, tmp_path / "nope")


def test_msrvtt_wrong_csv_header(msrvtt_root: Path) -> None:
    (msrvtt_root / "MSRVTT_train.9k.csv").write_bytes(b"vid\nvideo0\n")
    with pytest.raises(AnnotationError, match=r"MSRVTT_train.9k.csv: header \['vid'\] lacks column\(s\) \['video_id'\]"):
        list(MsrvttCorpus(msrvtt_root).samples("train"))
