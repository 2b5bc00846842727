"""The one stage-loop skeleton both stages run (torchtitan style: the loop calls components).

A stage supplies what differs: its micro-batches (an endless iterator), one micro-step (forward,
backward, engine step -> metrics and sample count), and extra metrics to log. The skeleton owns
what they share: the progress bar, graceful preemption, the gradient-accumulation boundary (a
step is an optimizer step; only between those is it safe to checkpoint, since DeepSpeed saves no
partial gradients), the log cadence, mid-stage evaluation, and handing the checkpoint manager its
chances to save (the manager owns the cadence) and the final save.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator

from tqdm import tqdm

from trainer.components.checkpoint import CheckpointManager
from trainer.components.engine import learning_rates
from trainer.components.preemption import GracefulStop, Preempted
from trainer.components.rundir import STOP_FILE

MicroStep = Callable[[object], tuple[dict[str, float], int]]  # item -> (metrics incl. "loss", samples)


class LoopState:
    """Optimizer steps taken and samples seen (global); checkpointed with the stage."""

    def __init__(self) -> None:
        self.step = 0
        self.samples_seen = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])


def epochs(source: Iterable) -> Iterator:
    """A data source's batches, one pass (epoch) after another, without end. A source that streams
    its epochs itself (``RayStreamLoader.epochs``: one decode pipeline for all of them) does so."""
    if hasattr(source, "epochs"):
        yield from source.epochs()
        return
    while True:
        empty = True
        for batch in source:
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the train split yielded no batches in a whole epoch; check its shards and "
                               "quarantine log, or lower data.batch_size below the samples per rank")


def run_stage(ctx, stage: str, engine, ckpt: CheckpointManager, state: LoopState, *, total: int,
              micro_batches: Iterator, micro_step: MicroStep, log_every: int,
              extra_metrics: Callable[[], dict[str, float]] = dict,
              evaluate: Callable[[int], float | None] | None = None, eval_every: int = 0,
              monitor: Callable[[int, dict[str, float]], None] | None = None):
    """Run optimizer steps ``state.step + 1 .. total``; returns the final checkpoint's tag dir.

    ``evaluate(step)`` runs every ``eval_every`` steps (not at the last: the run evaluates after the
    stage) and the checkpoint taken right after it is ranked by its score. ``monitor(step, logged)``
    sees every logged set of metrics (collapse detection); it may raise to end the stage."""
    timer, window = StepTimer(), []  # window: the micro-step metrics of the optimizer step in progress
    metrics: dict[str, float] = {}
    progress = tqdm(total=total, initial=state.step, desc=f"stage {stage}",
                    disable=not (ctx.cfg.run.progress and ctx.dist.is_main))
    with GracefulStop(ctx.run_dir / STOP_FILE) as stop:
        for item in (micro_batches if state.step < total else ()):
            timer.data_ready()
            boundary = engine.is_gradient_accumulation_boundary()
            parts, samples = micro_step(item)
            window.append(parts)
            state.samples_seen += samples
            timer.step_done(samples)
            if not boundary:
                continue
            state.step += 1
            metrics, window = {k: sum(w[k] for w in window) / len(window) for k in window[0]}, []
            progress.update()
            progress.set_postfix(loss=f"{metrics['loss']:.3f}")
            step = state.step
            if step % log_every == 0 or step == total:
                logged = {**metrics, "samples_seen": state.samples_seen, **extra_metrics(), **learning_rates(engine),
                          **timer.read()}
                ctx.log(stage, logged, step)
                if monitor is not None:
                    monitor(step, logged)
            if step >= total:
                break
            if stop.should_stop():
                ckpt.save(engine, step, loss=metrics["loss"])
                raise Preempted(step)
            if evaluate is not None and eval_every and step % eval_every == 0:
                ckpt.save_scored(engine, step, evaluate(step))
            else:
                ckpt.maybe_save(engine, step, loss=metrics["loss"])
    progress.close()
    return ckpt.save(engine, state.step, finished=True, loss=metrics.get("loss"))


class StepTimer:
    """Samples/s and the fraction of wall time spent waiting for data, per logging window."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = self.mark = time.perf_counter()
        self.wait = 0.0
        self.samples = 0

    def data_ready(self) -> None:
        now = time.perf_counter()
        self.wait += now - self.mark
        self.mark = now

    def step_done(self, samples: int) -> None:
        self.samples += samples
        self.mark = time.perf_counter()

    def read(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"samples_per_s": self.samples / elapsed, "data_wait_frac": self.wait / elapsed}
        self.reset()
        return out
