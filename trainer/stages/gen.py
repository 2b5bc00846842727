"""Stage ``gen``: the diffusion generator learns to denoise the one-hot distribution over a
candidate pool, encoders frozen. Which candidates a query is pooled with is ``stage.gen.mode``
(``pools.py``): ``gallery`` (default) its top-K by stage-1 similarity within a random train gallery
the size of the test split's, K = eval.rerank_topk: the distribution it re-ranks at inference;
``topk`` its top-K over the whole train bank; ``reference`` DiffusionRet's hardest negatives of
the global batch of every rank.

The frozen encoders' features of the train split are computed once, so this stage
never decodes video again.
"""
from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from ops import alphas_cumprod, q_sample
from shards.index import read_index
from trainer.components.checkpoint import ResumePoint
from trainer.components.engine import build_engine
from trainer.components.export import export_stage
from trainer.components.features import FeatureBank
from trainer.components.loop import LoopState, run_stage
from trainer.config import GEN_MODES
from trainer.models import Generators, RetrievalEncoder, build_generators
from trainer.models.losses import diffusion_loss
from trainer.stages.pools import GalleryPools, TopKPools, pool_scores, reference_pools


class GenerationTask(nn.Module):
    """What the DeepSpeed engine wraps in stage gen: each direction's queries and candidate pools
    (bank indices, the positive in column 0) -> L_t2v + L_v2t."""

    def __init__(self, generators: Generators, abar: torch.Tensor, loss: str, kl_scale: float,
                 feature_noise: float = 0.0):
        super().__init__()
        self.generators = generators
        self.abar = abar  # a plain attribute, not a buffer: DeepSpeed would cast a buffer to bf16
        self.loss_kind = loss
        self.kl_scale = kl_scale
        self.feature_noise = feature_noise

    def noisy(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` plus Gaussian noise of std ``feature_noise`` x each feature's RMS (stage.gen.feature_noise).
        Padded frames stay zero-valued in effect: the generator masks them before its softmax."""
        if not self.feature_noise:
            return x
        rms = x.norm(dim=-1, keepdim=True) / x.shape[-1] ** 0.5
        return x + self.feature_noise * rms * torch.randn_like(x)

    def forward(self, bank: FeatureBank, t2v_query: torch.Tensor, t2v_cands: torch.Tensor, v2t_query: torch.Tensor,
                v2t_cands: torch.Tensor, scores: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """t2v: caption queries [n] and candidate videos [n, P]; v2t: video queries [m] and candidate
        captions [m, P]; column 0 of each pool is the positive. ``scores``: the pools' stage-1
        similarities ([n, P], [m, P]), for generators built with ``stage1_prior``."""
        dtype = next(self.generators.parameters()).dtype
        losses = {}
        priors = scores if scores is not None else (None, None)
        for direction, query, cands, prior in (("t2v", t2v_query, t2v_cands, priors[0]),
                                               ("v2t", v2t_query, v2t_cands, priors[1])):
            n, pool = cands.shape
            # Shuffle columns so the positive's position carries no information.
            perm = torch.randperm(pool, device=cands.device)
            cands, positive = cands[:, perm], (perm == 0).nonzero()[0].expand(n)
            prior = None if prior is None else prior[:, perm]
            x0 = nn.functional.one_hot(positive, pool).float()
            k = torch.randint(0, self.abar.shape[0], (n,), device=cands.device)
            x_t = q_sample(x0, k, self.abar, torch.randn_like(x0)).to(dtype)
            noisy = self.noisy
            if direction == "t2v":
                frames, mask = bank.raw_video(cands)
                x0_hat = self.generators.t2v(noisy(bank.raw_sentence(query)).to(dtype), noisy(frames).to(dtype), mask,
                                             x_t, k, prior)
            else:
                frames, mask = bank.raw_video(query)
                x0_hat = self.generators.v2t(noisy(frames).to(dtype), mask, noisy(bank.raw_sentence(cands)).to(dtype),
                                             x_t, k, prior)
            losses[direction] = diffusion_loss(x0_hat.float(), positive, self.loss_kind, self.kl_scale)
        total = losses["t2v"] + losses["v2t"]
        return total, {f"loss_{d}": v.item() for d, v in losses.items()}


def sample_pairs(bank: FeatureBank, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of distinct videos, one random caption each (like a stage-1 training batch)."""
    n_videos = bank.num_videos
    videos = torch.randperm(n_videos, generator=generator)[: min(batch_size, n_videos)]
    texts = bank.random_caption_of(videos, generator)
    return texts, videos


@torch.no_grad()
def stage1_similarity(encoder: RetrievalEncoder, bank: FeatureBank, text_idx: torch.Tensor,
                      video_idx: torch.Tensor) -> torch.Tensor:
    return encoder.similarity(bank.text(text_idx), bank.video(video_idx))


def global_batch(text_idx: torch.Tensor, video_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's pairs, concatenated, and the positions of this rank's. Every rank holds the same
    feature bank (frozen encoder, whole train split), so only indices cross ranks."""
    n = text_idx.shape[0]
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return text_idx, video_idx, torch.arange(n)
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    gathered = [torch.empty(2, n, dtype=torch.long, device=text_idx.device) for _ in range(world)]
    torch.distributed.all_gather(gathered, torch.stack([text_idx, video_idx]))
    both = torch.cat(gathered, dim=1)
    return both[0], both[1], torch.arange(rank * n, (rank + 1) * n)


def generation_step(engine, encoder: RetrievalEncoder, bank: FeatureBank, pairs: tuple[torch.Tensor, torch.Tensor],
                    pool_size: int, topk: TopKPools | GalleryPools | None) -> dict[str, float]:
    pairs = tuple(p.to(bank.device) for p in pairs)  # drawn on the CPU generator; the bank reads onto its device
    prior = engine.module.generators.stage1_prior
    scores = None
    if isinstance(topk, GalleryPools):
        pools, scores = topk.scored(*pairs)  # the draws are scored to pick the pools: their scores come along
    elif topk is not None:
        pools = topk.sample(*pairs)
    else:
        text_idx, video_idx, rows = global_batch(*pairs)
        sim = stage1_similarity(encoder, bank, text_idx, video_idx)
        groups = video_idx  # a pair's group is its video: copies of one video are never each other's negatives
        pools = reference_pools(sim, text_idx, video_idx, rows, min(pool_size, int(groups.unique().numel())), groups)
    if not prior:
        scores = None
    elif scores is None:
        scores = pool_scores(encoder, bank, pools)
    loss, parts = engine(bank, *pools, scores)
    engine.backward(loss)
    engine.step()
    return {"loss": loss.item(), **parts}


class PairSampler:
    """This rank's stream of query batches: ``sample_pairs`` drawn from its own seeded generator.
    Its state is every rank's generator state, gathered (DeepSpeed writes rank 0's client state)."""

    def __init__(self, bank: FeatureBank, batch_size: int, seed: int, rank: int, world_size: int):
        self.bank, self.batch_size, self.rank, self.world_size = bank, batch_size, rank, world_size
        self.rng = torch.Generator().manual_seed(seed * 1000 + rank)

    def __iter__(self):
        while True:
            yield sample_pairs(self.bank, self.batch_size, self.rng)

    def state_dict(self) -> dict:
        states = [self.rng.get_state()]
        if torch.distributed.is_initialized() and self.world_size > 1:
            states = [None] * self.world_size
            torch.distributed.all_gather_object(states, self.rng.get_state())
        return {"ranks": states}

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["ranks"][self.rank])


def train_gen(ctx, encoder: RetrievalEncoder, bank: FeatureBank,
              resume: ResumePoint | None = None) -> tuple[Generators, torch.Tensor]:
    """The stage-gen loop over cached train features; returns the generators and the schedule."""
    cfg, gen = ctx.cfg, ctx.cfg.stage.gen
    generators = build_generators(cfg.model).to(ctx.dist.device)
    if generators.stage1_prior:
        generators.init_prior(float(encoder.scale()), gen.kl_scale)
    if ctx.dist.is_main:
        print(f"generator parameters: {generators.num_parameters()}")
    abar = alphas_cumprod(gen.schedule, gen.timesteps).to(ctx.dist.device)
    total = gen.max_steps or gen.epochs * max(1, bank.num_videos // gen.batch_size)
    engine = build_engine(GenerationTask(generators, abar, gen.loss, gen.kl_scale, gen.feature_noise),
                          [{"params": list(generators.parameters()), "lr": gen.lr}], cfg.deepspeed,
                          micro_batch=gen.batch_size, total_steps=total, warmup_ratio=gen.warmup_ratio,
                          weight_decay=gen.weight_decay)
    ckpt = ctx.checkpoints("gen")
    state = ckpt.track("loop", LoopState())
    pairs = ckpt.track("pairs", PairSampler(bank, gen.batch_size, cfg.run.seed, ctx.dist.rank, ctx.dist.world_size))
    if resume is not None:
        ckpt.restore(engine, resume)
    samples = min(gen.batch_size, bank.num_videos) * ctx.dist.world_size
    topk = None
    if gen.mode == "gallery":
        gallery = gen.gallery or int(read_index(cfg.data.shards, cfg.data.test_split)["total_samples"])
        topk = GalleryPools(encoder, bank, cfg.eval.rerank_topk, gallery, pairs.rng)
        if ctx.dist.is_main:
            print(f"stage gen pools: each query's top {topk.pool} within random galleries of {topk.gallery} "
                  f"train videos (stage.gen.gallery{'' if gen.gallery else ' = 0: the test split size'})")
    elif gen.mode == "topk":
        topk = TopKPools(encoder, bank, cfg.eval.rerank_topk, cfg.eval.block, gen.shortlist)
        recall = topk.recall(256, cfg.run.seed)
        if recall:
            ctx.log("gen", recall, step=0)
            if ctx.dist.is_main:
                print(f"stage gen mining: shortlist {gen.shortlist}, recall of the exact hardest negatives on 256 "
                      f"queries: {', '.join(f'{k[-3:]} {v:.3f}' for k, v in recall.items())}")
    elif gen.mode not in GEN_MODES:
        raise ValueError(f"stage.gen.mode must be one of {GEN_MODES}, got {gen.mode!r}")

    def micro_step(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[dict[str, float], int]:
        return generation_step(engine, encoder, bank, batch, gen.pool_size, topk), samples

    tag_dir = run_stage(ctx, "gen", engine, ckpt, state, total=total, micro_batches=iter(pairs),
                        micro_step=micro_step, log_every=gen.log_every)
    export_stage(engine, "gen", tag_dir, ctx.run_dir, step=state.step, model_config=asdict(cfg.model))
    return engine.module.generators, abar
