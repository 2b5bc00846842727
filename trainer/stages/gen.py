"""Stage ``gen``: the diffusion generator learns to denoise the one-hot distribution over a
candidate pool, encoders frozen. ``stage.gen.mode=topk`` (default) pools each query with its
top-K candidates by stage-1 similarity over the whole train bank, K = eval.rerank_topk: the
distribution it re-ranks at inference. ``reference`` is DiffusionRet's: the positive plus the
hardest negatives of the global batch of every rank.

The frozen encoders' features of the train split are computed once, so this stage
never decodes video again.
"""
from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from ops import alphas_cumprod, mine_candidate_pools, pooled_topk, q_sample, shortlist_recall, top_per_key
from trainer.components.checkpoint import ResumePoint
from trainer.components.engine import build_engine
from trainer.components.export import export_stage
from trainer.components.features import FeatureBank
from trainer.components.loop import LoopState, run_stage
from trainer.models import Generators, RetrievalEncoder, build_generators
from trainer.models.losses import diffusion_loss


class GenerationTask(nn.Module):
    """What the DeepSpeed engine wraps in stage gen: each direction's queries and candidate pools
    (bank indices, the positive in column 0) -> L_t2v + L_v2t."""

    def __init__(self, generators: Generators, abar: torch.Tensor, loss: str, kl_scale: float):
        super().__init__()
        self.generators = generators
        self.abar = abar  # a plain attribute, not a buffer: DeepSpeed would cast a buffer to bf16
        self.loss_kind = loss
        self.kl_scale = kl_scale

    def forward(self, bank: FeatureBank, t2v_query: torch.Tensor, t2v_cands: torch.Tensor, v2t_query: torch.Tensor,
                v2t_cands: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """t2v: caption queries [n] and candidate videos [n, P]; v2t: video queries [m] and candidate
        captions [m, P]; column 0 of each pool is the positive."""
        dtype = next(self.generators.parameters()).dtype
        losses = {}
        for direction, query, cands in (("t2v", t2v_query, t2v_cands), ("v2t", v2t_query, v2t_cands)):
            n, pool = cands.shape
            # Shuffle columns so the positive's position carries no information.
            perm = torch.randperm(pool, device=cands.device)
            cands, positive = cands[:, perm], (perm == 0).nonzero()[0].expand(n)
            x0 = nn.functional.one_hot(positive, pool).float()
            k = torch.randint(0, self.abar.shape[0], (n,), device=cands.device)
            x_t = q_sample(x0, k, self.abar, torch.randn_like(x0)).to(dtype)
            if direction == "t2v":
                frames, mask = bank.raw_video(cands)
                x0_hat = self.generators.t2v(bank.raw_sentence(query).to(dtype), frames.to(dtype), mask, x_t, k)
            else:
                frames, mask = bank.raw_video(query)
                x0_hat = self.generators.v2t(frames.to(dtype), mask, bank.raw_sentence(cands).to(dtype), x_t, k)
            losses[direction] = diffusion_loss(x0_hat.float(), positive, self.loss_kind, self.kl_scale)
        total = losses["t2v"] + losses["v2t"]
        return total, {f"loss_{d}": v.item() for d, v in losses.items()}


def reference_pools(sim: torch.Tensor, text_idx: torch.Tensor, video_idx: torch.Tensor, rows: torch.Tensor,
                    pool_size: int, groups: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``stage.gen.mode=reference``: sim [G, G] is the stage-1 similarity of the global batch (pair i =
    text_idx[i], video_idx[i]); this rank's queries are the pairs ``rows``, each pooled with its
    hardest negatives of the whole global batch. Returns (t2v_query, t2v_cands, v2t_query, v2t_cands)."""
    t2v = mine_candidate_pools(sim[rows], rows, pool_size, groups[rows], groups)
    v2t = mine_candidate_pools(sim.t()[rows], rows, pool_size, groups[rows], groups)
    return text_idx[rows], video_idx[t2v], video_idx[rows], text_idx[v2t]


class TopKPools:
    """``stage.gen.mode=topk``: train on the distribution the generator re-ranks. Every caption's
    top-P videos and every video's top-P captions by stage-1 similarity over the whole train bank
    (P = eval.rerank_topk), computed once; a query's pool is its positive and its P - 1 hardest
    negatives (other captions of the same video are never negatives).

    Exact (``shortlist`` <= 0 or >= the videos): WTI of every pair, in caption
    blocks against all videos held once in memory. Shortlisted: per query, the ``shortlist`` best
    candidates by pooled features (``ops.pooled_topk``, bank read block by block), then exact WTI
    on those alone (``ops.wti_paired``): memory flat in the bank size, S WTI pairs per query."""

    invert_slack = 2**20  # pairs gathered before the inverted top-k is compacted (bounds its memory)

    def __init__(self, encoder: RetrievalEncoder, bank: FeatureBank, pool: int, block: int = 256, shortlist: int = 0):
        self.encoder, self.bank, self.block = encoder, bank, block
        self.shortlist = max(shortlist, pool) if shortlist > 0 else 0  # the pool is picked from the shortlist
        t2v_video = bank.text_to_video.cpu()
        n_texts, n_videos = bank.num_texts, bank.num_videos
        self.pool = min(pool, n_videos)
        self.n_neg_v2t = min(self.pool - 1, n_texts - int(torch.bincount(t2v_video).max()))
        # One full WTI pass gives both directions exactly: worth it while the shortlist would not be shorter.
        self.exact = shortlist <= 0 or shortlist >= n_videos - 1
        if self.exact:
            t2v, v2t = self._exact(t2v_video)
        else:
            t2v, inverted = self._t2v_and_inverted(n_texts)
            v2t = torch.cat([self.v2t_shortlisted(torch.arange(r, min(r + block, n_videos)), inverted)
                             for r in range(0, n_videos, block)])
        self.t2v = t2v.to(bank.device)  # [Nt, P]: video ids, the caption's own video first
        # v2t: the positive column is filled per step (a random caption of the query video), the
        # negatives are the best captions of other videos.
        self.v2t_negatives = v2t.to(bank.device)  # [Nv, P-1]

    def _exact(self, t2v_video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bank, n_texts, n_videos = self.bank, self.bank.num_texts, self.bank.num_videos
        videos = bank.video()
        t2v = []
        best = torch.full((n_videos, 0), float("-inf"))
        best_i = torch.empty(n_videos, 0, dtype=torch.long)
        for r0 in range(0, n_texts, self.block):
            rows = slice(r0, min(r0 + self.block, n_texts))
            with torch.no_grad():
                sim = self.encoder.similarity(bank.text(rows), videos).float().cpu()
            t2v.append(mine_candidate_pools(sim, t2v_video[rows], self.pool))
            # Each video's best captions of other videos so far (a running top-k: no [Nv, Nt] matrix).
            cols = sim.t().masked_fill(t2v_video[rows][None, :] == torch.arange(n_videos)[:, None], float("-inf"))
            best, pick = torch.cat([best, cols], 1).topk(min(self.n_neg_v2t, best.shape[1] + cols.shape[1]), dim=1)
            best_i = torch.cat([best_i, torch.arange(rows.start, rows.stop).expand(n_videos, -1)], 1).gather(1, pick)
        return torch.cat(t2v), best_i

    @torch.no_grad()
    def _t2v_scored(self, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(own video [n], shortlisted videos [n, S], their exact WTI [n, S]) of the captions ``texts``."""
        bank = self.bank
        own = bank.text_to_video.cpu()[texts]
        cands = pooled_topk(bank.sentence[texts], bank.pooled_table(), self.shortlist, own,
                            torch.arange(bank.num_videos)).cpu()
        sims = torch.cat([self.encoder.paired_similarity(bank.text(texts[c]), bank.video(cands[c])).cpu()
                          for c in self._chunks(cands)])
        return own, cands, sims

    def t2v_shortlisted(self, texts: torch.Tensor) -> torch.Tensor:
        """[n, P] pools of the captions ``texts``: their video, then their hardest shortlisted videos."""
        return self._t2v_pools(*self._t2v_scored(texts))

    def _t2v_pools(self, own: torch.Tensor, cands: torch.Tensor, sims: torch.Tensor) -> torch.Tensor:
        return torch.cat([own[:, None], cands.gather(1, sims.topk(self.pool - 1, dim=1).indices)], dim=1)

    def _t2v_and_inverted(self, n_texts: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Every caption's pool, and the same exact scores inverted: for each video, the best
        captions whose shortlist held it (WTI is one score for both directions, so a caption that
        ranks a video high is a hard v2t negative of it; this recovers what the pooled v2t first
        stage misses). The inversion is kept to a running top-(P-1) per video (``ops.top_per_key``)."""
        n_videos, k = self.bank.num_videos, self.n_neg_v2t
        pools, keys, items, scores = [], [], [], []
        held, cap = 0, 2 * n_videos * k + self.invert_slack
        best = (torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), torch.empty(0))
        for r0 in range(0, n_texts, self.block):
            texts = torch.arange(r0, min(r0 + self.block, n_texts))
            own, cands, sims = self._t2v_scored(texts)
            pools.append(self._t2v_pools(own, cands, sims))
            keys.append(cands.reshape(-1))
            items.append(texts[:, None].expand_as(cands).reshape(-1))
            scores.append(sims.reshape(-1))
            held += cands.numel()
            if held > cap or r0 + self.block >= n_texts:
                top_items, top_scores = top_per_key(torch.cat([best[0], *keys]), torch.cat([best[1], *items]),
                                                    torch.cat([best[2], *scores]), n_videos, k)
                found = top_items >= 0
                best = (torch.arange(n_videos)[:, None].expand_as(top_items)[found], top_items[found], top_scores[found])
                keys, items, scores, held = [], [], [], int(found.sum())
        return torch.cat(pools), (top_items, top_scores)

    @torch.no_grad()
    def v2t_shortlisted(self, videos: torch.Tensor,
                        inverted: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """[n, P-1] the hardest shortlisted captions of other videos for each of ``videos``: the pooled
        first stage's shortlist scored by exact WTI, merged with ``inverted`` (the t2v pass's exact
        scores per video, ``_t2v_and_inverted``) when given."""
        bank = self.bank
        cands = pooled_topk(bank.pooled_video(videos), bank.sentence, self.shortlist, videos,
                            bank.text_to_video.cpu()).cpu()
        sims = torch.cat([self.encoder.paired_similarity(bank.text(cands[c]), bank.video(videos[c])).cpu()
                          for c in self._chunks(cands)])
        if inverted is not None:
            inv_items, inv_scores = inverted[0][videos], inverted[1][videos]
            dup = (inv_items[:, :, None] == cands[:, None, :]).any(dim=2) | (inv_items < 0)
            cands = torch.cat([cands, inv_items.clamp(min=0)], dim=1)
            sims = torch.cat([sims, inv_scores.masked_fill(dup, float("-inf"))], dim=1)
        return cands.gather(1, sims.topk(self.n_neg_v2t, dim=1).indices)

    def _chunks(self, cands: torch.Tensor) -> list[slice]:
        # ~64 MB of gathered candidate tokens per chunk (S x L x D fp32 per query)
        width = max(self.bank.video_tokens.width, self.bank.text_tokens.width)
        step = max(1, 2**24 // (cands.shape[1] * width * self.bank.sentence.shape[1]))
        return [slice(i, i + step) for i in range(0, cands.shape[0], step)]

    @torch.no_grad()
    def recall(self, sample: int, seed: int) -> dict[str, float]:
        """Shortlist recall against exact mining on ``sample`` random queries of each shortlisted
        direction: the share of the exact hardest negatives the shortlist found."""
        bank, g = self.bank, torch.Generator().manual_seed(seed)
        out = {}
        if not self.exact:
            texts = torch.randperm(bank.num_texts, generator=g)[:sample]
            query = bank.text(texts)
            sim = torch.cat([self.encoder.similarity(query, bank.video(slice(v, v + self.block))).float().cpu()
                             for v in range(0, bank.num_videos, self.block)], dim=1)
            exact = mine_candidate_pools(sim, bank.text_to_video.cpu()[texts], self.pool)
            out["shortlist_recall_t2v"] = shortlist_recall(exact[:, 1:], self.t2v.cpu()[texts][:, 1:])
            videos = torch.randperm(bank.num_videos, generator=g)[:sample]
            sim = torch.cat([self.encoder.similarity(bank.text(slice(r, r + self.block)), bank.video(videos)).float().cpu()
                             for r in range(0, bank.num_texts, self.block)]).t()
            sim = sim.masked_fill(bank.text_to_video.cpu()[None, :] == videos[:, None], float("-inf"))
            exact = sim.topk(self.n_neg_v2t, dim=1).indices
            out["shortlist_recall_v2t"] = shortlist_recall(exact, self.v2t_negatives.cpu()[videos])
        return out

    def sample(self, texts: torch.Tensor, videos: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Pools for caption queries ``texts`` and video queries ``videos`` (whose positive captions
        are drawn the way stage con draws a caption: ``videos``' pairs from ``sample_pairs``)."""
        own_caption = texts  # sample_pairs gives one caption of each video: the v2t positive
        v2t = torch.cat([own_caption[:, None], self.v2t_negatives[videos]], dim=1)
        return texts, self.t2v[texts], videos, v2t


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
                    pool_size: int, topk: TopKPools | None) -> dict[str, float]:
    pairs = tuple(p.to(bank.device) for p in pairs)  # drawn on the CPU generator; the bank reads onto its device
    if topk is not None:
        pools = topk.sample(*pairs)
    else:
        text_idx, video_idx, rows = global_batch(*pairs)
        sim = stage1_similarity(encoder, bank, text_idx, video_idx)
        groups = video_idx  # a pair's group is its video: copies of one video are never each other's negatives
        pools = reference_pools(sim, text_idx, video_idx, rows, min(pool_size, int(groups.unique().numel())), groups)
    loss, parts = engine(bank, *pools)
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
    if ctx.dist.is_main:
        print(f"generator parameters: {generators.num_parameters()}")
    abar = alphas_cumprod(gen.schedule, gen.timesteps).to(ctx.dist.device)
    total = gen.max_steps or gen.epochs * max(1, bank.num_videos // gen.batch_size)
    engine = build_engine(GenerationTask(generators, abar, gen.loss, gen.kl_scale),
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
    if gen.mode == "topk":
        topk = TopKPools(encoder, bank, cfg.eval.rerank_topk, cfg.eval.block, gen.shortlist)
        recall = topk.recall(256, cfg.run.seed)
        if recall:
            ctx.log("gen", recall, step=0)
            if ctx.dist.is_main:
                print(f"stage gen mining: shortlist {gen.shortlist}, recall of the exact hardest negatives on 256 "
                      f"queries: {', '.join(f'{k[-3:]} {v:.3f}' for k, v in recall.items())}")
    elif gen.mode != "reference":
        raise ValueError(f"stage.gen.mode must be 'topk' or 'reference', got {gen.mode!r}")

    def micro_step(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[dict[str, float], int]:
        return generation_step(engine, encoder, bank, batch, gen.pool_size, topk), samples

    tag_dir = run_stage(ctx, "gen", engine, ckpt, state, total=total, micro_batches=iter(pairs),
                        micro_step=micro_step, log_every=gen.log_every)
    export_stage(engine, "gen", tag_dir, ctx.run_dir, step=state.step, model_config=asdict(cfg.model))
    return engine.module.generators, abar
