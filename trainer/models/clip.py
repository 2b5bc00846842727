"""The CLIP backbone: open_clip's ``CLIP`` built from our config, real weights from a local file.

``model=clip_b32`` is ViT-B/32; ``model=tiny`` is the same architecture, small. Nothing is ever
downloaded: ``model.weights`` must point at a file on disk.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from torch.nn.attention import SDPBackend, sdpa_kernel

from trainer.models.config import ModelConfig

# Keys in OpenAI's checkpoints that are metadata, not parameters.
_OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")


def attention_kernels(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """The scaled-dot-product-attention kernels for a forward pass on ``x``'s device: on the CPU the
    plain (math) one. CPU's fused flash kernel has a slow backward in bf16: model=tiny, batch 32 x 8
    frames, one thread, forward + backward per step: bf16 0.335 s fused vs 0.131 s math (the fused
    backward was 58 % of the step, 30 ms per attention call), fp32 0.219 vs 0.180 s. On CUDA the
    choice stays PyTorch's."""
    if x.device.type != "cpu":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def build_clip(cfg: ModelConfig) -> CLIP:
    vision = CLIPVisionCfg(
        layers=cfg.vision_layers,
        width=cfg.vision_width,
        head_width=cfg.vision_head_width,
        patch_size=cfg.patch_size,
        image_size=cfg.image_size,
    )
    text = CLIPTextCfg(
        context_length=cfg.context_length,
        vocab_size=cfg.vocab_size,
        width=cfg.text_width,
        heads=cfg.text_heads,
        layers=cfg.text_layers,
    )
    clip = CLIP(embed_dim=cfg.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=cfg.quick_gelu)
    if cfg.weights:
        load_clip_weights(clip, Path(cfg.weights))
    return clip


def read_clip_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read OpenAI's TorchScript archive (``ViT-B-32.pt``) or an open_clip / plain state dict."""
    if not path.is_file():
        raise FileNotFoundError(
            f"model.weights={path} does not exist. Point it at a local CLIP checkpoint (OpenAI's "
            "ViT-B-32.pt or an open_clip state dict); streamret never downloads weights."
        )
    try:
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
    except RuntimeError:  # not TorchScript: a pickled state dict
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict or a TorchScript CLIP, got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items() if k not in _OPENAI_META_KEYS}
    return {k: v.float() for k, v in state.items()}


def load_clip_weights(clip: CLIP, path: Path) -> None:
    state = read_clip_state_dict(path)
    own = clip.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if mismatched or missing or unexpected:
        detail = "; ".join(
            f"{name}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for name, keys in (("shape mismatch", mismatched), ("missing", missing), ("unexpected", unexpected))
            if keys
        )
        raise ValueError(
            f"{path} does not fit model={clip.visual.__class__.__name__} with this config ({detail}). "
            "Pick the model config that matches the checkpoint (e.g. model=clip_b32 for ViT-B-32.pt)."
        )
    clip.load_state_dict(state, strict=True)


def encode_words(clip: CLIP, ids: torch.Tensor) -> torch.Tensor:
    """Word features ``ln_final(x) @ text_projection`` at every position: [B, L, embed_dim].

    ``L = ids.shape[1]`` may be below CLIP's 77 positions (``max_words``); positions and the
    causal mask are cut to it.
    """
    length = ids.shape[1]
    x = clip.token_embedding(ids) + clip.positional_embedding[:length]
    x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
    x = clip.ln_final(x)
    return x @ clip.text_projection
