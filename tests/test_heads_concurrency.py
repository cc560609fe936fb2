"""Two `heads` commands on one run folder or one predictions folder at once, and a train killed
while it saves: one train at a time per run (readers refused while it writes), predicts into one
folder one after the other, and a half-saved run refused until it is trained again."""

import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from safetensors.torch import load_file, save_file

from embedstore.locking import file_lock
from heads import checkpoint as ckpt
from heads import runlock
from tests.clirun import run_cli
from tests.test_heads_inputs import copied, one_error_line, quiet, trained_run

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ARGS = ("--epochs", "1", "--global-epochs", "1", "--gate-epochs", "1", "--batch-size", "64",
              "--guard-um", "10", "--no-scale")  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory, one_torch_thread):
    """A run trained on 3 slides of 120 cells and predicted (`trained_run`)."""
    return trained_run(tmp_path_factory.mktemp("concurrency"), 120, seed=1, evaluate=False)


@pytest.fixture
def setup(base, tmp_path):
    return copied(base, tmp_path)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def heads_cli(*args, env=None, **popen):
    """`python -m cli.heads ARGS` in a process of its own (started, not waited for)."""
    return subprocess.Popen([sys.executable, "-m", "cli.heads", *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
                            **popen)  # fmt: skip


def test_a_second_train_into_a_run_in_use_is_refused_and_changes_nothing(setup):
    db, run = setup
    before = snapshot(run)
    with file_lock(run / runlock.LOCK):  # as a `heads train` running into it holds it
        result = run_cli("cli.heads", "train", "--db", db, "--out", run, *TRAIN_ARGS)
    one_error_line(result, "in use", "another `heads train` is training into it")
    with file_lock(run / runlock.LOCK, shared=True):  # as an eval or predict reading it holds it
        result = run_cli("cli.heads", "train", "--db", db, "--out", run, *TRAIN_ARGS)
    one_error_line(result, "in use", "`predict`", "reading it")
    assert snapshot(run) == before


@pytest.mark.parametrize("command", ["eval", "predict", "report"])
def test_readers_are_refused_while_a_train_writes_the_run(setup, command):
    db, run = setup
    with file_lock(run / runlock.LOCK):
        result = run_cli("cli.heads", command, "--run", run, "--db", db, *(("--baselines", "none") if command == "eval" else ()))
    one_error_line(result, "`heads train` is training into", "wait for it to finish")
    with file_lock(run / runlock.LOCK, shared=True):  # other readers do not stop them
        result = run_cli("cli.heads", command, "--run", run, "--db", db, *(("--baselines", "none") if command == "eval" else ()))
    assert result.returncode == 0, result.stderr


def test_explain_is_refused_while_a_train_writes_the_run(setup, tmp_path):
    db, run = setup
    with file_lock(run / runlock.LOCK), pytest.raises(Exception, match="is training into"):
        from heads.explain import explain

        explain(run, db, ["s0:c0000"], tmp_path / "cams", log=quiet)


def test_a_train_killed_while_saving_is_named_then_finished_by_a_rerun(setup):
    """Killed between the global head's weights and its JSON (`heads.save`, 2nd save): the run
    mixes the new weights with the old JSON and has no post-hoc rules for the new heads."""
    db, run = setup
    train = ("train", "--db", db, "--out", run, *TRAIN_ARGS, "--seed", "3")
    proc = heads_cli(*train, env={"NUCLASS_KILL_AT": "heads.save:2"})
    proc.communicate(timeout=300)
    assert proc.returncode == -9, "the fault point did not fire"
    for command in (("eval", "--baselines", "none"), ("predict",)):
        result = run_cli("cli.heads", command[0], "--run", run, "--db", db, *command[1:])
        one_error_line(result, "training of stage `all`", "stopped before it finished", "heads train --stage all")
    result = run_cli("cli.heads", "train", "--db", db, "--out", run, "--stage", "gate", *TRAIN_ARGS)
    one_error_line(result, "global.json is missing", "train stage `global` first")  # the old one was retired
    assert (run / runlock.MARKER).exists()
    result = run_cli("cli.heads", *train)
    assert result.returncode == 0, result.stderr
    assert not (run / runlock.MARKER).exists()
    result = run_cli("cli.heads", "eval", "--run", run, "--db", db, "--baselines", "none")
    assert result.returncode == 0, result.stderr
    assert (run / "conformal.json").exists() and (run / "safety.json").exists()


def test_weights_that_are_not_the_ones_the_json_was_saved_with_are_refused(setup):
    db, run = setup
    weights = run / "global.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in tensors.items()}, str(weights))
    with pytest.raises(Exception, match="is not the file global.json was saved with"):
        ckpt.load_stage(run, "global")
    before = snapshot(run)
    result = run_cli("cli.heads", "predict", "--run", run, "--db", db)
    one_error_line(result, "global.safetensors", "mixes two trainings", "--stage global")
    assert snapshot(run) == before


def test_two_predicts_of_other_slides_into_one_folder_keep_both(setup, tmp_path):
    """The first is held after reading predictions.parquet, before writing it; the second must
    wait for it (and say so) rather than write a file the first then replaces."""
    db, run = setup
    out, go = tmp_path / "preds", tmp_path / "go"
    first = heads_cli("predict", "--run", run, "--db", db, "--out", out, "--slide", "s0",
                      env={"NUCLASS_PAUSE_AT": "predict.write", "NUCLASS_PAUSE_FILE": str(go)})  # fmt: skip
    deadline = time.monotonic() + 120
    while not Path(f"{go}.reached").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    second = heads_cli("predict", "--run", run, "--db", db, "--out", out, "--slide", "s1")
    waited = ""
    while "waiting for another `heads predict`" not in waited:
        line = second.stderr.readline()
        assert line or second.poll() is None, f"the second predict ended without waiting: {waited}"
        waited += line
    go.touch()
    for proc in (first, second):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    written = pl.read_parquet(out / "predictions.parquet")
    assert written.group_by("slide_id").len().sort("slide_id").rows() == [("s0", 120), ("s1", 120)]
    assert len(list((out / "geojson").iterdir())) == 2  # one per slide
