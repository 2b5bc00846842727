"""The dual encoder of stage ``con`` (method.md sections 1-2): CLIP frames and words, a temporal
transformer over frames, token weights, and the WTI similarity.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn

from ops import wti_paired, wti_similarity
from trainer.models.config import ModelConfig
from trainer.models.clip import attention_kernels, encode_words
from trainer.models.laff import LAFF, multihead_similarity


@dataclass
class TextFeatures:
    words: torch.Tensor  # [B, Lw, D] L2-normalised
    weights: torch.Tensor  # [B, Lw] softmax over real words, 0 at padding
    mask: torch.Tensor  # [B, Lw] bool
    sentence: torch.Tensor  # [B, D] L2-normalised word feature at <eot>
    fused: torch.Tensor | None = None  # [B, H, d] LAFF heads (model.laff)
    fusion_weights: torch.Tensor | None = None  # [B, H, k] LAFF attention over the k text features
    sentence_norm: torch.Tensor | None = None  # [B] L2 norm of the raw <eot> feature (the generator's input)

    def raw_sentence(self) -> torch.Tensor:
        """The sentence feature before L2 normalisation (method.md section 3: the generator's t)."""
        return self.sentence if self.sentence_norm is None else self.sentence * self.sentence_norm[..., None]


@dataclass
class VideoFeatures:
    frames: torch.Tensor  # [B, Lf, D] L2-normalised F'
    weights: torch.Tensor  # [B, Lf]
    mask: torch.Tensor  # [B, Lf] bool
    fused: torch.Tensor | None = None  # [B, H, d] LAFF heads (model.laff)
    fusion_weights: torch.Tensor | None = None  # [B, H, k] LAFF attention over the k video features
    frame_norm: torch.Tensor | None = None  # [B, Lf] L2 norm of each raw F' frame (the generator's input)

    def raw_frames(self) -> torch.Tensor:
        """F' before L2 normalisation (method.md section 3: what the generator attends over)."""
        return self.frames if self.frame_norm is None else self.frames * self.frame_norm[..., None]

    def pooled(self) -> torch.Tensor:
        """[..., D] the frame-weighted mean of F', L2-normalised: one vector per video (the served
        video embedding, and stage gen's first mining stage)."""
        return F.normalize(torch.einsum("...f,...fd->...d", self.weights.float(), self.frames.float()), dim=-1)


# The features LAFF fuses, in order (their attention weights are logged under these names).
VIDEO_FUSION_INPUTS = ("clip_frames", "temporal_frames", "weighted_frames")
TEXT_FUSION_INPUTS = ("eot", "weighted_words")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(-2) / m.sum(-2).clamp(min=1)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)


def token_weight_mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))


class TemporalTransformer(nn.Module):
    """F' = Transformer(F + P) + F, initialised from CLIP's text blocks and positions, not causal,
    padded frames masked out of attention."""

    def __init__(self, clip: CLIP, layers: int, max_frames: int):
        super().__init__()
        width = clip.transformer.width
        if layers > len(clip.transformer.resblocks):
            raise ValueError(f"temporal_layers={layers} but CLIP's text tower has only "
                             f"{len(clip.transformer.resblocks)} blocks to initialise from")
        if max_frames > clip.positional_embedding.shape[0]:
            raise ValueError(f"max_frames={max_frames} exceeds the {clip.positional_embedding.shape[0]} "
                             "CLIP text positions the frame positions are initialised from")
        self.heads = clip.transformer.resblocks[0].attn.num_heads
        self.position = nn.Parameter(clip.positional_embedding.detach()[:max_frames].clone())
        self.blocks = nn.ModuleList(copy.deepcopy(clip.transformer.resblocks[i]) for i in range(layers))
        self.width = width

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = frames.shape
        x = frames + self.position[:t].to(frames.dtype)
        # Key padding as an additive [B*heads, T, T] mask: the blocks only take attn_mask.
        pad = torch.zeros(b, 1, 1, t, dtype=frames.dtype, device=frames.device)
        pad = pad.masked_fill(~mask[:, None, None, :], float("-inf"))
        attn_mask = pad.expand(b, self.heads, t, t).reshape(b * self.heads, t, t)
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)
        return x + frames


class RetrievalEncoder(nn.Module):
    """Texts and videos -> token features, token weights, WTI similarity."""

    def __init__(self, clip: CLIP, cfg: ModelConfig, max_frames: int):
        super().__init__()
        self.clip = clip
        if cfg.text_width != cfg.embed_dim:
            raise ValueError("the temporal transformer is initialised from the text blocks, so "
                             f"model.text_width ({cfg.text_width}) must equal model.embed_dim ({cfg.embed_dim})")
        self.temporal = TemporalTransformer(clip, cfg.temporal_layers, max_frames)
        self.text_weight = token_weight_mlp(cfg.embed_dim, cfg.weight_mlp_hidden)
        self.video_weight = token_weight_mlp(cfg.embed_dim, cfg.weight_mlp_hidden)
        # Shape [1], not a scalar: DeepSpeed broadcasts parameters as bytes, which 0-d bf16 cannot be.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(cfg.initial_logit_scale())))
        self.logit_scale_max = cfg.logit_scale_max
        self.laff_video = self.laff_text = None
        if cfg.laff:
            d = cfg.embed_dim
            self.laff_video = LAFF([d] * len(VIDEO_FUSION_INPUTS), cfg.laff_dim, cfg.laff_heads)
            self.laff_text = LAFF([d] * len(TEXT_FUSION_INPUTS), cfg.laff_dim, cfg.laff_heads)
        # CLIP's own 0-d logit scale is unused (ours is above); drop it: DeepSpeed broadcasts
        # parameters as bytes, which a 0-d bf16 tensor cannot be viewed as.
        clip.logit_scale = None
        if cfg.freezes_patch_embed():
            clip.visual.conv1.requires_grad_(False)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> TextFeatures:
        with attention_kernels(ids):
            words = encode_words(self.clip, ids)
        eot = ids.argmax(dim=-1)  # <eot> has the largest id in CLIP's vocabulary
        sentence = words[torch.arange(ids.shape[0], device=ids.device), eot]
        weights = masked_softmax(self.text_weight(words).squeeze(-1).float(), mask)
        fused = fusion = None
        if self.laff_text is not None:
            weighted = torch.einsum("bl,bld->bd", weights.to(words.dtype), words)
            fused, fusion = self.laff_text([sentence, weighted])
        # Normalised in fp32 whatever the model's dtype: early in training from scratch the features
        # are nearly parallel, and bf16 unit vectors (8-bit mantissa) round away the differences
        # between candidates that the loss needs to see.
        words, sentence = words.float(), sentence.float()
        return TextFeatures(F.normalize(words, dim=-1), weights, mask, F.normalize(sentence, dim=-1), fused, fusion,
                            sentence.norm(dim=-1))

    def encode_video(self, video: torch.Tensor, mask: torch.Tensor) -> VideoFeatures:
        b, t = video.shape[:2]
        with attention_kernels(video):
            clip_frames = self.clip.encode_image(video.flatten(0, 1)).view(b, t, -1)
            frames = self.temporal(clip_frames, mask)
        weights = masked_softmax(self.video_weight(frames).squeeze(-1).float(), mask)
        fused = fusion = None
        if self.laff_video is not None:
            weighted = torch.einsum("bf,bfd->bd", weights.to(frames.dtype), frames)
            fused, fusion = self.laff_video([masked_mean(clip_frames, mask), masked_mean(frames, mask), weighted])
        frames = frames.float()  # normalised in fp32, as the words are
        return VideoFeatures(F.normalize(frames, dim=-1), weights, mask, fused, fusion, frames.norm(dim=-1))

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.logit_scale_max)

    @staticmethod
    def similarity(text: TextFeatures, video: VideoFeatures, block: int = 128) -> torch.Tensor:
        """s [Nt, Nv]: WTI in fp32 blocks (ops.wti_similarity), plus LAFF's mean-over-heads cosine
        when the features carry fused heads."""
        sim = wti_similarity(text.words.float(), text.weights, text.mask,
                             video.frames.float(), video.weights, video.mask, block=block)
        if text.fused is not None and video.fused is not None:
            sim = sim + multihead_similarity(text.fused.float(), video.fused.float())[0]
        return sim

    @staticmethod
    def paired_similarity(text: TextFeatures, video: VideoFeatures) -> torch.Tensor:
        """s [n, k] of paired items, one side [n, k, ...] and the other [n, ...] (a query and its k
        candidates): ``similarity``'s formula, pair by pair (ops.wti_paired)."""
        sim = wti_paired(text.words.float(), text.weights, text.mask, video.frames.float(), video.weights, video.mask)
        if text.fused is not None and video.fused is not None:
            t, v = F.normalize(text.fused.float(), dim=-1), F.normalize(video.fused.float(), dim=-1)
            t = t[:, None] if t.dim() == 3 else t
            v = v[:, None] if v.dim() == 3 else v
            sim = sim + (t * v).sum(-1).mean(-1)
        return sim

    def clip_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.clip.parameters() if p.requires_grad]

    def new_parameters(self) -> list[nn.Parameter]:
        clip_ids = {id(p) for p in self.clip.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in clip_ids]
