"""Existing WebDataset video shards, written as video2dataset writes them (``key.mp4``, ``key.txt``
caption, ``key.json`` metadata, ``{00000..00001}.tar``), indexed in place and streamed unchanged.
Once the only route was to unpack and repack; a hand-written index gave ``KeyError: 'video_id'``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import webdataset as wds

from shards.index import read_index, verify_split
from shards.stream import ShardStream
from shards.tarread import ShardMembersMissing
from trainer.components.data import pack_corpus
from trainer.launchers.cli import compose
from tests.support import TINY_RUN, launch_train


def write_video2dataset_shards(folder: Path, clip: bytes, per_shard: list[int], start: int = 0,
                               drop_caption: str | None = None) -> None:
    """video2dataset's writer conventions: 9-digit keys (shard id + index), mp4/txt/json members."""
    folder.mkdir(parents=True, exist_ok=True)
    n = start
    for shard, count in enumerate(per_shard):
        with wds.TarWriter(str(folder / f"{shard + start // 100:05d}.tar")) as sink:
            for _ in range(count):
                key = f"{shard:05d}{n:04d}"
                sample = {"__key__": key, "mp4": clip, "txt": f"a bar sweeps right, clip {n}",
                          "json": json.dumps({"url": f"https://example.org/{n}.mp4", "key": key, "status": "success",
                                              "caption": f"a bar sweeps right, clip {n}"}).encode()}
                if key == drop_caption:
                    del sample["txt"]
                sink.write(sample)
                n += 1


@pytest.fixture
def v2d(tmp_path, clip_maker) -> dict:
    clip = clip_maker(tmp_path / "clip.mp4", frames=8).read_bytes()
    write_video2dataset_shards(tmp_path / "train", clip, [6, 5], drop_caption="000010008")
    write_video2dataset_shards(tmp_path / "test", clip, [4], start=100)
    # quoted inside the override: Hydra's grammar reserves braces
    return {"train": f"'{tmp_path}/train/{{00000..00001}}.tar'", "test": f"{tmp_path}/test/00001.tar",
            "index": tmp_path / "index"}


def index_config(v2d: dict, *extra: str):
    return compose(["data=webdataset", f"data.shards={v2d['index']}", f"data.webdataset.train={v2d['train']}",
                    f"data.webdataset.test={v2d['test']}", *extra])


def test_index_counts_exactly_and_the_stream_reads_them_in_place(v2d) -> None:
    outcomes = pack_corpus(index_config(v2d).data, ["train", "test"], progress=False)
    train, test = (o.report for o in outcomes)
    assert (train.rows, train.packed, train.quarantined, train.shards) == (11, 10, 1, 2)
    assert (test.rows, test.packed, test.quarantined) == (4, 4, 0)
    index = read_index(v2d["index"], "train")
    assert [s["samples"] for s in index["shards"]] == [6, 4] and index["members"]["caption_member"] == "txt"
    (logged,) = [json.loads(line) for line in (v2d["index"] / "train.quarantine.jsonl").read_text().splitlines()]
    assert logged["video_id"] == "000010008" and "no caption in its txt member" in logged["detail"]["problem"]
    assert verify_split(v2d["index"], "train").ok
    stream = ShardStream(v2d["index"], "train", max_frames=4, image_size=32, training=False)
    samples = list(stream)
    assert len(samples) == 10 and stream.counters["incomplete_sample"] == 1  # skipped, as the index said
    assert samples[0]["video_id"] == "000000000" and samples[0]["captions"] == ["a bar sweeps right, clip 0"]
    assert samples[0]["frames"].shape == (4, 3, 32, 32)


def test_captions_from_json_fields(v2d) -> None:
    cfg = index_config(v2d, "data.webdataset.caption_member=", "data.webdataset.caption_keys=[caption]",
                       "data.webdataset.id_key=url")
    pack_corpus(cfg.data, ["test"], progress=False)
    (first, *_) = list(ShardStream(v2d["index"], "test", max_frames=2, image_size=32, training=False))
    assert first["video_id"] == "https://example.org/100.mp4" and first["captions"] == ["a bar sweeps right, clip 100"]


def test_a_hand_written_index_is_one_clear_line(v2d) -> None:
    """streamret's index format over foreign shards: the stream once died with KeyError: 'video_id'."""
    v2d["index"].mkdir()
    shard = v2d["test"]
    (v2d["index"] / "test.index.json").write_text(json.dumps({"split": "test", "total_samples": 4,
                                                              "shards": [{"name": shard, "samples": 4}]}))
    with pytest.raises(ShardMembersMissing, match=r"00001\.tar: sample \w+: no caption in its json field.*data=webdataset"):
        ShardStream(v2d["index"], "test", max_frames=2, image_size=32, training=False)


def test_missing_shards_and_unknown_splits_are_named(v2d) -> None:
    from shards.corpora.common import UnknownSplit
    from shards.external import ShardListError

    cfg = compose(["data=webdataset", f"data.shards={v2d['index']}",
                   f"data.webdataset.train={v2d['train'].replace('00001', '00003')}"])
    with pytest.raises(ShardListError, match=r"2 of 4 shards .* do not exist, first .*00002\.tar"):
        pack_corpus(cfg.data, ["train"], progress=False)
    with pytest.raises(UnknownSplit, match=r"no shards for split\(s\) \['test'\]"):
        pack_corpus(cfg.data, ["test"], progress=False)


@pytest.mark.slow
def test_train_from_indexed_video2dataset_shards(v2d, tmp_path) -> None:
    """launch/pack.py indexes them; launch/train.py trains from them, no data.root anywhere."""
    import subprocess
    import sys

    from tests.support import ROOT

    index = subprocess.run([sys.executable, "launch/pack.py", "data=webdataset", f"data.shards={v2d['index']}",
                            f"data.webdataset.train={v2d['train']}", f"data.webdataset.test={v2d['test']}",
                            "run.progress=false"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert index.returncode == 0, index.stderr
    assert "train: 11 rows in = 10 packed + 1 quarantined" in index.stdout and "indexed in place" in index.stdout
    run_dir = tmp_path / "run"
    proc = launch_train("data=webdataset", f"data.shards={v2d['index']}", f"run.dir={run_dir}", "stage=con",
                        f"tracking.uri=sqlite:///{tmp_path / 'ml.db'}", *TINY_RUN, "stage.con.max_steps=2",
                        "data.batch_size=4", "run.stop_on_collapse=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_data"] == {"in_split": 4, "scored": 4} and metrics["test_videos"] == 4
