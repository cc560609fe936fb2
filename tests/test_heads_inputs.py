"""`heads eval | report | explain` on awkward real-world inputs: a table without this run's
predictions, an --out that is a folder, an evaluation killed midway, metrics made on another
store, cell ids that differ only in characters a file name cannot hold, --on with --cohort.

Runs are trained on a small store written directly (no slides, no extraction): a few seconds."""

import json
import shutil

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from embedstore.store import Store, vectors_to_arrow
from heads import explain as ex
from heads import report, runs
from heads.splits import SplitConfig
from heads.train import TrainConfig
from tests.clirun import run_cli

QUICK = TrainConfig(epochs=1, global_epochs=1, gate_epochs=1, batch_size=64)
SLIDES = {"s0": "colon", "s1": "lung", "s2": "colon"}


def quiet(_msg):
    pass


def write_cells(store: Store, table: str, slides, ids, rng, y=None, n_classes=3):
    n = len(ids)
    y = rng.integers(0, n_classes, n) if y is None else y
    local = (np.random.default_rng(0).normal(size=(n_classes, 16)) * 2)[y] + rng.normal(size=(n, 16))
    x_um, y_um = rng.uniform(0, 400, n), rng.uniform(0, 400, n)
    store.cells_table(table, {"local": 16, "context": 8}, {"test": 1})
    store.append(table, pa.table({
        "slide_id": slides, "cell_id": ids, "x_px": x_um * 4, "y_px": y_um * 4, "x_um": x_um, "y_um": y_um,
        "tissue": [SLIDES.get(s, "colon") for s in slides], "run_id": ["t"] * n,
        "local_outside": np.zeros(n, np.float32), "local": vectors_to_arrow(local.astype(np.float32)),
        "context_outside": np.zeros(n, np.float32),
        "context": vectors_to_arrow(rng.normal(size=(n, 8)).astype(np.float32)),
    }))  # fmt: skip
    return y


def trained_run(root, cells_per_slide: int, seed: int = 0, evaluate: bool = True):
    """(db, run): 3 slides of `cells_per_slide` cells, 3 classes, 16 + 8-d vectors, labelled; a
    run trained on all stages, evaluated (when `evaluate`) and predicted."""
    rng = np.random.default_rng(seed)
    slides = np.repeat(list(SLIDES), cells_per_slide)
    ids = np.array([f"c{i:04d}" for i in range(len(slides))])
    db = root / "db"
    store = Store(db, create=True)
    y = write_cells(store, "cells", slides, ids, rng)
    store.set_labels(pl.DataFrame({"slide_id": slides, "cell_id": ids, "label": [f"k{v}" for v in y]}), source="t")
    run = root / "run"
    runs.train(db, run, "all", QUICK, scale=False, split_config=SplitConfig(guard_um=10), log=quiet)
    if evaluate:
        runs.evaluate_run(run, db, baselines=(), log=quiet)
    runs.predict(run, db, log=quiet)
    return db, run


@pytest.fixture(scope="module")
def base(tmp_path_factory, one_torch_thread):
    """A run trained on 3 slides of 160 cells, evaluated and predicted (`trained_run`; its
    folder is copied by the tests that change it)."""
    return trained_run(tmp_path_factory.mktemp("inputs"), 160)


def copied(base, tmp_path):
    """A private copy of the store and the run of `base` (db, run)."""
    db, run = tmp_path / "db", tmp_path / "run"
    shutil.copytree(base[0], db)
    shutil.copytree(base[1], run)
    return db, run


@pytest.fixture
def setup(base, tmp_path):
    return copied(base, tmp_path)


def one_error_line(result, *words):
    assert result.returncode != 0, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------------------------------------
# heads report


def test_report_of_a_table_whose_cells_this_run_did_not_predict_is_refused(setup, tmp_path):
    """A second vector table in the store (another cohort): the predictions joined none of its
    cells and the calibration section crashed with an IndexError traceback."""
    db, run = setup
    write_cells(Store(db), "other", ["z0"] * 40, [f"o{i}" for i in range(40)], np.random.default_rng(1))
    out = tmp_path / "o.html"
    result = run_cli("cli.heads", "report", "--run", run, "--db", db, "--table", "other", "--out", out)
    one_error_line(result, "'other'", "heads predict")
    assert not out.exists()


def test_report_out_that_is_a_folder_is_refused_before_the_work(setup, tmp_path):
    """It failed at the very end with "Is a directory: .../.folder.tmp-PID"."""
    db, run = setup
    folder = tmp_path / "pages"
    folder.mkdir()
    (folder / "unrelated.txt").write_text("keep me")
    result = run_cli("cli.heads", "report", "--run", run, "--db", db, "--out", folder)
    line = one_error_line(result, str(folder), "folder")
    assert ".tmp-" not in line
    assert "report: results" not in result.stderr  # refused before any section was built
    assert (folder / "unrelated.txt").read_text() == "keep me"
    assert sorted(p.name for p in folder.iterdir()) == ["unrelated.txt"]


def test_report_slides_that_do_not_exist_are_refused_before_the_work(setup, tmp_path):
    """A mistyped --slides exited 0 with only a note in the galleries section."""
    db, run = setup
    out = tmp_path / "r.html"
    result = run_cli("cli.heads", "report", "--run", run, "--db", db, "--out", out, "--slides", tmp_path / "nope")
    one_error_line(result, str(tmp_path / "nope"), "no such file")
    assert "report: results" not in result.stderr and not out.exists()


def test_report_run_that_is_a_file(setup, tmp_path):
    db, _ = setup
    f = tmp_path / "run.txt"
    f.write_text("not a run")
    line = one_error_line(run_cli("cli.heads", "report", "--run", f, "--db", db), str(f))
    assert "is a file" in line and "does not exist" not in line


def test_a_killed_eval_leaves_no_metrics_the_report_trusts(setup, monkeypatch):
    """metrics.json was written in place, last: a kill left new plots beside the old
    metrics.json (or a half-written one), and the report trusted them."""
    db, run = setup
    old = json.loads((run / "metrics.json").read_text())
    assert old["info"]["on"] == "test"

    def killed(rows, path, extra=None):
        with open(path, "w") as f:
            f.write('{"paths": {"local (FiLM)": {')  # a kill in the middle of the write
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "write_metrics_json", killed)
    with pytest.raises(KeyboardInterrupt):
        runs.evaluate_run(run, db, baselines=(), log=quiet)
    monkeypatch.undo()
    # the plots of the killed evaluation are there: no metrics.json may vouch for them
    assert not (run / "metrics.json").exists()
    assert not list(run.glob(".metrics.json*"))
    said = []
    report.write_report(run, db, log=said.append)  # evaluates again, as for a new run
    assert any("metrics.json is missing" in m for m in said)
    assert json.loads((run / "metrics.json").read_text())["info"]["on"] == "test"


def test_a_half_written_metrics_json_is_one_error_line(setup):
    db, run = setup
    (run / "metrics.json").write_text('{"paths": {"gate": {"accuracy": 0.')
    one_error_line(run_cli("cli.heads", "report", "--run", run, "--db", db), "metrics.json", "heads eval")


def test_report_says_when_its_metrics_were_made_on_another_store(setup, tmp_path):
    """The page showed the training store's test metrics beside another store's predictions
    and galleries without a word."""
    db, run = setup
    runs.evaluate_run(run, db, baselines=(), log=quiet)  # the copy's metrics, on the copied store
    other = tmp_path / "other_db"
    shutil.copytree(db, other)
    runs.predict(run, other, out_dir=tmp_path / "p", log=quiet)
    said = []
    page = report.write_report(run, other, tmp_path / "o.html", log=said.append).read_text()
    assert any(m.startswith("warning:") and str(db) in m and str(other) in m for m in said), said
    assert "was made by `heads eval` on " + html_text(str(db)) in page
    # the same store given another way (a file:// URI) is the same store: no warning
    said.clear()
    report.write_report(run, f"file://{db}", tmp_path / "u.html", log=said.append)
    assert not [m for m in said if m.startswith("warning:")], said


def html_text(s):
    import html

    return html.escape(s)


# ---------------------------------------------------------------------------------------------
# heads eval


def test_cohort_eval_refuses_a_part_of_the_split(setup):
    """--on val with --cohort was silently ignored: every cell of the cohort was scored."""
    db, run = setup
    before = sorted(p.name for p in run.iterdir())
    result = run_cli("cli.heads", "eval", "--run", run, "--db", db, "--cohort", "c1", "--on", "val",
                     "--baselines", "none")  # fmt: skip
    one_error_line(result, "--on val", "--cohort")
    assert sorted(p.name for p in run.iterdir()) == before  # no cohort-c1/ folder made
    cohort = run_cli("cli.heads", "eval", "--run", run, "--db", db, "--cohort", "c1", "--baselines", "none")
    assert cohort.returncode == 0, cohort.stderr
    assert "val F1:" not in cohort.stderr  # a cohort has no validation cells: no footnote about them
    own = run_cli("cli.heads", "eval", "--run", run, "--db", db, "--baselines", "none")
    assert own.returncode == 0 and "val F1:" in own.stderr


# ---------------------------------------------------------------------------------------------
# heads explain


def fake_cell(slide, cell):
    crop = np.zeros((8, 8, 3), np.uint8)
    cam = np.zeros((8, 8), np.float32)
    e = ex.PathExplanation("local", "local (FiLM)", "last-block", crop, cam, cam[:2, :2], "k0", 0.5, "k0", 0.5, 1.0)
    return ex.CellExplanation(slide, cell, "colon", "k0", [e])


def test_explain_cells_whose_ids_differ_only_in_odd_characters_get_their_own_png(tmp_path, monkeypatch):
    """'a b', 'a:b' and 'a_b' (QuPath, Xenium, unicode ids) all became s0__a_b.png: the later
    cells overwrote the earlier ones' figures."""
    ids = ["a b", "a:b", "a_b", "α", "β", "A_B", "x/../y", "c-01.x"]
    monkeypatch.setattr(ex, "compute", lambda run, db, cells, **k: [fake_cell(*c.split(":", 1)) for c in cells])
    written = ex.explain("run", "db", [f"s0:{c}" for c in ids], tmp_path / "x")
    pngs = written[:-1]
    assert written[-1].name == "grid.png"
    assert len({p.name.lower() for p in pngs}) == len(ids)  # distinct, even on a case-blind disk
    assert all(p.parent == tmp_path / "x" and p.exists() for p in pngs)
    assert pngs[-1].name == "s0__c-01.x.png"  # a plain id keeps its plain name
    # the same cell gets the same name in every run (a name says which cell it shows)
    again = ex.explain("run", "db", [f"s0:{c}" for c in ids[::-1]], tmp_path / "y")[:-1]
    assert [p.name for p in again] == [p.name for p in pngs][::-1]


def test_report_counts_the_labels_eval_scored(setup):
    """The page dropped labels below a fixed 0.6 confidence whatever `heads eval
    --min-label-confidence` had scored: its galleries and calibration counted other cells."""
    db, run = setup
    labels = Store(db).labels()
    low = labels.with_columns(label_confidence=pl.when(pl.int_range(pl.len()) % 2 == 0).then(0.3).otherwise(0.9))
    Store(db).set_labels(low.drop("source"), source="t")
    classes = report.check_run(run)
    runs.evaluate_run(run, db, baselines=(), min_label_confidence=0.0, log=quiet)
    assert report.eval_min_label_confidence(run) == 0.0
    every = report.load_cells(run, db, "cells", classes, quiet, report.eval_min_label_confidence(run))
    assert every["label"].null_count() == 0
    runs.evaluate_run(run, db, baselines=(), log=quiet)  # the default cut, 0.6
    assert report.eval_min_label_confidence(run) == 0.6
    kept = report.load_cells(run, db, "cells", classes, quiet, report.eval_min_label_confidence(run))
    assert kept["label"].null_count() == every.height // 2
    (run / "metrics.json").unlink()
    assert report.eval_min_label_confidence(run) == report.MIN_LABEL_CONFIDENCE  # eval will run with it


def test_per_class_f1_legend_never_covers_bars(monkeypatch):
    """With 30+ classes the legend, inside the axes at lower right, hid the last classes' bars."""
    from types import SimpleNamespace

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    classes = [f"class {i}" for i in range(34)]
    paths = {p: {"per_class_f1": dict.fromkeys(classes, 0.99), "support": dict.fromkeys(classes, 10)}
             for p in ("local (FiLM)", "global", "gate")}  # fmt: skip
    seen = []
    monkeypatch.setattr(report, "fig_uri", lambda fig, dpi=report.DPI: seen.append(fig) or "data:,")
    report.section_f1(SimpleNamespace(metrics={"paths": paths}, classes=classes))
    (fig,) = seen
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    assert ax.get_legend() is None and len(fig.legends) == 1
    legend, bars = fig.legends[0].get_window_extent(), ax.get_window_extent()
    assert legend.y0 >= bars.y1  # above the plotting area


def test_report_of_a_held_out_cohort(setup, tmp_path):
    """`heads report --cohort`: the page of a cohort store, from `heads eval --cohort`'s metrics
    (run first with --synonyms when missing), its raw labels mapped to the training classes as
    eval mapped them; other synonyms than the scored ones are refused."""
    _, run = setup
    rng = np.random.default_rng(7)
    cohort = tmp_path / "cohort"
    store = Store(cohort, create=True)
    slides = np.repeat(["t0", "t1"], 90)
    ids = np.array([f"x{i:03d}" for i in range(len(slides))])
    y = write_cells(store, "cells", slides, ids, rng)
    raw = np.array(["Type A", "Type B", "k2"], dtype=object)[y]  # two renamed classes, one as trained
    raw[:10] = "debris"  # dropped on purpose (null)
    store.set_labels(pl.DataFrame({"slide_id": slides, "cell_id": ids, "label": raw.tolist()}), source="t")
    syn = tmp_path / "syn.json"
    syn.write_text(json.dumps({"Type A": "k0", "Type B": "k1", "debris": None}))
    assert run_cli("cli.heads", "predict", "--run", run, "--db", cohort).returncode == 0

    result = run_cli("cli.heads", "report", "--run", run, "--db", cohort, "--cohort", "c1", "--synonyms", syn)
    assert result.returncode == 0, result.stderr
    page = run / "cohort-c1" / "report.html"
    assert result.stdout.strip() == str(page)
    metrics = json.loads((run / "cohort-c1" / "metrics.json").read_text())
    assert metrics["info"]["on"] == "c1" and metrics["info"]["synonyms"]["Type A"] == "k0"
    assert metrics["info"]["cells"] == 170  # every labelled cohort cell but the debris
    text = page.read_text()
    assert "on cohort c1" in text and "<b>c1</b> cells (170 labelled cells)" in text
    assert "on the 170 scored cells" in text  # calibration on the mapped labels (raw names are no class)
    scored = report.cohort_labels(report.load_cells(run, str(cohort), "cells", ["k0", "k1", "k2"]),
                                  metrics["info"]["synonyms"], ["k0", "k1", "k2"])  # fmt: skip
    assert scored["label"].is_not_null().sum() == 170 and set(scored["label"].drop_nulls()) == {"k0", "k1", "k2"}

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"Type A": "k1", "Type B": "k0"}))
    result = run_cli("cli.heads", "report", "--run", run, "--db", cohort, "--cohort", "c1", "--synonyms", other)
    one_error_line(result, "other synonyms", "--cohort c1")
    result = run_cli("cli.heads", "report", "--run", run, "--db", cohort, "--synonyms", syn)
    one_error_line(result, "--synonyms", "--cohort NAME")
    (tmp_path / "bad.json").write_text("{not json")
    result = run_cli("cli.heads", "eval", "--run", run, "--db", cohort, "--cohort", "c2", "--synonyms", tmp_path / "bad.json")
    one_error_line(result, "is not valid JSON")


def test_eval_table_on_stdout_prints_names_and_title_as_text(setup):
    """Baseline names ("logreg[local]") printed as `logreg\\[local]`, and the --on val title as
    raw "[bold red]...[/]" markup, on the stdout console (markup off)."""
    db, run = setup
    result = run_cli("cli.heads", "eval", "--run", run, "--db", db, "--on", "val", "--baselines", "logreg")
    assert result.returncode == 0, result.stderr
    assert "logreg[local]" in result.stdout and "\\[" not in result.stdout
    assert "(the cells that chose the model: optimistic)" in result.stdout and "[bold red]" not in result.stdout


def test_predict_of_a_slide_that_is_not_stored_names_it_and_the_stored_ones(setup):
    db, run = setup
    result = run_cli("cli.heads", "predict", "--run", run, "--db", db, "--slide", "s0", "--slide", "S9")
    one_error_line(result, "no cells of slide(s) S9", "stored: s0, s1, s2")
