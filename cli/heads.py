"""`heads`: train, evaluate and apply the NuClass heads on cached vectors (thin typer layer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from cli.common import console, emit, emit_json, run

app = typer.Typer(
    help="NuClass heads on cached vectors: train (local|global|gate), eval, predict, report, explain.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _log(msg: str) -> None:
    console.print(escape(msg), highlight=False)  # "[local] ..." is text, not markup


def _read_synonyms(path: Path | None) -> dict[str, str | None] | None:
    """--synonyms: a JSON object {raw label: training class, or null to drop the label}."""
    from embedstore.errors import UserError

    if path is None:
        return None
    try:
        syn = json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise UserError(f"--synonyms {path} cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise UserError(f"--synonyms {path} is not valid JSON ({exc})") from None
    if not isinstance(syn, dict) or not all(v is None or isinstance(v, str) for v in syn.values()):
        raise UserError(f'--synonyms {path} must be a JSON object {{"raw label": "training class" or null}}')
    return syn


@app.command()
def train(
    ctx: typer.Context,
    db: Annotated[str, typer.Option(help="LanceDB store (directory or URI) with the cached vectors")],
    out: Annotated[Path, typer.Option("--out", help="run directory (checkpoints, split, metrics)")],
    stage: Annotated[str, typer.Option(help="local, global, gate or all")] = "all",
    table: Annotated[str, typer.Option(help="vector table")] = "cells",
    labels: Annotated[Path | None, typer.Option(help="label table (slide_id, cell_id, label[, split]); default: the store's")] = None,
    holdout: Annotated[list[str] | None, typer.Option(help="slide or tissue kept out of training as the test part (repeatable)")] = None,
    val_fraction: Annotated[float, typer.Option(help="share of each slide's cells in its val stripe")] = 0.2,
    test_fraction: Annotated[float, typer.Option(help="share of each slide's cells in its test stripe (0 with --holdout)")] = 0.2,
    guard_um: Annotated[float, typer.Option(help="guard band between parts, µm (default: the context radius)")] = 128.0,
    stage3_heads: Annotated[str, typer.Option(help="stage 3: frozen (gate only, as the authors' code) or joint (gate + both heads, as the paper describes: docs/method.md)")] = "frozen",
    alpha_schedule: Annotated[str, typer.Option(help="stage-2 context ramp: step (per optimiser step) or epoch (the authors')")] = "step",
    film: Annotated[bool, typer.Option("--film/--concat", help="FiLM tissue conditioning, or the paper's Concat ablation")] = True,
    epochs: Annotated[int, typer.Option(help="stage-1 epochs (max; early stopping on val macro-F1)")] = 4,
    global_epochs: Annotated[int, typer.Option(help="stage-2 epochs")] = 3,
    gate_epochs: Annotated[int, typer.Option(help="stage-3 epochs")] = 1,
    batch_size: Annotated[int, typer.Option(help="cells per step")] = 1024,
    patience: Annotated[int, typer.Option(help="epochs without improvement before stopping")] = 2,
    seed: Annotated[int, typer.Option(help="random seed of training, and of the split at --stage local or all (later stages keep that split)")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "cpu",
    scale: Annotated[bool, typer.Option(help="smaller batches, more epochs for small training sets (options typed here stay as given)")] = True,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (1 is faster on a busy machine)")] = None,
    min_label_confidence: Annotated[float, typer.Option(help="leave out labels with a lower label_confidence (embed annotate's kept cells: 0.6)")] = 0.6,
) -> None:
    """Train a stage (each loads the previous stage's checkpoint from the run directory)."""
    from heads.runs import SCALED_OPTIONS
    from heads.runs import train as run_train
    from heads.splits import SPLIT_OPTIONS, SplitConfig
    from heads.train import TrainConfig

    cfg = TrainConfig(
        epochs=epochs, global_epochs=global_epochs, gate_epochs=gate_epochs,
        batch_size=batch_size, patience=patience, seed=seed, device=device, film=film,
        stage3_heads=stage3_heads, alpha_schedule=alpha_schedule,
    )  # fmt: skip
    # the options typed on the command line: a later stage compares typed split options with its
    # saved split even at their default value (one not typed is the saved split's), and
    # small-set scaling leaves typed epochs, batch size and patience as given.
    # By name: typer may vendor its own click, whose ParameterSource is another enum
    typed = tuple(name for name in (*SPLIT_OPTIONS, "seed", *SCALED_OPTIONS)
                  if getattr(ctx.get_parameter_source(name), "name", None) not in ("DEFAULT", "DEFAULT_MAP"))  # fmt: skip
    split_cfg = SplitConfig(val_fraction=val_fraction, test_fraction=test_fraction, guard_um=guard_um, seed=seed)
    if threads:
        import torch

        torch.set_num_threads(threads)
    run_train(db, out, stage, cfg, table=table, holdout=tuple(holdout or ()), labels=labels, scale=scale,
              split_config=split_cfg, split_given=[n for n in typed if n not in SCALED_OPTIONS],
              train_given=[n for n in typed if n in SCALED_OPTIONS], min_label_confidence=min_label_confidence, log=_log)
    console.print(f"[green]trained[/] stage {stage} -> {out}")


@app.command("eval")
def eval_(
    run_dir: Annotated[Path, typer.Option("--run", help="run directory from `heads train`")],
    db: Annotated[str, typer.Option(help="LanceDB store, a directory or a URI (the training store, or a cohort's)")],
    table: Annotated[str, typer.Option(help="vector table")] = "cells",
    on: Annotated[str, typer.Option(help="part of the run's split to score: test, val (the cells that chose the model), train, all (not test: written to RUN/eval-ON)")] = "test",
    cohort: Annotated[str | None, typer.Option(help="name a held-out cohort: score every labelled cell of --db")] = None,
    synonyms: Annotated[Path | None, typer.Option(help="JSON {raw label: training class or null} for --cohort")] = None,
    labels: Annotated[Path | None, typer.Option(help="label table to use instead of the store's")] = None,
    baselines: Annotated[str, typer.Option(help="comma list of logreg,xgboost,knn, or none")] = "logreg,xgboost,knn",
    balanced: Annotated[bool, typer.Option(help="class-balanced baselines (as the heads' class-balanced loss)")] = True,
    temperature: Annotated[bool, typer.Option(help="report ECE after temperature scaling (fit on validation)")] = True,
    coverage: Annotated[float, typer.Option(help="conformal level: target share of cells whose set holds the true class")] = 0.9,
    min_label_confidence: Annotated[float, typer.Option(help="score only labels with at least this label_confidence")] = 0.6,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="print the results as JSON")] = False,
) -> None:
    """Accuracy, macro-F1, per-class F1, ECE, confusion matrices, reliability and baselines."""
    from heads.metrics import rich_results_table
    from heads.runs import evaluate_run

    syn = _read_synonyms(synonyms)
    which = () if baselines.strip().lower() in ("", "none") else tuple(b.strip() for b in baselines.split(","))
    result = evaluate_run(
        run_dir, db, table=table, on=on, cohort=cohort, synonyms=syn, baselines=which, balanced=balanced,
        temperature=temperature, conformal_level=coverage, labels=labels, device=device, log=_log,
        min_label_confidence=min_label_confidence,
    )  # fmt: skip
    if as_json:
        comp = result["complementarity"]
        emit_json({
            "on": result["on"], "selection": result["selection"], "out_dir": str(result["out_dir"]),
            "results": result["table"].to_dicts(), "conformal": result["conformal"],
            "complementarity": None if comp is None else comp.to_dicts(),
        })  # fmt: skip
        return
    from rich.text import Text

    title = Text(f"{run_dir} on {result['on']}")
    if result["selection"]:
        title.append(" (the cells that chose the model: optimistic)", style="bold red")
    emit(rich_results_table(result["table"], title=title))
    val = result["table"]["val_macro_f1"] if "val_macro_f1" in result["table"].columns else None
    if val is not None and val.cast(float).fill_nan(None).is_not_null().any():  # none in a cohort
        console.print("val F1: the same model on the validation cells that chose it; gap = val F1 - "
                      "macro-F1 (selection optimism plus any val/test difference)", highlight=False)  # fmt: skip
    if result["conformal"] is not None:
        from rich.table import Table

        conf = result["conformal"]
        t = Table("class", "n", "coverage", "size", "cc coverage", "cc size",
                  title=f"conformal sets ({conf['path']} path, APS) at {conf['level']:.0%}; cc: calibrated per class")
        m, cc = conf["marginal"], conf["class_conditional"]

        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        t.add_row("all", str(m["n"]), fmt(m["coverage"]), fmt(m["mean_size"]), fmt(cc["coverage"]), fmt(cc["mean_size"]), style="bold")
        for name, r in m["per_class"].items():
            r2 = cc["per_class"][name]
            t.add_row(name, str(r["n"]), fmt(r["coverage"]), fmt(r["mean_size"]), fmt(r2["coverage"]), fmt(r2["mean_size"]))
        emit(t)
        console.print(f"empty sets: {m['empty_share']:.1%} (marginal), {cc['empty_share']:.1%} (per-class)", highlight=False)
    if result["complementarity"] is not None:
        from rich.table import Table

        comp = Table("class", "support", "only local right", "only global right", title="complementarity")
        for r in result["complementarity"].iter_rows(named=True):
            share = [f"{r[k]:.3f}" if r[k] is not None else "-" for k in ("only_local", "only_global")]
            comp.add_row(r["class"], str(r["support"]), *share)  # "-": no cells of this class here
        emit(comp)
    console.print(f"metrics.json, confusion matrices, reliability.png in {result['out_dir']}")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Option("--run", help="run directory from `heads train` (evaluated and predicted)")],
    db: Annotated[str, typer.Option(help="LanceDB store (directory or URI) the run was predicted on")],
    out: Annotated[Path | None, typer.Option(help="HTML file (default RUN/report.html)")] = None,
    table: Annotated[str, typer.Option(help="vector table")] = "cells",
    slides: Annotated[Path | None, typer.Option(help="slide file or folder, when the recorded slide paths moved")] = None,
    index_dir: Annotated[Path | None, typer.Option(help="where FAISS indexes live (default DB/_faiss; for a URI store a temporary one)")] = None,
    cohort: Annotated[str | None, typer.Option(help="--db is the held-out cohort NAME of `heads eval --cohort` (page: RUN/cohort-NAME/report.html)")] = None,
    synonyms: Annotated[Path | None, typer.Option(help="JSON {raw label: training class or null} for --cohort, when it is not evaluated yet")] = None,
    on: Annotated[str, typer.Option(help="the part of the run's split to show: test, or val/train/all as `heads eval --on` scored them (page: RUN/eval-ON/report.html)")] = "test",
) -> None:
    """One self-contained HTML page of the run: metrics, plots, galleries (runs `eval` if needed)."""
    from rich.text import Text

    from embedstore.errors import UserError
    from heads.report import write_report

    if synonyms is not None and not cohort:
        raise UserError("--synonyms maps a cohort's labels: give it with --cohort NAME")
    syn = _read_synonyms(synonyms)
    page = write_report(run_dir, db, out, table=table, slides=slides, index_dir=index_dir, cohort=cohort,
                        synonyms=syn, on=on, log=_log)  # fmt: skip
    emit(Text(str(page)))  # no markup


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Option("--run", help="run directory from `heads train`")],
    db: Annotated[str, typer.Option(help="LanceDB store (directory or URI) with the cells to label")],
    table: Annotated[str, typer.Option(help="vector table")] = "cells",
    out: Annotated[Path | None, typer.Option(help="folder for predictions.parquet and geojson/ (default RUN/predictions; for a store other than the training store RUN/predictions-<store>-<hash>)")] = None,
    slide: Annotated[list[str] | None, typer.Option(help="only these slides (repeatable)")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "cpu",
    coverage: Annotated[float, typer.Option(help="conformal level of each cell's set of plausible classes")] = 0.9,
    class_conditional: Annotated[bool, typer.Option(help="calibrate the sets per class (coverage per class)")] = False,
    engine: Annotated[str, typer.Option(help="local (this process), or ray: one slide per task on --ray-workers Ray actors (needs the optional ray extra)")] = "local",
    address: Annotated[str | None, typer.Option(help="--engine ray: join this cluster (auto, ray://host:10001); default: start Ray on this machine")] = None,
    ray_workers: Annotated[int, typer.Option(help="--engine ray: Ray actors, each with its own copy of the run's heads")] = 2,
    gpus_per_worker: Annotated[float, typer.Option(help="--engine ray: GPUs per Ray actor (0 on CPU)")] = 0,
    quiet: Annotated[bool, typer.Option(help="--engine ray: no progress bar")] = False,
) -> None:
    """Per-cell class, probabilities, gate value and confidence -> store, Parquet, QuPath GeoJSON."""
    if engine not in ("local", "ray"):
        from embedstore.errors import UserError

        raise UserError(f"--engine must be local or ray, not {engine!r}")
    from heads.runs import SlidesSkipped

    try:
        if engine == "local":
            from heads.runs import predict as run_predict

            run_predict(run_dir, db, table=table, out_dir=out, slides=slide, device=device,
                        conformal_level=coverage, class_conditional=class_conditional, log=_log)  # fmt: skip
        else:
            _predict_ray(run_dir, db, table, out, slide, device, coverage, class_conditional, address, ray_workers,
                         gpus_per_worker, quiet)  # fmt: skip
    except SlidesSkipped as exc:  # the rest is written: a warning, and exit 1 for scripts
        console.print(f"[bold yellow]warning:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None


def _predict_ray(run_dir, db, table, out, slide, device, coverage, class_conditional, address, ray_workers,
                 gpus_per_worker, quiet) -> None:  # fmt: skip
    from cli.common import progress
    from heads.distributed import predict_ray

    with progress(quiet) as bar:
        task = {}

        def events(kind: str, data: dict) -> None:
            if kind == "start":
                task["id"] = bar.add_task(f"{data['slides']} slides on {ray_workers} Ray workers", total=data["cells"], rate="")
            elif kind == "progress":
                bar.update(task["id"], advance=data["n"])

        summary = predict_ray(run_dir, db, table=table, out_dir=out, slides=slide, device=device,
                              conformal_level=coverage, class_conditional=class_conditional, address=address,
                              workers=ray_workers, gpus_per_worker=gpus_per_worker, log=_log, on_event=events)  # fmt: skip
    console.print(f"{summary['cells']} cells in {summary['seconds']:.1f} s, {summary['cells_per_s']:.1f} cells/s "
                  f"on {len(summary['workers'])} Ray workers", highlight=False)  # fmt: skip


@app.command()
def explain(
    run_dir: Annotated[Path, typer.Option("--run", help="run directory from `heads train`")],
    db: Annotated[str, typer.Option(help="LanceDB store (directory or URI) the run was trained on")],
    cell: Annotated[list[str], typer.Option(help="cell to explain, SLIDE:CELL_ID (repeatable)")],
    out: Annotated[Path, typer.Option("--out", help="folder for one PNG per cell plus grid.png")],
    table: Annotated[str, typer.Option(help="vector table")] = "cells",
    path: Annotated[str, typer.Option(help="local (FiLM head), context (global head) or both")] = "both",
    target_layer: Annotated[str, typer.Option(help="last-block (input of the last block's attention) or patch-embed")] = "last-block",
    class_name: Annotated[str | None, typer.Option("--class", help="class to explain (default: the predicted one)")] = None,
    slides: Annotated[Path | None, typer.Option(help="slide file or folder (default: the paths the extraction recorded)")] = None,
    local_weights: Annotated[str | None, typer.Option(help="local backbone weights (default: as `embed extract` finds them)")] = None,
    context_weights: Annotated[str | None, typer.Option(help="context backbone weights")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "cpu",
) -> None:
    """Grad-CAM of single predictions: the crop with the heatmap of what drove its class."""
    from rich.text import Text

    from heads.explain import explain as run_explain

    written = run_explain(run_dir, db, cell, out, table=table, path=path, target_layer=target_layer,
                          class_name=class_name, slides=slides, device=device, local_weights=local_weights,
                          context_weights=context_weights, log=_log)  # fmt: skip
    for p in written:
        emit(Text(str(p)))


main = run(app)

if __name__ == "__main__":
    main()
