"""`heads report`: one self-contained HTML page per run (tiny trained run on synthetic slides)."""

import base64
import io
import re
import shutil
from html import escape as html_escape

import pytest
from PIL import Image

from embedstore.errors import UserError
from heads import report, runs
from heads.splits import SplitConfig
from heads.train import TrainConfig
from tests.clirun import run_cli


def quiet(msg):
    pass


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    """A small store (2 slides, 240 cells) with a trained, evaluated and predicted run."""
    import torch

    from embedstore.extract.pipeline import ExtractConfig, extract
    from embedstore.synth import make_synthetic
    from tests.conftest import FAST

    root = tmp_path_factory.mktemp("report")
    synth = make_synthetic(root / "data", seed=7, n_cells=240, n_slides=2)
    db = root / "db"
    extract(synth.out_dir / "slides", synth.cells_path, db, ExtractConfig(**FAST, commit_every=100))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = TrainConfig(epochs=2, global_epochs=2, gate_epochs=1, batch_size=64)
        run = root / "run"
        runs.train(
            db, run, "all", cfg, scale=False, split_config=SplitConfig(guard_um=40), log=quiet
        )
        runs.evaluate_run(run, db, baselines=("knn",), log=quiet)
        runs.predict(run, db, log=quiet)
    finally:
        torch.set_num_threads(n)
    return db, run, runs.ckpt.read_info(run, "local")["classes"]


@pytest.fixture(scope="module")
def page(predicted):
    db, run, _ = predicted
    out = report.write_report(run, db, log=quiet)
    assert out == run / "report.html"
    return out.read_text(encoding="utf-8")


def test_page_is_self_contained(page):
    # nothing fetched from elsewhere: no external src/href, no script, every image inline
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', page)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(srcs) == page.count("<img") > 10
    for src in srcs:
        m = re.fullmatch(r"data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)", src)
        assert m, src[:80]
        with Image.open(io.BytesIO(base64.b64decode(m.group(2), validate=True))) as im:
            im.verify()
            assert im.format == m.group(1).upper()


def test_page_has_every_section_classes_and_galleries(predicted, page):
    _, _, classes = predicted
    ids = report.report_sections()
    assert ids[0] == "results" and "galleries" in ids and len(ids) == len(set(ids))
    for sid, heading in report.SECTIONS:
        assert f'<section id="{sid}"><h2>{heading}</h2>' in page
        assert f'href="#{sid}"' in page  # table of contents
    for cls in classes:
        assert cls in page
    for path in ("local (FiLM)", "global", "gate", "safety rule", "knn[both]"):
        assert f"<th>{path}</th>" in page
    galleries = page[page.index('<section id="galleries">') :]
    assert galleries.count('<div class="tile">') >= 6 and "most confident, correct" in galleries
    # each tile: the 56 µm crop and its 256 µm context field
    assert galleries.count('alt="56 µm crop"') == galleries.count('alt="256 µm context"')
    # plots that could be drawn here were drawn, not replaced by a note
    for sid in (
        "per-class-f1",
        "confusion",
        "calibration",
        "conformal",
        "gate",
        "complementarity",
        "batch-effect",
    ):
        body = page[page.index(f'<section id="{sid}">') :]
        body = body[: body.index("</section>")]
        assert "<figure><img" in body, sid
    assert len(page.encode()) < 3_000_000


def test_refuses_missing_run_and_missing_predictions(predicted, tmp_path):
    db, run, _ = predicted
    with pytest.raises(UserError, match="does not exist.*heads train"):
        report.write_report(tmp_path / "no-such-run", db, log=quiet)
    other = tmp_path / "other-run"  # a run of that name was never predicted on this store
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("report.html", "predictions"))
    with pytest.raises(UserError, match=r"no predictions of run 'other-run'.*heads predict --run"):
        report.write_report(other, db, log=quiet)
    assert not (other / "report.html").exists()
    from tests.test_explore import clustered_store

    bare = clustered_store(tmp_path / "bare")[0]  # a store with no predictions table at all
    with pytest.raises(UserError, match=r"holds no predictions.*heads predict --run"):
        report.write_report(run, bare, log=quiet)


def test_missing_metrics_are_made_by_eval(predicted, monkeypatch):
    db, run, _ = predicted
    saved = (run / "metrics.json").read_text()
    calls = []

    def fake_eval(run_dir, db_, **kw):  # the real one is covered by test_heads_cli
        calls.append(run_dir)
        (run_dir / "metrics.json").write_text(saved)

    (run / "metrics.json").unlink()
    try:
        monkeypatch.setattr(runs, "evaluate_run", fake_eval)
        metrics = report.load_metrics(run, db, "cells", quiet)
    finally:
        (run / "metrics.json").write_text(saved)
    assert calls == [run] and "gate" in metrics["paths"]


def test_page_of_the_val_cells_is_its_own_and_says_so(predicted, page):
    """`heads eval --on val` writes RUN/eval-val/, but `heads report` could only show the test
    page: the val scores (the cells that chose the model) had no page, and no way to get one."""
    db, run, _ = predicted
    test_page, test_metrics = (run / "report.html").read_bytes(), (run / "metrics.json").read_bytes()
    out = report.write_report(run, db, on="val", log=quiet)  # evaluates on val first: none yet
    assert out == run / "eval-val" / "report.html" and (run / "eval-val" / "metrics.json").exists()
    text = out.read_text(encoding="utf-8")
    assert "(val cells)</title>" in text and "Scored on the <b>val</b> cells" in text
    assert "validation cells that chose the model" in text  # eval's warning, shown on the page
    assert (run / "report.html").read_bytes() == test_page and (run / "metrics.json").read_bytes() == test_metrics
    with pytest.raises(UserError, match="--on must be one of test, val, train, all"):
        report.write_report(run, db, on="holdout", log=quiet)
    with pytest.raises(UserError, match="--on val picks a part of the run's own split; --cohort c"):
        report.write_report(run, db, on="val", cohort="c", log=quiet)


def test_cli_prints_the_path(predicted, tmp_path):
    """The store given as a URI: every section drawn, the batch effect from a temporary index."""
    db, run, _ = predicted
    out = tmp_path / "sub" / "page.html"
    uri = db.resolve().as_uri()
    proc = run_cli("cli.heads", "report", "--run", run, "--db", uri, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out) and out.stat().st_size > 100_000
    assert "MB in" in proc.stderr  # size and time logged on stderr
    assert "building a temporary index" in proc.stderr
    text = out.read_text(encoding="utf-8")
    assert "not computed" not in text and "not drawn" not in text, re.findall(r"not (?:computed|drawn)[^<]*", text)
    assert html_escape(uri) in text


def test_page_in_a_real_browser_loads_every_figure(predicted, page, tmp_path):
    """Headless Chromium at a laptop's viewport: every image decodes, no console error, no
    request leaves the file, every section is there; the screenshot is kept for review."""
    from tests.browser import check_page

    _, run, _ = predicted
    shot = run / "report.png"
    seen = check_page(run / "report.html", shot)
    assert seen.images >= 10, seen
    assert not seen.broken_images and not seen.console_errors and not seen.failed_requests, seen
    assert not seen.external_requests, seen
    assert seen.section_ids == report.report_sections()
    assert shot.stat().st_size > 50_000
    with Image.open(shot) as im:
        assert im.width == 1366 and im.height == seen.page_height_px
