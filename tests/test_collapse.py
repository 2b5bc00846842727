"""A run that stops learning says so: the collapse watch, the one-line stop, the MLflow tag, and a
registry that never promotes a model within noise of chance."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.support import TINY_RUN, launch_train
from trainer.components.collapse import CollapseWatch
from trainer.evaluation.scoring import Evaluation
from trainer.serve.registry import near_chance


def test_watch_needs_patience_intervals_at_chance_after_the_warmup():
    watch = CollapseWatch("con", pool=32, start_step=10, patience=3, margin=0.05)
    chance = math.log(32)
    assert not watch.check(5, chance, 0.1)  # still warming up: near chance by construction
    assert [watch.check(s, chance - 0.01, 0.1) for s in (10, 20)] == [False, False]
    assert not watch.check(30, 2.0, 0.1)  # learning again: the count starts over
    assert [watch.check(s, chance, 0.1) for s in (40, 50, 60)] == [False, False, True]
    spread = CollapseWatch("con", pool=32, start_step=0, patience=1)
    assert spread.check(1, 1.0, 1e-6)  # a low loss cannot hide similarities with no spread
    assert "ln(32) = 3.466" in watch.verdict(60, chance, 0.1) and "deepspeed.precision=fp32" in watch.verdict(60, chance, 0.1)


def test_chance_levels_and_the_registry_guard():
    result = Evaluation()
    sim = torch.randn(200, 100)
    result.add("con", sim, sim, torch.arange(200) % 100)
    chance = result.chance()
    assert (result.num_texts, result.num_videos) == (200, 100)
    assert chance["t2v"]["R1"] == pytest.approx(1.0) and chance["v2t"]["R10"] == pytest.approx(10.0)
    assert chance["t2v"]["MdR"] == pytest.approx(50.5)
    se = chance["t2v"]["R1_se"]
    assert se == pytest.approx(math.sqrt(1.0 * 99.0 / 200))
    assert near_chance(1.0 + 2.9 * se, "t2v_R1", chance) and not near_chance(1.0 + 3.1 * se, "t2v_R1", chance)
    assert near_chance(48.0, "t2v_MdR", chance) and not near_chance(10.0, "t2v_MdR", chance)
    assert not near_chance(0.5, "t2v_R1", None)


@pytest.mark.slow
def test_a_collapsed_run_stops_with_one_line_is_tagged_and_registers_nothing(synthetic_corpus, synthetic_shards,
                                                                              tmp_path):
    """run.collapse_margin=100 makes every loss "at chance": the real detection path, end to end."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [o for o in TINY_RUN if not o.startswith("stage.con.max_steps")]
    proc = launch_train(f"data.root={synthetic_corpus}", f"data.shards={synthetic_shards}", f"run.dir={tmp_path / 'run'}",
                        f"tracking.uri={uri}", *overrides, "stage.con.max_steps=8", "stage.con.log_every=1",
                        "run.collapse_margin=100", "run.collapse_patience=2", "run.collapse_min_step=0", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage con stopped learning at step") and "stage.con.lr" in last
    assert "Traceback" not in proc.stderr
    assert "warning: stage con stopped learning" in proc.stderr
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # not a registry URI another test left set
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].data.tags.get("collapsed") == "true" and runs[0].info.status == "FAILED"
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert client.search_registered_models() == []


def test_metrics_json_records_the_test_split_and_chance(trained_run):
    out = json.loads((trained_run.run_dir / "metrics.json").read_text())
    assert out["test_texts"] == 24 and out["test_videos"] == 12  # TINY_CORPUS: 12 test videos, 2 captions each
    assert out["chance"]["t2v"]["R1"] == pytest.approx(100 / 12)
