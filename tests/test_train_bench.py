"""launch/bench.py train: the engine step alone, then the same step fed by each shard format through
launch/train.py, with the run's own samples/s and data-wait fraction read back from MLflow."""
import json

import pytest

from launch.bench import main


@pytest.mark.slow  # DeepSpeed rank processes and two training subprocesses
def test_train_bench_feeds_both_formats_through_the_trainer(tmp_path):
    out, work = tmp_path / "train.json", tmp_path / "work"
    main(["train", "--ranks", "1", "--steps", "1", "--warmup", "1", "--batch-size", "2", "--feed-clips", "4",
          "--feed-seconds", "2", "--feed-steps", "8", "--feed-work-dir", str(work), "--out", str(out),
          "data.max_frames=4", "data.num_workers=1"])
    saved = json.loads(out.read_text())
    assert saved["runs"][0]["samples_per_s"] > 0
    assert [r["format"] for r in saved["feed"]] == ["video", "frames"]
    for row in saved["feed"]:
        assert row["log_windows"] == 2  # steps 4 and 8 (log_every 4): the second is the steady one
        assert row["samples_per_s"] > 0 and 0.0 <= row["data_wait_frac"] <= 1.0 and row["pack_s_per_clip"] > 0
        # each format trained on its own shards, as packed
        index = json.loads((work / f"shards-{row['format']}" / "bench.index.json").read_text())
        assert index["format"] == row["format"]


def test_an_unknown_format_is_one_line_exit_2_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--formats", "video,jpeg", "--out", str(tmp_path / "train.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'jpeg'" in err[0] and "video and/or frames" in err[0]
    assert not (tmp_path / "train.json").exists()
