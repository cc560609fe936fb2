"""The bad-input corpus: every case exits non-zero with one clear message, no traceback, and
leaves the store exactly as it was (same files, so the same table versions).

Commands run in-process through the same entry points as the console scripts (`cli.common.run`),
so an unexpected exception fails the test with its traceback instead of hiding in a subprocess.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from embedstore.store import Store, vectors_to_arrow
from heads import runs
from heads.train import TrainConfig

TEST_BB = ["--local-backbone", "test-vit-local", "--context-backbone", "test-vit-context", "--context-px", "128"]


@dataclass
class World:
    tmp: Path
    db: Path
    run: Path
    slides: Path
    cells: Path
    bundle: Path
    other_dims_db: Path
    other_cells_db: Path

    def file(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path

    def dir(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(exist_ok=True)
        (path / "notes.txt").write_text("not a bundle")
        return path

    def parquet(self, name: str, frame: pl.DataFrame) -> Path:
        path = self.tmp / name
        frame.write_parquet(path)
        return path

    def run_copy(self, name: str, damage: str, stage: str) -> Path:
        """A copy of the trained run with one file damaged: truncated, or replaced by junk."""
        out = self.tmp / name
        if not out.exists():
            shutil.copytree(self.run, out)
            target = out / f"{stage}.safetensors" if damage != "json" else out / f"{stage}.json"
            data = target.read_bytes()
            target.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"{not json")
        return out


def _store_like(src: Path, dst: Path, *, dims: dict[str, int] | None = None, rename: bool = False) -> Path:
    """A store made from `src`'s cells: other vector dims, or the same vectors under new ids."""
    loaded = Store(src).load()
    meta = loaded.meta
    store = Store(dst, create=True)
    if dims:
        vectors = {k: np.random.default_rng(0).normal(size=(len(meta), d)) for k, d in dims.items()}
        config = {"test": "other dims"}
    else:
        vectors, config = loaded.vectors, loaded.config
    store.cells_table("cells", {k: v.shape[1] for k, v in vectors.items()}, config)
    cell_id = ("new-" + meta["cell_id"]) if rename else meta["cell_id"]
    cols = {c: meta[c].to_arrow() for c in ("slide_id", "x_px", "y_px", "x_um", "y_um", "tissue", "run_id")}
    cols["cell_id"] = cell_id.to_arrow()
    import pyarrow as pa

    for k, v in vectors.items():
        cols[f"{k}_outside"] = pa.array(np.zeros(len(meta), np.float32))
        cols[k] = vectors_to_arrow(v)
    names = store.open("cells").schema.names
    store.append("cells", pa.table({n: cols[n] for n in names}).cast(store.open("cells").schema))
    store.set_labels(meta.select("slide_id", "label").with_columns(cell_id=cell_id), source="t")
    return dst


@pytest.fixture(scope="module")
def world(extracted_store, synth_small, tmp_path_factory, one_torch_thread) -> World:
    tmp = tmp_path_factory.mktemp("bad")
    db = tmp / "db"
    shutil.copytree(extracted_store[0], db)
    run = tmp / "run"
    cfg = TrainConfig(epochs=1, global_epochs=1, gate_epochs=1, batch_size=64)
    runs.train(db, run, "all", cfg, scale=False, log=lambda m: None)
    bundle = tmp / "bundle"
    src = sorted((synth_small.out_dir / "xenium").iterdir())[0]
    shutil.copytree(src, bundle, symlinks=False)
    return World(
        tmp=tmp, db=db, run=run, slides=synth_small.out_dir / "slides", cells=synth_small.cells_path,
        bundle=bundle, other_dims_db=_store_like(db, tmp / "db_dims", dims={"local": 12, "context": 8}),
        other_cells_db=_store_like(db, tmp / "db_other", rename=True),
    )  # fmt: skip


def _cells(w: World) -> pl.DataFrame:
    return pl.read_parquet(w.cells)


def _bundle_with(w: World, name: str, matrix: str) -> Path:
    out = w.tmp / name
    if not out.exists():
        shutil.copytree(w.bundle, out)
        next(out.glob("*_he_imagealignment.csv")).write_text(matrix)
    return out


def _extract(w: World, cells, *extra) -> list:
    return ["embed", "extract", w.slides, "--cells", cells, "--db", w.db, *TEST_BB, *extra]


# (id, argv builder, regex the message must match)
CASES = [
    # -- embed cells ---------------------------------------------------------------------------
    ("cells: no such file", lambda w: ["embed", "cells", w.tmp / "nope.csv", "--out", w.tmp / "o.parquet", "--mpp", "0.25"], "no such table"),
    ("cells: header only", lambda w: ["embed", "cells", w.file("empty.csv", "slide_id,cell_id,x_um,y_um,tissue\n"), "--out", w.tmp / "o.parquet", "--mpp", "0.25"], "no rows"),
    ("cells: text in x", lambda w: ["embed", "cells", w.file("text.csv", "slide_id,cell_id,x_um,y_um,tissue\ns,1,abc,2,lung\ns,2,3,4,lung\n"), "--out", w.tmp / "o.parquet", "--mpp", "0.25"], r"'x_um' \(x\) has 1 values that are not numbers.*abc"),
    ("cells: quoted decimal commas in a comma-separated file", lambda w: ["embed", "cells", w.file("comma.csv", 'slide_id,cell_id,x_um,y_um,tissue\ns,1,"10,5","2,5",lung\n'), "--out", w.tmp / "o.parquet", "--mpp", "0.25"], "decimal commas"),
    ("cells: unknown delimiter", lambda w: ["embed", "cells", w.file("spaces.csv", "slide_id cell_id x_um y_um\ns 1 2 3\n"), "--out", w.tmp / "o.parquet", "--mpp", "0.25"], "delimiter"),
    ("cells: no x column", lambda w: ["embed", "cells", w.file("nox.csv", "slide_id,cell_id,y_um,tissue\ns,1,2,lung\n"), "--out", w.tmp / "o.parquet", "--mpp", "0.25"], "no x column found.*--x-col"),
    ("cells: unit unknown", lambda w: ["embed", "cells", w.file("unit.csv", "slide_id,cell_id,x,y,tissue\ns,1,2,3,lung\n"), "--out", w.tmp / "o.parquet", "--mpp", "0.25"], "--unit px or --unit um"),
    ("cells: no mpp, no slides", lambda w: ["embed", "cells", w.file("nompp.csv", "slide_id,cell_id,x_um,y_um,tissue\ns,1,2,3,lung\n"), "--out", w.tmp / "o.parquet"], r"--slides DIR.*--mpp"),
    ("cells: all NaN", lambda w: ["embed", "cells", w.file("nan.csv", "slide_id,cell_id,x_um,y_um,tissue\ns,1,NaN,3,lung\n"), "--out", w.tmp / "o.parquet", "--mpp", "0.25"], "no cells left.*NaN"),
    ("cells: strict duplicate", lambda w: ["embed", "cells", w.file("dup.csv", "slide_id,cell_id,x_um,y_um,tissue\ns,1,2,3,lung\ns,1,4,5,lung\n"), "--out", w.tmp / "o.parquet", "--mpp", "0.25", "--strict"], "duplicate cell id"),
    ("cells: missing ids", lambda w: ["embed", "cells", w.file("noid.csv", "slide_id,cell_id,x_um,y_um,tissue\ns,,2,3,lung\n"), "--out", w.tmp / "o.parquet", "--mpp", "0.25"], "no cell id"),
    ("cells: bad split", lambda w: ["embed", "cells", w.file("split.csv", "slide_id,cell_id,x_um,y_um,tissue,split\ns,1,2,3,lung,holdout\n"), "--out", w.tmp / "o.parquet", "--mpp", "0.25"], "split column has values other than"),
    ("cells: not a bundle dir", lambda w: ["embed", "cells", w.dir("plain"), "--out", w.tmp / "o.parquet"], "neither a Xenium bundle"),
    ("cells: singular alignment", lambda w: ["embed", "cells", _bundle_with(w, "b_singular", "1,2,0\n2,4,0\n0,0,1\n"), "--out", w.tmp / "o.parquet"], "singular|invertible"),
    ("cells: NaN alignment", lambda w: ["embed", "cells", _bundle_with(w, "b_nan", "1,0,nan\n0,1,0\n0,0,1\n"), "--out", w.tmp / "o.parquet"], "finite|NaN"),
    ("cells: out under a file", lambda w: ["embed", "cells", w.file("ok.csv", "slide_id,cell_id,x_um,y_um,tissue\ns,1,2,3,lung\n"), "--out", w.file("afile", "x") / "o.parquet", "--mpp", "0.25"], "cannot write o.parquet to .*afile: it, or a folder above it, is a file"),
    # -- embed extract -------------------------------------------------------------------------
    ("extract: no cells file", lambda w: _extract(w, w.tmp / "nope.parquet"), "no such table"),
    ("extract: empty cells", lambda w: _extract(w, w.parquet("empty.parquet", _cells(w).head(0))), "no rows"),
    ("extract: x_px as text", lambda w: _extract(w, w.parquet("xtext.parquet", _cells(w).with_columns(pl.col("x_px").cast(pl.Utf8)))), r"\['x_px'\].*not numbers"),
    ("extract: raw table", lambda w: _extract(w, w.parquet("raw.parquet", _cells(w).drop("x_um", "y_um"))), r"lacks columns \['x_um', 'y_um'\]"),
    ("extract: NaN centroid", lambda w: _extract(w, w.parquet("nanc.parquet", _cells(w).with_columns(x_px=pl.lit(float("nan"))))), "NaN"),
    ("extract: duplicate ids", lambda w: _extract(w, w.parquet("dupc.parquet", pl.concat([_cells(w), _cells(w).head(2)]))), "2 cells appear more than once in the cell table \\(4 rows\\)"),
    ("extract: bad split", lambda w: _extract(w, w.parquet("splitc.parquet", _cells(w).with_columns(split=pl.lit("holdout")))), "split column"),
    ("extract: batch size 0", lambda w: _extract(w, w.cells, "--batch-size", "0"), "--batch-size must be a whole number >= 1"),
    ("extract: batch size -4", lambda w: _extract(w, w.cells, "--batch-size", "-4"), "--batch-size must be"),
    ("extract: commit every 0", lambda w: _extract(w, w.cells, "--commit-every", "0"), "--commit-every must be"),
    ("extract: workers 0", lambda w: _extract(w, w.cells, "--workers", "0"), "--workers must be"),
    ("extract: negative mpp", lambda w: _extract(w, w.cells, "--mpp", "-0.25"), "--mpp must be a positive number"),
    ("extract: tiny context px", lambda w: _extract(w, w.cells, "--context-px", "0"), "--context-px must be between"),
    ("extract: bad precision", lambda w: _extract(w, w.cells, "--precision", "fp8"), "--precision must be one of auto, fp32, bf16"),
    ("extract: table name", lambda w: _extract(w, w.cells, "--table", "a/b"), "letters, digits"),
    ("extract: unknown backbone", lambda w: ["embed", "extract", w.slides, "--cells", w.cells, "--db", w.db, "--local-backbone", "uni3"], "[Uu]nknown backbone 'uni3'"),
    ("extract: junk weights", lambda w: _extract(w, w.cells, "--local-weights", w.file("junk.safetensors", "not weights")), "[Cc]annot read.*junk.safetensors"),
    ("extract: other config", lambda w: _extract(w, w.cells, "--context-pooling", "mean"), r"(?s)pooling.*--table"),
    ("extract: no such slides", lambda w: ["embed", "extract", w.tmp / "noslides", "--cells", w.cells, "--db", w.db, *TEST_BB], "no such file"),
    # -- embed info / labels -------------------------------------------------------------------
    ("info: not a store", lambda w: ["embed", "info", w.slides], "not a store"),
    ("info: no such dir", lambda w: ["embed", "info", w.tmp / "nothing"], "no store here"),
    ("labels: none match", lambda w: ["embed", "labels", w.file("nomatch.csv", "slide_id,cell_id,label\nx,1,T\ny,2,B\n"), "--db", w.db], "none of the 2 label rows matches a stored cell.*nothing was changed"),
    ("labels: repeated ids", lambda w: ["embed", "labels", w.parquet("replab.parquet", Store(w.db).keys_frame().head(2).with_columns(label=pl.lit("T")).pipe(lambda f: pl.concat([f, f]))), "--db", w.db], "2 cells appear more than once in the label table \\(4 rows\\)"),
    ("labels: no cell id column", lambda w: ["embed", "labels", w.file("noidlab.csv", "slide_id,id_x,label\nx,1,T\n"), "--db", w.db], "no cell_id column"),
    ("labels: bad split", lambda w: ["embed", "labels", w.parquet("badsplit.parquet", Store(w.db).keys_frame().head(3).with_columns(split=pl.lit("holdout"))), "--db", w.db], "split column has values other than"),
    ("labels: confidence text", lambda w: ["embed", "labels", w.parquet("conf.parquet", Store(w.db).keys_frame().head(3).with_columns(label=pl.lit("T"), label_confidence=pl.lit("high"))), "--db", w.db], "label_confidence.*not numbers"),
    ("labels: nothing given", lambda w: ["embed", "labels", "--db", w.db], "either a label table"),
    ("labels: restore unknown", lambda w: ["embed", "labels", "--db", w.db, "--restore", "999"], "no version 999"),
    # -- embed index / similar / audit ---------------------------------------------------------
    ("index: bad kind", lambda w: ["embed", "index", "--db", w.db, "--kind", "hnsw"], "kind='hnsw' is not supported"),
    ("index: bad vector", lambda w: ["embed", "index", "--db", w.db, "--vector", "nucleus"], "--vector must be one of"),
    ("index: unknown table", lambda w: ["embed", "index", "--db", w.db, "--table", "nope"], "no table 'nope'"),
    ("similar: malformed cell", lambda w: ["embed", "similar", "--db", w.db, "--cell", "c12"], "SLIDE:CELL_ID"),
    ("similar: k 0", lambda w: ["embed", "similar", "--db", w.db, "--cell", "synth_s0:x", "-k", "0"], "k=0 is not a positive integer"),
    ("similar: bad vector", lambda w: ["embed", "similar", "--db", w.db, "--cell", "synth_s0:x", "--vector", "nucleus"], "--vector must be one of"),
    ("audit: min share 2", lambda w: ["embed", "audit", "--db", w.db, "--out", w.tmp / "q.parquet", "--min-share", "2"], r"--min-share 2.0 must lie in \(0, 1\]"),
    ("audit: k -1", lambda w: ["embed", "audit", "--db", w.db, "--out", w.tmp / "q.parquet", "-k", "-1"], "k=-1 is not a positive integer"),
    # -- heads ---------------------------------------------------------------------------------
    ("train: unknown stage", lambda w: ["heads", "train", "--db", w.db, "--out", w.tmp / "r_stage", "--stage", "final"], "unknown stage 'final'"),
    ("train: label file without label", lambda w: ["heads", "train", "--db", w.db, "--out", w.tmp / "r_lab", "--labels", w.file("nolabel.csv", "slide_id,cell_id\nx,1\n")], "no label, confidence or split column"),
    ("train: out under a file", lambda w: ["heads", "train", "--db", w.db, "--out", w.file("runfile", "x") / "r"], "is a file"),
    ("eval: no run", lambda w: ["heads", "eval", "--run", w.tmp / "norun", "--db", w.db], "no `local` checkpoint"),
    ("eval: truncated gate", lambda w: ["heads", "eval", "--run", w.run_copy("r_gate", "truncate", "gate"), "--db", w.db, "--baselines", "none"], r"gate.safetensors cannot be read: it is truncated or corrupt"),
    ("eval: junk local json", lambda w: ["heads", "eval", "--run", w.run_copy("r_json", "json", "local"), "--db", w.db], "not valid JSON"),
    ("eval: bad --on", lambda w: ["heads", "eval", "--run", w.run, "--db", w.db, "--on", "training"], "--on must be one of"),
    ("eval: other dims", lambda w: ["heads", "eval", "--run", w.run, "--db", w.other_dims_db, "--baselines", "none"], "vector dims do not match"),
    ("eval: other cells", lambda w: ["heads", "eval", "--run", w.run, "--db", w.other_cells_db, "--baselines", "none"], "none of the .* cells this run was trained and validated on.*--cohort"),
    ("predict: truncated global", lambda w: ["heads", "predict", "--run", w.run_copy("r_global", "truncate", "global"), "--db", w.db, "--out", w.tmp / "p1"], "global.safetensors cannot be read"),
    ("predict: out under a file", lambda w: ["heads", "predict", "--run", w.run, "--db", w.db, "--out", w.file("predfile", "x") / "p"], "is a file"),
    ("predict: unknown slide", lambda w: ["heads", "predict", "--run", w.run, "--db", w.db, "--slide", "nope", "--out", w.tmp / "p2"], r"has no cells of slide\(s\) nope \(stored: synth_s0"),
]  # fmt: skip


def store_files(db: Path) -> dict[str, int]:
    """Every file of the store (lock files aside) with its size: any commit would add one."""
    return {
        str(p.relative_to(db)): p.stat().st_size
        for p in sorted(db.rglob("*"))
        if p.is_file() and ".nuclass-" not in str(p.relative_to(db))
    }


def run_cli(argv: list, capsys, monkeypatch) -> tuple[int, str]:
    from cli import embed, heads

    prog, *args = (str(a) for a in argv)
    main = {"embed": embed.main, "heads": heads.main}[prog]
    monkeypatch.setattr(sys, "argv", [prog, *args])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def test_corpus_is_large_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_message_and_changes_nothing(case, world, capsys, monkeypatch):
    _, argv, pattern = case
    argv = argv(world)  # builds the case's input files first
    stores = [world.db, world.other_dims_db, world.other_cells_db]
    before = [store_files(db) for db in stores]
    code, err = run_cli(argv, capsys, monkeypatch)
    assert code != 0, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1, err
    import re

    assert re.search(pattern, err.replace("\n", " ")), err
    assert [store_files(db) for db in stores] == before, "the store changed"
