"""`embed`: slides and cells in, per-cell vectors out (thin typer layer over `embedstore`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import polars as pl
import typer
from rich.markup import escape

from cli.common import console, emit, emit_json, progress, run

app = typer.Typer(
    help="Per-cell embedding store: synthetic data, cell ingestion, extraction, search.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="output directory")],
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    cells: Annotated[int, typer.Option(help="total number of cells over all slides")] = 600,
    slides: Annotated[int, typer.Option(help="number of slides")] = 3,
    density: Annotated[float, typer.Option(help="cells per mm² of tissue")] = 1500.0,
    overwrite: Annotated[bool, typer.Option(help="replace an existing synthetic dataset in OUT")] = False,
    level_step: Annotated[int, typer.Option(help="pyramid downsample per level: 2, or 4 as in Aperio SVS")] = 2,
) -> None:
    """Write synthetic H&E slides, Xenium bundles and ground truth from a seed."""
    from embedstore.synth import make_synthetic

    with console.status("rendering synthetic slides...") as status:
        result = make_synthetic(
            out, seed=seed, n_cells=cells, n_slides=slides, density_per_mm2=density,
            overwrite=overwrite, level_step=level_step,
            progress=lambda msg, frac: status.update(f"{msg} ({frac:.0%})"),
        )  # fmt: skip
    console.print(f"wrote {result.n_cells} cells on {len(result.slides)} slides to {out}")


def _is_bundle(path: Path) -> bool:
    return path.is_dir() and (path / "experiment.xenium").exists()


def _offset_px(text: str) -> tuple[float, float]:
    """`--offset-px X,Y` as two numbers."""
    from embedstore.errors import CellsError

    try:
        x, y = (float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise CellsError(f"--offset-px takes X,Y in pixels, e.g. --offset-px 2048,1024; not {text!r}") from None
    return x, y


@app.command()
def cells(
    source: Annotated[Path, typer.Argument(help="a CSV/Parquet table, a Xenium bundle or a directory of bundles, QuPath GeoJSON, CellViT cells.json, or a label image (.tif/.png)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="normalised cells table (.parquet)")],
    slides: Annotated[list[Path] | None, typer.Option(help="slide file(s) or a directory (tables, segmenter outputs)")] = None,
    slide: Annotated[Path | None, typer.Option(help="the H&E slide of a Xenium bundle")] = None,
    mpp: Annotated[float | None, typer.Option(help="µm per level-0 pixel, overrides the slide's")] = None,
    tissue: Annotated[str | None, typer.Option(help="tissue of all cells, where the source has none")] = None,
    slide_id: Annotated[str | None, typer.Option(help="slide id of all cells, where the source has none")] = None,
    unit: Annotated[str | None, typer.Option(help="coordinate unit of a table: px or um")] = None,
    x_col: Annotated[str | None, typer.Option(help="x column of a table")] = None,
    y_col: Annotated[str | None, typer.Option(help="y column of a table")] = None,
    cell_id_col: Annotated[str | None, typer.Option(help="cell id column of a table")] = None,
    slide_col: Annotated[str | None, typer.Option(help="slide id column of a table")] = None,
    tissue_col: Annotated[str | None, typer.Option(help="tissue column of a table")] = None,
    label_col: Annotated[str | None, typer.Option(help="label column of a table")] = None,
    alignment: Annotated[Path | None, typer.Option(help="H&E alignment CSV of a Xenium bundle")] = None,
    invert_alignment: Annotated[bool, typer.Option(help="the alignment maps Xenium px -> H&E px")] = False,
    strict: Annotated[bool, typer.Option(help="fail on bad cells instead of dropping them")] = False,
    fmt: Annotated[str, typer.Option("--format", help="auto, table, xenium, geojson (QuPath), cellvit (cells.json or CellViT GeoJSON) or labels (label image)")] = "auto",
    labels_from: Annotated[str, typer.Option(help="segmenter outputs: none, or classification (QuPath class / CellViT type) as the label")] = "none",
    object_types: Annotated[str, typer.Option(help="GeoJSON: QuPath object types to read, comma-separated (detection, cell, annotation, tile)")] = "detection,cell",
    scale: Annotated[float, typer.Option(help="segmenter outputs: slide px per source px (e.g. 4 for labels made at a 4x downsample)")] = 1.0,
    offset_px: Annotated[str, typer.Option(help="segmenter outputs: X,Y subtracted after --scale (the slide's corner in a parent image)")] = "0,0",
) -> None:
    """Normalise cell centroids from a table, Xenium bundle(s) or a segmenter's output into one cells.parquet."""
    from embedstore.errors import CellsError
    from embedstore.io.cells import CellReport
    from embedstore.io.ingest import ingest_table, ingest_xenium
    from embedstore.io.segmenters import FORMATS, detect_format, ingest_detections

    on_bad = "error" if strict else "drop"
    if fmt not in FORMATS:
        raise CellsError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    kind = detect_format(source) if fmt == "auto" else fmt
    if kind in ("geojson", "json", "cellvit", "labels"):
        frame, report = ingest_detections(
            source, slides=slides, mpp=mpp, slide_id=slide_id, tissue=tissue,
            fmt="auto" if kind == "json" else kind, labels_from=labels_from,
            object_types=object_types.split(","), scale=scale, offset_px=_offset_px(offset_px),
            on_bad=on_bad,
        )  # fmt: skip
    elif kind == "xenium" or source.is_dir():
        if not source.is_dir():
            raise CellsError(f"{source}: a Xenium bundle is a directory (with experiment.xenium)")
        bundles = [source] if _is_bundle(source) else sorted(p for p in source.iterdir() if _is_bundle(p))
        if not bundles:
            lacks = " (it has no experiment.xenium: copy it from the original Xenium output)" if any(
                (source / n).exists() for n in ("cells.parquet", "cells.csv.gz", "cells.csv")) else ""  # fmt: skip
            raise CellsError(f"{source}: neither a Xenium bundle nor a directory of bundles{lacks}")
        one_bundle = {"--slide": slide, "--slide-id": slide_id, "--alignment": alignment}
        given = [opt for opt, v in one_bundle.items() if v is not None]
        if given and len(bundles) > 1:
            raise CellsError(f"{', '.join(given)} belong(s) to one bundle, and {source} holds {len(bundles)}: "
                             "give one bundle with it")  # fmt: skip
        frames, report = [], CellReport()
        for bundle in bundles:
            frame, rep = ingest_xenium(
                bundle, slide=slide, mpp=mpp, tissue=tissue, slide_id=slide_id,
                alignment=alignment, invert_alignment=invert_alignment, on_bad=on_bad,
            )  # fmt: skip
            console.print(f"{bundle.name}: " + "; ".join(rep.lines()), highlight=False, markup=False)
            frames.append(frame.with_columns(_bundle=pl.lit(bundle.name)))
            report.merge(rep)
        frame = pl.concat(frames, how="diagonal_relaxed")
        shared = frame.group_by("slide_id", "cell_id").agg(pl.col("_bundle").n_unique().alias("n"), pl.col("_bundle").first())
        shared = shared.filter(pl.col("n") > 1)
        if shared.height:
            names = sorted(frame.join(shared.select("slide_id", "cell_id"), on=["slide_id", "cell_id"])["_bundle"].unique())
            raise CellsError(f"bundles {', '.join(names)} put {shared.height} cells with the same ids on slide "
                             f"{shared['slide_id'][0]!r} (two regions of one slide?): ids must differ per slide. "
                             "Ingest each bundle alone and make the ids distinct in a table (`embed cells TABLE`)")  # fmt: skip
        frame = frame.drop("_bundle")
    else:
        columns = {
            k: v
            for k, v in dict(
                x=x_col, y=y_col, cell_id=cell_id_col, slide_id=slide_col, tissue=tissue_col,
                label=label_col,
            ).items()
            if v is not None
        }  # fmt: skip
        frame, report = ingest_table(
            source, slides=slides, mpp=mpp, unit=unit, columns=columns, slide_id=slide_id,
            tissue=tissue, on_bad=on_bad,
        )  # fmt: skip
    for line in report.lines():
        console.print(line, highlight=False, markup=False)
    from embedstore.fileio import atomic_path

    with atomic_path(out) as tmp:
        frame.write_parquet(tmp)
    n_slides = frame["slide_id"].n_unique()
    console.print(f"wrote {frame.height} cells of {n_slides} slide(s) to {out}")


@app.command()
def backbones(
    pattern: Annotated[str, typer.Argument(help="name pattern, e.g. 'test-*'")] = "*",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """List the backbone registry: name, dims, input size, pooling, weights found."""
    from rich.table import Table

    from embedstore.extract.backbones import get_spec, list_backbones, weights_status

    rows = []
    for name in list_backbones(pattern):
        spec = get_spec(name)
        rows.append({
            "name": name, "dim": spec.dim, "input_px": spec.input_px, "poolings": list(spec.poolings),
            "n_params": spec.n_params, "weights": weights_status(name), "is_test": spec.is_test,
            "description": spec.description,
        })  # fmt: skip
    if as_json:
        emit_json(rows)
        return
    table = Table("name", "dim", "input px", "pooling", "params", "weights")
    table.columns[0].no_wrap = table.columns[4].no_wrap = True
    for r in rows:
        table.add_row(r["name"], str(r["dim"]), str(r["input_px"]), "/".join(r["poolings"]),
                      f"{r['n_params']:,}" if r["n_params"] else "-", r["weights"])  # fmt: skip
    emit(table)
    console.print("test-* entries are tiny random ViTs for tests and the offline demo, not pathology models.")


@app.command()
def extract(
    slides: Annotated[list[Path], typer.Argument(help="slide files or a directory of slides")],
    cells: Annotated[Path, typer.Option(help="normalised cells table (from `embed cells`/`embed synth`)")],
    db: Annotated[str, typer.Option(help="LanceDB store: a directory (created if missing) or a URI (s3://, gs://, az://, file://)")],
    local_backbone: Annotated[str, typer.Option(help="backbone for the 224 px nucleus crop")] = "uni2-h",
    context_backbone: Annotated[str, typer.Option(help="backbone for the 256 µm context field")] = "dinov3-vitl16",
    local_weights: Annotated[str | None, typer.Option(help="weights file/dir (or hub name) for the local backbone")] = None,
    context_weights: Annotated[str | None, typer.Option(help="weights file/dir (or hub name) for the context backbone")] = None,
    context_pooling: Annotated[str | None, typer.Option(help="cls or mean (context backbone)")] = None,
    context_px: Annotated[int, typer.Option(help="context field resized to this many px for the encoder")] = 512,
    context: Annotated[str, typer.Option(help="exact: one context field per cell (the paper's); tiled: the context encoder runs once per overlapping tile, each cell's vector is the mean of the patch tokens in its 256 µm window (much faster on dense tissue)")] = "exact",
    tile_px: Annotated[int, typer.Option(help="tiled context: tile side in context-scale px (256 µm / --context-px per px)")] = 1024,
    tile_overlap_px: Annotated[int, typer.Option(help="tiled context: overlap of neighbouring tiles; each keeps the tokens of its centre")] = 256,
    table: Annotated[str, typer.Option(help="table for these vectors (a new name for another config)")] = "cells",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    batch_size: Annotated[int, typer.Option(help="crops per model call")] = 64,
    workers: Annotated[int, typer.Option(help="parallel region readers")] = 2,
    readers: Annotated[str, typer.Option(help="threads, or processes (reads, colour conversion and padding off the main process: for many cores feeding a fast GPU)")] = "threads",
    mpp: Annotated[float | None, typer.Option(help="µm per level-0 pixel for all slides (overrides metadata)")] = None,
    commit_every: Annotated[int, typer.Option(help="cells per store commit")] = 4096,
    precision: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16: part of the vectors' identity")] = "auto",
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    engine: Annotated[str, typer.Option(help="local (this process), or ray: one slide (or --shard-cells band) per task on --ray-workers Ray actors (needs the optional ray extra)")] = "local",
    address: Annotated[str | None, typer.Option(help="--engine ray: join this cluster (auto, ray://host:10001); default: start Ray on this machine")] = None,
    ray_workers: Annotated[int, typer.Option(help="--engine ray: Ray actors, each with its own backbones (--workers stays the reader threads of each)")] = 2,
    gpus_per_worker: Annotated[float, typer.Option(help="--engine ray: GPUs per Ray actor (0 on CPU)")] = 0,
    shard_cells: Annotated[int, typer.Option(help="--engine ray: a slide with more cells is split into horizontal bands of at most this many, one task each")] = 200_000,
) -> None:
    """Embed every cell's nucleus crop and context field into the store (resumable)."""
    from embedstore.extract.pipeline import ExtractConfig
    from embedstore.extract.pipeline import extract as run_extract

    if engine not in ("local", "ray"):
        from embedstore.errors import UserError

        raise UserError(f"--engine must be local or ray, not {engine!r}")

    cfg = ExtractConfig(
        local_backbone=local_backbone, context_backbone=context_backbone,
        local_weights=local_weights, context_weights=context_weights,
        context_pooling=context_pooling, context_input_px=context_px, device=device,
        batch_size=batch_size, workers=workers, table=table, mpp=mpp, commit_every=commit_every,
        precision=precision, readers=readers, context=context, tile_px=tile_px, tile_overlap_px=tile_overlap_px,
    )  # fmt: skip
    with ExtractProgress(quiet) as events:
        if engine == "ray":
            from embedstore.extract.distributed import extract_ray

            summary = extract_ray(slides, cells, db, cfg, address=address, workers=ray_workers,
                                  gpus_per_worker=gpus_per_worker, shard_cells=shard_cells, on_event=events)  # fmt: skip
        else:
            summary = run_extract(slides, cells, db, cfg, on_event=events)
    rate = f", {summary['cells_per_s']:.1f} cells/s" if summary["written"] else ""  # a rerun with nothing to do
    console.print(
        f"stored {summary['written']} new cells ({summary['already_stored']} already there) in "
        f"{summary['seconds']:.1f} s{rate}; run {summary['run_id']}"
    )
    if engine == "ray":
        console.print(f"on {len(summary['workers'])} Ray workers: {summary['tasks']} tasks, {len(summary['run_ids'])} runs (one per task)")


class ExtractProgress:
    """Per-slide and overall progress bars with cells/s, fed by extraction events."""

    def __init__(self, quiet: bool):
        self.bar = progress(quiet)
        self.quiet = quiet
        self.total = self.current = None
        self.t0 = self.slide_t0 = 0.0
        self.done = self.slide_done = 0

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def __call__(self, kind: str, data: dict) -> None:
        import time

        now = time.perf_counter()
        if kind == "start":
            self.t0 = now
            self.total = self.bar.add_task("all slides", total=data["cells"], rate="")
        elif kind == "slide":
            if self.current is not None:
                self.bar.remove_task(self.current)
            self.current = self.bar.add_task(data["slide_id"], total=data["total"], rate="")
            self.bar.update(self.current, completed=data["total"] - data["todo"])
            self.bar.update(self.total, advance=data["total"] - data["todo"])
            self.slide_t0, self.slide_done = now, 0
        elif kind == "progress":
            self.done += data["n"]
            self.slide_done += data["n"]
            self.bar.update(self.current, advance=data["n"], rate=f"{self.slide_done / max(now - self.slide_t0, 1e-9):.1f} cells/s")
            self.bar.update(self.total, advance=data["n"], rate=f"{self.done / max(now - self.t0, 1e-9):.1f} cells/s")
        elif kind in ("slide_failed", "warning"):
            msg = data.get("reason") or data.get("message")
            style = "red" if kind == "slide_failed" else "yellow"
            self.bar.console.print(f"[{style}]{escape(data['slide_id'])}:[/] {escape(msg)}", highlight=False)


@app.command()
def info(
    db: Annotated[str, typer.Argument(help="LanceDB store: a directory or a URI")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Summarise a store: tables, slides, cells, runs, vector dims, size on disk."""

    from rich.table import Table

    from embedstore.store import Store

    info = Store(db).info()
    if as_json:
        emit_json(info)
        return
    size = info["bytes_on_disk"]
    emit(f"{info['uri']}  {size / 1e6:.1f} MB on disk" if size else info["uri"])
    for name, t in info["tables"].items():
        vecs = ", ".join(f"{k} {v}-d" for k, v in t["vectors"].items())
        per_cell = f", store {size / t['cells'] / 1e3:.2f} KB/cell" if size and t['cells'] else ""
        emit(f"table {name}: {t['cells']} cells, {len(t['slides'])} slides, {vecs}, version {t['version']}{per_cell}")
        if t["duplicate_rows"]:
            console.print(f"[yellow]warning:[/] {t['duplicate_rows']} rows repeat a stored cell (from unlocked "
                          f"concurrent writers); `embed extract` with the same --db removes them")  # fmt: skip
        for kind, v in t["config"].get("vectors", {}).items():
            emit(f"  {kind}: {v.get('backbone')} ({v.get('pooling')}, {v.get('input_px')} px input, field {v.get('field_um')} µm), weights sha256 {str(v.get('weights_sha256'))[:12]}")
        slides_t = Table("slide", "cells")
        for sid, n in t["slides"].items():
            slides_t.add_row(sid, str(n))
        emit(slides_t)
    if info["labels"] is not None:
        lab = info["labels"]
        emit(f"labels: {lab['labelled']} labelled cells of {lab['rows']} rows, {lab['classes']} classes "
             f"(from {', '.join(lab['sources'])})")
    runs = Table("run", "table", "status", "started", "written", "failed slides")
    for r in info["runs"]:
        counts = r.get("counts") or {}
        runs.add_row(r["run_id"], r.get("table") or "", r.get("status") or "", (r.get("started") or "")[:19],
                     str(counts.get("written", "")), str(counts.get("slides_failed", "")))  # fmt: skip
    emit(runs)


@app.command()
def doctor(
    slides: Annotated[list[Path] | None, typer.Argument(help="slide files or folders to check (optional)")] = None,
    local_backbone: Annotated[str, typer.Option(help="backbone for the nucleus crop")] = "uni2-h",
    context_backbone: Annotated[str, typer.Option(help="backbone for the context field")] = "dinov3-vitl16",
    context_px: Annotated[int, typer.Option(help="context input size, as for extract")] = 512,
    mpp: Annotated[float | None, typer.Option(help="µm per level-0 pixel for all slides, as for extract")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda ...")] = "auto",
    db: Annotated[str | None, typer.Option(help="the store `embed extract --db` will write to: free disk space, and whether its table takes vectors made with these options (read only)")] = None,
    table: Annotated[str, typer.Option(help="table for these vectors, as for extract (with --db)")] = "cells",
    precision: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16, as for extract (compared with the --db table)")] = "auto",
    context: Annotated[str, typer.Option(help="exact or tiled, as for extract (compared with the --db table; the timing measures exact)")] = "exact",
    context_pooling: Annotated[str | None, typer.Option(help="cls or mean, as for extract (compared with the --db table)")] = None,
    tile_px: Annotated[int, typer.Option(help="tiled context: tile side, as for extract (compared with the --db table)")] = 1024,
    tile_overlap_px: Annotated[int, typer.Option(help="tiled context: tile overlap, as for extract (compared with the --db table)")] = 256,
    timing: Annotated[bool | None, typer.Option("--timing/--no-timing", help="time both backbones on random crops (a minute and more for real ones on a CPU); default: unless something blocks the run", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Preflight: versions, GPU, weights, slides (µm/px), the store's table, expected time per 10k cells.

    Exits 1 when something would stop `embed extract` (missing weights, a slide that does not
    open or has no µm/px, a missing package, a --db table holding vectors made with other
    backbones, context size, device or precision).
    """
    from rich.table import Table
    from rich.text import Text

    from embedstore.doctor import blocking, run_checks

    with console.status("checking...") as status:
        checks = run_checks(
            slides or (), local_backbone=local_backbone, context_backbone=context_backbone,
            context_px=context_px, mpp=mpp, device=device, db=db, table=table, precision=precision,
            context=context, context_pooling=context_pooling, tile_px=tile_px, tile_overlap_px=tile_overlap_px,
            timing=timing, notify=lambda m: status.update(f"checking {m}..."),
        )  # fmt: skip
    bad = blocking(checks)
    if as_json:
        emit_json({"ok": not bad, "checks": [c.to_dict() for c in checks]})
    else:
        style = {"ok": "green", "warn": "yellow", "fail": "bold red"}
        t = Table("", "check", "status", "found", title="embed doctor")
        for c in checks:
            detail = Text(c.detail)
            if c.fix and c.status != "ok":
                detail.append(f"\nfix: {c.fix}", style="dim")
            t.add_row(c.group, c.name, Text(c.status, style=style[c.status]), detail)
        emit(t)
    if bad:
        console.print(f"[bold red]{len(bad)} problem(s) block a run:[/] {escape(', '.join(c.name for c in bad))}")
        raise typer.Exit(1)
    console.print("[green]ready[/]: nothing blocks `embed extract`")


@app.command()
def labels(
    source: Annotated[Path | None, typer.Argument(help="table with cell ids and label, confidence and/or split columns (CSV/Parquet; QuPath measurement tables too)")] = None,
    db: Annotated[str | None, typer.Option(help="LanceDB store: a directory or a URI")] = None,
    table: Annotated[str, typer.Option(help="vector table the labels refer to")] = "cells",
    merge: Annotated[bool, typer.Option(help="merge into the stored labels instead of replacing them")] = False,
    restore: Annotated[int | None, typer.Option(help="make this earlier version of the labels current (no SOURCE)")] = None,
    slide_id: Annotated[str | None, typer.Option(help="slide of every row, for per-slide files (e.g. 10x clusters.csv)")] = None,
    slide_col: Annotated[str | None, typer.Option(help="slide id column (default: slide_id, slide, sample, image; QuPath: Image)")] = None,
    cell_id_col: Annotated[str | None, typer.Option(help="cell id column (default: cell_id, id, cell, object_id; QuPath: Object ID; 10x: Barcode)")] = None,
    label_col: Annotated[str | None, typer.Option(help="label column (default: label, cell_type, class; QuPath: Classification; 10x: Cluster)")] = None,
    confidence_col: Annotated[str | None, typer.Option(help="label confidence column, in [0, 1] (default: label_confidence, confidence)")] = None,
    split_col: Annotated[str | None, typer.Option(help="split column (train/val/test), if any (default: split)")] = None,
) -> None:
    """Attach or replace labels and splits for stored cells (no re-extraction).

    Works for any table and for Xenium-derived per-slide files, e.g. 10x's
    analysis/clustering/gene_expression_graphclust/clusters.csv with
    --slide-id S --cell-id-col Barcode --label-col Cluster.
    """
    from embedstore.errors import UserError
    from embedstore.io.labels import read_labels
    from embedstore.store import Store

    if db is None:
        raise UserError("give the store with --db DB")
    if (source is None) == (restore is None):
        raise UserError("give either a label table (SOURCE) or --restore VERSION")
    if restore is not None:
        n = Store(db).restore_labels(restore)
        console.print(f"labels restored to version {restore}: {n} label rows are current")
        return
    columns = {"slide_id": slide_col, "cell_id": cell_id_col, "label": label_col, "label_confidence": confidence_col, "split": split_col}
    frame = read_labels(source, slide_id=slide_id, columns=columns)
    counts = Store(db).set_labels(frame, source=str(source), table=table, replace=not merge)
    console.print(f"{'merged' if merge else 'set'} labels of {counts['matched']} stored cells")
    if counts["unknown"]:
        console.print(f"{counts['unknown']} label rows match no stored cell and were ignored, e.g. "
                      f"{counts['unknown_examples']}", markup=False)  # fmt: skip
    lost = counts["lost"]
    if any(lost.values()):
        undo = f"`embed labels --db {db} --restore {counts['previous_version']}` undoes this"
        if merge:
            said = {"label": "cells unlabelled by blank or NA labels", "split": "cells lose their split to blank or NA splits",
                    "label_confidence": "cells' label confidence cleared (a label given without one is a hand label: full trust)"}  # fmt: skip
            console.print("; ".join(f"{n} {said[c]}" for c, n in lost.items() if n) + f"; {undo}", markup=False)
        else:
            said = {"label": "label", "split": "split", "label_confidence": "label confidence"}
            lines = "; ".join(f"{n} cells lose their {said[c]}" for c, n in lost.items() if n)
            console.print(f"[yellow]warning:[/] {escape(lines)}; --merge keeps them, {escape(undo)}")


@app.command()
def annotate(
    bundles: Annotated[list[Path], typer.Argument(help="Xenium output bundle(s), or a folder of bundles")],
    markers: Annotated[Path, typer.Option(help="marker panel CSV: class,gene (one row per marker)")],
    out: Annotated[Path, typer.Option(help="labels Parquet (report folder beside it: OUT_report/)")],
    db: Annotated[str | None, typer.Option(help="also put the labels into this store (a named label set)")] = None,
    name: Annotated[str, typer.Option(help="name of the label set in the store")] = "xenium-markers",
    table: Annotated[str, typer.Option(help="vector table the labels refer to (with --db)")] = "cells",
    clusters: Annotated[Path | None, typer.Option(help="CSV cluster,class naming clusters by hand (after reading the report)")] = None,
    synonyms: Annotated[Path | None, typer.Option(help="JSON {raw name: class} or CSV raw,class mapping names to final classes")] = None,
    slide: Annotated[Path | None, typer.Option(help="the H&E slide of the bundle (default: its *he_image* file)")] = None,
    alignment: Annotated[Path | None, typer.Option(help="H&E alignment CSV of the bundle (default: its *he_imagealignment.csv)")] = None,
    invert_alignment: Annotated[bool, typer.Option(help="the alignment maps Xenium px -> H&E px")] = False,
    mpp: Annotated[float | None, typer.Option(help="µm per level-0 pixel of the H&E, overrides the slide's")] = None,
    slide_id: Annotated[str | None, typer.Option(help="slide id of the labels (default: the H&E file's name, as `embed cells` names it)")] = None,
    positions: Annotated[bool, typer.Option(help="place the cells on the H&E (x/y); --no-positions labels them without (slide id: --slide-id or the folder name)")] = True,
    min_counts: Annotated[int, typer.Option(help="gene counts a cell needs to be labelled")] = 10,
    resolution: Annotated[float, typer.Option(help="Leiden resolution")] = 0.6,
    min_confidence: Annotated[float, typer.Option(help="cells below this confidence get kept=false")] = 0.6,
    seed: Annotated[int, typer.Option(help="random seed (PCA, neighbours, Leiden, UMAP)")] = 0,
    report: Annotated[bool, typer.Option(help="write the report (figures + report.md)")] = True,
) -> None:
    """Label cells from Xenium expression with a marker panel (the paper's recipe, via scanpy)."""
    from embedstore.annotate.recipe import AnnotateConfig, Placement, read_panel
    from embedstore.annotate.recipe import annotate as run_annotate
    from embedstore.fileio import atomic_path, ensure_dir

    cfg = AnnotateConfig(min_counts=min_counts, resolution=resolution, min_confidence=min_confidence, seed=seed)
    place = Placement(slide=slide, alignment=alignment, slide_id=slide_id, mpp=mpp,
                      invert_alignment=invert_alignment, positions=positions)  # fmt: skip
    ensure_dir(out.parent, "the labels output")
    frame, results = run_annotate(bundles, markers, cfg, clusters=clusters, synonyms=synonyms, place=place,
                                  log=lambda m: console.print(m, markup=False, highlight=False))  # fmt: skip
    with atomic_path(out) as tmp:
        frame.write_parquet(tmp)
    console.print(f"{frame.height} cells, {frame['label'].is_not_null().sum()} labelled, "
                  f"{int(frame['kept'].sum())} kept -> {out}")  # fmt: skip
    if report:
        from embedstore.annotate.report import write_report

        md = write_report(frame, results, read_panel(markers), out.with_name(out.stem + "_report"), cfg)
        console.print(f"report -> {md}")
    if db is not None:
        from embedstore.store import Store

        # merged by key: the annotated bundles' cells get their new labels, other slides keep theirs
        counts = Store(db).set_labels(frame.select("slide_id", "cell_id", "label", "label_confidence"),
                                      source=f"annotate:{name}", table=table, replace=False)  # fmt: skip
        console.print(f"label set {name!r}: labels of {counts['matched']} stored cells (kept = confidence >= "
                      f"{min_confidence:g}; `heads train` uses only those by default)")  # fmt: skip
        if counts["lost"]["label"]:
            console.print(f"[yellow]warning:[/] {counts['lost']['label']} stored cells lost their label (cells this "
                          f"recipe leaves unlabelled); `embed labels --db {escape(db)} --restore "
                          f"{counts['previous_version']}` undoes this")  # fmt: skip
        if counts["unknown"]:
            console.print(f"{counts['unknown']} labelled cells are not in the store (not extracted yet?), e.g. "
                          f"{counts['unknown_examples']}", markup=False)  # fmt: skip


def _search_progress(label: str):
    """A progress bar fed by (done, total) callbacks."""
    bar = progress()
    state = {}

    def update(done: int, total: int) -> None:
        if "task" not in state:
            bar.start()
            state["task"] = bar.add_task(label, total=total, rate="")
        bar.update(state["task"], completed=done, total=total)
        if done >= total:
            bar.stop()

    return update


@app.command()
def index(
    db: Annotated[str, typer.Option(help="LanceDB store: a directory or a URI")],
    vector: Annotated[str, typer.Option(help="local, context or both")] = "local",
    table: Annotated[str, typer.Option(help="vector table")] = "cells",
    kind: Annotated[str, typer.Option(help="auto (by size), flat (exact) or ivf")] = "auto",
    index_dir: Annotated[Path | None, typer.Option(help="where indexes live (default DB/_faiss)")] = None,
    engine: Annotated[str, typer.Option(help="local (this process, rows read from the store batch by batch: bounded memory), or ray: row shards added on --ray-workers Ray workers, merged in row order (needs the optional ray extra)")] = "local",
    address: Annotated[str | None, typer.Option(help="--engine ray: join this cluster (auto, ray://host:10001); default: start Ray on this machine")] = None,
    ray_workers: Annotated[int, typer.Option(help="--engine ray: shards indexed at a time, one Ray task (one CPU) each")] = 2,
) -> None:
    """Build the FAISS index of a vector next to the store (exact or IVF, tuned by size)."""
    import time

    from embedstore.search.explore import index_dir as where

    if engine not in ("local", "ray"):
        from embedstore.errors import UserError

        raise UserError(f"--engine must be local or ray, not {engine!r}")
    t = time.perf_counter()
    bar = _search_progress(f"indexing {vector}")
    if engine == "ray":
        from embedstore.search.distributed import build_index_ray

        idx, meta = build_index_ray(db, table=table, vector=vector, kind=kind, root=index_dir,
                                    address=address, workers=ray_workers, progress=bar)  # fmt: skip
    else:
        from embedstore.search.distributed import build_index_local

        idx, meta = build_index_local(db, table=table, vector=vector, kind=kind, root=index_dir, progress=bar,
                                      notify=lambda m: console.print(m, markup=False))  # fmt: skip
    console.print(
        f"{idx.kind} index of {idx.ntotal} {vector} vectors ({idx.dim}-d, {idx.metric}) "
        f"in {time.perf_counter() - t:.1f} s -> {where(db, table, vector, index_dir)}; "
        f"search params {idx.search_params}"
    )


@app.command()
def similar(
    db: Annotated[str, typer.Option(help="LanceDB store: a directory or a URI")],
    cell: Annotated[str, typer.Option(help="the query cell as SLIDE:CELL_ID")],
    k: Annotated[int, typer.Option("-k", help="number of neighbours")] = 20,
    vector: Annotated[str, typer.Option(help="local, context or both")] = "local",
    table: Annotated[str, typer.Option(help="vector table")] = "cells",
    exclude_same_slide: Annotated[bool, typer.Option(help="only neighbours from other slides")] = False,
    tissue: Annotated[list[str] | None, typer.Option(help="only neighbours of these tissues")] = None,
    split: Annotated[list[str] | None, typer.Option(help="only neighbours in these splits")] = None,
    out: Annotated[Path | None, typer.Option(help="write the table as Parquet")] = None,
    gallery: Annotated[Path | None, typer.Option(help="draw query + neighbour crops to this PNG")] = None,
    slides: Annotated[Path | None, typer.Option(help="slide folder for --gallery (default: as extracted)")] = None,
    index_dir: Annotated[Path | None, typer.Option(help="where indexes live (default DB/_faiss)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the neighbours as JSON")] = False,
) -> None:
    """Cells like this one: nearest neighbours of a cell across all slides, with filters.

    distance = 1 - cosine similarity of the vectors (--vector both: 1 - the mean of the two
    cosines); 0 is the query itself.
    """
    from rich.table import Table

    from embedstore.errors import UserError
    from embedstore.search import explore

    for opt, path in (("--out", out), ("--gallery", gallery)):  # refused before the search
        if path is not None and path.is_dir():
            raise UserError(f"{opt} {path} is a folder; give the path of a {'.parquet' if opt == '--out' else '.png'} file")
    found = explore.similar(
        db, cell, k, table=table, vector=vector, exclude_same_slide=exclude_same_slide,
        tissues=tissue, splits=split, root=index_dir, notify=lambda m: console.print(m, markup=False),
    )  # fmt: skip
    if found.height - 1 < k:
        console.print(f"{found.height - 1} neighbours of the {k} asked for: only so many cells pass the filters", markup=False)
    if as_json:
        emit_json(found.to_dicts())
    else:
        t = Table("rank", "slide", "cell", "x µm", "y µm", "label", "distance", title=f"cells like {cell} ({vector})")
        for r in found.iter_rows(named=True):
            t.add_row(str(r["rank"]), r["slide_id"], r["cell_id"], f"{r['x_um']:.1f}", f"{r['y_um']:.1f}",
                      str(r.get("label") or "-"), f"{r['distance']:.3g}")  # fmt: skip
        emit(t)
    if out:
        from embedstore.fileio import atomic_path

        with atomic_path(out) as tmp:
            found.write_parquet(tmp)
        console.print(f"wrote {out}")
    if gallery:
        console.print(f"gallery: {explore.gallery(db, found, gallery, slides=slides)}")


@app.command()
def audit(
    db: Annotated[str, typer.Option(help="LanceDB store: a directory or a URI")],
    out: Annotated[Path, typer.Option(help="review queue (.parquet; .csv, GeoJSON and plots beside it)")],
    k: Annotated[int, typer.Option("-k", help="neighbours per cell")] = 20,
    vector: Annotated[str, typer.Option(help="local, context or both")] = "local",
    table: Annotated[str, typer.Option(help="vector table")] = "cells",
    other_slides_only: Annotated[bool, typer.Option(help="vote only with neighbours from other slides")] = False,
    exclude_near_um: Annotated[float | None, typer.Option(help="same-slide neighbours closer than this (µm) do not vote; default 128 (the context radius) for context vectors, 0 for local")] = None,
    min_share: Annotated[float, typer.Option(help="flag when this share of voters agree on another class")] = 0.75,
    min_label_confidence: Annotated[float, typer.Option(help="labels with a lower label_confidence neither vote nor are audited (as `heads train`; 0: all)")] = 0.6,
    index_dir: Annotated[Path | None, typer.Option(help="where indexes live (default DB/_faiss)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the per-class summary as JSON")] = False,
) -> None:
    """Flag cells whose label disagrees with their neighbours'; write a review queue."""
    from rich.table import Table

    from embedstore.errors import UserError
    from embedstore.fileio import atomic_path
    from embedstore.io.geojson import write_geojson
    from embedstore.search import explore

    if out.suffix.lower() != ".parquet":
        raise UserError(f"--out {out}: the review queue is a .parquet file (the .csv, GeoJSON and plot go beside it)")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the path of the review queue's .parquet file")
    queue, summary = explore.audit(
        db, k=k, table=table, vector=vector, other_slides_only=other_slides_only, exclude_near_um=exclude_near_um, root=index_dir,
        progress=_search_progress("auditing"), notify=lambda m: console.print(m, markup=False), min_share=min_share,
        min_label_confidence=min_label_confidence,
    )  # fmt: skip
    stem = out.with_suffix("")  # "q.k20.parquet" -> q.k20.csv, q.k20_geojson/, q.k20_batch_effect.png
    with atomic_path(out) as tmp:
        queue.write_parquet(tmp)
    with atomic_path(out.with_suffix(".csv")) as tmp:
        queue.write_csv(tmp)
    flagged = queue.filter(pl.col("flagged"))
    geojson = Path(f"{stem}_geojson")
    for old in geojson.glob("*.geojson"):  # an earlier audit's flags must not pass for this one's
        old.unlink()
    if flagged.height:
        write_geojson(
            flagged, geojson, class_col="label", classes=sorted(queue["label"].drop_nulls().unique().to_list()),
            measurements={"suspicion": "suspicion", "agreement": "agreement", "suggested_share": "suggested share"},
            metadata=("slide_id", "cell_id", "label", "suggested", "tissue"),
        )  # fmt: skip
    rates = explore.batch_effect(db, f"{stem}_batch_effect.png", k=k, table=table, vector=vector, root=index_dir)
    ratio = rates["ratio"].median()
    shown = f"{ratio:.2f}x chance" if ratio is not None else "not measurable (too few cells per slide)"
    plot = f" -> {stem}_batch_effect.png" if rates.height else ""  # no plot of a one-cell table
    if as_json:
        emit_json({"classes": summary.to_dicts(), "flagged": flagged.height, "labelled": queue.height,
                   "same_slide_ratio_median": ratio, "queue": str(out)})  # fmt: skip
    else:
        t = Table("class", "labelled", "flagged", "share", "most suggested", title=f"label audit ({vector}, k={k})")
        for r in summary.iter_rows(named=True):
            t.add_row(r["class"], str(r["n_labelled"]), str(r["n_flagged"]), f"{r['flagged_share']:.3f}", str(r["most_suggested"] or "-"))
        emit(t)
    console.print(
        f"{flagged.height} of {queue.height} labelled cells flagged; queue -> {out} (+ .csv"
        f"{', ' + str(geojson) + '/' if flagged.height else ''}); same-slide neighbours "
        f"{shown} (median over slides){plot}", markup=False, highlight=False,
    )


@app.command()
def export(
    db: Annotated[str, typer.Option(help="LanceDB store: a directory or a URI")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output: .h5ad (AnnData), .zarr (SpatialData) or .csv")],
    format: Annotated[str | None, typer.Option("--format", help="anndata, spatialdata or csv (default: from the suffix of --out)")] = None,
    table: Annotated[str, typer.Option(help="vector table")] = "cells",
    run: Annotated[str | None, typer.Option(help="heads run whose predictions to add (default: the run of --run-dir, else the only one stored)")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="that run's directory: class names from its checkpoint")] = None,
    slide: Annotated[list[str] | None, typer.Option("--slide", help="only this slide (repeatable)")] = None,
    vectors: Annotated[str, typer.Option(help="vector kinds, comma-separated")] = "local,context",
    with_vectors: Annotated[bool, typer.Option(help="CSV: add one column per vector dimension")] = False,
) -> None:
    """Export cells, vectors, labels and predictions to AnnData, SpatialData or CSV."""
    from embedstore.io.export import export as export_cells

    kinds = [v.strip() for v in vectors.split(",") if v.strip()]
    s = export_cells(db, out, fmt=format, table=table, run=run, run_dir=run_dir, slides=slide,
                     vectors=kinds, with_vectors=with_vectors)  # fmt: skip
    pred = f", predictions of run {s['run']} for {s['predicted']}" if s["run"] else ""
    console.print(f"{s['cells']} cells of {s['slides']} slide(s) -> {s['path']} ({s['format']}; "
                  f"vectors: {', '.join(s['vectors']) or 'none'}{pred})", markup=False, highlight=False)  # fmt: skip


main = run(app)

if __name__ == "__main__":
    main()
