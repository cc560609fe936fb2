"""Grad-CAM of single predictions: which part of a cell's crop drove its class.

For each requested cell the crop is re-read from its slide exactly as the extraction pass cut
it, run through the store's backbone (rebuilt from the store's vector config, refused when its
weights differ) and the run's head with gradients, and Grad-CAM is taken at one trunk layer:

    A = that layer's patch tokens (prefix tokens dropped) as a (grid, grid, D) map,
    w = d logit_c / dA averaged over the grid,   CAM = ReLU(sum_k w_k A_k),

min-max normalised to [0, 1] and bilinearly upsampled to the crop. The local path explains the
FiLM head (with the cell's tissue), the context path the global head (its nucleus input held
fixed at the recomputed local vector). The recomputed vectors are compared with the stored ones.

Target layers of the timm ViTs (VisionTransformer for uni2-h, Eva for DINOv3):
  * `last-block`: the output of `blocks[-1].norm1`, the normalised tokens entering the last
    block's attention. Not the last block's output: with CLS pooling the final (per-token) norm
    makes the CLS vector depend on the CLS token alone, so every patch token's gradient there is
    zero. This is the layer pytorch-grad-cam recommends for ViTs and the NuClass figures use.
  * `patch-embed`: the output of `patch_embed` (before position embeddings, prefix tokens and
    blocks), as the authors' code targets: each token sees only its own patch's pixels.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embedstore.errors import UserError
from embedstore.store import DEFAULT_TABLE, Store

from . import checkpoint as ckpt
from . import runlock
from .train import trained_tissues

Log = Callable[[str], None]
TARGET_LAYERS = ("last-block", "patch-embed")
PATHS = ("local", "context", "both")
#: the recomputed vector must match the stored one at least this well (cosine, fp32)
MIN_COSINE = 0.999
OVERLAY_ALPHA = 0.45
COLORMAP = "inferno"  # perceptually uniform, readable in grey scale
#: per-cell figure: inches per panel and dpi (PNG side = PANEL_IN * DPI per panel)
PANEL_IN, CELL_DPI = 3.0, 100
GRID_PANEL_IN, GRID_DPI = 2.0, 100
TITLE_IN = 0.5  # extra height per figure for the titles


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


@dataclass
class PathExplanation:
    """Grad-CAM of one cell through one path (local: FiLM head; context: global head)."""

    path: str
    head: str
    target_layer: str
    crop: np.ndarray  # uint8 (px, px, 3): the crop as the backbone sees it
    cam: np.ndarray  # float32 (px, px) in [0, 1]
    grid_cam: np.ndarray  # float32 (grid, grid) in [0, 1], before upsampling
    class_name: str  # the explained class
    probability: float  # its softmax probability
    predicted: str
    predicted_probability: float
    cosine: float  # recomputed vs stored vector


@dataclass
class CellExplanation:
    slide_id: str
    cell_id: str
    tissue: str
    label: str | None
    paths: list[PathExplanation] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.slide_id}:{self.cell_id}"


# ---------------------------------------------------------------------------------------------
# Grad-CAM


def target_module(trunk: nn.Module, target_layer: str) -> nn.Module:
    """The trunk module whose output is the Grad-CAM activation (see the module docstring)."""
    if target_layer == "last-block":
        return trunk.blocks[-1].norm1
    if target_layer == "patch-embed":
        return trunk.patch_embed
    raise UserError(f"unknown target layer {target_layer!r}: choose one of {', '.join(TARGET_LAYERS)}")


@contextlib.contextmanager
def capture(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Replace `module`'s output by a detached leaf that requires grad, and hand it out.

    The trunk is frozen and the pixels need no gradient, so without this no graph would be
    built; cutting at the target also leaves autograd nothing to do upstream of it.
    """
    store: dict[str, torch.Tensor] = {}

    def hook(_mod: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
        leaf = out.detach().requires_grad_(True)
        store["act"] = leaf
        return leaf

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def as_grid(act: torch.Tensor, n_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """Activations (or their gradients) as (B, gh, gw, D): tokens lose their prefix
    (cls + registers) and are reshaped row-major; patch-embed output may already be a grid."""
    if act.ndim == 4:
        return act
    patches = act[:, n_prefix:]
    if patches.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"{patches.shape[1]} patch tokens do not fill a {grid} grid")
    return patches.reshape(act.shape[0], grid[0], grid[1], act.shape[-1])


def minmax(cam: torch.Tensor) -> torch.Tensor:
    """(B, h, w) scaled to [0, 1] per map; all zeros where a map is constant."""
    lo = cam.amin(dim=(1, 2), keepdim=True)
    span = cam.amax(dim=(1, 2), keepdim=True) - lo
    return torch.where(span > 0, (cam - lo) / span.clamp_min(1e-12), torch.zeros_like(cam))


def grad_cam(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """(B, gh, gw, D) activations and gradients -> (B, gh, gw) CAM in [0, 1] (all zeros when
    no patch raises the class score: ReLU leaves nothing)."""
    weights = grad.mean(dim=(1, 2), keepdim=True)
    return minmax(F.relu((weights * act).sum(dim=-1)))


def upsample(cam: torch.Tensor, px: int) -> torch.Tensor:
    """(B, gh, gw) -> (B, px, px), bilinear, rescaled to span [0, 1] again (the pixel centres
    never land exactly on the grid's extreme cells)."""
    up = F.interpolate(cam[:, None], size=(px, px), mode="bilinear", align_corners=False)
    return minmax(up[:, 0])


def backbone_view(backbone: Any, crop: np.ndarray) -> np.ndarray:
    """The uint8 crop resized to the backbone's input as its preprocessing does (display)."""
    x = torch.from_numpy(np.ascontiguousarray(crop))[None].permute(0, 3, 1, 2)
    px = backbone.input_px
    if tuple(x.shape[-2:]) != (px, px):
        x = F.interpolate(x, size=(px, px), mode="bilinear", align_corners=False, antialias=True)
    return x[0].permute(1, 2, 0).numpy().astype(np.uint8)


def explain_crop(
    backbone: Any,
    head: Callable[[torch.Tensor], torch.Tensor],
    crop: np.ndarray,
    target_layer: str,
    class_index: int | None = None,
) -> dict[str, Any]:
    """Grad-CAM of `head(backbone(crop))` for one uint8 (H, W, 3) crop.

    Returns the vector, logits, explained class index, grid CAM and upsampled CAM (numpy).
    """
    module = target_module(backbone.trunk, target_layer)
    images = torch.from_numpy(np.ascontiguousarray(crop))[None].to(backbone.device)
    with torch.enable_grad(), torch.autocast(backbone.device.type, enabled=False), capture(module) as cap:
        vector = backbone(images)
        logits = head(vector)
    idx = int(logits[0].argmax()) if class_index is None else int(class_index)
    (grad,) = torch.autograd.grad(logits[0, idx], cap["act"])
    p = backbone.spec.patch_px
    grid = (backbone.input_px // p, backbone.input_px // p)
    n_prefix = backbone.n_prefix_tokens
    cam = grad_cam(as_grid(cap["act"], n_prefix, grid).float(), as_grid(grad, n_prefix, grid).float())
    return {
        "vector": vector.detach()[0].float().cpu().numpy(),
        "logits": logits.detach()[0].float().cpu(),
        "class_index": idx,
        "grid_cam": cam.detach()[0].cpu().numpy(),
        "cam": upsample(cam.detach(), backbone.input_px)[0].cpu().numpy(),
    }


# ---------------------------------------------------------------------------------------------
# Store, run and slides


def _vector_config(config: dict, kind: str) -> dict:
    try:
        return config["vectors"][kind]
    except (KeyError, TypeError):
        raise UserError(f"the store's table records no `{kind}` vector config; re-extract it") from None


def load_backbone(vec_cfg: dict, kind: str, weights: str | Path | None, device: Any) -> Any:
    """The backbone that made the stored `kind` vectors, or a UserError saying why not."""
    from embedstore.extract.backbones import build_backbone, get_spec

    name = vec_cfg["backbone"]
    if get_spec(name).weights_free:
        raise UserError(
            f"the {kind} vectors come from {name!r}, hand-crafted features without patch tokens "
            f"or gradients: there is nothing to Grad-CAM; explain another path (--path)"
        )
    backbone = build_backbone(name, weights=weights, pooling=vec_cfg.get("pooling"),
                              input_px=vec_cfg.get("input_px"), device=device, role=kind)  # fmt: skip
    want = vec_cfg.get("weights_sha256")
    if want and backbone.weights_sha256 != want:
        raise UserError(
            f"the {name} weights found ({backbone.weights_source}, sha256 "
            f"{backbone.weights_sha256[:12]}...) are not those that made the stored {kind} vectors "
            f"(sha256 {want[:12]}...): the explanation would not be of the stored vectors. "
            f"Point --{kind}-weights to the file used for extraction"
        )
    return backbone


def read_crop(slide: Any, x_px: float, y_px: float, vec_cfg: dict) -> np.ndarray:
    """The cell's field as the extraction pass cut it: at the pyramid level's own pixels
    (`resample=False`), for the backbone to resize."""
    from embedstore.geometry import CropSpec

    spec = CropSpec(float(vec_cfg["field_um"]), int(vec_cfg["field_px"]))
    x, y = np.array([x_px], np.float64), np.array([y_px], np.float64)
    return slide.read_region_for(x, y, slide.plan(spec, resample=False)).cut(x, y)[0]


def _lookup(loaded: Any, slide: str, cell: str) -> int:
    meta = loaded.meta
    hits = np.flatnonzero((meta["cell_id"] == cell).to_numpy())
    if hits.size == 0:
        hint = (f"slide {slide!r} has {meta.height} cells, e.g. {meta['cell_id'].head(3).to_list()}"
                if meta.height else f"no slide {slide!r} in table {loaded.table!r}")  # fmt: skip
        raise UserError(f"cell {slide}:{cell} is not in the store ({hint}); write cells as SLIDE:CELL_ID")
    return int(hits[0])


def _check_tissues(store: Store, table: str, refs: Sequence[tuple[str, str]], tissues: Sequence[str],
                   trained: Sequence[str]) -> None:  # fmt: skip
    """Refuse cells of a tissue the run's local head never learnt, as `heads predict` does:
    unknown to the run, or in its vocabulary without training cells (held out with --holdout,
    or only in val/test), whose FiLM embedding is its untrained initialisation. Every such
    cell is named at once."""
    unknown: dict[str, str] = {}  # cell -> tissue
    untrained: dict[str, str] = {}
    metas: dict[str, Any] = {}
    for sid, cid in refs:
        if sid not in metas:
            metas[sid] = store.load(table, slides=[sid], vectors=())
        tissue = metas[sid].meta.row(_lookup(metas[sid], sid, cid), named=True)["tissue"]
        if tissue not in tissues:
            unknown[f"{sid}:{cid}"] = tissue
        elif tissue not in trained:
            untrained[f"{sid}:{cid}"] = tissue

    def said(cells: dict[str, str]) -> str:
        return ", ".join(f"{c} ({t})" for c, t in cells.items())

    if unknown:
        raise UserError(f"cell(s) {said(unknown)} have a tissue unknown to the run (tissues: "
                        f"{', '.join(tissues)}): the run has no prediction of them to explain")  # fmt: skip
    if untrained:
        names = sorted(set(untrained.values()))
        raise UserError(
            f"cell(s) {said(untrained)} have a tissue this run had no training cells for (held out, "
            f"or only in val/test; trained tissues: {', '.join(trained)}): the local head's embedding "
            "of it is untrained, and `heads predict` refuses such cells, so there is no prediction of "
            f"them to explain. Explain cells of a trained tissue, or train heads with training cells "
            f"of {', '.join(map(repr, names))}"
        )


def _class_index(classes: list[str], class_name: str | None) -> int | None:
    if class_name is None:
        return None
    if class_name not in classes:
        raise UserError(f"class {class_name!r} is not one of the run's classes: {', '.join(classes)}")
    return classes.index(class_name)


def _paths_wanted(path: str, run_dir: Path, log: Log) -> list[str]:
    if path not in PATHS:
        raise UserError(f"unknown path {path!r}: choose one of {', '.join(PATHS)}")
    wanted = ["local", "context"] if path == "both" else [path]
    if "context" in wanted and not ckpt.has_stage(run_dir, "global"):
        if path == "context":
            raise UserError(f"{run_dir} has no global head (global.safetensors): train stage "
                            "`global`, or explain --path local")  # fmt: skip
        log(f"{run_dir} has no global head: explaining the local path only")
        wanted = ["local"]
    return wanted


# ---------------------------------------------------------------------------------------------
# API


def compute(
    run_dir: str | Path,
    db: str | Path,
    cells: Sequence[str],
    *,
    table: str = DEFAULT_TABLE,
    path: str = "both",
    target_layer: str = "last-block",
    class_name: str | None = None,
    slides: str | Path | Sequence[str | Path] | None = None,
    device: str = "cpu",
    local_weights: str | Path | None = None,
    context_weights: str | Path | None = None,
    log: Log = _stderr,
) -> list[CellExplanation]:
    """Grad-CAM of each cell ("SLIDE:CELL_ID") through the wanted paths (no files written)."""
    from embedstore.extract.pipeline import resolve_device
    from embedstore.io.slides import Slide
    from embedstore.search.explore import parse_cell, resolve_cell

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist: pass the --out of `heads train`")
    if target_layer not in TARGET_LAYERS:
        raise UserError(f"unknown target layer {target_layer!r}: choose one of {', '.join(TARGET_LAYERS)}")
    if not cells:
        raise UserError("no cells to explain: pass --cell SLIDE:CELL_ID (repeatable)")
    for c in cells:
        parse_cell(c)  # the form, before any model is loaded
    wanted = _paths_wanted(path, run_dir, log)
    dev = resolve_device(device)
    local_head, info = ckpt.load_local(run_dir, device=str(dev))
    classes, tissues = list(info["classes"]), list(info["tissues"])
    class_index = _class_index(classes, class_name)
    global_head = ckpt.load_global(run_dir, device=str(dev))[0] if "context" in wanted else None

    store = Store(db)
    config = store.config(table)
    ckpt.check_provenance(info.get("provenance", {}), config, str(run_dir / "local.json"))
    if "context" in wanted and config.get("context_mode", "exact") != "exact":
        raise UserError(f"the context vectors of table {table!r} are pooled from shared tiles "
                        "(--context tiled), not one field per cell: explain --path local")  # fmt: skip
    keys = store.keys_frame(table)
    refs = [resolve_cell(c, keys) for c in cells]
    _check_tissues(store, table, refs, tissues, trained_tissues(info))  # before any backbone is built
    backbones = {k: load_backbone(_vector_config(config, k), k,
                                  local_weights if k == "local" else context_weights, dev)
                 for k in wanted}  # fmt: skip
    from embedstore.search.explore import slide_paths

    paths = slide_paths(db, slides)
    out: list[CellExplanation] = []
    for sid, cid in refs:
        loaded = store.load(table, slides=[sid])
        row = _lookup(loaded, sid, cid)
        rec = loaded.meta.row(row, named=True)
        if sid not in paths or not Path(paths[sid]).exists():
            where = "in --slides or " if slides is not None else ""
            raise UserError(f"slide file of {sid!r} not found {where}where extraction recorded it ({paths.get(sid)}); "
                            "pass --slides with the folder that holds it")  # fmt: skip
        t = torch.tensor([tissues.index(rec["tissue"])], device=dev)
        stored = {k: loaded.vectors[k][row] for k in ("local", "context")}
        cell = CellExplanation(sid, cid, rec["tissue"], rec.get("label"))
        with Slide(paths[sid]) as slide:
            crops = {k: read_crop(slide, rec["x_px"], rec["y_px"], _vector_config(config, k)) for k in wanted}
        # the global head's nucleus input, held fixed: the recomputed local vector when the
        # local path runs first, else the stored one (what `heads predict` feeds it)
        u_fixed = torch.from_numpy(stored["local"])[None].to(dev)
        for kind in wanted:
            if kind == "local":
                head_name = "local (FiLM)"

                def head(v: torch.Tensor, t: torch.Tensor = t) -> torch.Tensor:
                    return local_head(v, t)
            else:
                head_name = "global"

                def head(v: torch.Tensor, u: torch.Tensor = u_fixed) -> torch.Tensor:
                    return global_head(u, v)
            res = explain_crop(backbones[kind], head, crops[kind], target_layer, class_index)
            if kind == "local":
                u_fixed = torch.from_numpy(res["vector"])[None].to(dev)
            cos = _cosine(res["vector"], stored[kind])
            if cos < MIN_COSINE:
                log(f"warning: {sid}:{cid}: the recomputed {kind} vector differs from the stored one "
                    f"(cosine {cos:.4f} < {MIN_COSINE}); the explanation may not be of the stored "
                    "vector (other slide file, µm/px, precision or backbone settings?)")  # fmt: skip
            if not res["cam"].any():
                log(f"note: {sid}:{cid}: the {kind} CAM at {target_layer} is empty: no region "
                    "raises the class score there (every weighted sum is negative)")  # fmt: skip
            probs = res["logits"].softmax(0)
            pred = int(probs.argmax())
            cell.paths.append(PathExplanation(
                kind, head_name, target_layer, backbone_view(backbones[kind], crops[kind]), res["cam"], res["grid_cam"],
                classes[res["class_index"]], float(probs[res["class_index"]]), classes[pred], float(probs[pred]), cos,
            ))  # fmt: skip
        out.append(cell)
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


@runlock.reads_run
def explain(
    run_dir: str | Path,
    db: str | Path,
    cells: Sequence[str],
    out_dir: str | Path,
    *,
    table: str = DEFAULT_TABLE,
    path: str = "both",
    target_layer: str = "last-block",
    class_name: str | None = None,
    slides: str | Path | Sequence[str | Path] | None = None,
    device: str = "cpu",
    local_weights: str | Path | None = None,
    context_weights: str | Path | None = None,
    log: Log = _stderr,
) -> list[Path]:
    """Grad-CAM figures: one PNG per cell plus `grid.png` of all of them (paths returned)."""
    from embedstore.fileio import ensure_dir

    made = not Path(out_dir).exists()
    out_dir = ensure_dir(out_dir, "the explanations")  # an --out that cannot be made fails first
    try:
        found = compute(run_dir, db, cells, table=table, path=path, target_layer=target_layer,
                        class_name=class_name, slides=slides, device=device, local_weights=local_weights,
                        context_weights=context_weights, log=log)  # fmt: skip
    except BaseException:
        if made and not any(out_dir.iterdir()):
            out_dir.rmdir()  # refused: leave no empty folder behind
        raise
    written = [render_cell(c, out_dir / name) for c, name in zip(found, _file_names(found), strict=True)]
    written.append(render_grid(found, out_dir / "grid.png"))
    return written


# ---------------------------------------------------------------------------------------------
# Figures


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _file_names(cells: Sequence[CellExplanation]) -> list[str]:
    """SLIDE__CELL.png per cell; a name that had to change characters ("a b", "a:b", "α"), or
    that another cell's name equals ignoring case, gets a short hash of its SLIDE:CELL key, so
    two cells never share a file and a cell always gets the same name."""
    import hashlib
    from collections import Counter

    bases = [f"{_safe(c.slide_id)}__{_safe(c.cell_id)}" for c in cells]
    keys = {}  # name, ignoring case -> the cells' keys that have it
    for c, b in zip(cells, bases, strict=True):
        keys.setdefault(b.lower(), Counter())[c.key] += 1
    names = []
    for c, b in zip(cells, bases, strict=True):
        if b != f"{c.slide_id}__{c.cell_id}" or len(keys[b.lower()]) > 1:
            b += "-" + hashlib.sha256(c.key.encode()).hexdigest()[:8]
        names.append(f"{b}.png")
    return names


def _draw(ax_crop: Any, ax_cam: Any, e: PathExplanation, fontsize: float) -> None:
    for ax in (ax_crop, ax_cam):
        ax.set_xticks([])
        ax.set_yticks([])
    ax_crop.imshow(e.crop)
    ax_crop.set_title(f"{e.path} crop ({e.crop.shape[0]} px)", fontsize=fontsize)
    ax_cam.imshow(e.crop)
    ax_cam.imshow(e.cam, cmap=COLORMAP, alpha=OVERLAY_ALPHA, vmin=0.0, vmax=1.0, interpolation="nearest")
    why = "" if e.class_name == e.predicted else f"\nexplained: {e.class_name} {e.probability:.2f}"
    empty = " (CAM empty)" if not e.cam.any() else ""
    ax_cam.set_title(f"{e.head}: {e.predicted} {e.predicted_probability:.2f}{why}\n{e.target_layer}{empty}",
                     fontsize=fontsize)  # fmt: skip


def _save(fig: Any, out: Path) -> Path:
    from embedstore.fileio import atomic_path

    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)
    return out


def figure_size(n_rows: int, n_cols: int, panel_in: float, dpi: int) -> tuple[int, int]:
    """(width, height) in pixels of a figure of n_rows x n_cols panels."""
    return round(n_cols * panel_in * dpi), round(n_rows * (panel_in + TITLE_IN) * dpi)


def render_cell(cell: CellExplanation, out: Path) -> Path:
    """Crop and overlay per path, titled with cell id, true label, prediction and layer."""
    from matplotlib.figure import Figure

    n_cols = 2 * len(cell.paths)
    w, h = figure_size(1, n_cols, PANEL_IN, CELL_DPI)
    fig = Figure(figsize=(w / CELL_DPI, h / CELL_DPI), dpi=CELL_DPI)
    axes = fig.subplots(1, n_cols, squeeze=False)[0]
    for i, e in enumerate(cell.paths):
        _draw(axes[2 * i], axes[2 * i + 1], e, 8)
    fig.suptitle(f"{cell.key} ({cell.tissue}), true: {cell.label or 'unlabelled'}", fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.78, wspace=0.08)
    return _save(fig, out)


def render_grid(cells: Sequence[CellExplanation], out: Path) -> Path:
    """All cells, one row each: (crop, overlay) per path."""
    from matplotlib.figure import Figure

    n_cols = 2 * max(len(c.paths) for c in cells)
    w, h = figure_size(len(cells), n_cols, GRID_PANEL_IN, GRID_DPI)
    fig = Figure(figsize=(w / GRID_DPI, h / GRID_DPI), dpi=GRID_DPI)
    axes = fig.subplots(len(cells), n_cols, squeeze=False)
    for r, cell in enumerate(cells):
        for i, e in enumerate(cell.paths):
            _draw(axes[r, 2 * i], axes[r, 2 * i + 1], e, 6)
        axes[r, 0].set_ylabel(f"{cell.key}\ntrue: {cell.label or 'unlabelled'}", fontsize=6)
        for ax in axes[r, 2 * len(cell.paths):]:
            ax.axis("off")
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.01, top=0.95, wspace=0.06, hspace=0.35)
    return _save(fig, out)
