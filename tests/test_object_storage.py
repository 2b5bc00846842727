"""Shards in object storage, against real servers on 127.0.0.1 that the tests start and stop
(the S3 server and the s3_shards fixture are in conftest.py, shared with the Ray source tests):
moto's standalone S3 server (how s3fs tests itself) and Python's HTTP server with a fault hook
that answers 503 or cuts a transfer mid-shard. Pack to s3://, stream back exactly what local disk
gives, survive broken transfers without losing or repeating a sample, count a vanished object.
(Training from s3:// end to end is tests/test_secrets.py's run: one tiny run checks both.)"""
from __future__ import annotations

import http.server
import logging
import threading
from functools import partial
from pathlib import Path

import pytest

from shards import storage
from shards.index import read_index, verify_split
from shards.manifest import ManifestCorpus
from shards.stream import ShardStream
from shards.tarread import shard_samples
from shards.writer import pack_split

SHARD_BYTES = 60 * 1024  # as conftest's synthetic_shards: byte-identical shards, so identical runs


def samples_of(shard_dir, split="test", **kw) -> list[tuple[str, bytes]]:
    stream = ShardStream(shard_dir, split, max_frames=4, image_size=32, training=False, **kw)
    return [(s["key"], s["frames"].numpy().tobytes()) for s in stream]


def test_pack_to_s3_matches_local_disk_byte_for_byte(s3_shards, synthetic_shards) -> None:
    for split in ("train", "test"):
        remote, local = read_index(s3_shards, split), read_index(synthetic_shards, split)
        assert [(s["name"], s["sha256"]) for s in remote["shards"]] == [(s["name"], s["sha256"]) for s in local["shards"]]
        assert verify_split(s3_shards, split).ok
    assert samples_of(s3_shards) == samples_of(synthetic_shards)  # same keys, same decoded frames


def test_training_stream_resumes_exactly_on_remote_shards(s3_shards, synthetic_shards) -> None:
    def stream(shards):
        return ShardStream(shards, "train", max_frames=2, image_size=32, training=True, seed=3, shuffle_buffer=8)

    local = [s["key"] for s in stream(synthetic_shards)]
    first = stream(s3_shards)
    head = [s["key"] for _, s in zip(range(5), first)]
    resumed = stream(s3_shards)
    resumed.load_state_dict(first.state_dict())
    assert head + [s["key"] for s in resumed] == local


def test_a_vanished_object_is_counted_and_the_rest_arrives(s3, synthetic_corpus) -> None:
    import s3fs

    url = f"{s3}/gone"
    corpus = ManifestCorpus(synthetic_corpus / "train.jsonl", corpus="synthetic")
    pack_split(corpus.samples("train"), url, "train", shard_bytes=SHARD_BYTES, progress=False)
    index = read_index(url, "train")
    s3fs.S3FileSystem().rm_file(f"streamret/gone/{index['shards'][1]['name']}")
    stream = ShardStream(url, "train", max_frames=2, image_size=32, training=False)
    got = list(stream)
    assert len(got) == index["total_samples"] - index["shards"][1]["samples"]
    assert stream.counters["corrupt_shard"] == 1


def test_a_pack_killed_halfway_leaves_no_index_and_the_rerun_completes(s3, synthetic_corpus) -> None:
    url = f"{s3}/killed"
    rows = list(ManifestCorpus(synthetic_corpus / "train.jsonl", corpus="synthetic").samples("train"))

    def dies_halfway():
        yield from rows[:12]
        raise KeyboardInterrupt  # as SIGINT would, after some shards went up

    with pytest.raises(KeyboardInterrupt):
        pack_split(dies_halfway(), url, "train", shard_bytes=SHARD_BYTES, progress=False)
    assert not storage.exists(f"{url}/train.index.json")  # nothing reads a half-written split
    assert storage.exists(f"{url}/train-000000.tar")
    report = pack_split(rows, url, "train", shard_bytes=SHARD_BYTES, progress=False)
    assert read_index(url, "train")["total_samples"] == report.packed == len(rows)


class FaultyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; the first GET of each file in ``faults`` gets that fault: "503" or "cut"
    (headers promise the whole file, the connection closes after half of it)."""

    faults: dict[str, list[str]] = {}

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        pending = self.faults.get(self.path.lstrip("/"), [])
        fault = pending.pop(0) if pending else None
        if fault == "503":
            self.send_error(503, "Slow Down")
            return
        if fault == "cut":
            data = Path(self.translate_path(self.path)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        super().do_GET()


@pytest.fixture
def http_shards(synthetic_shards):
    FaultyHandler.faults = {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(FaultyHandler, directory=str(synthetic_shards)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FaultyHandler.faults
    server.shutdown()
    server.server_close()


def test_http_transfer_cut_mid_shard_loses_and_repeats_nothing(http_shards, synthetic_shards, caplog) -> None:
    base, faults = http_shards
    name = read_index(synthetic_shards, "train")["shards"][0]["name"]
    local = [s["__key__"] for s in shard_samples(synthetic_shards / name, name, 7, lambda kind: None)]
    faults[name] = ["503", "cut"]  # throttled once, then the transfer breaks half way
    skipped: list[str] = []
    with caplog.at_level(logging.WARNING, logger="shards.storage"):
        remote = [s["__key__"] for s in shard_samples(f"{base}/{name}", name, 7, skipped.append)]
    assert remote == local and skipped == []  # every sample exactly once
    assert "reopening" in caplog.text and not faults[name]


def test_http_shards_stream_as_local_ones(http_shards, synthetic_shards) -> None:
    base, _ = http_shards
    assert samples_of(base) == samples_of(synthetic_shards)


def test_credentials_in_urls_are_redacted() -> None:
    assert storage.redact("https://user:s3cret@host/x/{0..9}.tar") == "https://***@host/x/{0..9}.tar"
    assert storage.redact("s3://bucket/key") == "s3://bucket/key"


def test_a_cached_split_is_streamed_once_then_read_from_local_disk(http_shards, synthetic_shards, tmp_path) -> None:
    from shards.cache import ShardCache

    base, faults = http_shards
    cache = ShardCache(str(tmp_path / "cache"), 2**30)
    names = [s["name"] for s in read_index(synthetic_shards, "test")["shards"]]
    assert samples_of(base, cache=cache) == samples_of(synthetic_shards)
    for name in names:  # each cached file is the whole object, byte for byte
        assert cache.path(f"{base}/{name}").read_bytes() == (synthetic_shards / name).read_bytes()
    for name in names:
        faults[name] = ["503"] * 20  # the server now refuses every shard: only the cache can answer
    assert samples_of(base, cache=cache) == samples_of(synthetic_shards)
    assert all(len(faults[name]) == 20 for name in names)  # no shard was requested


def test_a_broken_transfer_is_never_cached_partially_and_the_cache_stays_in_its_bound(http_shards, synthetic_shards,
                                                                                         tmp_path) -> None:
    from shards.cache import ShardCache

    base, faults = http_shards
    names = [s["name"] for s in read_index(synthetic_shards, "test")["shards"]]
    sizes = [(synthetic_shards / n).stat().st_size for n in names]
    cache = ShardCache(str(tmp_path / "cache"), max(sizes) + 1)  # room for one shard
    faults[names[0]] = ["cut"]  # breaks half way: the retry streams it again, from the start
    assert samples_of(base, cache=cache) == samples_of(synthetic_shards)
    kept = sorted((tmp_path / "cache").iterdir())
    assert [p.suffix for p in kept] == [".tar"]  # no partial file left, one shard within the bound
    assert kept[0].read_bytes() == (synthetic_shards / names[-1]).read_bytes()  # the most recently read
