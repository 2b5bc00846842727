"""A trained streamret model as one loadable bundle (``pyfunc.py`` wraps it for MLflow).

A bundle is the stage exports (``con.pt``, optionally ``gen.pt``) plus ``streamret.json``: the
few data settings inference needs to turn raw captions and videos into model inputs exactly as
training did (max_words, max_frames, sample_fps) and the diffusion schedule the generator was
trained with (``gen.pt`` itself does not carry it). Those settings are never guessed: a bundle
without them is refused.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ops import alphas_cumprod
from trainer.components.export import load_export, load_into
from trainer.models import Generators, ModelConfig, RetrievalEncoder, build_encoder, build_generators

SETTINGS_FILE = "streamret.json"
RUN_CONFIG_FILE = "config.yaml"


@dataclass
class InferenceSettings:
    """What a bundle needs besides weights, as the run that trained it had them."""

    max_words: int
    sample_fps: float
    gen_schedule: str
    gen_timesteps: int
    corpus: str
    # gen_rerank's weight as the run chose it on its val split (metrics.json); None = eval.rerank_alpha
    rerank_alpha: float | None = None

    @classmethod
    def from_run_config(cls, path: Path) -> "InferenceSettings":
        """Read ``<run_dir>/config.yaml`` (written at the end of a run)."""
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the inference settings (max_words, sample_fps, noise "
                                    "schedule) come from the run's config.yaml, written when the run finishes; "
                                    "point at a finished run dir or a registered model")
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        try:
            data, gen = cfg["data"], cfg["stage"]["gen"]
            settings = cls(max_words=int(data["max_words"]), sample_fps=float(data["sample_fps"]),
                           gen_schedule=str(gen["schedule"]), gen_timesteps=int(gen["timesteps"]),
                           corpus=str(data["corpus"]))
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a streamret run config (no {err}); point at a finished run dir") from None
        metrics = path.parent / "metrics.json"
        if cfg["data"].get("val_split") and metrics.is_file():  # chosen on validation, not the configured value
            alpha = json.loads(metrics.read_text()).get("rerank_alpha")
            settings.rerank_alpha = None if alpha is None else float(alpha)
        return settings

    @classmethod
    def locate(cls, folder: Path) -> "InferenceSettings":
        """The settings beside a model's weights: ``streamret.json`` (a bundle) or ``config.yaml`` (a run dir)."""
        if (folder / SETTINGS_FILE).is_file():
            return cls.read(folder / SETTINGS_FILE)
        if (folder / RUN_CONFIG_FILE).is_file():
            return cls.from_run_config(folder / RUN_CONFIG_FILE)
        raise FileNotFoundError(f"{folder} holds neither {SETTINGS_FILE} nor {RUN_CONFIG_FILE}: without them the "
                                "caption length, frame rate and noise schedule the model was trained with are "
                                "unknown; point at a finished run dir or a registered model")

    @classmethod
    def read(cls, path: Path) -> "InferenceSettings":
        saved = json.loads(path.read_text())
        missing = [f.name for f in fields(cls) if f.name not in saved and f.name != "rerank_alpha"]
        if missing:
            raise ValueError(f"{path}: no {', '.join(missing)}; re-register the model from its run dir")
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path


@dataclass
class ModelBundle:
    """Encoder (fp32, eval, frozen), generators (or None), their config and inference settings."""

    encoder: RetrievalEncoder
    generators: Generators | None
    model_config: ModelConfig
    max_frames: int
    settings: InferenceSettings
    source: str = ""

    def alphas_cumprod(self) -> torch.Tensor:
        """The generator's noise schedule (needed by re-ranking)."""
        return alphas_cumprod(self.settings.gen_schedule, self.settings.gen_timesteps)

    def to(self, device: torch.device) -> "ModelBundle":
        self.encoder.to(device)
        if self.generators is not None:
            self.generators.to(device)
        return self


def load_bundle_files(con_path: Path, gen_path: Path | None, settings: InferenceSettings,
                      source: str = "") -> ModelBundle:
    """Rebuild the models from stage exports, on CPU in fp32."""
    payload = load_export(Path(con_path))
    if payload.get("stage") != "con" or "max_frames" not in payload:
        raise ValueError(f"{con_path}: not a stage-con export (stage {payload.get('stage')!r}); "
                         "pass the run dir or its con.pt")
    model_config = ModelConfig(**payload["model_config"])
    max_frames = int(payload["max_frames"])
    encoder = build_encoder(model_config, max_frames)
    load_into(encoder.float(), payload, "encoder.", Path(con_path))
    encoder.requires_grad_(False).eval()
    generators = None
    if gen_path is not None:
        gen_payload = load_export(Path(gen_path))
        if gen_payload.get("stage") != "gen":
            raise ValueError(f"{gen_path}: not a stage-gen export (stage {gen_payload.get('stage')!r})")
        # An export from before model.gen_prior existed holds the reference's generator.
        generators = build_generators(ModelConfig(**{"gen_prior": False, **gen_payload["model_config"]}))
        load_into(generators.float(), gen_payload, "generators.", Path(gen_path))
        generators.requires_grad_(False).eval()
    return ModelBundle(encoder, generators, model_config, max_frames, settings, source or str(con_path))
