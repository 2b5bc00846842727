"""The evaluation suite: which variants an evaluation reports and in which order, written once
for ``run.train`` (after each stage, and mid-stage) and ``launch/eval.py``.

Order: ``con`` (stage-1 WTI similarity) -> ``con_dual_softmax`` -> ``con_qb_norm`` (when
``eval.qb_bank`` > 0) -> ``gen_rerank`` (when there is a generator). The encoder variants are
scored as soon as the encoder is final; the re-ranking joins the same :class:`Evaluation` once
the generator is.
"""
from __future__ import annotations

from typing import Callable

import torch

from shards.tokenize import CaptionTokenizer
from trainer.components.data import eval_loader
from trainer.components.distributed import barrier
from trainer.components.features import FeatureBank, encode_split
from trainer.config import EvalConfig
from trainer.evaluation.scoring import (Evaluation, eval_metric_names, evaluate_con, evaluate_dual_softmax,
                                        evaluate_qb_norm, evaluate_rerank, rerank, similarity_matrix)
from trainer.models import Generators, RetrievalEncoder


def score_encoder(encoder: RetrievalEncoder, bank: FeatureBank, e: EvalConfig,
                  querybank: Callable[[], FeatureBank]) -> tuple[Evaluation, dict | None]:
    """The encoder variants of ``bank`` (the test split's features); ``querybank()`` is called only
    when QB-Norm runs. Returns the evaluation and what the querybank held (None: skipped)."""
    result = evaluate_con(encoder, bank, e.block)
    evaluate_dual_softmax(result, bank.text_to_video, e.dual_softmax_temperature)
    qb_info = None
    if e.qb_bank > 0:
        qb_info = evaluate_qb_norm(result, encoder, bank, querybank(), max_captions=e.qb_bank, k=e.qb_k,
                                   beta=e.qb_beta, block=e.block)
    return result, qb_info


def score_generator(result: Evaluation, bank: FeatureBank, generators: Generators, abar: torch.Tensor,
                    e: EvalConfig, seed: int, alpha: float | None = None) -> None:
    """Variant ``gen_rerank``, added to ``result`` (which holds the stage-1 similarity), with
    ``alpha`` (chosen on validation) or ``eval.rerank_alpha``."""
    evaluate_rerank(result, bank, generators, abar, topk=e.rerank_topk,
                    alpha=e.rerank_alpha if alpha is None else alpha, steps=e.ddim_steps, seed=seed)


@torch.no_grad()
def choose_rerank_alpha(encoder: RetrievalEncoder, val_bank: FeatureBank, generators: Generators,
                        abar: torch.Tensor, e: EvalConfig, seed: int) -> tuple[float, dict[float, float]]:
    """The re-ranking weight alpha from ``eval.rerank_alpha_grid`` with the best t2v + v2t Rsum on
    the validation split (carved from train, never the test split); a tie goes to the smaller
    alpha, and 0 (the stage-1 ranking unchanged) is in the grid, so on validation re-ranking never
    loses. The DDIM runs once: S' = S + alpha * p, so p = S'(alpha=1) - S serves every alpha."""
    generators.eval()
    sim = similarity_matrix(encoder, val_bank, e.block)
    t2v, v2t = rerank(sim, val_bank, generators, abar, topk=e.rerank_topk, alpha=1.0,
                      steps=e.ddim_steps or abar.shape[0], seed=seed)
    scores = {}
    for alpha in sorted(e.rerank_alpha_grid):
        trial = Evaluation()
        trial.add("gen", sim + alpha * (t2v - sim), sim + alpha * (v2t - sim), val_bank.text_to_video)
        scores[alpha] = trial.metrics["gen"]["t2v"]["Rsum"] + trial.metrics["gen"]["v2t"]["Rsum"]
    best = max(scores.values())
    return min(a for a, v in scores.items() if v == best), scores


def midstage_evaluator(ctx, encoder: RetrievalEncoder) -> Callable[[int], float | None]:
    """``evaluate(step)`` for a stage loop (``run.eval_every``): the encoder being trained scores the
    test split with stage-1 similarity on rank 0, logged as ``eval/con/*`` at that step. Returns
    t2v Rsum on rank 0 (None elsewhere); every rank waits for it."""
    cfg = ctx.cfg

    def evaluate(step: int) -> float | None:
        score = None
        if ctx.dist.is_main:
            was_training = encoder.training
            # The engine may have cast the module to bf16/fp16 in place: feed it its own dtype.
            dtype = next(p.dtype for p in encoder.parameters() if p.is_floating_point())
            bank = encode_split(encoder, eval_loader(cfg.data, cfg.model, cfg.data.test_split),
                                CaptionTokenizer(cfg.data.max_words), ctx.dist.device, dtype, "evaluate", False)
            encoder.train(was_training)
            result = evaluate_con(encoder, bank, cfg.eval.block)
            ctx.tracker.log_metrics(eval_metric_names({"con": result.metrics["con"]}), step=step)
            score = result.metrics["con"]["t2v"]["Rsum"]
        barrier()
        return score

    return evaluate
