"""A run dir belongs to one run.

``<run_dir>/run.json`` records the run's identity (``run_uid``), written when the run starts; every
checkpoint marker and stage export carries it. A fresh run refuses a dir holding another run's
artifacts (two runs in one dir once paired one run's generator with another's encoder, and
registered it): continue it with ``run.resume=auto``, name a new one with ``run.name=``, or replace
it with ``run.overwrite=true`` (which deletes only the artifacts a run writes, listed below).

The default name is ``<corpus>-<model>-<YYYYmmdd-HHMMSS>``, so two runs rarely meet; with
``run.resume=auto`` and no name, the newest such run dir with a checkpoint is picked up again (a
preempted job resubmitted with the same command continues), and ``stage=gen`` with no
``stage.gen.init`` continues the newest such run that has a ``con.pt``. Rank 0 decides and broadcasts it,
so DeepSpeed ranks started a second apart agree.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from trainer.components.secrets import redact

RUN_FILE = "run.json"
STOP_FILE = "PREEMPT"  # a stop request to the run's stage loops (trainer/components/preemption.py)
# Everything a run writes into its dir; run.overwrite=true deletes exactly these.
ARTIFACTS = (RUN_FILE, "con.pt", "gen.pt", "metrics.json", "config.yaml", "checkpoints", "features", "plots", "ray",
             "samples", STOP_FILE)


def atomic_write(path: Path, text: str) -> None:
    """``path`` holds either its old content or all of ``text``, never a torn write."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunDirTaken(ValueError):
    """A fresh run was pointed at a dir holding another run's artifacts."""


def auto_name(cfg: DictConfig, runs: Path) -> str:
    """A new timestamped name; or, when this run continues one (``run.resume=auto``, or stage gen
    from the run's own con.pt), the newest run of this corpus and model that it can continue."""
    prefix = f"{cfg.data.corpus}-{cfg.model.name}-"
    needs = ("checkpoints" if cfg.run.resume == "auto"
             else "con.pt" if "con" not in cfg.stage.run and not cfg.stage.gen.init else None)
    if needs and runs.is_dir():
        candidates = sorted((p for p in runs.glob(f"{prefix}*") if (p / needs).exists()), key=lambda p: p.name)
        if candidates:
            return candidates[-1].name
    return prefix + time.strftime("%Y%m%d-%H%M%S")


def named(dcfg: DictConfig, decide=lambda pick: pick()) -> DictConfig:
    """``dcfg`` with ``run.name`` and ``run.dir`` filled in when left to default. ``decide`` runs the
    choice once and shares it (the distributed broadcast; identity in one process)."""
    if dcfg.run.name and dcfg.run.dir:
        return dcfg
    runs = Path.cwd() / "runs"
    name = dcfg.run.name or (Path(dcfg.run.dir).name if dcfg.run.dir else decide(lambda: auto_name(dcfg, runs)))
    cfg = dcfg.copy()  # keeps the schema (RootConfig) the config was composed with
    OmegaConf.set_readonly(cfg, False)
    OmegaConf.update(cfg, "run.name", name)
    OmegaConf.update(cfg, "run.dir", dcfg.run.dir or str(runs / name))
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _held(run_dir: Path) -> list[str]:
    return [name for name in ARTIFACTS if (run_dir / name).exists()]


def claim(run_dir: Path, *, resume: str, continues: bool, overwrite: bool) -> str:
    """The run uid for this run in ``run_dir`` (rank 0, before anything is written). ``continues``:
    this run carries on the one in the dir (stage gen from the dir's own con.pt)."""
    run_dir = Path(run_dir)
    held = _held(run_dir)
    record = run_dir / RUN_FILE
    previous = json.loads(record.read_text()) if record.is_file() else {}
    if held and (resume != "none" or continues) and not overwrite:
        return previous.get("run_uid") or _new(run_dir)
    if held and not overwrite:
        who = f"run {previous['run_uid'][:8]} (started {previous.get('started', '?')})" if previous else "another run"
        raise RunDirTaken(f"run.dir={run_dir} holds {who}: {', '.join(held)}. Continue it with run.resume=auto, "
                          f"start a new run with run.name=<new name>, or replace it with run.overwrite=true")
    for name in held:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return _new(run_dir)


def _new(run_dir: Path) -> str:
    run_dir.mkdir(parents=True, exist_ok=True)
    uid = uuid.uuid4().hex
    (run_dir / RUN_FILE).write_text(json.dumps({"run_uid": uid, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    return uid


def record_mlflow_run(run_dir: Path, run_id: str | None, uri: str) -> None:
    """Note the run's MLflow run in ``run.json`` (rank 0, once it exists): a worker group that Ray
    Train restarts before the first checkpoint continues it instead of opening a second one. The
    tracking URI is kept with its credentials masked: run dirs get copied and shared."""
    record = Path(run_dir) / RUN_FILE
    if not run_id or not record.is_file():
        return
    info = json.loads(record.read_text())
    noted = {"run_id": run_id, "uri": redact(uri)}
    if info.get("mlflow") != noted:
        atomic_write(record, json.dumps(dict(info, mlflow=noted)))


def recorded_mlflow_run(run_dir: Path, uri: str) -> str | None:
    """The MLflow run ``record_mlflow_run`` noted for this tracking ``uri``, if any."""
    record = Path(run_dir) / RUN_FILE
    mlflow = json.loads(record.read_text()).get("mlflow") if record.is_file() else None
    return mlflow["run_id"] if mlflow and mlflow.get("uri") == redact(uri) else None


def check_same_run(marker: dict, run_uid: str, where: Path) -> None:
    """Refuse to resume a checkpoint another run wrote (markers from before run uids pass)."""
    saved = marker.get("run_uid")
    if saved and run_uid and saved != run_uid:
        raise RunDirTaken(f"{where} was written by run {saved[:8]}, but {where.parents[2]} belongs to run "
                          f"{run_uid[:8]}: the dir mixes two runs' artifacts. Resume with the dir the checkpoint came "
                          f"from, or start over with run.overwrite=true")
