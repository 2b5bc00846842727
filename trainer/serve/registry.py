"""The MLflow model registry: each finished stage becomes a registered model version, and alias
``champion`` points at the best one.

``register_stage`` packages ``con.pt`` (+ ``gen.pt`` for stage gen) and ``streamret.json`` as the
artifacts of a pyfunc model (``trainer.serve.pyfunc.StreamretPyfunc``), logs it under the
training run's artifacts (``model_<stage>/``), registers it under ``name`` with tags (stage,
corpus, run, ``metric.<dir>_<metric>`` of the chosen variant) and moves ``champion`` only when the
new version strictly beats the current champion's ``metric.<champion_metric>`` tag.

``load_registered`` / ``load_bundle`` read ``models:/<name>@<alias>``, ``models:/<name>/<version>``,
``runs:/<run_id>/model_<stage>``, a run directory or a ``con.pt`` path.

Only ``MlflowClient`` with explicit run ids is used (no fluent globals), like trainer.components.tracking.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from trainer.serve.bundle import SETTINGS_FILE, InferenceSettings, ModelBundle, load_bundle_files
from trainer.components.mlflow_store import _absolute_sqlite_uri, sanitize_metric_name
from trainer.components.secrets import redact

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
CODE_PACKAGES = ("ops", "shards", "trainer")  # shipped with the model so it loads outside this repo
REQUIREMENTS = ("torch", "open_clip_torch", "decord", "numpy", "omegaconf", "mlflow")
LOWER_IS_BETTER = ("MdR", "MnR")
CHAMPION = "champion"


@dataclass
class RegisteredVersion:
    name: str
    version: str
    model_uri: str  # models:/<name>/<version>
    metric: str
    value: float
    promoted: bool  # alias moved to this version (never when near_chance)
    champion_version: str  # the version the alias points at afterwards
    previous_value: float | None  # the old champion's value (None: there was none)
    near_chance: bool = False  # the metric is within noise of random ranking


def flatten_metrics(metrics: dict, variant: str | None) -> dict[str, float]:
    """``{"t2v_R1": 12.5, ...}`` for one variant of ``Evaluation.metrics`` (nested
    variant/direction/metric), or ``metrics`` itself when it is already flat."""
    if all(not isinstance(v, dict) for v in metrics.values()):
        return {str(k): float(v) for k, v in metrics.items()}
    if variant not in metrics:
        raise KeyError(f"register_stage: variant {variant!r} not in metrics (have {sorted(metrics)}); "
                       "pass variant= one of those")
    return {f"{direction}_{name}": float(value)
            for direction, by_name in metrics[variant].items() for name, value in by_name.items()}


def near_chance(value: float, metric: str, chance: dict | None) -> bool:
    """Within 3 standard errors of what random ranking scores (``Evaluation.chance()``), for a flat
    metric name ``<direction>_<metric>`` (R@k, MdR, MnR); False when the chance level is unknown."""
    if not chance or "_" not in metric:
        return False
    direction, name = metric.split("_", 1)
    level = chance.get(direction, {})
    if name.startswith("R") and name in level:
        return value <= level[name] + 3 * level.get(f"{name}_se", 0.0)
    if name in ("MdR", "MnR") and name in level:
        return value >= 0.9 * level[name]  # ranks: within 10% of the middle of the gallery
    return False


def is_better(new: float, old: float, metric: str) -> bool:
    """Strictly better: ties keep the current champion."""
    lower = any(metric.endswith(suffix) for suffix in LOWER_IS_BETTER)
    return new < old if lower else new > old


def _client(tracker_uri: str):
    from mlflow.tracking import MlflowClient

    uri, _ = _absolute_sqlite_uri(tracker_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _requirements() -> list[str]:
    reqs = []
    for name in REQUIREMENTS:
        try:
            reqs.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def save_pyfunc(path: Path, con_path: Path, gen_path: Path | None, settings: InferenceSettings) -> Path:
    """Write the pyfunc model directory (MLmodel, artifacts, code) at ``path``."""
    import mlflow.pyfunc

    settings_path = settings.write(path.parent / SETTINGS_FILE)
    code = path.parent / "code"
    for package in CODE_PACKAGES:
        shutil.copytree(REPO_ROOT / package, code / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    artifacts = {"con": str(con_path), "settings": str(settings_path)}
    if gen_path is not None:
        artifacts["gen"] = str(gen_path)
    # Explicit requirements: inferring them would load the model once more in a subprocess.
    with warnings.catch_warnings():
        # predict takes several input shapes (see trainer.serve.pyfunc), so no type-hint schema.
        warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
        # models-from-code: the model is trainer/serve/model_code.py run on load, not a pickled instance
        mlflow.pyfunc.save_model(path=str(path), python_model=str(Path(__file__).with_name("model_code.py")),
                                 artifacts=artifacts,
                                 code_paths=[str(code / p) for p in CODE_PACKAGES],
                                 pip_requirements=_requirements())
    return path


def register_stage(tracker_uri: str, run_id: str, run_dir: Path, stage: str, metrics: dict, *, name: str,
                   champion_metric: str = "t2v_R1", variant: str | None = None, con_path: Path | None = None,
                   corpus: str | None = None, alias: str = CHAMPION, chance: dict | None = None) -> RegisteredVersion:
    """Log ``run_dir``'s stage exports as a pyfunc model in run ``run_id``, register it under
    ``name`` and move ``alias`` to it if it beats the current holder on ``champion_metric``.

    ``metrics`` is ``Evaluation.metrics`` (then ``variant`` picks the variant; default
    ``gen_rerank`` for stage gen, ``con`` for stage con) or a flat ``{"t2v_R1": ...}`` dict.
    ``con_path`` defaults to ``<run_dir>/con.pt`` (pass ``stage.gen.init`` when it came from
    elsewhere); stage gen also needs ``<run_dir>/gen.pt``. With ``chance`` (``Evaluation.chance()``)
    a version whose champion metric is within noise of chance is registered but never promoted.
    """
    from mlflow.exceptions import MlflowException

    run_dir = Path(run_dir)
    if stage not in ("con", "gen"):
        raise ValueError(f"register_stage: stage must be 'con' or 'gen', got {stage!r}")
    con_path = Path(con_path) if con_path else run_dir / "con.pt"
    gen_path = run_dir / "gen.pt" if stage == "gen" else None
    for path in (con_path, gen_path):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"register_stage: {path} does not exist; stage {stage} must finish "
                                    "(and export its weights) before it is registered")
    if variant is None:
        variant = "gen_rerank" if stage == "gen" else "con"
    flat = flatten_metrics(metrics, variant)
    if champion_metric not in flat:
        raise KeyError(f"register_stage: champion_metric {champion_metric!r} not among the metrics "
                       f"{sorted(flat)}; set tracking.champion_metric to one of them")
    value = flat[champion_metric]
    settings = InferenceSettings.from_run_config(run_dir / "config.yaml")
    corpus = corpus or settings.corpus

    client, uri = _client(tracker_uri)
    artifact_path = f"model_{stage}"
    with tempfile.TemporaryDirectory(prefix="streamret-pyfunc-") as tmp:
        save_pyfunc(Path(tmp) / artifact_path, con_path, gen_path, settings)
        client.log_artifacts(run_id, str(Path(tmp) / artifact_path), artifact_path)
    source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + artifact_path

    try:
        client.create_registered_model(name, description="streamret text-video retrieval (trainer/serve/registry.py)")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    metric_tags = {sanitize_metric_name(f"metric.{k}"): f"{v:.6g}" for k, v in flat.items()}
    tags = {"stage": stage, "corpus": corpus, "variant": variant, "run_dir": str(run_dir.resolve()),
            "champion_metric": champion_metric, **metric_tags}
    mv = client.create_model_version(name, source=source, run_id=run_id, tags=tags,
                                     description=f"stage {stage} of {run_dir.name}: {champion_metric}={value:.4g}")

    key = sanitize_metric_name(f"metric.{champion_metric}")
    previous_value, champion_version = None, None
    try:
        current = client.get_model_version_by_alias(name, alias)
        champion_version = current.version
        if key in current.tags:
            previous_value = float(current.tags[key])
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise
    at_chance = near_chance(value, champion_metric, chance)
    promoted = not at_chance and (champion_version is None or previous_value is None
                                  or is_better(value, previous_value, champion_metric))
    if at_chance:
        log.warning("%s version %s: %s=%.4g is within noise of chance; %s stays where it was", name, mv.version,
                    champion_metric, value, alias)
        client.set_model_version_tag(name, mv.version, "near_chance", "true")
    if promoted:
        client.set_registered_model_alias(name, alias, mv.version)
        champion_version = mv.version
    client.set_model_version_tag(name, mv.version, "promoted", str(promoted).lower())
    log.info("registered %s version %s (%s=%.4g); %s at version %s", name, mv.version, champion_metric, value,
             alias, champion_version)
    return RegisteredVersion(name, str(mv.version), f"models:/{name}/{mv.version}", champion_metric, value,
                             promoted, str(champion_version) if champion_version is not None else "none",
                             previous_value, at_chance)


def load_bundle(uri: str | Path, *, tracking_uri: str | None = None) -> ModelBundle:
    """A :class:`ModelBundle` from a registry/run URI, a run directory or a ``con.pt`` path.

    ``tracking_uri`` (default ``$MLFLOW_TRACKING_URI``) is the store that holds ``models:/`` and
    ``runs:/`` URIs. A run directory gives its ``con.pt`` plus ``gen.pt`` when present; a
    ``.pt`` file gives that encoder alone.
    """
    uri = str(uri)
    if uri.startswith(("models:/", "runs:/")):
        return _download_bundle(uri, tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    path = Path(uri).expanduser()
    if path.is_dir():
        gen = path / "gen.pt"
        return load_bundle_files(path / "con.pt", gen if gen.is_file() else None, InferenceSettings.locate(path),
                                 source=uri)
    if path.is_file():
        return load_bundle_files(path, None, InferenceSettings.locate(path.parent), source=uri)
    raise FileNotFoundError(f"model {uri!r}: not a models:/ or runs:/ URI and no such file or directory; "
                            "pass models:/<name>@champion, models:/<name>/<version>, a run dir or a con.pt path")


def _download_bundle(uri: str, tracking_uri: str | None) -> ModelBundle:
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    if not tracking_uri:
        raise ValueError(f"model {uri!r}: which MLflow store holds it? pass tracking.uri=... "
                         "(or set MLFLOW_TRACKING_URI)")
    tracking_uri, _ = _absolute_sqlite_uri(tracking_uri)
    import mlflow

    previous = os.environ.get("MLFLOW_REGISTRY_URI")
    mlflow.set_registry_uri(tracking_uri)  # models:/ resolves through the registry URI, not tracking_uri=
    try:
        with tempfile.TemporaryDirectory(prefix="streamret-model-") as tmp:
            try:
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp,
                                                                 tracking_uri=tracking_uri))
            except MlflowException as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise FileNotFoundError(f"model {uri!r} not found in {redact(tracking_uri)}: {first}. List versions with "
                                        f"`mlflow models` / the MLflow UI, or check the name and alias") from exc
            art = local / "artifacts"
            gen = art / "gen.pt"
            return load_bundle_files(art / "con.pt", gen if gen.is_file() else None,
                                     InferenceSettings.read(art / SETTINGS_FILE), source=uri)
    finally:
        mlflow.set_registry_uri(previous or "")
        if previous is None:
            os.environ.pop("MLFLOW_REGISTRY_URI", None)


def load_registered(uri: str | Path, *, tracking_uri: str | None = None):
    """``(encoder, generators | None, model_config, max_frames)`` from a URI or path (see :func:`load_bundle`)."""
    b = load_bundle(uri, tracking_uri=tracking_uri)
    return b.encoder, b.generators, b.model_config, b.max_frames


def is_model_reference(value: str) -> bool:
    """``models:/...``, ``runs:/...`` or an existing path: what ``model=`` means to eval/search
    (any other ``model=X`` stays Hydra's model-config group choice)."""
    return value.startswith(("models:/", "runs:/")) or "/" in value or Path(value).expanduser().exists()


def pop_model_reference(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take ``--model X`` / ``--model=X`` / ``model=<uri or path>`` out of ``argv``."""
    model, rest, it = None, [], iter(argv)
    for arg in it:
        if arg == "--model":
            model = next(it, None)
            if model is None:
                raise ValueError("--model needs a value: models:/<name>@champion, a run dir or a con.pt path")
        elif arg.startswith("--model="):
            model = arg.split("=", 1)[1]
        elif arg.startswith("model=") and is_model_reference(arg.split("=", 1)[1]):
            model = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return model, rest
