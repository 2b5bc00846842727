"""launch/train.py end to end on real shards: stage con -> stage gen -> evaluation -> MLflow,
and the one-line failures for bad input."""
import json
import subprocess

import pytest

from tests.support import TINY_RUN, launch_train as train


@pytest.fixture(scope="module")
def tiny_run(trained_run):
    return trained_run.out, trained_run


@pytest.mark.slow
def test_both_stages_write_metrics_json_and_exports(tiny_run):
    out, run = tiny_run
    payload = json.loads((out / "run" / "metrics.json").read_text())
    assert payload["stages"] == ["con", "gen"]
    assert set(payload["metrics"]) == {"con", "con_dual_softmax", "con_qb_norm", "gen_rerank"}
    for variant in payload["metrics"]:
        for direction in ("t2v", "v2t"):
            m = payload["metrics"][variant][direction]
            assert {"R1", "R5", "R10", "R50", "MdR", "MnR", "Rsum"} <= set(m)
            candidates = 12 if direction == "t2v" else 24  # 12 test videos, 2 captions each
            assert 1 <= m["MdR"] <= candidates and m["Rsum"] == pytest.approx(m["R1"] + m["R5"] + m["R10"])
    assert (out / "run" / "con.pt").is_file() and (out / "run" / "gen.pt").is_file()
    assert "gen_rerank" in run.stdout and "Rsum" in run.stdout  # the summary table


@pytest.mark.slow
def test_mlflow_run_has_params_step_metrics_eval_metrics_and_artifacts(tiny_run):
    from mlflow.tracking import MlflowClient

    out, _ = tiny_run
    run_id = json.loads((out / "run" / "metrics.json").read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.batch_size"] == "8" and run.data.params["stage.gen.timesteps"] == "5"
    # the finished model was registered and, being the first, became the champion
    champion = client.get_model_version_by_alias("streamret", "champion")
    assert champion.run_id == run_id and champion.tags["stage"] == "gen"
    for key in ("con/loss", "gen/loss", "gen/loss_t2v", "eval/con/t2v_R1", "eval/gen_rerank/v2t_MdR",
                "eval/con_dual_softmax/t2v_R1", "eval/con_qb_norm/v2t_Rsum", "con/lr_group0", "con/logit_scale",
                "con/samples_per_s", "con/data_wait_frac", "con/data_decode_error", "data/quarantined_train"):
        assert key in run.data.metrics, key
    assert [m.step for m in client.get_metric_history(run_id, "con/loss")][-1] == 3
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"metrics.json", "config.yaml", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert "plots/recall_at_k.png" in plots and "plots/stage_comparison.png" in plots


@pytest.mark.slow
def test_stage_gen_alone_starts_from_the_registered_champion(tiny_run, synthetic_corpus, synthetic_shards, tmp_path):
    """... in the reference's formulation (DiffusionRet's pools and generator), which stays selectable."""
    _, run = tiny_run
    proc = train("--stage", "gen", "stage.gen.init=models:/streamret@champion", f"tracking.uri={run.uri}",
                 f"data.root={synthetic_corpus}", f"data.shards={synthetic_shards}", f"run.dir={tmp_path / 'gen_only'}",
                 "tracking.register=false", "--local_rank=0", *TINY_RUN, "stage.gen.mode=reference", "model.gen_prior=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((tmp_path / "gen_only" / "metrics.json").read_text())
    assert payload["stages"] == ["gen"] and "gen_rerank" in payload["metrics"]
    from trainer.components.export import load_export
    assert not any("prior_scale" in k for k in load_export(tmp_path / "gen_only" / "gen.pt")["state_dict"])
    # the champion's encoder, materialised into the run: same stage-1 metrics as the run that trained it
    for direction in ("t2v", "v2t"):
        assert payload["metrics"]["con"][direction] == pytest.approx(run.metrics["con"][direction])


def _one_line_failure(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith(("error:", "config error:"))]
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_missing_shard_directory_is_one_clear_line(tmp_path):
    proc = train("data=manifest", f"data.root={tmp_path / 'corpus'}", f"data.shards={tmp_path / 'nope'}",
                 f"run.dir={tmp_path / 'run'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    _one_line_failure(proc, "launch/pack.py")
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlflow.db").exists()  # nothing half-written


def test_corpus_with_zero_test_samples_is_one_clear_line(shard_copy, synthetic_corpus, tmp_path):
    index = shard_copy / "test.index.json"
    meta = json.loads(index.read_text())
    index.write_text(json.dumps(dict(meta, shards=[], total_samples=0)))
    proc = train(f"data.root={synthetic_corpus}", f"data.shards={shard_copy}", f"run.dir={tmp_path / 'run'}",
                 f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    _one_line_failure(proc, "0 samples")
    assert not (tmp_path / "run").exists()


def test_undeclared_config_key_is_one_clear_line(tmp_path):
    proc = train("stage.con.epoch=3", f"run.dir={tmp_path / 'run'}")
    _one_line_failure(proc, "epoch")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_mid_stage_evaluation_scores_checkpoints_and_keeps_the_best(synthetic_corpus, synthetic_shards, tmp_path):
    from mlflow.tracking import MlflowClient

    from trainer.components.checkpoint import MARKER, best_tag, complete_tags

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = train("stage=con", f"data.root={synthetic_corpus}", f"data.shards={synthetic_shards}",
                 f"run.dir={tmp_path / 'run'}", f"tracking.uri={uri}", "tracking.register=false", *TINY_RUN,
                 "run.eval_every=2", "run.keep_last=1", "stage.con.max_steps=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = json.loads((tmp_path / "run" / "metrics.json").read_text())["mlflow_run_id"]
    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "eval/con/t2v_Rsum")
    assert {m.step for m in history} >= {2, 4}  # evaluated at steps 2 and 4 (and after the stage)
    stage_dir = tmp_path / "run" / "checkpoints" / "con"
    scored = {t.name: json.loads((t / MARKER).read_text()).get("metric") for t in complete_tags(stage_dir)}
    rsum = {m.step: m.value for m in history if m.step in (2, 4)}
    best_step = max(rsum, key=lambda s: (rsum[s], s))
    best = best_tag(complete_tags(stage_dir))
    assert best.name == f"step{best_step:08d}" and scored[best.name] == pytest.approx(-rsum[best_step])
    assert "step00000005" in scored  # the last one, kept beside the best
