"""Catching a stage that has stopped learning: a contrastive loss that sits at chance, ln(pool),
or similarities with no spread left (every caption scores every video alike).

A collapsed run must say so: it warns on stderr with the likely causes and fixes, tags its MLflow
run ``collapsed=true`` and, unless ``run.stop_on_collapse=false``, stops with one line naming the
fix (exit 2) instead of finishing, writing plots and registering a model that ranks at chance.
Checks start after the warmup and not before ``run.collapse_min_step``: a randomly initialised
model starts near chance by construction, and a run of a few steps has not left it yet.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

CAUSES = ("likely causes: a learning rate too high for this model and corpus (try stage.con.lr / 10), "
          "too short a warmup (stage.con.warmup_ratio), or precision (try deepspeed.precision=fp32 to compare)")


class TrainingCollapsed(RuntimeError):
    """Stage training stopped learning; the message names what was seen and the fixes."""


@dataclass
class CollapseWatch:
    """Call :meth:`check` at every log interval; True once ``patience`` intervals in a row sit within
    ``margin`` nats of the chance loss ln(``pool``) or have a similarity spread under ``min_spread``."""

    stage: str
    pool: int  # candidates per query (the global batch, plus any queue)
    start_step: int  # no verdict before this optimizer step (the warmup's end)
    patience: int = 3
    margin: float = 0.05
    min_spread: float = 1e-4
    flagged: int = 0

    @property
    def chance_loss(self) -> float:
        return math.log(max(self.pool, 2))

    def check(self, step: int, loss: float, spread: float | None) -> bool:
        if step < self.start_step:
            return False
        at_chance = loss >= self.chance_loss - self.margin
        no_spread = spread is not None and spread < self.min_spread
        self.flagged = self.flagged + 1 if (at_chance or no_spread) else 0
        return self.flagged >= self.patience

    def verdict(self, step: int, loss: float, spread: float | None) -> str:
        seen = f"loss {loss:.3f} vs chance ln({self.pool}) = {self.chance_loss:.3f}"
        if spread is not None:
            seen += f", similarity std {spread:.2e}"
        return (f"stage {self.stage} stopped learning at step {step} ({seen}, {self.patience} log intervals in a "
                f"row); {CAUSES}")


def report_collapse(ctx, watch: CollapseWatch, step: int, loss: float, spread: float | None) -> None:
    """Warn, tag the MLflow run, and raise :class:`TrainingCollapsed` when ``run.stop_on_collapse``."""
    message = watch.verdict(step, loss, spread)
    if ctx.dist.is_main:
        print(f"warning: {message}", file=sys.stderr)
    ctx.tracker.set_tags({"collapsed": "true", f"collapsed.{watch.stage}_step": str(step)})
    if ctx.cfg.run.stop_on_collapse:
        raise TrainingCollapsed(f"{message}; the run was stopped (run.stop_on_collapse=false trains on regardless)")
