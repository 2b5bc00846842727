"""The model's architecture as a plain dataclass: what ``build_encoder`` / ``build_generators``
take. Its defaults are CLIP ViT-B/32's (method.md section 1); ``conf/model/tiny.yaml`` states
what the tiny test/default-job architecture changes. No Hydra here: the model library is driven
from Python without the trainer."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    name: str = "clip_b32"
    weights: str = ""  # local CLIP checkpoint (OpenAI JIT or open_clip state dict); "" = random init
    embed_dim: int = 512
    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    vision_head_width: int = 64
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    context_length: int = 77
    vocab_size: int = 49408
    quick_gelu: bool = True  # OpenAI weights were trained with QuickGELU
    temporal_layers: int = 4
    weight_mlp_hidden: int = 1024
    logit_scale_init: float = 100.0
    logit_scale_max: float = 100.0
    freeze_patch_embed: bool = True
    gen_tau: float = 1.0  # text-frame attention temperature inside the generator
    # LAFF (method.md section 5): fuse several video features (raw CLIP frames, temporal frames,
    # token-weighted frames) and text features (<eot>, token-weighted words) per head; its cosine
    # similarity (mean over heads) is added to WTI's, and the loss is summed per head.
    laff: bool = False
    laff_dim: int = 2048
    laff_heads: int = 8
