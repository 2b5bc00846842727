"""`launch/pack.py` end to end on a tiny manifest corpus of real H.264 clips: its ``main`` in this
process (an interpreter start costs ~7 s on 2 cores: most of a test), and once as a subprocess."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_pack_subprocess(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/pack.py", *args, "run.progress=false"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def run_pack(*args: str) -> SimpleNamespace:
    """``launch/pack.py`` ``main`` in-process: its exit code, stdout and stderr, as a subprocess gives them."""
    from launch.pack import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([*args, "run.progress=false"])
        except SystemExit as exit_:
            code = exit_.code
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture
def manifest_corpus(tmp_path, clip_maker) -> Path:
    """train: 3 good clips, 1 row whose video is missing, 1 row with an empty caption; test: 2 clips."""
    root = tmp_path / "corpus"
    for name in ("a", "b", "c", "d", "e"):
        clip_maker(root / "videos" / f"{name}.mp4", frames=8)
    train = [
        {"video": "videos/a.mp4", "captions": ["a bar moves right", "a light stripe"]},
        {"video": "videos/gone.mp4", "caption": "this video was never downloaded"},
        {"video": "videos/b.mp4", "caption": "another bar"},
        {"video": "videos/c.mp4", "caption": "   "},
        {"video": "videos/c.mp4", "video_id": "c2", "caption": "third clip"},
    ]
    test = [{"video": "videos/d.mp4", "caption": "test one"}, {"video": "videos/e.mp4", "caption": "test two"}]
    for split, rows in (("train", train), ("test", test)):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _overrides(root: Path, shards: Path, workers: int = 0) -> list[str]:
    # 2 of the 5 train rows are bad on purpose: accept that loss (the default refuses more than 25%)
    return ["data=manifest", f"data.root={root}", f"data.shards={shards}", f"data.pack.workers={workers}",
            "data.pack.max_quarantine=0.5"]


def test_pack_writes_index_quarantine_and_verifies(manifest_corpus, tmp_path) -> None:
    shards = tmp_path / "shards"
    proc = run_pack_subprocess(*_overrides(manifest_corpus, shards, workers=1), "data.pack.verify=true")
    assert proc.returncode == 0, proc.stderr
    train = json.loads((shards / "train.index.json").read_text())
    test = json.loads((shards / "test.index.json").read_text())
    assert train["total_samples"] == 3 and test["total_samples"] == 2
    assert sum(s["samples"] for s in train["shards"]) == 3
    quarantined = [json.loads(line) for line in (shards / "train.quarantine.jsonl").read_text().splitlines()]
    assert sorted(q["reason"] for q in quarantined) == ["empty caption", "video missing"]
    assert {q["source"] for q in quarantined} == {f"{manifest_corpus / 'train.jsonl'}:2",
                                                  f"{manifest_corpus / 'train.jsonl'}:4"}
    assert (shards / "test.quarantine.jsonl").read_text() == ""
    assert "train: 5 rows in = 3 packed + 2 quarantined" in proc.stdout
    assert "empty caption: 1" in proc.stdout and "video missing: 1" in proc.stdout
    assert str(shards / "train.quarantine.jsonl") in proc.stdout
    assert "verify train: 1 shards, 3 samples, OK" in proc.stdout
    assert "verify test: 1 shards, 2 samples, OK" in proc.stdout


def test_existing_split_is_kept_unless_forced_and_corruption_fails_verify(manifest_corpus, tmp_path) -> None:
    shards = tmp_path / "shards"
    args = _overrides(manifest_corpus, shards)
    assert run_pack(*args).returncode == 0
    shard = shards / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[2000:2100] = bytes(100)  # inside the first mp4 member: the tar still parses, the hash changes
    shard.write_bytes(bytes(data))

    proc = run_pack(*args, "--verify")
    assert proc.returncode == 1
    assert "already packed" in proc.stdout  # no --force: the damaged shard was not silently rewritten
    assert str(shard) in proc.stderr and "sha256" in proc.stderr
    assert "verify test: 1 shards, 2 samples, OK" in proc.stdout

    proc = run_pack(*args, "--force", "--verify", "--splits", "train")
    assert proc.returncode == 0, proc.stderr
    assert "train: 5 rows in = 3 packed" in proc.stdout and "test:" not in proc.stdout
    assert "verify train: 1 shards, 3 samples, OK" in proc.stdout


@pytest.mark.parametrize("case", ["missing_root", "no_root", "no_manifest", "stray_flag"])
def test_user_errors_are_one_line_exit_2(case, manifest_corpus, tmp_path) -> None:
    shards = tmp_path / "shards"
    args = {
        "missing_root": _overrides(tmp_path / "nowhere", shards),
        "no_root": ["data=manifest"],
        "no_manifest": _overrides(tmp_path, shards),  # a directory, but with no train.jsonl in it
        "stray_flag": [*_overrides(manifest_corpus, shards), "--frce"],
    }[case]
    proc = run_pack(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    expected = {"missing_root": "nowhere", "no_root": "data.root", "no_manifest": "train.jsonl",
                "stray_flag": "--frce"}[case]
    assert expected in lines[0]
    assert not shards.exists() or not any(shards.glob("*.index.json"))
