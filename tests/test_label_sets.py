"""`heads train` and `heads eval` fed the label sets labs really have: labels all (or a whole
class) below the confidence kept, a minimum confidence given as a percentage, a user `split`
column without val cells, --val-fraction 0, a large slide with few labels, labels one class per
slide with a --holdout that leaves one class to train on, many classes, a --holdout slide that
is stored but unlabelled, and `heads eval --on train|all` with the default baselines. Stores
are written directly (`write_store`), runs are tiny."""

from __future__ import annotations

import warnings

import numpy as np
import polars as pl
import pytest

from embedstore.errors import UserError
from embedstore.store import Store
from heads import runs
from heads.splits import SplitConfig, make_split
from heads.train import TrainConfig
from tests.test_search_inputs import write_store

CFG = TrainConfig(epochs=1, global_epochs=1, gate_epochs=1, batch_size=32)
SPLIT = SplitConfig(guard_um=0, seed=0)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def labelled_store(path, labels, *, slides=None, **columns):
    """A store whose cells carry `labels` (None: no label) and any other label `columns`
    (label_confidence, split); each class is shifted apart in the local vectors."""
    n = len(labels)
    slides = slides or [f"s{i % 2}" for i in range(n)]
    shift = {c: 3.0 * i for i, c in enumerate(sorted({x for x in labels if x is not None}))}
    rng = np.random.default_rng(0)
    local = (rng.normal(size=(n, 8)) + np.array([shift.get(x, 0.0) for x in labels])[:, None]).astype(np.float32)
    db = write_store(path, local, slides=slides)
    frame = pl.DataFrame({"slide_id": slides, "cell_id": [f"c{i:03d}" for i in range(n)], "label": labels,
                          **{k: pl.Series(v) for k, v in columns.items()}})  # fmt: skip
    Store(db).set_labels(frame.filter(pl.col("label").is_not_null()), source="t")
    return db


def train(db, run, **kw):
    lines = []
    runs.train(db, run, "local", CFG, scale=False, split_config=SPLIT, log=lines.append, **kw)
    return lines


def test_labels_all_below_the_confidence_kept_are_named_as_such(tmp_path):
    """Every label at confidence 0.5 (kept: 0.6) was refused as "no labels for the cells ...:
    attach them with `embed labels`", although the store had 200: the user re-imported them."""
    db = labelled_store(tmp_path / "db", ["a", "b"] * 100, label_confidence=[0.5] * 200)
    with pytest.raises(UserError, match="label_confidence below 0.6.*--min-label-confidence"):
        train(db, tmp_path / "run")


def test_a_class_whose_labels_are_all_below_the_confidence_kept_is_warned_about(tmp_path):
    """Class "c" (70 cells, all at confidence 0.3) vanished from the run without a word: the
    log said "2 classes" and the heads never knew it."""
    db = labelled_store(tmp_path / "db", ["a", "b", "c"] * 70, label_confidence=[0.9, 0.9, 0.3] * 70)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(db, tmp_path / "run")
    said = [str(w.message) for w in caught if "left out" in str(w.message)]
    assert len(said) == 1 and "'c'" in said[0] and "'a'" not in said[0], said


def test_a_split_column_without_val_cells_says_the_column_is_the_cause(tmp_path):
    """A `split` column of train and test only was refused with advice for the default stripes
    (--guard-um, --holdout, slides under 50 cells), none of which applies to a user's column."""
    db = labelled_store(tmp_path / "db", ["a", "b"] * 100, split=["train"] * 150 + ["test"] * 50)
    with pytest.raises(UserError, match=r"`split` column marks none `val` \(150 train, 50 test\)") as err:
        train(db, tmp_path / "run")
    assert "--guard-um" not in str(err.value)


def test_the_split_summary_of_many_classes_says_that_some_are_not_shown():
    """With 50 classes the log's per-class line showed the first 30 and dropped the other 20
    without a word (the per-slide lines say "... and N more slides")."""
    n = 500
    rng = np.random.default_rng(0)
    meta = pl.DataFrame({"slide_id": ["s0"] * n, "cell_id": [f"c{i}" for i in range(n)], "x_um": rng.uniform(0, 1000, n),
                         "y_um": rng.uniform(0, 1000, n), "tissue": ["lung"] * n, "label": [f"k{i % 50:02d}" for i in range(n)]})  # fmt: skip
    (line,) = [ln for ln in make_split(meta, config=SPLIT).lines() if "per class" in ln]
    assert "k29 " in line and "k30 " not in line and line.endswith("... and 20 more classes (split.json)")


def test_holdout_of_a_stored_slide_without_labels_is_not_called_a_misspelling(tmp_path):
    """--holdout s2, a stored slide none of whose 60 cells is labelled, was refused as a name
    that "match no slide_id or tissue ...; check the spelling": s2 is spelt right."""
    labels = ["a", "b"] * 100 + [None] * 60
    slides = [f"s{i % 2}" for i in range(200)] + ["s2"] * 60
    db = labelled_store(tmp_path / "db", labels, slides=slides)
    with pytest.raises(UserError, match="--holdout s2: the stored cells of that slide or tissue have no label") as err:
        train(db, tmp_path / "run", holdout=["s2"])
    assert "spelling" not in str(err.value)
    with pytest.raises(UserError, match="'s9' match no slide_id"):  # a misspelt name is still said to be one
        train(db, tmp_path / "run", holdout=["s9"])


def test_a_minimum_confidence_given_as_a_percentage_is_refused(tmp_path):
    """--min-label-confidence 60 (meant: 60%) silently dropped every label that had a confidence
    (all are <= 1) and trained on the hand labels alone."""
    labels = ["a", "b"] * 100
    db = labelled_store(tmp_path / "db", labels, label_confidence=[0.9] * 100 + [None] * 100)
    with pytest.raises(UserError, match=r"--min-label-confidence must be within \[0, 1\].*not 60 \(for a percentage, divide it by 100\)"):
        train(db, tmp_path / "run", min_label_confidence=60)
    assert not (tmp_path / "run" / "local.json").exists()


def test_val_fraction_zero_is_named_as_the_reason_there_are_no_val_cells(tmp_path):
    """--val-fraction 0 was refused with advice about small slides, the guard band, --holdout
    and a `split` column: the option the user typed was never named."""
    db = labelled_store(tmp_path / "db", ["a", "b"] * 100)
    with pytest.raises(UserError, match="no labelled cells in the validation split.*--val-fraction 0 makes no val stripe") as err:
        runs.train(db, tmp_path / "run", "local", CFG, scale=False, split_config=SplitConfig(guard_um=0, val_fraction=0),
                   log=lambda m: None)  # fmt: skip
    assert "--guard-um" not in str(err.value)


def test_a_holdout_that_leaves_one_class_to_train_on_is_refused(tmp_path):
    """Labels per slide ("a" on s0 and s2, "b" on s1) with --holdout s1: the heads trained on
    class "a" alone, reported a val accuracy of 1.0 (val had only "a") and saved a run that
    calls every cell "a", with only a warning that "b" has no training cells."""
    slides = ["s0"] * 100 + ["s1"] * 100 + ["s2"] * 100
    db = labelled_store(tmp_path / "db", ["a"] * 100 + ["b"] * 100 + ["a"] * 100, slides=slides)
    with pytest.raises(UserError, match=r"only one class \('a'\) has labelled cells in the training split"):
        train(db, tmp_path / "run", holdout=["s1"])
    assert not (tmp_path / "run" / "local.json").exists()


def test_eval_on_train_or_all_runs_with_the_default_baselines(tmp_path):
    """`heads eval --on train` (or `--on all`) failed with "train rows overlap the eval or val
    rows: baselines must be scored on held-out cells": the default baselines were fitted on the
    very cells scored. They are left out of those parts now, and the log says so."""
    db = labelled_store(tmp_path / "db", ["a", "b"] * 100)
    train(db, tmp_path / "run")
    for on in ("train", "all"):
        lines = []
        result = runs.evaluate_run(tmp_path / "run", db, on=on, temperature=False, log=lines.append)
        assert [r["name"] for r in result["rows"]] == ["local (FiLM)"]
        assert result["rows"][0]["n"] == {"train": 120, "all": 200}[on]
        assert f"baselines left out: they are fitted on the train cells, which --on {on} scores" in lines


def test_a_large_slide_with_few_labels_is_not_called_a_small_slide(tmp_path):
    """One slide of 300 cells, 40 of them labelled: no val stripe (the stripes cut slides by
    their labelled cells), and the error said "slides under 50 cells are not cut" of a slide
    of 300 cells."""
    db = labelled_store(tmp_path / "db", ["a", "b"] * 20 + [None] * 260, slides=["s0"] * 300)
    with pytest.raises(UserError, match="slides with under 50 labelled cells are not cut"):
        train(db, tmp_path / "run")


def test_stripe_options_beside_a_split_column_are_named_as_unused(tmp_path):
    """`--val-fraction 0.4` with labels that carry a split column trained on the column's
    parts and said nothing: the user believed the val share was 40%."""
    split = ["train", "train", "val", "test"] * 60
    db = labelled_store(tmp_path / "db", ["a", "b"] * 120, split=split)
    lines = []
    runs.train(db, tmp_path / "run", "local", CFG, scale=False, log=lines.append,
               split_config=SplitConfig(val_fraction=0.4, guard_um=0, seed=0), split_given=["val_fraction", "seed"])
    assert any("--val-fraction 0.4 not used" in line and "split column" in line for line in lines), lines
    assert not any("--guard-um" in line for line in lines)  # set, but not typed: not named
    quiet = []
    runs.train(db, tmp_path / "run2", "local", CFG, scale=False, log=quiet.append, split_config=SPLIT, split_given=["seed"])
    assert not any("not used" in line for line in quiet), quiet


def test_labels_file_with_cells_the_stored_split_leaves_out_cuts_stripes(tmp_path):
    """The store held a split for the 80 cells `embed labels` had labelled; `heads train
    --labels more.csv` (240 cells, no split column) then failed on "`split` column is empty for
    160 of 240 cells; fill it", a column the user had never given it."""
    labels = ["a", "b"] * 40 + [None] * 160
    db = labelled_store(tmp_path / "db", labels, split=["train", "train", "val", "test"] * 20 + [None] * 160)
    more = tmp_path / "more.csv"
    pl.DataFrame({"slide_id": [f"s{i % 2}" for i in range(240)], "cell_id": [f"c{i:03d}" for i in range(240)],
                  "label": ["a", "b"] * 120}).write_csv(more)  # fmt: skip
    with pytest.warns(UserWarning, match=r"split stored in .* covers 80 of the 240 cells .*more.csv labels.*stripes"):
        lines = train(db, tmp_path / "run", labels=more)
    assert any(line.startswith("split (stripes") for line in lines), lines
    # a file within the stored split's cells keeps it
    within = tmp_path / "within.csv"
    pl.read_csv(more).head(80).write_csv(within)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        lines = train(db, tmp_path / "run2", labels=within)
    assert any(line.startswith("split (column") for line in lines), lines
