"""launch/bench.py dispatcher + ops bench in --quick mode."""

import json

from launch.bench import main


def test_ops_bench_quick_writes_json(tmp_path):
    out = tmp_path / "ops.json"
    results = main(["ops", "--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [r["N"] for r in saved["wti"]] == [16, 48]
    for row in saved["wti"]:
        assert row["ours"]["total_s"] > 0 and row["naive"]["total_s"] > 0
        assert row["max_abs_grad_diff_vs_naive"] < 1e-4
        assert "ratio_time_ours_over_naive" in row
    assert saved["eval"]["rerank_s"] > 0 and saved["eval"]["similarity_s"] > 0 and "Generators" in saved["eval"]["generator"]
    assert results["wti"][0]["N"] == 16
