"""Frozen-encoder features of a whole split: what evaluation scores and stage gen trains on.

One row per caption (texts) and one per video; ``text_to_video`` maps each caption to its video.
Token features (words, frames) are held ragged, real tokens only (:class:`Tokens`), and padded
back with zeros on read: every consumer masks padded cells (WTI sets them to 0, the generator
excludes them before its softmax), so this is exact, and it stores ~3x fewer word rows on
MSRVTT (9.3 real tokens of 32 on average). A bank lives in memory (:func:`encode_split`) or
memory-mapped on disk (``trainer.components.feature_store``); reads are the same.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from tqdm import tqdm

from shards.decode import video_to_device
from shards.tokenize import CaptionTokenizer
from trainer.models import RetrievalEncoder, TextFeatures, VideoFeatures

Index = torch.Tensor | slice


def _positions(idx: Index, n: int) -> torch.Tensor:
    return torch.arange(n)[idx] if isinstance(idx, slice) else idx


@dataclass
class Tokens:
    """Variable-length token features of N items, flat: item i's real tokens are rows
    ``offsets[i]:offsets[i+1]`` of ``x`` (and of ``weights``, ``norm``); read back padded to ``width``."""

    x: torch.Tensor  # [R, D]
    weights: torch.Tensor  # [R] fp32
    offsets: torch.Tensor  # [N + 1] long
    width: int
    norm: torch.Tensor | None = None  # [R] L2 norm of the raw token (None: x is used as it is)

    @classmethod
    def from_padded(cls, x: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor,
                    norm: torch.Tensor | None = None) -> "Tokens":
        """From [N, L, D] features whose mask [N, L] marks a prefix of each row (the tokenizer's and
        the clip sampler's layout)."""
        lengths = mask.sum(1)
        if not torch.equal(mask, torch.arange(mask.shape[1], device=mask.device) < lengths[:, None]):
            raise ValueError("Tokens.from_padded: every mask row must be a prefix (real tokens first, then padding)")
        return cls(x[mask], weights[mask].float(), cls.offsets_of(lengths), int(mask.shape[1]),
                   None if norm is None else norm[mask].float())

    @staticmethod
    def offsets_of(lengths: torch.Tensor) -> torch.Tensor:
        """[N + 1] long: where each of N items of ``lengths`` tokens starts in the flat rows, and the end."""
        return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).long()

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    def lengths(self, idx: Index = slice(None)) -> torch.Tensor:
        pos = _positions(idx, len(self)).to(self.offsets.device)
        return self.offsets[pos + 1] - self.offsets[pos]

    def read(self, idx: Index = slice(None), raw: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x [*idx, L, D] fp32 with zeros at padding, weights [*idx, L], mask [*idx, L]) of the items
        ``idx`` (a slice or a long tensor of any shape); ``raw``: x times its norm (before L2 normalisation)."""
        pos = _positions(idx, len(self)).to(self.offsets.device)
        flat = pos.reshape(-1)
        start = self.offsets[flat]
        mask = torch.arange(self.width, device=start.device) < (self.offsets[flat + 1] - start)[:, None]
        rows = (start[:, None] + torch.arange(self.width, device=start.device))[mask]
        x = torch.zeros(flat.shape[0], self.width, self.x.shape[1], dtype=torch.float32, device=self.x.device)
        values = self.x[rows.to(self.x.device)].float()
        if raw and self.norm is not None:
            values = values * self.norm[rows.to(self.norm.device)].float()[:, None]
        x[mask.to(x.device)] = values
        weights = torch.zeros(flat.shape[0], self.width, dtype=torch.float32, device=self.weights.device)
        weights[mask.to(weights.device)] = self.weights[rows.to(self.weights.device)].float()
        shape = tuple(pos.shape)
        return x.view(*shape, self.width, -1), weights.view(*shape, self.width), mask.view(*shape, self.width)


@dataclass
class FeatureBank:
    text_tokens: Tokens  # words: Nt items
    sentence: torch.Tensor  # [Nt, D] L2-normalised
    video_tokens: Tokens  # frames F': Nv items
    text_to_video: torch.Tensor  # [Nt] long
    video_ids: list[str]
    captions: list[str]
    text_fused: torch.Tensor | None = None  # [Nt, H, d] LAFF heads (model.laff)
    video_fused: torch.Tensor | None = None  # [Nv, H, d]
    # The L2 norm of the raw sentence (None: the normalised one is used as it is). The generator
    # takes raw features (method.md section 3); a norm per row keeps one copy of the tokens.
    sentence_norm: torch.Tensor | None = None  # [Nt]
    video_pooled: torch.Tensor | None = None  # [Nv, D] frame-weighted mean, L2-normalised (mining's first stage)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where reads are returned

    @classmethod
    def from_dense(cls, *, words, word_weights, word_mask, sentence, frames, frame_weights, frame_mask, text_to_video,
                   video_ids, captions, text_fused=None, video_fused=None, sentence_norm=None,
                   frame_norm=None) -> "FeatureBank":
        """From padded [N, L, D] token features (what the encoder returns)."""
        return cls(Tokens.from_padded(words, word_weights, word_mask), sentence,
                   Tokens.from_padded(frames, frame_weights, frame_mask, frame_norm), text_to_video, video_ids, captions,
                   text_fused, video_fused, sentence_norm, device=sentence.device)

    @property
    def num_videos(self) -> int:
        return len(self.video_tokens)

    @property
    def num_texts(self) -> int:
        return len(self.text_tokens)

    def _out(self, x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.to(self.device, non_blocking=True)

    def _rows(self, table: torch.Tensor | None, idx: Index) -> torch.Tensor | None:
        if table is None:
            return None
        return self._out(table[idx if isinstance(idx, slice) else idx.to(table.device)].float())

    def text(self, idx: Index = slice(None)) -> TextFeatures:
        words, weights, mask = (self._out(t) for t in self.text_tokens.read(idx))
        return TextFeatures(words, weights, mask, self._rows(self.sentence, idx), self._rows(self.text_fused, idx))

    def video(self, idx: Index = slice(None)) -> VideoFeatures:
        frames, weights, mask = (self._out(t) for t in self.video_tokens.read(idx))
        return VideoFeatures(frames, weights, mask, self._rows(self.video_fused, idx))

    def raw_sentence(self, idx: Index = slice(None)) -> torch.Tensor:
        """[*idx, D] the sentence features before L2 normalisation (the generator's query text)."""
        sentence = self._rows(self.sentence, idx)
        return sentence if self.sentence_norm is None else sentence * self._rows(self.sentence_norm, idx)[..., None]

    def raw_video(self, idx: Index = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """(F' [*idx, Lf, D] before L2 normalisation, frame mask [*idx, Lf]): what the generator attends over."""
        frames, _, mask = self.video_tokens.read(idx, raw=True)
        return self._out(frames), self._out(mask)

    def pooled_video(self, idx: Index = slice(None)) -> torch.Tensor:
        """[*idx, D] each video's frame-weighted mean feature, L2-normalised (stored, or computed)."""
        if self.video_pooled is not None:
            return self._rows(self.video_pooled, idx)
        frames, weights, mask = self.video_tokens.read(idx)
        return self._out(VideoFeatures(frames, weights, mask).pooled())

    def pooled_table(self) -> torch.Tensor:
        """[Nv, D] ``pooled_video`` of every video as stored (memory-mapped: read block by block by
        ``ops.pooled_topk``), or computed once when the bank has none."""
        if self.video_pooled is None:
            self.video_pooled = torch.cat([self.pooled_video(slice(i, i + 4096)).cpu()
                                           for i in range(0, self.num_videos, 4096)])
        return self.video_pooled

    def caption_table(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(caption ids ordered by video, first position of each video's captions, captions per video)."""
        if getattr(self, "_caption_table", None) is None:
            t2v = self.text_to_video.cpu()
            counts = torch.bincount(t2v, minlength=self.num_videos)
            self._caption_table = (torch.argsort(t2v, stable=True), torch.cumsum(counts, 0) - counts, counts)
        return self._caption_table

    def random_caption_of(self, videos: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One caption index per video, uniformly among that video's captions."""
        order, starts, counts = self.caption_table()
        pick = (torch.rand(len(videos), generator=generator) * counts[videos]).long()
        return order[starts[videos] + pick].to(self.text_to_video.device)


def limited(loader, max_captions: int):
    """The loader's batches until ``max_captions`` captions were yielded (bounds querybank decoding)."""
    seen = 0
    for batch in loader:
        yield batch
        seen += sum(len(c) for c in batch["captions"])
        if seen >= max_captions:
            return


@dataclass
class EncodedBatch:
    """One loader batch through the frozen encoder."""

    text: TextFeatures
    video: VideoFeatures
    video_ids: list[str]
    captions: list[list[str]]  # per video


@torch.no_grad()
def encoded_batches(encoder: RetrievalEncoder, loader, tokenizer: CaptionTokenizer, device: torch.device,
                    dtype: torch.dtype, desc: str, progress: bool = True) -> Iterator[EncodedBatch]:
    """Every video and every caption of an eval-mode loader through the (frozen) encoder, batch by batch."""
    encoder.eval()
    for batch in tqdm(loader, desc=desc, disable=not progress, unit="batch"):
        video = encoder.encode_video(video_to_device(batch["video"], batch["video_mask"], device, dtype),
                                     batch["video_mask"].to(device))
        ids, mask = tokenizer([c for caps in batch["captions"] for c in caps])
        yield EncodedBatch(encoder.encode_text(ids.to(device), mask.to(device)), video, list(batch["video_id"]),
                           [list(c) for c in batch["captions"]])


def encode_split(encoder: RetrievalEncoder, loader, tokenizer: CaptionTokenizer, device: torch.device,
                 dtype: torch.dtype, desc: str, progress: bool = True,
                 store_dtype: torch.dtype = torch.float32) -> FeatureBank:
    """Encode every video and every caption of an eval-mode loader into memory (evaluation of one
    split on one process; a run's banks go to disk instead: ``feature_store.extract_split``)."""
    texts, videos, text_to_video, video_ids, captions = [], [], [], [], []
    for b in encoded_batches(encoder, loader, tokenizer, device, dtype, desc, progress):
        texts.append(b.text)
        videos.append(b.video)
        for video_id, caps in zip(b.video_ids, b.captions):
            text_to_video.extend([len(video_ids)] * len(caps))
            video_ids.append(video_id)
            captions.extend(caps)
    if not videos:
        raise RuntimeError(f"{desc}: the split yielded no samples; check its shards and quarantine log")

    def cat(items, name):
        return None if getattr(items[0], name) is None else torch.cat([getattr(x, name) for x in items])

    return FeatureBank.from_dense(
        words=cat(texts, "words").to(store_dtype), word_weights=cat(texts, "weights"), word_mask=cat(texts, "mask"),
        sentence=cat(texts, "sentence").to(store_dtype), frames=cat(videos, "frames").to(store_dtype),
        frame_weights=cat(videos, "weights"), frame_mask=cat(videos, "mask"),
        text_to_video=torch.tensor(text_to_video, device=device), video_ids=video_ids, captions=captions,
        text_fused=cat(texts, "fused"), video_fused=cat(videos, "fused"), sentence_norm=cat(texts, "sentence_norm"),
        frame_norm=cat(videos, "frame_norm"))
