"""`embed doctor`: the preflight says what blocks a run, how to fix it, and exits non-zero."""

import json

import numpy as np

from embedstore.doctor import blocking, run_checks
from tests.clirun import run_cli

TEST = ("--local-backbone", "test-vit-local", "--context-backbone", "test-vit-context")


def doctor(*args, env=None):
    return run_cli("cli.embed", "doctor", *args, env=env)  # in-process (tests/clirun.py)


def test_ready_machine_with_test_backbones_and_good_slides(synth_small):
    checks = run_checks([synth_small.out_dir / "slides"], local_backbone="test-vit-local",
                        context_backbone="test-vit-context", context_px=128)  # fmt: skip
    assert not blocking(checks), [c for c in checks if c.status == "fail"]
    slides = [c for c in checks if c.group == "slides"]
    assert len(slides) == len(synth_small.slides) and all("µm/px" in c.detail for c in slides)
    (timing,) = [c for c in checks if c.group == "timing"]
    assert "per 10k cells" in timing.detail and "ms/cell" in timing.detail
    assert {c.name for c in checks} >= {"torch", "lancedb", "faiss-cpu", "gpu", "disk"}


def test_missing_weights_and_a_broken_slide_block_the_run(tmp_path):
    bad = tmp_path / "slides" / "broken.svs"
    bad.parent.mkdir()
    bad.write_bytes(b"not a slide at all" * 100)
    env = {"NUCLASS_WEIGHTS_DIR": str(tmp_path / "weights"), "HF_HOME": str(tmp_path / "hf")}
    proc = doctor(bad.parent, "--no-timing", "--json", env=env)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "block a run" in proc.stderr
    report = json.loads(proc.stdout)  # data on stdout, the verdict on stderr
    assert report["ok"] is False
    failed = {c["name"]: c for c in report["checks"] if c["status"] == "fail"}
    assert set(failed) == {"uni2-h", "dinov3-vitl16", "broken.svs"}
    assert "hf download MahmoodLab/UNI2-h" in failed["uni2-h"]["fix"]
    assert "cannot open" in failed["broken.svs"]["detail"]


def test_missing_weights_skip_the_minute_of_timing_unless_asked(tmp_path, monkeypatch):
    """With UNI2-h's and DINOv3's weights missing, doctor spent ~80 s on a CPU timing random
    models of both before saying the run could not start."""
    from embedstore import doctor as D

    monkeypatch.setenv("NUCLASS_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    timed = []
    monkeypatch.setattr(D, "check_timing", lambda *a: timed.append(a) or [D.Check("timing", "extraction", "ok", "timed")])
    checks = run_checks(device="cpu")
    (timing,) = [c for c in checks if c.group == "timing"]
    assert not timed and timing.status == "warn" and "--timing" in timing.fix
    assert {c.name for c in blocking(checks)} == {"uni2-h", "dinov3-vitl16"}
    assert [c.detail for c in run_checks(device="cpu", timing=True) if c.group == "timing"] == ["timed"]
    proc = doctor("--timing", "--json")  # the CLI's flag reaches the checks
    assert [c["detail"] for c in json.loads(proc.stdout)["checks"] if c["group"] == "timing"] == ["timed"]


def test_unknown_backbone_is_one_failed_check_without_timing():
    checks = run_checks(local_backbone="no-such-net", context_backbone="test-vit-context")
    assert not [c for c in checks if c.group == "timing"]
    (bad,) = blocking(checks)
    assert "Unknown backbone 'no-such-net'" in bad.detail


def test_truncated_slide_is_a_failed_check_without_stray_log_lines(tmp_path, caplog):
    from embedstore.doctor import check_slides
    from embedstore.synth import write_pyramid

    path = tmp_path / "truncated.tif"
    image = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    write_pyramid(path, image, 0.5, "tiff", compression="zlib")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (check,) = blocking(check_slides([path], None))
    assert "corrupt or truncated" in check.detail and "copy the file again" in check.fix
    assert not [r for r in caplog.records if r.name == "tifffile"]  # "invalid page offset"
