"""The on-disk feature bank: extracted from real shards part by part, read memory-mapped, equal to
the in-memory encoding, reused per key, resumed by part after a kill, never read half-written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shards.index import read_index
from shards.tokenize import CaptionTokenizer
from tests.support import TINY
from trainer.components import feature_store as store
from trainer.components.data import eval_loader
from trainer.components.distributed import DistInfo
from trainer.components.extraction import extract_split
from trainer.components.features import FeatureBank, Tokens, encode_split
from trainer.config import DataConfig
from trainer.models import build_encoder

ONE_RANK = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return build_encoder(TINY, max_frames=4).eval().requires_grad_(False)


def data_config(shards: Path) -> DataConfig:
    return DataConfig(shards=str(shards), max_frames=4, max_words=16, eval_batch_size=5, num_workers=0)


def extract(encoder, shards: Path, root: Path, dtype=torch.float32, loader_for=None, key=None, **kw) -> FeatureBank:
    data = data_config(shards)
    index = read_index(shards, "train")
    return extract_split(encoder, shard_names=[s["name"] for s in index["shards"]],
                         loader_for=loader_for or (lambda names: eval_loader(data, TINY, "train", names)),
                         max_words=16, shards_per_part=1, root=root, key=key or {"split": "train"}, dtype=dtype,
                         dist=ONE_RANK, desc="test", progress=False, total_samples=int(index["total_samples"]), **kw)


def same_bank(a: FeatureBank, b: FeatureBank, atol: float = 0.0) -> None:
    check = torch.equal if not atol else (lambda x, y: torch.allclose(x, y, atol=atol, rtol=0))
    ta, tb, va, vb = a.text(), b.text(), a.video(), b.video()
    assert torch.equal(ta.mask, tb.mask) and torch.equal(va.mask, vb.mask)
    for x, y in ((ta.words, tb.words), (ta.sentence, tb.sentence), (va.frames, vb.frames),
                 (a.raw_video()[0], b.raw_video()[0]), (a.raw_sentence(), b.raw_sentence())):
        assert check(x, y)
    assert check(ta.weights, tb.weights) and check(va.weights, vb.weights)
    assert torch.equal(a.text_to_video, b.text_to_video)
    assert a.video_ids == b.video_ids and a.captions == b.captions


def test_tokens_store_real_tokens_and_read_back_zero_padded_for_any_index_shape():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 4, 3, generator=g), torch.rand(5, 4, generator=g)
    lengths = torch.tensor([4, 1, 3, 2, 4])
    mask = torch.arange(4) < lengths[:, None]
    tokens = Tokens.from_padded(x, w, mask)
    assert tokens.x.shape == (14, 3) and len(tokens) == 5  # 14 real tokens of 20 cells
    got_x, got_w, got_mask = tokens.read()
    assert torch.equal(got_mask, mask) and torch.equal(got_x, x * mask[..., None]) and torch.equal(got_w, w * mask)
    idx = torch.tensor([[4, 1], [1, 0]])
    px, _, pm = tokens.read(idx)
    assert px.shape == (2, 2, 4, 3) and torch.equal(px[0, 0], x[4]) and torch.equal(pm[1], mask[[1, 0]])
    with pytest.raises(ValueError, match="prefix"):
        Tokens.from_padded(x, w, torch.tensor([[True, False, True, True]] * 5))


def test_extracted_bank_equals_the_in_memory_encoding_and_is_memory_mapped(encoder, synthetic_shards, tmp_path):
    bank = extract(encoder, synthetic_shards, tmp_path / "bank")
    data = data_config(synthetic_shards)
    memory = encode_split(encoder, eval_loader(data, TINY, "train"), CaptionTokenizer(16), torch.device("cpu"),
                          torch.float32, "memory", progress=False)
    # Encoded in other batches (part by part): BLAS need not be batch-invariant (frames differ by
    # 7e-8 on an AMD EPYC, not at all on the Xeons before it), so equal up to float rounding.
    same_bank(bank, memory, atol=1e-5)
    assert bank.num_videos == 24 and bank.num_texts == memory.num_texts
    index = json.loads((tmp_path / "bank" / "index.json").read_text())
    assert [p["shards"] for p in index["parts"]] == [[s["name"]] for s in read_index(synthetic_shards, "train")["shards"]]
    assert not (tmp_path / "bank" / "parts").exists()  # parts are folded into one file per field
    assert isinstance(np.load(tmp_path / "bank" / "words.npy", mmap_mode="r"), np.memmap)
    # pooled features for mining's first stage: stored, equal to the computed ones
    pooled = FeatureBank(bank.text_tokens, bank.sentence, bank.video_tokens, bank.text_to_video, [], []).pooled_video()
    torch.testing.assert_close(bank.pooled_video(), pooled, atol=1e-6, rtol=0)


def test_a_complete_bank_is_reused_and_another_key_is_encoded(encoder, synthetic_shards, tmp_path):
    first = extract(encoder, synthetic_shards, tmp_path / "bank")

    def refuse(names):
        raise AssertionError(f"a complete bank was encoded again ({names})")

    same_bank(extract(encoder, synthetic_shards, tmp_path / "bank", loader_for=refuse), first)
    calls = []
    data = data_config(synthetic_shards)
    extract(encoder, synthetic_shards, tmp_path / "bank", key={"split": "train", "encoder": "other"},
            loader_for=lambda names: calls.append(names) or eval_loader(data, TINY, "train", names))
    assert len(calls) == 4  # the key changed: every part encoded again


def test_a_killed_extraction_resumes_by_part_and_a_half_written_bank_is_never_read(encoder, synthetic_shards, tmp_path):
    data = data_config(synthetic_shards)
    names = [s["name"] for s in read_index(synthetic_shards, "train")["shards"]]

    def dies_on_third_part(shards):
        if shards == [names[2]]:
            raise KeyboardInterrupt("killed")
        return eval_loader(data, TINY, "train", shards)

    with pytest.raises(KeyboardInterrupt):
        extract(encoder, synthetic_shards, tmp_path / "bank", loader_for=dies_on_third_part)
    done = sorted(p.name for p in (tmp_path / "bank" / "parts").iterdir())
    assert done == ["00000", "00001"] and not (tmp_path / "bank" / "index.json").exists()
    with pytest.raises(FileNotFoundError, match="index.json"):
        store.open_bank(tmp_path / "bank", torch.device("cpu"))
    calls = []
    bank = extract(encoder, synthetic_shards, tmp_path / "bank",
                   loader_for=lambda shards: calls.append(shards) or eval_loader(data, TINY, "train", shards))
    assert calls == [[names[2]], [names[3]]]  # only the parts the kill left undone
    same_bank(bank, extract(encoder, synthetic_shards, tmp_path / "fresh"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_banks_are_close_and_half_the_size(encoder, synthetic_shards, tmp_path, dtype):
    full = extract(encoder, synthetic_shards, tmp_path / "fp32")
    half = extract(encoder, synthetic_shards, tmp_path / "half", dtype=dtype)
    assert half.text_tokens.x.dtype == dtype and half.text_tokens.weights.dtype == torch.float32
    tol = 4e-3 if dtype == torch.bfloat16 else 5e-4
    assert (half.text().words - full.text().words).abs().max() < tol
    assert (half.raw_video()[0] - full.raw_video()[0]).abs().max() < tol * full.raw_video()[0].abs().max()
    assert (tmp_path / "half" / "words.npy").stat().st_size < 0.55 * (tmp_path / "fp32" / "words.npy").stat().st_size


def test_store_dtype_names_are_checked():
    assert store.store_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="float16"):
        store.store_dtype("fp8")


def test_stage_gen_reads_the_disk_bank_as_it_read_the_in_memory_one(encoder, synthetic_shards, tmp_path):
    """Same pools, same loss for the same seed: what makes stage gen's figures those of the in-memory bank."""
    from ops import alphas_cumprod
    from trainer.models import build_generators
    from trainer.stages.gen import GenerationTask, sample_pairs
    from trainer.stages.pools import TopKPools, pool_scores

    disk = extract(encoder, synthetic_shards, tmp_path / "bank")
    memory = encode_split(encoder, eval_loader(data_config(synthetic_shards), TINY, "train"), CaptionTokenizer(16),
                          torch.device("cpu"), torch.float32, "memory", progress=False)
    pools = [TopKPools(encoder, bank, pool=4) for bank in (disk, memory)]
    assert torch.equal(pools[0].t2v, pools[1].t2v) and torch.equal(pools[0].v2t_negatives, pools[1].v2t_negatives)
    losses = []
    for bank, topk in zip((disk, memory), pools):
        torch.manual_seed(0)
        task = GenerationTask(build_generators(TINY), alphas_cumprod("cosine", 10), "kl", 100.0)
        pool = topk.sample(*sample_pairs(bank, 8, torch.Generator().manual_seed(1)))
        losses.append(task(bank, *pool, pool_scores(encoder, bank, pool))[0])
    assert torch.equal(losses[0], losses[1])
