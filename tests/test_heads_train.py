"""Training, splits, data validation and checkpoints of the NuClass heads on a synthetic problem.

The problem: 6 classes, 3 tissues, 3 slides. Classes 0-2 differ only in the local vector
(their context is identical); classes 3-5 differ only in the context vector (their local
vector is identical). Each tissue shifts the local vector (a batch effect FiLM can undo).
"""

import json
from dataclasses import replace

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.metrics import f1_score

from embedstore.errors import UserError
from heads import checkpoint as ckpt
from heads.data import CellData
from heads.splits import SplitConfig, make_split, stripe_parts
from heads.train import Heads, TrainConfig, predict_all, train_gate, train_local, train_stage

PROV = {
    "local": {"backbone": "tiny-vit", "weights_sha256": "aa11", "dim": 32},
    "context": {"backbone": "tiny-dino", "weights_sha256": "bb22", "dim": 24},
    "created": "2025-01-01T00:00:00",
}
CFG = TrainConfig(
    epochs=12, global_epochs=12, gate_epochs=3, batch_size=128, lr=2e-3, warmup_steps=5,
    patience=4, hidden=64, proj=32, gate_proj=16, gate_hidden=(32, 16), gate_lr=2e-3,
    gate_head_lr=5e-4, seed=0, stage3_heads="joint",
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic(n=3000, du=32, dc=24, seed=0, label_null_frac=0.02):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 6, n)
    t = rng.integers(0, 3, n)
    mu_l = rng.normal(0, 0.5, (6, du))
    mu_l[3:] = mu_l[3]  # classes 3-5: same local vector
    mu_c = rng.normal(0, 0.4, (6, dc))
    mu_c[:3] = mu_c[0]  # classes 0-2: same context
    shift = rng.normal(0, 1.0, (3, du))
    local = (mu_l[y] + shift[t] + rng.normal(0, 1, (n, du))).astype(np.float32)
    context = (mu_c[y] + rng.normal(0, 1, (n, dc))).astype(np.float32)
    labels = [f"class{k}" for k in y]
    for i in np.flatnonzero(rng.random(n) < label_null_frac):
        labels[i] = None
    meta = pl.DataFrame(
        {
            "slide_id": [f"slide{s}" for s in rng.integers(0, 3, n)],
            "cell_id": np.arange(n),
            "x_px": rng.uniform(0, 8000, n),
            "y_px": rng.uniform(0, 4000, n),
            "tissue": [["colon", "lung", "pancreas"][k] for k in t],
            "label": labels,
        }
    ).with_columns(x_um=pl.col("x_px") * 0.25, y_um=pl.col("y_px") * 0.25)
    return meta, local, context


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    meta, local, context = synthetic()
    data = CellData.from_arrays(meta, local, context, provenance=PROV)
    run_dir = tmp_path_factory.mktemp("run")
    logs: list[str] = []
    out = train_stage("all", data, run_dir, CFG, log=logs.append)
    return data, run_dir, out, logs


def _val_f1(data, split, pred, average="macro"):
    v = split.val[data.label.numpy()[split.val] >= 0]
    y = data.label.numpy()[v]
    return f1_score(y, pred[v], average=average, labels=None if average == "macro" else range(6))


# ------------------------------------------------------------------------- data


def test_cell_data_encoding_and_subset():
    meta, local, context = synthetic(n=50)
    data = CellData.from_arrays(meta, local, context, provenance=PROV)
    assert data.classes == [f"class{k}" for k in range(6)]
    assert data.tissues == ["colon", "lung", "pancreas"]
    assert data.local.dtype == torch.float32 and data.local_dim == 32 and data.context_dim == 24
    assert data.local.data_ptr() == torch.from_numpy(local).data_ptr()  # shared, not copied
    labels = meta["label"].to_list()
    for i in range(50):
        want = -1 if labels[i] is None else data.classes.index(labels[i])
        assert data.label[i].item() == want
        assert data.tissues[data.tissue[i]] == meta["tissue"][i]
    sub = data.subset(np.array([3, 1, 4]))
    assert sub.meta["cell_id"].to_list() == [3, 1, 4]
    torch.testing.assert_close(sub.local, data.local[[3, 1, 4]])
    mask = np.zeros(50, dtype=bool)
    mask[[0, 2]] = True
    assert data.subset(mask).meta["cell_id"].to_list() == [0, 2]


def test_cell_data_errors():
    meta, local, context = synthetic(n=40)
    with pytest.raises(UserError, match="no labelled cells"):
        CellData.from_arrays(meta.with_columns(label=pl.lit(None, pl.Utf8)), local,
                             context).check_trainable()
    with pytest.raises(UserError, match="no `label` column"):
        CellData.from_arrays(meta.drop("label"), local, context).check_trainable()
    with pytest.raises(UserError, match="only one class"):
        CellData.from_arrays(meta.with_columns(label=pl.lit("T_Cell")), local,
                             context).check_trainable()
    bad = local.copy()
    bad[7, 3] = np.nan
    with pytest.raises(UserError, match=r"NaN/inf in their `local` vector \(first: row 7"):
        CellData.from_arrays(meta, bad, context)
    with pytest.raises(UserError, match="row counts differ"):
        CellData.from_arrays(meta, local[:-1], context)
    with pytest.raises(UserError, match="'pancreas'.* not seen in training"):
        CellData.from_arrays(meta, local, context, tissues=["colon", "lung"])
    # labels outside given classes become unlabelled (held-out cohorts) but block training
    d = CellData.from_arrays(meta, local, context, classes=["class0", "class1"])
    assert d.n_unknown_labels > 0 and (d.label >= 0).sum() > 0
    with pytest.raises(UserError, match="outside the checkpoint's classes"):
        d.check_trainable()


# ------------------------------------------------------------------------- splits


def test_stripes_on_a_line_hand_computed():
    # 1000 cells at x = 0..999 µm: cuts at the 0.2 / 0.8 quantiles (199.8, 799.2); the band is
    # 64 µm either side of each cut: val 0..135, guard 136..263, train 264..735, guard 736..863,
    # test 864..999 (mirrored when the slide's seed flips the direction)
    x, y = np.arange(1000.0), np.zeros(1000)
    for seed in range(4):
        parts = stripe_parts(x, y, val_fraction=0.2, test_fraction=0.2, guard_um=128, seed=seed)
        first = "val" if parts[0] == "val" else "test"
        last = "test" if first == "val" else "val"
        expect = np.array([first] * 136 + ["guard"] * 128 + ["train"] * 472 + ["guard"] * 128 + [last] * 136)
        assert (parts == expect).all(), seed
    # too few cells: not cut, all train; no test fraction: val | train only
    assert (stripe_parts(x[:10], y[:10], val_fraction=0.2, test_fraction=0.2, guard_um=128) == "train").all()
    two = stripe_parts(x, y, val_fraction=0.25, test_fraction=0.0, guard_um=0, seed=0)
    assert sorted(set(two)) == ["train", "val"] and (two == "val").sum() == 250


def test_guard_band_separates_training_from_scored_cells():
    rng = np.random.default_rng(3)
    n = 6000
    meta = pl.DataFrame({
        "slide_id": [f"s{k}" for k in rng.integers(0, 3, n)], "cell_id": np.arange(n).astype(str),
        "x_um": rng.uniform(0, 3000, n), "y_um": rng.uniform(0, 1200, n),
        "label": [f"c{k}" for k in rng.integers(0, 4, n)],
    })  # fmt: skip
    s = make_split(meta)
    assert s.source == "stripes" and min(s.train.size, s.val.size, s.test.size, s.guard.size) > 0
    xy = meta.select("x_um", "y_um").to_numpy()
    slides = meta["slide_id"].to_numpy()
    for slide in np.unique(slides):
        tr = s.train[slides[s.train] == slide]
        for part in (s.val, s.test):
            sc = part[slides[part] == slide]
            d = np.sqrt(((xy[sc, None, :] - xy[None, tr, :]) ** 2).sum(-1)).min()
            assert d >= 128.0, (slide, d)
    assert s.info["leak"]["val"]["train_within_context"] == 0.0
    assert s.info["leak"]["test"]["train_within_crop"] == 0.0
    # counts per slide and class are kept, and add up
    per_slide = pl.DataFrame(s.info["per_slide"])
    assert per_slide.select(pl.sum_horizontal("train", "val", "test", "guard")).sum().item() == n
    assert {r["class"] for r in s.info["per_class"]} == {"c0", "c1", "c2", "c3"}
    # without the band the same stripes leak: val cells near the cut have a training cell within 128 µm
    open_split = make_split(meta, config=SplitConfig(guard_um=0))
    assert open_split.guard.size == 0 and open_split.info["leak"]["val"]["train_within_context"] > 0.1
    # a user column is used as is, and its leak is measured, not hidden
    col = make_split(meta.with_columns(split=pl.Series(["train", "val", "test"] * (n // 3))))
    assert col.source == "column" and col.info["leak"]["val"]["train_within_crop"] > 0.3


def test_make_split_per_slide_column_and_holdout():
    meta, _, _ = synthetic(n=1200)
    s = make_split(meta, config=SplitConfig(guard_um=0))
    assert s.source == "stripes" and s.guard.size == 0
    assert s.train.size + s.val.size + s.test.size == 1200
    for slide in meta["slide_id"].unique():
        rows = np.flatnonzero(meta["slide_id"].to_numpy() == slide)
        for part in (s.val, s.test):
            assert 0.19 <= np.isin(rows, part).mean() <= 0.21, slide

    h = make_split(meta, holdout=["lung", "slide0"])
    held = ((meta["tissue"] == "lung") | (meta["slide_id"] == "slide0")).to_numpy()
    assert (np.sort(h.test) == np.flatnonzero(held)).all()  # held-out slides are the test part
    assert not np.isin(np.concatenate([h.train, h.val, h.guard]), h.test).any()
    assert h.info["settings"]["test_fraction"] == 0.0
    with pytest.raises(UserError, match="'lugn' match no slide_id or tissue"):
        make_split(meta, holdout=["lugn"])
    with pytest.raises(UserError, match="keeps every cell out of training"):
        make_split(meta, holdout=["slide0", "slide1", "slide2"])

    col = meta.with_columns(split=pl.Series(["train", "val", "test", "train"] * 300))
    c = make_split(col)
    assert c.source == "column" and (c.val == np.arange(1, 1200, 4)).all()
    assert (c.labels(1200)[:4] == ["train", "val", "test", "train"]).all()
    with pytest.raises(UserError, match="'valid'"):
        make_split(meta.with_columns(split=pl.Series(["train", "valid"] * 600)))
    with pytest.raises(UserError, match="empty for 1 of 1200"):
        make_split(meta.with_columns(split=pl.Series(["train"] * 1199 + [None])))
    with pytest.raises(UserError, match="x_um/y_um"):
        make_split(meta.drop("x_um"))


# ------------------------------------------------------------------------- training


def test_stage_all_gate_beats_or_matches_each_path(trained):
    data, run_dir, out, logs = trained
    split = out["split"]
    pred = predict_all(data, run_dir)
    f1 = {p: _val_f1(data, split, pred[f"pred_{p}"]) for p in ("local", "global", "gate")}
    assert f1["gate"] >= f1["local"] - 0.01 and f1["gate"] >= f1["global"] - 0.01, f1
    assert f1["gate"] > 0.75 and f1["global"] > f1["local"] + 0.1, f1
    # the local path cannot tell the context-only classes 3-5 apart; the global path can
    per_local = _val_f1(data, split, pred["pred_local"], average=None)
    per_global = _val_f1(data, split, pred["pred_global"], average=None)
    assert per_local[:3].min() > 0.75 and per_local[3:].max() < 0.6, per_local
    assert per_global[3:].min() > 0.6, per_global
    # one log line per epoch with loss, val macro-F1 and cells/s
    epoch_lines = [line for line in logs if "] epoch " in line]
    assert epoch_lines and all("val macro-F1" in x and "cells/s" in x for x in epoch_lines)


def test_gate_learns_to_trust_the_global_path_where_local_fails(trained):
    data, _, out, _ = trained
    split = out["split"]
    local, context = out["local"][0], out["global"][0]
    # min_delta < 0 keeps the last epoch (early stopping may keep the half-epoch gate)
    cfg = replace(CFG, gate_epochs=3, min_delta=-1.0)
    before = {k: v.clone() for k, v in local.state_dict().items()}
    modes: list[bool] = []  # the local head's train/eval mode at each call (hooks are copied)
    hook = local.register_forward_hook(lambda m, i, o: modes.append(m.training))
    try:
        model, hist = train_gate(data, split, local, context, cfg, log=lambda _: None)
    finally:
        hook.remove()
    # heads in train mode exactly for the joint steps: 3 epochs minus the gate-alone half epoch
    n_train = int((data.label.numpy()[split.train] >= 0).sum())
    steps = -(-n_train // cfg.batch_size)
    assert sum(modes) == 3 * steps - -(-steps // 2)
    assert [r["epoch"] for r in hist] == [pytest.approx(-(-steps // 2) / steps), 1, 2, 3]
    assert [r["heads_trainable"] for r in hist] == [False, True, True, True]
    g = predict_all(data, model)["gate"]
    lab = data.label.numpy()
    g_ctx, g_loc = g[lab >= 3].mean(), g[(lab >= 0) & (lab < 3)].mean()
    assert g_ctx > g_loc + 0.2, (g_ctx, g_loc)
    # the heads passed in were fine-tuned as copies, not in place
    after = local.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(model.local.state_dict()["fc2.weight"], before["fc2.weight"])


def test_stage3_frozen_heads_train_only_the_gate(trained):
    """`stage3_heads="frozen"` (the authors' code): the heads never train, only the gate."""
    data, _, out, _ = trained
    local, context = out["local"][0], out["global"][0]
    cfg = replace(CFG, gate_epochs=2, stage3_heads="frozen")
    model, hist = train_gate(data, out["split"], local, context, cfg, log=lambda _: None)
    assert [r["heads_trainable"] for r in hist] == [False, False]
    for mine, theirs in ((model.local, local), (model.context, context)):
        for (k, a), b in zip(mine.state_dict().items(), theirs.state_dict().values(), strict=True):
            assert torch.equal(a, b), k
    with pytest.raises(UserError, match="stage3_heads"):
        replace(CFG, stage3_heads="both")


def test_predict_outputs_and_checkpoint_round_trip(trained):
    data, run_dir, out, _ = trained
    for stage in ("local", "global", "gate"):
        assert (run_dir / f"{stage}.safetensors").exists() and (run_dir / f"{stage}.json").exists()
    info = json.loads((run_dir / "gate.json").read_text())
    assert info["classes"] == data.classes and info["tissues"] == data.tissues
    assert info["dims"] == {"local": 32, "context": 24} and info["stage"] == "gate"
    assert info["settings"]["batch_size"] == 128 and info["history"]
    assert info["provenance"]["local"]["weights_sha256"] == "aa11"

    fresh = predict_all(data, Heads(out["local"][0], out["global"][0], out["gate"][0]))
    loaded = predict_all(data, run_dir)
    assert set(loaded) == set(fresh)
    for key in ("p_local", "p_global", "p_gate", "gate", "p_local_gate", "p_global_gate"):
        np.testing.assert_allclose(loaded[key], fresh[key], rtol=1e-5, atol=1e-6)
    n = len(data)
    assert loaded["p_gate"].shape == (n, 6) and loaded["gate"].shape == (n,)
    np.testing.assert_allclose(loaded["p_gate"].sum(1), 1.0, atol=1e-5)
    assert (loaded["pred_gate"] == loaded["p_gate"].argmax(1)).all()
    g = loaded["gate"][:, None]
    np.testing.assert_allclose(
        loaded["p_gate"], (1 - g) * loaded["p_local_gate"] + g * loaded["p_global_gate"],
        atol=1e-6,
    )
    # the gate stage fine-tunes copies: the stage-1 head's predictions are reported as such
    assert not np.allclose(loaded["p_local"], loaded["p_local_gate"])
    bare = predict_all(data, out["gate"][0])  # a bare NuClass: its own heads are the paths
    np.testing.assert_allclose(bare["p_local"], loaded["p_local_gate"], atol=1e-6)
    # the stage-1 checkpoint alone predicts the local path
    local, _ = ckpt.load_local(run_dir, data)
    only_local = predict_all(data, local)
    assert set(only_local) == {"p_local", "pred_local", "conf_local"}
    np.testing.assert_allclose(only_local["p_local"],
                               predict_all(data, out["local"][0])["p_local"], atol=1e-6)


def test_prediction_refuses_mismatched_vectors(trained):
    data, run_dir, _, _ = trained
    meta, local, context = data.meta, data.local.numpy(), data.context.numpy()
    other = json.loads(json.dumps(PROV))
    other["local"]["weights_sha256"] = "ffff"
    mismatch = CellData.from_arrays(meta, local, context, provenance=other)
    with pytest.raises(UserError, match="provenance does not match.*weights_sha256"):
        predict_all(mismatch, run_dir)
    # a change outside the vectors' identity (a timestamp) is fine
    later = dict(PROV, created="2026-01-01")
    predict_all(CellData.from_arrays(meta, local, context, provenance=later), run_dir)
    wide = CellData.from_arrays(meta, np.zeros((len(meta), 40), np.float32), context,
                                provenance=PROV)
    with pytest.raises(UserError, match="vector dims do not match.*local: checkpoint 32"):
        predict_all(wide, run_dir)
    # a cohort with only some tissues/classes must be encoded with the checkpoint's vocabulary
    sub = meta.filter(pl.col("tissue") != "lung")
    keep = (meta["tissue"] != "lung").to_numpy()
    cohort = CellData.from_arrays(sub, local[keep], context[keep], provenance=PROV)
    with pytest.raises(UserError, match="other classes/tissues"):
        predict_all(cohort, run_dir)
    with pytest.raises(UserError, match="knows 3 tissues.*CellData.remap"):
        predict_all(cohort, ckpt.load_gate(run_dir)[0])
    info = ckpt.read_info(run_dir, "gate")
    ok = cohort.remap(info["classes"], info["tissues"])
    assert predict_all(ok, run_dir)["p_gate"].shape == (keep.sum(), 6)


def test_provenance_identity_keeps_what_defines_the_vectors():
    config = {  # shaped like the store's vector config
        "vectors": {
            "local": {"backbone": "uni2-h", "dim": 1536, "pooling": "cls", "input_px": 224,
                      "weights_sha256": "ab12", "weights_source": "/models/uni2.bin",
                      "field_um": 56.0, "timm_version": "1.0.20",
                      "timm_kwargs": {"embed_dim": 1536}},
        },
        "dtype": "float16",
        "context_mode": "exact",
    }
    ident = dict(ckpt.provenance_identity(config))
    assert set(ident) == {
        "vectors.local.backbone", "vectors.local.dim", "vectors.local.pooling",
        "vectors.local.input_px", "vectors.local.weights_sha256", "vectors.local.field_um",
        "vectors.local.timm_kwargs.embed_dim",
    }
    moved = json.loads(json.dumps(config))
    moved["vectors"]["local"]["weights_source"] = "/elsewhere/uni2.bin"
    moved["context_mode"] = "tiled"
    ckpt.check_provenance(config, moved, "run")  # same weights elsewhere: accepted
    moved["vectors"]["local"]["field_um"] = 112.0
    with pytest.raises(UserError, match="field_um=56.0"):
        ckpt.check_provenance(config, moved, "run")


def test_stages_one_by_one_read_previous_checkpoints(tmp_path):
    meta, local, context = synthetic(n=600, seed=1)
    data = CellData.from_arrays(meta, local, context, provenance=PROV)
    cfg = replace(CFG, epochs=1, global_epochs=1, gate_epochs=1)
    with pytest.raises(UserError, match="no `local` checkpoint"):
        train_stage("global", data, tmp_path, cfg, log=lambda _: None)
    train_stage("local", data, tmp_path, cfg, log=lambda _: None)
    # a later stage on a subset missing a tissue: re-encoded with the checkpoint's vocabulary
    keep = (meta["tissue"] != "lung").to_numpy()
    part = CellData.from_arrays(meta.filter(pl.Series(keep)), local[keep], context[keep],
                                provenance=PROV)
    out = train_stage("global", part, tmp_path, cfg, log=lambda _: None)
    assert out["global"][0].n_classes == 6
    train_stage("gate", data, tmp_path, cfg, log=lambda _: None)
    assert ckpt.read_info(tmp_path, "gate")["tissues"] == ["colon", "lung", "pancreas"]
    with pytest.raises(UserError, match="unknown stage"):
        train_stage("fusion", data, tmp_path, cfg)


def test_training_is_reproducible_and_concat_trains():
    meta, local, context = synthetic(n=500, seed=2)
    data = CellData.from_arrays(meta, local, context)
    split = make_split(meta)
    cfg = replace(CFG, epochs=2)
    a, _ = train_local(data, split, cfg, log=lambda _: None)
    b, hist = train_local(data, split, cfg, log=lambda _: None)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert len(hist) == 2 and {"loss", "val_macro_f1", "cells_per_s"} <= set(hist[0])
    c, _ = train_local(data, split, replace(cfg, film=False), log=lambda _: None)
    assert not c.film and c.feature_dim == 32 + 32


def test_training_refuses_bad_labels_and_empty_validation(tmp_path):
    meta, local, context = synthetic(n=200)
    one = CellData.from_arrays(meta.with_columns(label=pl.lit("Fibroblast")), local, context)
    with pytest.raises(UserError, match="only one class"):
        train_stage("all", one, tmp_path, CFG)
    none = CellData.from_arrays(meta.drop("label"), local, context)
    with pytest.raises(UserError, match="no `label` column"):
        train_stage("local", none, tmp_path, CFG)
    data = CellData.from_arrays(meta.with_columns(split=pl.lit("train")), local, context)
    with pytest.raises(UserError, match="no labelled cells in the validation split"):
        train_stage("local", data, tmp_path, CFG)


def test_retraining_a_stage_moves_the_stages_built_on_it_aside(tmp_path):
    """Retraining `local` must not leave a global/gate trained on the old local head in the
    run (they would be silently mixed with the new one); they are moved, never deleted."""
    from heads import checkpoint as ckpt
    from heads.runs import retire_later_stages

    run = tmp_path / "run"
    run.mkdir()
    for stage in ckpt.STAGES:
        for path in ckpt.stage_paths(run, stage):
            path.write_text(stage)
    (run / "metrics.json").write_text("{}")
    assert retire_later_stages(run, "gate", log=print) is not None  # its own metrics are stale
    assert not (run / "metrics.json").exists() and ckpt.has_stage(run, "gate")
    dest = retire_later_stages(run, "local", log=print)
    assert ckpt.has_stage(run, "local") and not ckpt.has_stage(run, "global") and not ckpt.has_stage(run, "gate")
    moved = sorted(p.name for p in dest.iterdir())
    assert moved == ["gate.json", "gate.safetensors", "global.json", "global.safetensors"]
    assert (dest / "gate.json").read_text() == "gate"
    assert retire_later_stages(run, "global", log=print) is None  # nothing after global is left


def test_imbalanced_training_does_not_call_every_cell_the_rare_class():
    """97:3 classes, separable in the local vector, class-balanced weights (~31:1) and the
    default label smoothing 0.1: the rare class stays rare in the predictions (torch's weighted
    smoothed CE made it the loss-optimal answer for every cell: 100% predicted rare)."""
    rng = np.random.default_rng(0)
    n = 1000
    rare = np.arange(n) % 100 < 3
    local = rng.normal(0, 1, (n, 8)).astype(np.float32)
    local[:, 0] += np.where(rare, 4.0, -4.0)
    meta = pl.DataFrame({
        "slide_id": "s", "cell_id": np.arange(n), "tissue": "colon",
        "label": np.where(rare, "rare", "common"),
        "split": np.where(np.arange(n) % 5 == 0, "val", "train"),
    })  # fmt: skip
    data = CellData.from_arrays(meta, local, local[:, :4].copy())
    cfg = TrainConfig(epochs=3, batch_size=64, hidden=32, lr=3e-3, warmup_steps=1)
    head, _ = train_local(data, make_split(meta), cfg, log=lambda _: None)
    pred = predict_all(data, head)["pred_local"]
    assert (pred == data.classes.index("rare")).mean() < 0.1
    assert (pred == data.label.numpy()).mean() > 0.9


# ------------------------------------------------------------------------- runs (heads train)

QUICK = replace(CFG, epochs=1, global_epochs=1, gate_epochs=1)


@pytest.fixture
def store_of(monkeypatch):
    """`runs.train` on in-memory cells: its store read (load_cell_data) returns them."""
    from heads import runs

    def serve(meta, local, context):
        keep = meta["label"].is_not_null().to_numpy()
        data = CellData.from_arrays(meta.filter(pl.Series(keep)), local[keep], context[keep], provenance=PROV)
        monkeypatch.setattr(runs, "load_cell_data", lambda db, **_: data)
        return data

    return serve


def test_a_run_stopped_between_stages_keeps_its_local_head_with_its_split(store_of, tmp_path, monkeypatch):
    """`heads train --stage all` killed after stage 1: the new local head must sit beside the
    split it was trained on (not the old run's, whose training cells would be scored as test),
    and nothing made from the old models may stay in the run folder."""
    from heads import runs
    from heads import train as train_mod

    data = store_of(*synthetic(n=600, seed=3))
    run = tmp_path / "run"
    runs.train("db", run, "all", QUICK, scale=False, log=lambda _: None)
    made = ["metrics.json", "confusion_gate.png", "confusion_local.csv", "reliability.png",
            "complementarity.csv", "complementarity.png", "report.html"]  # fmt: skip
    for name in made:
        (run / name).write_text("old")
    (run / "cohort-b").mkdir()
    (run / "cohort-b" / "metrics.json").write_text("old")
    (run / "predictions").mkdir()

    def killed(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train_global", killed)
    with pytest.raises(KeyboardInterrupt):
        runs.train("db", run, "all", QUICK, scale=False, split_config=SplitConfig(val_fraction=0.3),
                   log=lambda _: None)  # fmt: skip
    split = runs.load_split(run, data)  # what `heads eval` reads: it must be the new local's
    assert split.info["settings"]["val_fraction"] == 0.3
    new = make_split(data.meta, config=SplitConfig(val_fraction=0.3))
    assert np.array_equal(split.train, new.train) and np.array_equal(split.test, new.test)
    assert ckpt.read_info(run, "local")["split"]["digest"] == split.info["digest"] == new.info["digest"]
    left = sorted(p.name for p in run.iterdir() if not p.name.startswith("."))
    assert left == ["local.json", "local.safetensors", "split.json", "split.parquet", "stale"]
    assert (run / ".training").exists()  # readers say the train was stopped: rerun it
    stale = {p.name for d in (run / "stale").iterdir() for p in d.iterdir()}
    assert {"global.json", "gate.safetensors", "safety.json", "conformal.parquet", "conformal.json",
            "cohort-b", "predictions", *made} <= stale  # fmt: skip


def test_eval_refuses_a_split_the_stages_were_not_trained_on(store_of, tmp_path):
    from heads import runs

    data = store_of(*synthetic(n=600, seed=4))
    run = tmp_path / "run"
    runs.train("db", run, "local", QUICK, scale=False, log=lambda _: None)
    assert np.array_equal(runs.load_split(run, data).train, make_split(data.meta).train)
    # the split of another run, e.g. a retraining stopped between the split and the checkpoint
    runs.save_split(run, data, make_split(data.meta, config=SplitConfig(val_fraction=0.3)))
    with pytest.raises(UserError, match="stages were trained on different splits: local .* --stage all"):
        runs.load_split(run, data)
    with pytest.raises(UserError, match="different splits"):
        runs.train("db", run, "global", QUICK, scale=False, log=lambda _: None)


def test_later_stages_refuse_split_options_of_their_own(store_of, tmp_path):
    from heads import runs

    store_of(*synthetic(n=600, seed=5))
    run = tmp_path / "run"
    runs.train("db", run, "local", QUICK, scale=False, holdout=("slide2",),
               split_config=SplitConfig(val_fraction=0.3, guard_um=40), log=lambda _: None)  # fmt: skip
    for kwargs, said in [
        ({"holdout": ("slide1",)}, "--holdout"),
        ({"split_config": SplitConfig(val_fraction=0.25)}, "--val-fraction 0.25"),
        ({"split_config": SplitConfig(guard_um=60)}, "--guard-um 60"),
    ]:
        with pytest.raises(UserError, match=f"{said}.* cannot apply to --stage global: the split comes from the local stage"):
            runs.train("db", run, "global", QUICK, scale=False, log=lambda _: None, **kwargs)
    assert not ckpt.has_stage(run, "global")
    # the saved settings, or none (options at their defaults), are accepted
    runs.train("db", run, "global", QUICK, scale=False, holdout=("slide2",),
               split_config=SplitConfig(val_fraction=0.3, guard_um=40), log=lambda _: None)  # fmt: skip
    runs.train("db", run, "gate", QUICK, scale=False, split_config=SplitConfig(), log=lambda _: None)
    assert ckpt.has_stage(run, "gate")


def test_held_out_tissue_and_classes_are_warned_about_and_the_tissue_refused(store_of, tmp_path):
    """--holdout pancreas alone: every test cell would be of a tissue without training cells, so
    the run could never be evaluated: refused before training. With slide0 held out too, the
    tissue has no training cells (its FiLM embedding is its random initialisation), nor has a
    class found only there; a class with 3 training cells is warned about too. Predicting
    pancreas cells is refused as for an unknown tissue, and eval leaves them out, saying so."""
    from heads import runs

    meta, local, context = synthetic(n=900, seed=6)
    pancreas = (meta["tissue"] == "pancreas").to_numpy()
    label = np.asarray(meta["label"].to_list(), dtype=object)
    label[np.flatnonzero(pancreas)[:20]] = "only_pancreas"
    label[np.flatnonzero(~pancreas)[:3]] = "three"
    data = store_of(meta.with_columns(label=pl.Series(label.tolist())), local, context)
    with pytest.raises(UserError, match="--holdout pancreas holds out every cell of tissue"):
        runs.train("db", tmp_path, "local", QUICK, scale=False, holdout=("pancreas",),
                   split_config=SplitConfig(guard_um=0), log=lambda _: None)  # fmt: skip
    assert not ckpt.has_stage(tmp_path, "local")
    logs: list[str] = []
    runs.train("db", tmp_path, "local", QUICK, scale=False, holdout=("pancreas", "slide0"),
               split_config=SplitConfig(guard_um=0), log=logs.append)  # fmt: skip
    warnings = [line for line in logs if line.startswith("warning:")]
    assert "warning: class 'only_pancreas' has no training cells: the heads cannot learn it" in warnings
    assert any(w.startswith("warning: class 'three' has only ") for w in warnings)
    assert any(w.startswith("warning: tissue 'pancreas' has no training cells") for w in warnings)
    info = ckpt.read_info(tmp_path, "local")
    assert info["tissues"] == ["colon", "lung", "pancreas"]
    assert info["split"]["trained_tissues"] == ["colon", "lung"]
    with pytest.raises(UserError, match="'pancreas' had no training cells in this run"):
        predict_all(data, tmp_path)
    rest = predict_all(data.subset(~data.meta["tissue"].eq("pancreas").to_numpy()), tmp_path)
    assert rest["p_local"].shape[0] == int((~pancreas[meta["label"].is_not_null().to_numpy()]).sum())
    # eval: the held-out pancreas cells are of a tissue never learnt: left out, said so
    test_tissues = np.asarray(data.tissues)[data.tissue.numpy()][runs.load_split(tmp_path, data).test]
    n_pancreas = int((test_tissues == "pancreas").sum())
    logs.clear()
    result = runs.evaluate_run(tmp_path, "db", baselines=(), temperature=False, log=logs.append)
    assert any(f"{n_pancreas} scored cells are of tissues the run had no training cells for (pancreas: {n_pancreas})"
               in line for line in logs), logs  # fmt: skip
    assert result["rows"][0]["n"] == int((test_tissues != "pancreas").sum())


def test_a_long_stage_logs_about_twenty_epoch_lines(store_of, tmp_path):
    """Small sets train for hundreds of epochs: one line each flooded stderr (253 lines for 72
    cells). Every new best is still said, plus about 20 others; the history keeps every epoch."""
    from heads import runs

    store_of(*synthetic(n=300, seed=9))
    logs: list[str] = []
    cfg = replace(QUICK, epochs=120, patience=1000, batch_size=256)
    runs.train("db", tmp_path, "local", cfg, scale=False, split_config=SplitConfig(guard_um=0), log=logs.append)
    lines = [ln for ln in logs if ln.startswith("[local] epoch ")]
    best = [ln for ln in lines if " * " in ln]
    assert lines[0].startswith("[local] epoch 1/120") and lines[-1].startswith("[local] epoch 120/120")
    assert len(lines) <= 20 + len(best) + 2, len(lines)
    assert len(ckpt.read_info(tmp_path, "local")["history"]) == 120
