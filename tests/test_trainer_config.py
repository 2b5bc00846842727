"""The config tree: composition, validation against the dataclasses, launcher flags."""
import os
import pytest

from trainer.launchers.cli import ConfigError, compose, parse_launcher_args


def test_default_config_runs_both_stages_on_the_synthetic_corpus():
    cfg = compose([])
    assert list(cfg.stage.run) == ["con", "gen"]
    assert cfg.data.corpus == "synthetic" and cfg.model.name == "tiny"
    assert cfg.data.root.startswith("/") and cfg.run.dir.startswith("/")  # absolutised for Ray/DeepSpeed


def test_group_options_and_overrides_compose():
    cfg = compose(["stage=gen", "model=clip_b32", "deepspeed=zero3", "data.batch_size=4"])
    assert list(cfg.stage.run) == ["gen"]
    assert cfg.model.vision_width == 768 and cfg.model.patch_size == 32
    assert cfg.deepspeed.zero_stage == 3 and cfg.data.batch_size == 4


@pytest.mark.parametrize("overrides, needle", [
    (["data.bach_size=4"], "bach_size"),
    (["+data.bach_size=4"], "data.bach_size"),
    (["model=vit_huge"], "model/vit_huge"),
    (["data.batch_size=many"], "many"),
    (["data=manifest"], "data.root"),
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
