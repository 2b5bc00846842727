"""Frozen-encoder features of a whole split: what evaluation scores and stage gen trains on.

One row per caption (texts) and one per video; ``text_to_video`` maps each caption to its video.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from tqdm import tqdm

from shards.decode import video_to_device
from trainer.components.export import safe_load
from shards.tokenize import CaptionTokenizer
from trainer.models import RetrievalEncoder, TextFeatures, VideoFeatures


@dataclass
class FeatureBank:
    words: torch.Tensor  # [Nt, Lw, D]
    word_weights: torch.Tensor  # [Nt, Lw]
    word_mask: torch.Tensor  # [Nt, Lw]
    sentence: torch.Tensor  # [Nt, D]
    frames: torch.Tensor  # [Nv, Lf, D]
    frame_weights: torch.Tensor  # [Nv, Lf]
    frame_mask: torch.Tensor  # [Nv, Lf]
    text_to_video: torch.Tensor  # [Nt] long
    video_ids: list[str]
    captions: list[str]
    text_fused: torch.Tensor | None = None  # [Nt, H, d] LAFF heads (model.laff)
    video_fused: torch.Tensor | None = None  # [Nv, H, d]
    # L2 norms of the raw features (None: the normalised ones are used as they are). The generator
    # takes raw features (method.md section 3); storing a norm per row keeps one copy of the tokens.
    sentence_norm: torch.Tensor | None = None  # [Nt]
    frame_norm: torch.Tensor | None = None  # [Nv, Lf]

    @property
    def num_videos(self) -> int:
        return self.frames.shape[0]

    def text(self, idx: torch.Tensor | slice = slice(None)) -> TextFeatures:
        fused = None if self.text_fused is None else self.text_fused[idx]
        return TextFeatures(self.words[idx].float(), self.word_weights[idx], self.word_mask[idx],
                            self.sentence[idx].float(), fused)

    def video(self, idx: torch.Tensor | slice = slice(None)) -> VideoFeatures:
        fused = None if self.video_fused is None else self.video_fused[idx]
        return VideoFeatures(self.frames[idx].float(), self.frame_weights[idx], self.frame_mask[idx], fused)

    def raw_sentence(self, idx: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """[n, D] the sentence features before L2 normalisation (the generator's query text)."""
        sentence = self.sentence[idx].float()
        return sentence if self.sentence_norm is None else sentence * self.sentence_norm[idx, None].float()

    def raw_frames(self, idx: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """[..., Lf, D] F' before L2 normalisation (what the generator attends over)."""
        frames = self.frames[idx].float()
        return frames if self.frame_norm is None else frames * self.frame_norm[idx][..., None].float()

    def random_caption_of(self, videos: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One caption index per video, uniformly among that video's captions."""
        order = torch.argsort(self.text_to_video, stable=True)
        counts = torch.bincount(self.text_to_video, minlength=self.num_videos)
        starts = torch.cumsum(counts, 0) - counts
        pick = (torch.rand(len(videos), generator=generator) * counts[videos]).long()
        return order[starts[videos] + pick]

    def to(self, device: torch.device) -> "FeatureBank":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return FeatureBank(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in moved.items()})


def limited(loader, max_captions: int):
    """The loader's batches until ``max_captions`` captions were yielded (bounds querybank decoding)."""
    seen = 0
    for batch in loader:
        yield batch
        seen += sum(len(c) for c in batch["captions"])
        if seen >= max_captions:
            return


@torch.no_grad()
def encode_split(encoder: RetrievalEncoder, loader, tokenizer: CaptionTokenizer, device: torch.device,
                 dtype: torch.dtype, desc: str, progress: bool = True,
                 store_dtype: torch.dtype = torch.float32) -> FeatureBank:
    """Encode every video and every caption of an eval-mode loader with the (frozen) encoder."""
    encoder.eval()
    texts: list[TextFeatures] = []
    videos: list[VideoFeatures] = []
    text_to_video: list[int] = []
    video_ids: list[str] = []
    captions: list[str] = []
    for batch in tqdm(loader, desc=desc, disable=not progress, unit="batch"):
        videos.append(encoder.encode_video(video_to_device(batch["video"], batch["video_mask"], device, dtype),
                                           batch["video_mask"].to(device)))
        for video_id, caps in zip(batch["video_id"], batch["captions"]):
            text_to_video.extend([len(video_ids)] * len(caps))
            video_ids.append(video_id)
            captions.extend(caps)
        ids, mask = tokenizer([c for caps in batch["captions"] for c in caps])
        texts.append(encoder.encode_text(ids.to(device), mask.to(device)))
    if not videos:
        raise RuntimeError(f"{desc}: the split yielded no samples; check its shards and quarantine log")

    def cat(items, name):
        if getattr(items[0], name) is None:
            return None
        return torch.cat([getattr(x, name) for x in items])

    return FeatureBank(
        words=cat(texts, "words").to(store_dtype), word_weights=cat(texts, "weights").float(),
        word_mask=cat(texts, "mask"), sentence=cat(texts, "sentence").to(store_dtype),
        frames=cat(videos, "frames").to(store_dtype), frame_weights=cat(videos, "weights").float(),
        frame_mask=cat(videos, "mask"), text_to_video=torch.tensor(text_to_video, device=device),
        video_ids=video_ids, captions=captions, text_fused=cat(texts, "fused"), video_fused=cat(videos, "fused"),
        sentence_norm=cat(texts, "sentence_norm"), frame_norm=cat(videos, "frame_norm"),
    )


def cached_encode_split(cache_dir: Path | None, key: dict, encode) -> FeatureBank:
    """``encode()`` once per ``key`` (the encoder weights' identity + the data that was encoded):
    later calls with the same key load the saved bank instead of decoding video again."""
    if cache_dir is None:
        return encode()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"features-{digest}.pt"
    if path.is_file():
        return FeatureBank(**safe_load(path))
    bank = encode()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # every rank may write it; each its own temp file
    torch.save({f.name: getattr(bank, f.name) for f in fields(bank)}, tmp)
    os.replace(tmp, path)
    (cache_dir / f"features-{digest}.json").write_text(json.dumps(key, indent=2, sort_keys=True))
    return bank
