"""Scoring a split's features, pure: no I/O, no logging, no ranks. Each ``evaluate_*`` adds one
variant to an :class:`Evaluation`: plain stage-1 similarity, dual softmax, QB-Norm, and the
generator's re-ranking of each query's top K (method.md sections 4-6). ``suite.py`` runs them in
order."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ops import dual_softmax, qb_norm_from_stats, querybank_stats, rerank_topk, retrieval_metrics
from trainer.components.features import FeatureBank
from trainer.models import Generators, RetrievalEncoder


@dataclass
class Evaluation:
    """metrics[variant][direction][metric]; ranks[f"{variant} {direction}"] for plots."""

    metrics: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    ranks: dict[str, torch.Tensor] = field(default_factory=dict)
    sim: torch.Tensor | None = None  # stage-1 similarity [Nt, Nv], what re-ranking starts from
    num_texts: int = 0  # what the split's scores were computed on
    num_videos: int = 0
    rerank_alpha: float | None = None  # the weight gen_rerank used
    rerank_alpha_scores: dict[float, float] = field(default_factory=dict)  # val t2v+v2t Rsum per alpha

    def chance(self) -> dict[str, dict[str, float]]:
        """What a model that ranks at random scores: R@k = k / videos (both directions rank videos),
        MdR = MnR = (videos + 1) / 2; and the standard error of R@k over the queries of each direction."""
        n = max(self.num_videos, 1)
        out = {}
        for direction, queries in (("t2v", self.num_texts), ("v2t", self.num_videos)):
            rk = {f"R{k}": 100.0 * min(1.0, k / n) for k in (1, 5, 10, 50)}
            se = {f"R{k}_se": (v * (100.0 - v) / max(queries, 1)) ** 0.5 for k, v in
                  ((k, rk[f"R{k}"]) for k in (1, 5, 10, 50))}
            out[direction] = {**rk, "MdR": (n + 1) / 2, "MnR": (n + 1) / 2, **se}
        return out

    def add(self, variant: str, t2v_sim: torch.Tensor, v2t_sim: torch.Tensor, text_to_video: torch.Tensor) -> None:
        """t2v_sim [Nt, Nv] and v2t_sim [Nt, Nv] (texts x videos both; they differ after re-ranking)."""
        self.num_texts, self.num_videos = t2v_sim.shape
        t2v = retrieval_metrics(t2v_sim, text_to_video)
        v2t = t2v if v2t_sim is t2v_sim else retrieval_metrics(v2t_sim, text_to_video)
        self.metrics[variant] = {"t2v": t2v["t2v"], "v2t": v2t["v2t"]}
        self.ranks[f"{variant} t2v"] = t2v["t2v_ranks"].cpu()
        self.ranks[f"{variant} v2t"] = v2t["v2t_ranks"].cpu()


def eval_metric_names(metrics: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """MLflow-legal names for ``metrics[variant][direction][metric]``:
    ``eval/<variant>/<direction>_<metric>``, e.g. ``eval/con/t2v_R1`` (no '@' in MLflow names)."""
    return {f"eval/{variant}/{direction}_{name}": value for variant, by_dir in metrics.items()
            for direction, by_name in by_dir.items() for name, value in by_name.items()}


@torch.no_grad()
def similarity_matrix(encoder: RetrievalEncoder, bank: FeatureBank, block: int) -> torch.Tensor:
    """Stage-1 WTI similarity of every caption against every video, in row blocks."""
    videos = bank.video()
    rows = [encoder.similarity(bank.text(slice(i, i + block)), videos)
            for i in range(0, bank.num_texts, block)]
    return torch.cat(rows)


@torch.no_grad()
def rerank(sim: torch.Tensor, bank: FeatureBank, generators: Generators, abar: torch.Tensor, *,
           topk: int, alpha: float, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM re-ranking inside each query's top K, both directions; returns (t2v, v2t) as [Nt, Nv]."""
    dtype = next(generators.parameters()).dtype
    frames, frame_mask = bank.raw_video()
    frames, sentence = frames.to(dtype), bank.raw_sentence().to(dtype)

    # Each query block's candidates are pooled once; only the denoising runs at every DDIM step.
    def t2v_denoiser(q, cand, scores):
        text, pooled = sentence[q], generators.t2v.pool(sentence[q], frames[cand], frame_mask[cand])
        return lambda x_t, k: generators.t2v.denoise(text, pooled, x_t.to(dtype), k, scores).float()

    def v2t_denoiser(q, cand, scores):
        cand_text = sentence[cand]
        pooled = generators.v2t.pool(frames[q], frame_mask[q], cand_text)
        return lambda x_t, k: generators.v2t.denoise(pooled, cand_text, x_t.to(dtype), k, scores).float()

    g = torch.Generator(device=sim.device).manual_seed(seed)
    k_t2v, k_v2t = min(topk, sim.shape[1]), min(topk, sim.shape[0])
    sharp = generators.sharpness()
    t2v = rerank_topk(sim, t2v_denoiser, abar, k=k_t2v, alpha=alpha, steps=steps, generator=g, sharpness=sharp)
    v2t = rerank_topk(sim.t().contiguous(), v2t_denoiser, abar, k=k_v2t, alpha=alpha, steps=steps, generator=g,
                      sharpness=sharp)
    return t2v, v2t.t()


@torch.no_grad()
def evaluate_con(encoder: RetrievalEncoder, bank: FeatureBank, block: int) -> Evaluation:
    """Variant ``con``: the stage-1 WTI similarity of every caption against every video."""
    result = Evaluation()
    result.sim = similarity_matrix(encoder, bank, block)
    result.add("con", result.sim, result.sim, bank.text_to_video)
    return result


@torch.no_grad()
def evaluate_rerank(result: Evaluation, bank: FeatureBank, generators: Generators, abar: torch.Tensor, *,
                    topk: int, alpha: float, steps: int, seed: int) -> None:
    """Variant ``gen_rerank``: the generator re-ranks each query's top K of the stage-1 similarity."""
    generators.eval()
    t2v, v2t = rerank(result.sim, bank, generators, abar, topk=topk, alpha=alpha,
                      steps=steps or abar.shape[0], seed=seed)
    result.add("gen_rerank", t2v, v2t, bank.text_to_video)


def evaluate_dual_softmax(result: Evaluation, text_to_video: torch.Tensor, temperature: float) -> None:
    """Variant ``con_dual_softmax`` (CLIP2TV/CAMoE): t2v ranked on the t2v prior, v2t on the v2t one."""
    sim = result.sim
    result.add("con_dual_softmax", dual_softmax(sim, temperature, "t2v"), dual_softmax(sim, temperature, "v2t"),
               text_to_video)


@torch.no_grad()
def evaluate_qb_norm(result: Evaluation, encoder: RetrievalEncoder, bank: FeatureBank, querybank: FeatureBank, *,
                     max_captions: int, k: int, beta: float, block: int) -> dict:
    """Variant ``con_qb_norm``: QB-Norm with a querybank of training captions (t2v) and their videos
    (v2t), encoded by the same encoder. Returns what the querybank held."""
    sim = result.sim
    n_text = min(max_captions, querybank.num_texts)
    # t2v: bank captions x test videos; v2t: bank videos x test captions (the transposed problem),
    # both in bank blocks whose stats combine (ops.querybank_stats): the train bank is never whole in memory.
    test_videos, test_texts = bank.video(), bank.text()
    t2v_stats = _combined(querybank_stats(encoder.similarity(querybank.text(slice(i, min(i + block, n_text))),
                                                             test_videos), k=min(k, sim.shape[1]), beta=beta)
                          for i in range(0, n_text, block))
    v2t_stats = _combined(querybank_stats(encoder.similarity(test_texts, querybank.video(slice(i, i + block))).t(),
                                          k=min(k, sim.shape[0]), beta=beta)
                          for i in range(0, querybank.num_videos, block))
    t2v = qb_norm_from_stats(sim, *t2v_stats, beta=beta)
    v2t = qb_norm_from_stats(sim.t(), *v2t_stats, beta=beta).t()
    result.add("con_qb_norm", t2v, v2t, bank.text_to_video)
    return {"captions": n_text, "videos": querybank.num_videos, "k": k, "beta": beta}


def _combined(stats) -> tuple[torch.Tensor, torch.Tensor]:
    """querybank_stats of bank blocks -> the stats of the whole bank (logaddexp of the norms, union of the active sets)."""
    log_norm = active = None
    for part_norm, part_active in stats:
        log_norm = part_norm if log_norm is None else torch.logaddexp(log_norm, part_norm)
        active = part_active if active is None else active | part_active
    return log_norm, active
