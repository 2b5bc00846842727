"""A trained streamret model as one loadable bundle, and as an MLflow pyfunc model.

A bundle is the stage exports (``con.pt``, optionally ``gen.pt``) plus ``streamret.json``: the
few data settings inference needs to turn raw captions and videos into model inputs exactly as
training did (max_words, max_frames, sample_fps) and the diffusion schedule the generator was
trained with (``gen.pt`` itself does not carry it).

:class:`StreamretPyfunc` is what ``trainer.registry`` logs. ``predict`` takes a DataFrame or a
dict of equal-length columns:

- ``text`` only: list of captions -> list of L2-normalised sentence embeddings (lists of floats);
- ``video`` only: mp4 bytes or uint8 frame arrays ``[T, H, W, 3]`` -> list of video embeddings
  (the frame features pooled by the model's own frame weights, L2-normalised);
- ``text`` and ``video``: pairs -> list of stage-1 WTI scores, one per row.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import mlflow.pyfunc
from shards.decode import ClipTransform, decode_frames, sample_frame_indices
from shards.tokenize import CaptionTokenizer
from trainer.checkpoint import load_export, load_into
from trainer.config import DataConfig, GenConfig, ModelConfig
from trainer.models import Generators, RetrievalEncoder, TextFeatures, VideoFeatures, build_encoder, build_generators

SETTINGS_FILE = "streamret.json"

# predict takes several input shapes (see above), so it has no type hints for MLflow to validate.
warnings.filterwarnings("ignore", message=r".*type hints to the `predict` method.*", category=UserWarning)


@dataclass
class InferenceSettings:
    """What a bundle needs besides weights; defaults are trainer.config's."""

    max_words: int = DataConfig.max_words
    sample_fps: float = DataConfig.sample_fps
    gen_schedule: str = GenConfig.schedule
    gen_timesteps: int = GenConfig.timesteps
    corpus: str = DataConfig.corpus

    @classmethod
    def from_run_config(cls, path: Path) -> "InferenceSettings":
        """Read ``<run_dir>/config.yaml`` (written at the end of a run); defaults when absent."""
        if not path.is_file():
            return cls()
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        data, gen = cfg.get("data", {}), cfg.get("stage", {}).get("gen", {})
        return cls(max_words=int(data.get("max_words", cls.max_words)),
                   sample_fps=float(data.get("sample_fps", cls.sample_fps)),
                   gen_schedule=str(gen.get("schedule", cls.gen_schedule)),
                   gen_timesteps=int(gen.get("timesteps", cls.gen_timesteps)),
                   corpus=str(data.get("corpus", cls.corpus)))

    @classmethod
    def read(cls, path: Path) -> "InferenceSettings":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(path.read_text()).items() if k in known})

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
    settings: InferenceSettings = field(default_factory=InferenceSettings)
    source: str = ""

    def alphas_cumprod(self) -> torch.Tensor:
        """The generator's noise schedule (needed by re-ranking)."""
        from trainer.stages.gen import alphas_cumprod

        return alphas_cumprod(self.settings.gen_schedule, self.settings.gen_timesteps)

    def to(self, device: torch.device) -> "ModelBundle":
        self.encoder.to(device)
        if self.generators is not None:
            self.generators.to(device)
        return self


def load_bundle_files(con_path: Path, gen_path: Path | None = None, settings_path: Path | None = None,
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
        gen_payload = torch.load(gen_path, map_location="cpu", weights_only=False)
        if gen_payload.get("stage") != "gen":
            raise ValueError(f"{gen_path}: not a stage-gen export (stage {gen_payload.get('stage')!r})")
        generators = build_generators(ModelConfig(**gen_payload["model_config"]))
        load_into(generators.float(), gen_payload, "generators.", Path(gen_path))
        generators.requires_grad_(False).eval()
    settings = InferenceSettings.read(settings_path) if settings_path and Path(settings_path).is_file() \
        else InferenceSettings()
    return ModelBundle(encoder, generators, model_config, max_frames, settings, source or str(con_path))


def _columns(model_input: Any) -> dict[str, list]:
    """DataFrame / dict of columns / list of row dicts -> {column: list}."""
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):
        return {str(c): list(model_input[c]) for c in model_input.columns}
    if isinstance(model_input, dict):
        cols = {}
        for key, value in model_input.items():
            one = isinstance(value, (str, bytes)) or (isinstance(value, np.ndarray) and value.ndim == 4)
            cols[key] = [value] if one else list(value)  # a single caption / video becomes a column of one
        return cols
    if isinstance(model_input, list) and model_input and isinstance(model_input[0], dict):
        return {k: [row[k] for row in model_input] for k in model_input[0]}
    raise TypeError(f"streamret predict: expected a DataFrame or a dict with 'text' and/or 'video' columns, "
                    f"got {type(model_input).__name__}")


def _row(features, i: int):
    """Row ``i`` of a TextFeatures / VideoFeatures, as a batch of one."""
    return type(features)(**{f.name: None if getattr(features, f.name) is None else getattr(features, f.name)[i:i + 1]
                             for f in fields(features)})


class StreamretPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc wrapper around a :class:`ModelBundle` (see the module docstring for ``predict``)."""

    def load_context(self, context) -> None:
        artifacts = context.artifacts
        self.bundle = load_bundle_files(Path(artifacts["con"]), Path(artifacts["gen"]) if "gen" in artifacts else None,
                                        Path(artifacts["settings"]), source="mlflow pyfunc")
        self.tokenizer = CaptionTokenizer(self.bundle.settings.max_words)
        self.transform = ClipTransform(self.bundle.model_config.image_size)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> TextFeatures:
        ids, mask = self.tokenizer([str(c) for c in captions])
        return self.bundle.encoder.encode_text(ids, mask)

    def video_tensor(self, video: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """mp4 bytes or uint8 frames [T, H, W, 3] -> ([max_frames, 3, S, S], [max_frames] mask)."""
        max_frames, fps = self.bundle.max_frames, self.bundle.settings.sample_fps
        if isinstance(video, (bytes, bytearray, memoryview)):
            frames = decode_frames(bytes(video), lambda n, f: sample_frame_indices(n, f, max_frames, fps))
        else:
            frames = np.asarray(video, dtype=np.uint8)
            if frames.ndim != 4 or frames.shape[-1] != 3:
                raise ValueError(f"streamret predict: a video must be mp4 bytes or uint8 frames [T, H, W, 3], "
                                 f"got an array of shape {frames.shape}")
            if frames.shape[0] > max_frames:  # thin uniformly, like sample_frame_indices does
                frames = frames[np.linspace(0, frames.shape[0] - 1, max_frames).round().astype(np.int64)]
        return self.transform(frames, max_frames)

    @torch.no_grad()
    def encode_video(self, videos: list) -> VideoFeatures:
        pairs = [self.video_tensor(v) for v in videos]
        video = torch.stack([p[0] for p in pairs])
        mask = torch.stack([p[1] for p in pairs])
        return self.bundle.encoder.encode_video(video, mask)

    def predict(self, context, model_input, params: dict | None = None) -> list:
        cols = _columns(model_input)
        text, video = cols.get("text"), cols.get("video")
        if text is None and video is None:
            raise ValueError(f"streamret predict: input needs a 'text' and/or 'video' column; got {sorted(cols)}")
        if text is not None and video is not None:
            if len(text) != len(video):
                raise ValueError(f"streamret predict: {len(text)} texts but {len(video)} videos; pairs need equal counts")
            t, v = self.encode_text(text), self.encode_video(video)
            scores = [RetrievalEncoder.similarity(_row(t, i), _row(v, i))[0, 0] for i in range(len(text))]
            return [float(s) for s in scores]
        if text is not None:
            return self.encode_text(text).sentence.float().tolist()
        v = self.encode_video(video)
        pooled = F.normalize(torch.einsum("bf,bfd->bd", v.weights, v.frames.float()), dim=-1)
        return pooled.tolist()
