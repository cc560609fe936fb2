"""`embed annotate`: labels from Xenium expression (scanpy clustering, marker naming, confidence)."""

import shutil

import anndata as ad
import numpy as np
import polars as pl
import pytest

from embedstore.annotate.recipe import (
    annotate,
    class_scores,
    read_expression,
    read_panel,
    robust_scale,
)
from embedstore.errors import CellsError, UserError
from embedstore.synth import make_synthetic
from embedstore.synth.bundle import write_10x_h5
from tests.clirun import run_cli
from tests.test_embed_cli import usage_error


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """2 slides x 1500 cells: enough cells per sample for stable Leiden clusters."""
    return make_synthetic(tmp_path_factory.mktemp("ann") / "data", seed=3, n_cells=3000, n_slides=2)


@pytest.fixture(scope="module")
def annotated(synth):
    frame, results = annotate([synth.out_dir / "xenium"], synth.out_dir / "panel.csv")
    truth = pl.read_parquet(synth.truth_path).select(
        "slide_id", "cell_id", "x_px", "y_px", truth="label", kind="expression_kind")
    return frame.join(truth, on=["slide_id", "cell_id"], how="left", suffix="_truth"), results


def test_labels_match_the_synthetic_truth(annotated):
    j, results = annotated
    assert j["truth"].null_count() == 0  # every cell found its truth row (ids and slide names)
    assert {"slide_id", "cell_id", "label", "label_confidence", "kept", "cluster", "n_counts",
            "control_share", "x_px", "y_px", "x_um", "y_um"} <= set(j.columns)
    # the registered H&E positions are the synthetic truth's
    np.testing.assert_allclose(j["x_px"].to_numpy(), j["x_px_truth"].to_numpy(), atol=1e-6)
    kept = j.filter(pl.col("kept") & (pl.col("kind") == "single"))
    assert (kept["label"] == kept["truth"]).mean() >= 0.95
    per_class = kept.group_by("truth").agg((pl.col("label") == pl.col("truth")).mean().alias("acc"))
    assert per_class["acc"].min() >= 0.85, per_class
    rate = j.group_by("kind").agg(pl.col("kept").mean(), pl.col("label").is_not_null().mean().alias("labelled"))
    rate = {r["kind"]: r for r in rate.iter_rows(named=True)}
    assert rate["single"]["kept"] >= 0.70
    assert rate["doublet"]["kept"] < rate["single"]["kept"]  # two classes' markers: low margin
    assert rate["empty"]["labelled"] == 0.0  # below min_counts: never labelled
    assert rate["uncovered"]["kept"] <= 0.25  # not forced into a panel class
    # kept <=> labelled and confidence >= 0.60; the confidence mixes purity and margin
    ok = j.filter(pl.col("label").is_not_null())
    assert ((ok["label_confidence"] >= 0.6) == ok["kept"]).all()
    assert not j.filter(pl.col("label").is_null())["kept"].any()
    assert all(r.clusters["class"].null_count() >= 1 for r in results)  # the uncovered cluster


def test_robust_scale_and_class_scores_hand_computed():
    m = np.array([0.0, 1.0, 2.0, 3.0, 100.0, np.nan])
    # median 2, MAD 1: 0.5 + 0.5 (m - 2) / 3, clipped
    np.testing.assert_allclose(robust_scale(m)[:5], [0.5 - 1 / 3, 0.5 - 1 / 6, 0.5, 0.5 + 1 / 6, 1.0])
    assert np.isnan(robust_scale(m)[5])
    # two classes share gene S (weight 1/2 each), A has a, B has b (weight 1)
    x = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    a = ad.AnnData(x, var=dict(gene=["a", "b", "S"]))
    a.var_names = ["a", "b", "S"]
    scores, classes = class_scores(a, {"A": ["a", "S"], "B": ["b", "S"]})
    z = (x - x.mean(0)) / x.std(0)  # every gene has mean 0.5, s.d. 0.5: z = +-1
    expect_a = (z[:, 0] * 1 + z[:, 2] * 0.5) / 1.5
    expect_b = (z[:, 1] * 1 + z[:, 2] * 0.5) / 1.5
    assert classes == ["A", "B"]
    np.testing.assert_allclose(scores, np.column_stack([expect_a, expect_b]))


def test_h5_and_mex_read_the_same_and_controls_are_dropped(synth, tmp_path):
    import scanpy as sc

    bundle = synth.slides[0].bundle
    mex = read_expression(bundle)
    raw = sc.read_10x_mtx(bundle / "cell_feature_matrix", var_names="gene_symbols", gex_only=False)
    types = raw.var["feature_types"].astype(str)
    assert {"Negative Control Probe", "Negative Control Codeword", "Unassigned Codeword"} <= set(types)
    assert mex.n_vars == int((types == "Gene Expression").sum())  # controls dropped
    gex = raw[:, (types == "Gene Expression").to_numpy()].X.sum(1).A1
    ctrl = raw[:, (types != "Gene Expression").to_numpy()].X.sum(1).A1
    np.testing.assert_array_equal(mex.obs["n_counts"].to_numpy(), gex)
    np.testing.assert_allclose(mex.obs["control_share"].to_numpy(), np.where(gex + ctrl > 0, ctrl / np.maximum(gex + ctrl, 1), 0))
    h5_bundle = tmp_path / "b"
    shutil.copytree(bundle, h5_bundle, symlinks=True)
    shutil.rmtree(h5_bundle / "cell_feature_matrix")
    is_gex = (types == "Gene Expression").to_numpy()
    write_10x_h5(h5_bundle / "cell_feature_matrix.h5", list(raw.obs_names), tuple(raw.var_names[is_gex]),
                 raw[:, is_gex].X.toarray(), raw[:, ~is_gex].X.toarray())  # fmt: skip
    h5 = read_expression(h5_bundle)
    assert list(h5.obs_names) == list(mex.obs_names) and list(h5.var_names) == list(mex.var_names)
    assert (h5.X != mex.X).nnz == 0
    np.testing.assert_allclose(h5.obs["control_share"], mex.obs["control_share"])
    # a name given to two features (real panels have had them): renamed and said, not a crash later
    genes = list(raw.var_names[is_gex])
    genes[1] = genes[0]
    write_10x_h5(h5_bundle / "cell_feature_matrix.h5", list(raw.obs_names), tuple(genes),
                 raw[:, is_gex].X.toarray(), raw[:, ~is_gex].X.toarray())  # fmt: skip
    with pytest.warns(UserWarning, match="1 feature names repeat"):
        dup = read_expression(h5_bundle)
    assert dup.var_names.is_unique and list(dup.var_names[:2]) == [genes[0], f"{genes[0]}-1"]


def test_bad_inputs_get_one_clear_message(synth, tmp_path):
    bundle = synth.slides[0].bundle
    panel = synth.out_dir / "panel.csv"
    no_matrix = tmp_path / "no_matrix"
    shutil.copytree(bundle, no_matrix, symlinks=True)
    shutil.rmtree(no_matrix / "cell_feature_matrix")
    with pytest.raises(CellsError, match="no feature matrix"):
        annotate([no_matrix], panel)
    wrong_genes = tmp_path / "wrong.csv"
    wrong_genes.write_text("class,gene\nA,NOPE1\nA,NOPE2\nB,NOPE3\nB,NOPE4\n")
    with pytest.raises(UserError, match="no gene of the marker panel"):
        annotate([bundle], wrong_genes)
    ids = tmp_path / "ids"
    shutil.copytree(bundle, ids, symlinks=True)
    cells = pl.read_parquet(ids / "cells.parquet")
    cells.with_columns(cell_id=pl.col("cell_id") + "-x").write_parquet(ids / "cells.parquet")
    with pytest.raises(CellsError, match="cell ids .* is in the feature matrix"):
        annotate([ids], panel)
    one = tmp_path / "one.csv"
    one.write_text("class,gene\nT_Cell,CD3E\nT_Cell,CD3D\nB_Cell,MS4A1\n")
    with pytest.raises(UserError, match=r"single marker gene: B_Cell \(MS4A1\)"):
        read_panel(one)
    # the CLI: one error line, exit 2, nothing written
    proc = run_cli("cli.embed", "annotate", no_matrix, "--markers", panel, "--out", tmp_path / "o.parquet")
    usage_error(proc, "no feature matrix")
    assert not (tmp_path / "o.parquet").exists()


def test_missing_panel_genes_warn_and_hand_naming_wins(synth, tmp_path):
    bundle = synth.slides[0].bundle
    panel = pl.read_csv(synth.out_dir / "panel.csv")
    extra = pl.concat([panel, pl.DataFrame({"class": ["T_Cell"], "gene": ["NOT_A_GENE"]})])
    extra.write_csv(tmp_path / "p.csv")
    msgs = []
    frame, results = annotate([bundle], tmp_path / "p.csv", log=msgs.append)
    assert any("NOT_A_GENE" in m and "warning" in m for m in msgs)
    named = results[0].clusters.filter(pl.col("class") == "T_Cell")["cluster"][0]
    (tmp_path / "map.csv").write_text(f"cluster,class\n{named},Lymphocyte\n")
    (tmp_path / "syn.json").write_text('{"Macrophage": "Myeloid"}')
    frame2, _ = annotate([bundle], tmp_path / "p.csv", clusters=tmp_path / "map.csv", synonyms=tmp_path / "syn.json")
    before = frame.filter(pl.col("cluster") == named)
    after = frame2.filter(pl.col("cluster") == named)
    assert (before["label"] == "T_Cell").all() and (after["label"] == "Lymphocyte").all()
    assert "Myeloid" in frame2["label"].to_list() and "Macrophage" not in frame2["label"].to_list()


def _store_of(cells: pl.DataFrame, db):
    """The cells in a store with random vectors: `annotate --db` attaches labels by key, so no
    extraction is needed to test it (an extraction of these 3000 cells took ~10 s)."""
    import numpy as np
    import pyarrow as pa

    from embedstore.store import Store, vectors_to_arrow

    n, rng = cells.height, np.random.default_rng(0)
    store = Store(db, create=True)
    store.cells_table("cells", {"local": 8, "context": 8}, {"test": "annotate"})
    vectors = {k: vectors_to_arrow(rng.normal(size=(n, 8))) for k in ("local", "context")}
    store.append("cells", pa.table({
        **{c: cells[c].to_arrow() for c in ("slide_id", "cell_id", "x_px", "y_px", "x_um", "y_um", "tissue")},
        "run_id": ["t"] * n, "local_outside": np.zeros(n, np.float32), "local": vectors["local"],
        "context_outside": np.zeros(n, np.float32), "context": vectors["context"],
    }))  # fmt: skip
    return db


def test_cli_writes_labels_report_and_store_label_set(synth, tmp_path):
    from embedstore.store import Store
    from heads.runs import load_cell_data

    db = _store_of(pl.read_parquet(synth.cells_path), tmp_path / "db")
    out = tmp_path / "labels.parquet"
    # in-process (typer's runner), so numba's JIT of scanpy/umap from the fixture is reused:
    # a subprocess compiles it all again (~40 s)
    from typer.testing import CliRunner

    from cli.embed import app

    result = CliRunner().invoke(app, ["annotate", str(synth.out_dir / "xenium"), "--markers",
                                      str(synth.out_dir / "panel.csv"), "--out", str(out), "--db", str(db)])  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    frame = pl.read_parquet(out)
    report = tmp_path / "labels_report"
    assert (report / "report.md").exists() and (report / "class_counts.png").stat().st_size > 5000
    assert len(list(report.glob("*_clusters.png"))) == 2 and len(list(report.glob("*_markers.png"))) == 2
    stored = Store(db).labels()
    assert stored.height == frame.height and stored["source"][0] == "annotate:xenium-markers"
    # heads use only kept cells by default; 0 keeps every labelled cell
    kept = load_cell_data(db, labelled_only=True, min_label_confidence=0.6)
    every = load_cell_data(db, labelled_only=True, min_label_confidence=0.0)
    assert int((kept.label.numpy() >= 0).sum()) == int(frame["kept"].sum())
    assert int((every.label.numpy() >= 0).sum()) == int(frame["label"].is_not_null().sum())
    # annotating one bundle again changes its slide's labels only: the other slide keeps its own
    bundle = sorted((synth.out_dir / "xenium").iterdir())[0]
    stored = stored.with_columns(label=pl.when(pl.col("slide_id") == bundle.name).then(pl.lit(None)).otherwise(pl.col("label")))
    Store(db).set_labels(stored.drop("source"), source="edited")  # the first slide's labels gone, to see them return
    result = CliRunner().invoke(app, ["annotate", str(bundle), "--markers", str(synth.out_dir / "panel.csv"),
                                      "--out", str(tmp_path / "one.parquet"), "--db", str(db), "--no-report"])  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    again = Store(db).labels().sort("slide_id", "cell_id")
    assert again.height == stored.height and set(again["slide_id"]) == set(stored["slide_id"])
    other = pl.col("slide_id") != bundle.name
    assert again.filter(other)["label"].to_list() == stored.sort("slide_id", "cell_id").filter(other)["label"].to_list()
    assert again.filter(~other)["label"].to_list() == frame.sort("slide_id", "cell_id").filter(~other)["label"].to_list()


def test_he_placement_is_said_or_refused_never_silently_dropped(synth, tmp_path):
    """A bundle without its H&E says that its labels carry no position; a broken alignment fails
    as `embed cells` fails on it (labels under the folder name would match no stored cell);
    cells that fall outside the H&E are counted; one bundle's options are refused for several."""
    from typer.testing import CliRunner

    from cli.embed import app
    from embedstore.annotate.recipe import Placement, _he_positions
    from embedstore.errors import AlignmentError
    from embedstore.io import xenium as X

    src = synth.slides[0]
    bundle = tmp_path / "run_0042"
    shutil.copytree(src.bundle, bundle, symlinks=True)
    next(p for p in bundle.glob("*he_image*") if p.suffix != ".csv").unlink()  # a copied link; the slide: src.path
    slide = src.path
    msgs: list[str] = []
    sid, positions = _he_positions(bundle, X.open_bundle(bundle), Placement(), msgs.append)
    assert (sid, positions) == ("run_0042", None)
    assert any(m.startswith("warning: run_0042: no H&E image") and "--slide" in m for m in msgs), msgs
    # --slide places them again, under the slide file's id; cells moved off the H&E are counted
    cells = pl.read_parquet(bundle / "cells.parquet")
    off = cells["cell_id"].head(7).to_list()
    cells.with_columns(x_centroid=pl.when(pl.col("cell_id").is_in(off)).then(-5000.0).otherwise(pl.col("x_centroid"))
                       ).write_parquet(bundle / "cells.parquet")  # fmt: skip
    msgs.clear()
    place = Placement(slide=slide)
    sid, positions = _he_positions(bundle, X.open_bundle(bundle, he_image=slide), place, msgs.append)
    assert sid == src.slide_id and positions.height == cells.height - 7
    assert not set(off) & set(positions["cell_id"].to_list())
    assert any(f"7 of {cells.height} cells have no H&E position" in m and "outside" in m for m in msgs), msgs
    # a singular alignment is an error, in the API and in the CLI, and nothing is written
    (bundle / "bad_he_imagealignment.csv").write_text("1,0,0\n2,0,0\n0,0,1\n")
    (bundle / next(src.bundle.glob("*alignment.csv")).name).unlink()
    with pytest.raises(AlignmentError, match="singular"):
        annotate([bundle], synth.out_dir / "panel.csv", place=place)
    out = tmp_path / "labels.parquet"
    run = CliRunner().invoke(app, ["annotate", str(bundle), "--markers", str(synth.out_dir / "panel.csv"),
                                   "--out", str(out), "--slide", str(slide)])  # fmt: skip
    assert run.exit_code != 0 and isinstance(run.exception, AlignmentError) and not out.exists()
    # --no-positions labels without the H&E, under the slide id given
    sid, positions = _he_positions(bundle, X.open_bundle(bundle), Placement(positions=False, slide_id="S9"), msgs.append)
    assert (sid, positions) == ("S9", None)
    with pytest.raises(UserError, match="--no-positions"):
        Placement(positions=False, slide=slide)
    with pytest.raises(UserError, match="--slide-id belong"):
        annotate([synth.out_dir / "xenium"], synth.out_dir / "panel.csv", place=Placement(slide_id="S1"))
