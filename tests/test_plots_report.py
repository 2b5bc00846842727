"""Figures and the text/JSON run report, on tiny real rank arrays."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.evaluation.plots import (
    plot_loss_curves,
    plot_rank_histograms,
    plot_recall_curves,
    plot_stage_comparison,
    recall_at_k,
)
from trainer.evaluation.report import summary_table, write_metrics_json

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _assert_sane_png(path: Path, min_bytes: int = 5_000) -> None:
    assert path.stat().st_size > min_bytes  # a blank canvas is ~3 KB; drawn axes + lines are more
    width, height = _png_size(path)
    assert 300 <= width <= 2000 and 200 <= height <= 1500


@pytest.fixture
def ranks() -> dict[str, object]:
    gen = torch.Generator().manual_seed(0)
    con = torch.randint(1, 200, (300,), generator=gen)
    gen_rerank = torch.clamp(con - 3, min=1)  # a re-ranker that helps
    return {"con t2v": con, "gen_rerank t2v": gen_rerank, "con v2t": con.numpy()[::-1].copy()}


def test_recall_at_k_matches_direct_count():
    ranks = np.array([1, 1, 2, 5, 11, 100, 101])
    ks, recall = recall_at_k(ranks)
    assert ks[0] == 1 and ks[-1] == 100
    assert recall[0] == pytest.approx(200 / 7)  # two of seven at rank 1
    assert recall[4] == pytest.approx(400 / 7)  # ranks <= 5
    assert recall[99] == pytest.approx(600 / 7)  # 101 is outside top 100
    with pytest.raises(ValueError, match="start at 1"):
        recall_at_k(np.array([0, 1]))


def test_plot_recall_curves(tmp_path, ranks):
    path = plot_recall_curves(ranks, tmp_path / "figs" / "recall.png", "MSRVTT recall@K")
    assert path == tmp_path / "figs" / "recall.png"
    _assert_sane_png(path)


def test_plot_rank_histograms(tmp_path, ranks):
    _assert_sane_png(plot_rank_histograms(ranks, tmp_path / "hist.png", "rank of the true video"))


def test_plot_stage_comparison_flat_and_nested(tmp_path):
    flat = {"con": {"t2v_R1": 44.5, "t2v_R5": 71.4, "t2v_R10": 81.6, "v2t_R1": 42.0, "v2t_R5": 70.1,
                    "v2t_R10": 80.2},
            "gen_rerank": {"t2v_R1": 49.0, "t2v_R5": 75.2, "t2v_R10": 82.7, "v2t_R1": 47.7,
                           "v2t_R5": 73.8, "v2t_R10": 84.0}}
    path = plot_stage_comparison(flat, tmp_path / "stages.png")
    _assert_sane_png(path)
    width, _ = _png_size(path)
    assert width >= 1000  # two panels (t2v, v2t) side by side

    nested = {v: {d: {k: m[f"{d}_{k}"] for k in ("R1", "R5", "R10")} for d in ("t2v", "v2t")}
              for v, m in flat.items()}
    _assert_sane_png(plot_stage_comparison(nested, tmp_path / "stages_nested.png"))

    t2v_only = {v: {k: x for k, x in m.items() if k.startswith("t2v")} for v, m in flat.items()}
    narrow = plot_stage_comparison(t2v_only, tmp_path / "t2v_only.png")
    assert _png_size(narrow)[0] < width  # one panel

    with pytest.raises(ValueError, match="t2v_R1"):
        plot_stage_comparison({"con": {"loss": 1.0}}, tmp_path / "bad.png")


def test_plot_loss_curves(tmp_path):
    history = {"con/loss": [(s, 4.0 * 0.95**s) for s in range(0, 200, 5)],
               "gen/loss": [(s, 0.01 + 1.0 / (1 + s)) for s in range(200, 300, 5)]}
    _assert_sane_png(plot_loss_curves(history, tmp_path / "loss.png"))


RESULTS = {
    "con": {"t2v": {"R1": 44.5, "R5": 71.4, "R10": 81.6, "R50": 95.2, "MdR": 2.0, "MnR": 15.3},
            "v2t": {"R1": 42.1, "R5": 70.0, "R10": 80.0, "R50": 94.0, "MdR": 2.0, "MnR": 12.9,
                    "Rsum": 192.1}},
    "gen_rerank": {"t2v": {"R1": 49.0, "R5": 75.2, "R10": 82.7, "R50": 96.0, "MdR": 2.0, "MnR": 12.1},
                   "v2t": {"R1": 41.0, "R5": 69.0, "R10": 80.0, "R50": 93.0, "MdR": 2.0, "MnR": 13.0}},
}


def test_summary_table_contains_numbers_and_delta():
    table = summary_table(RESULTS)
    lines = table.splitlines()
    header = lines[0].split()
    assert header == ["variant", "dir", "R1", "R5", "R10", "R50", "MdR", "MnR", "Rsum"]
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in lines[2:6]}
    assert rows[("con", "t2v")] == ["44.5", "71.4", "81.6", "95.2", "2.0", "15.3", "197.5"]
    assert rows[("con", "v2t")][-1] == "192.1"  # given Rsum is used as is
    assert rows[("gen_rerank", "t2v")] == ["49.0", "75.2", "82.7", "96.0", "2.0", "12.1", "206.9"]
    assert rows[("gen_rerank", "v2t")][-1] == "190.0"
    # fixed width: every row is as long as the header or shorter only by trailing spaces
    assert len({len(line) for line in lines[:6]}) == 1
    assert lines[-1] == "Rsum delta vs con: gen_rerank: t2v +9.4, v2t -2.1"


def test_summary_table_missing_values_and_single_variant():
    table = summary_table({"con": {"t2v": {"R1": 10.0}}})
    assert "delta" not in table
    assert table.splitlines()[2].split() == ["con", "t2v", "10.0", "-", "-", "-", "-", "-", "-"]


def test_write_metrics_json_round_trips(tmp_path):
    payload = {"results": RESULTS, "step": np.int64(120), "ranks": torch.tensor([1, 3, 2]),
               "run_id": "abc", "zeta": 1, "alpha": 2}
    path = write_metrics_json(tmp_path / "eval" / "metrics.json", payload)
    text = path.read_text()
    loaded = json.loads(text)
    assert loaded["results"] == RESULTS
    assert loaded["step"] == 120 and loaded["ranks"] == [1, 3, 2]
    assert text.index('"alpha"') < text.index('"zeta"')  # sorted keys
    assert '\n  "alpha": 2' in text  # indent=2
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind

    write_metrics_json(path, {"v": 2})  # replaces atomically
    assert json.loads(path.read_text()) == {"v": 2}

    with pytest.raises(TypeError, match="cannot serialise"):
        write_metrics_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"v": 2}  # a failed write leaves the old file intact
    assert list(path.parent.iterdir()) == [path]
