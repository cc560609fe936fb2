"""Cells as in-memory tensors: the contract between the store loader and the heads.

The store returns a polars DataFrame of cell metadata plus two float32 arrays (`local`, `context`)
in the same row order, and a provenance dict. `CellData` turns those into tensors with integer
tissue and label codes. Class and tissue vocabularies are discovered from the data (sorted)
unless given, e.g. from a checkpoint at prediction time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch

from embedstore.errors import UserError

#: rows checked per chunk for NaN/inf (bounds the temporary boolean array)
_FINITE_CHUNK = 65536


@dataclass
class CellData:
    """Cell metadata plus per-cell vectors, with tissue and label as integer codes.

    `label` is -1 for cells without a label (or, when `classes` was given, with a label outside
    `classes`; `n_unknown_labels` counts those).
    """

    meta: pl.DataFrame
    local: torch.Tensor
    context: torch.Tensor
    tissue: torch.Tensor
    label: torch.Tensor
    classes: list[str]
    tissues: list[str]
    provenance: dict = field(default_factory=dict)
    label_col: str = "label"
    tissue_col: str = "tissue"
    unknown_label: torch.Tensor | None = None  # bool: had a label outside `classes`

    def __len__(self) -> int:
        return self.local.shape[0]

    @property
    def local_dim(self) -> int:
        return int(self.local.shape[1])

    @property
    def context_dim(self) -> int:
        return int(self.context.shape[1])

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def n_tissues(self) -> int:
        return len(self.tissues)

    @property
    def n_unknown_labels(self) -> int:
        return 0 if self.unknown_label is None else int(self.unknown_label.sum())

    @property
    def labelled(self) -> torch.Tensor:
        """Boolean mask of cells with a usable label."""
        return self.label >= 0

    @classmethod
    def from_arrays(
        cls,
        meta: pl.DataFrame,
        local: np.ndarray | torch.Tensor,
        context: np.ndarray | torch.Tensor,
        *,
        provenance: dict | None = None,
        classes: Sequence[str] | None = None,
        tissues: Sequence[str] | None = None,
        label_col: str = "label",
        tissue_col: str = "tissue",
    ) -> CellData:
        """Validate and wrap the store's arrays (float32 arrays are shared, not copied).

        With `tissues` given, a tissue outside it is an error (the FiLM head has no embedding
        for it). With `classes` given, labels outside it become -1 (counted, not an error), as
        for held-out cohorts; training entry points refuse data where that happened.
        """
        local_t = _as_float_tensor(local, "local")
        context_t = _as_float_tensor(context, "context")
        n = meta.height
        if local_t.shape[0] != n or context_t.shape[0] != n:
            raise UserError(
                f"row counts differ: metadata has {n} cells, `local` {local_t.shape[0]} rows, "
                f"`context` {context_t.shape[0]} rows; load vectors and metadata with the same "
                "filter so that rows line up"
            )
        if n == 0:
            raise UserError("no cells selected; check the slide/tissue filter")
        _check_finite(local_t, "local", meta)
        _check_finite(context_t, "context", meta)

        if tissue_col not in meta.columns:
            raise UserError(
                f"cell table has no `{tissue_col}` column (columns: {', '.join(meta.columns)}); "
                "the heads need each cell's tissue/organ"
            )
        tissue_vals = meta[tissue_col].cast(pl.Utf8)
        if tissue_vals.null_count():
            raise UserError(
                f"{tissue_vals.null_count()} cells have no `{tissue_col}` value; set the tissue "
                "of every slide before training or predicting"
            )
        present = set(tissue_vals.unique().to_list())
        if tissues is None:
            tissues = sorted(present)
        tissues = [str(t) for t in tissues]
        t_index = {t: i for i, t in enumerate(tissues)}
        unseen = sorted(present - t_index.keys())
        if unseen:
            raise UserError(
                f"tissue(s) {', '.join(map(repr, unseen))} were not seen in training (known: "
                f"{', '.join(tissues)}); the local head has no embedding for them. Relabel those "
                "slides with a known tissue, or train heads that include them"
            )
        tissue_codes = torch.from_numpy(
            tissue_vals.replace_strict(t_index, return_dtype=pl.Int64).to_numpy().copy()
        )

        label_codes, classes, unknown = _encode_labels(meta, label_col, classes)
        return cls(
            meta=meta,
            local=local_t,
            context=context_t,
            tissue=tissue_codes,
            label=label_codes,
            classes=classes,
            tissues=tissues,
            provenance=dict(provenance or {}),
            label_col=label_col,
            tissue_col=tissue_col,
            unknown_label=unknown,
        )

    def subset(self, mask_or_idx: np.ndarray | torch.Tensor | Sequence[int]) -> CellData:
        """Rows selected by a boolean mask or integer indices (vocabularies are kept)."""
        idx = torch.as_tensor(np.asarray(mask_or_idx))
        if idx.dtype == torch.bool:
            if idx.shape[0] != len(self):
                raise ValueError(f"mask has {idx.shape[0]} entries for {len(self)} cells")
            idx = idx.nonzero().squeeze(1)
        idx = idx.to(torch.int64)
        return CellData(
            meta=self.meta[idx.numpy()],
            local=self.local[idx],
            context=self.context[idx],
            tissue=self.tissue[idx],
            label=self.label[idx],
            classes=list(self.classes),
            tissues=list(self.tissues),
            provenance=dict(self.provenance),
            label_col=self.label_col,
            tissue_col=self.tissue_col,
            unknown_label=None if self.unknown_label is None else self.unknown_label[idx],
        )

    def remap(self, classes: Sequence[str], tissues: Sequence[str]) -> CellData:
        """The same cells re-encoded against another vocabulary (e.g. a checkpoint's)."""
        return CellData.from_arrays(
            self.meta,
            self.local,
            self.context,
            provenance=self.provenance,
            classes=classes,
            tissues=tissues,
            label_col=self.label_col,
            tissue_col=self.tissue_col,
        )

    def check_trainable(self) -> None:
        """Refuse data the heads cannot be trained on: no labels, unknown labels, one class."""
        if self.label_col not in self.meta.columns:
            raise UserError(
                f"cell table has no `{self.label_col}` column: training needs labels. Import "
                "labels into the store first (or pass label_col= the column holding them)"
            )
        if self.n_unknown_labels:
            raise UserError(
                f"{self.n_unknown_labels} labelled cells have a class outside the checkpoint's "
                f"classes ({', '.join(self.classes)}); train from stage `local` to include new "
                "classes, or drop those labels"
            )
        counts = torch.bincount(self.label[self.labelled], minlength=self.n_classes)
        if int(counts.sum()) == 0:
            raise UserError(
                f"no labelled cells: column `{self.label_col}` is empty for all {len(self)} "
                "cells; import labels or widen the filter"
            )
        present = int((counts > 0).sum())
        if present < 2:
            only = self.classes[int(counts.argmax())]
            raise UserError(
                f"only one class ({only!r}) among the labelled cells; a classifier needs at least "
                "two classes: widen the filter or import more labels"
            )

    def class_counts(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        lab = self.label if idx is None else self.label[idx]
        return torch.bincount(lab[lab >= 0], minlength=self.n_classes)


def _as_float_tensor(arr: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    if isinstance(arr, torch.Tensor):
        t = arr.detach().cpu()
    else:
        a = np.asarray(arr)
        if not np.issubdtype(a.dtype, np.floating):
            raise UserError(f"`{name}` vectors have dtype {a.dtype}; expected floating point")
        t = torch.from_numpy(np.ascontiguousarray(a))
    if t.ndim != 2:
        raise UserError(f"`{name}` vectors must be a 2-D array (cells x dims), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise UserError(f"`{name}` vectors have dtype {t.dtype}; expected floating point")
    return t.to(torch.float32).contiguous()


def _check_finite(t: torch.Tensor, name: str, meta: pl.DataFrame) -> None:
    for start in range(0, t.shape[0], _FINITE_CHUNK):
        chunk = t[start : start + _FINITE_CHUNK]
        ok = torch.isfinite(chunk).all(dim=1)
        if not bool(ok.all()):
            bad = start + int((~ok).nonzero()[0, 0])
            n_bad = int((~torch.isfinite(t).all(dim=1)).sum())
            where = _describe_row(meta, bad)
            raise UserError(
                f"{n_bad} cells have NaN/inf in their `{name}` vector (first: {where}); "
                "re-extract those slides or drop the cells before training"
            )


def _describe_row(meta: pl.DataFrame, i: int) -> str:
    parts = [f"row {i}"]
    for col in ("slide_id", "cell_id"):
        if col in meta.columns:
            parts.append(f"{col}={meta[col][i]!r}")
    return ", ".join(parts)


def _encode_labels(
    meta: pl.DataFrame, label_col: str, classes: Sequence[str] | None
) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
    n = meta.height
    if label_col not in meta.columns:
        return torch.full((n,), -1, dtype=torch.int64), [str(c) for c in classes or []], None
    col = meta[label_col]
    if classes is None:
        present = col.drop_nulls().unique()
        if present.dtype.is_numeric():
            present = present.sort()  # numeric order, not "10" < "2"
            classes = [str(v) for v in present.to_list()]
        else:
            classes = sorted(str(v) for v in present.to_list())
    classes = [str(c) for c in classes]
    c_index = {c: i for i, c in enumerate(classes)}
    names = col.cast(pl.Utf8)
    codes = names.replace_strict(c_index, default=-2, return_dtype=pl.Int64).to_numpy().copy()
    codes[names.is_null().to_numpy()] = -1
    unknown = torch.from_numpy(codes == -2)
    codes[codes == -2] = -1
    return torch.from_numpy(codes), classes, (unknown if bool(unknown.any()) else None)
