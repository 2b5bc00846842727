"""Learning, measured: seeds x corpora x precisions of the default recipe, each a real training run
(``launch/train.py``: stage con, stage gen, evaluation) on a generated corpus, packed as frame
shards (``--pack-format``). Measured on 2 cores, 2 runs at a time: 153-244 s a run (720 con
steps; fp32 and the 80 px counting corpus the slower; the 360-step recipe took ~170 s a run from
video shards, ~95 s from frame shards), 21.8 min for the matrix (``--precisions``/``--seeds`` cut it).

Per run: con and gen_rerank t2v/v2t R@1 and Rsum on the test split, chance R@1, whether stage con
collapsed (the run's MLflow tag), and the wall time. Per (corpus, precision): the mean over
seeds, con R@1 as a multiple of chance, and gen - con. Nothing here is tuned on the test split:
``eval.rerank_alpha`` is chosen on the val split carved from train (``data.synthetic.n_val``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("learn", help="con / gen R@1 over seeds x corpora x precisions (real training runs)")
    p.add_argument("--corpora", default="synthetic,counting")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--precisions", default="bf16,fp32")
    p.add_argument("--n-train", type=int, default=320, help="train videos generated (val carved from them)")
    p.add_argument("--n-val", type=int, default=32)
    p.add_argument("--n-test", type=int, default=64)
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each with cores/jobs threads)")
    p.add_argument("--pack-format", choices=("frames", "video"),
                   help="data.pack.format of the generated corpora (default: their YAML's, frames)")
    p.add_argument("--workdir", type=Path, default=Path("bench") / "learn")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override for every run")
    return p


def _env(threads: int) -> dict[str, str]:
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def _corpus_overrides(args, corpus: str) -> list[str]:
    root = (args.workdir / "corpora" / corpus).resolve()
    return [f"data={corpus}", f"data.root={root}", f"data.synthetic.n_train={args.n_train}",
            f"data.synthetic.n_val={args.n_val}", f"data.synthetic.n_test={args.n_test}", "data.val_split=val"]


def _prepare(args, corpus: str) -> None:
    """Generate and pack the corpus once, before runs share it (with the ``--override``s: a
    ``data.pack.*`` one decides how the shards are written, which the runs cannot change later)."""
    cmd = [sys.executable, str(REPO / "launch" / "pack.py"), *_corpus_overrides(args, corpus), "run.progress=false",
           *([f"data.pack.format={args.pack_format}"] if args.pack_format else []),
           *[o for o in args.override if o.startswith("data.")], "--splits", "train,val,test"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(os.cpu_count() or 2), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"packing {corpus} failed: {proc.stderr[-2000:]}")


def _collapsed(uri: str, run_id: str) -> bool:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri).get_run(run_id).data.tags.get("collapsed") == "true"


def _one(args, corpus: str, seed: int, precision: str, threads: int) -> dict:
    name = f"{corpus}-{precision}-s{seed}"
    run_dir = (args.workdir / "runs" / name).resolve()
    # One store per run: runs start at once, and two processes creating one sqlite store race its migration.
    uri = f"sqlite:///{run_dir}.db"
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), *_corpus_overrides(args, corpus),
           f"run.seed={seed}", f"deepspeed.precision={precision}", f"run.name={name}", f"run.dir={run_dir}",
           "run.overwrite=true",  # a rerun of the bench replaces its own earlier run
           f"tracking.uri={uri}", "tracking.register=false", "run.progress=false", "run.stop_on_collapse=false",
           *args.override]
    started = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(threads), capture_output=True, text=True)
    row = {"corpus": corpus, "seed": seed, "precision": precision, "exit": proc.returncode,
           "wall_s": round(time.time() - started, 1)}
    if proc.returncode != 0:
        return dict(row, error=proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output")
    out = json.loads((run_dir / "metrics.json").read_text())
    m = out["metrics"]
    row.update(chance_R1=out["chance"]["t2v"]["R1"], test_videos=out["test_videos"], test_texts=out["test_texts"],
               collapsed=_collapsed(uri, out["mlflow_run_id"]), rerank_alpha=out.get("rerank_alpha"))
    for variant in ("con", "gen_rerank"):
        for direction in ("t2v", "v2t"):
            row[f"{variant}_{direction}_R1"] = m[variant][direction]["R1"]
            row[f"{variant}_{direction}_Rsum"] = m[variant][direction]["Rsum"]
    return row


def _summary(rows: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["exit"] == 0:
            groups.setdefault((r["corpus"], r["precision"]), []).append(r)
    out = []
    for (corpus, precision), rs in sorted(groups.items()):
        def mean(key):
            return statistics.fmean(r[key] for r in rs)

        con, gen, chance = mean("con_t2v_R1"), mean("gen_rerank_t2v_R1"), mean("chance_R1")
        out.append({"corpus": corpus, "precision": precision, "seeds": len(rs), "chance_R1": round(chance, 2),
                    "con_t2v_R1": round(con, 2), "con_x_chance": round(con / chance, 1),
                    "gen_t2v_R1": round(gen, 2), "gen_minus_con_R1": round(gen - con, 2),
                    "gen_minus_con_Rsum_t2v": round(mean("gen_rerank_t2v_Rsum") - mean("con_t2v_Rsum"), 2),
                    "gen_minus_con_Rsum_v2t": round(mean("gen_rerank_v2t_Rsum") - mean("con_v2t_Rsum"), 2),
                    "con_t2v_R1_spread": [min(r["con_t2v_R1"] for r in rs), max(r["con_t2v_R1"] for r in rs)],
                    "collapsed": sum(bool(r["collapsed"]) for r in rs)})
    return out


def run(args) -> dict:
    corpora = [c for c in args.corpora.split(",") if c]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    precisions = [p for p in args.precisions.split(",") if p]
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    for corpus in corpora:
        _prepare(args, corpus)
    threads = max(1, (os.cpu_count() or 2) // max(1, args.jobs))
    jobs = [(c, s, p) for c in corpora for p in precisions for s in seeds]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda job: _one(args, *job, threads), jobs))
    summary = _summary(rows)
    print(f"{'corpus':<10} {'prec':<5} {'seeds':>5} {'chance':>6} {'con R1':>7} {'x chance':>8} {'gen R1':>7} "
          f"{'gen-con':>7} {'dRsum t2v':>9} {'dRsum v2t':>9} {'collapsed':>9}")
    for s in summary:
        print(f"{s['corpus']:<10} {s['precision']:<5} {s['seeds']:>5} {s['chance_R1']:>6.2f} {s['con_t2v_R1']:>7.2f} "
              f"{s['con_x_chance']:>8.1f} {s['gen_t2v_R1']:>7.2f} {s['gen_minus_con_R1']:>+7.2f} "
              f"{s['gen_minus_con_Rsum_t2v']:>+9.2f} {s['gen_minus_con_Rsum_v2t']:>+9.2f} {s['collapsed']:>9}")
    failed = [r for r in rows if r["exit"] != 0]
    for r in failed:
        print(f"FAILED {r['corpus']} {r['precision']} seed {r['seed']}: {r.get('error')}")
    return {"runs": rows, "summary": summary, "wall_s": round(time.time() - started, 1),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "run"}}
