"""Head checkpoints: safetensors weights plus a JSON sidecar; nothing is ever unpickled.

RUN_DIR/local.{safetensors,json}, global.*, gate.*. The JSON holds the classes, tissues, vector
dims, module configs, training settings, metrics history, split summary and the store's
provenance of the training vectors. Loading against data refuses vectors whose dims or
backbone identity (names, weight hashes, dims, pooling, input size) differ from training.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from embedstore import faults
from embedstore.errors import UserError
from heads.context import ContextHead
from heads.data import CellData
from heads.film import FiLMHead
from heads.gate import GateHead, NuClass

FORMAT = "nuclass-embedstore/heads"
FORMAT_VERSION = 1
STAGES = ("local", "global", "gate")
#: the modules each stage's file holds (the gate stage fine-tunes both heads, so it holds all)
STAGE_MODULES = {"local": ("local",), "global": ("context",), "gate": ("local", "context", "gate")}
_CLASSES: dict[str, type[nn.Module]] = {
    "FiLMHead": FiLMHead,
    "ContextHead": ContextHead,
    "GateHead": GateHead,
}
#: provenance leaves whose key contains one of these identify the vectors (compared on load):
#: backbone name, weight hashes, dims, pooling, input size, crop geometry (field_um/px/mpp).
#: Not compared: weight file locations, library versions, storage dtype, padding, context mode.
IDENTITY_KEY_PARTS = (
    "backbone", "sha", "hash", "dim", "pool", "input_size", "img_size", "input_px", "field_"
)


def stage_paths(run_dir: str | Path, stage: str) -> tuple[Path, Path]:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    run_dir = Path(run_dir)
    return run_dir / f"{stage}.safetensors", run_dir / f"{stage}.json"


def eval_dir(run_dir: str | Path, cohort: str | None = None, on: str = "test") -> Path:
    """Where `heads eval` writes: the run folder for its test cells (what `heads report` shows),
    RUN/eval-val (-train, -all) for another part of its split, so that scoring the cells that
    chose the model never replaces the test results, and RUN/cohort-NAME for a cohort."""
    if cohort:
        return Path(run_dir) / f"cohort-{cohort}"
    return Path(run_dir) / (f"eval-{on}" if on in ("val", "train", "all") else "")


def has_stage(run_dir: str | Path, stage: str) -> bool:
    return all(p.exists() for p in stage_paths(run_dir, stage))


def save_stage(
    run_dir: str | Path,
    stage: str,
    modules: dict[str, nn.Module],
    *,
    classes: list[str],
    tissues: list[str],
    dims: dict[str, int],
    settings: dict[str, Any],
    history: list[dict[str, Any]],
    provenance: dict[str, Any],
    split: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write `stage`'s weights and JSON (each written to a temp file, then renamed)."""
    expected = STAGE_MODULES[stage]
    if set(modules) != set(expected):
        raise ValueError(f"stage {stage!r} holds modules {expected}, got {tuple(modules)}")
    weights_path, json_path = stage_paths(run_dir, stage)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{name}.{key}": value.detach().cpu().contiguous()
        for name, module in modules.items()
        for key, value in module.state_dict().items()
    }
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "classes": list(classes),
        "tissues": list(tissues),
        "dims": dict(dims),
        "modules": {
            name: {"class": type(m).__name__, "config": m.config()} for name, m in modules.items()
        },
        "settings": settings,
        "history": history,
        "metrics": metrics or {},
        "split": split or {},
        "provenance": _json_normalise(provenance),
    }
    tmp_w = weights_path.with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp_w), metadata={"format": FORMAT, "stage": stage})
    # the JSON names its weights: a kill between the two renames, or a weights file copied in
    # from another run, leaves a pair `load_stage` refuses instead of reading
    info["weights_sha256"] = _sha256(tmp_w)
    tmp_j = json_path.with_suffix(".json.tmp")
    tmp_j.write_text(json.dumps(info, indent=2, default=str) + "\n")
    os.replace(tmp_w, weights_path)
    faults.point("heads.save")
    os.replace(tmp_j, json_path)
    return weights_path, json_path


def read_info(run_dir: str | Path, stage: str) -> dict[str, Any]:
    """The JSON sidecar of `stage` (classes, tissues, dims, settings, history, provenance)."""
    weights_path, json_path = stage_paths(run_dir, stage)
    if not json_path.exists() or not weights_path.exists():
        missing = json_path if not json_path.exists() else weights_path
        raise UserError(
            f"no `{stage}` checkpoint in {Path(run_dir)} ({missing.name} is missing); train "
            f"stage `{stage}` first (or point to the run directory that has it)"
        )
    try:
        info = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{json_path} is not valid JSON ({e}); retrain stage `{stage}`") from e
    if not isinstance(info, dict):
        info = {"format": type(info).__name__}
    if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{json_path} is not a {FORMAT} v{FORMAT_VERSION} checkpoint "
            f"(format={info.get('format')!r}, version={info.get('format_version')!r})"
        )
    return info


def load_stage(
    run_dir: str | Path,
    stage: str,
    data: CellData | None = None,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """Modules of `stage` (in eval mode, on `device`) and its JSON info.

    With `data`, first checks that its vectors, classes and tissues match the checkpoint.
    """
    info = read_info(run_dir, stage)
    if data is not None:
        check_compatible(info, data, where=str(stage_paths(run_dir, stage)[1]))
    weights_path = stage_paths(run_dir, stage)[0]
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type (and OSError)
        raise UserError(
            f"{weights_path} cannot be read: it is truncated or corrupt ({e}); retrain stage "
            f"`{stage}` with `heads train --stage {stage} --out {Path(run_dir)}`"
        ) from e
    want = info.get("weights_sha256")  # absent in checkpoints saved before it was recorded
    if want is not None and _sha256(weights_path) != want:
        raise UserError(
            f"{weights_path} is not the file {weights_path.with_suffix('.json').name} was saved with (its sha256 "
            f"differs): the run folder mixes two trainings (one stopped while saving, or files copied from "
            f"another run); retrain stage `{stage}` with `heads train --stage {stage} --out {Path(run_dir)}`"
        )
    modules: dict[str, nn.Module] = {}
    for name in STAGE_MODULES[stage]:
        spec = info["modules"][name]
        cls = _CLASSES[spec["class"]]
        config = dict(spec["config"])
        if cls is GateHead:
            config["hidden"] = tuple(config["hidden"])
        module = cls(**config)
        prefix = f"{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise UserError(
                f"{weights_path} does not match its JSON ({name}: {e}); the run directory "
                f"is inconsistent: retrain stage `{stage}`"
            ) from e
        modules[name] = module.to(device).eval()
    return modules, info


def load_local(run_dir, data=None, device="cpu") -> tuple[FiLMHead, dict[str, Any]]:
    modules, info = load_stage(run_dir, "local", data, device)
    return modules["local"], info


def load_global(run_dir, data=None, device="cpu") -> tuple[ContextHead, dict[str, Any]]:
    modules, info = load_stage(run_dir, "global", data, device)
    return modules["context"], info


def load_gate(run_dir, data=None, device="cpu") -> tuple[NuClass, dict[str, Any]]:
    """The fine-tuned local and context heads plus the gate, as one `NuClass` module."""
    modules, info = load_stage(run_dir, "gate", data, device)
    model = NuClass(modules["local"], modules["context"], modules["gate"]).eval()
    return model, info


def check_compatible(info: dict[str, Any], data: CellData, where: str = "checkpoint") -> None:
    """Refuse data whose dims, provenance, classes or tissues differ from the checkpoint's."""
    dims = info["dims"]
    got = {"local": data.local_dim, "context": data.context_dim}
    bad = [f"{k}: checkpoint {dims[k]}, vectors {got[k]}" for k in dims if dims[k] != got.get(k)]
    if bad:
        raise UserError(
            f"vector dims do not match {where} ({'; '.join(bad)}); use vectors from the same "
            "backbones the heads were trained on, or retrain the heads"
        )
    check_provenance(info.get("provenance", {}), data.provenance, where)
    if list(data.classes) != list(info["classes"]) or list(data.tissues) != list(info["tissues"]):
        raise UserError(
            f"the cells are encoded with other classes/tissues than {where} (checkpoint classes: "
            f"{', '.join(info['classes'])}; tissues: {', '.join(info['tissues'])}); build the "
            "CellData with classes= and tissues= from the checkpoint (CellData.remap)"
        )


def provenance_identity(provenance: dict[str, Any]) -> set[tuple[str, str]]:
    """The (key path, value) leaves of `provenance` that identify the vectors.

    List indices are dropped from paths, so the identity of cells drawn from several
    extraction runs of the same backbones equals that of one run.
    """
    out: set[tuple[str, str]] = set()

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(node, list):
            for v in node:
                walk(v, path)
        else:
            leaf = path.rsplit(".", 1)[-1].lower()
            if any(part in leaf for part in IDENTITY_KEY_PARTS):
                out.add((path, json.dumps(node)))

    walk(_json_normalise(provenance), "")
    return out


def check_provenance(expected: dict[str, Any], got: dict[str, Any], where: str) -> None:
    want, have = provenance_identity(expected), provenance_identity(got)
    if want == have:
        return
    only_want = sorted(want - have)
    only_have = sorted(have - want)
    lines = [f"{k}={v}" for k, v in only_want[:4]]
    lines_have = [f"{k}={v}" for k, v in only_have[:4]]
    raise UserError(
        f"the vectors' provenance does not match {where}: the heads were trained on "
        f"[{'; '.join(lines) or 'nothing recorded'}], these vectors have "
        f"[{'; '.join(lines_have) or 'nothing recorded'}]. Embed the cells with the same "
        "backbones and weights as the training set, or retrain the heads on these vectors"
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _json_normalise(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
