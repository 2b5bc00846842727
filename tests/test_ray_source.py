"""`shards.ray_source` on a real local Ray cluster: the same samples as ShardStream, damage skipped."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch
import webdataset as wds

ray = pytest.importorskip("ray")

from shards.decode import CLIP_STD  # noqa: E402
from shards.index import read_index  # noqa: E402
from shards.ray_source import iter_train_batches, ray_dataset, skip_counts  # noqa: E402
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


def test_ray_data_reads_s3_shards_through_the_node_cache(s3_shards, ray_cluster, synthetic_shards, tmp_path) -> None:
    """First in the module: the s3 fixture's AWS_* environment exists before the cluster's workers."""
    from shards.cache import ShardCache

    cache = ShardCache(str(tmp_path / "cache"), 2**30)
    rows = ray_dataset(s3_shards, "test", num_actors=1, cache=cache, **OPTS).take_all()
    expected, _ = _stream_keys(synthetic_shards, "test")
    assert sorted(r["key"] for r in rows) == sorted(expected)
    cached = sorted(p.read_bytes() for p in (tmp_path / "cache").glob("*.tar"))
    local = sorted(p.read_bytes() for p in synthetic_shards.glob("test-*.tar"))
    assert cached == local  # every shard cached whole, on the (one) node that read it


def test_rows_match_index_shapes_and_captions(ray_cluster, synthetic_shards) -> None:
    ds = ray_dataset(synthetic_shards, "train", num_actors=2, **OPTS)
    decoded = ds.materialize()  # one execution serves both the row checks and the batches
    rows = decoded.take_all()
    total = read_index(synthetic_shards, "train")["total_samples"]
    assert len(rows) == total
    expected, _ = _stream_keys(synthetic_shards, "train")
    assert sorted(r["key"] for r in rows) == sorted(expected)
    for row in rows:
        assert row["video"].shape == (4, 3, 16, 16) and row["video"].dtype.name == "float32"
        assert row["video_mask"].shape == (4,) and row["video_mask"].dtype == bool and row["video_mask"][0]
        captions = json.loads(row["captions"])
        assert captions == expected[row["key"]]
        assert row["video_id"] == row["key"]  # the synthetic ids are already tar-safe
    assert skip_counts(ds) == {"corrupt_shard": 0, "short_shard": 0, "incomplete_sample": 0, "decode_error": 0}

    batches = list(iter_train_batches(decoded, batch_size=8, max_words=MAX_WORDS, seed=0, epoch=0))
    assert [b["video"].shape[0] for b in batches] == [8, 8, 8]
    first = batches[0]
    assert set(first) == {"video", "video_mask", "text", "text_mask", "video_id", "key", "captions"}
    assert tuple(first["video"].shape) == (8, 4, 3, 16, 16) and first["text"].dtype.is_floating_point is False
    assert tuple(first["text"].shape) == (8, MAX_WORDS) and first["text_mask"].dtype == torch.bool
    assert all(c == expected[k] for k, c in zip(first["key"], first["captions"]))
    # the tokenised caption is one of this video's own captions
    tokenizer = CaptionTokenizer(MAX_WORDS)
    for text, text_mask, captions in zip(first["text"], first["text_mask"], first["captions"]):
        n = int(text_mask.sum())
        assert text[:n].tolist() in [tokenizer([c])[0][0, :n].tolist() for c in captions]


def test_each_epoch_trains_on_the_caption_the_local_loader_would_pick(ray_cluster, synthetic_shards) -> None:
    """The Ray pipeline is built once per job; the caption must still change per epoch, by the
    local loader's rule (it once stayed at epoch 0's: 1 of MSRVTT's 20 captions for the whole run)."""
    from shards.loader import pick_caption

    decoded = ray_dataset(synthetic_shards, "train", num_actors=1, **OPTS).materialize()
    tokenizer = CaptionTokenizer(MAX_WORDS)
    picked = {}
    for epoch in (0, 1):
        for batch in iter_train_batches(decoded, batch_size=8, max_words=MAX_WORDS, seed=3, epoch=epoch):
            for key, captions, text in zip(batch["key"], batch["captions"], batch["text"]):
                want = captions[pick_caption(captions, 3, epoch, key)]
                assert torch.equal(text, tokenizer([want])[0][0])
                picked[(key, epoch)] = want
    keys = {key for key, _ in picked}
    assert sum(picked[(k, 0)] != picked[(k, 1)] for k in keys) >= len(keys) // 4  # 2 captions each: about half differ


def test_damaged_shards_are_skipped_and_counted(ray_cluster, shard_copy, bad_inputs) -> None:
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
    ds = ray_dataset(shard_copy, "train", num_actors=2, **OPTS)
    rows = ds.take_all()
    assert sorted(r["key"] for r in rows) == sorted(expected)
    assert samples[2]["__key__"] not in {r["key"] for r in rows}
    assert len(rows) < read_index(shard_copy, "train")["total_samples"] - 1
    assert skip_counts(ds) == {"corrupt_shard": 1, "short_shard": 1, "incomplete_sample": 0, "decode_error": 1}


def test_frame_shards_give_the_rows_the_local_stream_gives(ray_cluster, frame_shards) -> None:
    """Frame shards: the read tasks ship only the picked JPEGs, the actors decode them (libjpeg-turbo
    here, nvJPEG with use_gpu); rows equal ShardStream's samples of the same shards."""
    rows = {r["key"]: r for r in ray_dataset(frame_shards, "test", num_actors=1, **OPTS).take_all()}
    stream = ShardStream(frame_shards, "test", training=False, **OPTS)
    local = {s["key"]: s for s in stream}
    assert sorted(rows) == sorted(local) and len(rows) == read_index(frame_shards, "test")["total_samples"]
    for key, row in rows.items():
        assert np.array_equal(row["video_mask"], local[key]["frame_mask"].numpy())
        assert np.allclose(row["video"], local[key]["frames"].numpy(), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG decode actors need CUDA")
def test_gpu_jpeg_decode_actors_match_cpu_actors(ray_cluster, frame_shards) -> None:
    """use_gpu=True on frame shards: batched nvJPEG on the GPU; within JPEG decoder rounding of libjpeg-turbo."""
    cpu = {r["key"]: r for r in ray_dataset(frame_shards, "test", num_actors=1, **OPTS).take_all()}
    gpu = {r["key"]: r for r in ray_dataset(frame_shards, "test", num_actors=1, use_gpu=True, **OPTS).take_all()}
    assert sorted(cpu) == sorted(gpu)
    for key, row in gpu.items():
        assert np.array_equal(row["video_mask"], cpu[key]["video_mask"])
        assert np.abs(row["video"] - cpu[key]["video"]).mean() < 4 / 255 / min(CLIP_STD)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU decode actors need CUDA")
def test_gpu_decode_actors_match_cpu_actors(ray_cluster, synthetic_shards) -> None:
    """use_gpu=True: decord on the host, resize + crop + normalise on the GPU, rows back in host
    memory; the same rows as CPU actors up to resize rounding (the GPU resizes in float32)."""
    cpu = {r["key"]: r for r in ray_dataset(synthetic_shards, "test", num_actors=1, **OPTS).take_all()}
    gpu = {r["key"]: r for r in ray_dataset(synthetic_shards, "test", num_actors=1, use_gpu=True, **OPTS).take_all()}
    assert sorted(cpu) == sorted(gpu) and len(cpu) == read_index(synthetic_shards, "test")["total_samples"]
    for key, row in gpu.items():
        assert row["video"].dtype.name == "float32" and row["video"].shape == cpu[key]["video"].shape
        assert np.array_equal(row["video_mask"], cpu[key]["video_mask"])
        assert row["captions"] == cpu[key]["captions"]
        # rounding of the uint8 vs float resize: at most 8 grey levels (tests/test_shards_decode.py)
        assert np.abs(row["video"] - cpu[key]["video"]).max() <= 8 / 255 / min(CLIP_STD) + 1e-4
