"""launch/bench.py decode --quick: real clips, packed as-is and transcoded, through decord and the loader."""
import json

import pytest

from launch.bench import main

pytestmark = pytest.mark.slow  # DataLoader worker processes


def test_decode_bench_quick_writes_json(tmp_path):
    import os

    import torch

    out = tmp_path / "decode.json"
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    main(["decode", "--quick", "--long-clips", "0", "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    # it measures on one thread, and leaves the process as it found it (later tests and subprocesses
    # once inherited OMP_NUM_THREADS=1 and computed other floats than the runs they compare with)
    assert (torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")) == (threads, omp)
    saved = json.loads(out.read_text())
    assert saved["transcoded"]["transcode"] == {"short_side": 224, "fps": 8, "gop": 8, "fastdecode": True}
    assert saved["frames"]["frames"]["fps"] == 1.0 and saved["frames"]["raw_decoder"].startswith("decode_jpeg")
    assert saved["frames_vs_video_per_core"] > 0 and saved["frames"]["bytes_per_clip"] > 0
    assert saved["frames"]["pipeline"]["clips"] >= 16 and saved["frames"]["pipeline"]["skipped"] == {}
    for name, fps in (("original", 25), ("transcoded", 8)):
        x = saved[name]
        assert x["decord_get_batch"]["clips"] >= 16 and x["decord_get_batch"]["per_cpu_s"] > 0
        assert x["pipeline"]["clips"] >= 16 and x["pipeline"]["skipped"] == {}
        assert x["pipeline_vs_decord_per_cpu_s"] > 0
        if saved["reference_decoder"].startswith("opencv"):
            assert x["opencv_every_frame"]["frames_decoded"] == 3 * 6 * fps  # every frame of 3 clips of 6 s
        else:
            assert x["opencv_every_frame"] is None and "bench" in saved["reference_decoder"]
