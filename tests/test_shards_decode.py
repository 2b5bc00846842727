"""Frame index sampling, in-memory decord decoding, CLIP preprocessing and caption tokens."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from shards.decode import CLIP_MEAN, CLIP_STD, ClipTransform, decode_frames, sample_frame_indices
from shards.tokenize import CaptionTokenizer


def test_indices_one_fps_then_linspace() -> None:
    # 10 s at 30 fps, 1 fps sampling -> one frame per second
    idx = sample_frame_indices(300, 30.0, max_frames=12)
    assert idx.tolist() == [0, 30, 60, 90, 120, 150, 180, 210, 240, 270]
    # 100 s: 100 candidates thinned uniformly to 12, first and last kept
    idx = sample_frame_indices(3000, 30.0, max_frames=12)
    assert len(idx) == 12 and idx[0] == 0 and idx[-1] == 2970
    assert np.all(np.diff(idx) > 0)


def test_indices_window_and_never_empty() -> None:
    idx = sample_frame_indices(300, 30.0, max_frames=12, start=2.0, end=5.0)
    assert idx.tolist() == [60, 90, 120]
    # window shorter than one sampling step, and a window past the end: still one frame
    assert sample_frame_indices(300, 30.0, 12, start=4.2, end=4.3).tolist() == [126]
    assert sample_frame_indices(300, 30.0, 12, start=50.0, end=60.0).tolist() == [299]
    assert sample_frame_indices(1, 8.0, 12).tolist() == [0]
    assert sample_frame_indices(16, 8.0, 12, sample_fps=4.0).tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    with pytest.raises(ValueError, match="no frames"):
        sample_frame_indices(0, 8.0, 12)


def test_decode_frames_from_bytes(clip_maker, tmp_path) -> None:
    data = clip_maker(tmp_path / "bar.mp4", frames=16, size=32).read_bytes()
    seen = []

    def indices(n: int, fps: float) -> np.ndarray:
        seen.append((n, fps))
        return np.array([0, 15, 99])  # 99 is past the end: clipped to the last frame

    frames = decode_frames(data, indices)
    assert seen == [(16, 8.0)]
    assert frames.shape == (3, 32, 32, 3) and frames.dtype == np.uint8
    # the bright bar sits at the left in frame 0 and at the right in frame 15
    col = frames[:, 16].mean(axis=(-1))  # [T, W] brightness across a row
    assert col[0, :4].mean() > 150 and col[0, -4:].mean() < 100
    assert col[1, -4:].mean() > 150 and col[1, :4].mean() < 100
    np.testing.assert_array_equal(frames[1], frames[2])


def test_clip_transform_shapes_mask_and_normalisation() -> None:
    frames = np.zeros((3, 48, 64, 3), dtype=np.uint8)
    frames[..., 0] = 255  # pure red
    video, mask = ClipTransform(32)(frames, max_frames=5)
    assert video.shape == (5, 3, 32, 32) and video.dtype == torch.float32
    assert mask.tolist() == [True, True, True, False, False]
    assert torch.all(video[3:] == 0)
    expected = [(1 - CLIP_MEAN[0]) / CLIP_STD[0], -CLIP_MEAN[1] / CLIP_STD[1], -CLIP_MEAN[2] / CLIP_STD[2]]
    torch.testing.assert_close(video[:3].mean(dim=(0, 2, 3)), torch.tensor(expected), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="max_frames"):
        ClipTransform(32)(frames, max_frames=2)


def test_clip_transform_centre_crops_the_long_side() -> None:
    frames = np.zeros((1, 32, 96, 3), dtype=np.uint8)
    frames[:, :, 32:64] = 255  # white centre third, black sides
    video, _ = ClipTransform(32)(frames)
    white = (1 - CLIP_MEAN[0]) / CLIP_STD[0]
    assert video.shape == (1, 3, 32, 32)
    assert abs(video[0, 0, :, 8:24].mean().item() - white) < 1e-3  # the crop is the white centre


def test_tokenizer_pads_truncates_and_keeps_eot() -> None:
    tok = CaptionTokenizer(max_words=8)
    ids, mask = tok(["a red square", "one two three four five six seven eight nine ten", ""])
    assert ids.shape == mask.shape == (3, 8) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids[0, 0] == tok.sot_id and ids[0, 4] == tok.eot_id and ids[0, 5:].tolist() == [0, 0, 0]
    assert mask[0].tolist() == [True] * 5 + [False] * 3
    assert ids[1, 0] == tok.sot_id and ids[1, -1] == tok.eot_id and mask[1].all()
    assert (ids[1] == tok.eot_id).sum() == 1
    assert ids[2, :2].tolist() == [tok.sot_id, tok.eot_id] and mask[2].sum() == 2
    with pytest.raises(TypeError, match="list"):
        tok("a bare string")


def test_crop_ships_uint8_and_normalise_matches_the_float_formula() -> None:
    frames = np.random.default_rng(0).integers(0, 256, size=(3, 40, 40, 3), dtype=np.uint8)
    transform = ClipTransform(32)
    video, mask = transform.crop(frames, max_frames=5)
    assert video.shape == (5, 3, 32, 32) and video.dtype == torch.uint8
    assert mask.tolist() == [True, True, True, False, False] and torch.all(video[3:] == 0)
    # normalise over a batch [B, T, ...] with its mask: (x / 255 - mean) / std, padded frames exactly 0
    batch, batch_mask = torch.stack([video, video]), torch.stack([mask, torch.ones(5, dtype=torch.bool)])
    out = transform.normalise(batch, batch_mask)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    expected = (batch.float() / 255.0 - mean) / std
    expected[0, 3:] = 0.0
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    # the one-call form is crop + normalise
    full, full_mask = transform(frames, max_frames=5)
    torch.testing.assert_close(full, out[0])
    assert torch.equal(full_mask, mask)
    with pytest.raises(ValueError, match="uint8"):
        transform.normalise(batch.float(), batch_mask)


def test_uint8_resize_is_close_to_float_bicubic() -> None:
    """The uint8 channels-last resize differs from the float bicubic reference by rounding only."""
    rng = np.random.default_rng(1)
    coarse = rng.integers(0, 256, size=(2, 3, 12, 16)).astype(np.float32)  # 8x8 blocks: sharp edges to resize
    frames = torch.from_numpy(np.kron(coarse, np.ones((1, 1, 8, 8), np.float32))).to(torch.uint8)  # [2,3,96,128]
    video, _ = ClipTransform(48).crop(frames.permute(0, 2, 3, 1).numpy())
    ref = torch.nn.functional.interpolate(frames.float(), size=(48, 64), mode="bicubic", antialias=True,
                                          align_corners=False).clamp(0, 255)[..., 8:56]  # centre crop 48 of 64
    diff = (video.float() - ref).abs()
    assert video.shape == (2, 3, 48, 48)
    assert diff.mean().item() < 0.6 and diff.max().item() <= 10, (diff.mean().item(), diff.max().item())


def test_loader_workers_ship_uint8_and_batches_come_out_normalised(synthetic_shards) -> None:
    """Through DataLoader workers the video travels as uint8; the batch must still equal the stream's own
    per-sample float preprocessing."""
    from shards.loader import build_loader
    from shards.stream import ShardStream

    def make() -> ShardStream:
        return ShardStream(synthetic_shards, "test", max_frames=3, image_size=16, training=False)

    reference = {x["key"]: x for x in make()}
    assert next(iter(reference.values()))["frames"].dtype == torch.float32
    seen = 0
    for batch in build_loader(make(), batch_size=4, max_words=8, num_workers=1, training=False, seed=0):
        assert batch["video"].dtype == torch.float32 and batch["video"].shape[1:] == (3, 3, 16, 16)
        for key, video, mask in zip(batch["key"], batch["video"], batch["video_mask"]):
            torch.testing.assert_close(video, reference[key]["frames"], atol=1e-6, rtol=0)
            assert torch.equal(mask, reference[key]["frame_mask"])
            seen += 1
    assert seen == len(reference) == 12


def test_trainer_loader_ships_uint8_and_video_to_device_normalises_it(synthetic_shards) -> None:
    """normalise=False (as trainer.components.data builds loaders): video stays uint8 and video_to_device turns it
    into exactly what normalise=True yields, in the model's dtype; float input only moves."""
    from shards.decode import video_to_device
    from shards.loader import build_loader
    from shards.stream import ShardStream

    def batches(normalise: bool) -> list[dict]:
        stream = ShardStream(synthetic_shards, "test", max_frames=3, image_size=16, training=False)
        return list(build_loader(stream, batch_size=4, max_words=8, num_workers=1, training=False, seed=0,
                                 normalise=normalise))

    raw, normalised = batches(False), batches(True)
    assert len(raw) == len(normalised) == 3
    cpu = torch.device("cpu")
    for r, n in zip(raw, normalised):
        assert r["video"].dtype == torch.uint8 and r["key"] == n["key"]
        assert torch.equal(video_to_device(r["video"], r["video_mask"], cpu, torch.float32), n["video"])
        as_bf16 = video_to_device(r["video"], r["video_mask"], cpu, torch.bfloat16)
        assert as_bf16.dtype == torch.bfloat16 and torch.equal(as_bf16, n["video"].to(torch.bfloat16))
        assert torch.equal(video_to_device(n["video"], n["video_mask"], cpu, torch.float32), n["video"])
        padded = ~r["video_mask"]
        if padded.any():
            assert not video_to_device(r["video"], r["video_mask"], cpu, torch.float32)[padded].any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_video_to_device_on_cuda_matches_cpu() -> None:
    """uint8 crosses to the GPU and is normalised there: the same numbers as on the host."""
    from shards.decode import video_to_device

    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (2, 3, 3, 8, 8), generator=g, dtype=torch.uint8)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    host = video_to_device(video, mask, torch.device("cpu"), torch.float32)
    on_gpu = video_to_device(video, mask, torch.device("cuda"), torch.bfloat16)
    assert on_gpu.is_cuda and on_gpu.dtype == torch.bfloat16
    torch.testing.assert_close(on_gpu.float().cpu(), host, atol=2e-2, rtol=1e-2)  # bf16 rounding
    assert not on_gpu[~mask.cuda()].any()
