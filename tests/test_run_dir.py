"""A run dir belongs to one run: a second run there once overwrote con.pt and metrics.json but
kept the first run's generator and checkpoints, and a later run.resume=auto paired the two,
exited 0 and registered the mix."""
from __future__ import annotations

import json

import pytest

from trainer.components.checkpoint import MARKER, find_resume_point
from trainer.components.rundir import ARTIFACTS, RUN_FILE, RunDirTaken, claim
from tests.support import TINY_RUN, launch_train


def test_a_fresh_run_refuses_a_dir_holding_another_run(tmp_path) -> None:
    run_dir = tmp_path / "run"
    first = claim(run_dir, resume="none", continues=False, overwrite=False)
    (run_dir / "con.pt").write_bytes(b"weights of the first run")
    with pytest.raises(RunDirTaken, match=rf"holds run {first[:8]} .*con\.pt.*run\.resume=auto.*run\.name=.*"
                                          r"run\.overwrite=true"):
        claim(run_dir, resume="none", continues=False, overwrite=False)
    assert claim(run_dir, resume="auto", continues=False, overwrite=False) == first  # continuing it is fine
    assert claim(run_dir, resume="none", continues=True, overwrite=False) == first  # stage gen from its con.pt
    (run_dir / "notes.txt").write_text("the user's own file")
    second = claim(run_dir, resume="none", continues=False, overwrite=True)
    assert second != first and not (run_dir / "con.pt").exists() and (run_dir / "notes.txt").is_file()
    assert json.loads((run_dir / RUN_FILE).read_text())["run_uid"] == second
    assert "checkpoints" in ARTIFACTS and "gen.pt" in ARTIFACTS


def test_resume_auto_refuses_another_runs_checkpoint(tmp_path) -> None:
    tag = tmp_path / "run" / "checkpoints" / "gen" / "step00000003"
    tag.mkdir(parents=True)
    (tag / MARKER).write_text(json.dumps({"stage": "gen", "step": 3, "shapes": {}, "run_uid": "a" * 32}))
    with pytest.raises(RunDirTaken, match=r"written by run aaaaaaaa, but .* belongs to run bbbbbbbb"):
        find_resume_point("auto", tmp_path / "run", {}, run_uid="b" * 32)
    assert find_resume_point("auto", tmp_path / "run", {}, run_uid="a" * 32).tag_dir == tag


def test_cli_refuses_an_occupied_run_dir_in_one_line(tmp_path, synthetic_shards) -> None:
    run_dir = tmp_path / "run"
    claim(run_dir, resume="none", continues=False, overwrite=False)
    (run_dir / "metrics.json").write_text("{}")
    proc = launch_train(f"data.shards={synthetic_shards}", f"run.dir={run_dir}",
                        f"tracking.uri=sqlite:///{tmp_path / 'ml.db'}", *TINY_RUN)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: run.dir=") and "run.overwrite=true" in proc.stderr
    assert (run_dir / "metrics.json").read_text() == "{}"


def test_stage_gen_from_missing_weights_leaves_nothing_behind(tmp_path, synthetic_shards) -> None:
    """Once: an empty run dir and a FAILED MLflow run."""
    run_dir, db = tmp_path / "run", tmp_path / "ml.db"
    proc = launch_train(f"data.shards={synthetic_shards}", f"run.dir={run_dir}", f"tracking.uri=sqlite:///{db}",
                        "stage=gen", "stage.gen.init=/nope", *TINY_RUN)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "stage.gen.init=/nope -> /nope does not exist" in proc.stderr
    assert not run_dir.exists() and not db.exists()


def test_the_mlflow_run_is_noted_for_a_restart_without_its_credentials(tmp_path):
    """A worker group restarted before the first checkpoint finds the run's MLflow run in run.json;
    the tracking URI is kept masked (run dirs are copied and shared), and another URI finds none."""
    from trainer.components.rundir import RUN_FILE, claim, record_mlflow_run, recorded_mlflow_run

    claim(tmp_path, resume="none", continues=False, overwrite=False)
    uri = "http://alice:s3cret@mlflow.lab:5000"
    record_mlflow_run(tmp_path, "abc123", uri)
    assert "s3cret" not in (tmp_path / RUN_FILE).read_text()
    assert recorded_mlflow_run(tmp_path, uri) == "abc123"
    assert recorded_mlflow_run(tmp_path, "sqlite:///other.db") is None
