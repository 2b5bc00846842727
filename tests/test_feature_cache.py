"""Stage gen's feature cache: encoded once per (encoder, data) key, reloaded exactly after that."""
import torch

from trainer.components.features import FeatureBank, cached_encode_split


def tiny_bank(seed: int) -> FeatureBank:
    g = torch.Generator().manual_seed(seed)
    return FeatureBank(words=torch.randn(4, 3, 2, generator=g), word_weights=torch.rand(4, 3, generator=g),
                       word_mask=torch.ones(4, 3, dtype=torch.bool), sentence=torch.randn(4, 2, generator=g),
                       frames=torch.randn(2, 5, 2, generator=g), frame_weights=torch.rand(2, 5, generator=g),
                       frame_mask=torch.ones(2, 5, dtype=torch.bool), text_to_video=torch.tensor([0, 0, 1, 1]),
                       video_ids=["a", "b"], captions=["w", "x", "y", "z"])


def test_cache_encodes_once_per_key_and_reloads_exactly(tmp_path):
    calls = []

    def encode(seed):
        calls.append(seed)
        return tiny_bank(seed)

    key = {"encoder": {"path": "/r/con.pt", "size": 1, "mtime_ns": 2}, "split": "train"}
    first = cached_encode_split(tmp_path, key, lambda: encode(0))
    again = cached_encode_split(tmp_path, key, lambda: encode(1))
    assert calls == [0] and torch.equal(again.words, first.words) and again.video_ids == ["a", "b"]
    other = cached_encode_split(tmp_path, dict(key, split="val"), lambda: encode(2))
    assert calls == [0, 2] and not torch.equal(other.words, first.words)
    assert cached_encode_split(None, key, lambda: encode(3)) is not None and calls[-1] == 3  # cache off
