"""Multi-rank DeepSpeed on CPU (gloo): the `deepspeed` launcher with 2 ranks end to end, the
1-rank vs 2-rank loss equivalence of stage con, and ZeRO 1/2/3 in fp32/bf16 with checkpoint export.

Everything runs real processes: the launcher test starts `deepspeed --num_gpus 2 launch/train.py`
(DS_ACCELERATOR=cpu makes each "gpu" a CPU rank), the others start gloo ranks with
``torch.multiprocessing.spawn`` that go through ``trainer.components.distributed.init_distributed``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.support import NO_VAL, free_port

REPO = Path(__file__).resolve().parent.parent
TINY_RUN = [
    "data.max_frames=4", "data.max_words=16", "data.batch_size=4", "data.eval_batch_size=8", "data.num_workers=0",
    "stage.con.max_steps=3", "stage.gen.max_steps=3", "stage.gen.batch_size=8", "stage.gen.timesteps=5",
    "eval.rerank_topk=4", "run.progress=false", "tracking.flush_every_s=0.5", NO_VAL,
]
GLOBAL_BATCH = 8
STEPS = 5  # DeepSpeed WarmupCosineLR gives the first two updates lr 0 (see engine.py)


def deepspeed_train(*overrides: str, ranks: int = 2, timeout: int = 900) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N launch/train.py ...` with CPU ranks."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), "launch/train.py", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- launcher, 2 ranks


@pytest.fixture(scope="module")
def two_rank_con(synthetic_corpus, synthetic_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds_con")
    proc = deepspeed_train("--stage", "con", f"data.root={synthetic_corpus}", f"data.shards={synthetic_shards}",
                           f"run.dir={out / 'run'}", f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
                           "launcher=deepspeed", *TINY_RUN)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, proc


def _mlflow_metrics(out: Path) -> tuple[dict, dict]:
    from mlflow.tracking import MlflowClient

    payload = json.loads((out / "run" / "metrics.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, f"rank 1 must not open its own MLflow run: {[r.info.run_id for r in runs]}"
    assert runs[0].info.run_id == payload["mlflow_run_id"]
    return payload, runs[0].data.metrics


@pytest.mark.slow
def test_two_rank_stage_con_writes_metrics_once_and_logs_to_mlflow(two_rank_con):
    out, proc = two_rank_con
    assert "dist_world_size=2" in proc.stdout + proc.stderr
    payload, metrics = _mlflow_metrics(out)
    assert payload["stages"] == ["con"]
    assert "con/loss" in metrics and "eval/con/t2v_R1" in metrics
    assert (out / "run" / "con.pt").is_file()
    # 2 ranks x 4 per rank, 3 steps: the global batch is what the samples counter adds up.
    assert metrics["con/samples_seen"] == 3 * 2 * 4


@pytest.mark.slow
def test_two_rank_stage_gen_from_the_con_checkpoint(two_rank_con, synthetic_corpus, synthetic_shards, tmp_path):
    con_out, _ = two_rank_con
    proc = deepspeed_train("--stage", "gen", f"stage.gen.init={con_out / 'run' / 'con.pt'}", f"data.root={synthetic_corpus}",
                           f"data.shards={synthetic_shards}", f"run.dir={tmp_path / 'run'}",
                           f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *TINY_RUN)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    payload, metrics = _mlflow_metrics(tmp_path)
    assert payload["stages"] == ["gen"] and "gen_rerank" in payload["metrics"]
    assert "gen/loss" in metrics and "eval/gen_rerank/t2v_R1" in metrics
    assert (tmp_path / "run" / "gen.pt").is_file()
    check_banks_extracted_once_across_ranks(tmp_path / "run", synthetic_shards)


def check_banks_extracted_once_across_ranks(run_dir: Path, shards: Path) -> None:
    """Each split's parts were encoded once, split over both ranks, and the bank is the one a single
    rank extracts (row order is the shards', whatever the number of ranks)."""
    from shards.index import read_index
    from trainer.components.data import eval_loader
    from trainer.components.distributed import DistInfo
    from trainer.components.export import load_export, load_into
    from trainer.components.extraction import extract_split
    from trainer.components.feature_store import open_bank, store_dtype
    from trainer.config import DataConfig, ModelConfig
    from trainer.models import build_encoder

    indexes = {json.loads(p.read_text())["key"]["split"]: p for p in (run_dir / "features").glob("*/index.json")}
    assert set(indexes) == {"train", "test"}
    for split, path in indexes.items():
        index = json.loads(path.read_text())
        names = [s["name"] for s in read_index(shards, split)["shards"]]
        assert [p["shards"] for p in index["parts"]] == [[n] for n in names]  # data.num_workers=0: a shard a part
        assert [p["rank"] for p in index["parts"]] == [i % 2 for i in range(len(names))]
    train = json.loads(indexes["train"].read_text())
    con = Path(train["key"]["encoder"]["path"])  # the stage-con export the run started from
    model = ModelConfig(**load_export(con)["model_config"])
    key = train["key"]
    encoder = build_encoder(model, key["max_frames"])
    load_into(encoder, load_export(con), "encoder.", con)
    data = DataConfig(shards=str(shards), max_frames=key["max_frames"], max_words=key["max_words"],
                      sample_fps=key["sample_fps"], eval_batch_size=8, num_workers=0)
    one = extract_split(encoder.eval(), shard_names=[s["name"] for s in read_index(shards, "train")["shards"]],
                        loader_for=lambda names: eval_loader(data, model, "train", names), max_words=key["max_words"],
                        shards_per_part=1, root=run_dir.parent / "one_rank", key=key, dtype=store_dtype(key["dtype"]),
                        dist=DistInfo(0, 1, 0, torch.device("cpu")),
                        desc="one rank", progress=False, total_samples=train["total_samples"])
    two = open_bank(indexes["train"].parent, torch.device("cpu"))
    assert two.video_ids == one.video_ids and torch.equal(two.text_to_video, one.text_to_video)
    assert torch.equal(two.text_tokens.x, one.text_tokens.x)
    # Same parts, other processes and thread counts: the vision tower's BLAS need not round alike
    # (1 fp16 ulp apart on an AMD EPYC, equal on the Xeons before it)
    torch.testing.assert_close(two.video_tokens.x.float(), one.video_tokens.x.float(), atol=1e-3, rtol=0)


# --------------------------------------------------------------------------- spawned gloo ranks


def _fixed_global_batch(max_frames: int, image_size: int, max_words: int) -> dict[str, torch.Tensor]:
    """The same GLOBAL_BATCH samples for every run: 4 videos with 2 captions each (group ids)."""
    g = torch.Generator().manual_seed(1234)
    n = GLOBAL_BATCH
    text_mask = torch.ones(n, max_words, dtype=torch.bool)
    text_mask[:, 6:] = False
    video_mask = torch.ones(n, max_frames, dtype=torch.bool)
    video_mask[::3, -1] = False
    return {
        "video": torch.randn(n, max_frames, 3, image_size, image_size, generator=g),
        "video_mask": video_mask,
        "text": torch.randint(1, 1000, (n, max_words), generator=g),
        "text_mask": text_mask,
        "groups": torch.arange(n) // 2,
    }


def _rank_main(rank: int, world: int, port: int, zero_stage: int, precision: str, out_dir: str) -> None:
    """One gloo rank: init through trainer.components.distributed, train STEPS steps of stage con's task on
    this rank's slice of the fixed global batch, save a checkpoint and export fp32 weights."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    from trainer.components.export import fp32_state_dict
    from trainer.config import ConConfig, DeepSpeedConfig, ModelConfig
    from trainer.components.distributed import init_distributed
    from trainer.components.engine import build_engine, engine_dtype
    from trainer.models import build_encoder
    from trainer.stages.con import ContrastiveTask, param_groups

    dist = init_distributed("gloo", "cpu")
    assert (dist.rank, dist.world_size) == (rank, world)
    model = ModelConfig(embed_dim=32, image_size=32, patch_size=16, vision_width=32, vision_layers=1,
                        vision_head_width=16, text_width=32, text_layers=1, text_heads=2, temporal_layers=1,
                        weight_mlp_hidden=32)
    max_frames, max_words = 3, 8
    torch.manual_seed(0)  # identical initial weights on every rank and in every run
    encoder = build_encoder(model, max_frames)
    con = ConConfig()
    ds = DeepSpeedConfig(zero_stage=zero_stage, precision=precision, grad_clip=1.0)
    per_rank = GLOBAL_BATCH // world
    engine = build_engine(ContrastiveTask(encoder), param_groups(encoder, 1e-3, 1.0), ds, micro_batch=per_rank,
                          total_steps=10, warmup_ratio=0.1, weight_decay=con.weight_decay)
    dtype = engine_dtype(engine)
    batch = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in
             _fixed_global_batch(max_frames, model.image_size, max_words).items()}
    losses = []
    for _ in range(STEPS):
        loss = engine(batch["video"].to(dtype), batch["video_mask"], batch["text"], batch["text_mask"],
                      batch["groups"])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    save_dir = Path(out_dir) / "ckpt"
    engine.save_checkpoint(str(save_dir), tag="t3")
    if rank == 0:
        exported = fp32_state_dict(engine, save_dir, "t3")
        names = sorted(n for n, p in engine.module.named_parameters() if p.requires_grad)
        missing = [n for n in names if n not in exported]
        report = {"losses": losses, "missing": missing, "n_exported": len(exported),
                  "not_fp32": sorted(k for k, v in exported.items() if v.is_floating_point() and v.dtype != torch.float32),
                  "shapes_ok": all(n in exported and exported[n].shape == s for n, s in _full_shapes(engine))}
        (Path(out_dir) / "report.json").write_text(json.dumps(report))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # Skip interpreter teardown: a ZeRO-3 worker thread can be destroyed unjoined there, which
    # aborts a process whose work (the report above) is already complete.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _full_shapes(engine) -> list[tuple[str, torch.Size]]:
    """Each trainable parameter's full shape (ZeRO-3 keeps only a partition; ds_shape is the full one)."""
    return [(n, getattr(p, "ds_shape", p.shape)) for n, p in engine.module.named_parameters() if p.requires_grad]


def run_ranks(world: int, zero_stage: int, precision: str, out_dir: Path) -> dict:
    torch.multiprocessing.spawn(_rank_main, args=(world, free_port(), zero_stage, precision, str(out_dir)),
                                nprocs=world, join=True)
    return json.loads((out_dir / "report.json").read_text())


@pytest.mark.slow
def test_one_rank_and_two_ranks_give_the_same_loss_curve_in_fp32(tmp_path):
    """The contrastive loss is over the gathered global batch, so 1 rank x 8 samples and 2 ranks x 4
    (the same 8, in the same order) must agree. fp32; tolerance 1e-4 relative: the only difference
    is the summation order of the gradient all-reduce (~1e-7 relative per step), which AdamW's
    1/sqrt(v) normalisation can amplify over 3 steps but not to 1e-4."""
    one = run_ranks(1, 1, "fp32", tmp_path / "one")
    two = run_ranks(2, 1, "fp32", tmp_path / "two")
    assert len(one["losses"]) == STEPS
    assert len(set(one["losses"])) >= 3  # it trained: the comparison is not of constants
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage, precision", [(1, "bf16"), (2, "bf16"), (3, "bf16"), (3, "fp32")])
def test_zero_stage_trains_checkpoints_and_exports_fp32(zero_stage, precision, tmp_path):
    report = run_ranks(2, zero_stage, precision, tmp_path)
    assert all(torch.isfinite(torch.tensor(report["losses"])))
    assert report["missing"] == [], f"fp32 export lacks trainable parameters: {report['missing'][:5]}"
    assert report["not_fp32"] == [], f"fp32 export holds 16-bit tensors: {report['not_fp32'][:5]}"
    assert report["shapes_ok"]


def _adopt_main(rank: int, world: int, port: int, out_dir: str) -> None:
    """A rank whose group is already up (as Ray Train's workers are) before init_distributed."""
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank))
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from trainer.components.distributed import init_distributed

    info = init_distributed("auto", "cpu")
    t = torch.tensor([rank + 1.0])
    torch.distributed.all_reduce(t)
    error = ""
    try:
        init_distributed("nccl", "cpu")
    except RuntimeError as err:
        error = str(err)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(
        {"rank": info.rank, "world": info.world_size, "adopted": info.adopted, "sum": t.item(), "error": error}))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_init_distributed_adopts_a_live_process_group(tmp_path):
    torch.multiprocessing.spawn(_adopt_main, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert (got["rank"], got["world"], got["adopted"], got["sum"]) == (rank, 2, True, 3.0)
        assert "already initialised with backend 'gloo'" in got["error"]
