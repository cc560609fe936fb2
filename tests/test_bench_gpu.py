"""bench/gpu.sh runs its whole code path on the CPU with the test backbones."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_small_on_cpu():
    out = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--device", "cpu", "--small", "--cells", "120", "--seconds", "0.2"],
        capture_output=True, text=True, timeout=300, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout)
    rates = doc["model"]
    for key in ("local_224", "context_512", "context_tile_1024"):
        assert rates[key]["images_per_s"] > 0 and rates[key]["gflop_per_image"] > 0
    assert doc["feed_exact_zero_model"]["cells"] == 120
    exact, tiled = doc["pipeline"]["exact"], doc["pipeline"]["tiled"]
    assert exact["cells"] == tiled["cells"] == 120
    assert tiled["tiles"] > 0 and exact["tiles"] == 0
    for run in (exact, tiled):
        assert run["cells_per_s"] > 0 and 0 < run["share_of_pure_model_rate"]
