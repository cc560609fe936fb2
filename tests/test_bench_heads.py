"""bench/heads.py runs end to end at a tiny size and reports the bare-loop baseline."""

import importlib.util
import json
from pathlib import Path


def test_bench_heads_reports_the_bare_loop_share(capsys, one_torch_thread):
    path = Path(__file__).resolve().parents[1] / "bench" / "heads.py"
    spec = importlib.util.spec_from_file_location("bench_heads", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--cells", "1500", "--local-dim", "32", "--context-dim", "24", "--classes", "4",
                     "--tissues", "2", "--slides", "2", "--epochs", "2", "--gate-epochs", "1", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    bare = out["bare_torch_loop"]
    assert bare["cells_per_s"] > 0 and bare["share_of_bare"] > 0
    assert set(out["stages"]) == {"local", "global", "gate"}
    for stage in out["stages"].values():
        assert stage["train_s_to_within_0.005_of_best"] is not None
        assert stage["train_s_to_within_0.005_of_best"] <= sum(stage["epoch_s"]) + 0.2
