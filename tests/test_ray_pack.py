"""Packing through Ray: `launch/pack.py` with `data.pack.ray_address`, and `pack_split` as Ray
tasks on a local cluster, each byte-identical to packing in one process. A `tests/test_ray_*`
module: the Ray tests share one pytest-xdist worker (see conftest.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from shards.manifest import ManifestCorpus
from shards.writer import pack_split
from tests.test_pack_cli import _overrides, manifest_corpus, run_pack, run_pack_subprocess  # noqa: F401 (a fixture)
from tests.test_shards_pack import big_sha

pytestmark = pytest.mark.slow


def test_pack_cli_packs_through_ray_when_asked(manifest_corpus, tmp_path) -> None:
    """`data.pack.ray_address` reaches the packer from the command line (it once packed locally)."""
    shards, local = tmp_path / "ray", tmp_path / "local"
    proc = run_pack_subprocess(*_overrides(manifest_corpus, shards, workers=2), "data.pack.ray_address=local",
                               "--splits", "train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train: 5 rows in = 3 packed" in proc.stdout and "probed as Ray tasks (local)" in proc.stdout
    assert run_pack(*_overrides(manifest_corpus, local), "--splits", "train").returncode == 0
    assert (shards / "train-000000.tar").read_bytes() == (local / "train-000000.tar").read_bytes()


def test_packing_as_ray_tasks_writes_the_same_shards(tmp_path, synthetic_corpus) -> None:
    ray = pytest.importorskip("ray")
    samples = ManifestCorpus(synthetic_corpus / "test.jsonl").samples("test")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(Path("/tmp") / f"srray{os.getpid()}"))
    try:
        report = pack_split(samples, tmp_path / "ray", "test", workers=2, ray_address="auto", progress=False)
    finally:
        ray.shutdown()
    local = pack_split(ManifestCorpus(synthetic_corpus / "test.jsonl").samples("test"), tmp_path / "local", "test",
                       progress=False)
    assert report.packed == local.packed == 12
    assert big_sha(tmp_path / "ray") == big_sha(tmp_path / "local")  # byte-identical shards
