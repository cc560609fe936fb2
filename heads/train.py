"""One small training loop for the three NuClass heads, on in-memory tensors.

Each stage: AdamW, linear warm-up then constant lr, shuffled index permutations over the
training cells (all resident on the device), validation macro-F1 after every epoch, early
stopping with the best weights restored. Stage 2 trains the context head with the frozen local
head's logits; stage 3 trains the gate alone for half an epoch, then the gate and both heads.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from embedstore.errors import UserError
from heads import checkpoint as ckpt
from heads.context import ALPHA_SCHEDULES, ContextHead, alpha_at
from heads.data import CellData
from heads.film import FiLMHead
from heads.gate import GateHead, NuClass
from heads.losses import class_balanced_weights, cross_entropy, gate_loss, stage2_loss
from heads.metrics import macro_f1
from heads.splits import Split, make_split

Log = Callable[[str], Any]
STAGE_CHOICES = ("local", "global", "gate", "all")
STAGE3_HEADS = ("joint", "frozen")


@dataclass
class TrainConfig:
    """Training settings; defaults follow METHOD.md, epochs sized for ~200k cells on 2 CPU cores."""

    epochs: int = 4  # stage 1 (local) epochs
    global_epochs: int | None = 3  # stage 2; None = `epochs`
    gate_epochs: int = 1  # stage 3
    batch_size: int = 1024
    eval_batch_size: int = 8192
    lr: float = 3e-4
    weight_decay: float = 2e-5
    warmup_steps: int = 100  # linear warm-up (capped at half an epoch), then constant lr
    patience: int = 2  # epochs without a better val macro-F1 before stopping
    min_delta: float = 1e-4
    seed: int = 0
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", or "auto"
    film: bool = True  # False: the paper's "Concat" ablation
    label_smoothing: float = 0.1  # stage 1
    context_label_smoothing: float = 0.05  # stage 2
    cb_beta: float = 0.9999
    aux_weight: float = 0.3  # stage 2: class-balanced CE on z_B
    context_dropout: float = 0.1
    context_gate_hidden: int = 256  # stage-2 internal gate width (the authors' code)
    alpha_schedule: str = "step"  # stage-2 α ramp: "step" (per optimiser step) or "epoch"
    # stage 3: "frozen" (gate only, the authors' code) or "joint" (gate + both heads, METHOD.md).
    # bench/honest.py, 20k cells x 3 seeds: gate test macro-F1 0.443 frozen vs 0.441 joint
    # (seed s.d. ~0.008), ~20% less time; frozen keeps the gate's paths = the local/global rows
    stage3_heads: str = "frozen"
    gate_lr: float = 8e-4
    gate_head_lr: float = 2e-4
    gate_alone_epochs: float = 0.5
    kl_weight: float = 0.1
    entropy_weight: float = 0.05
    head_ce_weight: float = 0.05
    hidden: int = 1024
    proj: int = 512
    gate_proj: int = 128
    gate_hidden: tuple[int, int] = (256, 64)
    dropout: float = 0.2
    gate_dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("epochs", "gate_epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.global_epochs is not None and self.global_epochs < 1:
            raise UserError(f"global_epochs must be >= 1, got {self.global_epochs}")
        if self.patience < 1:
            raise UserError(f"patience must be >= 1, got {self.patience}")
        self.gate_hidden = tuple(self.gate_hidden)
        if self.alpha_schedule not in ALPHA_SCHEDULES:
            raise UserError(f"alpha_schedule must be one of {', '.join(ALPHA_SCHEDULES)}, got {self.alpha_schedule!r}")
        if self.stage3_heads not in STAGE3_HEADS:
            raise UserError(f"stage3_heads must be one of {', '.join(STAGE3_HEADS)}, got {self.stage3_heads!r}")

    @property
    def stage2_epochs(self) -> int:
        return self.epochs if self.global_epochs is None else self.global_epochs

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gate_hidden"] = list(self.gate_hidden)
        return d


# ---------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but no CUDA GPU is available; use --device cpu")
    return dev


@dataclass
class _Resident:
    """The labelled train and val cells, on the device once.

    On CPU the full tensors are used in place (no copy) and positions are row indices; on a
    GPU only train + val rows are copied and positions index that copy.
    """

    local: torch.Tensor
    context: torch.Tensor
    tissue: torch.Tensor
    label: torch.Tensor
    train: torch.Tensor
    val: torch.Tensor
    val_labels: np.ndarray = field(repr=False)

    @classmethod
    def build(cls, data: CellData, split: Split, device: torch.device) -> _Resident:
        labelled = data.labelled.numpy()
        train = split.train[labelled[split.train]]
        val = split.val[labelled[split.val]]
        if train.size == 0:
            raise UserError(
                "no labelled cells in the training split; check the `split` column / holdout"
            )
        learnt = np.unique(data.label.numpy()[train])
        if learnt.size < 2:
            raise UserError(
                f"only one class ({data.classes[int(learnt[0])]!r}) has labelled cells in the training "
                "split: the others are all in val/test (--holdout, or the `split` column), and a "
                "classifier needs at least two classes to learn; hold out fewer slides, or give "
                "training cells of the other classes"
            )
        if val.size == 0 and split.source == "column":
            raise UserError(
                "no labelled cells in the validation split (needed for early stopping): the `split` "
                f"column marks none `val` ({train.size} train, {int(labelled[split.test].sum())} test); "
                "mark some cells of each slide `val`, or clear the column to use the default "
                "per-slide stripes"
            )
        if val.size == 0 and split.source == "stripes" and split.info.get("settings", {}).get("val_fraction") == 0:
            raise UserError(
                "no labelled cells in the validation split (needed for early stopping): "
                "--val-fraction 0 makes no val stripe; give a share of each slide, e.g. --val-fraction 0.2"
            )
        if val.size == 0:
            raise UserError(
                "no labelled cells in the validation split (needed for early stopping): slides with under "
                f"{split.info.get('settings', {}).get('min_cells', 50)} labelled cells are not cut, and on "
                "small tissue the guard band can take the val "
                "stripe; narrow it (--guard-um), hold out whole slides (--holdout), or give a "
                "`split` column with val rows"
            )
        if device.type == "cpu":
            tensors = (data.local, data.context, data.tissue, data.label)
            train_pos, val_pos = torch.from_numpy(train), torch.from_numpy(val)
        else:
            rows = torch.from_numpy(np.concatenate([train, val]))
            tensors = tuple(x[rows].to(device) for x in (data.local, data.context,
                                                          data.tissue, data.label))
            train_pos = torch.arange(train.size, device=device)
            val_pos = torch.arange(train.size, rows.numel(), device=device)
        return cls(*tensors, train=train_pos.to(device), val=val_pos.to(device),
                   val_labels=data.label[torch.from_numpy(val)].numpy())

    def batch(self, pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.local[pos], self.context[pos], self.tissue[pos], self.label[pos]


class _EarlyStopping:
    """Tracks the best validation score and a copy of the weights that reached it."""

    def __init__(self, model: nn.Module, patience: int, min_delta: float) -> None:
        self.model, self.patience, self.min_delta = model, patience, min_delta
        self.best = -math.inf
        self.best_epoch: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_epochs = 0

    def update(self, score: float, epoch: float, count: bool = True) -> bool:
        """Record `score`; True if it is the new best. `count=False`: no patience spent."""
        if score > self.best + self.min_delta or self.best_state is None:
            self.best, self.best_epoch = score, epoch
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.bad_epochs = 0
            return True
        if count:
            self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def restore(self) -> None:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)


def _warmup_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """cfg.warmup_steps, capped at half an epoch so that small runs reach the full lr."""
    return min(cfg.warmup_steps, max(1, steps_per_epoch // 2))


def _set_warmup_lr(opt: torch.optim.Optimizer, step: int, warmup_steps: int) -> None:
    """Linear warm-up from each group's first step, then the group's base lr."""
    for group in opt.param_groups:
        done = step - group["start_step"] + 1
        frac = 1.0 if warmup_steps <= 0 else min(1.0, done / warmup_steps)
        group["lr"] = group["base_lr"] * frac


def _adamw(params, lr: float, cfg: TrainConfig, start_step: int = 0) -> torch.optim.AdamW:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    for group in opt.param_groups:
        group["base_lr"], group["start_step"] = lr, start_step
    return opt


@torch.no_grad()
def _batched(fn: Callable[[torch.Tensor], torch.Tensor], pos: torch.Tensor, bs: int) -> torch.Tensor:
    return torch.cat([fn(pos[i : i + bs]) for i in range(0, pos.numel(), bs)])


def _elapsed(t0: float, device: torch.device) -> float:
    """Seconds since `t0` (a `time.perf_counter()` reading), counting the work still queued on
    a CUDA device: its kernels run asynchronously, so without a sync the clock stops before
    the epoch's last steps have run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _permutation(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randperm(n, generator=gen).to(device)


def _shown(epoch: int, epochs: int, lines: int = 20) -> bool:
    """Whether to log an epoch that brought no new best: about `lines` per stage (small sets
    train for hundreds of epochs), always the first and the last."""
    return epochs <= lines or epoch in (1, epochs) or epoch % -(-epochs // lines) == 0


def _epoch_line(stage: str, epoch: float, epochs: int, rec: dict[str, Any], best: bool) -> str:
    return (
        f"[{stage}] epoch {epoch:g}/{epochs} loss {rec['loss']:.4f} "
        f"val macro-F1 {rec['val_macro_f1']:.4f}{' *' if best else ''} "
        f"{rec['cells_per_s']:,.0f} cells/s {rec['seconds']:.1f}s"
    )


def _class_weights(res: _Resident, n_classes: int, beta: float) -> torch.Tensor:
    counts = torch.bincount(res.label[res.train].cpu(), minlength=n_classes)
    return class_balanced_weights(counts, beta).to(res.local.device)


#: fewer labelled training cells than this in a class: warned about at training time
FEW_TRAINING_CELLS = 5


def training_coverage(data: CellData, split: Split, *, warn_tissues: bool = True) -> tuple[list[str], list[str]]:
    """(the tissues with labelled training cells, one warning line per class with fewer than
    FEW_TRAINING_CELLS training cells and, with `warn_tissues`, per tissue with none): a class
    or tissue held out whole (--holdout, a `split` column) is never learnt, and an untrained
    tissue's FiLM embedding is its random initialisation."""
    train = torch.from_numpy(split.train[data.labelled.numpy()[split.train]])
    per_class = data.class_counts(train).tolist()
    per_tissue = torch.bincount(data.tissue[train], minlength=data.n_tissues).tolist()
    lines = [
        f"warning: class {c!r} has {'no' if n == 0 else f'only {n}'} training cell{'' if n == 1 else 's'}: "
        + ("the heads cannot learn it" if n == 0 else "the heads can hardly learn it")
        for c, n in zip(data.classes, per_class, strict=True) if n < FEW_TRAINING_CELLS
    ]  # fmt: skip
    lines += [
        f"warning: tissue {t!r} has no training cells: its FiLM embedding stays untrained, so "
        "`heads eval` does not score its cells and `heads predict` leaves them out"
        for t, n in zip(data.tissues, per_tissue, strict=True) if n == 0 and warn_tissues
    ]  # fmt: skip
    return [t for t, n in zip(data.tissues, per_tissue, strict=True) if n > 0], lines


def check_holdout_scorable(data: CellData, split: Split, holdout: Sequence[str]) -> None:
    """Refuse a --holdout whose labelled test cells are all of tissues without training cells:
    the run could never be evaluated (nor predict them): METHOD.md's FiLM head learns one
    embedding per training tissue and has none for an unseen one."""
    test = split.test[data.labelled.numpy()[split.test]]
    if test.size == 0:
        return
    trained, _ = training_coverage(data, split, warn_tissues=False)
    tissues = sorted({data.tissues[i] for i in np.unique(data.tissue.numpy()[test])})
    if not set(tissues) & set(trained):
        raise UserError(
            f"--holdout {' '.join(holdout)} holds out every cell of tissue(s) {', '.join(tissues)}: the heads "
            "would have no training cells of it, and the FiLM head learns an embedding only for the tissues it "
            "is trained on, so `heads eval` could score none of the test cells (nor `heads predict` label them). "
            "Hold out slides of tissues that keep other slides for training, or score another store of a trained "
            "tissue as a held-out cohort (`heads eval --cohort`)"
        )


def trained_tissues(info: dict[str, Any]) -> list[str]:
    """The tissues a checkpoint's head saw training cells of (all its tissues for checkpoints
    made before this was recorded)."""
    return list(info.get("split", {}).get("trained_tissues", info["tissues"]))


def _refuse_untrained_tissues(data: CellData, trained: list[str]) -> None:
    present = {data.tissues[i] for i in torch.unique(data.tissue).tolist()}
    untrained = sorted(present - set(trained))
    if untrained:
        raise UserError(
            f"tissue(s) {', '.join(map(repr, untrained))} had no training cells in this run (held "
            "out, or only in val/test): the local head's embedding for them is untrained, as for "
            f"an unknown tissue (trained: {', '.join(trained)}). Leave those slides out, relabel "
            "them with a trained tissue, or train heads with training cells of that tissue"
        )


def _check_heads(data: CellData, local: FiLMHead, context: ContextHead | None = None) -> None:
    if local.in_dim != data.local_dim:
        raise UserError(
            f"local head expects {local.in_dim}-d local vectors, the cells have "
            f"{data.local_dim}-d ones; use vectors from the backbone the heads were trained on"
        )
    if local.n_classes != data.n_classes:
        raise UserError(
            f"local head predicts {local.n_classes} classes, the cells are encoded with "
            f"{data.n_classes}; encode them with the checkpoint's classes (CellData.remap)"
        )
    if local.n_tissues != data.n_tissues:
        raise UserError(
            f"local head knows {local.n_tissues} tissues, the cells are encoded with "
            f"{data.n_tissues}; encode them with the checkpoint's tissues (CellData.remap)"
        )
    if context is not None and context.context_dim != data.context_dim:
        raise UserError(
            f"context head expects {context.context_dim}-d context vectors, the cells have "
            f"{data.context_dim}-d ones; use vectors from the backbone the heads were trained on"
        )


# ---------------------------------------------------------------------------- stage 1


def train_local(
    data: CellData, split: Split, cfg: TrainConfig, log: Log = print
) -> tuple[FiLMHead, list[dict[str, Any]]]:
    """Stage 1: FiLM head on u, class-balanced CE with label smoothing."""
    data.check_trainable()
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    res = _Resident.build(data, split, device)
    head = FiLMHead(
        data.local_dim, data.n_tissues, data.n_classes, film=cfg.film,
        hidden=cfg.hidden, dropout=cfg.dropout,
    ).to(device)
    head.standardize.fit(res.local[res.train])
    weights = _class_weights(res, data.n_classes, cfg.cb_beta)
    opt = _adamw(head.parameters(), cfg.lr, cfg)

    def step_loss(pos: torch.Tensor) -> torch.Tensor:
        u, _, t, y = res.batch(pos)
        return cross_entropy(head(u, t), y, smoothing=cfg.label_smoothing, weight=weights)

    def evaluate() -> float:
        head.eval()
        logits = _batched(lambda p: head(res.local[p], res.tissue[p]), res.val, cfg.eval_batch_size)
        return macro_f1(res.val_labels, logits.argmax(1).cpu().numpy())

    history = _fit("local", head, opt, res, step_loss, evaluate, cfg.epochs, cfg, log)
    return head.eval(), history


def _fit(
    stage: str,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    res: _Resident,
    step_loss: Callable[[torch.Tensor], torch.Tensor],
    evaluate: Callable[[], float],
    epochs: int,
    cfg: TrainConfig,
    log: Log,
    on_step: Callable[[int, float], None] | None = None,
) -> list[dict[str, Any]]:
    """The plain epoch loop shared by stages 1 and 2."""
    gen = torch.Generator().manual_seed(cfg.seed)
    stopper = _EarlyStopping(model, cfg.patience, cfg.min_delta)
    n_train, bs = res.train.numel(), cfg.batch_size
    steps_per_epoch = math.ceil(n_train / bs)
    warmup = _warmup_steps(cfg, steps_per_epoch)
    history, step = [], 0
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        perm = res.train[_permutation(n_train, gen, res.train.device)]
        total = torch.zeros((), device=res.local.device)
        for i in range(steps_per_epoch):
            if on_step is not None:
                on_step(step, epoch + i / steps_per_epoch)
            _set_warmup_lr(opt, step, warmup)
            loss = step_loss(perm[i * bs : (i + 1) * bs])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
            step += 1
        seconds = _elapsed(t0, res.local.device)
        score = evaluate()
        rec = {
            "epoch": epoch + 1, "loss": float(total) / steps_per_epoch, "val_macro_f1": score,
            "cells_per_s": n_train / seconds, "seconds": seconds, "lr": opt.param_groups[0]["lr"],
        }
        best = stopper.update(score, epoch + 1)
        history.append(rec)
        if best or _shown(epoch + 1, epochs):
            log(_epoch_line(stage, epoch + 1, epochs, rec, best))
        if stopper.should_stop:
            log(f"[{stage}] early stop: no better val macro-F1 for {cfg.patience} epoch(s)")
            break
    stopper.restore()
    log(f"[{stage}] best val macro-F1 {stopper.best:.4f} at epoch {stopper.best_epoch}")
    return history


# ---------------------------------------------------------------------------- stage 2


def train_global(
    data: CellData, split: Split, local_head: FiLMHead, cfg: TrainConfig, log: Log = print
) -> tuple[ContextHead, list[dict[str, Any]]]:
    """Stage 2: context head, uncertainty-guided by the frozen local head."""
    data.check_trainable()
    _check_heads(data, local_head)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed + 1)
    res = _Resident.build(data, split, device)
    local_head = local_head.to(device).eval()
    # the local head is frozen: its logits for every training cell are computed once
    z_a_train = _batched(
        lambda p: local_head(res.local[p], res.tissue[p]), res.train, cfg.eval_batch_size
    )
    row_of = torch.full((res.local.shape[0],), -1, dtype=torch.int64, device=device)
    row_of[res.train] = torch.arange(res.train.numel(), device=device)

    head = ContextHead(
        data.local_dim, data.context_dim, data.n_classes, proj=cfg.proj, hidden=cfg.hidden,
        dropout=cfg.dropout, context_dropout=cfg.context_dropout, gate_hidden=cfg.context_gate_hidden,
    ).to(device)
    head.standardize_u.fit(res.local[res.train])
    head.standardize_c.fit(res.context[res.train])
    weights = _class_weights(res, data.n_classes, cfg.cb_beta)
    opt = _adamw(head.parameters(), cfg.lr, cfg)

    def step_loss(pos: torch.Tensor) -> torch.Tensor:
        u, c, _, y = res.batch(pos)
        z_a = z_a_train[row_of[pos]]
        a = z_a.softmax(1).gather(1, y.unsqueeze(1)).squeeze(1)
        z_f, z_b, _ = head.forward_train(u, c, z_a, a)
        return stage2_loss(z_f, z_b, y, a, weights, smoothing=cfg.context_label_smoothing,
                           aux_weight=cfg.aux_weight)

    def on_step(_: int, progress: float) -> None:
        head.set_alpha(alpha_at(progress, cfg.alpha_schedule))

    def evaluate() -> float:
        head.eval()
        logits = _batched(lambda p: head(res.local[p], res.context[p]), res.val,
                          cfg.eval_batch_size)
        return macro_f1(res.val_labels, logits.argmax(1).cpu().numpy())

    history = _fit("global", head, opt, res, step_loss, evaluate, cfg.stage2_epochs, cfg, log,
                   on_step=on_step)
    return head.eval(), history


# ---------------------------------------------------------------------------- stage 3


def train_gate(
    data: CellData,
    split: Split,
    local_head: FiLMHead,
    context_head: ContextHead,
    cfg: TrainConfig,
    log: Log = print,
) -> tuple[NuClass, list[dict[str, Any]]]:
    """Stage 3: the gate alone for `gate_alone_epochs`, then gate + both heads
    (`stage3_heads="joint"`, METHOD.md), or the gate alone throughout ("frozen": what the
    authors' code does, its optimiser being built while the heads are frozen).

    Returns the whole `NuClass` model: the heads are fine-tuned here (on copies; the heads
    passed in are left untouched), so the gate is only valid together with them.
    """
    data.check_trainable()
    _check_heads(data, local_head, context_head)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed + 2)
    res = _Resident.build(data, split, device)
    gate = GateHead(
        local_head.feature_dim, context_head.feature_dim, data.n_classes, proj=cfg.gate_proj,
        hidden=cfg.gate_hidden, dropout=cfg.gate_dropout,
    )
    model = NuClass(copy.deepcopy(local_head), copy.deepcopy(context_head), gate).to(device)
    heads = [model.local, model.context]
    opt = _adamw(model.gate.parameters(), cfg.gate_lr, cfg)

    gen = torch.Generator().manual_seed(cfg.seed)
    stopper = _EarlyStopping(model, cfg.patience, cfg.min_delta)
    n_train, bs = res.train.numel(), cfg.batch_size
    steps_per_epoch = math.ceil(n_train / bs)
    alone_steps = math.ceil(cfg.gate_alone_epochs * steps_per_epoch)
    warmup = _warmup_steps(cfg, steps_per_epoch)
    heads_trainable = False

    def set_heads(trainable: bool) -> None:
        for h in heads:
            h.train(trainable)
            h.requires_grad_(trainable)

    def evaluate() -> float:
        model.eval()
        probs = _batched(
            lambda p: model(res.local[p], res.tissue[p], res.context[p])["p_mix"],
            res.val, cfg.eval_batch_size,
        )
        return macro_f1(res.val_labels, probs.argmax(1).cpu().numpy())

    def record(epoch: float, totals: dict[str, torch.Tensor], steps: int, seconds: float,
               cells: int) -> bool:
        score = evaluate()
        rec = {
            "epoch": epoch, "loss": float(totals["loss"]) / max(steps, 1),
            **{k: float(v) / max(steps, 1) for k, v in totals.items() if k != "loss"},
            "val_macro_f1": score, "cells_per_s": cells / max(seconds, 1e-9),
            "seconds": seconds, "heads_trainable": heads_trainable,
        }
        # the gate-alone checkpoint competes for "best" but spends no patience
        best = stopper.update(score, epoch, count=float(epoch).is_integer())
        history.append(rec)
        log(_epoch_line("gate", epoch, cfg.gate_epochs, rec, best))
        return best

    set_heads(False)
    history: list[dict[str, Any]] = []
    step = 0
    for epoch in range(cfg.gate_epochs):
        model.gate.train()
        set_heads(heads_trainable)  # evaluate() leaves every module in eval mode
        t0, seg_steps, seg_cells = time.perf_counter(), 0, 0
        totals: dict[str, torch.Tensor] = {}
        perm = res.train[_permutation(n_train, gen, res.train.device)]
        for i in range(steps_per_epoch):
            if not heads_trainable and step >= alone_steps and cfg.stage3_heads == "joint":
                # end of the gate-alone phase: evaluate it, then fine-tune the heads too
                if seg_steps:
                    record(epoch + i / steps_per_epoch, totals, seg_steps,
                           _elapsed(t0, device), seg_cells)
                    model.gate.train()
                    t0, seg_steps, seg_cells, totals = time.perf_counter(), 0, 0, {}
                heads_trainable = True
                set_heads(True)
                head_params = [p for h in heads for p in h.parameters()]
                opt.add_param_group({"params": head_params, "lr": cfg.gate_head_lr,
                                     "base_lr": cfg.gate_head_lr, "start_step": step})
            _set_warmup_lr(opt, step, warmup)
            pos = perm[i * bs : (i + 1) * bs]
            u, c, t, y = res.batch(pos)
            out = model(u, t, c, freeze_heads=not heads_trainable)
            loss, terms = gate_loss(
                out, y, heads_trainable=heads_trainable, kl_weight=cfg.kl_weight,
                entropy_weight=cfg.entropy_weight, head_ce_weight=cfg.head_ce_weight,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in {"loss": loss.detach(), **terms}.items():
                totals[k] = totals.get(k, 0.0) + v
            step, seg_steps, seg_cells = step + 1, seg_steps + 1, seg_cells + pos.numel()
        record(epoch + 1, totals, seg_steps, _elapsed(t0, device), seg_cells)
        if stopper.should_stop:
            log(f"[gate] early stop: no better val macro-F1 for {cfg.patience} epoch(s)")
            break
    stopper.restore()
    for h in heads:
        h.requires_grad_(True)
    log(f"[gate] best val macro-F1 {stopper.best:.4f} at epoch {stopper.best_epoch:g}")
    return model.eval(), history


# ---------------------------------------------------------------------------- stages + I/O


def train_stage(
    stage: str,
    data: CellData,
    run_dir: str | Path,
    cfg: TrainConfig,
    *,
    split: Split | None = None,
    holdout: tuple[str, ...] | list[str] = (),
    before_save: Callable[[str], Any] | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Train `stage` (local, global, gate or all), reading earlier stages from `run_dir`.

    Saves RUN_DIR/<stage>.safetensors + .json per trained stage, recording the split's digest
    and the tissues with training cells; `before_save(name)` runs just before each is written
    (`heads.runs.train` saves the split there, and moves aside what the old stage made).
    Returns {"split": Split, "local"/"global"/"gate": (module, history)} for the stages trained.
    """
    if stage not in STAGE_CHOICES:
        raise UserError(f"unknown stage {stage!r}; choose one of {', '.join(STAGE_CHOICES)}")
    run_dir = Path(run_dir)
    dev = str(resolve_device(cfg.device))
    data.check_trainable()
    if stage in ("global", "gate"):
        info = ckpt.read_info(run_dir, "local")
        if data.classes != info["classes"] or data.tissues != info["tissues"]:
            data = data.remap(info["classes"], info["tissues"])
            data.check_trainable()
    if split is None:
        split = make_split(data.meta, holdout=holdout)
    for line in split.lines():
        log(line)
    # only stage 1 learns the tissue embedding: later stages have nothing to say about it
    tissues_trained, warnings = training_coverage(data, split, warn_tissues=stage in ("local", "all"))
    for line in warnings:
        log(line)
    out: dict[str, Any] = {"split": split}

    def save(name: str, modules: dict[str, nn.Module], history: list, extra: dict) -> None:
        best = max((r["val_macro_f1"] for r in history), default=None)
        if before_save is not None:
            before_save(name)
        ckpt.save_stage(
            run_dir, name, modules, classes=data.classes, tissues=data.tissues,
            dims={"local": data.local_dim, "context": data.context_dim},
            settings=cfg.to_dict(), history=history, provenance=data.provenance,
            split={**split.summary(), "digest": split.info.get("digest"), "trained_tissues": tissues_trained},
            metrics={"best_val_macro_f1": best, **extra},
        )  # fmt: skip
        log(f"[{name}] saved {run_dir / (name + '.safetensors')}")

    if stage in ("local", "all"):
        local, hist = train_local(data, split, cfg, log)
        save("local", {"local": local}, hist, {})
        out["local"] = (local, hist)
    else:
        local, _ = ckpt.load_local(run_dir, data, dev)
    if stage in ("global", "all"):
        context, hist = train_global(data, split, local, cfg, log)
        save("global", {"context": context}, hist, {"alpha": float(context.alpha)})
        out["global"] = (context, hist)
    elif stage == "gate":
        context, _ = ckpt.load_global(run_dir, data, dev)
    if stage in ("gate", "all"):
        model, hist = train_gate(data, split, local, context, cfg, log)
        save("gate", {"local": model.local, "context": model.context, "gate": model.gate},
             hist, {})
        out["gate"] = (model, hist)
    return out


@dataclass
class Heads:
    """Trained heads: the stage-1 and stage-2 heads as trained, and the stage-3 model.

    `gate` holds its own fine-tuned copies of both heads (p_gate mixes those, not `local` and
    `context`).
    """

    local: FiLMHead | None = None
    context: ContextHead | None = None
    gate: NuClass | None = None
    trained_tissues: list[str] | None = None  # None: not known (heads given in memory)


def load_heads(run_dir: str | Path, data: CellData | None = None, device: str = "cpu") -> Heads:
    """Every stage saved in `run_dir` (checked against `data` when given)."""
    dev = str(resolve_device(device))
    local, info = ckpt.load_local(run_dir, data, dev)
    heads = Heads(local=local, trained_tissues=trained_tissues(info))
    if ckpt.has_stage(run_dir, "global"):
        heads.context = ckpt.load_global(run_dir, data, dev)[0]
    if ckpt.has_stage(run_dir, "gate"):
        heads.gate = ckpt.load_gate(run_dir, data, dev)[0]
    return heads


def _as_heads(heads: Any) -> Heads:
    if isinstance(heads, Heads):
        return heads
    if isinstance(heads, NuClass):
        return Heads(gate=heads)
    if isinstance(heads, FiLMHead):
        return Heads(local=heads)
    if isinstance(heads, tuple) and len(heads) == 2:
        return Heads(local=heads[0], context=heads[1])
    raise TypeError(f"cannot predict with {type(heads).__name__}")


@torch.no_grad()
def predict_all(
    data: CellData,
    heads: str | Path | Heads | NuClass | FiLMHead | tuple[FiLMHead, ContextHead | None],
    device: str = "cpu",
    batch_size: int = 8192,
) -> dict[str, np.ndarray]:
    """Per-cell probabilities of every available path.

    `heads`: a run directory (checked against `data`: dims, provenance, classes, tissues; cells
    of a tissue without training cells in the run are refused), `Heads`, a `NuClass` model, a
    local head, or (local, context). Returns float32 arrays
    p_local / p_global (the stage-1 / stage-2 heads as trained; from a bare `NuClass`, its own
    heads), p_gate (N, C), gate (N,) = the weight of the global path, p_local_gate /
    p_global_gate (the gate model's fine-tuned paths: p_gate = (1 - g) p_local_gate +
    g p_global_gate), and pred_* / conf_* (argmax class index, int64, and its probability)
    for each of them.
    """
    dev = resolve_device(device)
    h = load_heads(heads, data, str(dev)) if isinstance(heads, (str, Path)) else _as_heads(heads)
    local = h.local if h.local is not None else (h.gate.local if h.gate is not None else None)
    context = h.context if h.context is not None else (h.gate.context if h.gate else None)
    if local is None:
        raise TypeError("predict_all needs at least a local head")
    if h.trained_tissues is not None:
        _refuse_untrained_tissues(data, h.trained_tissues)
    _check_heads(data, local, context)
    if h.gate is not None:
        _check_heads(data, h.gate.local, h.gate.context)
    fns: dict[str, Callable] = {"local": lambda u, t, c: local(u, t).softmax(1)}
    if context is not None:
        fns["global"] = lambda u, t, c: context(u, c).softmax(1)
    for m in (local, context, h.gate):
        if m is not None:
            m.to(dev).eval()
    n, n_classes = len(data), data.n_classes
    paths = list(fns) + (["gate", "local_gate", "global_gate"] if h.gate is not None else [])
    out = {f"p_{p}": np.empty((n, n_classes), dtype=np.float32) for p in paths}
    if h.gate is not None:
        out["gate"] = np.empty(n, dtype=np.float32)
    for i in range(0, n, batch_size):
        sl = slice(i, min(i + batch_size, n))
        u = data.local[sl].to(dev, non_blocking=True)
        t = data.tissue[sl].to(dev)
        c = data.context[sl].to(dev, non_blocking=True)
        probs = {}
        if h.gate is not None:
            r = h.gate(u, t, c)
            probs = {"gate": r["p_mix"], "local_gate": r["p_a"], "global_gate": r["p_b"]}
            out["gate"][sl] = r["g"].float().cpu().numpy()
        for p, fn in fns.items():
            if p == "local" and h.local is None:
                probs[p] = probs["local_gate"]  # a bare NuClass: its heads are the paths
            elif p == "global" and h.context is None and h.gate is not None:
                probs[p] = probs["global_gate"]
            else:
                probs[p] = fn(u, t, c)
        for p in paths:
            out[f"p_{p}"][sl] = probs[p].float().cpu().numpy()
    for p in paths:
        out[f"pred_{p}"] = out[f"p_{p}"].argmax(1).astype(np.int64)
        out[f"conf_{p}"] = out[f"p_{p}"].max(1)
    return out
