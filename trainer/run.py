"""A training run, top to bottom: data, stage con, evaluation, stage gen, evaluation, report.

Distributed setup, data, checkpoints and tracking are components this calls (torchtitan style).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from shards.tokenize import CaptionTokenizer
from trainer.checkpoint import load_export, load_into
from trainer.config import RootConfig
from trainer.context import RunContext, seed_everything
from trainer.data import ensure_shards, eval_loader
from trainer.distributed import barrier, init_distributed
from trainer.evaluate import Evaluation, evaluate
from trainer.features import encode_split
from trainer.models import build_encoder
from trainer.outputs import write_outputs
from trainer.stages.con import train_con
from trainer.stages.gen import train_gen
from trainer.tracking import MetricsLogger, flatten_params


def train(dcfg: DictConfig) -> Evaluation:
    cfg: RootConfig = OmegaConf.to_object(dcfg)
    dist = init_distributed(cfg.deepspeed.backend, cfg.run.device)
    seed_everything(cfg.run.seed + dist.rank)
    run_dir = Path(cfg.run.dir)
    started = time.time()
    if dist.is_main:
        ensure_shards(cfg.data, progress=cfg.run.progress)  # the synthetic corpus is made on first use
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    tracker = MetricsLogger(cfg.tracking.uri, cfg.tracking.experiment, run_name=cfg.tracking.run_name or cfg.run.name,
                            rank=dist.rank, flush_every_s=cfg.tracking.flush_every_s,
                            system_metrics=cfg.tracking.system_metrics)
    ctx = RunContext(cfg, dist, run_dir, tracker)
    with tracker:
        tracker.log_params(flatten_params(OmegaConf.to_container(dcfg, resolve=True)))
        encoder = build_encoder(cfg.model, cfg.data.max_frames).to(dist.device)
        if "con" in cfg.stage.run:
            con_path = train_con(ctx, encoder)
        else:
            con_path = Path(cfg.stage.gen.init) if cfg.stage.gen.init else run_dir / "con.pt"
        # DeepSpeed cast the module to bf16 in place; reload the exact fp32 weights, frozen from here.
        load_into(encoder.float(), load_export(con_path), "encoder.", con_path)
        encoder.requires_grad_(False).eval()

        tokenizer = CaptionTokenizer(cfg.data.max_words)
        test_bank = None
        if dist.is_main:
            test_bank = encode_split(encoder, eval_loader(cfg.data, cfg.model, cfg.data.test_split), tokenizer,
                                     dist.device, torch.float32, "encode test", cfg.run.progress)
        result = Evaluation()
        generators = abar = None
        if "gen" in cfg.stage.run:
            train_bank = encode_split(encoder, eval_loader(cfg.data, cfg.model, cfg.data.train_split), tokenizer,
                                      dist.device, torch.float32, "cache train features", cfg.run.progress)
            generators, abar = train_gen(ctx, encoder, train_bank)
        if dist.is_main:
            e = cfg.eval
            result = evaluate(encoder, test_bank, block=e.block, generators=generators, abar=abar,
                              topk=e.rerank_topk, alpha=e.rerank_alpha, steps=e.ddim_steps, seed=cfg.run.seed)
            write_outputs(ctx, result, time.time() - started)
        barrier()
    return result
