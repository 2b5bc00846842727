"""The folder tree is the architecture: the import contracts in pyproject.toml ([tool.importlinter])
hold for the project, and they do fail on an upward import and on an import cycle."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

PACKAGES = ("ops", "shards", "trainer")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    return subprocess.run([exe, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_layers_hold_and_no_module_imports_in_a_cycle():
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout


def test_the_contracts_catch_an_upward_import_a_cycle_and_hydra_in_the_model_library(tmp_path):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with (tmp_path / "trainer" / "models" / "laff.py").open("a") as f:  # the model library reaching up
        f.write("\n\ndef _up():\n    from trainer.components import loop  # noqa: F401\n")
    with (tmp_path / "ops" / "mining.py").open("a") as f:  # ops.metrics <-> ops.mining
        f.write("\n\nimport ops.metrics  # noqa: E402,F401\n")
    with (tmp_path / "ops" / "metrics.py").open("a") as f:
        f.write("\n\nimport ops.mining  # noqa: E402,F401\nimport omegaconf  # noqa: E402,F401\n")
    proc = lint_imports(tmp_path)
    assert proc.returncode != 0
    assert "0 kept, 3 broken" in proc.stdout, proc.stdout[-4000:]
    assert "trainer.models.laff -> trainer.components.loop" in proc.stdout
    assert "ops.metrics -> omegaconf" in proc.stdout
