"""Evaluate a trained streamret model on a split's shards, every inference variant side by side.

    python launch/eval.py --model models:/streamret@champion data.shards=data/msrvtt/shards \
        tracking.uri=sqlite:///mlflow.db [--out eval.json] [eval.qb_bank=2000] [--mlflow]
    python launch/eval.py model=runs/<run.name> data.shards=...

The model is not a Hydra key (``model=`` is Hydra's model-config group), so it is given as
``--model X`` (or ``model=X`` when X is a ``models:/`` / ``runs:/`` URI or an existing path; a
bare name like ``model=tiny`` stays the Hydra group). X is ``models:/<name>@<alias>``,
``models:/<name>/<version>``, ``runs:/<run_id>/model_<stage>`` (resolved in ``tracking.uri``), a
run directory or a ``con.pt`` path. Everything else is a Hydra override (``data.*``, ``eval.*``,
``tracking.*``); the model's own architecture, frame count, caption length and sample rate come
from the model, not from the config.

Variants (rows of the table, in ``trainer.evaluation.suite``'s order, as after training):
``con`` (stage-1 WTI similarity), ``con_dual_softmax`` (t2v ranked on the t2v dual softmax, v2t
on the v2t one), ``con_qb_norm`` (QB-Norm; querybank = the first ``eval.qb_bank`` captions and their videos of
``data.train_split``, encoded by the same encoder; ``eval.qb_bank=0`` skips it; ``eval.qb_k``,
``eval.qb_beta``, ``eval.dual_softmax_temperature`` are config keys) and ``gen_rerank`` (if the
model has a generator).

Flags: ``--model``, ``--out PATH`` (metrics JSON; default ``eval_metrics.json``), ``--mlflow`` (log
the metrics and JSON as a new run in ``tracking.experiment``).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

from trainer.launchers.cli import ConfigError, compose

USAGE = "usage: python launch/eval.py --model <models:/name@champion | run dir | con.pt> [flags] [overrides]"


@dataclasses.dataclass
class EvalArgs:
    model: str
    out: Path
    mlflow: bool
    overrides: list[str]


def parse_args(argv: list[str]) -> EvalArgs:
    from trainer.serve.registry import pop_model_reference

    try:
        model, argv = pop_model_reference(argv)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--out", type=Path, default=Path("eval_metrics.json"))
    parser.add_argument("--mlflow", action="store_true")
    known, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("--")]
    if stray:
        raise ConfigError(f"unknown flag {stray[0]!r}; {USAGE} (flags: --out --mlflow)")
    if not model:
        raise ConfigError(f"no model given; {USAGE}")
    return EvalArgs(model, known.out.resolve(), known.mlflow, rest)


def run_eval(args: EvalArgs, dcfg) -> dict:
    import torch
    from omegaconf import OmegaConf

    from shards.index import read_index
    from shards.tokenize import CaptionTokenizer
    from trainer.components.data import eval_loader
    from trainer.evaluation.suite import score_encoder, score_generator
    from trainer.components.distributed import DistInfo
    from trainer.components.extraction import extract_split
    from trainer.components.feature_store import read_index as read_bank_index
    from trainer.components.features import encode_split, limited
    from trainer.serve.registry import load_bundle
    from trainer.evaluation.report import summary_table, write_metrics_json

    cfg = OmegaConf.to_object(dcfg)
    started = time.time()
    device = torch.device("cuda" if cfg.run.device != "cpu" and torch.cuda.is_available() else "cpu")
    bundle = load_bundle(args.model, tracking_uri=cfg.tracking.uri).to(device)
    encoder, s = bundle.encoder, bundle.settings
    # The model decides how inputs are shaped; the config only says where the data is.
    data = dataclasses.replace(cfg.data, max_frames=bundle.max_frames, max_words=s.max_words, sample_fps=s.sample_fps)
    read_index(data.shards, data.test_split)  # ShardsNotFound names the fix
    tokenizer = CaptionTokenizer(data.max_words)
    # Encoded the way a training run encodes its test split (trainer.components.extraction: the same
    # parts, so the same batches and the same floats), into a scratch bank.
    index = read_index(data.shards, data.test_split)
    with tempfile.TemporaryDirectory(prefix="eval-bank-") as scratch:
        bank = extract_split(encoder, shard_names=[x["name"] for x in index["shards"]],
                             loader_for=lambda names: eval_loader(data, bundle.model_config, data.test_split, names),
                             max_words=data.max_words, shards_per_part=data.num_workers, root=Path(scratch), key={},
                             dtype=torch.float32, dist=DistInfo(0, 1, 0, device), desc=f"encode {data.test_split}",
                             progress=cfg.run.progress, total_samples=int(index["total_samples"]))
        bank_index = read_bank_index(Path(scratch))
    # (the scratch folder is gone; its arrays stay mapped until the bank is: POSIX unlinks lazily)
    # what the scores stand on: every sample the index lists is scored or counted as dropped
    test_data = {"in_split": bank_index["total_samples"], "scored": bank.num_videos,
                 **{k: v for k, v in bank_index["counters"].items() if v}}

    e = cfg.eval
    qb_split = data.train_split

    def querybank():
        read_index(data.shards, qb_split)
        loader = limited(eval_loader(data, bundle.model_config, qb_split), e.qb_bank)
        return encode_split(encoder, loader, tokenizer, device, torch.float32, "encode querybank", cfg.run.progress)

    result, qb_info = score_encoder(encoder, bank, e, querybank)
    if qb_info is not None:
        qb_info["split"] = qb_split
    if bundle.generators is not None:
        # the weight the training run chose on its val split, unless eval.rerank_alpha= is given here
        given = any(o.startswith("eval.rerank_alpha=") for o in args.overrides)
        alpha = None if given else s.rerank_alpha
        score_generator(result, bank, bundle.generators, bundle.alphas_cumprod().to(device), e, cfg.run.seed, alpha)
        result.rerank_alpha = e.rerank_alpha if alpha is None else alpha
        print(f"gen_rerank alpha {result.rerank_alpha} ({'given' if given else 'chosen on val at training' if alpha is not None else 'eval.rerank_alpha'})")
    t = e.dual_softmax_temperature

    elapsed = time.time() - started
    payload = {"model": args.model, "source": bundle.source, "shards": data.shards, "split": data.test_split,
               "num_videos": bank.num_videos, "num_captions": len(bank.captions), "test_data": test_data,
               "rerank_alpha": result.rerank_alpha,
               "querybank": qb_info,
               "dual_softmax_temperature": t, "elapsed_s": round(elapsed, 1), "metrics": result.metrics}
    out = write_metrics_json(args.out, payload)
    if bank.num_videos < test_data["in_split"]:
        print(f"warning: {data.test_split}: scored {bank.num_videos} of its {test_data['in_split']} samples ({test_data})")
    print(f"\n{args.model}: {data.shards} {data.test_split} (scored {bank.num_videos} of its {test_data['in_split']} "
          f"samples, {len(bank.captions)} captions), "
          f"{elapsed:.1f} s\n{summary_table(result.metrics)}\nmetrics: {out}")
    if args.mlflow:
        log_to_mlflow(cfg, args, result, out, test_data)
    return payload


def log_to_mlflow(cfg, args: EvalArgs, result, json_path: Path, test_data: dict) -> None:
    from trainer.evaluation.scoring import eval_metric_names
    from trainer.components.tracking import MetricsLogger

    e = cfg.eval
    tags = {"kind": "eval", "model": args.model, "split": cfg.data.test_split}
    with MetricsLogger(cfg.tracking.uri, cfg.tracking.experiment, run_name=f"eval {args.model}", tags=tags) as tracker:
        tracker.log_params({"model": args.model, "data.shards": cfg.data.shards, "qb_bank": e.qb_bank,
                            "qb_k": e.qb_k, "qb_beta": e.qb_beta, "ds_temperature": e.dual_softmax_temperature})
        tracker.log_metrics(eval_metric_names(result.metrics), step=0)
        tracker.log_metrics({f"eval/data_{cfg.data.test_split}_{k}": float(v) for k, v in test_data.items()}, step=0)
        tracker.log_artifact(json_path)
    print(f"MLflow run {tracker.run_id} at {tracker.shown_uri}")


def main(argv: list[str] | None = None) -> int:
    from trainer.launchers.errors import run_entry_point

    def load():
        args = parse_args(sys.argv[1:] if argv is None else argv)
        return args, compose(args.overrides)

    return run_entry_point(load, lambda loaded: run_eval(*loaded))


if __name__ == "__main__":
    sys.exit(main())
