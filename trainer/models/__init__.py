"""The model library: importable and usable without the trainer (no Hydra, Ray or MLflow)."""
from trainer.models.config import ModelConfig
from trainer.models.clip import build_clip, encode_words, load_clip_weights, read_clip_state_dict
from trainer.models.encoder import RetrievalEncoder, TextFeatures, VideoFeatures
from trainer.models.generator import Generators, TextToVideoGenerator, VideoToTextGenerator


def build_encoder(cfg: ModelConfig, max_frames: int) -> RetrievalEncoder:
    """CLIP (random, or ``cfg.weights`` from disk) + temporal transformer + token weights."""
    return RetrievalEncoder(build_clip(cfg), cfg, max_frames)


def build_generators(cfg: ModelConfig) -> Generators:
    return Generators(cfg.embed_dim, cfg.gen_tau, cfg.gen_prior)


__all__ = [
    "Generators", "RetrievalEncoder", "TextFeatures", "TextToVideoGenerator", "VideoFeatures",
    "VideoToTextGenerator", "build_clip", "build_encoder", "build_generators", "encode_words",
    "load_clip_weights", "read_clip_state_dict",
]
