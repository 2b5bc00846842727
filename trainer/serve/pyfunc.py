"""The MLflow pyfunc face of a :class:`~trainer.serve.bundle.ModelBundle` (what the registry logs).

``predict`` takes a DataFrame or a dict of equal-length columns:

- ``text`` only: list of captions -> list of L2-normalised sentence embeddings (lists of floats);
- ``video`` only: mp4 bytes or uint8 frame arrays ``[T, H, W, 3]`` -> list of video embeddings
  (the frame features pooled by the model's own frame weights, L2-normalised);
- ``text`` and ``video``: pairs -> list of stage-1 WTI scores, one per row.
"""
from __future__ import annotations

import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch

from shards.decode import ClipTransform, decode_frames, sample_frame_indices
from shards.tokenize import CaptionTokenizer
from trainer.models import RetrievalEncoder, TextFeatures, VideoFeatures
from trainer.serve.bundle import InferenceSettings, load_bundle_files

# predict takes several input shapes (see above), so it has no type hints for MLflow to validate.
warnings.filterwarnings("ignore", message=r".*type hints to the `predict` method.*", category=UserWarning)


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
                                        InferenceSettings.read(Path(artifacts["settings"])), source="mlflow pyfunc")
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
        return self.encode_video(video).pooled().tolist()
