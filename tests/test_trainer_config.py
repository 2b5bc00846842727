"""The config tree: composition, validation against the dataclasses, launcher flags."""
import os
import pytest

from trainer.launchers.cli import ConfigError, compose, parse_launcher_args


def test_default_config_runs_both_stages_on_the_synthetic_corpus():
    cfg = compose([])
    assert list(cfg.stage.run) == ["con", "gen"]
    assert cfg.data.corpus == "synthetic" and cfg.model.name == "tiny"
    assert cfg.data.root.startswith("/")  # absolutised for Ray/DeepSpeed
    assert cfg.run.name == cfg.run.dir == ""  # named when the run starts (trainer.components.rundir.named)


def test_relative_paths_resolve_against_the_callers_folder(tmp_path, monkeypatch):
    """A relative data.root once resolved against the clone, not where the user ran the command."""
    from trainer.components.rundir import named

    monkeypatch.chdir(tmp_path)
    cfg = compose(["data=msrvtt", "data.root=corpora/msrvtt", "stage.gen.init=runs/a"])
    assert cfg.data.root == str(tmp_path / "corpora/msrvtt") and cfg.data.shards == str(tmp_path / "corpora/msrvtt/shards")
    assert cfg.stage.gen.init == str(tmp_path / "runs/a")
    run = named(cfg).run
    assert run.name.startswith("msrvtt-tiny-2") and run.dir == str(tmp_path / "runs" / run.name)
    assert named(compose(["run.name=exact"])).run.dir == str(tmp_path / "runs" / "exact")
    (tmp_path / "runs" / "synthetic-tiny-20260101-000000").mkdir(parents=True)
    (tmp_path / "runs" / "synthetic-tiny-20260101-000000" / "con.pt").write_bytes(b"")
    assert named(compose(["stage=gen"])).run.name == "synthetic-tiny-20260101-000000"  # stage gen continues it
    assert named(compose(["run.resume=auto"])).run.name != "synthetic-tiny-20260101-000000"  # no checkpoint there


def test_training_from_shards_needs_no_data_root(tmp_path):
    """data.root is only for packing: training from shards (data.shards=...) once demanded it."""
    from omegaconf import OmegaConf

    from trainer.components.rundir import named

    cfg = compose(["data=msrvtt", f"data.shards={tmp_path}"])
    assert cfg.data.shards == str(tmp_path) and cfg.data.root == ""
    assert OmegaConf.to_object(named(cfg)).data.shards == str(tmp_path)  # what run.train reads


def test_group_options_and_overrides_compose():
    cfg = compose(["stage=gen", "model=clip_b32", "deepspeed=zero3", "data.batch_size=4"])
    assert list(cfg.stage.run) == ["gen"]
    assert cfg.model.vision_width == 768 and cfg.model.patch_size == 32
    assert cfg.deepspeed.zero_stage == 3 and cfg.data.batch_size == 4
    reference = compose(["stage.gen.mode=reference", "model.gen_prior=false", "stage.gen.loss=mse"])
    assert (reference.stage.gen.mode, reference.model.gen_prior, reference.stage.gen.loss) == ("reference", False, "mse")


@pytest.mark.parametrize("overrides, needle", [
    (["data.bach_size=4"], "bach_size"),
    (["+data.bach_size=4"], "data.bach_size"),
    (["model=vit_huge"], "model/vit_huge"),
    (["data.batch_size=many"], "many"),
    (["data=manifest"], "data.root"),
    (["stage.gen.mode=hardest"], "stage.gen.mode=hardest"),
    (["stage.gen.loss=mse"], "model.gen_prior=false"),
])
def test_bad_config_is_one_clear_line(overrides, needle):
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    assert needle in err.value.message and "\n" not in err.value.message
    assert err.value.code == 2


def test_launcher_flags_become_overrides(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    overrides = parse_launcher_args(["--local_rank=1", "--stage", "gen", "data.batch_size=4"])
    assert overrides == ["data.batch_size=4", "stage=gen"] and os.environ["LOCAL_RANK"] == "1"
    assert list(compose(overrides).stage.run) == ["gen"]


def test_unknown_double_dash_flag_is_refused():
    with pytest.raises(ConfigError) as err:
        parse_launcher_args(["--epochs", "3"])
    assert "--epochs" in err.value.message and "stage=gen" in err.value.message
