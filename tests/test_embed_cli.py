"""`embed synth | backbones | labels | index` and the usage errors of `embed similar | audit`,
run as a user runs them: `python -m cli.embed ...` (in-process through the same entry point;
a subprocess where the test is about the process: a pipe, a fresh interpreter)."""

import json
import re
import subprocess
import sys

import polars as pl
import pytest

from embedstore.store import Store
from tests.clirun import run_cli
from tests.test_explore import clustered_store


def embed(*args):
    return run_cli("cli.embed", *args)  # in-process (tests/clirun.py)


def ok(proc) -> str:
    """A command that worked: exit 0, no traceback; returns stdout + stderr (rich prints to
    stderr)."""
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout + proc.stderr


def usage_error(proc, *phrases) -> str:
    """A refused command: exit 2 (UserError and click usage errors), no traceback, and one
    stderr line that says all of `phrases` (case-insensitive). Returns that line."""
    err = proc.stderr
    assert "Traceback" not in err, err
    assert proc.returncode == 2, (proc.returncode, err)
    lines = [ln for ln in err.splitlines() if all(p.lower() in ln.lower() for p in phrases)]
    assert len(lines) == 1, (phrases, err)
    assert len(err.strip().splitlines()) <= 8, err  # a message, not a dump
    return lines[0]


# -- synth -------------------------------------------------------------------------------------


def test_synth_writes_a_dataset_reruns_and_refuses_to_clobber(tmp_path):
    out = tmp_path / "syn"
    args = ("synth", out, "--cells", 60, "--slides", 1)
    assert "wrote 60 cells on 1 slides" in ok(embed(*args))
    cells = pl.read_parquet(out / "cells.parquet")
    assert cells.height == 60 and cells["cell_id"].n_unique() == 60
    assert set(cells["slide_id"]) == {"synth_s0"} and cells["label"].null_count() == 0
    assert {"x_px", "y_px", "x_um", "y_um", "tissue"} <= set(cells.columns)
    truth = pl.read_parquet(out / "truth.parquet")
    assert sorted(truth["cell_id"]) == sorted(cells["cell_id"])
    assert [p.name for p in (out / "slides").iterdir()] == ["synth_s0.svs"]
    assert (out / "slides" / "synth_s0.svs").stat().st_size > 10_000
    assert (out / "xenium" / "synth_s0" / "experiment.xenium").exists()
    manifest = json.loads((out / "synth.json").read_text())
    assert manifest["complete"] and manifest["params"]["seed"] == 0
    assert manifest["params"]["n_cells"] == 60

    # the same command again (e.g. after a kill) regenerates the same data
    ok(embed(*args))
    assert pl.read_parquet(out / "cells.parquet").equals(cells)

    # other parameters into the same folder: refused without --overwrite, nothing touched
    usage_error(embed(*args, "--seed", 1), "already has files", "--overwrite")
    assert pl.read_parquet(out / "cells.parquet").equals(cells)
    assert json.loads((out / "synth.json").read_text()) == manifest

    # with --overwrite: replaced
    ok(embed(*args, "--seed", 1, "--overwrite"))
    again = pl.read_parquet(out / "cells.parquet")
    assert again.height == 60 and not set(again["cell_id"]) & set(cells["cell_id"])
    assert json.loads((out / "synth.json").read_text())["params"]["seed"] == 1
    assert [p.name for p in (out / "slides").iterdir()] == ["synth_s0.svs"]


# -- backbones ---------------------------------------------------------------------------------


def _table_rows(text: str) -> dict[str, list[str]]:
    """{name: cells} of the rows of a rich table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0]:
            rows[cells[0]] = cells
    return rows


def test_backbones_lists_the_registry_filtered_by_pattern():
    from embedstore.extract.backbones import get_spec, list_backbones

    # one call (each costs a torch import): the pattern keeps the test entries and drops the rest
    assert {"test-vit-local", "test-vit-context"} < set(list_backbones())
    listed = _table_rows(ok(embed("backbones", "test-*")))
    assert set(listed) == {"test-vit-local", "test-vit-context"}
    local = get_spec("test-vit-local")
    row = listed["test-vit-local"]
    assert row[1:4] == [str(local.dim), str(local.input_px), "/".join(local.poolings)]
    assert row[-1] == "built-in (test)"
    assert listed["test-vit-context"][1] == str(get_spec("test-vit-context").dim)


def test_listings_are_data_on_stdout_and_json_with_a_flag(extracted_store):
    """Tables and --json go to stdout (so `| grep` and `| python -m json.tool` work), notes to
    stderr; piped stdout is not wrapped at 80 columns."""
    from typer.testing import CliRunner

    from cli.embed import app

    # one real pipe: `embed backbones | grep test-vit-local`
    proc = subprocess.run(f"{sys.executable} -m cli.embed backbones | grep test-vit-local", shell=True,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.count("\n") == 1, proc.stderr
    assert "pathology models" in proc.stderr

    def run(*args):  # in-process (no interpreter start per call); stdout and stderr apart
        result = CliRunner().invoke(app, list(map(str, args)))
        assert result.exit_code == 0, (result.output, result.exception)
        return result

    listed = run("backbones", "test-*")
    assert "test-vit-local" in listed.stdout and "test-vit-local" not in listed.stderr
    rows = json.loads(run("backbones", "test-*", "--json").stdout)
    assert {r["name"] for r in rows} == {"test-vit-local", "test-vit-context"}
    assert all(r["is_test"] for r in rows)

    db, _ = extracted_store
    info = run("info", db, "--json").stdout
    assert json.loads(info)["tables"]["cells"]["cells"] == len(Store(db).keys_frame())
    tool = subprocess.run([sys.executable, "-m", "json.tool"], input=info, capture_output=True, text=True)
    assert tool.returncode == 0
    assert "table cells" in run("info", db).stdout

    key = Store(db).keys_frame().row(0, named=True)
    result = run("similar", "--db", db, "--cell", f"{key['slide_id']}:{key['cell_id']}", "-k", 3, "--json")
    found = json.loads(result.stdout)
    assert len(found) == 4 and found[0]["cell_id"] == key["cell_id"] and found[0]["rank"] == 0
    assert "{" not in result.stderr  # no data on stderr


# -- labels ------------------------------------------------------------------------------------


def _keys(frame: pl.DataFrame) -> list[str]:
    return (frame["slide_id"] + "/" + frame["cell_id"]).to_list()


def test_labels_replace_then_merge_a_per_slide_file(tmp_path):
    db, _ = clustered_store(tmp_path / "db")  # 240 cells labelled k0..k5; cell ci on slide s(i%3)
    assert Store(db).labels().height == 240
    first = pl.DataFrame({
        "slide_id": [f"s{i % 3}" for i in range(30)] + ["s0"],
        "cell_id": [f"c{i:04d}" for i in range(30)] + ["nope"],
        "label": [f"A{i % 4}" for i in range(31)],
        "split": ["train", "val", "test"] * 10 + ["train"],
    })  # fmt: skip
    first.write_csv(tmp_path / "first.csv")
    text = ok(embed("labels", tmp_path / "first.csv", "--db", db))
    assert "30 stored cells" in text
    assert "1 label rows match no stored cell" in text and "s0/nope" in text
    stored = Store(db).labels().sort("cell_id")
    assert stored.height == 30  # replaced: the 210 cells the file does not name lost their labels
    expect = first.head(30).sort("cell_id")
    assert _keys(stored) == _keys(expect)
    assert stored["label"].to_list() == expect["label"].to_list()
    assert stored["split"].to_list() == expect["split"].to_list()
    assert set(stored["source"]) == {str(tmp_path / "first.csv")}

    # merge a 10x-style per-slide file: 5 relabelled cells of s0, 10 new ones
    relabel = [0, 3, 6, 9, 12]
    new = list(range(30, 60, 3))
    second = pl.DataFrame({"Barcode": [f"c{i:04d}" for i in relabel + new],
                           "Cluster": list(range(100, 115))})  # fmt: skip
    second.write_parquet(tmp_path / "clusters.parquet")
    text = ok(embed("labels", tmp_path / "clusters.parquet", "--db", db, "--merge", "--slide-id",
                    "s0", "--cell-id-col", "Barcode", "--label-col", "Cluster"))  # fmt: skip
    assert "15 stored cells" in text and "match no stored cell" not in text
    merged = Store(db).labels()
    assert merged.height == 40 and merged.select("slide_id", "cell_id").is_unique().all()
    by_key = dict(zip(_keys(merged), merged.iter_rows(named=True), strict=True))
    for j, i in enumerate(relabel + new):
        rec = by_key[f"s0/c{i:04d}"]
        assert rec["label"] == str(100 + j) and rec["source"] == str(tmp_path / "clusters.parquet")
    untouched = expect.filter(~pl.col("cell_id").is_in([f"c{i:04d}" for i in relabel]))
    assert untouched.height == 25
    for rec in untouched.iter_rows(named=True):
        got = by_key[f"{rec['slide_id']}/{rec['cell_id']}"]
        assert (got["label"], got["split"]) == (rec["label"], rec["split"])
        assert got["source"] == str(tmp_path / "first.csv")


def test_labels_merge_keeps_the_columns_the_file_lacks(tmp_path):
    db, _ = clustered_store(tmp_path / "db")
    store = Store(db)
    keys = store.keys_frame().head(20)
    store.set_labels(keys.with_columns(label=pl.lit("old"), split=pl.lit("train")), source="a")
    store.set_labels(keys.head(5).with_columns(label=pl.lit("new")), source="b", replace=False)
    stored = store.labels().join(keys.head(5), on=["slide_id", "cell_id"], how="semi")
    assert stored["label"].to_list() == ["new"] * 5
    assert stored["split"].to_list() == ["train"] * 5


# -- index -------------------------------------------------------------------------------------

INDEX_LINE = re.compile(r"(\w+) index of (\d+) (\w+) vectors \((\d+)-d, (\w+)\)")


def test_index_builds_and_reports_what_it_built(tmp_path):
    from embedstore.search.index import CellIndex

    db, _ = clustered_store(tmp_path / "db")
    store = Store(db)
    n = store.info()["tables"]["cells"]["cells"]
    assert n == 240
    # clustered_store writes 32-d local and 16-d context vectors; `both` concatenates them
    for vector, kind, dim in (("local", "auto", 32), ("both", "ivf", 48)):
        text = ok(embed("index", "--db", db, "--vector", vector, "--kind", kind))
        found = INDEX_LINE.search(text)
        assert found, text
        want = ("flat" if kind == "auto" else kind, str(n), vector, str(dim), "cosine")
        assert found.groups() == want
        where = db / "_faiss" / "cells" / vector
        assert str(where) in text
        index, meta = CellIndex.load(where, use_gpu=False)
        assert (index.kind, index.ntotal, index.dim) == (want[0], n, dim)
        assert meta["table_version"] == store.open("cells").version
        assert pl.read_parquet(where / "rows.parquet").equals(store.keys_frame())


# -- usage errors of similar and audit ---------------------------------------------------------



@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    db, _ = clustered_store(tmp_path_factory.mktemp("small") / "db")
    return db


@pytest.mark.parametrize(("args", "missing"), [
    (["similar", "--cell", "s0:c0000"], "--db"),
    (["similar", "--db", "DB"], "--cell"),
    (["audit", "--db", "DB"], "--out"),
])  # fmt: skip
def test_missing_required_option_is_a_usage_error(small_store, args, missing):
    usage_error(embed(*[small_store if a == "DB" else a for a in args]), "missing", missing)


def test_non_integer_k_is_a_usage_error(small_store):
    usage_error(embed("similar", "--db", small_store, "--cell", "s0:c0000", "-k", "abc"), "-k", "integer")


def test_malformed_cell_is_refused_before_any_work(tmp_path):
    """A one-line message, and a typo in --cell costs no index build (it did once)."""
    db, _ = clustered_store(tmp_path / "db")
    usage_error(embed("similar", "--db", db, "--cell", "s0-c0000"), "s0-c0000", "SLIDE:CELL_ID")
    assert not (db / "_faiss").exists()


def test_store_that_does_not_exist(tmp_path):
    db, out = tmp_path / "no-such-db", tmp_path / "review" / "q.parquet"
    usage_error(embed("audit", "--db", db, "--out", out), str(db), "no store")
    assert not db.exists() and not out.parent.exists()


def test_a_store_given_as_a_uri_works_through_the_cli(synth_small, tmp_path, monkeypatch):
    """`--db file://...` (the object-store path: no file lock, keyed merge-inserts) through
    extract, a rerun that adds nothing, info and index (which needs a local --index-dir)."""
    from typer.testing import CliRunner

    from cli.embed import app

    monkeypatch.chdir(tmp_path)  # a URI mistaken for a path would make ./file:/... here

    cells = pl.read_parquet(synth_small.cells_path).group_by("slide_id", maintain_order=True).head(12)
    cells.write_parquet(tmp_path / "cells.parquet")
    uri = f"file://{tmp_path / 'db'}"
    extract = ["extract", synth_small.out_dir / "slides", "--cells", tmp_path / "cells.parquet", "--db", uri,
               "--local-backbone", "test-vit-local", "--context-backbone", "test-vit-context",
               "--context-px", 64, "--batch-size", 8, "--commit-every", 8, "--quiet"]  # fmt: skip

    def run(*args):
        result = CliRunner().invoke(app, list(map(str, args)))
        assert result.exit_code == 0, (result.output, result.exception)
        return result

    assert f"stored {cells.height} new cells" in run(*extract).stderr
    assert f"stored 0 new cells ({cells.height} already there)" in run(*extract).stderr
    assert json.loads(run("info", uri, "--json").stdout)["tables"]["cells"]["cells"] == cells.height
    assert not (tmp_path / "file:").exists()  # the URI was not taken for a relative directory
    assert not Store(uri).local
    refused = CliRunner().invoke(app, ["index", "--db", uri])
    assert refused.exit_code != 0 and "--index-dir" in str(refused.exception)
    run("index", "--db", uri, "--index-dir", tmp_path / "idx")
    assert (tmp_path / "idx" / "cells" / "local").is_dir()


def test_our_warnings_are_one_line_on_stderr(synth_small, tmp_path):
    """A warning of ours (here: --mpp overriding the slide's own µm/px) reads `warning: ...`,
    without Python's category and source line."""
    import subprocess
    import sys

    slide = synth_small.slides[0]
    table = tmp_path / "cells.csv"
    table.write_text(f"slide_id,cell_id,x_px,y_px,tissue\n{slide.slide_id},a,10,10,lung\n")
    proc = subprocess.run([sys.executable, "-m", "cli.embed", "cells", str(table), "--slides", str(slide.path),
                           "--mpp", "0.3", "--out", str(tmp_path / "o.parquet")], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "warning:" in proc.stderr and "overrides" in proc.stderr
    assert "UserWarning" not in proc.stderr and "ingest.py" not in proc.stderr
