"""The model's architecture as a plain dataclass: what ``build_encoder`` / ``build_generators``
take. Its defaults are CLIP ViT-B/32's (method.md section 1); ``conf/model/tiny.yaml`` states
what the tiny test/default-job architecture changes. No Hydra here: the model library is driven
from Python without the trainer."""
from __future__ import annotations

from dataclasses import dataclass


SCRATCH_LOGIT_SCALE = 1 / 0.07
PRETRAINED_LOGIT_SCALE = 100.0


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
    # exp(logit_scale) at init; 0 = by provenance: 100, the reference's, when fine-tuning
    # pretrained weights; 1/0.07 (CLIP's own init) from scratch, where 100 makes the loss at init
    # (random, spread-out similarities x 100) far above chance, so that the first steps collapse the
    # similarities to equal -- loss ln(pool) -- before learning anything.
    logit_scale_init: float = 0.0
    logit_scale_max: float = 100.0
    # None = by provenance: frozen when fine-tuning pretrained weights (the reference's), trained
    # from scratch, where a frozen random patch embedding is a random projection of every 16x16
    # patch that nothing learns to undo (README "Learning": val t2v R@1 +5.5 / +0.8 at 720 steps
    # on the two generated corpora, mean of 2 seeds).
    freeze_patch_embed: bool | None = None
    gen_tau: float = 1.0  # text-frame attention temperature inside the generator
    # The generator predicts a residual over each candidate's stage-1 score (generator.py): one
    # that learned nothing leaves the ranking as stage 1 has it. false = the reference's formulation.
    gen_prior: bool = True
    # LAFF (method.md section 5): fuse several video features (raw CLIP frames, temporal frames,
    # token-weighted frames) and text features (<eot>, token-weighted words) per head; its cosine
    # similarity (mean over heads) is added to WTI's, and the loss is summed per head.
    laff: bool = False
    laff_dim: int = 2048
    laff_heads: int = 8

    def freezes_patch_embed(self) -> bool:
        return bool(self.weights) if self.freeze_patch_embed is None else self.freeze_patch_embed

    def initial_logit_scale(self) -> float:
        if self.logit_scale_init:
            return self.logit_scale_init
        return PRETRAINED_LOGIT_SCALE if self.weights else SCRATCH_LOGIT_SCALE
