"""The model library on tiny random CLIPs: shapes, masking, weight loading, generator."""
import dataclasses

import pytest
import torch

from trainer.config import ModelConfig
from trainer.models import build_clip, build_encoder, build_generators, encode_words
from tests.support import TINY

# The reference's generator (method.md section 3, "+ a_c" and no stage-1 scores): what the equation tests pin.
REFERENCE_GEN = dataclasses.replace(TINY, gen_prior=False)



@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return build_encoder(TINY, max_frames=4).eval()


def test_word_features_at_eot_equal_clips_sentence_feature(encoder):
    ids = torch.randint(1, 1000, (3, 10))
    ids[:, -1] = 49407  # <eot>
    full = torch.zeros(3, 77, dtype=torch.long)
    full[:, :10] = ids
    words = encode_words(encoder.clip, ids)
    torch.testing.assert_close(words[:, -1], encoder.clip.encode_text(full), atol=1e-5, rtol=1e-5)


def test_padded_frames_do_not_change_real_frame_features(encoder):
    video = torch.randn(1, 4, 3, 32, 32)
    mask = torch.tensor([[True, True, False, False]])
    a = encoder.encode_video(video, mask)
    video2 = video.clone()
    video2[:, 2:] = torch.randn(1, 2, 3, 32, 32)  # different content in the padding
    b = encoder.encode_video(video2, mask)
    torch.testing.assert_close(a.frames[:, :2], b.frames[:, :2])
    assert torch.all(a.weights[:, 2:] == 0) and torch.allclose(a.weights.sum(-1), torch.ones(1))


def test_text_weights_are_a_softmax_over_real_words(encoder):
    ids = torch.randint(1, 1000, (2, 6))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    t = encoder.encode_text(ids, mask)
    assert torch.all(t.weights[0, 3:] == 0)
    torch.testing.assert_close(t.weights.sum(-1), torch.ones(2))
    torch.testing.assert_close(t.words.norm(dim=-1), torch.ones(2, 6))


def test_patch_embedding_frozen_by_provenance_and_clip_in_its_own_lr_group(encoder):
    # from scratch it is trained; fine-tuning pretrained weights freezes it (the reference's); a
    # set model.freeze_patch_embed wins either way
    assert encoder.clip.visual.conv1.weight.requires_grad
    assert dataclasses.replace(TINY, weights="clip.pt").freezes_patch_embed()
    assert not dataclasses.replace(TINY, weights="clip.pt", freeze_patch_embed=False).freezes_patch_embed()
    frozen = build_encoder(dataclasses.replace(TINY, freeze_patch_embed=True), max_frames=4)
    assert not frozen.clip.visual.conv1.weight.requires_grad
    assert id(frozen.clip.visual.conv1.weight) not in {id(p) for p in frozen.clip_parameters()}
    clip_ids = {id(p) for p in encoder.clip_parameters()}
    new = encoder.new_parameters()
    assert new and not clip_ids & {id(p) for p in new}
    assert id(encoder.logit_scale) in {id(p) for p in new}


def test_open_clip_state_dict_round_trip(tmp_path):
    torch.manual_seed(1)
    clip = build_clip(TINY)
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}}, path)
    loaded = build_clip(dataclasses.replace(TINY, weights=str(path)))
    image = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.encode_image(image), clip.encode_image(image))


def test_weights_that_do_not_fit_are_refused_with_the_fix(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(build_clip(dataclasses.replace(TINY, vision_width=64)).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit"):
        build_clip(dataclasses.replace(TINY, weights=str(path)))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        build_clip(dataclasses.replace(TINY, weights=str(tmp_path / "missing.pt")))


@pytest.mark.slow
def test_clip_b32_architecture_loads_a_saved_state_dict(tmp_path):
    cfg = ModelConfig(name="clip_b32")  # the dataclass defaults are ViT-B/32
    torch.manual_seed(0)
    clip = build_clip(cfg).eval()
    path = tmp_path / "b32.pt"
    torch.save(clip.state_dict(), path)
    loaded = build_clip(dataclasses.replace(cfg, weights=str(path))).eval()
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(image), clip.encode_image(image))


def test_generator_shapes_and_parameter_count():
    gens = build_generators(REFERENCE_GEN)
    b, k, f, d = 3, 5, 4, TINY.embed_dim
    mask = torch.ones(b, k, f, dtype=torch.bool)
    mask[:, :, -1] = False
    x_t, steps = torch.randn(b, k), torch.tensor([0, 3, 7])
    assert gens.t2v(torch.randn(b, d), torch.randn(b, k, f, d), mask, x_t, steps).shape == (b, k)
    assert gens.v2t(torch.randn(b, f, d), mask[:, 0], torch.randn(b, k, d), x_t, steps).shape == (b, k)
    # method.md: about 2.6 M parameters per direction at d = 512
    assert 2.5e6 < build_generators(ModelConfig(embed_dim=512)).num_parameters()["t2v"] < 2.7e6


def test_generator_is_permutation_equivariant_over_candidates():
    torch.manual_seed(0)
    gens = build_generators(REFERENCE_GEN).eval()
    b, k, f, d = 2, 6, 3, TINY.embed_dim
    text, frames = torch.randn(b, d), torch.randn(b, k, f, d)
    mask = torch.ones(b, k, f, dtype=torch.bool)
    x_t, steps = torch.randn(b, k), torch.tensor([1, 2])
    perm = torch.randperm(k)
    out = gens.t2v(text, frames, mask, x_t, steps)
    out_perm = gens.t2v(text, frames[:, perm], mask[:, perm], x_t[:, perm], steps)
    torch.testing.assert_close(out[:, perm], out_perm, atol=1e-5, rtol=1e-5)


def test_generator_masking_renormalises_over_real_frames():
    from trainer.models.generator import attend_frames

    q = torch.randn(2, 8, dtype=torch.float64)
    frames = torch.randn(2, 4, 8, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    got = attend_frames(q, frames, mask, tau=1.0)
    for i in range(2):
        real = frames[i, mask[i]]
        w = torch.softmax(real @ q[i], dim=0)
        torch.testing.assert_close(got[i], w @ real)


def test_generator_t2v_and_v2t_match_the_equations_of_method_section_3():
    """Both directions against a direct per-candidate computation in float64."""


    from trainer.models.generator import sinusoidal_embedding

    torch.manual_seed(0)
    d, k_cands, n_frames = 8, 3, 4
    gens = build_generators(dataclasses.replace(REFERENCE_GEN, embed_dim=d)).double().eval()
    text = torch.randn(1, d, dtype=torch.float64)
    frames = torch.randn(1, k_cands, n_frames, d, dtype=torch.float64)
    mask = torch.tensor([[[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]], dtype=torch.bool)
    x_t = torch.randn(1, k_cands, dtype=torch.float64)
    step = torch.tensor([7])
    g = gens.t2v
    e = g.time_mlp(sinusoidal_embedding(step, d).double())[0]
    pooled = []
    for c in range(k_cands):
        real = frames[0, c, mask[0, c]]
        w = torch.softmax(real @ text[0] / g.tau, dim=0)
        pooled.append(w @ real)
    q = g.wq(text[0] + e)
    logits = torch.stack([q @ g.wk(v + e) + x_t[0, c] for c, v in enumerate(pooled)])
    a = torch.softmax(logits, dim=0)
    h = g.wo(sum(a[c] * g.wv(v + e) for c, v in enumerate(pooled)))
    expected = torch.stack([g.decoder(torch.cat([h, v]))[0] + a[c] for c, v in enumerate(pooled)])
    torch.testing.assert_close(g(text, frames, mask, x_t, step)[0], expected)

    # v2t: candidate texts attend over the query video's frames
    g = gens.v2t
    video, vmask = frames[:, 0], mask[:, 0]
    cands = torch.randn(1, k_cands, d, dtype=torch.float64)
    e = g.time_mlp(sinusoidal_embedding(step, d).double())[0]
    real = video[0, vmask[0]]
    pooled = [torch.softmax(real @ t / g.tau, dim=0) @ real for t in cands[0]]
    logits = torch.stack([g.wq(v + e) @ g.wk(cands[0, c] + e) + x_t[0, c] for c, v in enumerate(pooled)])
    a = torch.softmax(logits, dim=0)
    h = g.wo(sum(a[c] * g.wv(cands[0, c] + e) for c in range(k_cands)))
    # The decoder's pair feature is the candidate sentence t_c (the reference decodes [h ; t_c]).
    expected = torch.stack([g.decoder(torch.cat([h, cands[0, c]]))[0] + a[c] for c in range(k_cands)])
    torch.testing.assert_close(g(video, vmask, cands, x_t, step)[0], expected)


def test_rerank_pools_once_and_matches_full_forward_every_step():
    """trainer.evaluation.scoring.rerank hoists the step-independent pooling out of the DDIM loop: its output
    must equal re-ranking with the generators' full forward at every step."""
    from ops.ddim import cosine_alphas_cumprod, rerank_topk
    from trainer.evaluation.scoring import rerank
    from trainer.components.features import FeatureBank

    torch.manual_seed(0)
    gens = build_generators(REFERENCE_GEN).eval()
    nt, nv, f, d = 7, 6, 3, TINY.embed_dim
    frame_mask = torch.ones(nv, f, dtype=torch.bool)
    frame_mask[::2, -1] = False
    sentence, frames = torch.randn(nt, d), torch.randn(nv, f, d)  # frames padded with noise: the bank stores zeros
    bank = FeatureBank.from_dense(words=torch.randn(nt, 4, d), word_weights=torch.rand(nt, 4),
                                  word_mask=torch.ones(nt, 4, dtype=torch.bool), sentence=sentence, frames=frames,
                                  frame_weights=torch.rand(nv, f), frame_mask=frame_mask,
                                  text_to_video=torch.arange(nt) % nv, video_ids=[], captions=[])
    sim, abar = torch.randn(nt, nv), cosine_alphas_cumprod(10)
    with torch.no_grad():
        t2v, v2t = rerank(sim, bank, gens, abar, topk=3, alpha=1.0, steps=5, seed=1)
        g = torch.Generator().manual_seed(1)
        ref_t2v = rerank_topk(sim, lambda q, c, s: lambda x, k: gens.t2v(sentence[q], frames[c], frame_mask[c], x, k),
                              abar, k=3, alpha=1.0, steps=5, generator=g)
        ref_v2t = rerank_topk(sim.t().contiguous(),
                              lambda q, c, s: lambda x, k: gens.v2t(frames[q], frame_mask[q], sentence[c], x, k),
                              abar, k=3, alpha=1.0, steps=5, generator=g)
    assert torch.equal(t2v, ref_t2v) and torch.equal(v2t, ref_v2t.t())
    assert not torch.equal(t2v, sim)  # the re-ranking did change the top-3 scores


def test_generator_inputs_are_the_raw_features(encoder):
    """method.md section 3: the generator takes the sentence feature and F' before L2 normalisation;
    the bank keeps the normalised tokens for WTI plus one norm per row, and gives both back."""
    import torch.nn.functional as F

    from trainer.components.features import FeatureBank
    from trainer.evaluation.scoring import rerank
    from ops.ddim import cosine_alphas_cumprod, rerank_topk

    torch.manual_seed(0)
    ids = torch.randint(1, 1000, (3, 6))
    ids[:, -1] = 49407
    mask = torch.ones(3, 6, dtype=torch.bool)
    text = encoder.encode_text(ids, mask)
    raw = encode_words(encoder.clip, ids)[:, -1]
    torch.testing.assert_close(text.raw_sentence(), raw, atol=1e-5, rtol=1e-5)
    assert float(raw.norm(dim=-1).min()) > 1.5  # far from unit norm here: normalising would change the inputs
    video = encoder.encode_video(torch.randn(2, 4, 3, 32, 32), torch.ones(2, 4, dtype=torch.bool))
    torch.testing.assert_close(F.normalize(video.raw_frames(), dim=-1), video.frames)

    gens = build_generators(REFERENCE_GEN).eval()
    nt, nv, f, d = 5, 4, 3, TINY.embed_dim
    sentence, frames = torch.randn(nt, d) * 3, torch.randn(nv, f, d) * 2
    frame_mask = torch.ones(nv, f, dtype=torch.bool)
    bank = FeatureBank.from_dense(words=torch.randn(nt, 4, d), word_weights=torch.rand(nt, 4),
                                  word_mask=torch.ones(nt, 4, dtype=torch.bool), sentence=F.normalize(sentence, dim=-1),
                                  frames=F.normalize(frames, dim=-1), frame_weights=torch.rand(nv, f),
                                  frame_mask=frame_mask, text_to_video=torch.arange(nt) % nv, video_ids=[], captions=[],
                                  sentence_norm=sentence.norm(dim=-1), frame_norm=frames.norm(dim=-1))
    sim, abar = torch.randn(nt, nv), cosine_alphas_cumprod(10)
    with torch.no_grad():
        t2v, _ = rerank(sim, bank, gens, abar, topk=3, alpha=1.0, steps=5, seed=1)
        ref = rerank_topk(sim, lambda q, c, s: lambda x, k: gens.t2v(sentence[q], frames[c], frame_mask[c], x, k),
                          abar, k=3, alpha=1.0, steps=5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(t2v, ref)


def test_a_prior_generator_predicts_a_residual_over_the_stage1_scores():
    """model.gen_prior: x0_hat[c] = MLP_dec([h ; v_c]) + beta * s_c (no "+ a_c"), the decoder's last
    layer zero at init: untrained, x0_hat is exactly beta * s; trained, it moves by beta per unit of s."""
    torch.manual_seed(0)
    gens = build_generators(TINY)
    gens.init_prior(logit_scale=20.0, kl_scale=100.0)
    assert gens.sharpness() == 100.0 and float(gens.t2v.prior_scale) == pytest.approx(0.2)
    b, k, f, d = 3, 5, 4, TINY.embed_dim
    text, frames, mask = torch.randn(b, d), torch.randn(b, k, f, d), torch.ones(b, k, f, dtype=torch.bool)
    x_t, steps, s = torch.randn(b, k), torch.tensor([0, 3, 7]), torch.rand(b, k)
    torch.testing.assert_close(gens.t2v(text, frames, mask, x_t, steps, s), 0.2 * s)
    torch.testing.assert_close(gens.v2t(frames[:, 0], mask[:, 0], text[:, None].expand(b, k, d), x_t, steps, s), 0.2 * s)
    torch.nn.init.normal_(gens.t2v.decoder[-1].weight)  # as if trained: the residual is no longer zero
    out = gens.t2v(text, frames, mask, x_t, steps, s)
    assert not torch.allclose(out, 0.2 * s)
    torch.testing.assert_close(gens.t2v(text, frames, mask, x_t, steps, s + 1.0) - out, torch.full((b, k), 0.2))
    with pytest.raises(ValueError, match="stage-1 scores"):
        gens.t2v(text, frames, mask, x_t, steps)


def test_an_untrained_prior_generator_leaves_the_stage1_ranking_unchanged():
    """Re-ranking with a generator that has learned nothing keeps every row's order (both directions)
    while adding its bonus; the reference's generator reorders at random."""
    from ops.ddim import cosine_alphas_cumprod
    from trainer.components.features import FeatureBank
    from trainer.evaluation.scoring import rerank

    torch.manual_seed(0)
    nt, nv, f, d = 12, 9, 3, TINY.embed_dim
    bank = FeatureBank.from_dense(words=torch.randn(nt, 4, d), word_weights=torch.rand(nt, 4),
                                  word_mask=torch.ones(nt, 4, dtype=torch.bool), sentence=torch.randn(nt, d),
                                  frames=torch.randn(nv, f, d), frame_weights=torch.rand(nv, f),
                                  frame_mask=torch.ones(nv, f, dtype=torch.bool), text_to_video=torch.arange(nt) % nv,
                                  video_ids=[], captions=[])
    sim, abar = torch.rand(nt, nv) * 2 - 1, cosine_alphas_cumprod(10)
    orders = {}
    for prior in (True, False):
        gens = build_generators(dataclasses.replace(TINY, gen_prior=prior)).eval()
        if prior:
            gens.init_prior(logit_scale=20.0, kl_scale=100.0)
        with torch.no_grad():
            t2v, v2t = rerank(sim, bank, gens, abar, topk=5, alpha=1.0, steps=5, seed=1)
        assert not torch.equal(t2v, sim) and not torch.equal(v2t, sim)
        orders[prior] = (torch.equal(t2v.argsort(dim=1), sim.argsort(dim=1))
                         and torch.equal(v2t.argsort(dim=0), sim.argsort(dim=0)))
    assert orders == {True: True, False: False}
