"""Nothing streamret loads runs code: a checkpoint, feature cache, RNG state or generator payload
whose pickle would create a file when loaded is refused with one line, and the file never appears."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.support import TINY_RUN, launch_train
from trainer.components.export import UnsafeFile, safe_load


class CreatesAFile:
    """Unpickling this calls open(marker, "w"): what a hostile checkpoint would do, harmlessly."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def hostile(path: Path, marker: Path, **payload) -> Path:
    torch.save({**payload, "trap": CreatesAFile(marker)}, path)
    assert not marker.exists()
    return path


def test_a_hostile_export_rng_state_and_feature_cache_are_refused(tmp_path):
    from trainer.components.export import load_export
    import numpy as np

    from trainer.components.feature_store import FORMAT, open_bank

    marker = tmp_path / "pwned"
    with pytest.raises(UnsafeFile, match="con.pt: refused"):
        load_export(hostile(tmp_path / "con.pt", marker, format=1, stage="con", state_dict={}))
    with pytest.raises(UnsafeFile, match="rng_rank0.pt: refused"):
        safe_load(hostile(tmp_path / "rng_rank0.pt", marker, torch=torch.get_rng_state()))
    bank = tmp_path / "features" / "features-0123456789abcdef"
    bank.mkdir(parents=True)
    np.save(bank / "words.npy", np.array([CreatesAFile(marker)], dtype=object), allow_pickle=True)
    (bank / "index.json").write_text(json.dumps({"format": FORMAT, "fields": {"words": {"dtype": "float32"}}}))
    with pytest.raises(UnsafeFile, match="words.npy: refused"):
        open_bank(bank, torch.device("cpu"))
    assert not marker.exists()


def test_a_hostile_generator_payload_is_refused(trained_run, tmp_path):
    from trainer.serve.bundle import InferenceSettings, load_bundle_files

    marker = tmp_path / "pwned"
    gen = hostile(tmp_path / "gen.pt", marker, format=1, stage="gen", state_dict={})
    with pytest.raises(UnsafeFile, match="gen.pt: refused"):
        load_bundle_files(trained_run.run_dir / "con.pt", gen, InferenceSettings.locate(trained_run.run_dir))
    assert not marker.exists()


def test_stage_gen_init_from_a_hostile_checkpoint_is_one_line_and_runs_nothing(synthetic_corpus, synthetic_shards,
                                                                                tmp_path):
    marker = tmp_path / "pwned"
    con = hostile(tmp_path / "con.pt", marker, format=1, stage="con", state_dict={})
    proc = launch_train("--stage", "gen", f"stage.gen.init={con}", f"data.root={synthetic_corpus}",
                        f"data.shards={synthetic_shards}", f"run.dir={tmp_path / 'run'}",
                        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *TINY_RUN, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "con.pt: refused" in last and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_what_streamret_writes_loads_weights_only(trained_run):
    for path in [trained_run.run_dir / "con.pt", trained_run.run_dir / "gen.pt",
                 *sorted((trained_run.run_dir / "checkpoints").rglob("rng_rank*.pt"))]:
        assert isinstance(safe_load(path), dict), path
    from trainer.components.feature_store import open_bank

    indexes = sorted((trained_run.run_dir / "features").glob("features-*/index.json"))
    # the train bank (stage gen, QB-Norm's querybank) and the test bank, each memory-mapped
    assert {json.loads(p.read_text())["key"]["split"] for p in indexes} >= {"train", "test"}
    for index in indexes:
        assert open_bank(index.parent, torch.device("cpu")).num_videos > 0


# --------------------------------------------------------------------------- annotations and tars


def test_oversized_or_deeply_nested_annotation_json_is_refused(tmp_path) -> None:
    """Once read whole into memory (1 GB) or a RecursionError traceback (deep nesting)."""
    from shards.corpora import AnnotationError
    from shards.corpora.common import load_json

    huge = tmp_path / "train.json"
    with open(huge, "wb") as f:
        f.truncate(1 << 30)  # sparse: 1 GB on paper, nothing on disk
    with pytest.raises(AnnotationError, match=r"train\.json: 1024 MB, over the 256 MB"):
        load_json(huge)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(AnnotationError, match="nested deeper"):
        load_json(deep)


def test_manifest_paths_that_leave_their_folder_are_quarantined(tmp_path, clip_maker) -> None:
    from shards.manifest import ManifestCorpus

    clip_maker(tmp_path / "corpus" / "videos" / "a.mp4")
    clip_maker(tmp_path / "secret.mp4")
    rows = [{"video": "videos/a.mp4", "caption": "fine"}, {"video": "../secret.mp4", "caption": "escapes"}]
    (tmp_path / "corpus" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n" +
                                                     '{"video": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    records = list(ManifestCorpus(tmp_path / "corpus" / "train.jsonl").samples("train"))
    assert [getattr(r, "reason", "sample") for r in records] == ["unsafe path", "malformed row", "sample"]


def test_tar_members_with_traversal_names_are_skipped_at_read_time(tmp_path, clip_maker) -> None:
    import io
    import tarfile

    from shards.tarread import shard_samples

    clip = clip_maker(tmp_path / "a.mp4").read_bytes()
    meta = json.dumps({"video_id": "a", "captions": ["c"]}).encode()
    with tarfile.open(tmp_path / "evil.tar", "w") as tar:
        for name, data in (("a.mp4", clip), ("a.json", meta), ("../../x.mp4", clip), ("../../x.json", meta),
                           ("/etc/y.mp4", clip), ("/etc/y.json", meta)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    skipped = []
    samples = list(shard_samples(tmp_path / "evil.tar", "evil.tar", 1, skipped.append))
    assert [s["__key__"] for s in samples] == ["a"] and skipped == []
