"""`heads explain`: Grad-CAM of single predictions on a tiny run over the synthetic store."""


import numpy as np
import pytest
import torch
from PIL import Image

from embedstore.errors import UserError
from embedstore.extract.backbones import build_backbone
from embedstore.io.slides import Slide
from embedstore.store import Store
from heads import checkpoint as ckpt
from heads import explain as ex
from heads import runs
from heads.splits import SplitConfig
from heads.train import TrainConfig, predict_all
from tests.clirun import run_cli


@pytest.fixture(scope="module")
def trained(extracted_store, tmp_path_factory, one_torch_thread):
    """A tiny trained run (all stages) on the session's synthetic store, trained in-process."""
    db, _ = extracted_store
    run = tmp_path_factory.mktemp("run") / "r"
    cfg = TrainConfig(epochs=2, global_epochs=2, gate_epochs=1, batch_size=64)
    runs.train(db, run, "all", cfg, scale=False, split_config=SplitConfig(guard_um=40.0), log=lambda m: None)
    return db, run


@pytest.fixture(scope="module")
def cells(trained):
    db, _ = trained
    meta = Store(db).load("cells", vectors=()).meta
    picks = [meta.filter(meta["slide_id"] == s).row(3, named=True) for s in ("synth_s0", "synth_s1")]
    return [f"{r['slide_id']}:{r['cell_id']}" for r in picks]


@pytest.fixture(scope="module")
def explained(trained, cells):
    """Both paths of both cells at both target layers, plus what was logged."""
    db, run = trained
    logs: list[str] = []
    out = {layer: ex.compute(run, db, cells, path="both", target_layer=layer, log=logs.append)
           for layer in ex.TARGET_LAYERS}  # fmt: skip
    return out, logs


def test_cams_are_finite_in_unit_range_and_not_constant(explained):
    out, _ = explained
    for layer, found in out.items():
        for cell in found:
            assert [e.path for e in cell.paths] == ["local", "context"]
            for e in cell.paths:
                px = 224 if e.path == "local" else 128  # test backbones' input sizes
                assert e.cam.shape == (px, px) and e.crop.shape == (px, px, 3), (layer, e.path)
                assert e.grid_cam.shape == ((16, 16) if e.path == "local" else (4, 4))
                assert np.isfinite(e.cam).all() and e.cam.min() >= 0.0 and e.cam.max() <= 1.0
                assert e.target_layer == layer and e.class_name == e.predicted
            # a 4x4 context CAM may legitimately be empty (all weighted sums < 0); the 16x16
            # local one of these cells is not
            local = cell.paths[0]
            assert local.cam.std() > 0.05 and local.cam.max() == pytest.approx(1.0), (layer, cell.key)
    # the two layers are different explanations
    assert not np.allclose(out["last-block"][0].paths[0].cam, out["patch-embed"][0].paths[0].cam)


def test_recomputed_vectors_and_predictions_match_the_store(trained, explained):
    db, run = trained
    out, logs = explained
    assert not [m for m in logs if m.startswith("warning")], logs
    info = ckpt.read_info(run, "local")
    data = runs.load_cell_data(db, classes=info["classes"], tissue_vocab=info["tissues"])
    keys = runs.cell_keys(data.meta)
    probs = predict_all(data, run)
    for cell in out["last-block"]:
        row = keys.index(cell.key)
        for e, p in zip(cell.paths, (probs["p_local"][row], probs["p_global"][row]), strict=True):
            # stored vectors are float16; measured cosine 1.000000 on these cells
            assert e.cosine >= ex.MIN_COSINE, (cell.key, e.path, e.cosine)
            assert e.predicted == info["classes"][int(p.argmax())]
            assert e.predicted_probability == pytest.approx(float(p.max()), abs=2e-3)


def _reference_cam(trained, cell: str, layer: str, class_name: str) -> np.ndarray:
    """Grad-CAM written out independently: trunk unfrozen, retain_grad on the layer's output."""
    db, run = trained
    head, info = ckpt.load_local(run)
    config = Store(db).config("cells")["vectors"]["local"]
    sid, cid = cell.split(":")
    meta = Store(db).load("cells", slides=[sid], vectors=()).meta
    rec = meta.filter(meta["cell_id"] == cid).row(0, named=True)
    from embedstore.search.explore import slide_paths

    paths = {p.stem: p for p in slide_paths(db).values()}
    with Slide(paths[sid]) as slide:
        crop = ex.read_crop(slide, rec["x_px"], rec["y_px"], config)
    bb = build_backbone("test-vit-local", pooling=config["pooling"], input_px=config["input_px"])
    bb.trunk.requires_grad_(True)
    layer_module = bb.trunk.blocks[-1].norm1 if layer == "last-block" else bb.trunk.patch_embed
    seen = {}

    def hook(_m, _i, o):
        o.retain_grad()
        seen["a"] = o

    handle = layer_module.register_forward_hook(hook)
    t = torch.tensor([info["tissues"].index(rec["tissue"])])
    logits = head(bb(torch.from_numpy(crop)[None]), t)
    handle.remove()
    logits[0, info["classes"].index(class_name)].backward()
    a, g = seen["a"][0], seen["a"].grad[0]
    if a.ndim == 2:  # tokens: 1 cls + 4 registers, then 16 x 16 patches row-major
        a, g = a[5:].reshape(16, 16, -1), g[5:].reshape(16, 16, -1)
    cam = torch.relu((a * g.mean(dim=(0, 1))).sum(-1)).detach()
    return ((cam - cam.min()) / (cam.max() - cam.min())).numpy()


@pytest.mark.parametrize("layer", ex.TARGET_LAYERS)
def test_matches_an_independent_grad_cam_of_a_chosen_class(trained, cells, layer):
    db, run = trained
    classes = ckpt.read_info(run, "local")["classes"]
    default = ex.compute(run, db, cells[:1], path="local", target_layer=layer)[0].paths[0]
    other = next(c for c in classes if c != default.predicted)
    chosen = ex.compute(run, db, cells[:1], path="local", target_layer=layer, class_name=other)[0].paths[0]
    assert chosen.class_name == other and chosen.predicted == default.predicted
    ref = _reference_cam(trained, cells[0], layer, other)
    np.testing.assert_allclose(chosen.grid_cam, ref, atol=1e-4)
    np.testing.assert_allclose(default.grid_cam, _reference_cam(trained, cells[0], layer, default.predicted), atol=1e-4)
    assert not np.allclose(chosen.grid_cam, default.grid_cam)


def test_patch_embed_cam_singles_out_the_one_patch_that_differs(trained):
    """Honest for any (random) weights: patch-embed is a stride-14 conv, so each token sees only
    its own 14 px patch, and Grad-CAM weights are one vector for the whole map. A crop of
    identical patches with one odd patch therefore gets one CAM value on every other patch and
    may differ only at the odd patch's (row, col), not at a shifted or transposed place. (Flip
    equivariance would not be honest: position embeddings and attention are not symmetric.)"""
    _, run = trained
    head, info = ckpt.load_local(run)
    bb = build_backbone("test-vit-local")
    crop = np.empty((224, 224, 3), np.uint8)
    crop[:] = (230, 180, 210)  # pale eosin background
    row, col = 3, 10
    crop[row * 14:(row + 1) * 14, col * 14:(col + 1) * 14] = (70, 40, 130)  # a haematoxylin patch
    t = torch.tensor([0])
    differs = 0
    for c in range(len(info["classes"])):
        res = ex.explain_crop(bb, lambda v, t=t: head(v, t), crop, "patch-embed", c)
        grid = res["grid_cam"]
        others = np.delete(grid.ravel(), row * 16 + col)
        assert np.ptp(others) < 1e-5, c
        if abs(grid[row, col] - others[0]) > 0.5:  # min-max scaled: the odd patch is 0 or 1
            differs += 1
            assert grid[col, row] == pytest.approx(others[0], abs=1e-5)
    assert differs >= len(info["classes"]) // 2, differs


def test_refusals(trained, cells, tmp_path):
    db, run = trained
    with pytest.raises(UserError, match="is not in the store"):
        ex.compute(run, db, ["synth_s0:no-such-cell"])
    with pytest.raises(UserError, match="SLIDE:CELL"):
        ex.compute(run, db, ["no-colon"])
    with pytest.raises(UserError, match="does not exist"):
        ex.compute(tmp_path / "missing-run", db, cells[:1])
    with pytest.raises(UserError, match="unknown target layer"):
        ex.compute(run, db, cells[:1], target_layer="block-7")
    with pytest.raises(UserError, match="unknown path"):
        ex.compute(run, db, cells[:1], path="gate")
    with pytest.raises(UserError, match="not one of the run's classes"):
        ex.compute(run, db, cells[:1], class_name="Unicorn")
    config = dict(Store(db).config("cells")["vectors"]["local"], weights_sha256="0" * 64)
    with pytest.raises(UserError, match="would not be of the stored vectors"):
        ex.load_backbone(config, "local", None, "cpu")


def test_cli_prints_paths_and_writes_pngs(trained, cells, tmp_path):
    db, run = trained
    out = tmp_path / "explain"
    args = ["explain", "--run", run, "--db", db, "--out", out, "--target-layer", "patch-embed"]
    for c in cells:
        args += ["--cell", c]
    proc = run_cli("cli.heads", *args)
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.split()
    names = [f"{c.replace(':', '__')}.png" for c in cells] + ["grid.png"]
    assert printed == [str(out / n) for n in names]
    for n in names[:-1]:  # per cell: crop + overlay for each of the two paths
        assert Image.open(out / n).size == ex.figure_size(1, 4, ex.PANEL_IN, ex.CELL_DPI)
    assert Image.open(out / "grid.png").size == ex.figure_size(len(cells), 4, ex.GRID_PANEL_IN, ex.GRID_DPI)
