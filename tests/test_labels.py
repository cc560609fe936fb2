"""Label tables: what `embed labels`, `heads train --labels` and an extraction's cells-table
labels do to the stored labels (one reader and one set of checks for all three)."""

import polars as pl
import pyarrow as pa
import pytest

from embedstore.errors import UserError
from embedstore.extract.pipeline import _attach_table_labels
from embedstore.store import Store, StoreError
from tests.test_embed_cli import embed, ok, usage_error
from tests.test_explore import clustered_store

KEYS = ["slide_id", "cell_id"]


def _store(tmp_path) -> tuple[str, Store, pl.DataFrame]:
    """240 cells on slides s0..s2, labelled k0..k5 by run "t"; returns (db, store, keys)."""
    db, _ = clustered_store(tmp_path / "db")
    store = Store(db)
    return db, store, store.keys_frame().sort(KEYS)


def _add_cells(store: Store, ids: list[str], run_id: str) -> None:
    """Cells `ids` of slide s0, stored by run `run_id` (vectors copied from stored cells)."""
    rows = store.open("cells").to_lance().to_table().slice(0, len(ids))
    rows = rows.set_column(rows.schema.get_field_index("slide_id"), "slide_id", pa.array(["s0"] * len(ids)))
    rows = rows.set_column(rows.schema.get_field_index("cell_id"), "cell_id", pa.array(ids))
    store.append("cells", rows.set_column(rows.schema.get_field_index("run_id"), "run_id", pa.array([run_id] * len(ids))))


def _stored(store: Store, keys: pl.DataFrame) -> pl.DataFrame:
    return keys.join(store.labels(), on=KEYS, how="left", maintain_order="left")


# -- 1: a rerun of `embed extract` -------------------------------------------------------------


def test_rerun_of_extract_does_not_bring_back_labels_the_user_removed(tmp_path):
    db, store, keys = _store(tmp_path)
    store.record_run({"run_id": "t", "status": "finished", "table": "cells", "counts": {"written": 240}})
    cells = keys.with_columns(label=pl.lit("table"), split=pl.lit("train"))
    store.set_labels(keys.head(40).with_columns(label=pl.lit("mine")), source="user")  # 200 cells lose theirs
    _attach_table_labels(store, cells, "cells", "rerun")  # stored nothing new
    assert store.labels().height == 40 and set(store.labels()["label"]) == {"mine"}

    # the cells a run stores get the table's labels; the user's cells stay as they are
    new_ids = [f"n{i}" for i in range(5)]
    _add_cells(store, new_ids, "rerun")
    cells = pl.concat([cells, pl.DataFrame({"slide_id": ["s0"] * 5, "cell_id": new_ids, "label": ["table"] * 5, "split": ["val"] * 5})])
    _attach_table_labels(store, cells, "cells", "rerun")
    labels = store.labels()
    assert labels.height == 45
    assert labels.filter(pl.col("cell_id").is_in(new_ids))["label"].to_list() == ["table"] * 5
    assert labels.filter(~pl.col("cell_id").is_in(new_ids))["label"].unique().to_list() == ["mine"]


def test_cells_of_a_killed_run_get_their_labels_once(tmp_path):
    db, store, keys = _store(tmp_path)
    store.record_run({"run_id": "t", "status": "finished", "table": "cells", "counts": {"written": 240}})
    ids = [f"d{i}" for i in range(6)]
    _add_cells(store, ids, "dead")
    store.record_run({"run_id": "dead", "status": "interrupted", "table": "cells", "counts": {}})  # killed before its labels
    cells = pl.DataFrame({"slide_id": ["s0"] * 6, "cell_id": ids, "label": ["table"] * 6})
    _attach_table_labels(store, cells, "cells", "resume")
    assert store.labels().filter(pl.col("cell_id").is_in(ids))["label"].to_list() == ["table"] * 6
    assert store.runs().filter(pl.col("run_id") == "dead")["labels_adopted_by"].to_list() == ["resume"]
    # adopted once: after the user removes those labels, a later run leaves them removed
    store.set_labels(keys.with_columns(label=pl.lit("mine")), source="user")  # names only the first 240
    _attach_table_labels(store, cells, "cells", "later")
    assert store.labels().filter(pl.col("cell_id").is_in(ids)).height == 0


# -- 2, 5, 6: merge and replace say what they take away -----------------------------------------


def test_a_merged_label_without_confidence_is_a_hand_label(tmp_path):
    db, store, keys = _store(tmp_path)
    ten = keys.head(10)
    store.set_labels(ten.with_columns(label=pl.lit("ann"), label_confidence=pl.lit(0.4), split=pl.lit("train")), source="annotate")
    counts = store.set_labels(ten.head(3).with_columns(label=pl.lit("fixed")), source="hand", replace=False)
    got = _stored(store, ten)
    assert got["label"].to_list() == ["fixed"] * 3 + ["ann"] * 7
    assert got["label_confidence"].to_list() == [None] * 3 + [0.4] * 7  # hand labels: full trust
    assert got["split"].to_list() == ["train"] * 10  # a merge keeps what the table does not give
    assert counts["lost"] == {"label": 0, "label_confidence": 3, "split": 0}
    # a table with a confidence column sets it; one with splits only keeps labels and confidences
    store.set_labels(ten.head(2).with_columns(label=pl.lit("x"), label_confidence=pl.lit(0.9)), source="c", replace=False)
    store.set_labels(ten.with_columns(split=pl.lit("val")), source="s", replace=False)
    got = _stored(store, ten)
    assert got["label_confidence"].to_list() == [0.9, 0.9, None] + [0.4] * 7
    assert got["label"].to_list()[:4] == ["x", "x", "fixed", "ann"] and set(got["split"]) == {"val"}


def test_replace_counts_lost_splits_and_confidences_and_merge_counts_blanks(tmp_path):
    db, store, keys = _store(tmp_path)
    store.set_labels(keys.with_columns(label=pl.lit("A"), label_confidence=pl.lit(0.8), split=pl.lit("train")), source="a")
    keys.head(30).with_columns(label=pl.lit("B")).write_csv(tmp_path / "thirty.csv")
    before = store.db.open_table("labels").version
    text = ok(embed("labels", tmp_path / "thirty.csv", "--db", db))
    line = next(ln for ln in text.splitlines() if "warning:" in ln)
    assert "210 cells lose their label" in line and "240 cells lose their split" in line
    assert "30 cells lose their label confidence" in line  # the 210 unlabelled ones are counted once
    assert "--merge keeps them" in line and f"--restore {before}`" in line

    blanks = keys.head(12).with_columns(label=pl.Series(["", " ", "NA", "x"] * 3))
    blanks.write_csv(tmp_path / "blanks.csv")
    text = ok(embed("labels", tmp_path / "blanks.csv", "--db", db, "--merge"))
    assert "9 cells unlabelled by blank or NA labels" in text and f"--restore {before + 1}`" in text
    assert _stored(store, keys.head(12))["label"].to_list() == [None, None, None, "x"] * 3


# -- 3, 4: values -----------------------------------------------------------------------------


def test_confidence_is_checked_and_read_under_its_aliases(tmp_path):
    db, store, keys = _store(tmp_path)
    with pytest.raises(StoreError, match=r"within \[0, 1\]; 10 values are not.*divide them by 100"):
        store.set_labels(keys.head(10).with_columns(label=pl.lit("A"), label_confidence=pl.lit(85.0)), source="pct")
    with pytest.raises(StoreError, match=r"within \[0, 1\]; 2 values are not, e.g. \[1.5, -0.2\]$"):
        store.set_labels(keys.head(3).with_columns(label=pl.lit("A"), label_confidence=pl.Series([1.5, -0.2, 0.5])), source="bad")
    three = keys.head(3).with_columns(label=pl.lit("A"))
    three.with_columns(confidence=pl.Series(["0.5", "NA", "1"])).write_csv(tmp_path / "alias.csv")
    ok(embed("labels", tmp_path / "alias.csv", "--db", db))
    assert _stored(store, keys.head(3))["label_confidence"].to_list() == [0.5, None, 1.0]
    three.with_columns(score=pl.lit(0.7)).write_csv(tmp_path / "score.csv")
    ok(embed("labels", tmp_path / "score.csv", "--db", db, "--confidence-col", "score"))
    assert _stored(store, keys.head(3))["label_confidence"].to_list() == [0.7] * 3
    three.with_columns(label_confidence=pl.Series(["high", "85%", "0.5"])).write_csv(tmp_path / "text.csv")
    usage_error(embed("labels", tmp_path / "text.csv", "--db", db), "text.csv", "not numbers", "high")


def test_missing_value_tokens_are_no_label_and_case_variants_are_named(tmp_path):
    db, store, keys = _store(tmp_path)
    tokens = ["NA", "n/a", "#N/A", "None", "null", "nan", " NaN ", "Tumor", "tumor ", "TUMOR", "Stroma", "stroma"]
    with pytest.warns(UserWarning, match=r"differ only by case.*Stroma / stroma; TUMOR / Tumor / tumor"):
        store.set_labels(keys.head(12).with_columns(label=pl.Series(tokens), split=pl.Series(["NA"] * 12)), source="t")
    got = _stored(store, keys.head(12))
    assert got["label"].to_list() == [None] * 7 + ["Tumor", "tumor", "TUMOR", "Stroma", "stroma"]  # kept apart
    assert got["split"].null_count() == 12


# -- 7: heads train --labels ------------------------------------------------------------------


def test_heads_labels_file_goes_through_the_same_checks(tmp_path):
    from heads.runs import load_cell_data

    db, store, keys = _store(tmp_path)
    store.set_labels(keys.with_columns(label=pl.lit("k0"), label_confidence=pl.lit(0.3)), source="annotate")
    lab = keys.with_columns(label=pl.Series(["A", "B"] * 120))
    path = tmp_path / "labels.csv"
    lab.with_columns(label_confidence=pl.lit("high")).write_csv(path)
    with pytest.raises(UserError, match="labels.csv: column 'label_confidence'.*not numbers") as err:
        load_cell_data(db, labels=path, labelled_only=True)
    assert "ComputeError" not in str(err.value)

    extra = pl.DataFrame({"slide_id": ["s0", "s9"], "cell_id": ["zz", "c0001"], "label": ["A", "B"]})
    pl.concat([lab, extra]).write_csv(path)
    with pytest.warns(UserWarning, match=r"2 rows of .*labels.csv match no stored cell.*s0/zz"):
        data = load_cell_data(db, labels=path, labelled_only=True, min_label_confidence=0.6)
    assert len(data) == 240 and list(data.classes) == ["A", "B"]  # the file's labels are hand labels

    lab.with_columns(slide_id=pl.lit("other")).write_csv(path)
    with pytest.raises(UserError, match="none of the 240 label rows matches a stored cell") as err:
        load_cell_data(db, labels=path, labelled_only=True)
    assert "--labels" not in str(err.value)


# -- 8: QuPath measurement tables -------------------------------------------------------------


def test_labels_from_a_multi_image_qupath_export(tmp_path):
    db, store, keys = _store(tmp_path)
    sub = keys.filter(pl.col("cell_id") < "c0030")
    qupath = sub.select(
        Image=pl.col("slide_id") + ".svs", **{"Object ID": pl.col("cell_id")}, **{"Object type": pl.lit("Detection")},
        Classification=pl.when(pl.col("slide_id") == "s1").then(pl.lit("Tumor")).otherwise(pl.lit("Stroma")),
        **{"Centroid X µm": pl.lit(1.5), "Centroid Y µm": pl.lit(2.5)},
    )  # fmt: skip
    qupath.write_csv(tmp_path / "measurements.tsv", separator="\t")
    text = ok(embed("labels", tmp_path / "measurements.tsv", "--db", db))
    assert "set labels of 30 stored cells" in text and "match no stored cell" not in text
    got = _stored(store, sub)
    assert got.height == 30 and set(got["slide_id"]) == {"s0", "s1", "s2"}
    assert got.select((pl.col("label") == "Tumor") == (pl.col("slide_id") == "s1")).to_series().all()
    assert set(got["source"]) == {str(tmp_path / "measurements.tsv")}


def test_info_counts_labelled_cells_apart_from_label_rows(tmp_path):
    """`embed info` said "labels: 240 rows" when some rows held only a split (no label)."""
    db, store, keys = _store(tmp_path)
    store.set_labels(keys.head(10).with_columns(label=pl.lit(None, pl.String), split=pl.lit("val")), source="s",
                     replace=False)  # fmt: skip
    lab = store.info()["labels"]
    assert lab["rows"] == 240 and lab["labelled"] == 230
    result = embed("info", db)
    assert "labels: 230 labelled cells of 240 rows" in result.stdout, result.stdout
