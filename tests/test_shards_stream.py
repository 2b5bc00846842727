"""Streaming: deterministic shuffle, equal per-rank lengths, exact resume, damaged data."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import webdataset as wds

from shards.index import sha256_file
from shards.loader import build_loader, pick_caption
from shards.stream import ShardStream
from shards.tokenize import CaptionTokenizer

SMALL = dict(max_frames=2, image_size=16)


def stream(shard_dir: Path, split: str = "train", **kw) -> ShardStream:
    kw.setdefault("training", True)
    kw.setdefault("shuffle_buffer", 8)
    return ShardStream(shard_dir, split, **SMALL, **kw)


def keys_of(batches) -> list[list[str]]:
    return [b["key"] for b in batches]


def manifest_ids(corpus: Path, split: str) -> list[str]:
    return [json.loads(line)["video_id"] for line in (corpus / f"{split}.jsonl").read_text().splitlines()]


def test_shuffle_is_deterministic_per_seed_and_epoch(synthetic_corpus, synthetic_shards) -> None:
    s = stream(synthetic_shards)
    first = [x["key"] for x in s]
    s.set_epoch(0)
    assert [x["key"] for x in s] == first
    assert sorted(first) == sorted(manifest_ids(synthetic_corpus, "train"))  # a permutation: one rank, 1 worker
    s.set_epoch(1)
    second = [x["key"] for x in s]
    assert second != first and sorted(second) == sorted(first)
    assert [x["key"] for x in stream(synthetic_shards, seed=1)] != first
    # eval keeps file order
    assert [x["key"] for x in stream(synthetic_shards, training=False)] == manifest_ids(synthetic_corpus, "train")


def test_sample_fields(synthetic_shards) -> None:
    x = next(iter(ShardStream(synthetic_shards, "test", max_frames=3, image_size=16, training=False)))
    assert x["frames"].shape == (3, 3, 16, 16) and x["frames"].dtype == torch.float32
    assert x["frame_mask"].tolist() == [True, True, False]  # 2 s at 1 fps -> 2 real frames
    assert x["key"] == x["video_id"] == "test00000" and len(x["captions"]) == 2
    assert x["meta"]["num_frames"] == 16 and x["meta"]["split"] == "test"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_yield_equal_counts_with_uneven_shards(synthetic_shards, num_workers) -> None:
    ranks = [stream(synthetic_shards, rank=r, world_size=2) for r in range(2)]
    data_sizes = set()
    for epoch in range(3):
        per_rank = []
        for s in ranks:
            s.set_epoch(epoch)
            names, _ = s.plan(0, 1)
            data_sizes.add(sum(s.shard_sizes[n] for n in names))
            batches = list(build_loader(s, batch_size=5, max_words=8, num_workers=num_workers, training=True, seed=0))
            assert [len(b["key"]) for b in batches] == [5, 5, 2]
            per_rank.append(sum(keys_of(batches), []))
        assert len(per_rank[0]) == len(per_rank[1]) == 12
    assert len(data_sizes) > 1  # some epoch gave the ranks 14 vs 10 samples: one cycled, one stopped early


def test_eval_covers_every_sample_once_across_ranks_and_workers(synthetic_corpus, synthetic_shards) -> None:
    for split, world in (("train", 3), ("test", 3)):  # test has 2 shards: fewer than ranks x workers
        seen = []
        for r in range(world):
            s = stream(synthetic_shards, split, training=False, rank=r, world_size=world)
            got = sum(keys_of(build_loader(s, batch_size=4, max_words=8, num_workers=2, training=False, seed=0)), [])
            assert len(got) == s.samples_this_rank()
            seen += got
        assert sorted(seen) == sorted(manifest_ids(synthetic_corpus, split))


def test_fewer_shards_than_consumers_training(synthetic_shards) -> None:
    lengths, slices = [], []
    for r in range(3):
        s = stream(synthetic_shards, "test", rank=r, world_size=3)  # 2 shards, 3 ranks, 2 workers each
        got = sum(keys_of(build_loader(s, batch_size=3, max_words=8, num_workers=2, training=True, seed=0)), [])
        lengths.append(len(got))
        # a rank reads every 3rd sample; its first worker owns 3 of the 4 batch slots but holds 2 of
        # the 4 samples, so it reads its part again (the price of batch-exact resume)
        assert len(set(got)) >= 3
        slices.append(set(got))
    assert lengths == [4, 4, 4]
    assert sum(len(x) for x in slices) == len(set().union(*slices))  # ranks never share a sample


def test_resume_in_process_is_sample_exact(synthetic_shards) -> None:
    full = [x["key"] for x in stream(synthetic_shards, seed=3)]
    s = stream(synthetic_shards, seed=3)
    it = iter(s)
    head = [next(it)["key"] for _ in range(7)]
    state = s.state_dict()
    assert state["samples_consumed"] == 7 and state["epoch"] == 0 and state["seed"] == 3
    resumed = stream(synthetic_shards, seed=3)
    resumed.load_state_dict(state)
    assert head + [x["key"] for x in resumed] == full
    with pytest.raises(ValueError, match="seed"):
        stream(synthetic_shards, seed=4).load_state_dict(state)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_loader_is_batch_exact(synthetic_shards, num_workers) -> None:
    def loader(s):
        return build_loader(s, batch_size=3, max_words=8, num_workers=num_workers, training=True, seed=5)

    s = stream(synthetic_shards, rank=1, world_size=2, seed=5)
    s.set_epoch(2)
    full = list(loader(s))
    assert len(full) == 4 and s.state_dict()["samples_consumed"] == 12
    s.set_epoch(2)
    it = iter(loader(s))
    head = [next(it) for _ in range(3)]
    state = s.state_dict()
    del it
    assert state["samples_consumed"] == 9 and state["epoch"] == 2
    resumed = stream(synthetic_shards, rank=1, world_size=2, seed=5)
    resumed.load_state_dict(state)
    rest = list(loader(resumed))
    assert keys_of(head + rest) == keys_of(full)
    for a, b in zip(head + rest, full):
        assert torch.equal(a["text"], b["text"]) and torch.equal(a["video"], b["video"])
    # iterating a finished epoch again moves on to the next one instead of yielding nothing
    again = list(loader(resumed))
    assert resumed.epoch == 3 and len(again) == 4 and keys_of(again) != keys_of(full)


def test_loader_batches_and_caption_choice(synthetic_shards) -> None:
    s = stream(synthetic_shards, seed=2)
    s.set_epoch(4)
    loader = build_loader(s, batch_size=5, max_words=12, num_workers=0, training=True, seed=2)
    assert len(loader) == math.ceil(24 / 5)
    batch = next(iter(loader))
    assert batch["video"].shape == (5, 2, 3, 16, 16) and batch["video_mask"].shape == (5, 2)
    assert batch["video_mask"].dtype == torch.bool and batch["video_mask"].all()
    assert batch["text"].shape == batch["text_mask"].shape == (5, 12) and batch["text"].dtype == torch.long
    chosen = [caps[pick_caption(caps, 2, 4, key)] for caps, key in zip(batch["captions"], batch["key"])]
    ids, mask = CaptionTokenizer(12)(chosen)
    assert torch.equal(batch["text"], ids) and torch.equal(batch["text_mask"], mask)
    picks = {pick_caption(["a", "b"], 2, e, "train00000") for e in range(16)}
    assert picks == {0, 1}  # the choice varies with the epoch
    eval_batch = next(iter(build_loader(stream(synthetic_shards, training=False), batch_size=4, max_words=12,
                                        num_workers=0, training=False, seed=0)))
    assert "text" not in eval_batch and len(eval_batch["captions"]) == 4


def test_corrupt_shard_is_skipped_and_counted(synthetic_corpus, shard_copy, bad_inputs) -> None:
    victim = shard_copy / "train-000001.tar"
    bad_inputs.truncate_file(victim, victim, 0.5)
    s = stream(shard_copy, training=False)
    got = [b["key"] for b in build_loader(s, batch_size=4, max_words=8, num_workers=2, training=False, seed=0)]
    got = sum(got, [])
    assert s.counters["corrupt_shard"] == 1
    ids = manifest_ids(synthetic_corpus, "train")
    assert 17 <= len(got) < 24 and set(ids[:7] + ids[14:]) <= set(got)
    # training keeps its quota (the damaged shard's worker cycles) and does not crash
    t = stream(shard_copy)
    assert len([x["key"] for x in t]) == 24 and t.counters["corrupt_shard"] >= 1


def test_shard_cut_between_members_is_counted_against_the_index(synthetic_corpus, shard_copy, bad_inputs) -> None:
    """A tar cut on a member boundary reads without error; the index's count exposes it."""
    bad_inputs.cut_between_members(shard_copy / "train-000001.tar", keep_samples=3)
    s = stream(shard_copy, training=False)
    got = [x["key"] for x in s]
    assert s.counters["short_shard"] == 1 and s.counters["corrupt_shard"] == 0
    ids = manifest_ids(synthetic_corpus, "train")
    assert len(got) == 24 - 4 and set(ids[:10] + ids[14:]) == set(got)


def test_undecodable_mp4_is_skipped_and_counted(tmp_path, clip_maker, bad_inputs) -> None:
    good = clip_maker(tmp_path / "g.mp4").read_bytes()
    meta = {"video_id": "v", "captions": ["c"], "split": "train", "corpus": "t", "start": None, "end": None,
            "duration": 2.0, "fps": 8.0, "num_frames": 16}
    shard = tmp_path / "train-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i, mp4 in enumerate([good, bad_inputs.corrupt_mp4_bytes(good), good]):
            sink.write({"__key__": f"k{i}", "mp4": mp4, "json": json.dumps({**meta, "video_id": f"v{i}"}).encode()})
    index = {"split": "train", "corpus": "t", "total_samples": 3, "created": "", "transcode": None,
             "shards": [{"name": shard.name, "samples": 3, "bytes": shard.stat().st_size, "sha256": sha256_file(shard)}]}
    (tmp_path / "train.index.json").write_text(json.dumps(index))
    s = stream(tmp_path, training=False)
    assert [x["key"] for x in s] == ["k0", "k2"] and s.counters["decode_error"] == 1
    t = stream(tmp_path, shuffle_buffer=0)
    batches = list(build_loader(t, batch_size=3, max_words=8, num_workers=0, training=True, seed=0))
    assert [b["key"] for b in batches] == [["k0", "k2"]]  # a short batch, not a shifted epoch
    assert t.state_dict()["samples_consumed"] == 3 and t.counters["decode_error"] == 1


def test_shard_that_disappears_mid_run_is_skipped_and_counted(synthetic_corpus, shard_copy) -> None:
    s = stream(shard_copy, training=False)  # the index was read: the shard list is fixed now
    (shard_copy / "train-000002.tar").unlink()  # e.g. a network mount losing a file mid-run
    got = sum((b["key"] for b in build_loader(s, batch_size=4, max_words=8, num_workers=0, training=False, seed=0)), [])
    ids = manifest_ids(synthetic_corpus, "train")
    assert s.counters["corrupt_shard"] == 1
    assert sorted(got) == sorted(ids[:14] + ids[21:])  # every sample of the other shards, none lost


def test_tar_members_match_webdataset_and_stop_at_truncation(synthetic_shards, tmp_path) -> None:
    """The seek-based reader yields exactly what webdataset's stream reader does; cut inside a
    member, it yields the members before the cut and then raises."""
    from shards.tarread import tar_members

    from shards.tarread import _ustar_member

    shard = synthetic_shards / "train-000000.tar"
    with open(shard, "rb") as f:
        expected = [(m["fname"], m["data"]) for m in wds.tariterators.tar_file_iterator(f)]
    got = [(m["fname"], m["data"]) for m in tar_members(shard, "x")]
    assert got == expected and len(got) >= 4
    assert _ustar_member(shard.read_bytes()[:512]) is not None  # what streamret writes takes the hand-parsed path
    data = shard.read_bytes()
    cut = data.index(expected[2][1]) + len(expected[2][1]) // 2  # half of the third member's bytes
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    reader, seen = tar_members(tmp_path / "cut.tar", "cut"), []
    with pytest.raises(EOFError, match="cut short"):
        for m in reader:
            seen.append((m["fname"], m["data"]))
    assert seen == expected[:2]


def _tarfile_members(path: Path) -> list[tuple[str, bytes]]:
    """The oracle: every regular member as ``tarfile`` alone reads a seekable file (the reader
    ``tar_members`` had before it parsed plain ustar headers itself)."""
    import tarfile

    out = []
    with open(path, "rb", buffering=0) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for info in tar:
            if info.isreg():
                f.seek(info.offset_data)
                data = f.read(info.size)
                if len(data) != info.size:
                    raise EOFError("cut short")
                out.append((info.name, data))
    return out


def _outcome(read, path: Path):
    got = []
    try:
        for item in read(path):
            got.append(item)
    except Exception as exn:  # noqa: BLE001 - the outcome compared is the exception's type
        return got, type(exn).__name__
    return got, None


@pytest.mark.parametrize("fmt", ["pax", "gnu", "ustar"])
def test_tar_members_read_what_tarfile_reads_whatever_the_headers_and_wherever_the_damage(tmp_path, fmt) -> None:
    """Plain ustar headers are parsed by hand, anything else is handed to tarfile: on archives with
    pax and GNU long names, a ustar name prefix, non-ASCII names, directories and links, and on
    every truncation point and a corrupted header, the members read and the error raised are
    tarfile's own."""
    import io
    import tarfile

    from shards.tarread import tar_members

    def fast(path):
        return [(m["fname"], m["data"]) for m in tar_members(path, "x")]

    names = ["a.json", "a.0000.jpg", "dir" * 40 + "/long.jpg", "caf\u00e9.txt", "b.mp4", "b.json"]
    if fmt == "ustar":
        names[3] = "cafe.txt"  # ustar cannot store non-ASCII names
    path = tmp_path / f"{fmt}.tar"
    fmt_id = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}[fmt]
    with tarfile.open(path, "w", format=fmt_id) as tar:
        for i, name in enumerate(names):
            data = bytes(range(256)) * (i * 3) + b"x" * i  # sizes on and off the 512-byte blocks
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
            if i == 2:
                directory = tarfile.TarInfo("d")
                directory.type = tarfile.DIRTYPE
                tar.addfile(directory)
                link = tarfile.TarInfo("l")
                link.type, link.linkname = tarfile.SYMTYPE, "a.json"
                tar.addfile(link)
    expected = _tarfile_members(path)
    assert [n for n, _ in expected] == names and fast(path) == expected
    data = path.read_bytes()
    cuts = sorted({*range(0, len(data), 256), *range(1, len(data), 509), len(data) - 1})
    for cut in cuts:
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        assert _outcome(fast, tmp_path / "cut.tar") == _outcome(_tarfile_members, tmp_path / "cut.tar"), cut
    for block in range(0, len(data) // 512):  # one header (or data block) overwritten with garbage
        broken = bytearray(data)
        broken[block * 512 + 100 : block * 512 + 160] = b"\xff" * 60
        (tmp_path / "bad.tar").write_bytes(bytes(broken))
        assert _outcome(fast, tmp_path / "bad.tar") == _outcome(_tarfile_members, tmp_path / "bad.tar"), block


def test_channels_last_clips_are_batched_as_they_lie_and_normalise_to_the_planar_batch() -> None:
    """Decoded clips are interleaved pixels behind a [T, 3, S, S] shape; the loader stacks them
    without transposing (a plain copy) and normalisation writes the contiguous planar batch."""
    from shards.decode import ClipTransform, normalise_clip
    from shards.loader import _stack

    g = torch.Generator().manual_seed(0)
    transform = ClipTransform(16)
    clips = [transform.crop(torch.randint(0, 256, (t, 20, 24, 3), dtype=torch.uint8, generator=g), 4) for t in (4, 2, 3)]
    batch = _stack([video for video, _ in clips])
    mask = torch.stack([m for _, m in clips])
    assert batch.shape == (3, 4, 3, 16, 16) and batch.permute(0, 1, 3, 4, 2).is_contiguous()
    planar = torch.stack([video.contiguous() for video, _ in clips])
    assert torch.equal(batch, planar)
    out = normalise_clip(batch, mask)
    assert out.is_contiguous() and torch.equal(out, normalise_clip(planar, mask))
    assert (out[~mask] == 0).all() and out[mask].abs().sum() > 0
    # planar clips (a decoder that writes planes) keep the plain stack
    assert _stack([p for p in planar]).is_contiguous()
