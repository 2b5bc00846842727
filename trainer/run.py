"""A training run, top to bottom: data, stage con, evaluation, stage gen, evaluation, report.

Distributed setup, data, checkpoints and tracking are components this calls (torchtitan style).
What differs per launcher comes in as arguments: where train batches come from
(``train_source``; the local stream by default) and who else hears of each checkpoint
(``after_checkpoint``; Ray Train's ``report``). Nothing here knows which launcher started it.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from shards.index import read_index
from shards.tokenize import CaptionTokenizer
from trainer.components.checkpoint import ResumePoint, find_resume_point
from trainer.components.context import RunContext, seed_everything, shape_key
from trainer.components.data import TrainSourceFactory, ensure_shards, eval_loader, local_train_source, quarantine_counts
from trainer.components.distributed import barrier, decided_once, init_distributed
from trainer.components.export import load_export, load_into, write_export
from trainer.components.extraction import extract_split
from trainer.components.feature_store import bank_dir, read_index as read_bank_index, store_dtype
from trainer.components.features import FeatureBank, encode_split, limited
from trainer.components.mlflow_store import flatten_params
from trainer.components.rundir import RUN_FILE, STOP_FILE, claim, named, record_mlflow_run, recorded_mlflow_run
from trainer.components.tracking import MetricsLogger
from trainer.config import RootConfig
from trainer.evaluation.outputs import log_evaluation, write_outputs
from trainer.evaluation.scoring import Evaluation
from trainer.evaluation.suite import choose_rerank_alpha, midstage_evaluator, score_encoder, score_generator
from trainer.models import build_encoder
from trainer.stages.con import train_con
from trainer.stages.gen import train_gen


def train(dcfg: DictConfig, *, train_source: TrainSourceFactory = local_train_source,
          after_checkpoint: Callable[[Path, int], None] | None = None, dir_claimed: bool = False,
          restarted: bool = False) -> Evaluation:
    """One run end to end. ``dir_claimed``: the launcher already claimed ``run.dir`` for this run
    (``trainer.components.rundir.claim``: the Ray driver, before Ray Train writes into it).
    ``restarted``: the launcher restarted this run's processes after a failure (Ray Train): it
    resumes from the newest complete checkpoint whatever ``run.resume`` says, and continues the
    run's MLflow run even when the failure came before the first checkpoint."""
    dist = init_distributed(dcfg.deepspeed.backend, dcfg.run.device)
    dcfg = named(dcfg, decided_once)
    cfg: RootConfig = OmegaConf.to_object(dcfg)
    seed_everything(cfg.run.seed + dist.rank)
    started, run_dir = time.time(), Path(cfg.run.dir)
    continues = "con" not in cfg.stage.run and not cfg.stage.gen.init  # stage gen from this dir's con.pt
    if dist.is_main:
        ensure_shards(cfg.data, progress=cfg.run.progress)  # checked before anything is written
        check_gen_init(cfg, run_dir)
        if not dir_claimed:
            claim(run_dir, resume=cfg.run.resume, continues=continues, overwrite=cfg.run.overwrite)
            (run_dir / STOP_FILE).unlink(missing_ok=True)  # an earlier job's stop request is not this one's
    barrier()
    run_uid = json.loads((run_dir / RUN_FILE).read_text())["run_uid"]
    resume_from = "auto" if restarted and cfg.run.resume == "none" else cfg.run.resume
    resume = find_resume_point(resume_from, run_dir, shape_key(cfg), run_uid)
    run_id = resume.marker.get("mlflow_run_id") if resume else None
    if run_id is None and restarted:
        run_id = recorded_mlflow_run(run_dir, cfg.tracking.uri)
    tracker = MetricsLogger(cfg.tracking.uri, cfg.tracking.experiment, run_name=cfg.tracking.run_name or cfg.run.name,
                            run_id=run_id, rank=dist.rank,
                            flush_every_s=cfg.tracking.flush_every_s, system_metrics=cfg.tracking.system_metrics)
    if dist.is_main:
        record_mlflow_run(run_dir, tracker.run_id, cfg.tracking.uri)
    ctx = RunContext(cfg, dist, run_dir, tracker, shapes=shape_key(cfg), after_checkpoint=after_checkpoint,
                     run_uid=run_uid)
    with tracker:
        tracker.log_params(flatten_params(OmegaConf.to_container(dcfg, resolve=True)))
        ctx.log("data", quarantine_counts(cfg.data), step=0)
        encoder = build_encoder(cfg.model, cfg.data.max_frames).to(dist.device)
        con_path = stage_con(ctx, encoder, resume, train_source)
        train_bank = None
        if "gen" in cfg.stage.run:
            train_bank = split_features(ctx, encoder, con_path, cfg.data.train_split, cfg.stage.gen.bank_dtype,
                                        "encode train features")
        result, test_bank = evaluate_encoder(ctx, encoder, con_path, train_bank)
        generators = None
        if "gen" in cfg.stage.run:
            gen_resume = resume if resume and resume.stage == "gen" and not resume.finished else None
            generators, abar = train_gen(ctx, encoder, train_bank, gen_resume)
            val_bank = None
            if cfg.data.val_split:
                val_bank = split_features(ctx, encoder, con_path, cfg.data.val_split, "float32",
                                          f"encode {cfg.data.val_split}")
            if dist.is_main:
                evaluate_generator(ctx, encoder, result, test_bank, val_bank, generators, abar)
        if dist.is_main:
            write_outputs(ctx, result, time.time() - started)
            if cfg.tracking.register and tracker.run_id:
                register(ctx, result, "gen" if generators is not None else "con", con_path)
        barrier()
    return result


def stage_con(ctx: RunContext, encoder, resume: ResumePoint | None, train_source: TrainSourceFactory) -> Path:
    """Train stage con (or find its weights), then leave ``encoder`` frozen with the exact fp32
    weights (DeepSpeed cast the module to bf16 in place). Returns the stage-con export."""
    cfg, run_dir = ctx.cfg, ctx.run_dir
    con_done = resume is not None and (resume.stage == "gen" or resume.finished)
    if "con" in cfg.stage.run and not con_done:
        source = train_source(cfg.data, cfg.model, ctx.dist, cfg.run.seed)
        evaluate = midstage_evaluator(ctx, encoder) if cfg.run.eval_every else None
        con_path = train_con(ctx, encoder, source, resume if resume and resume.stage == "con" else None, evaluate)
    elif "con" in cfg.stage.run:
        con_path = run_dir / "con.pt"
    else:
        con_path = stage_gen_init(cfg, run_dir, ctx.dist.is_main)
    load_into(encoder.float(), load_export(con_path), "encoder.", con_path)
    encoder.requires_grad_(False).eval()
    return con_path


def split_features(ctx: RunContext, encoder, con_path: Path, split: str, dtype: str, desc: str) -> FeatureBank:
    """The frozen encoder's features of ``split``, encoded once across every rank into
    ``<run_dir>/features/`` (``trainer.components.extraction``) and memory-mapped: stage gen's train
    bank (also QB-Norm's querybank), the test and val banks. With ``stage.gen.cache_features`` a
    re-run with the same encoder and data reuses a complete bank; every rank must call this."""
    cfg = ctx.cfg
    key = {"encoder": file_identity(con_path), "shards": cfg.data.shards, "split": split,
           "max_frames": cfg.data.max_frames, "max_words": cfg.data.max_words, "sample_fps": cfg.data.sample_fps,
           "dtype": dtype}
    index = read_index(cfg.data.shards, split)
    root = bank_dir(ctx.run_dir / "features", key)
    # Each part's DataLoader draws a seed from the global RNG: without the fork, stage gen's
    # initialisation and noise would depend on how many parts, ranks and loaders there were.
    # After it, one draw per split, as when a split was one DataLoader: stage gen's random stream,
    # and so its figures, stay those of earlier versions (same seed, same machine).
    with torch.random.fork_rng(devices=[]):
        bank = extract_split(encoder, shard_names=[s["name"] for s in index["shards"]],
                             loader_for=lambda shards: eval_loader(cfg.data, cfg.model, split, shards),
                             max_words=cfg.data.max_words, shards_per_part=cfg.data.num_workers, root=root, key=key,
                             dtype=store_dtype(dtype), dist=ctx.dist, desc=desc,
                             progress=cfg.run.progress and ctx.dist.is_main,
                             total_samples=int(index["total_samples"]), reuse=cfg.stage.gen.cache_features)
    torch.empty((), dtype=torch.int64).random_()
    bank_index = read_bank_index(root)
    # What the split lost at read time: every sample the index lists is scored or counted.
    ctx.note_eval_data(split, bank_index["total_samples"], bank.num_videos, bank_index["counters"])
    return bank


def evaluate_encoder(ctx: RunContext, encoder, con_path: Path, train_bank: FeatureBank | None
                     ) -> tuple[Evaluation, FeatureBank | None]:
    """The test split encoded across ranks; rank 0 (the others wait at the end-of-run barrier)
    scores the suite's encoder variants, each logged. Returns the evaluation and the test features."""
    cfg = ctx.cfg
    test_bank = split_features(ctx, encoder, con_path, cfg.data.test_split, "float32", "encode test")
    if not ctx.dist.is_main:
        return Evaluation(), None
    result, _ = score_encoder(encoder, test_bank, cfg.eval, querybank=lambda: train_bank if train_bank is not None
                              else encode(ctx, encoder, cfg.data.train_split, "encode querybank", cfg.eval.qb_bank))
    for variant in result.metrics:
        log_evaluation(ctx, result, variant, step=0)
    return result, test_bank


def evaluate_generator(ctx: RunContext, encoder, result: Evaluation, test_bank: FeatureBank,
                       val_bank: FeatureBank | None, generators, abar: torch.Tensor) -> None:
    """Rank 0: gen_rerank on the test split, with alpha chosen on the val split when there is one."""
    cfg = ctx.cfg
    alpha = None
    if val_bank is not None:
        alpha, result.rerank_alpha_scores = choose_rerank_alpha(encoder, val_bank, generators, abar, cfg.eval,
                                                                cfg.run.seed)
        print(f"rerank alpha {alpha} chosen on {cfg.data.val_split} (t2v+v2t Rsum per alpha: "
              f"{', '.join(f'{a}: {v:.1f}' for a, v in result.rerank_alpha_scores.items())})")
    score_generator(result, test_bank, generators, abar, cfg.eval, cfg.run.seed, alpha)
    result.rerank_alpha = cfg.eval.rerank_alpha if alpha is None else alpha
    ctx.tracker.log_metrics({"eval/gen_rerank/alpha": result.rerank_alpha}, step=0)
    log_evaluation(ctx, result, "gen_rerank", step=0)


def encode(ctx: RunContext, encoder, split: str, desc: str, max_captions: int) -> FeatureBank:
    """Rank 0: the first ``max_captions`` captions' samples of ``split`` in memory (QB-Norm's
    querybank when there is no train bank)."""
    cfg = ctx.cfg
    return encode_split(encoder, limited(eval_loader(cfg.data, cfg.model, split), max_captions),
                        CaptionTokenizer(cfg.data.max_words), ctx.dist.device, torch.float32, desc, cfg.run.progress)


def file_identity(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def check_gen_init(cfg: RootConfig, run_dir: Path) -> None:
    """Stage gen without stage con needs weights to start from: fail before a run dir or an MLflow
    run exists when they are not there."""
    init = cfg.stage.gen.init
    if "con" in cfg.stage.run or init.startswith(("models:/", "runs:/")):
        return
    path = Path(init) if init else run_dir / "con.pt"
    path = path / "con.pt" if path.is_dir() else path
    if not path.is_file():
        given = f"stage.gen.init={init}" if init else "stage.gen.init is empty, so this run dir's own con.pt"
        raise FileNotFoundError(f"stage gen starts from stage-con weights, but {given} -> {path} does not exist; "
                                f"pass stage.gen.init=<run dir or con.pt of a stage-con run> or models:/<name>@champion")


def stage_gen_init(cfg: RootConfig, run_dir: Path, is_main: bool) -> Path:
    """The stage-con weights stage gen starts from: a run dir or con.pt path, or a registry URI
    (``models:/streamret@champion``) materialised as ``<run_dir>/con.pt`` so the run is self-contained."""
    init = cfg.stage.gen.init
    if not init.startswith(("models:/", "runs:/")):
        path = Path(init) if init else run_dir / "con.pt"
        return path / "con.pt" if path.is_dir() else path
    path = run_dir / "con.pt"
    if is_main:
        from trainer.serve.registry import load_bundle

        bundle = load_bundle(init, tracking_uri=cfg.tracking.uri)
        write_export(path, "con", {f"encoder.{k}": v for k, v in bundle.encoder.state_dict().items()},
                     source=init, model_config=asdict(bundle.model_config), max_frames=bundle.max_frames)
    barrier()
    return path


def register(ctx: RunContext, result: Evaluation, stage: str, con_path: Path) -> None:
    """The finished model into the MLflow registry; alias ``champion`` moves only on improvement."""
    from trainer.serve.registry import register_stage

    cfg = ctx.cfg
    version = register_stage(ctx.tracker.uri, ctx.tracker.run_id, ctx.run_dir, stage, result.metrics,
                             name=cfg.tracking.registered_model, champion_metric=cfg.tracking.champion_metric,
                             con_path=con_path, corpus=cfg.data.corpus,
                             chance=None if cfg.tracking.promote_at_chance else result.chance())
    note = " (promoted)" if version.promoted else " (not promoted: within noise of chance)" if version.near_chance else ""
    print(f"registered {version.name} v{version.version} ({version.metric} {version.value:.2f}); champion: "
          f"{'none' if version.champion_version == 'none' else 'v' + version.champion_version}{note}")
