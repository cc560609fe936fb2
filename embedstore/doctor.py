"""`embed doctor`: one preflight of this machine, the slides and the backbones before a run.

Each check is a `Check` with a status: "ok", "warn" (the run works, but worse: no GPU) or
"fail" (the run cannot work: a package missing, weights not found, a slide without µm/px).
The timing check runs the chosen architectures on random crops (random weights when the real
ones are absent: the cost of a forward does not depend on the weights) and turns the measured
per-crop times into an expected extraction time per 10k cells in exact context mode.
With `--db`, the store check reads (never writes) the vector config of the table extract would
write to and fails where extract would refuse these options (other backbones, context size,
device type, precision or context mode), before any weights are loaded.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .extract.tiled import OVERLAP_PX, TILE_PX

#: import name -> distribution name; all are required by the package
REQUIRED_PACKAGES = {
    "torch": "torch", "timm": "timm", "numpy": "numpy", "polars": "polars", "pyarrow": "pyarrow",
    "lancedb": "lancedb", "lance": "pylance", "faiss": "faiss-cpu", "openslide": "openslide-python",
    "tiffslide": "tiffslide", "sklearn": "scikit-learn", "xgboost": "xgboost", "anndata": "anndata",
    "scanpy": "scanpy",
}  # fmt: skip
#: optional extras: reported, never blocking
OPTIONAL_PACKAGES = {"spatialdata": "spatialdata", "skimage": "scikit-image"}
#: bytes per stored cell in the store (two float16 vectors of 1536 + 1024 dims plus metadata)
BYTES_PER_CELL_REAL = (1536 + 1024) * 2 + 200
CELLS = 10_000


@dataclass
class Check:
    """One line of the preflight: what was checked, its status, what was found, how to fix."""

    group: str
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _version(module, dist: str) -> str:
    for name in (dist, dist.replace("-cpu", "-gpu")):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return str(getattr(module, "__version__", "?"))


def check_packages() -> list[Check]:
    out = [Check("machine", "python", "ok", f"{platform.python_version()} on {platform.platform()}, "
                 f"{os.cpu_count()} CPUs, {_ram_gb():.0f} GB RAM")]  # fmt: skip
    for group, packages in (("packages", REQUIRED_PACKAGES), ("optional", OPTIONAL_PACKAGES)):
        for mod, dist in packages.items():
            try:
                module = importlib.import_module(mod)
            except Exception as exc:  # noqa: BLE001 - a broken install fails in many ways
                status = "fail" if group == "packages" else "warn"
                out.append(Check(group, dist, status, f"cannot import {mod}: {exc}",
                                 f"pip install {dist}"))  # fmt: skip
                continue
            detail = _version(module, dist)
            if mod == "openslide":
                detail += f" (OpenSlide library {getattr(module, '__library_version__', '?')})"
            out.append(Check(group, dist, "ok", detail))
    return out


def _ram_gb() -> float:
    try:
        import psutil

        return psutil.virtual_memory().total / 2**30
    except Exception:  # noqa: BLE001
        return float("nan")


def check_gpu(device: str) -> tuple[list[Check], str]:
    """The GPU (name, memory, CUDA) or a warning; returns the device the timing uses."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        detail = (f"{torch.cuda.device_count()} x {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                  f"CUDA {torch.version.cuda}, torch {torch.__version__}")  # fmt: skip
        dev = "cuda" if device == "auto" else device
        return [Check("machine", "gpu", "ok", detail)], dev
    if device.startswith("cuda"):
        return [Check("machine", "gpu", "fail", f"--device {device} but torch sees no CUDA GPU "
                      f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})",
                      "install the CUDA build of torch that matches the driver (nvidia-smi), or use --device cpu")], "cpu"  # fmt: skip
    return [Check("machine", "gpu", "warn", "no CUDA GPU: extraction runs on the CPU (real "
                  "backbones take seconds per cell)", "run `embed extract` on a GPU machine for real backbones")], "cpu"  # fmt: skip


def check_weights(names: Sequence[str], roles: Sequence[str] = ("local", "context")) -> list[Check]:
    """Whether each backbone's weights are found (`roles`: which extract option gives them)."""
    from .extract import backbones as B

    out = []
    role_of = {}
    for name, role in zip(names, roles, strict=False):
        role_of.setdefault(name, role)
    for name in dict.fromkeys(names):
        try:
            spec = B.get_spec(name)
        except UserError as exc:
            out.append(Check("weights", name, "fail", str(exc), "pick a name from `embed backbones`"))
            continue
        status = B.weights_status(name)
        if status.startswith("not found"):
            out.append(Check("weights", name, "fail", status, B.how_to_get_weights(name, role_of.get(name))))
        elif spec.is_test:
            out.append(Check("weights", name, "warn", f"{status}: a tiny random test model, not a pathology model"))
        else:
            out.append(Check("weights", name, "ok", status))
    return out


def check_slides(paths: Sequence[Path], mpp: float | None) -> list[Check]:
    from .io.slides import Slide, find_slides

    try:
        found = find_slides(list(paths))
    except UserError as exc:
        return [Check("slides", ", ".join(map(str, paths)), "fail", str(exc))]
    if not found:
        return [Check("slides", ", ".join(map(str, paths)), "fail", "no slide files found",
                      "point at slide files or a folder holding them")]  # fmt: skip
    out = []
    for path in found:
        try:
            with Slide(path, mpp=mpp) as s:
                i = s.info
                # the last pixel of each level: a truncated file lacks its last tiles
                for level, (w, h) in enumerate(i.level_dimensions):
                    s.read_level(level, w - 1, h - 1, 1, 1)
                out.append(Check("slides", path.name, "ok",
                                 f"{i.width} x {i.height} px, {i.mpp:.4f} µm/px ({i.mpp_source}), "
                                 f"{len(i.level_dimensions)} level(s), {i.backend}"))  # fmt: skip
        except UserError as exc:
            fix = ("pass --mpp with the scanner's µm per pixel" if "µm per pixel" in str(exc) else
                   "copy the file again from where it was made" if "corrupt or truncated" in str(exc) else "")  # fmt: skip
            out.append(Check("slides", path.name, "fail", str(exc), fix))
    return out


def check_disk(db: str | Path | None, bytes_per_cell: int) -> list[Check]:
    where = Path(db) if db is not None else Path.cwd()
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    per_m = bytes_per_cell * 1e6 / 1e9
    status = "ok" if free > 10 * per_m * 1e9 else "warn"
    return [Check("machine", "disk", status, f"{free / 1e9:.0f} GB free at {probe}; the store "
                  f"needs about {per_m:.1f} GB per million cells")]  # fmt: skip


def check_options(precision: str, context: str, table: str, context_pooling: str | None = None) -> list[Check]:
    """The extract options doctor takes only to compare with the store, refused as extract would."""
    from .extract.pipeline import CONTEXT_MODES, PRECISIONS, bad_table_name

    out = []
    if precision not in PRECISIONS:
        out.append(Check("options", "--precision", "fail", f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}"))
    if context not in CONTEXT_MODES:
        out.append(Check("options", "--context", "fail", f"--context must be one of {', '.join(CONTEXT_MODES)}, not {context!r}"))
    if problem := bad_table_name(table):
        out.append(Check("options", "--table", "fail", problem))
    if context == "tiled" and context_pooling not in (None, "mean"):
        out.append(Check("options", "--context-pooling", "fail", "--context tiled pools the patch tokens in each "
                         f"cell's window (mean); --context-pooling {context_pooling} needs --context exact"))  # fmt: skip
    return out


def _stored(config: dict, path: str):
    """The value at a dotted path of a vector config (None where absent)."""
    value = config
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def check_store(
    db: str | Path,
    table: str = "cells",
    *,
    local_backbone: str,
    context_backbone: str,
    context_px: int,
    device: str,
    precision: str = "auto",
    context: str = "exact",
    context_pooling: str | None = None,
    tile_px: int = TILE_PX,
    tile_overlap_px: int = OVERLAP_PX,
) -> list[Check]:
    """Would `embed extract --db DB --table TABLE` with these options add to the stored table?

    Compares, without loading weights and without writing anything, what these options decide
    of the table's vector config (`embedstore.extract.pipeline.vector_config`) with the stored
    one: both backbone names, the context input size, the device type and precision of the
    forward (`device`: the device doctor resolved; `precision` as given to extract), the
    context mode, the context pooling and, in tiled mode, the tile size and overlap. The
    weights' sha256 is compared by extract itself (doctor does not hash multi-GB files).
    """
    import torch

    from .extract.pipeline import resolve_precision
    from .store import Store, StoreError, is_uri

    where = str(db)
    if is_uri(where):
        return [Check("store", "store", "warn", f"{where}: a remote store; doctor does not open remote stores, so the "
                      f"vector config of table {table!r} is not compared here (`embed extract` compares it when it starts)",
                      f"`embed info {where}` shows the stored backbones and input sizes")]  # fmt: skip
    root = Path(where)
    if not root.exists():
        return [Check("store", "store", "ok", f"{root} does not exist yet: `embed extract` will create a new "
                      f"store there, with table {table!r} for these options")]  # fmt: skip
    new_path = "give the directory `embed extract --db` created, or a path that does not exist yet (a new store)"
    if not root.is_dir():
        return [Check("store", "store", "fail", f"{root} is a file, not a store (a store is a directory)", new_path)]
    try:
        if not any(root.iterdir()):
            return [Check("store", "store", "ok", f"{root} is an empty directory: `embed extract` will create a new "
                          f"store in it, with table {table!r} for these options")]  # fmt: skip
        store = Store(root)
        if not store.has(table):
            tables = store.vector_tables()
            return [Check("store", f"table {table}", "ok", f"the store at {root} has no table {table!r} yet (vector "
                          f"tables: {', '.join(tables) or 'none'}): `embed extract` will make it for these options")]  # fmt: skip
        stored = store.config_or_none(table)
        if stored is None:
            tables = store.vector_tables()
            return [Check("store", f"table {table}", "fail", f"table {table!r} in {root} holds no vectors (extract "
                          f"refuses it)", f"pick another --table (vector tables here: {', '.join(tables) or 'none'})")]  # fmt: skip
        n_cells = store.open(table).count_rows()
        taken = set(store.table_names())
    except StoreError as exc:
        return [Check("store", "store", "fail", str(exc), new_path)]
    except Exception as exc:  # noqa: BLE001 - unreadable files, a broken table: all say the same
        return [Check("store", "store", "fail", f"{root}: cannot open the store ({type(exc).__name__}: {exc})",
                      f"check that this user can read it; {new_path}")]  # fmt: skip
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        return [Check("store", f"table {table}", "fail", f"--device {device}: {exc}", "use auto, cpu, cuda or cuda:N")]
    used = resolve_precision(precision, dev)
    tiled = context == "tiled"
    now = [  # config path, what these options make of it, the extract option that sets it
        ("vectors.local.backbone", local_backbone, "--local-backbone"),
        ("vectors.context.backbone", context_backbone, "--context-backbone"),
        ("vectors.context.input_px", context_px, "--context-px"),
        ("vectors.local.compute.device_type", dev.type, "--device"),
        ("vectors.context.compute.device_type", dev.type, "--device"),
        ("vectors.local.compute.precision", used, "--precision"),
        ("vectors.context.compute.precision", used, "--precision"),
        ("context_mode", context, "--context"),
    ]  # fmt: skip
    if _stored(stored, "context_mode") in (None, context):  # another mode: its pooling and tiles differ too
        now += [
            ("vectors.context.pooling", "mean" if tiled else _pooling(context_backbone, context_pooling), "--context-pooling"),
            ("vectors.context.tiling.tile_px", tile_px if tiled else None, "--tile-px"),
            ("vectors.context.tiling.overlap_px", tile_overlap_px if tiled else None, "--tile-overlap-px"),
        ]  # fmt: skip
    diff, options = [], {}
    for path, value, option in now:
        old = _stored(stored, path)
        if old != value:
            diff.append(f"{path}: stored {old!r}, now {value!r}")
            if old is not None:  # absent: a table made by an older version, no option makes it
                options[option] = old
    if diff:
        new = next(f"{table}_v{i}" for i in range(2, 10_000) if f"{table}_v{i}" not in taken)
        same = " ".join(f"{k} {v}" for k, v in options.items())
        fix = (f"to add to this table, run `embed extract` (and this check) with {same}; or " if same else "")
        return [Check("store", f"table {table}", "fail",
                      f"table {table!r} in {root} holds vectors made with other settings, so `embed extract` "
                      "would refuse to add to it: " + "; ".join(diff),
                      fix + f"write these vectors to a new table with --table NAME (e.g. --table {new})")]  # fmt: skip
    lp, cp = _stored(stored, "vectors.local.input_px"), _stored(stored, "vectors.context.input_px")
    return [Check("store", f"table {table}", "ok",
                  f"table {table!r} in {root}: {n_cells} cells of local {local_backbone} ({lp} px) and context "
                  f"{context_backbone} ({cp} px), {dev.type} {used}, {context} context: these options match. The "
                  "weights' sha256 is compared when `embed extract` starts: doctor does not hash multi-GB weight "
                  "files")]  # fmt: skip


def _pooling(backbone: str, given: str | None) -> str | None:
    """The context pooling extract would use: the one given, else the backbone's default."""
    if given is not None:
        return given
    from .extract.backbones import get_spec

    try:
        return get_spec(backbone).pooling
    except UserError:  # an unknown name: the weights check says so
        return None


def _time_forward(name: str, input_px: int | None, device: str, batch: int) -> tuple[float, str]:
    """Seconds per crop of one backbone forward (random weights if none are found)."""
    import torch

    from .extract import backbones as B

    spec = B.get_spec(name)
    px = input_px or spec.input_px
    if B.weights_status(name).startswith("not found"):
        model = B.build_random_backbone(name, input_px=px, device=device)
        how = "random weights of the same architecture"
    else:
        model = B.build_backbone(name, input_px=px, device=device)
        how = "its weights"
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, px, px, 3), dtype=np.uint8))
    use_bf16 = torch.device(device).type == "cuda"
    times = []
    with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=use_bf16):
        for i in range(6):  # the first call (lazy init, kernel choice) is not timed
            t = time.perf_counter()
            model(images)
            if use_bf16:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            if i >= 1 and sum(times[1:]) > 1.0:  # slow models: one timed call is enough
                break
    return min(times[1:]) / batch, how


def check_timing(local: str, context: str, context_px: int, device: str) -> list[Check]:
    """Expected extraction time per 10k cells from measured forwards of both backbones."""
    from .extract.backbones import get_spec

    small = all(get_spec(n).n_params < 50_000_000 for n in (local, context))
    batch = 32 if device.startswith("cuda") else 16 if small else 2  # real ViTs: seconds per crop on a CPU
    try:
        t_local, how_l = _time_forward(local, None, device, batch)
        t_ctx, how_c = _time_forward(context, context_px, device, batch)
    except UserError as exc:
        return [Check("timing", "extraction", "fail", str(exc))]
    total = CELLS * (t_local + t_ctx)
    detail = (f"~{_human(total)} per {CELLS // 1000}k cells on {device} (exact context mode, model "
              f"time only: {local} {t_local * 1e3:.1f} ms/cell with {how_l}, {context} at "
              f"{context_px} px {t_ctx * 1e3:.1f} ms/cell with {how_c}; batch {batch})")  # fmt: skip
    return [Check("timing", "extraction", "ok", detail)]


def _human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def run_checks(
    slides: Sequence[Path] = (),
    *,
    local_backbone: str = "uni2-h",
    context_backbone: str = "dinov3-vitl16",
    context_px: int = 512,
    mpp: float | None = None,
    device: str = "auto",
    db: str | Path | None = None,
    table: str = "cells",
    precision: str = "auto",
    context: str = "exact",
    context_pooling: str | None = None,
    tile_px: int = TILE_PX,
    tile_overlap_px: int = OVERLAP_PX,
    timing: bool | None = None,
    notify: Callable[[str], None] = lambda _m: None,
) -> list[Check]:
    """All checks, in order; `notify` hears which group is running (the timing takes a while).

    With `db`: whether `embed extract` with these options could add to its `table` (`check_store`;
    `precision` and `context` as given to extract, used only there). `timing` None: time the
    backbones unless a check already blocks the run (a minute and more for real ones on a CPU,
    spent before the user hears what to fix); True: always; False: never."""
    notify("packages")
    checks = check_packages()
    if any(c.status == "fail" for c in checks):
        return checks  # without the core packages the rest cannot run
    gpu, dev = check_gpu(device)
    checks += gpu
    test_only = all(n.startswith("test-") for n in (local_backbone, context_backbone))
    checks += check_disk(db, 1_000 if test_only else BYTES_PER_CELL_REAL)
    checks += check_options(precision, context, table, context_pooling)
    if db is not None:
        notify("store")
        checks += check_store(db, table, local_backbone=local_backbone, context_backbone=context_backbone,
                              context_px=context_px, device=dev, precision=precision, context=context,
                              context_pooling=context_pooling, tile_px=tile_px, tile_overlap_px=tile_overlap_px)  # fmt: skip
    notify("weights")
    checks += check_weights([local_backbone, context_backbone])
    if slides:
        notify("slides")
        checks += check_slides(slides, mpp)
    unknown = any(c.group == "weights" and c.detail.startswith("Unknown backbone") for c in checks)
    if unknown or timing is False:
        return checks
    if timing is None and blocking(checks) and not test_only:
        return [*checks, Check("timing", "extraction", "warn", "not measured: something above blocks the run",
                               "fix it and run `embed doctor` again, or add --timing to time the backbones now")]  # fmt: skip
    notify(f"timing {local_backbone} and {context_backbone} on {dev}")
    return checks + check_timing(local_backbone, context_backbone, context_px, dev)


def blocking(checks: Sequence[Check]) -> list[Check]:
    return [c for c in checks if c.status == "fail"]
