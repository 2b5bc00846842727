"""Gradient accumulation and fp16 under the DeepSpeed engine of ``trainer.components.engine``.

The contrastive loss is not additive over micro-batches (each micro-batch is its own candidate
pool), so accumulation over ``grad_accum`` micro-batches must equal one optimiser step on the
*mean of the micro-batch losses' gradients*, not a step on the pooled batch. The engine runs in a
spawned 1-rank gloo process (DeepSpeed needs a process group; spawning keeps it out of pytest's
process); the hand-written reference (torch AdamW, clipping, the WarmupCosineLR schedule stepped
once per optimiser step) runs here, from the same initial weights.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from trainer.config import ConConfig, DeepSpeedConfig, ModelConfig
from tests.support import free_port

MODEL = ModelConfig(embed_dim=32, image_size=32, patch_size=16, vision_width=32, vision_layers=1, vision_head_width=16,
                    text_width=32, text_layers=1, text_heads=2, temporal_layers=1, weight_mlp_hidden=32,
                    logit_scale_init=100.0)  # the gradient norms below (and GRAD_CLIP) were measured at scale 100
MAX_FRAMES, MAX_WORDS, MICRO_BATCH = 3, 8, 4
GRAD_ACCUM = 2
OPT_STEPS = 4  # WarmupCosineLR gives updates 1-2 lr 0 (Adam moments still move), 3-4 lr x1.0 and x0.5
LR, WARMUP_RATIO = 1e-3, 0.5
# The mean gradient's norm is ~230, 270, 180, 140 over the 4 steps: clipping at 200 acts on steps 1-2
# only, which makes the gradient's scale visible through AdamW (otherwise nearly scale-invariant), so
# a summed (not averaged) accumulation or a per-micro-batch clip would give different weights.
GRAD_CLIP = 200.0
# fp32 on both sides; only summation orders differ (DeepSpeed's flat ZeRO buffers, loss scaling by
# 1/grad_accum before backward), measured ~2e-5 of the largest weight change. AdamW turns gradients
# that are zero up to rounding (softmax-invariant biases: ~1e-7) into full +-lr steps of random
# sign, so elements whose gradient never exceeds GRAD_NOISE are left out of the comparison.
TOLERANCE = 1e-3
GRAD_NOISE = 1e-5


def micro_batches() -> list[dict[str, torch.Tensor]]:
    """OPT_STEPS x GRAD_ACCUM distinct micro-batches; within each, 2 videos x 2 captions (groups)."""
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(OPT_STEPS * GRAD_ACCUM):
        text_mask = torch.ones(MICRO_BATCH, MAX_WORDS, dtype=torch.bool)
        text_mask[:, 5 + i % 3:] = False
        video_mask = torch.ones(MICRO_BATCH, MAX_FRAMES, dtype=torch.bool)
        video_mask[::3, -1] = False
        out.append({
            "video": torch.randn(MICRO_BATCH, MAX_FRAMES, 3, MODEL.image_size, MODEL.image_size, generator=g),
            "video_mask": video_mask,
            "text": torch.randint(1, 1000, (MICRO_BATCH, MAX_WORDS), generator=g),
            "text_mask": text_mask,
            "groups": torch.arange(MICRO_BATCH) // 2 + 10 * i,
        })
    return out


def initial_encoder():
    from trainer.models import build_encoder

    torch.manual_seed(0)  # the engine's rank and the reference start from identical weights
    return build_encoder(MODEL, MAX_FRAMES)


def ds_config(zero_stage: int, precision: str = "fp32", grad_accum: int = GRAD_ACCUM) -> DeepSpeedConfig:
    return DeepSpeedConfig(zero_stage=zero_stage, precision=precision, grad_accum=grad_accum, grad_clip=GRAD_CLIP)


def _task_loss(task, batch: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return task(batch["video"].to(dtype), batch["video_mask"], batch["text"], batch["text_mask"], batch["groups"])


# --------------------------------------------------------------------------- the engine, in a spawned rank


def _engine_main(rank: int, port: int, zero_stage: int, out_dir: str) -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu")
    from trainer.components.distributed import init_distributed
    from trainer.components.engine import build_engine, learning_rates
    from trainer.stages.con import ContrastiveTask, param_groups

    init_distributed("gloo", "cpu")
    encoder = initial_encoder()
    engine = build_engine(ContrastiveTask(encoder), param_groups(encoder, LR, 1.0), ds_config(zero_stage),
                          micro_batch=MICRO_BATCH, total_steps=OPT_STEPS, warmup_ratio=WARMUP_RATIO,
                          weight_decay=ConConfig().weight_decay)
    trace, snapshots = [], []
    for i, batch in enumerate(micro_batches()):
        boundary = engine.is_gradient_accumulation_boundary()
        lrs = learning_rates(engine)  # the lr this micro-batch's window will be stepped with
        loss = _task_loss(engine, batch)
        engine.backward(loss)
        engine.step()
        trace.append({"micro": i, "boundary": boundary, "loss": loss.item(), "global_steps": engine.global_steps,
                      "sched_iter": engine.lr_scheduler.last_batch_iteration,
                      "grad_norm": float(engine.get_global_grad_norm() or 0.0), **lrs})  # before clipping
        if boundary:
            snapshots.append({n: p.detach().clone() for n, p in encoder.named_parameters()})
    torch.save(snapshots, Path(out_dir) / "snapshots.pt")
    (Path(out_dir) / "trace.json").write_text(json.dumps(trace))
    torch.distributed.destroy_process_group()


def run_engine(zero_stage: int, out_dir: Path) -> tuple[list[dict], list[dict[str, torch.Tensor]]]:
    torch.multiprocessing.spawn(_engine_main, args=(free_port(), zero_stage, str(out_dir)), nprocs=1, join=True)
    return json.loads((out_dir / "trace.json").read_text()), torch.load(out_dir / "snapshots.pt")


# --------------------------------------------------------------------------- the hand-written reference


@dataclass
class Reference:
    weights: list[dict[str, torch.Tensor]]  # after each optimiser step
    norms: list[float]  # gradient norm before clipping, per optimiser step
    signal: dict[str, torch.Tensor]  # elements whose gradient ever rose above numerical noise
    with_gradient: int = 0  # elements whose gradient was ever non-zero


def run_reference(reduction: str = "mean") -> Reference:
    """Plain torch: grads of the mean of the micro-batch losses, clip, AdamW, one schedule step.
    The *wrong* targets a test must tell apart: the ``sum`` of the micro-batch losses, and one
    ``pooled`` loss over the concatenated window."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    from trainer.components.engine import deepspeed_config
    from trainer.stages.con import ContrastiveTask, param_groups

    encoder = initial_encoder()
    task = ContrastiveTask(encoder)
    groups = [dict(g, weight_decay=ConConfig().weight_decay) for g in param_groups(encoder, LR, 1.0)]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-6)
    schedule = deepspeed_config(ds_config(1), MICRO_BATCH, OPT_STEPS, WARMUP_RATIO)["scheduler"]
    assert schedule["type"] == "WarmupCosineLR"
    scheduler = WarmupCosineLR(optimizer, **schedule["params"])
    params = [p for g in groups for p in g["params"]]
    batches, out = micro_batches(), Reference([], [], {})
    signal = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in encoder.named_parameters()}
    nonzero = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in encoder.named_parameters()}
    for step in range(OPT_STEPS):
        window = batches[step * GRAD_ACCUM:(step + 1) * GRAD_ACCUM]
        optimizer.zero_grad()
        if reduction == "pooled":
            _task_loss(task, {k: torch.cat([b[k] for b in window]) for k in window[0]}).backward()
        else:
            for batch in window:
                (_task_loss(task, batch) / (GRAD_ACCUM if reduction == "mean" else 1)).backward()
        for n, p in encoder.named_parameters():
            if p.grad is not None:
                signal[n] |= p.grad.abs() > GRAD_NOISE
                nonzero[n] |= p.grad != 0
        out.norms.append(torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP).item())
        optimizer.step()
        scheduler.step()
        out.weights.append({n: p.detach().clone() for n, p in encoder.named_parameters()})
    out.signal, out.with_gradient = signal, sum(m.sum().item() for m in nonzero.values())
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], where: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() == where.keys()
    return max(((a[n] - b[n]).abs() * where[n]).max().item() for n in a)


@pytest.fixture(scope="module")
def reference() -> Reference:
    ref = run_reference()
    # Clipping must act on some steps and not on others, or the mean-vs-sum check loses its teeth;
    # if the tiny model changed, re-pick GRAD_CLIP between the smallest and largest norm.
    assert min(ref.norms) < GRAD_CLIP < max(ref.norms), f"gradient norms {ref.norms} vs GRAD_CLIP={GRAD_CLIP}"
    # The elements left out are few: softmax-invariant biases (attention keys, token-weight heads).
    compared = sum(m.sum().item() for m in ref.signal.values())
    assert compared >= 0.95 * ref.with_gradient, f"only {compared} of {ref.with_gradient} trained weights are compared"
    return ref


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    """``engine_run(zero_stage) -> (trace, weights per optimiser step)``, each stage run once."""
    cache: dict[int, tuple] = {}

    def get(zero_stage: int):
        if zero_stage not in cache:
            cache[zero_stage] = run_engine(zero_stage, tmp_path_factory.mktemp(f"zero{zero_stage}"))
        return cache[zero_stage]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 2])
def test_accumulated_steps_equal_adamw_on_the_mean_of_micro_batch_gradients(zero_stage, reference, engine_run):
    trace, engine_steps = engine_run(zero_stage)
    # The accumulated gradient itself (before clipping and AdamW, which hide its scale) is the mean's.
    assert [t["grad_norm"] for t in trace if t["boundary"]] == pytest.approx(reference.norms, rel=1e-5)
    assert len(engine_steps) == OPT_STEPS
    initial = {n: p.detach() for n, p in initial_encoder().named_parameters()}
    moved = max_diff(reference.weights[-1], initial, reference.signal)
    assert moved > 1e-4, "the reference did not train: the comparison would be of constants"
    for step, (got, want) in enumerate(zip(engine_steps, reference.weights), start=1):
        assert max_diff(got, want, reference.signal) <= TOLERANCE * moved, \
            f"optimiser step {step}: the engine's weights differ from AdamW on the mean micro-batch gradient"
    # The comparison tells the right target from the nearby wrong ones.
    for wrong in ("sum", "pooled"):
        off = max_diff(engine_steps[-1], run_reference(wrong).weights[-1], reference.signal)
        assert off > 10 * TOLERANCE * moved, f"the engine is as close to the {wrong!r} target ({off:.2e})"


@pytest.mark.slow
def test_optimizer_and_schedule_advance_once_per_accumulation_window(engine_run):
    trace, _ = engine_run(1)
    assert [t["boundary"] for t in trace] == [False, True] * OPT_STEPS
    assert [t["global_steps"] for t in trace] == [i // GRAD_ACCUM + (i % GRAD_ACCUM == GRAD_ACCUM - 1)
                                                  for i in range(OPT_STEPS * GRAD_ACCUM)]
    assert trace[-1]["global_steps"] == OPT_STEPS
    assert trace[-1]["sched_iter"] == OPT_STEPS - 1  # starts at -1, one step per optimiser step
    lrs = [t["lr_group1"] for t in trace]
    assert all(lrs[i] == lrs[i + 1] for i in range(0, len(lrs), GRAD_ACCUM)), f"lr moved inside a window: {lrs}"
    per_step = lrs[::GRAD_ACCUM]
    assert per_step == pytest.approx([0.0, 0.0, LR, LR * 0.5]), f"lr per optimiser step: {per_step}"


# --------------------------------------------------------------------------- fp16


def _fp16_supported() -> bool:
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


def test_fp16_without_accelerator_support_is_refused_with_a_clear_error():
    if _fp16_supported():
        pytest.skip("this accelerator supports fp16")
    from trainer.components.engine import build_engine
    from trainer.stages.con import ContrastiveTask, param_groups

    encoder = initial_encoder()
    with pytest.raises(ValueError, match=r"deepspeed.precision=fp16 needs a GPU; use bf16 or fp32 on CPU"):
        build_engine(ContrastiveTask(encoder), param_groups(encoder, LR, 1.0), ds_config(1, "fp16", 1),
                     micro_batch=MICRO_BATCH, total_steps=OPT_STEPS, warmup_ratio=WARMUP_RATIO, weight_decay=0.2)


def _fp16_main(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from trainer.components.distributed import init_distributed
    from trainer.components.engine import build_engine, engine_dtype
    from trainer.stages.con import ContrastiveTask, param_groups

    dist = init_distributed("auto", "cuda")
    encoder = initial_encoder()
    engine = build_engine(ContrastiveTask(encoder), param_groups(encoder, LR, 1.0), ds_config(1, "fp16", 1),
                          micro_batch=MICRO_BATCH, total_steps=8, warmup_ratio=0.25, weight_decay=0.2)
    dtype, trace = engine_dtype(engine), []
    for batch in micro_batches():
        batch = {k: v.to(dist.device) for k, v in batch.items()}
        loss = _task_loss(engine, batch, dtype)
        engine.backward(loss)
        engine.step()
        trace.append({"loss": loss.item(), "scale": float(engine.optimizer.cur_scale),
                      "skipped": engine.skipped_steps})
    (Path(out_dir) / "fp16.json").write_text(json.dumps({"dtype": str(dtype), "trace": trace}))
    torch.distributed.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 under DeepSpeed needs CUDA here")
def test_fp16_trains_with_dynamic_loss_scaling(tmp_path):
    torch.multiprocessing.spawn(_fp16_main, args=(free_port(), str(tmp_path)), nprocs=1, join=True)
    got = json.loads((tmp_path / "fp16.json").read_text())
    assert got["dtype"] == "torch.float16"
    losses = [t["loss"] for t in got["trace"]]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    scales = [t["scale"] for t in got["trace"]]
    # Dynamic scaling starts at 2**16 (engine.py) and only ever halves on overflow or grows.
    assert all(s >= 1.0 for s in scales) and scales[0] <= 2.0 ** 16, scales
    assert got["trace"][-1]["skipped"] < len(losses), "every fp16 step overflowed: nothing was trained"


# --------------------------------------------------------------------------- the stage-con loop


@pytest.mark.slow
def test_stage_con_counts_optimizer_steps_with_accumulation(synthetic_corpus, synthetic_shards, tmp_path):
    """stage.con.max_steps, logging and checkpoints count optimiser steps; each takes grad_accum
    micro-batches, and the LR schedule spans exactly max_steps of them."""
    from mlflow.tracking import MlflowClient

    from tests.support import launch_train
    from trainer.components.checkpoint import MARKER

    steps, batch, run_dir, uri = 3, 4, tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = launch_train("stage=con", f"data.root={synthetic_corpus}", f"data.shards={synthetic_shards}",
                        f"run.dir={run_dir}", f"tracking.uri={uri}", f"stage.con.max_steps={steps}",
                        f"stage.con.lr={LR}", "stage.con.log_every=1", "run.checkpoint_every=1", "run.keep_last=5",
                        f"deepspeed.grad_accum={GRAD_ACCUM}", "deepspeed.precision=fp32", "data.max_frames=4",
                        "data.max_words=16", f"data.batch_size={batch}", "data.num_workers=0", "run.progress=false",
                        "run.device=cpu", "tracking.flush_every_s=0.2", "eval.block=64", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    run_id = json.loads((run_dir / "metrics.json").read_text())["mlflow_run_id"]

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}

    assert history("con/samples_seen") == {k: k * GRAD_ACCUM * batch for k in range(1, steps + 1)}
    tags = sorted(p.name for p in (run_dir / "checkpoints" / "con").glob("step*") if (p / MARKER).is_file())
    assert tags == [f"step{k:08d}" for k in range(1, steps + 1)]
    # Logged after step k: the lr of step k+1. warmup 2 (0, then x1), then the cosine reaches 0 at
    # step `steps`; a schedule counted in micro-batches would still be near its peak (x0.85).
    lr = history("con/lr_group1")
    assert [lr[k] for k in range(1, steps + 1)] == pytest.approx([0.0, LR, 0.0], abs=1e-12)
