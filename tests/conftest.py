"""Shared fixtures: a tiny synthetic corpus, its packed shards, a real H.264 clip writer, helpers
that make bad inputs (truncated tar, tar cut between members, corrupt mp4 bytes, zero-frame
video) and a tiny trained run shared by the end-to-end, registry and eval/search tests. Plain
helpers are in support.py."""
from __future__ import annotations

import logging
import os
import shutil
import sys
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shards.probe import encode_h264  # noqa: E402
from tests.support import TINY_RUN, launch_train  # noqa: E402

RAY_MODULES = "tests/test_ray_"  # every module that starts a Ray cluster is named so


class RayTestsOnOneWorker:
    """pytest-xdist (``make test`` runs ``-n auto --dist loadscope``) schedules each test module as a
    unit, and all ``tests/test_ray_*`` modules as one unit, run one after another on one worker:
    Ray clusters on one host find each other (``ray.init()`` joins a running one), and their
    health-check and stall timeouts assume they do not compete with another cluster. The other
    workers take the rest of the suite meanwhile (xdist's own ``loadgroup`` marks are silently
    ignored on pytest 9.2, pytest-dev/pytest-xdist#1386). The largest unit is sent first."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_make_scheduler(self, config, log):
        if config.getvalue("dist") != "loadscope":
            return None
        from xdist.scheduler import LoadScopeScheduling

        class RayFirst(OrderedDict):  # the work queue: the Ray unit (the longest) goes out first
            def __setitem__(self, scope, tests) -> None:
                super().__setitem__(scope, tests)
                if scope == RAY_MODULES:
                    self.move_to_end(scope, last=False)

        class Scheduling(LoadScopeScheduling):
            def __init__(self, *args) -> None:
                super().__init__(*args)
                self.workqueue = RayFirst()

            def _split_scope(self, nodeid: str) -> str:
                return RAY_MODULES if nodeid.startswith(RAY_MODULES) else super()._split_scope(nodeid)

        return Scheduling(config, log)


def pytest_configure(config) -> None:
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(RayTestsOnOneWorker(), "ray-tests-on-one-worker")


TINY_CORPUS = dict(n_train=24, n_test=12, seed=0, size=32, fps=8, seconds=2.0, captions_per_video=2)


def make_clip(path: Path, frames: int = 16, size: int = 32, fps: int = 8) -> Path:
    """A real H.264 mp4: a bright bar sweeping left to right, so frames differ from each other."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    video = np.full((frames, size, size, 3), 40, dtype=np.uint8)
    for t in range(frames):
        x = int(t * (size - 4) / max(1, frames - 1))
        video[t, :, x : x + 4] = 230
    encode_h264(video, str(path), fps=fps, width=size, height=size, gop=fps)
    return path


def truncate_file(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    """Copy the first ``fraction`` of ``src`` (a tar cut mid-member, as after a failed copy)."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def cut_between_members(path: Path, keep_samples: int) -> Path:
    """Cut the tar at ``path`` in place right before the header of sample ``keep_samples``' first
    member: what is left is a valid, shorter tar (no error on reading), as after a copy that
    stopped on a member boundary."""
    import tarfile

    with tarfile.open(path) as tar:
        keys = []
        for info in tar.getmembers():
            key = info.name.split(".", 1)[0]
            if key not in keys:
                keys.append(key)
                if len(keys) == keep_samples + 1:
                    cut = info.offset
                    break
        else:
            raise ValueError(f"{path} holds no more than {keep_samples} samples")
    Path(path).write_bytes(Path(path).read_bytes()[:cut])
    return Path(path)


def corrupt_mp4_bytes(data: bytes) -> bytes:
    """Same length, but the container header and the start of the stream are garbage."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=len(data), dtype=np.uint8).tobytes()


def write_zero_frame_video(path: Path, size: int = 32) -> Path:
    """A valid mp4 container with an H.264 stream that holds no frames."""
    import av

    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        container.start_encoding()  # header and trailer only: no frame is ever encoded
        for packet in stream.encode():
            container.mux(packet)
    return Path(path)


@pytest.fixture(scope="session")
def clip_maker():
    """``make_clip(path, frames=16, size=32, fps=8) -> Path``."""
    return make_clip


@pytest.fixture(scope="session")
def bad_inputs():
    return SimpleNamespace(truncate_file=truncate_file, cut_between_members=cut_between_members,
                           corrupt_mp4_bytes=corrupt_mp4_bytes, write_zero_frame_video=write_zero_frame_video)


@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory) -> Path:
    """24 train / 12 test clips, 32 px, 2 s at 8 fps; ``train.jsonl`` / ``test.jsonl`` inside."""
    from shards.synthetic import generate_synthetic_corpus

    return generate_synthetic_corpus(tmp_path_factory.mktemp("synthetic_corpus"), **TINY_CORPUS)


@pytest.fixture(scope="session")
def synthetic_shards(synthetic_corpus, tmp_path_factory) -> Path:
    """The tiny corpus packed (train in >= 3 uneven shards, test in >= 2); returns the shard dir."""
    from shards.manifest import ManifestCorpus
    from shards.writer import pack_split

    out = tmp_path_factory.mktemp("synthetic_shards")
    shard_bytes = 60 * 1024  # train: 4 shards of 7, 7, 7, 3 samples; test: 2 shards
    for split in ("train", "test"):
        corpus = ManifestCorpus(synthetic_corpus / f"{split}.jsonl", corpus="synthetic")
        pack_split(corpus.samples(split), out, split, shard_bytes=shard_bytes, progress=False)
    return out


@pytest.fixture(scope="session")
def frame_shards(synthetic_corpus, tmp_path_factory) -> Path:
    """The tiny corpus packed as frame shards (data.pack.format=frames: JPEG frames at 1 fps)."""
    from shards.manifest import ManifestCorpus
    from shards.probe import FrameSpec
    from shards.writer import pack_split

    out = tmp_path_factory.mktemp("frame_shards")
    for split in ("train", "test"):
        corpus = ManifestCorpus(synthetic_corpus / f"{split}.jsonl", corpus="synthetic")
        pack_split(corpus.samples(split), out, split, shard_bytes=40 * 1024, progress=False, frames=FrameSpec())
    return out


@pytest.fixture
def shard_copy(synthetic_shards, tmp_path) -> Path:
    """A private copy of the packed shards that a test may damage."""
    dst = tmp_path / "shards"
    shutil.copytree(synthetic_shards, dst)
    return dst


@pytest.fixture(scope="session")
def s3():
    """A bucket on moto's S3 server on 127.0.0.1; the AWS_* environment points every client (and
    every subprocess and Ray worker started after it) at it."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("streamret")
    yield "s3://streamret"
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="session")
def s3_shards(s3, synthetic_corpus) -> str:
    """The tiny corpus packed to s3://, as synthetic_shards packs it locally (same shard size)."""
    from shards.manifest import ManifestCorpus
    from shards.writer import pack_split

    url = f"{s3}/syn"
    for split in ("train", "test"):
        corpus = ManifestCorpus(synthetic_corpus / f"{split}.jsonl", corpus="synthetic")
        pack_split(corpus.samples(split), url, split, shard_bytes=60 * 1024, progress=False)
    return url


@pytest.fixture(scope="session")
def trained_run(synthetic_corpus, synthetic_shards, tmp_path_factory) -> SimpleNamespace:
    import json

    out = tmp_path_factory.mktemp("trained_run")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    proc = launch_train(f"data.root={synthetic_corpus}", f"data.shards={synthetic_shards}", f"run.dir={out / 'run'}",
                        f"tracking.uri={uri}", *TINY_RUN, "tracking.promote_at_chance=true", cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    return SimpleNamespace(out=out, run_dir=out / "run", uri=uri, run_id=metrics["mlflow_run_id"],
                           metrics=metrics["metrics"], stdout=proc.stdout, corpus=synthetic_corpus,
                           shards=synthetic_shards)
