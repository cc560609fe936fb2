"""`heads train` split options given explicitly to a later stage (even at their default value),
and `heads explain` refusing cells of tissues the run's local head never learnt.

Runs are trained on a small store written directly (no slides, no extraction): a few seconds."""

import re

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from cli.heads import app
from embedstore.errors import UserError
from embedstore.store import Store, vectors_to_arrow
from heads import checkpoint as ckpt
from heads import explain as ex
from heads import runs
from heads.splits import SPLIT_OPTIONS, Split, SplitConfig, check_same_settings
from heads.train import TrainConfig

QUICK = TrainConfig(epochs=1, global_epochs=1, gate_epochs=1, batch_size=64)
QUICK_CLI = ["--epochs", "1", "--global-epochs", "1", "--gate-epochs", "1", "--batch-size", "64", "--no-scale",
             "--threads", "1"]  # fmt: skip
#: slide -> tissue: s2's tissue is held out at training, with s4 (colon: the test cells of a trained
#: tissue, without which the run could not be evaluated); s3's cells are unlabelled (a tissue the
#: run never saw, outside its vocabulary)
SLIDES = {"s0": "colon", "s1": "lung", "s2": "pancreas", "s3": "kidney", "s4": "colon"}


def quiet(_msg):
    pass


@pytest.fixture(scope="module")
def db(tmp_path_factory, one_torch_thread):
    """5 slides of 160 cells each on a 400 x 400 µm square, 3 classes, 16 + 8-d vectors."""
    rng = np.random.default_rng(0)
    n_per, n_classes = 160, 3
    n = n_per * len(SLIDES)
    slides = np.repeat(list(SLIDES), n_per)
    y = rng.integers(0, n_classes, n)
    local = (rng.normal(size=(n_classes, 16)) * 2)[y] + rng.normal(size=(n, 16))
    context = rng.normal(size=(n, 8))
    ids = np.array([f"c{i:04d}" for i in range(n)])
    x_um, y_um = rng.uniform(0, 400, n), rng.uniform(0, 400, n)
    path = tmp_path_factory.mktemp("options") / "db"
    store = Store(path, create=True)
    store.cells_table("cells", {"local": 16, "context": 8}, {"test": 1})
    store.append("cells", pa.table({
        "slide_id": slides, "cell_id": ids, "x_px": x_um * 4, "y_px": y_um * 4, "x_um": x_um, "y_um": y_um,
        "tissue": [SLIDES[s] for s in slides], "run_id": ["t"] * n,
        "local_outside": np.zeros(n, np.float32), "local": vectors_to_arrow(local.astype(np.float32)),
        "context_outside": np.zeros(n, np.float32), "context": vectors_to_arrow(context.astype(np.float32)),
    }))  # fmt: skip
    labelled = slides != "s3"
    store.set_labels(pl.DataFrame({"slide_id": slides[labelled], "cell_id": ids[labelled],
                                   "label": [f"k{v}" for v in y[labelled]]}), source="t")  # fmt: skip
    return path


@pytest.fixture(scope="module")
def local_run(db, tmp_path_factory):
    """The local stage, with pancreas and s4 held out and a split unlike the defaults (val 0.3, band 10 µm)."""
    run = tmp_path_factory.mktemp("run") / "r"
    runs.train(db, run, "local", QUICK, scale=False, holdout=("pancreas", "s4"),
               split_config=SplitConfig(val_fraction=0.3, guard_um=10), log=quiet)  # fmt: skip
    info = ckpt.read_info(run, "local")
    assert info["tissues"] == ["colon", "lung", "pancreas"]
    assert info["split"]["trained_tissues"] == ["colon", "lung"]
    return run


def cli(*args):
    """`heads ...` in-process; a UserError is left in `result.exception` (no `cli.common.run`)."""
    return CliRunner().invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------------------------------------
# Task: split options given explicitly, even at their default


def saved(**settings):
    base = {"val_fraction": 0.3, "test_fraction": 0.2, "guard_um": 10.0, "min_cells": 50, "seed": 0, "holdout": []}
    e = np.zeros(0, np.int64)
    return Split(e, e, e, info={"settings": {**base, **settings}})


def test_an_option_given_at_its_default_is_compared_with_the_saved_split():
    split = saved()
    # the bug: --val-fraction 0.2 is the default, so it passed as "not given" on a 0.3 split
    with pytest.raises(UserError, match=r"--val-fraction 0.2 cannot apply to --stage global: .* val_fraction 0.3"):
        check_same_settings(split, (), SplitConfig(), "global", given=("val_fraction",))
    with pytest.raises(UserError, match=r"--guard-um 128 cannot apply to --stage gate"):
        check_same_settings(split, (), SplitConfig(), "gate", given=("guard_um", "seed"))
    # given and equal to the saved split's, or not given at all: the saved split, silently
    assert check_same_settings(split, (), SplitConfig(val_fraction=0.3, guard_um=10), "global",
                               given=("val_fraction", "guard_um", "test_fraction")) == []  # fmt: skip
    assert check_same_settings(split, (), SplitConfig(), "global", given=()) == []
    assert check_same_settings(split, (), None, "global") == []
    # Python callers without `given`: options at their default still count as not given
    assert check_same_settings(split, (), SplitConfig(), "gate") == []
    with pytest.raises(UserError, match="--val-fraction 0.25"):
        check_same_settings(split, (), SplitConfig(val_fraction=0.25), "gate")
    with pytest.raises(ValueError, match="val-fraction"):
        check_same_settings(split, (), SplitConfig(), "gate", given=("val-fraction",))


def test_the_seed_is_never_refused_and_test_fraction_not_compared_with_a_holdout():
    split = saved()
    notes = check_same_settings(split, (), SplitConfig(val_fraction=0.3, seed=5), "global", given=("val_fraction", "seed"))
    assert notes == ["note: --seed 5 seeds the training of stage global only; its split is the local stage's, "
                     "made with seed 0"]  # fmt: skip
    assert check_same_settings(split, (), SplitConfig(seed=0), "global", given=("seed",)) == []
    assert check_same_settings(split, (), SplitConfig(seed=5), "global", given=()) == []  # not typed: no note
    # with a holdout the held-out slides are the test part: test_fraction (saved as 0) made no difference
    held = saved(holdout=["pancreas"], test_fraction=0.0)
    assert check_same_settings(held, (), SplitConfig(test_fraction=0.2), "global", given=("test_fraction",)) == []
    with pytest.raises(UserError, match="--test-fraction 0.2 cannot apply"):
        check_same_settings(saved(test_fraction=0.1), (), SplitConfig(test_fraction=0.2), "global", given=("test_fraction",))


def test_cli_defaults_are_the_split_defaults_and_help_shows_them():
    import typer.main

    params = {p.name: p for p in typer.main.get_command(app).commands["train"].params}
    defaults = SplitConfig()
    for name in SPLIT_OPTIONS:
        assert params[name].default == getattr(defaults, name), name
        assert not params[name].required
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "250"})  # one line per option
    assert result.exit_code == 0
    for option, value in (("--val-fraction", "0.2"), ("--test-fraction", "0.2"), ("--guard-um", "128.0"), ("--seed", "0")):
        line = next(ln for ln in result.output.splitlines() if re.match(rf"\W*\s{option}\s", ln))
        assert f"[default: {value}]" in line, line


def test_cli_later_stage_refuses_a_typed_default_that_differs_from_the_saved_split(db, local_run, tmp_path):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(local_run, run)
    base = ["train", "--db", db, "--out", run, *QUICK_CLI]
    result = cli(*base, "--stage", "global", "--val-fraction", "0.2")  # the split has 0.3
    assert isinstance(result.exception, UserError), result.output
    assert "--val-fraction 0.2 cannot apply to --stage global" in str(result.exception)
    assert "val_fraction 0.3" in str(result.exception) and not ckpt.has_stage(run, "global")
    result = cli(*base, "--stage", "global", "--guard-um", "128")
    assert isinstance(result.exception, UserError) and "--guard-um 128 cannot apply" in str(result.exception)
    # typed and equal (the holdout, a test fraction it made no use of), and another training seed: trained
    result = cli(*base, "--stage", "global", "--val-fraction", "0.3", "--guard-um", "10", "--holdout", "pancreas",
                 "--holdout", "s4", "--test-fraction", "0.2", "--seed", "3")  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    assert "note: --seed 3 seeds the training of stage global only" in " ".join(result.output.split())
    assert ckpt.has_stage(run, "global")
    # nothing typed: the saved split, silently
    result = cli(*base, "--stage", "gate")
    assert result.exit_code == 0, (result.output, result.exception)
    assert ckpt.has_stage(run, "gate") and "note:" not in result.output


# ---------------------------------------------------------------------------------------------
# Task: `heads explain` and tissues without training cells


def cell_of(db, slide):
    return f"{slide}:{Store(db).keys_frame('cells', [slide])['cell_id'][0]}"


def test_explain_refuses_a_tissue_held_out_of_training(db, local_run):
    held = cell_of(db, "s2")  # pancreas: in the run's tissue vocabulary, never trained
    with pytest.raises(UserError, match=rf"cell\(s\) {held} \(pancreas\) have a tissue this run had no training "
                                        r"cells for .*trained tissues: colon, lung\).*cells of 'pancreas'"):  # fmt: skip
        ex.compute(local_run, db, [cell_of(db, "s0"), held], path="local", log=quiet)
    with pytest.raises(UserError, match=r"\(kidney\) have a tissue unknown to the run \(tissues: colon, lung, pancreas\)"):
        ex.compute(local_run, db, [cell_of(db, "s3")], path="local", log=quiet)
    # a trained tissue passes that check (and meets the next one: this store has no backbone)
    with pytest.raises(UserError, match="records no `local` vector config"):
        ex.compute(local_run, db, [cell_of(db, "s0"), cell_of(db, "s1")], path="local", log=quiet)
    # the same as `heads predict`, which refuses the cells of that slide
    with pytest.raises(UserError, match="have tissues this run was not trained on"):
        runs.unknown_tissues(db, "cells", ["s2"], runs.trained_tissues(ckpt.read_info(local_run, "local")))


def test_explain_cli_names_the_tissue(db, local_run, tmp_path):
    result = cli("explain", "--run", local_run, "--db", db, "--cell", cell_of(db, "s2"), "--out", tmp_path / "x",
                 "--path", "local")  # fmt: skip
    assert isinstance(result.exception, UserError)
    assert "(pancreas)" in str(result.exception) and "trained tissues: colon, lung" in str(result.exception)
    assert not (tmp_path / "x").exists()  # refused: no empty --out folder left behind
    (tmp_path / "y").mkdir()  # a folder the user made stays
    cli("explain", "--run", local_run, "--db", db, "--cell", cell_of(db, "s2"), "--out", tmp_path / "y", "--path", "local")
    assert (tmp_path / "y").is_dir()


# ---------------------------------------------------------------------------------------------
# Small-set scaling leaves the options a user typed as given


def test_scaling_keeps_what_was_given():
    said = []
    cfg = TrainConfig(epochs=2, global_epochs=3, gate_epochs=1, batch_size=1024, patience=2)
    free = runs.scale_for_size(cfg, 800, log=said.append)
    assert (free.batch_size, free.epochs, free.gate_epochs) == (50, 26, 25)  # 16 steps an epoch and "as given" not in said[-1]
    kept = runs.scale_for_size(cfg, 800, keep=("epochs", "batch_size"), log=said.append)
    assert (kept.batch_size, kept.epochs) == (1024, 2)  # as typed
    assert kept.gate_epochs == 400 and kept.stage2_epochs == 600  # scaled for the 1-step epochs of 1024 cells
    assert "as given: --epochs 2, --batch-size 1024" in said[-1]
    every = runs.scale_for_size(cfg, 800, keep=runs.SCALED_OPTIONS, log=said.append)
    assert every is cfg  # nothing left to scale: unchanged, nothing said
    assert runs.scale_for_size(cfg, 10**6, log=said.append) is cfg  # a large set: the defaults


def test_cli_typed_epochs_survive_scaling(db, tmp_path):
    result = cli("train", "--db", db, "--out", tmp_path / "r", "--stage", "local", "--epochs", "1", "--threads", "1")
    assert result.exit_code == 0, (result.output, result.exception)
    line = next(ln for ln in result.output.splitlines() if "small training set" in ln)
    assert re.search(r"epochs 1/\d+/\d+", line) and "as given: --epochs 1" in line, line
