"""Command line -> validated config, for every entry point in ``launch/``.

Launchers inject flags Hydra does not know (DeepSpeed's ``--local_rank=N``, users' ``--stage gen``),
so the entry points parse those first and compose the config with Hydra's Compose API.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from trainer.config import GEN_MODES, RootConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
REPO_ROOT = CONF_DIR.parent

# Keys that hold filesystem paths: made absolute at start (against the caller's working directory,
# as any command-line tool resolves them), because a Ray job's working dir is ephemeral and
# DeepSpeed ranks may start elsewhere. data.video_dir is relative to data.root, not to the caller.
PATH_KEYS = ("data.root", "data.shards", "run.dir", "stage.gen.init", "model.weights")


class ConfigError(SystemExit):
    """A config problem, reported as one line and exit code 2."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message


def parse_launcher_args(argv: list[str]) -> list[str]:
    """argv -> Hydra overrides: ``--stage X`` becomes ``stage=X``; DeepSpeed's ``--local_rank=N``
    sets LOCAL_RANK (the environment is where ranks are read from)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None)
    parser.add_argument("--stage", default=None)
    known, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("--")]
    if stray:
        raise ConfigError(
            f"unknown flag {stray[0]!r}: launch/*.py take Hydra overrides (key=value, e.g. "
            "stage=gen data.batch_size=16) plus --stage and --local_rank"
        )
    overrides = list(rest)
    if known.stage:
        overrides.append(f"stage={known.stage}")
    if known.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(known.local_rank))
    return overrides


def _register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=RootConfig)


def compose(overrides: list[str], config_name: str = "config") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with overrides, validated against ``RootConfig``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    _register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
        _check_declared(cfg, RootConfig, "")
        _absolutize_paths(cfg)
        OmegaConf.resolve(cfg)
        _derive_shards(cfg, overrides)
        _check_pack(cfg.data.pack, overrides)
        _check_gen(cfg, overrides)
    except (HydraException, OmegaConfBaseException, YAMLError) as err:
        cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
        first = " ".join(str(cause).split())[:300]
        if "mismatched input '{'" in first:  # a brace pattern of shard names, unquoted for Hydra
            first += ("; a value holding braces must be quoted inside the override, e.g. "
                      "data.webdataset.train=\"'/data/cc/{00000..00099}.tar'\"")
        raise ConfigError(
            f"config error: {first} (overrides: {' '.join(overrides) or 'none'}). Keys are "
            "declared in trainer/config.py and conf/; group options are the files in conf/<group>/"
        ) from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _check_declared(node: DictConfig, schema: type, prefix: str) -> None:
    """`+key=value` appends past Hydra's struct check; refuse any key RootConfig does not declare."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        if key not in fields:
            raise ConfigError(
                f"config error: key '{prefix}{key}' is not declared in trainer/config.py "
                f"({schema.__name__}); check the spelling or declare it there and in conf/"
            )
        factory = fields[key].default_factory
        child = factory() if factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(child) and isinstance(node._get_node(key), DictConfig):
            _check_declared(node._get_node(key), type(child), f"{prefix}{key}.")


def _derive_shards(cfg: DictConfig, overrides: list[str]) -> None:
    """``data.shards`` defaults to ``<data.root>/shards``; one of the two must be given."""
    if cfg.data.shards:
        return
    if not cfg.data.root:
        raise ConfigError(f"config error: data.root and data.shards are both unset (overrides: {' '.join(overrides) or 'none'}); "
                          f"pass data.root=<corpus on disk> to pack it, or data.shards=<packed shards> to train from them")
    cfg.data.shards = str(Path(cfg.data.root) / "shards")


def _check_pack(pack: DictConfig, overrides: list[str]) -> None:
    bad = [f"{key}={value} (must be {rule})" for key, value, ok, rule in (
        ("frames_fps", pack.frames_fps, pack.frames_fps > 0, "> 0"),
        ("frames_short_side", pack.frames_short_side, pack.frames_short_side >= 1, ">= 1"),
        ("frames_quality", pack.frames_quality, 1 <= pack.frames_quality <= 100, "in 1..100"),
    ) if not ok]
    if bad:
        raise ConfigError(f"config error: data.pack.{'; data.pack.'.join(bad)} (overrides: {' '.join(overrides) or 'none'})")


def _check_gen(cfg: DictConfig, overrides: list[str]) -> None:
    """Refused before any training, not after stage con: a stage-gen setting that cannot run."""
    gen = cfg.stage.gen
    if gen.mode not in GEN_MODES:
        raise ConfigError(f"config error: stage.gen.mode={gen.mode} (must be one of {', '.join(GEN_MODES)}; "
                          f"overrides: {' '.join(overrides) or 'none'})")
    if cfg.model.gen_prior and gen.loss != "kl":  # beta and the re-ranking softmax come from the kl loss's scale
        raise ConfigError(f"config error: stage.gen.loss={gen.loss} is the reference's ablation and takes the "
                          "reference's generator: add model.gen_prior=false")


def _absolutize_paths(cfg: DictConfig) -> None:
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key)
        if value and ":/" not in str(value) and not os.path.isabs(str(value)):  # URIs stay as they are
            OmegaConf.update(cfg, key, str(Path.cwd() / str(value)), merge=False)


def load_config(argv: list[str] | None = None) -> DictConfig:
    """Entry-point helper: argv -> config; config errors print one line and exit 2."""
    return compose(parse_launcher_args(sys.argv[1:] if argv is None else argv))
