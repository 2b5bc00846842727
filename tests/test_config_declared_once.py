"""Every value is declared once: the dataclasses in trainer/config.py hold the defaults, conf/ YAML
only what a group option changes. A YAML key that no dataclass declares, or a YAML value equal
to its default, fails here."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from omegaconf import MISSING

from trainer.config import RootConfig
from tests.support import ROOT

CONF = ROOT / "conf"
GROUP_FILES = sorted(p for p in CONF.rglob("*.yaml") if p.parent != CONF)


def defaults_of(schema) -> dict:
    """The dataclass tree's defaults as nested dicts (MISSING stays MISSING)."""
    out = {}
    for f in dataclasses.fields(schema):
        if f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            out[f.name] = defaults_of(type(value)) if dataclasses.is_dataclass(value) else value
        else:
            out[f.name] = f.default
    return out


def package_of(path: Path) -> list[str]:
    """Where a file's keys land: its group's node, or the root for ``# @package _global_``."""
    if path.parent == CONF or "# @package _global_" in path.read_text():
        return []
    return list(path.relative_to(CONF).parent.parts)


def leaves(node: dict, prefix: list[str]):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from leaves(value, prefix + [key])
        else:
            yield prefix + [key], value


def check(path: Path, defaults: dict) -> list[str]:
    problems = []
    loaded = yaml.safe_load(path.read_text()) or {}
    loaded.pop("defaults", None)  # Hydra's defaults list, not a config value
    for keys, value in leaves(loaded, package_of(path)):
        node = defaults
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                problems.append(f"{path.relative_to(ROOT)}: {'.'.join(keys)} is not declared in trainer/config.py")
                break
            node = node[key]
        else:
            default = None if node is MISSING else node
            if value == default or (value == "???" and node is MISSING):
                problems.append(f"{path.relative_to(ROOT)}: {'.'.join(keys)}: {value!r} restates the default")
    return problems


@pytest.mark.parametrize("path", [CONF / "config.yaml", *GROUP_FILES], ids=lambda p: str(p.relative_to(CONF)))
def test_yaml_holds_only_what_its_option_changes(path):
    assert check(path, defaults_of(RootConfig)) == []


def test_the_check_catches_a_restated_default_and_an_undeclared_key(tmp_path, monkeypatch):
    group = tmp_path / "data"
    group.mkdir()
    bad = group / "bad.yaml"
    bad.write_text("corpus: msrvtt\nmax_frames: 12\nbach_size: 8\npack:\n  shard_mb: 256\n")
    monkeypatch.setattr(f"{__name__}.CONF", tmp_path)
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert check(bad, defaults_of(RootConfig)) == [
        "data/bad.yaml: data.max_frames: 12 restates the default",
        "data/bad.yaml: data.bach_size is not declared in trainer/config.py",
        "data/bad.yaml: data.pack.shard_mb: 256 restates the default",
    ]
