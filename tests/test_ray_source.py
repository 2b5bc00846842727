"""`shards.ray_source` on a real local Ray cluster: a ShardStream's samples decoded by a Ray Data
actor pool are the local stream's, batch for batch; resume is exact; damage is counted once; a
pipeline that cannot run says so."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import numpy as np
import pytest
import torch
import webdataset as wds

ray = pytest.importorskip("ray")

from shards.index import read_index  # noqa: E402
from shards.ray_source import PipelineStalled, RayStreamLoader, add_skips, ray_dataset, split_dataset  # noqa: E402
from shards.loader import build_loader  # noqa: E402
from shards.stream import ShardStream  # noqa: E402
from shards.tokenize import CaptionTokenizer  # noqa: E402

pytestmark = pytest.mark.slow

OPTS = dict(max_frames=4, image_size=16, sample_fps=1.0)
MAX_WORDS = 12


@pytest.fixture(scope="module")
def ray_cluster():
    # Unix socket paths are limited to ~107 bytes: pytest's tmp paths are too long for Ray's sockets.
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(address="local", num_cpus=4, include_dashboard=False, _temp_dir=temp_dir,
             log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _stream_keys(shard_dir, split) -> tuple[dict[str, list[str]], dict[str, int]]:
    """(key -> captions, skip counters) as the DataLoader path (ShardStream, eval order) decodes them."""
    stream = ShardStream(shard_dir, split, training=False, max_frames=OPTS["max_frames"],
                         image_size=OPTS["image_size"], sample_fps=OPTS["sample_fps"])
    return {s["key"]: s["captions"] for s in stream}, stream.counters


def _train_stream(shard_dir, **kw) -> ShardStream:
    return ShardStream(shard_dir, "train", training=True, seed=3, shuffle_buffer=8, **OPTS, **kw)


def test_ray_data_reads_s3_shards_through_the_node_cache(s3_shards, ray_cluster, synthetic_shards, tmp_path) -> None:
    """First in the module: the s3 fixture's AWS_* environment exists before the cluster's workers."""
    from shards.cache import ShardCache

    cache = ShardCache(str(tmp_path / "cache"), 2**30)
    rows = split_dataset(s3_shards, "test", cache=cache, **OPTS).take_all()
    expected, _ = _stream_keys(synthetic_shards, "test")
    assert [r["key"] for r in rows] == list(expected)  # file order, as the local eval stream
    cached = sorted(p.read_bytes() for p in (tmp_path / "cache").glob("*.tar"))
    local = sorted(p.read_bytes() for p in synthetic_shards.glob("test-*.tar"))
    assert cached == local  # every shard cached whole, on the (one) node that read it


def test_rows_are_the_local_streams_samples_in_its_order(ray_cluster, synthetic_shards) -> None:
    rows = split_dataset(synthetic_shards, "train", decode_actors=(1, 2), **OPTS).take_all()
    stream = ShardStream(synthetic_shards, "train", training=False, **OPTS)
    local = [stream.decode(raw, normalise=False) for raw in stream.raw_samples(0, 1, 0, None)]
    assert [r["key"] for r in rows] == [s["key"] for s in local]
    assert len(rows) == read_index(synthetic_shards, "train")["total_samples"]
    for row, sample in zip(rows, local):
        assert row["ok"] and row["video"].dtype == np.uint8 and row["video"].shape == (4, 3, 16, 16)
        assert np.array_equal(row["video"], sample["frames"].numpy())  # the same bytes: same decode, same crop
        assert np.array_equal(row["video_mask"], sample["frame_mask"].numpy())
        assert json.loads(row["captions"]) == sample["captions"] and row["video_id"] == sample["video_id"]
        assert json.loads(row["skips"]) == {}


def test_a_ray_epoch_is_the_local_loaders_epoch_batch_for_batch(ray_cluster, synthetic_shards) -> None:
    """RayStreamLoader vs StreamLoader without DataLoader workers, shuffled, 2 ranks: the same
    samples in the same batches, the same captions picked, the same uint8 frames."""
    for rank in (0, 1):
        ray_loader = RayStreamLoader(_train_stream(synthetic_shards, rank=rank, world_size=2), batch_size=4,
                                     max_words=MAX_WORDS, seed=3, decode_actors=(1, 2))
        local = build_loader(_train_stream(synthetic_shards, rank=rank, world_size=2), batch_size=4,
                             max_words=MAX_WORDS, num_workers=0, training=True, seed=3, normalise=False)
        assert len(ray_loader) == len(local) == 3
        for epoch in (0, 1):
            got, want = list(ray_loader), list(local)
            assert ray_loader.epoch == local.epoch == epoch
            assert [b["key"] for b in got] == [b["key"] for b in want]
            for a, b in zip(got, want):
                assert torch.equal(a["video"], b["video"]) and torch.equal(a["text"], b["text"])
                assert torch.equal(a["video_mask"], b["video_mask"]) and a["video_id"] == b["video_id"]


def _decode_actors() -> set[str]:
    return {actor_id for actor_id, a in ray._private.state.actors().items() if "DecodeClips" in a["ActorClassName"]}


def test_one_pipeline_streams_every_epoch_and_resumes_inside_one(ray_cluster, synthetic_shards) -> None:
    """``epochs()``, what the stage loop pulls: one read task and one pool for all epochs (per-epoch
    pipelines started a pool each). Rank 1 of 2 has 12 samples, batches of 5: 5, 5, 2 per epoch, as
    the local loader's (the padded tail never takes the next epoch's samples); a state saved inside
    epoch 1 resumes there through a new pipeline."""
    def loaders():
        ray_loader = RayStreamLoader(_train_stream(synthetic_shards, rank=1, world_size=2), batch_size=5,
                                     max_words=MAX_WORDS, seed=3, decode_actors=(1, 1))
        local = build_loader(_train_stream(synthetic_shards, rank=1, world_size=2), batch_size=5,
                             max_words=MAX_WORDS, num_workers=0, training=True, seed=3, normalise=False)
        return ray_loader, local

    ray_loader, local = loaders()
    want = [batch for _ in range(3) for batch in local]
    before = _decode_actors()
    stream, got, epochs = ray_loader.epochs(), [], []
    for _ in range(9):
        got.append(next(stream))
        epochs.append(ray_loader.epoch)
    stream.close()
    assert len(_decode_actors() - before) == 1  # one pool for the three epochs
    assert epochs == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [len(b["key"]) for b in got] == [5, 5, 2] * 3
    assert [b["key"] for b in got] == [b["key"] for b in want]
    for a, b in zip(got, want):
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["text"], b["text"])

    first, _ = loaders()
    stream = first.epochs()
    for _ in range(4):
        next(stream)
    state = first.state_dict()
    stream.close()
    assert (state["epoch"], state["samples_consumed"]) == (1, 5)
    again, _ = loaders()
    again.load_state_dict(state)
    stream = again.epochs()
    assert [next(stream)["key"] for _ in range(5)] == [b["key"] for b in want[4:]]
    stream.close()


def test_resume_mid_epoch_continues_with_the_next_batch(ray_cluster, synthetic_shards) -> None:
    full = [b["key"] for b in RayStreamLoader(_train_stream(synthetic_shards), batch_size=4, max_words=MAX_WORDS,
                                              seed=3, decode_actors=(1, 1))]
    first = RayStreamLoader(_train_stream(synthetic_shards), batch_size=4, max_words=MAX_WORDS, seed=3,
                            decode_actors=(1, 1))
    seen = []
    for batch in first:
        seen.append(batch["key"])
        if len(seen) == 2:
            break  # a preemption: what was handed out is all that was trained on
    state = first.state_dict()
    assert state["samples_consumed"] == 8 and state["epoch"] == 0
    again = RayStreamLoader(_train_stream(synthetic_shards), batch_size=4, max_words=MAX_WORDS, seed=3,
                            decode_actors=(1, 1))
    again.load_state_dict(state)
    rest = [b["key"] for b in again]
    assert seen + rest == full and len(full) == 6
    assert sorted(k for keys in full for k in keys) == sorted(_stream_keys(synthetic_shards, "train")[0])


def test_each_epoch_trains_on_the_caption_the_local_loader_would_pick(ray_cluster, synthetic_shards) -> None:
    """The caption of a sample changes per epoch, by the local loader's rule (it once stayed at
    epoch 0's: 1 of MSRVTT's 20 captions for the whole run)."""
    from shards.loader import pick_caption

    loader = RayStreamLoader(_train_stream(synthetic_shards), batch_size=8, max_words=MAX_WORDS, seed=3,
                             decode_actors=(1, 1))
    tokenizer = CaptionTokenizer(MAX_WORDS)
    picked = {}
    for epoch in (0, 1):
        for batch in loader:
            for key, captions, text in zip(batch["key"], batch["captions"], batch["text"]):
                want = captions[pick_caption(captions, 3, epoch, key)]
                assert torch.equal(text, tokenizer([want])[0][0])
                picked[(key, epoch)] = want
    keys = {key for key, _ in picked}
    assert sum(picked[(k, 0)] != picked[(k, 1)] for k in keys) >= len(keys) // 4  # 2 captions each: about half differ


def test_damaged_shards_are_skipped_and_counted_once(ray_cluster, shard_copy, bad_inputs) -> None:
    shards = read_index(shard_copy, "train")["shards"]
    # shard 0: cut in half mid-member; shard 1: one sample's mp4 bytes replaced by garbage; shard 2 below
    truncated = shard_copy / shards[0]["name"]
    bad_inputs.truncate_file(truncated, truncated, fraction=0.5)
    damaged = shard_copy / shards[1]["name"]
    samples = list(wds.WebDataset(str(damaged), shardshuffle=False))
    samples[2]["mp4"] = bad_inputs.corrupt_mp4_bytes(samples[2]["mp4"])
    os.remove(damaged)
    with wds.TarWriter(str(damaged), mtime=0) as sink:
        for s in samples:
            sink.write({"__key__": s["__key__"], "mp4": s["mp4"], "json": s["json"]})
    bad_inputs.cut_between_members(shard_copy / shards[2]["name"], keep_samples=1)  # shard 2: a shorter, valid tar

    expected, counters = _stream_keys(shard_copy, "train")
    assert counters["corrupt_shard"] == 1 and counters["decode_error"] == 1 and counters["short_shard"] == 1
    rows = split_dataset(shard_copy, "train", decode_actors=(2, 2), **OPTS).take_all()
    assert [r["key"] for r in rows if r["ok"]] == list(expected)
    assert [r["key"] for r in rows if not r["ok"]] == [samples[2]["__key__"]]  # a row still: batches do not shift
    assert add_skips({}, (r["skips"] for r in rows)) == {"corrupt_shard": 1, "short_shard": 1, "decode_error": 1}

    # training: the loader's counters (the data_* metrics) match the local loader's over an epoch
    ray_loader = RayStreamLoader(_train_stream(shard_copy), batch_size=4, max_words=MAX_WORDS, seed=3,
                                 decode_actors=(1, 1))
    local = build_loader(_train_stream(shard_copy), batch_size=4, max_words=MAX_WORDS, num_workers=0, training=True,
                         seed=3, normalise=False)
    assert [b["key"] for b in ray_loader] == [b["key"] for b in local]
    assert {k: v for k, v in ray_loader.counters.items() if v} == {k: v for k, v in local.counters.items() if v}
    assert ray_loader.counters["decode_error"] >= 1 and ray_loader.counters["corrupt_shard"] >= 1


def test_a_pipeline_that_cannot_start_is_reported_not_waited_on(ray_cluster, synthetic_shards) -> None:
    """Decode actors the cluster cannot hold (8 > its 4 CPUs): the loader fails within its stall
    timeout, naming the epoch and the fix, instead of waiting for CPUs that never come."""
    loader = RayStreamLoader(_train_stream(synthetic_shards), batch_size=4, max_words=MAX_WORDS, seed=3,
                             decode_actors=(8, 8), stall_timeout_s=5)
    started = time.monotonic()
    with pytest.raises(PipelineStalled, match=r"train epoch 0 rank 0: no batch for \d+ s.*decode_actors_min"):
        next(iter(loader))
    assert time.monotonic() - started < 60
    # the cluster is whole again: the next pipeline runs
    assert len(split_dataset(synthetic_shards, "test", **OPTS).take_all()) == read_index(synthetic_shards, "test")[
        "total_samples"]


def test_frame_shards_give_the_rows_the_local_stream_gives(ray_cluster, frame_shards) -> None:
    """Frame shards: the read task ships only the picked JPEGs, the actors decode them (libjpeg-turbo
    here, nvJPEG with use_gpu); rows equal ShardStream's samples of the same shards."""
    rows = split_dataset(frame_shards, "test", **OPTS).take_all()
    stream = ShardStream(frame_shards, "test", training=False, **OPTS)
    local = [stream.decode(raw, normalise=False) for raw in stream.raw_samples(0, 1, 0, None)]
    assert [r["key"] for r in rows] == [s["key"] for s in local]
    assert len(rows) == read_index(frame_shards, "test")["total_samples"]
    for row, sample in zip(rows, local):
        assert np.array_equal(row["video_mask"], sample["frame_mask"].numpy())
        assert np.array_equal(row["video"], sample["frames"].numpy())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG decode actors need CUDA")
def test_gpu_jpeg_decode_actors_match_cpu_actors(ray_cluster, frame_shards) -> None:
    """use_gpu=True on frame shards: batched nvJPEG on the GPU; within JPEG decoder rounding of libjpeg-turbo."""
    cpu = {r["key"]: r for r in split_dataset(frame_shards, "test", **OPTS).take_all()}
    gpu = {r["key"]: r for r in split_dataset(frame_shards, "test", use_gpu=True, **OPTS).take_all()}
    assert sorted(cpu) == sorted(gpu)
    for key, row in gpu.items():
        assert np.array_equal(row["video_mask"], cpu[key]["video_mask"])
        assert np.abs(row["video"].astype(np.float32) - cpu[key]["video"]).mean() < 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU decode actors need CUDA")
def test_gpu_decode_actors_match_cpu_actors(ray_cluster, synthetic_shards) -> None:
    """use_gpu=True: decord on the host, resize + crop on the GPU, uint8 rows back in host memory;
    the same rows as CPU actors up to resize rounding (the GPU resizes in float32)."""
    cpu = {r["key"]: r for r in split_dataset(synthetic_shards, "test", **OPTS).take_all()}
    gpu = {r["key"]: r for r in split_dataset(synthetic_shards, "test", use_gpu=True, **OPTS).take_all()}
    assert sorted(cpu) == sorted(gpu) and len(cpu) == read_index(synthetic_shards, "test")["total_samples"]
    for key, row in gpu.items():
        assert row["video"].dtype == np.uint8 and row["video"].shape == cpu[key]["video"].shape
        assert np.array_equal(row["video_mask"], cpu[key]["video_mask"])
        assert row["captions"] == cpu[key]["captions"]
        # rounding of the uint8 vs float resize: at most 8 grey levels (tests/test_shards_decode.py)
        assert np.abs(row["video"].astype(np.int16) - cpu[key]["video"]).max() <= 8
