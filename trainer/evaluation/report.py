"""The end-of-run text report (stage 1 vs stage 2 at a glance) and the metrics JSON file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

COLUMNS = ("R1", "R5", "R10", "R50", "MdR", "MnR", "Rsum")
DIRECTIONS = ("t2v", "v2t")


def _rsum(metrics: Mapping[str, float]) -> float | None:
    if "Rsum" in metrics:
        return float(metrics["Rsum"])
    if all(k in metrics for k in ("R1", "R5", "R10")):
        return float(metrics["R1"]) + float(metrics["R5"]) + float(metrics["R10"])
    return None


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{float(value):.1f}"


def summary_table(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """Fixed-width table, one row per variant x direction, columns R1 R5 R10 R50 MdR MnR Rsum
    (Rsum = R1+R5+R10 when absent), then a line with each variant's Rsum delta vs the first variant.

    ``results[variant][direction][metric]``, e.g. ``results["con"]["t2v"]["R1"]``.
    """
    rows = []
    for variant, by_direction in results.items():
        directions = [d for d in DIRECTIONS if d in by_direction]
        directions += [d for d in by_direction if d not in DIRECTIONS]
        for direction in directions:
            metrics = by_direction[direction]
            cells = [_cell(_rsum(metrics) if c == "Rsum" else metrics.get(c)) for c in COLUMNS]
            rows.append([variant, direction] + cells)
    header = ["variant", "dir"] + list(COLUMNS)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        left = [str(c).ljust(w) for c, w in zip(cells[:2], widths[:2])]
        right = [str(c).rjust(w) for c, w in zip(cells[2:], widths[2:])]
        return "  ".join(left + right).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]

    variants = list(results)
    if len(variants) > 1:
        base = variants[0]
        deltas = []
        for variant in variants[1:]:
            parts = []
            for direction in DIRECTIONS:
                base_rsum = _rsum(results[base].get(direction, {}))
                rsum = _rsum(results[variant].get(direction, {}))
                if base_rsum is not None and rsum is not None:
                    parts.append(f"{direction} {rsum - base_rsum:+.1f}")
            deltas.append(f"{variant}: " + (", ".join(parts) if parts else "n/a"))
        out.append(f"Rsum delta vs {base}: " + "; ".join(deltas))
    return "\n".join(out)


def _to_json(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy arrays/scalars and torch tensors
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"write_metrics_json: cannot serialise {type(obj).__name__} value {obj!r}")


def write_metrics_json(path: Path, payload: dict) -> Path:
    """Write ``payload`` as JSON (indent 2, sorted keys) atomically: a reader or a preempted writer
    never leaves a half-written file, because it is written to a temp file and ``os.replace``d."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=2, sort_keys=True, default=_to_json) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
