"""Ops benchmark: blocked WTI loss vs the naive einsum, and evaluation at ActivityNet scale.

WTI part: symmetric cross-entropy over 100 * s, forward + backward, d=512, Lw=Lf=64, for each N
in --sizes; time and peak memory for ours and for the naive einsum where its A tensor fits the
budget. Eval part: --eval-n texts x videos (64 x 64 tokens) similarity with wti_similarity, the
retrieval metrics, and top-32 re-ranking in both directions with DDIM over --eval-steps steps
through the trainer's own ``rerank`` and generator architecture (see _bench_eval).

Peak memory: on CUDA, torch.cuda.max_memory_allocated above the allocation at the start of the
measured call. On CPU, the process RSS sampled every millisecond by a psutil thread, peak minus
the RSS at the start (inputs already allocated); freed heap is trimmed (malloc_trim) before each
measurement so earlier runs do not hide the delta. Both are "extra memory the call needed".
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from ops.ddim import cosine_alphas_cumprod
from ops.metrics import retrieval_metrics
from ops.wti import WTI_BACKWARDS, wti_similarity, wti_similarity_naive

GB = 1024 ** 3


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("ops", help="WTI similarity/loss and evaluation kernels")
    p.add_argument("--sizes", default="256,1024,4096", help="comma-separated pool sizes N")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--tokens", type=int, default=64, help="Lw = Lf")
    p.add_argument("--block", type=int, default=128, help="wti_similarity tile size")
    p.add_argument("--backward", default="auto", choices=WTI_BACKWARDS,
                   help="wti_similarity backward: gather (CPU default), dense (CUDA default)")
    p.add_argument("--repeats", type=int, default=1, help="timed repetitions (best is reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 1 on CUDA, 0 on CPU)")
    p.add_argument("--naive-budget-gb", type=float, default=8.0,
                   help="skip the naive version when its A tensor alone would exceed this")
    p.add_argument("--eval-n", type=int, default=4917, help="eval pool size (0 skips the eval part)")
    p.add_argument("--eval-k", type=int, default=32)
    p.add_argument("--eval-steps", type=int, default=50)
    p.add_argument("--eval-parts", default="similarity,rerank",
                   help="which eval parts to time; rerank alone re-ranks a random similarity matrix")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


class _PeakMemory:
    """Extra memory used inside a `with` block: CUDA allocator peak, or sampled CPU RSS."""

    def __init__(self, device: torch.device):
        self.device = device
        self.extra_bytes = 0

    @contextmanager
    def measure(self) -> Iterator[None]:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            start = torch.cuda.memory_allocated(self.device)
            yield
            torch.cuda.synchronize(self.device)
            self.extra_bytes = torch.cuda.max_memory_allocated(self.device) - start
            return
        import psutil
        _malloc_trim()
        proc = psutil.Process()
        start = proc.memory_info().rss
        peak = [start]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.001)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.set()
            thread.join()
            self.extra_bytes = peak[0] - start


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: deltas may be underestimated after earlier runs
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tokens(n: int, length: int, d: int, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, length, d, generator=g), dim=-1)
    lens = torch.randint(length // 2, length + 1, (n,), generator=g)  # realistic padding
    mask = torch.arange(length)[None, :] < lens[:, None]
    weight = torch.randn(n, length, generator=g).masked_fill(~mask, float("-inf")).softmax(-1)
    return x.to(device), weight.to(device), mask.to(device)


def _wti_loss(fn: Callable, inputs: tuple, **kw) -> torch.Tensor:
    s = fn(*inputs, **kw) * 100.0
    target = torch.arange(s.shape[0], device=s.device)
    return (F.cross_entropy(s, target) + F.cross_entropy(s.T, target)) / 2


def _time_fwd_bwd(fn: Callable, leaves: tuple, device: torch.device, repeats: int, warmup: int,
                  **kw) -> dict[str, Any]:
    def once() -> tuple[float, float, torch.Tensor]:
        for x in leaves:
            x.grad = None
        _sync(device)
        t0 = time.perf_counter()
        loss = _wti_loss(fn, leaves, **kw)
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(device)
        return t1 - t0, time.perf_counter() - t1, loss.detach()

    for _ in range(warmup):
        once()
    meter = _PeakMemory(device)
    best = None
    for _ in range(repeats):
        with meter.measure():
            fwd, bwd, loss = once()
        if best is None or fwd + bwd < best["fwd_s"] + best["bwd_s"]:
            best = {"fwd_s": fwd, "bwd_s": bwd, "peak_extra_bytes": meter.extra_bytes,
                    "loss": float(loss)}
    # Copied outside the measured block so the comparison does not inflate the peak.
    best["_grads"] = [x.grad.detach().clone() if x.grad is not None else None for x in leaves]
    for x in leaves:
        x.grad = None
    return best


def _bench_wti(n: int, args, device: torch.device) -> dict[str, Any]:
    L, d = args.tokens, args.dim
    text, tw, tm = _tokens(n, L, d, device, seed=0)
    video, vw, vm = _tokens(n, L, d, device, seed=1)
    for x in (text, tw, video, vw):
        x.requires_grad_()
    leaves = (text, tw, tm, video, vw, vm)
    warmup = args.warmup if args.warmup is not None else (1 if device.type == "cuda" else 0)
    row: dict[str, Any] = {"N": n, "L": L, "d": d, "block": args.block, "backward": args.backward,
                           "inputs_bytes": sum(x.numel() * x.element_size() for x in leaves)}
    ours = _time_fwd_bwd(wti_similarity, leaves, device, args.repeats, warmup, block=args.block,
                         backward=args.backward)
    naive_a_bytes = n * n * L * L * 4
    row["naive_A_bytes"] = naive_a_bytes
    if naive_a_bytes > args.naive_budget_gb * GB:
        naive = None
        row["naive_skipped"] = (f"A tensor alone is {naive_a_bytes / GB:.1f} GB > budget "
                                f"{args.naive_budget_gb} GB (--naive-budget-gb)")
    else:
        naive = _time_fwd_bwd(wti_similarity_naive, leaves, device, args.repeats, warmup)
        diffs = [float((a - b).abs().max()) for a, b in zip(ours["_grads"], naive["_grads"])
                 if a is not None and b is not None]
        row["max_abs_grad_diff_vs_naive"] = max(diffs)
        row["loss_diff_vs_naive"] = abs(ours["loss"] - naive["loss"])
    for name, res in (("ours", ours), ("naive", naive)):
        if res is not None:
            res.pop("_grads")
            res["total_s"] = res["fwd_s"] + res["bwd_s"]
            row[name] = res
    if naive is not None:
        row["ratio_time_ours_over_naive"] = ours["total_s"] / naive["total_s"]
        row["ratio_peak_ours_over_naive"] = ours["peak_extra_bytes"] / max(naive["peak_extra_bytes"], 1)
    return row


@torch.no_grad()
def _bench_eval(args, device: torch.device) -> dict[str, Any]:
    """The evaluation's two costly parts at --eval-n: the WTI similarity of every text against every
    video, then gen re-ranking of each query's top --eval-k in both directions through
    ``trainer.evaluation.scoring.rerank`` with a randomly initialised generator pair of the real
    architecture (the cost does not depend on the weights). ``--eval-parts rerank`` alone ranks a
    random similarity matrix instead: the candidates change, the work does not."""
    from trainer.evaluation.scoring import rerank
    from trainer.components.features import FeatureBank
    from trainer.models.generator import Generators

    n, L, d = args.eval_n, args.tokens, args.dim
    parts = {p.strip() for p in args.eval_parts.split(",") if p.strip()}
    text, tw, tm = _tokens(n, L, d, device, seed=2)
    video, vw, vm = _tokens(n, L, d, device, seed=3)
    meter = _PeakMemory(device)
    out: dict[str, Any] = {"N": n, "L": L, "d": d, "k": args.eval_k, "ddim_steps": args.eval_steps,
                           "parts": sorted(parts)}
    if "similarity" in parts:
        with meter.measure():
            _sync(device)
            t0 = time.perf_counter()
            sim = wti_similarity(text, tw, tm, video, vw, vm, block=args.block)
            _sync(device)
            out["similarity_s"] = time.perf_counter() - t0
        out["similarity_peak_extra_bytes"] = meter.extra_bytes
        t0 = time.perf_counter()
        retrieval_metrics(sim, torch.arange(n, device=device))
        _sync(device)
        out["metrics_s"] = time.perf_counter() - t0
    else:
        sim = torch.randn(n, n, generator=torch.Generator().manual_seed(4)).to(device)
    if "rerank" in parts:
        torch.manual_seed(0)
        generators = Generators(d).to(device).eval()
        bank = FeatureBank.from_dense(words=text, word_weights=tw, word_mask=tm, sentence=text[:, 0], frames=video,
                           frame_weights=vw, frame_mask=vm, text_to_video=torch.arange(n, device=device),
                           video_ids=[], captions=[])
        out["generator"] = "trainer.models.generator.Generators (t2v + v2t), random init, fp32"
        with meter.measure():
            _sync(device)
            t0 = time.perf_counter()
            rerank(sim, bank, generators, cosine_alphas_cumprod(args.eval_steps), topk=args.eval_k, alpha=1.0,
                   steps=args.eval_steps, seed=0)
            _sync(device)
            out["rerank_s"] = time.perf_counter() - t0
        out["rerank_peak_extra_bytes"] = meter.extra_bytes
    return out


def _fmt_bytes(b: float | None) -> str:
    return "-" if b is None else f"{b / GB:.2f}G"


def _print_table(results: dict[str, Any]) -> None:
    print(f"device: {results['device']}  threads: {results['threads']}  ({results['memory_method']})  "
          f"backward: {results['wti'][0]['backward'] if results['wti'] else '-'}")
    head = f"{'N':>6} | {'ours fwd+bwd':>12} {'ours peak':>9} | {'naive fwd+bwd':>13} {'naive peak':>10} | {'time o/n':>8} {'peak o/n':>8}"
    print(head)
    print("-" * len(head))
    for r in results["wti"]:
        o, nv = r["ours"], r.get("naive")
        naive_t = f"{nv['total_s']:.2f}s" if nv else "skipped"
        print(f"{r['N']:>6} | {o['total_s']:>11.2f}s {_fmt_bytes(o['peak_extra_bytes']):>9} | "
              f"{naive_t:>13} {_fmt_bytes(nv['peak_extra_bytes'] if nv else None):>10} | "
              f"{r.get('ratio_time_ours_over_naive', float('nan')):>8.2f} "
              f"{r.get('ratio_peak_ours_over_naive', float('nan')):>8.3f}")
        if "naive_skipped" in r:
            print(f"{'':>6}   naive: {r['naive_skipped']}")
    ev = results.get("eval")
    if ev and "similarity_s" in ev:
        print(f"eval N={ev['N']}: similarity {ev['similarity_s']:.2f}s "
              f"(peak +{_fmt_bytes(ev['similarity_peak_extra_bytes'])}), metrics {ev['metrics_s']:.2f}s")
    if ev and "rerank_s" in ev:
        print(f"eval N={ev['N']}: re-rank top-{ev['k']} x {ev['ddim_steps']} DDIM steps, t2v and v2t: "
              f"{ev['rerank_s']:.2f}s (peak +{_fmt_bytes(ev['rerank_peak_extra_bytes'])}) [{ev['generator']}]")


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.quick:
        sizes, args.dim, args.tokens = [16, 48], 64, 8
        args.eval_n, args.eval_steps = min(args.eval_n, 200), min(args.eval_steps, 10)
    torch.manual_seed(0)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "memory_method": ("torch.cuda.max_memory_allocated above start" if device.type == "cuda"
                          else "psutil RSS sampled every 1 ms, peak minus start"),
        "loss": "symmetric cross-entropy over 100 * s, forward + backward",
        "wti": [],
    }
    for n in sizes:
        results["wti"].append(_bench_wti(n, args, device))
        print(f"done N={n}", flush=True)
    if args.eval_n > 0:
        results["eval"] = _bench_eval(args, device)
    _print_table(results)
    return results
