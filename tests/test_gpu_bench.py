"""launch/bench.py gpu --tiny: the GPU check's script runs end to end on CPU at toy sizes, so it is
known to work before a GPU is lent (its Ray part is what tests/test_ray_source.py runs; its pytest part is one subprocess call)."""
import json

import pytest

from launch.bench import main

pytestmark = pytest.mark.slow  # a DeepSpeed rank process


def test_gpu_bench_tiny_writes_json(tmp_path):
    out = tmp_path / "gpu.json"
    main(["gpu", "--tiny", "--skip", "ray,tests", "--out", str(out)])
    saved = json.loads(out.read_text())
    run = saved["train"]["runs"][0]
    assert run["step_s"] > 0 and run["samples_per_s"] > 0 and run["flops_per_step_rank0"] > 0
    assert run["mfu"] is None  # no MFU on CPU: the peak is a GPU's
    assert saved["jpeg"]["cpu"]["clips"] == 3 and saved["jpeg"]["cpu"]["clips_per_s"] > 0
    assert saved["ops"]["wti"] and "eval" in saved["ops"]
    assert "ray" not in saved and "tests" not in saved
