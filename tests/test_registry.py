"""The MLflow model registry on a real sqlite store: registration, champion promotion only on
improvement, and loading by alias / version / run dir giving the run's own model."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(trained_run) -> SimpleNamespace:
    return trained_run


def champion_version(uri: str, name: str) -> str:
    from mlflow.tracking import MlflowClient

    return str(MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(name, "champion").version)


def test_is_better_respects_metric_direction():
    from trainer.serve.registry import is_better

    assert is_better(20.0, 10.0, "t2v_R1") and not is_better(10.0, 10.0, "t2v_R1")
    assert is_better(3.0, 5.0, "t2v_MdR") and not is_better(5.0, 3.0, "v2t_MnR")


def test_champion_moves_only_on_improvement(trained):
    from mlflow.tracking import MlflowClient

    from trainer.serve.registry import register_stage

    r1 = trained.metrics["gen_rerank"]["t2v"]["R1"]
    first = register_stage(trained.uri, trained.run_id, trained.run_dir, "gen", trained.metrics, name="promo")
    assert first.promoted and first.value == r1 and first.previous_value is None
    assert champion_version(trained.uri, "promo") == first.version

    worse = register_stage(trained.uri, trained.run_id, trained.run_dir, "con", {"t2v_R1": r1 - 1.0, "t2v_MdR": 3.0},
                           name="promo")
    assert not worse.promoted and worse.previous_value == pytest.approx(r1, rel=1e-5)
    assert champion_version(trained.uri, "promo") == first.version

    better = register_stage(trained.uri, trained.run_id, trained.run_dir, "con", {"t2v_R1": r1 + 1.0}, name="promo")
    assert better.promoted and champion_version(trained.uri, "promo") == better.version

    client = MlflowClient(tracking_uri=trained.uri, registry_uri=trained.uri)
    tags = client.get_model_version("promo", first.version).tags
    assert tags["stage"] == "gen" and tags["corpus"] == "synthetic" and tags["variant"] == "gen_rerank"
    assert float(tags["metric.t2v_R1"]) == pytest.approx(r1, rel=1e-5) and tags["promoted"] == "true"
    assert client.get_model_version("promo", worse.version).tags["promoted"] == "false"


def test_a_version_within_noise_of_chance_is_never_promoted(trained):
    """Even as the first version of a name (which is otherwise always promoted)."""
    from mlflow.tracking import MlflowClient

    from trainer.serve.registry import register_stage

    chance = {"t2v": {"R1": 1.0, "R1_se": 0.5}}
    at_chance = register_stage(trained.uri, trained.run_id, trained.run_dir, "con", {"t2v_R1": 2.4}, name="chancy",
                               chance=chance)
    from mlflow.exceptions import MlflowException

    assert at_chance.near_chance and not at_chance.promoted
    with pytest.raises(MlflowException):
        champion_version(trained.uri, "chancy")  # no alias at all
    tags = MlflowClient(tracking_uri=trained.uri, registry_uri=trained.uri).get_model_version("chancy",
                                                                                             at_chance.version).tags
    assert tags["near_chance"] == "true" and tags["promoted"] == "false"
    above = register_stage(trained.uri, trained.run_id, trained.run_dir, "con", {"t2v_R1": 2.6}, name="chancy",
                           chance=chance)
    assert above.promoted and champion_version(trained.uri, "chancy") == above.version


def test_register_rejects_unknown_metric_and_missing_export(trained, tmp_path):
    from trainer.serve.registry import register_stage

    with pytest.raises(KeyError, match="t2v_R1"):
        register_stage(trained.uri, trained.run_id, trained.run_dir, "con", {"v2t_R5": 1.0}, name="bad",
                       champion_metric="t2v_R1")
    with pytest.raises(FileNotFoundError, match="gen.pt"):
        register_stage(trained.uri, trained.run_id, tmp_path, "gen", {"t2v_R1": 1.0}, name="bad",
                       con_path=trained.run_dir / "con.pt")


def _reference_models(run_dir: Path):
    """The run's exports loaded by hand, the way trainer/run.py does."""
    from trainer.components.export import load_export, load_into
    from trainer.config import ModelConfig
    from trainer.models import build_encoder, build_generators

    con = load_export(run_dir / "con.pt")
    encoder = build_encoder(ModelConfig(**con["model_config"]), con["max_frames"])
    load_into(encoder.float(), con, "encoder.", run_dir / "con.pt")
    gen = torch.load(run_dir / "gen.pt", map_location="cpu", weights_only=False)
    generators = build_generators(ModelConfig(**gen["model_config"]))
    load_into(generators, gen, "generators.", run_dir / "gen.pt")
    return encoder.eval(), generators.eval(), con["max_frames"]


def _test_batch(shards: Path, model_config, max_frames: int, settings):
    from trainer.config import DataConfig
    from trainer.components.data import eval_loader

    data = DataConfig(root="", shards=str(shards), max_frames=max_frames, max_words=settings.max_words,
                      sample_fps=settings.sample_fps, num_workers=0, eval_batch_size=6)
    return next(iter(eval_loader(data, model_config, "test")))


@torch.no_grad()
def test_load_by_alias_gives_the_runs_model(trained, synthetic_shards):
    from shards.decode import video_to_device
    from shards.tokenize import CaptionTokenizer
    from trainer.serve.registry import load_bundle, load_registered, register_stage

    reg = register_stage(trained.uri, trained.run_id, trained.run_dir, "gen", trained.metrics, name="loadme")
    encoder, generators, model_config, max_frames = load_registered("models:/loadme@champion", tracking_uri=trained.uri)
    ref_encoder, ref_generators, ref_frames = _reference_models(trained.run_dir)
    assert max_frames == ref_frames and generators is not None

    bundle = load_bundle(f"models:/loadme/{reg.version}", tracking_uri=trained.uri)
    assert bundle.settings.max_words == 16 and bundle.settings.gen_timesteps == 5  # from the run's config.yaml
    batch = _test_batch(synthetic_shards, model_config, max_frames, bundle.settings)
    ids, mask = CaptionTokenizer(bundle.settings.max_words)([c[0] for c in batch["captions"]])
    scores = {}
    for key, enc in (("registry", encoder), ("export", ref_encoder)):
        text = enc.encode_text(ids, mask)
        video = enc.encode_video(video_to_device(batch["video"], batch["video_mask"], torch.device("cpu"), torch.float32),
                                 batch["video_mask"])
        scores[key] = enc.similarity(text, video)
    assert scores["registry"].shape == (6, 6)
    assert torch.equal(scores["registry"], scores["export"])
    for (k, a), b in zip(generators.state_dict().items(), ref_generators.state_dict().values()):
        assert torch.equal(a, b), k

    local_encoder, local_generators, _, _ = load_registered(trained.run_dir)
    assert torch.equal(local_encoder.logit_scale, ref_encoder.logit_scale) and local_generators is not None
    only_con = load_bundle(trained.run_dir / "con.pt")
    assert only_con.generators is None


@torch.no_grad()
def test_pyfunc_predict_texts_videos_and_pairs(trained, synthetic_corpus):
    import mlflow.pyfunc

    from shards.tokenize import CaptionTokenizer
    from trainer.serve.registry import load_bundle, register_stage

    reg = register_stage(trained.uri, trained.run_id, trained.run_dir, "con", {"t2v_R1": 0.0}, name="pyfunc")
    mlflow.set_registry_uri(trained.uri)
    try:
        model = mlflow.pyfunc.load_model(reg.model_uri)
    finally:
        mlflow.set_registry_uri("")
    ref = load_bundle(trained.run_dir)
    rows = [json.loads(line) for line in (synthetic_corpus / "test.jsonl").read_text().splitlines()[:2]]
    captions = [r["captions"][0] for r in rows]
    mp4s = [(synthetic_corpus / r["video"]).read_bytes() for r in rows]

    sentences = np.asarray(model.predict({"text": captions}))
    ids, mask = CaptionTokenizer(ref.settings.max_words)(captions)
    expected = ref.encoder.encode_text(ids, mask).sentence.numpy()
    np.testing.assert_allclose(sentences, expected, atol=1e-5)
    assert np.allclose(np.linalg.norm(sentences, axis=1), 1.0, atol=1e-4)

    videos = np.asarray(model.predict({"video": mp4s}))
    assert videos.shape == (2, ref.model_config.embed_dim) and np.isfinite(videos).all()

    pair_scores = model.predict({"text": captions, "video": mp4s})
    python_model = model.unwrap_python_model()
    text = python_model.encode_text(captions)
    video = python_model.encode_video(mp4s)
    full = ref.encoder.similarity(text, video)
    np.testing.assert_allclose(pair_scores, torch.diagonal(full).numpy(), atol=1e-5)

    with pytest.raises(ValueError, match="'text' and/or 'video'"):
        model.predict({"caption": captions})


def test_load_unknown_model_says_what_to_pass(trained, tmp_path):
    from trainer.serve.registry import load_bundle

    with pytest.raises(FileNotFoundError, match="models:/<name>@champion"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_bundle("models:/no_such_model@champion", tracking_uri=trained.uri)
