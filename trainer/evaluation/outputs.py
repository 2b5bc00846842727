"""End of run on rank 0: retrieval metrics to MLflow, plots, ``<run_dir>/metrics.json``, and the
summary table on stdout."""
from __future__ import annotations

from dataclasses import asdict

from omegaconf import OmegaConf

from trainer.components.secrets import redact, redact_tree

from trainer.evaluation.scoring import Evaluation, eval_metric_names
from trainer.evaluation.plots import plot_loss_curves, plot_rank_histograms, plot_recall_curves, plot_stage_comparison
from trainer.evaluation.report import summary_table, write_metrics_json


def log_evaluation(ctx, result: Evaluation, variant: str, step: int) -> None:
    """One variant's metrics to MLflow (``eval/<variant>/<direction>_<metric>``) and a line on stdout."""
    ctx.tracker.log_metrics(eval_metric_names({variant: result.metrics[variant]}), step=step)
    t2v = result.metrics[variant]["t2v"]
    print(f"eval {variant}: t2v R@1 {t2v['R1']:.1f} R@5 {t2v['R5']:.1f} R@10 {t2v['R10']:.1f} MdR {t2v['MdR']:.1f}")


def write_outputs(ctx, result: Evaluation, elapsed_s: float) -> None:
    cfg, run_dir, tracker = ctx.cfg, ctx.run_dir, ctx.tracker
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    made = [
        plot_recall_curves(result.ranks, plots / "recall_at_k.png", f"{cfg.run.name}: recall@K"),
        plot_rank_histograms(result.ranks, plots / "rank_histograms.png", f"{cfg.run.name}: ranks of the true item"),
        plot_stage_comparison(result.metrics, plots / "stage_comparison.png"),
    ]
    if ctx.history:
        made.append(plot_loss_curves(ctx.history, plots / "loss_curves.png"))
    payload = {
        "run": cfg.run.name,
        "mlflow_run_id": tracker.run_id,
        "tracking_uri": redact(tracker.uri or cfg.tracking.uri),
        "corpus": cfg.data.corpus,
        "test_split": cfg.data.test_split,
        "test_texts": result.num_texts,
        "test_videos": result.num_videos,
        "test_data": ctx.eval_data.get(cfg.data.test_split, {}),  # samples in the split, scored, dropped by kind
        "chance": result.chance(),
        "rerank_alpha": result.rerank_alpha,
        "rerank_alpha_val_rsum": {str(a): v for a, v in result.rerank_alpha_scores.items()},
        "stages": list(cfg.stage.run),
        "elapsed_s": round(elapsed_s, 1),
        "metrics": result.metrics,
    }
    metrics_path = write_metrics_json(run_dir / "metrics.json", payload)
    config_path = run_dir / "config.yaml"
    config_path.write_text(OmegaConf.to_yaml(OmegaConf.create(redact_tree(asdict(cfg)))))  # secrets masked
    for path in (metrics_path, config_path):
        tracker.log_artifact(path)
    for path in made:
        tracker.log_artifact(path, artifact_path="plots")
    chance = result.chance()["t2v"]["R1"]
    data = ctx.eval_data.get(cfg.data.test_split, {})
    scored = f"scored {data['scored']} of its {data['in_split']} samples, " if data else ""
    print(f"\n{cfg.run.name}: {cfg.data.corpus} {cfg.data.test_split} ({scored}{result.num_texts} captions, "
          f"{result.num_videos} videos: chance R@1 {chance:.2f}), stages {'+'.join(cfg.stage.run)}, "
          f"{elapsed_s / 60:.1f} min\n{summary_table(result.metrics)}\n"
          f"metrics: {metrics_path}\nplots:   {plots}\nMLflow run {tracker.run_id} at {redact(tracker.uri)} "
          f"(mlflow ui --backend-store-uri {redact(tracker.uri)})")
