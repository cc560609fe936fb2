"""`heads predict | eval | report` against stores that changed under a run: runs of the same
name, a new tissue, relabelled cells, one slide predicted again."""

import json
import re
import shutil
from dataclasses import replace

import polars as pl
import pytest

from embedstore.errors import UserError
from embedstore.store import Store
from heads import report, runs
from heads.splits import SplitConfig
from heads.train import TrainConfig
from tests.clirun import run_cli

CFG = TrainConfig(epochs=1, global_epochs=1, gate_epochs=1, batch_size=64)


def quiet(msg):
    pass


def train(db, run, labels=None, seed=0):
    runs.train(db, run, "all", replace(CFG, seed=seed), labels=labels, scale=False, split_config=SplitConfig(guard_um=40, seed=seed), log=quiet)
    return run


@pytest.fixture(scope="module")
def setup(extracted_store, tmp_path_factory, one_torch_thread):
    """A copy of the session store and two runs both named `run`: C on every labelled cell, D
    without the last slide's tissue and without one class (fewer classes, a tissue it never saw)."""
    root = tmp_path_factory.mktemp("predict")
    db = root / "db"
    shutil.copytree(extracted_store[0], db)
    meta = Store(db).load(vectors=()).meta
    labels = meta.select("slide_id", "cell_id", "label", "tissue")
    new_slide = labels["slide_id"].unique().sort()[-1]
    new_tissue = labels.filter(pl.col("slide_id") == new_slide)["tissue"][0]
    assert labels.filter(pl.col("tissue") == new_tissue)["slide_id"].n_unique() == 1
    dropped_class = labels["label"].value_counts(sort=True)["label"][-1]
    part = labels.filter((pl.col("tissue") != new_tissue) & (pl.col("label") != dropped_class))
    part.drop("tissue").write_parquet(root / "labels_d.parquet")
    c = train(db, root / "C" / "run", seed=0)
    d = train(db, root / "D" / "run", labels=root / "labels_d.parquet", seed=1)
    return {"db": db, "root": root, "C": c, "D": d, "new_slide": new_slide, "new_tissue": new_tissue,
            "labels": labels, "slides": sorted(labels["slide_id"].unique().to_list())}  # fmt: skip


def classes(run):
    return runs.ckpt.read_info(run, "local")["classes"]


def test_runs_named_alike_are_never_mixed(setup, tmp_path):
    """Predictions were keyed by the run folder's name: D's overwrote C's and C's report showed D's."""
    db, c, d = setup["db"], setup["C"], setup["D"]
    assert c.name == d.name and len(classes(d)) < len(classes(c))
    runs.predict(c, db, slides=setup["slides"][:2], out_dir=tmp_path / "c", log=quiet)
    runs.predict(d, db, slides=setup["slides"][:2], out_dir=tmp_path / "d", log=quiet)
    # C's rows of that name are D's now: C's report refuses (it used to read D's, or die on widths)
    with pytest.raises(UserError, match=r"predictions named 'run' belong to another run folder \(.*D/run\): predict again"):
        report.write_report(c, db, out=tmp_path / "c.html", log=quiet)
    cells_d = report.load_cells(d, db, "cells", classes(d), quiet)
    assert cells_d["run_dir"].unique().to_list() == [str(d.resolve())]
    # C predicts one slide again: its report takes that slide and says the rest was left out
    runs.predict(c, db, slides=setup["slides"][:1], out_dir=tmp_path / "c", log=quiet)
    said = []
    cells_c = report.load_cells(c, db, "cells", classes(c), said.append)
    assert cells_c["slide_id"].unique().to_list() == setup["slides"][:1]
    assert len(said) == 1 and "made by another run folder" in said[0]
    # a run retrained in place is another run too
    copy = tmp_path / "E" / "run"
    shutil.copytree(c, copy)
    runs.predict(copy, db, slides=setup["slides"][:1], out_dir=tmp_path / "e", log=quiet)
    with (copy / "safety.json").open("a") as f:
        f.write("\n")
    with pytest.raises(UserError, match="were made by this run folder before it was retrained"):
        report.load_cells(copy, db, "cells", classes(c), quiet)


def test_predicting_one_slide_keeps_the_others_in_the_parquet(setup, tmp_path):
    """`--slide X` rewrote predictions.parquet with slide X alone while the store kept all."""
    db, c, slides = setup["db"], setup["C"], setup["slides"][:2]
    out = tmp_path / "pred"
    runs.predict(c, db, slides=slides, out_dir=out, log=quiet)
    runs.predict(c, db, slides=slides[:1], out_dir=out, conformal_level=0.5, log=quiet)  # other sets
    parquet = pl.read_parquet(out / "predictions.parquet")
    stored = Store(db).predictions("run").filter(pl.col("slide_id").is_in(slides))
    assert parquet.height == stored.height == parquet.select("slide_id", "cell_id").n_unique()
    both = parquet.join(stored, on=["slide_id", "cell_id"], how="inner", suffix="_store")
    assert both.height == parquet.height
    assert (both["set_size"] == both["set_size_store"]).all()  # slide 0 replaced in both, the other kept
    assert (both["conformal_set"] == both["conformal_set_store"]).all()
    # another run into the same folder: its rows replace the file, never mixed with C's
    runs.predict(setup["D"], db, slides=slides[1:], out_dir=out, log=quiet)
    again = pl.read_parquet(out / "predictions.parquet")
    assert again["slide_id"].unique().to_list() == slides[1:] and again["run_digest"].n_unique() == 1


def _relabelled(setup, tmp_path, expr) -> str:
    path = tmp_path / "labels.parquet"
    setup["labels"].drop("tissue").with_columns(label=expr).write_parquet(path)
    return path


def test_eval_says_which_scored_cells_have_labels_outside_the_run(setup, tmp_path):
    """Test cells relabelled to a class the run does not have were dropped without a word."""
    db, c = setup["db"], setup["C"]
    test = pl.read_parquet(c / "split.parquet").filter(pl.col("split") == "test")
    t_cells = test.join(setup["labels"], on=["slide_id", "cell_id"]).filter(pl.col("label") == "T_Cell").height
    assert t_cells > 0
    labels = _relabelled(setup, tmp_path, pl.when(pl.col("label") == "T_Cell").then(pl.lit("CD8_T")).otherwise("label"))
    said = []
    result = runs.evaluate_run(c, db, labels=labels, baselines=(), log=said.append)
    line = f"{t_cells} scored cells have labels outside the run's classes (CD8_T: {t_cells}); they are not scored"
    assert [m for m in said if "outside" in m] == [f"warning: {line}"]
    info = json.loads((result["out_dir"] / "metrics.json").read_text())["info"]
    assert info["labels_outside_classes"] == {"cells": t_cells, "labels": {"CD8_T": t_cells}}
    assert info["cells"] == test.join(setup["labels"], on=["slide_id", "cell_id"]).height - t_cells
    # every label in the wrong case: said so, not "zero labelled cells"
    lower = _relabelled(setup, tmp_path, pl.col("label").str.to_lowercase())
    with pytest.raises(UserError, match=r"nothing to evaluate: \d+ scored cells .*They all differ from a class of "
                                        r"the run only in case \((\w+) vs (\w+)") as err:  # fmt: skip
        runs.evaluate_run(c, db, labels=lower, baselines=(), log=quiet)
    pair = re.search(r"only in case \((\w+) vs (\w+)", str(err.value)).groups()
    assert pair[0] == pair[1].lower() != pair[1]


def test_a_new_tissue_in_the_store_does_not_break_the_run(setup, tmp_path):
    """A slide of a tissue the run never saw made eval refuse and predict fail for every slide."""
    db, d, new_slide = setup["db"], setup["D"], setup["new_slide"]
    result = runs.evaluate_run(d, db, baselines=(), log=quiet)  # scores D's own split, no refusal
    assert result["rows"][0]["n"] > 0
    out = tmp_path / "pred"
    with pytest.raises(runs.SlidesSkipped, match=rf"{new_slide} \({setup['new_tissue']}: \d+ cells\).*not predicted") as err:
        runs.predict(d, db, out_dir=out, log=quiet)
    others = [s for s in setup["slides"] if s != new_slide]
    assert sorted(err.value.frame["slide_id"].unique()) == others
    assert sorted(pl.read_parquet(out / "predictions.parquet")["slide_id"].unique()) == others
    with pytest.raises(UserError, match="cannot predict them"):
        runs.predict(d, db, slides=[new_slide], out_dir=out, log=quiet)
    proc = run_cli("cli.heads", "predict", "--run", d, "--db", db, "--out", out)
    assert proc.returncode == 1 and "warning:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert " ".join(f"--slide {s}" for s in others) in " ".join(proc.stderr.split())


def test_class_names_holding_the_set_separator_are_refused(setup, tmp_path):
    """conformal_set joins class names with "|": a name holding it made the sets unreadable."""
    db = setup["db"]
    labels = _relabelled(setup, tmp_path, pl.col("label").str.replace("T_Cell", "CD4|CD8"))
    with pytest.raises(UserError, match=r"'CD4\|CD8' contain '\|'.*rename"):
        runs.train(db, tmp_path / "bad", "local", CFG, labels=labels, log=quiet)
    # a run trained before the rule: predict refuses rather than write ambiguous sets
    old = tmp_path / "old"
    shutil.copytree(setup["C"], old)
    info = json.loads((old / "local.json").read_text())
    info["classes"] = [c.replace("T_Cell", "CD4|CD8") for c in info["classes"]]
    (old / "local.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match=r"contain '\|'"):
        runs.predict_frame(old, db, slides=setup["slides"][:1])


def test_predicting_another_store_keeps_the_training_stores_files(setup, tmp_path):
    """A cohort predicted with the default --out replaced RUN/predictions/predictions.parquet,
    the training store's predictions, without a word."""
    db, slides = setup["db"], [s for s in setup["slides"] if s != setup["new_slide"]]
    run = shutil.copytree(setup["C"], tmp_path / "run")
    runs.predict(run, db, slides=slides, log=quiet)
    parquet = run / "predictions" / "predictions.parquet"
    before = parquet.read_bytes()
    cohort = shutil.copytree(db, tmp_path / "cohort" / "db")
    said = []
    frame = runs.predict(run, cohort, slides=slides[:1], log=said.append)
    assert parquet.read_bytes() == before
    (other,) = [p for p in run.iterdir() if p.name.startswith("predictions-")]
    assert re.fullmatch(r"predictions-db-[0-9a-f]{6}", other.name) and str(other / "predictions.parquet") in said[-1]
    assert pl.read_parquet(other / "predictions.parquet").height == frame.height
    # the training store however it is written: the run's own folder
    assert runs.predictions_dir(run, db) == runs.predictions_dir(run, db.resolve().as_uri()) == run / "predictions"
    assert runs.predictions_dir(run, cohort) == other
