"""Candidate pools for stage gen: which candidates each training query is pooled with, the positive in
column 0. ``stage.gen.mode`` picks the builder (method.md section 4; README "Stage gen"):

- ``gallery`` (default, :class:`GalleryPools`): the query's top-K by stage-1 similarity within a random
  gallery of train items the size of the one it will be re-ranked in.
- ``topk`` (:class:`TopKPools`): its top-K over the whole train bank.
- ``reference`` (:func:`reference_pools`): DiffusionRet's hardest negatives of the random global batch.
"""
from __future__ import annotations

import torch

from ops import mine_candidate_pools, pooled_topk, shortlist_recall, top_per_key
from trainer.components.features import FeatureBank
from trainer.evaluation.scoring import similarity_matrix
from trainer.models import RetrievalEncoder


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
        return row_chunks(self.bank, cands)

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


def row_chunks(bank: FeatureBank, cands: torch.Tensor) -> list[slice]:
    """Row slices of ``cands`` [n, S] whose gathered candidate tokens take ~64 MB (S x L x D fp32 per row)."""
    width = max(bank.video_tokens.width, bank.text_tokens.width)
    step = max(1, 2**24 // (cands.shape[1] * width * bank.sentence.shape[1]))
    return [slice(i, i + step) for i in range(0, cands.shape[0], step)]


# Train banks of at most this many (caption, video) pairs have their stage-1 similarity computed
# once (64 MB in fp32), and pools look their scores up: on the learn bench's 576 x 288 bank the
# per-step paired WTI over each query's gallery was 74 % of a stage-gen step (py-spy, one thread).
DENSE_SIMILARITY_MAX = 2**24


class GalleryPools:
    """``stage.gen.mode=gallery``: each caption is pooled with its video and its P - 1 best videos by
    stage-1 similarity among G - 1 other train videos drawn at random; each video with one of its
    captions and its P - 1 best captions among those of G - 1 random other videos (about (G - 1) x
    captions per video of them). G (``stage.gen.gallery``) is the size of the gallery re-ranking
    sees: the test split's videos by default. P = eval.rerank_topk.

    Why not the whole train bank's top-K (``topk``): a pool's difficulty depends on the gallery it
    was cut from, and a generator given the stage-1 scores (``model.gen_prior``) learns from its
    pools how far to trust them. Measured (synthetic corpus, 288 train videos, val gallery 32,
    K = 32): stage 1 ranks the positive first in 5 % of whole-bank pools but 39 % of val pools; the
    generator trained on whole-bank pools learned to distrust the stage-1 top and its val top-1
    fell to 16 % after 200 steps, while trained on G = 32 galleries it rose to 44 %.

    Draws come from ``generator`` (the pair sampler's, so a checkpoint of it resumes both). The
    stage-1 scores of every drawn pair are looked up in the bank's whole similarity matrix when it
    has at most ``DENSE_SIMILARITY_MAX`` entries; else computed per step, exact paired WTI in row chunks of
    ~64 MB: B x (G - 1) pairs for t2v and B x (G - 1) x captions-per-video for v2t (MSRVTT's 1k
    test gallery and 20 captions per video: 2.6 M pairs a step, which a pooled first stage as in
    ``topk`` mode would cut)."""

    def __init__(self, encoder: RetrievalEncoder, bank: FeatureBank, pool: int, gallery: int,
                 generator: torch.Generator):
        self.encoder, self.bank, self.generator = encoder, bank, generator
        text_to_video = bank.text_to_video.cpu()
        self.text_to_video = text_to_video
        most_captions = int(torch.bincount(text_to_video).max())
        self.gallery = max(2, min(gallery, bank.num_videos))
        self.pool = min(pool, self.gallery)
        # v2t draws captions, so that a gallery of G videos holds about G x captions-per-video of them
        self.caption_draws = max(self.pool - 1, round((self.gallery - 1) * bank.num_texts / bank.num_videos))
        self.caption_draws = min(self.caption_draws, bank.num_texts - most_captions)
        self.sim = None
        if bank.num_texts * bank.num_videos <= DENSE_SIMILARITY_MAX:
            self.sim = similarity_matrix(encoder, bank, block=256)

    def _other_videos(self, own: torch.Tensor) -> torch.Tensor:
        """[n, G-1] distinct videos per row, none of them the row's own: the G-1 smallest of a random key
        per video (O(n x videos) per step; 128 x 180k caption keys take ~0.1 s on one core)."""
        n, nv = own.shape[0], self.bank.num_videos
        keys = torch.rand(n, nv, generator=self.generator)
        keys[torch.arange(n), own] = 2.0  # above every key: never drawn
        return keys.topk(self.gallery - 1, dim=1, largest=False).indices

    def _other_captions(self, videos: torch.Tensor) -> torch.Tensor:
        """[n, C] distinct captions per row, none of them a caption of the row's video."""
        n, nt = videos.shape[0], self.bank.num_texts
        keys = torch.rand(n, nt, generator=self.generator)
        keys[self.text_to_video[None, :] == videos[:, None]] = 2.0
        return keys.topk(self.caption_draws, dim=1, largest=False).indices

    def sample(self, texts: torch.Tensor, videos: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Pools for caption queries ``texts`` and video queries ``videos`` (``sample_pairs``: caption i
        is one of video i's, the v2t positive)."""
        return self.scored(texts, videos)[0]

    @torch.no_grad()
    def scored(self, texts: torch.Tensor, videos: torch.Tensor
               ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, torch.Tensor]]:
        """(``sample``'s pools, their stage-1 scores as ``pool_scores`` gives them): the draws are
        scored to pick the pools, so only the positives' scores are computed on top."""
        bank, device, k = self.bank, texts.device, self.pool - 1
        texts_cpu, videos_cpu = texts.cpu(), videos.cpu()
        own = self.text_to_video[texts_cpu]
        rivals = self._other_videos(own).to(device)
        captions = self._other_captions(videos_cpu).to(device)
        if self.sim is not None:
            t2v_score = lambda r, c: self.sim[texts[r][:, None], c]  # noqa: E731
            v2t_score = lambda r, c: self.sim[c, videos[r][:, None]]  # noqa: E731
        else:
            t2v_score = lambda r, c: self.encoder.paired_similarity(bank.text(texts[r]), bank.video(c))  # noqa: E731
            v2t_score = lambda r, c: self.encoder.paired_similarity(bank.text(c), bank.video(videos[r]))  # noqa: E731
        t2v = self._top(t2v_score, rivals, own.to(device), k)
        v2t = self._top(v2t_score, captions, texts, k)
        return (texts, t2v[0], videos, v2t[0]), (t2v[1], v2t[1])

    def _top(self, score, draws: torch.Tensor, positive: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(pools [n, 1 + k]: the positive, then the k best of ``draws`` [n, D] by ``score(rows, cands)``;
        their scores)."""
        s = torch.cat([score(c, draws[c]) for c in row_chunks(self.bank, draws)])
        top = s.topk(k, dim=1)
        own = score(slice(None), positive[:, None])
        return (torch.cat([positive[:, None], draws.gather(1, top.indices.to(draws.device))], dim=1),
                torch.cat([own.to(s.device), top.values], dim=1).to(positive.device))


@torch.no_grad()
def pool_scores(encoder: RetrievalEncoder, bank: FeatureBank, pools: tuple[torch.Tensor, ...]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-1 similarity of every (query, candidate) of the pools: t2v [n, P], v2t [m, P] (what
    re-ranking passes a ``stage1_prior`` generator: the top-K's own scores)."""
    t2v_query, t2v_cands, v2t_query, v2t_cands = pools
    return (encoder.paired_similarity(bank.text(t2v_query), bank.video(t2v_cands)),
            encoder.paired_similarity(bank.text(v2t_cands), bank.video(v2t_query)))
