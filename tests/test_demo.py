"""The offline demo (`./justw demo`) end to end at a small size: every step runs and writes what
the README says (the main job on built-in synthetic data, as a new user first meets it)."""

import json

from cli import demo


def test_demo_runs_end_to_end_at_300_cells(tmp_path, one_torch_thread):
    """At 300 cells some of a query's neighbours have no kept label: the demo once crashed
    joining them (it prints "-")."""
    out = tmp_path / "demo"
    summary = demo.main(["--out", str(out), "--cells", "300", "--seed", "0"])
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    for key in ("annotate", "extract", "macro_f1_test", "similar_same_class_share", "audit", "report"):
        assert key in summary, key
    assert (out / "run" / "report.html").stat().st_size > 100_000
    assert (out / "similar.png").exists() and (out / "labels_report").is_dir()
