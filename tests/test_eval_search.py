"""launch/eval.py and launch/search.py as subprocesses on a registered model (real sqlite store)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support import ROOT
from trainer.launchers.cli import ConfigError


@pytest.fixture(scope="module")
def registered(trained_run) -> SimpleNamespace:
    """The shared tiny run registered itself as streamret@champion at its end (trainer/run.py)."""
    return trained_run


def launch(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_eval_reports_every_variant_and_reproduces_training_eval(registered):
    out_json = registered.out / "eval.json"
    proc = launch("eval.py", ["--model", "models:/streamret@champion", f"data.root={registered.corpus}",
                              f"data.shards={registered.shards}", f"tracking.uri={registered.uri}",
                              "run.progress=false", "run.device=cpu", "data.num_workers=0",
                              "eval.rerank_topk=4", "--out", str(out_json), "eval.qb_bank=10", "--mlflow"], registered.out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for variant in ("con ", "gen_rerank", "con_dual_softmax", "con_qb_norm", "Rsum delta vs con"):
        assert variant in proc.stdout
    payload = json.loads(out_json.read_text())
    assert set(payload["metrics"]) == {"con", "gen_rerank", "con_dual_softmax", "con_qb_norm"}
    assert payload["num_videos"] == 12 and payload["querybank"]["captions"] == 10
    # Same model, same shards: stage-1 and re-ranked metrics equal the training run's own evaluation.
    for variant in ("con", "gen_rerank"):
        for direction in ("t2v", "v2t"):
            assert payload["metrics"][variant][direction] == pytest.approx(registered.metrics[variant][direction])

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=registered.uri)
    runs = client.search_runs([client.get_experiment_by_name("streamret").experiment_id], "tags.kind = 'eval'")
    assert len(runs) == 1 and "eval/con_qb_norm/t2v_R1" in runs[0].data.metrics


@pytest.mark.slow
def test_eval_counts_the_samples_it_could_not_decode(registered, tmp_path):
    """A test clip decord cannot read was dropped silently: R@1 over 4 of 5 videos, counted nowhere."""
    import io
    import shutil
    import tarfile

    shards = tmp_path / "shards"
    shutil.copytree(registered.shards, shards)
    shard = shards / "test-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        first_video = next(m.name for m, _ in members if m.name.endswith(".mp4"))
        for member, data in members:
            if member.name == first_video:  # the first sample's video: same size, garbage bytes
                data = bytes(len(data))
            tar.addfile(member, io.BytesIO(data))
    out_json = tmp_path / "eval.json"
    proc = launch("eval.py", ["--model", "models:/streamret@champion", f"data.shards={shards}",
                              f"tracking.uri={registered.uri}", "run.progress=false", "run.device=cpu",
                              "data.num_workers=0", "eval.rerank_topk=4", "eval.qb_bank=0", "--out", str(out_json),
                              "--mlflow"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scored 11 of its 12 samples" in proc.stdout
    payload = json.loads(out_json.read_text())
    assert payload["test_data"] == {"in_split": 12, "scored": 11, "decode_error": 1} and payload["num_videos"] == 11

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=registered.uri)
    run_id = proc.stdout.split("MLflow run ")[1].split()[0]
    assert client.get_run(run_id).data.metrics["eval/data_test_decode_error"] == 1.0


@pytest.mark.slow
def test_search_prints_top_k_and_writes_contact_sheet(registered):
    rows = [json.loads(line) for line in (registered.corpus / "test.jsonl").read_text().splitlines()]
    png = registered.out / "sheet.png"
    proc = launch("search.py", ["model=models:/streamret@champion", f"shards={registered.shards}",
                                f"query={rows[0]['captions'][0]}", "--topk", "3", "--png", str(png), "--frames", "2",
                                f"tracking.uri={registered.uri}", f"data.root={registered.corpus}",
                                "run.progress=false", "run.device=cpu", "data.num_workers=0"], registered.out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(lines) == 3 and all(line.split()[1] in {r["video_id"] for r in rows} for line in lines)
    scores = [float(line.split()[2]) for line in lines]
    assert scores == sorted(scores, reverse=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def load_launcher(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_missing_model_or_query_is_a_config_error():
    eval_cli, search_cli = load_launcher("eval"), load_launcher("search")
    with pytest.raises(ConfigError) as err:
        eval_cli.parse_args(["data.shards=/x"])
    assert "no model given" in err.value.message
    with pytest.raises(ConfigError) as err:
        search_cli.parse_args(["--model", "models:/streamret@champion"])
    assert "--query is required" in err.value.message
    with pytest.raises(ConfigError) as err:  # once accepted, ranking at random
        search_cli.parse_args(["--model", "models:/streamret@champion", "--query", "   "])
    assert "--query is blank" in err.value.message
    args = eval_cli.parse_args(["model=models:/m@champion", "model=tiny", "eval.qb_bank=0"])
    assert args.model == "models:/m@champion" and args.overrides == ["model=tiny", "eval.qb_bank=0"]
    args = search_cli.parse_args(["model=/tmp/run", "shards=/s", "query=a red square", "--topk", "2"])
    assert args.query == "a red square" and "data.shards=/s" in args.overrides and args.topk == 2


def test_the_alpha_chosen_on_val_travels_with_the_model(tmp_path):
    """eval.py once re-ranked registered models with the configured eval.rerank_alpha, not the one
    the run chose on its val split."""
    from omegaconf import OmegaConf

    from trainer.config import RootConfig
    from trainer.serve.bundle import InferenceSettings

    cfg = OmegaConf.structured(RootConfig)
    cfg.data.val_split = "val"
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (tmp_path / "metrics.json").write_text(json.dumps({"rerank_alpha": 0.25}))
    settings = InferenceSettings.from_run_config(tmp_path / "config.yaml")
    assert settings.rerank_alpha == 0.25
    assert InferenceSettings.read(settings.write(tmp_path / "streamret.json")).rerank_alpha == 0.25
    cfg.data.val_split = ""  # no val split: nothing was chosen, the configured value stands
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    assert InferenceSettings.from_run_config(tmp_path / "config.yaml").rerank_alpha is None


@pytest.mark.slow
def test_eval_and_search_on_s3_shards_match_local_disk(registered, s3_shards, tmp_path):
    """The registered model evaluated and searched over s3:// (moto on 127.0.0.1, byte-identical shards
    to the ones it trained on): the training run's figures and the local search's answer."""
    common = [f"tracking.uri={registered.uri}", f"data.root={registered.corpus}", "run.progress=false",
              "run.device=cpu", "data.num_workers=0"]
    out_json = tmp_path / "eval.json"
    proc = launch("eval.py", ["--model", "models:/streamret@champion", f"data.shards={s3_shards}", "eval.rerank_topk=4",
                              "eval.qb_bank=0", "--out", str(out_json), *common], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(out_json.read_text())
    for variant in ("con", "gen_rerank"):
        for direction in ("t2v", "v2t"):
            assert payload["metrics"][variant][direction] == pytest.approx(registered.metrics[variant][direction])
    query = json.loads((registered.corpus / "test.jsonl").read_text().splitlines()[0])["captions"][0]
    answers = []
    for shards in (s3_shards, registered.shards):
        proc = launch("search.py", ["model=models:/streamret@champion", f"shards={shards}", f"query={query}",
                                    "--topk", "3", *common], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        answers.append([line for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()])
    assert len(answers[0]) == 3 and answers[0] == answers[1]
