"""Stage gen's task on cached features: the loss trains the generators and nothing else."""
import torch

from tests.support import TINY
from trainer.components.features import FeatureBank
from trainer.models import build_encoder, build_generators
from ops import alphas_cumprod
from trainer.stages.gen import GenerationTask, sample_pairs, stage1_similarity
from trainer.stages.pools import GalleryPools, TopKPools, pool_scores, reference_pools


def bank_from_encoder(encoder, n_videos=6, frames=4, words=6) -> FeatureBank:
    torch.manual_seed(0)
    ids = torch.randint(1, 1000, (2 * n_videos, words))
    ids[:, -1] = 49407
    with torch.no_grad():
        t = encoder.encode_text(ids, torch.ones_like(ids, dtype=torch.bool))
        v = encoder.encode_video(torch.randn(n_videos, frames, 3, 32, 32), torch.ones(n_videos, frames, dtype=torch.bool))
    return FeatureBank.from_dense(words=t.words, word_weights=t.weights, word_mask=t.mask, sentence=t.sentence,
                                  frames=v.frames, frame_weights=v.weights, frame_mask=v.mask,
                                  text_to_video=torch.arange(n_videos).repeat_interleave(2),
                                  video_ids=[str(i) for i in range(n_videos)], captions=[""] * (2 * n_videos))


def test_gradient_reaches_only_the_generators():
    encoder = build_encoder(TINY, max_frames=4).requires_grad_(False).eval()
    bank = bank_from_encoder(encoder)
    gens = build_generators(TINY)
    task = GenerationTask(gens, alphas_cumprod("cosine", 10), "kl", 100.0)
    rng = torch.Generator().manual_seed(0)
    text_idx, video_idx = sample_pairs(bank, 4, rng)
    assert len(set(video_idx.tolist())) == 4 and torch.equal(bank.text_to_video[text_idx], video_idx)
    sim = stage1_similarity(encoder, bank, text_idx, video_idx)
    pools = reference_pools(sim, text_idx, video_idx, torch.arange(4), 4, video_idx)
    loss, parts = task(bank, *pools, pool_scores(encoder, bank, pools))
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {"loss_t2v", "loss_v2t"}
    assert all(p.grad is not None for p in gens.parameters())
    assert all(p.grad is None for p in encoder.parameters())
    assert not sim.requires_grad


def test_a_ranks_queries_draw_pools_from_the_whole_global_batch():
    encoder = build_encoder(TINY, max_frames=4).requires_grad_(False).eval()
    bank = bank_from_encoder(encoder)
    task = GenerationTask(build_generators(TINY), alphas_cumprod("linear", 5), "mse", 100.0)
    # a global batch of 6 pairs where this rank owns pairs 3..5; video 1 appears twice (two ranks drew it)
    video_idx = torch.tensor([0, 1, 2, 1, 4, 5])
    text_idx = torch.tensor([0, 2, 4, 3, 8, 10])
    sim = stage1_similarity(encoder, bank, text_idx, video_idx)
    pools = reference_pools(sim, text_idx, video_idx, torch.tensor([3, 4, 5]), 5, video_idx)
    loss, _ = task(bank, *pools, pool_scores(encoder, bank, pools))
    assert torch.isfinite(loss)


def test_topk_pools_are_each_querys_top_candidates_over_the_whole_bank():
    """stage.gen.mode=topk trains on what re-ranking sees: a caption's pool is its video and the
    stage-1 top videos of the whole train bank; a video's pool is one of its captions and the best
    captions of other videos (never another caption of its own)."""
    encoder = build_encoder(TINY, max_frames=4).requires_grad_(False).eval()
    bank = bank_from_encoder(encoder, n_videos=8)
    pools = TopKPools(encoder, bank, pool=4)
    sim = encoder.similarity(bank.text(), bank.video())
    for t in range(sim.shape[0]):
        own = int(bank.text_to_video[t])
        ranked = [v for v in sim[t].argsort(descending=True).tolist() if v != own]
        assert pools.t2v[t].tolist() == [own] + ranked[:3]
    for v in range(bank.num_videos):
        others = [c for c in sim[:, v].argsort(descending=True).tolist() if int(bank.text_to_video[c]) != v]
        assert pools.v2t_negatives[v].tolist() == others[:3]
    texts, videos = sample_pairs(bank, 5, torch.Generator().manual_seed(0))
    t2v_q, t2v_c, v2t_q, v2t_c = pools.sample(texts, videos)
    assert torch.equal(t2v_c[:, 0], bank.text_to_video[texts]) and torch.equal(bank.text_to_video[v2t_c[:, 0]], videos)
    task = GenerationTask(build_generators(TINY), alphas_cumprod("cosine", 5), "kl", 100.0)
    loss, _ = task(bank, t2v_q, t2v_c, v2t_q, v2t_c, pool_scores(encoder, bank, (t2v_q, t2v_c, v2t_q, v2t_c)))
    assert torch.isfinite(loss)


def test_gallery_pools_are_each_querys_top_candidates_within_a_random_gallery():
    """stage.gen.mode=gallery: a caption's pool is its video and its stage-1 best among G - 1 distinct
    random other videos; a video's pool one of its captions and its best among distinct captions of
    other videos. The draws come from the pair sampler's generator: the same state, the same pools."""
    encoder = build_encoder(TINY, max_frames=4).requires_grad_(False).eval()
    bank = bank_from_encoder(encoder, n_videos=10)
    sim = encoder.similarity(bank.text(), bank.video())
    texts, videos = sample_pairs(bank, 6, torch.Generator().manual_seed(0))
    rng = torch.Generator().manual_seed(3)
    pools = GalleryPools(encoder, bank, pool=4, gallery=6, generator=rng)
    assert (pools.gallery, pools.pool, pools.caption_draws) == (6, 4, 10)  # (G - 1) x 2 captions per video
    state = rng.get_state()
    rivals = pools._other_videos(bank.text_to_video[texts])
    captions = pools._other_captions(videos)
    rng.set_state(state)
    t2v_q, t2v_c, v2t_q, v2t_c = pools.sample(texts, videos)
    for i, t in enumerate(texts.tolist()):
        own, drawn = int(bank.text_to_video[t]), rivals[i].tolist()
        assert len(set(drawn)) == 5 and own not in drawn
        assert t2v_c[i].tolist() == [own] + sorted(drawn, key=lambda v: -float(sim[t, v]))[:3]
    for i, v in enumerate(videos.tolist()):
        drawn = captions[i].tolist()
        assert len(set(drawn)) == 10 and all(int(bank.text_to_video[c]) != v for c in drawn)
        assert v2t_c[i].tolist() == [int(texts[i])] + sorted(drawn, key=lambda c: -float(sim[c, v]))[:3]
    rng.set_state(state)
    again, scores = pools.scored(texts, videos)
    assert all(torch.equal(a, b) for a, b in zip(again, (t2v_q, t2v_c, v2t_q, v2t_c)))
    # the scores that picked the pools are the ones a prior generator is given (pool_scores)
    for got, expected in zip(scores, pool_scores(encoder, bank, again)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.equal(pools.sample(texts, videos)[1], t2v_c)  # the next step draws other galleries


def test_a_prior_generators_first_loss_is_stage1s_own_cross_entropy_over_the_pool():
    """With model.gen_prior, beta starts at logit scale / kl_scale: before any step the kl loss is the
    cross-entropy of stage 1's logits over each pool, so the generator starts where stage 1 is."""
    encoder = build_encoder(TINY, max_frames=4).requires_grad_(False).eval()
    bank = bank_from_encoder(encoder, n_videos=8)
    gens = build_generators(TINY)
    gens.init_prior(float(encoder.scale()), kl_scale=100.0)
    task = GenerationTask(gens, alphas_cumprod("cosine", 10), "kl", 100.0)
    texts, videos = sample_pairs(bank, 5, torch.Generator().manual_seed(0))
    pools = GalleryPools(encoder, bank, pool=4, gallery=8, generator=torch.Generator().manual_seed(1)).sample(texts, videos)
    scores = pool_scores(encoder, bank, pools)
    _, parts = task(bank, *pools, scores)
    zero = torch.zeros(5, dtype=torch.long)  # the positive is column 0 of every pool
    for direction, s in zip(("t2v", "v2t"), scores):
        expected = torch.nn.functional.cross_entropy(float(encoder.scale()) * s, zero)
        assert abs(parts[f"loss_{direction}"] - float(expected)) < 1e-5


def test_gallery_pools_from_the_dense_similarity_equal_the_per_step_scored_ones(monkeypatch):
    """A train bank small enough has its whole stage-1 similarity computed once and pools look their
    scores up; a larger one scores each step's draws (paired WTI). Same draws, same pools and scores."""
    import trainer.stages.pools as pools_module

    encoder = build_encoder(TINY, max_frames=4).requires_grad_(False).eval()
    bank = bank_from_encoder(encoder, n_videos=12)
    texts, videos = sample_pairs(bank, 6, torch.Generator().manual_seed(0))
    dense = GalleryPools(encoder, bank, pool=4, gallery=8, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(pools_module, "DENSE_SIMILARITY_MAX", 0)
    scored = GalleryPools(encoder, bank, pool=4, gallery=8, generator=torch.Generator().manual_seed(5))
    assert dense.sim is not None and scored.sim is None
    for _ in range(2):
        (a_pools, a_scores), (b_pools, b_scores) = dense.scored(texts, videos), scored.scored(texts, videos)
        assert all(torch.equal(a, b) for a, b in zip(a_pools, b_pools))
        for a, b in zip(a_scores, b_scores):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_gallery_draws_resume_with_the_pair_samplers_checkpoint():
    """The galleries are drawn from the pair sampler's generator, the state stage gen checkpoints:
    a sampler restored from step 3's state gives step 4's pairs and galleries exactly."""
    from trainer.stages.gen import PairSampler

    encoder = build_encoder(TINY, max_frames=4).requires_grad_(False).eval()
    bank = bank_from_encoder(encoder, n_videos=10)

    def stream(sampler):
        pools = GalleryPools(encoder, bank, pool=4, gallery=6, generator=sampler.rng)
        return ((pools.sample(*pairs)) for pairs in sampler)

    straight = PairSampler(bank, 4, seed=0, rank=0, world_size=1)
    steps = stream(straight)
    for _ in range(3):
        next(steps)
    state = straight.state_dict()
    expected = next(steps)
    resumed = PairSampler(bank, 4, seed=0, rank=0, world_size=1)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(next(stream(resumed)), expected))


def test_feature_noise_perturbs_the_generators_training_inputs_at_the_stated_relative_scale():
    """stage.gen.feature_noise: while stage gen trains, each input feature gets Gaussian noise of std
    feature_noise x its RMS; 0 leaves the inputs (and so the loss) exactly as the reference's."""
    task = GenerationTask(build_generators(TINY), alphas_cumprod("cosine", 10), "kl", 100.0, feature_noise=0.5)
    x = torch.randn(4000, 64) * torch.linspace(0.1, 10.0, 4000)[:, None]
    rms = x.norm(dim=-1, keepdim=True) / 8.0
    ratio = (task.noisy(x) - x) / rms
    assert abs(float(ratio.std()) - 0.5) < 0.01 and abs(float(ratio.mean())) < 0.01
    clean = GenerationTask(build_generators(TINY), alphas_cumprod("cosine", 10), "kl", 100.0)
    assert clean.noisy(x) is x
    encoder = build_encoder(TINY, max_frames=4).requires_grad_(False).eval()
    bank = bank_from_encoder(encoder, n_videos=8)
    texts, videos = sample_pairs(bank, 5, torch.Generator().manual_seed(0))
    pools = GalleryPools(encoder, bank, pool=4, gallery=8, generator=torch.Generator().manual_seed(1)).sample(texts, videos)
    scores = pool_scores(encoder, bank, pools)
    torch.nn.init.normal_(clean.generators.t2v.decoder[-1].weight)  # a decoder that reads its inputs
    task.generators.load_state_dict(clean.generators.state_dict())
    torch.manual_seed(0)
    noisy_loss, _ = task(bank, *pools, scores)
    torch.manual_seed(0)
    clean_loss, _ = clean(bank, *pools, scores)
    torch.manual_seed(0)
    again, _ = clean(bank, *pools, scores)
    assert float(clean_loss) == float(again) and float(noisy_loss) != float(clean_loss)
