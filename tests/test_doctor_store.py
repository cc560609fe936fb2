"""`embed doctor --db`: predicts whether `embed extract` would refuse the store's table, and never
writes to the store (`extracted_store` is shared: nothing here may change it)."""

import json
from pathlib import Path

import pytest

from embedstore.doctor import Check, blocking, check_store, run_checks
from embedstore.store import Store

from .clirun import run_cli
from .conftest import FAST


@pytest.fixture(scope="module")
def store(extracted_store):
    """(db, the stored vector config) of the shared store."""
    db, _ = extracted_store
    return db, Store(db).config("cells")


def options(stored: dict, **change) -> dict:
    """run_checks keywords that match the stored table (FAST, on the device it was made on)."""
    base = dict(local_backbone=FAST["local_backbone"], context_backbone=FAST["context_backbone"],
                context_px=FAST["context_input_px"], device=stored["vectors"]["local"]["compute"]["device_type"])  # fmt: skip
    return {**base, **change}


def store_checks(db, stored: dict, **change) -> list[Check]:
    checks = run_checks(db=db, timing=False, **options(stored, **change))
    return [c for c in checks if c.group == "store"]


def snapshot(db: Path) -> tuple:
    """Every file of the store (path, size, mtime) and every table's version."""
    files = sorted((str(p.relative_to(db)), p.stat().st_size, p.stat().st_mtime_ns) for p in db.rglob("*"))
    s = Store(db)
    return files, {name: s.db.open_table(name).version for name in s.table_names()}


def test_matching_options_are_ok_with_table_cells_and_backbones(store):
    db, stored = store
    checks = run_checks(db=db, timing=False, **options(stored))
    assert not blocking(checks), blocking(checks)
    (check,) = [c for c in checks if c.group == "store"]
    assert check.status == "ok" and check.name == "table cells"
    n = Store(db).open("cells").count_rows()
    for part in ("'cells'", f"{n} cells", "test-vit-local", "test-vit-context", "128 px", "sha256", "when `embed extract` starts"):
        assert part in check.detail, (part, check.detail)


@pytest.mark.parametrize(
    ("change", "said", "fix"),
    [
        ({"context_backbone": "test-vit-local"},
         "vectors.context.backbone: stored 'test-vit-context', now 'test-vit-local'", "--context-backbone test-vit-context"),
        ({"context_px": 256}, "vectors.context.input_px: stored 128, now 256", "--context-px 128"),
        ({"local_backbone": "test-vit-context"},
         "vectors.local.backbone: stored 'test-vit-local', now 'test-vit-context'", "--local-backbone test-vit-local"),
        ({"context": "tiled"}, "context_mode: stored 'exact', now 'tiled'", "--context exact"),
        ({"context_pooling": "mean"}, "vectors.context.pooling: stored 'cls', now 'mean'", "--context-pooling cls"),
    ],
    ids=["context_backbone", "context_px", "local_backbone", "context_mode", "context_pooling"],
)  # fmt: skip
def test_other_backbone_context_size_or_mode_fails_naming_stored_now_and_the_fix(store, change, said, fix):
    db, stored = store
    (check,) = store_checks(db, stored, **change)
    assert check.status == "fail" and check.name == "table cells"
    assert said in check.detail and "would refuse" in check.detail
    assert fix in check.fix and "--table cells_v2" in check.fix
    assert check.detail.count("stored") == 1  # nothing else differs


def test_precision_and_device_type_are_compared(store, monkeypatch):
    import embedstore.doctor as doctor

    db, stored = store
    made_on = stored["vectors"]["local"]["compute"]["device_type"]
    made_with = stored["vectors"]["local"]["compute"]["precision"]
    other = {"fp32": "bf16", "bf16": "fp32"}[made_with]
    (check,) = store_checks(db, stored, precision=other)
    assert check.status == "fail"
    for kind in ("local", "context"):
        assert f"vectors.{kind}.compute.precision: stored {made_with!r}, now {other!r}" in check.detail
    assert f"--precision {made_with}" in check.fix and "--device" not in check.fix

    # a machine of the other device type: the device and the precision extract picks there differ
    elsewhere = "cuda" if made_on == "cpu" else "cpu"
    monkeypatch.setattr(doctor, "check_gpu", lambda device: ([Check("machine", "gpu", "ok", "pretend")], elsewhere))
    (check,) = store_checks(db, stored, device="auto")
    assert check.status == "fail"
    assert f"vectors.local.compute.device_type: stored {made_on!r}, now {elsewhere!r}" in check.detail
    assert f"--device {made_on}" in check.fix


def test_doctor_agrees_with_what_extract_would_compute(store):
    """Doctor fails exactly where extract's own config (test backbones, tiny) differs from the
    stored one, and each item it names is among extract's differences."""
    import torch

    from embedstore.extract.pipeline import ExtractConfig, build_steps, vector_config
    from embedstore.store import config_diff

    db, stored = store
    dev = torch.device(stored["vectors"]["local"]["compute"]["device_type"])
    for change in ({}, {"context_input_px": 256}, {"precision": "bf16"}, {"precision": "fp32"},
                   {"context": "tiled"}, {"context_backbone": "test-vit-local", "context_input_px": 224},
                   {"context_pooling": "mean"}, {"context_pooling": "cls"}):  # fmt: skip
        cfg = ExtractConfig(**{**FAST, "device": dev.type, **change})
        wanted = vector_config(build_steps(cfg, dev))
        differs = {line.split(":")[0] for line in config_diff(stored, wanted)}
        (check,) = check_store(db, local_backbone=cfg.local_backbone, context_backbone=cfg.context_backbone,
                               context_px=cfg.context_input_px, device=dev.type, precision=cfg.precision,
                               context=cfg.context, context_pooling=cfg.context_pooling)  # fmt: skip
        assert (check.status == "fail") == bool(differs), (change, differs, check)
        named = {part.split(":")[0] for part in check.detail.split("add to it: ")[-1].split("; ")} if differs else set()
        assert named <= differs, (change, named, differs)


def test_missing_store_is_ok_and_not_created(tmp_path, store):
    _, stored = store
    db = tmp_path / "new" / "store"
    (check,) = store_checks(db, stored)
    assert check.status == "ok" and "will create a new store" in check.detail
    assert not db.exists() and not db.parent.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    (check,) = store_checks(empty, stored)
    assert check.status == "ok" and "empty directory" in check.detail
    assert not any(empty.iterdir())


def test_new_table_is_ok_and_a_table_without_vectors_fails(store):
    db, stored = store
    (check,) = store_checks(db, stored, table="cells_bf16", context_px=256)
    assert check.status == "ok" and "no table 'cells_bf16' yet" in check.detail and "cells" in check.detail
    (check,) = store_checks(db, stored, table="runs")
    assert check.status == "fail" and "holds no vectors" in check.detail and "pick another --table" in check.fix
    (check,) = [c for c in run_checks(db=db, timing=False, table="bad name!", **options(stored)) if c.group == "options"]
    assert check.status == "fail" and "--table" in check.detail


def test_a_directory_that_is_not_a_store_or_unreadable_fails_clearly(tmp_path, store):
    _, stored = store
    other = tmp_path / "slides"
    other.mkdir()
    (other / "a.svs").write_bytes(b"x")
    (check,) = store_checks(other, stored)
    assert check.status == "fail" and "not a store" in check.detail
    (check,) = store_checks(other / "a.svs", stored)
    assert check.status == "fail" and "is a file" in check.detail
    broken = tmp_path / "broken"
    (broken / "cells.lance" / "_versions").mkdir(parents=True)
    (broken / "cells.lance" / "_versions" / "1.manifest").write_bytes(b"garbage")
    (check,) = store_checks(broken, stored)
    assert check.status == "fail" and "cannot open the store" in check.detail


def test_doctor_never_writes_to_the_store(store, monkeypatch):
    import embedstore.doctor as doctor

    db, stored = store
    before = snapshot(db)
    store_checks(db, stored)
    store_checks(db, stored, context_px=256, precision="bf16", context="tiled")
    store_checks(db, stored, table="not_yet")
    store_checks(db, stored, table="runs")
    monkeypatch.setattr(doctor, "check_gpu", lambda device: ([], "cuda"))
    store_checks(db, stored, device="auto")
    assert snapshot(db) == before


def doctor_cli(*args):
    return run_cli("cli.embed", "doctor", *args)  # in-process (tests/clirun.py)


def test_cli_json_has_the_failed_store_check_and_exits_1(store):
    db, stored = store
    before = snapshot(db)
    device = stored["vectors"]["local"]["compute"]["device_type"]
    proc = doctor_cli("--local-backbone", "test-vit-local", "--context-backbone", "test-vit-context",
                      "--context-px", 512, "--device", device, "--db", db, "--no-timing", "--json")  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)  # data on stdout, the verdict on stderr
    assert report["ok"] is False
    (check,) = [c for c in report["checks"] if c["group"] == "store"]
    assert check["status"] == "fail" and "vectors.context.input_px: stored 128, now 512" in check["detail"]
    assert "--context-px 128" in check["fix"] and "--table" in check["fix"]
    assert [c["name"] for c in report["checks"] if c["status"] == "fail"] == ["table cells"]
    assert "block a run" in proc.stderr and "table cells" in proc.stderr
    assert snapshot(db) == before


def test_tiles_of_a_tiled_table_are_compared(tmp_path, store):
    """A table of tiled context vectors (its config as extract makes it; no cells needed) and
    doctor asked about other tiles: refused as extract refuses them, naming the stored tiles."""
    import torch

    from embedstore.extract.pipeline import ExtractConfig, build_steps, vector_config

    _, stored = store
    dev = torch.device(stored["vectors"]["local"]["compute"]["device_type"])
    cfg = ExtractConfig(**{**FAST, "device": dev.type, "context": "tiled", "tile_px": 512, "tile_overlap_px": 128})
    steps = build_steps(cfg, dev)
    db = tmp_path / "tiled"
    Store(db, create=True).cells_table("cells", {s.name: int(s.backbone.dim) for s in steps}, vector_config(steps))
    ask = dict(local_backbone=cfg.local_backbone, context_backbone=cfg.context_backbone, context_px=cfg.context_input_px,
               device=dev.type, context="tiled")  # fmt: skip
    (same,) = check_store(db, **ask, tile_px=512, tile_overlap_px=128)
    assert same.status == "ok", same
    (check,) = check_store(db, **ask, tile_px=1024, tile_overlap_px=128)
    assert check.status == "fail" and "vectors.context.tiling.tile_px: stored 512, now 1024" in check.detail
    assert "--tile-px 512" in check.fix and check.detail.count("stored") == 1
    (check,) = check_store(db, **ask, tile_px=512, tile_overlap_px=256)
    assert check.status == "fail" and "--tile-overlap-px 128" in check.fix
