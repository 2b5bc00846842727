"""Preemption and resume: a run killed (SIGKILL) or stopped (SIGTERM) mid-stage and resumed with
run.resume=auto ends with the same weights and the same per-step losses as a straight run.

Deterministic config: fp32, no DataLoader workers, CPU. Weights are compared bitwise."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.support import NO_VAL, export_weights as weights, run_losses as losses
from trainer.components.checkpoint import MARKER, find_resume_point

REPO = Path(__file__).resolve().parent.parent
STEPS = 8
DETERMINISTIC = [
    "stage=con", f"stage.con.max_steps={STEPS}", "stage.con.log_every=1", "deepspeed.precision=fp32",
    "data.max_frames=4", "data.max_words=16", "data.batch_size=4", "data.num_workers=0", "run.progress=false",
    "run.checkpoint_every=1", "run.keep_last=2", "tracking.flush_every_s=0.2", "eval.block=64", NO_VAL,
]


def launch(run_dir: Path, corpus: Path, shards: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "launch/train.py", f"data.root={corpus}", f"data.shards={shards}", f"run.dir={run_dir}",
            f"tracking.uri=sqlite:///{run_dir.parent / (run_dir.name + '.db')}", *DETERMINISTIC, *extra]
    return subprocess.Popen(args, cwd=REPO, env=dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def wait_for_checkpoint(run_dir: Path, step: int, proc: subprocess.Popen) -> None:
    marker = run_dir / "checkpoints" / "con" / f"step{step:08d}" / MARKER
    deadline = time.time() + 300
    while not marker.is_file():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def straight(synthetic_corpus, synthetic_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("resume") / "straight"
    finish(launch(run_dir, synthetic_corpus, synthetic_shards))
    return run_dir


def assert_same_run(resumed: Path, straight: Path) -> None:
    a, b = weights(resumed), weights(straight)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "final weights differ from the straight run"
    assert losses(resumed) == losses(straight)
    client_steps = json.loads((resumed / "metrics.json").read_text())
    assert client_steps["stages"] == ["con"]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_preempted_run_resumes_exactly(how, straight, synthetic_corpus, synthetic_shards, tmp_path):
    run_dir = tmp_path / "preempted"
    proc = launch(run_dir, synthetic_corpus, synthetic_shards)
    wait_for_checkpoint(run_dir, 3, proc)
    if how == "sigkill":
        proc.kill()
        proc.wait()
    else:
        proc.send_signal(signal.SIGTERM)  # finish the step, checkpoint, exit 0
        finish(proc)
    point = find_resume_point("auto", run_dir, _shapes_of(run_dir))
    assert point is not None and 3 <= point.marker["step"] < STEPS
    out = finish(launch(run_dir, synthetic_corpus, synthetic_shards, "run.resume=auto"))
    assert "eval con" in out
    assert_same_run(run_dir, straight)


def _shapes_of(run_dir: Path) -> dict:
    tags = sorted((run_dir / "checkpoints" / "con").glob("step*"))
    return json.loads((tags[-1] / MARKER).read_text())["shapes"]


def test_torn_checkpoint_is_ignored_and_shape_changes_are_refused(tmp_path):
    stage_dir = tmp_path / "checkpoints" / "con"
    good = stage_dir / "step00000004"
    good.mkdir(parents=True)
    (good / MARKER).write_text(json.dumps({"stage": "con", "step": 4, "shapes": {"max_frames": 4}}))
    (stage_dir / "step00000005").mkdir()  # a crash while writing step 5: no marker
    point = find_resume_point("auto", tmp_path, {"max_frames": 4})
    assert point.tag_dir == good
    with pytest.raises(ValueError, match="max_frames: saved 4 vs now 8"):
        find_resume_point("auto", tmp_path, {"max_frames": 8})
    assert find_resume_point("auto", tmp_path / "fresh", {"max_frames": 4}) is None
    with pytest.raises(FileNotFoundError, match="not a complete"):
        find_resume_point(str(stage_dir / "step00000005"), tmp_path, {"max_frames": 4})


def test_sample_log_keeps_the_history_of_the_weights(tmp_path):
    """A resumed stage drops the lines of the steps it redoes; a fresh one starts empty."""
    from trainer.components.sample_log import SampleLog, read_sample_log

    log = SampleLog(tmp_path, "con", 0, enabled=True)
    log.resume_at(0)
    for step in range(1, 6):
        log.write(step, 0, [f"k{step}a", f"k{step}b"])
    log.close()  # killed after step 5; its checkpoint is step 3
    again = SampleLog(tmp_path, "con", 0, enabled=True)
    again.resume_at(3)
    again.write(4, 0, ["x"])
    again.close()
    assert [(line["step"], line["keys"]) for line in read_sample_log(again.path)] == [
        (1, ["k1a", "k1b"]), (2, ["k2a", "k2b"]), (3, ["k3a", "k3b"]), (4, ["x"])]
    fresh = SampleLog(tmp_path, "con", 0, enabled=True)
    fresh.resume_at(0)
    fresh.close()
    assert read_sample_log(fresh.path) == []
    off = SampleLog(tmp_path / "off", "con", 0, enabled=False)
    off.resume_at(0)
    off.write(1, 0, ["k"])
    assert not off.path.exists()


def test_a_preempt_file_stops_the_loop_like_a_signal(tmp_path):
    from trainer.components.preemption import GracefulStop
    from trainer.components.rundir import STOP_FILE

    with GracefulStop(tmp_path / STOP_FILE) as stop:
        assert not stop.should_stop()
        (tmp_path / STOP_FILE).write_text("SIGTERM")
        assert stop.should_stop() and stop.should_stop()
