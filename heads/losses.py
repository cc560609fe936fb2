"""Loss terms of the three stages, each a small function of tensors.

Conventions: `y` holds class indices (all >= 0: callers drop unlabelled cells first); `w` is a
per-cell weight; "mean" is over the cells of the batch unless said otherwise.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

EPS = 1e-8


def class_balanced_weights(counts: torch.Tensor, beta: float = 0.9999) -> torch.Tensor:
    """Effective-number weights (1 - β) / (1 - β^n_c), normalised to sum to C.

    Classes with no training cell get weight 0 (they cannot be learnt; an infinite weight
    would poison the loss); the others then sum to C.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    n_classes = counts.numel()
    present = counts > 0
    w = torch.zeros_like(counts)
    w[present] = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64),
                                                 counts[present]))
    w = w * n_classes / w.sum()
    return w.to(torch.float32)


def cross_entropy(
    logits: torch.Tensor,
    y: torch.Tensor,
    *,
    smoothing: float = 0.0,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Label-smoothed cross-entropy, each cell weighted by its own class's weight.

    Cell i's loss is w[y_i] [(1 - ε) (-log p_i[y_i]) + ε mean_c (-log p_i[c])]; "mean" divides
    by sum_i w[y_i]. Without weights, or with ε = 0, this is exactly
    `torch.nn.functional.cross_entropy(weight=w, label_smoothing=ε)`.

    With both it differs from that call (the authors'): torch weights each class's smoothing
    term by that class's weight, (ε / C) sum_c w[c] (-log p_i[c]), whatever the cell's class, so
    every cell is pulled towards the heavily weighted rare classes. Past an imbalance of about
    (2 - ε) / ε : 1 in weights for 2 classes (19:1 at ε = 0.1) the loss-optimal prediction for a
    perfectly fitted majority cell is the rare class, and a trained head calls most cells rare.
    Here the smoothing term carries the cell's own weight, as its NLL term does.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    logp = F.log_softmax(logits, dim=1)
    loss = -logp.gather(1, y.unsqueeze(1)).squeeze(1)
    if smoothing:
        loss = (1.0 - smoothing) * loss - smoothing * logp.mean(dim=1)
    w = torch.ones_like(loss) if weight is None else weight.to(logits.dtype)[y]
    if reduction == "none":
        return w * loss
    return (w * loss).sum() / w.sum()


def uncertainty_weights(a: torch.Tensor) -> torch.Tensor:
    """(1 - a)^2, a = the local path's probability of the true class."""
    return (1.0 - a) ** 2


def stage2_loss(
    z_f: torch.Tensor,
    z_b: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    class_weights: torch.Tensor,
    *,
    smoothing: float = 0.05,
    aux_weight: float = 0.3,
) -> torch.Tensor:
    """mean((1 - a)^2 CE_ls(z_F, y)) + 0.3 CE_cb,ls(z_B, y)."""
    fused = (uncertainty_weights(a) * cross_entropy(z_f, y, smoothing=smoothing,
                                                    reduction="none")).mean()
    aux = cross_entropy(z_b, y, smoothing=smoothing, weight=class_weights)
    return fused + aux_weight * aux


def gate_targets(
    p_a: torch.Tensor, p_b: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, w, gap), all detached; gap = p_y^B - p_y^A, "right" = argmax equals y.

    t = 1 if only B is right, 0 if only A is right, else sigmoid(10 gap);
    w = 1 + 2 [exactly one path right] + |gap|.
    """
    p_a, p_b = p_a.detach(), p_b.detach()
    gap = p_b.gather(1, y.unsqueeze(1)).squeeze(1) - p_a.gather(1, y.unsqueeze(1)).squeeze(1)
    right_a = p_a.argmax(dim=1) == y
    right_b = p_b.argmax(dim=1) == y
    t = torch.sigmoid(10.0 * gap)
    t = torch.where(right_b & ~right_a, torch.ones_like(t), t)
    t = torch.where(right_a & ~right_b, torch.zeros_like(t), t)
    w = 1.0 + 2.0 * (right_a ^ right_b).to(gap.dtype) + gap.abs()
    return t, w, gap


def mixture_nll(p_mix: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """mean(w * -log p_mix[y])."""
    return (w * -torch.log(p_mix.gather(1, y.unsqueeze(1)).squeeze(1).clamp_min(EPS))).mean()


def auto_pos_weight(t: torch.Tensor, clamp: tuple[float, float] = (1e-3, 1 - 1e-3)) -> torch.Tensor:
    """BCE pos_weight = (1 - q) / q, q = the batch's (soft) share of positive targets clamped
    to [0.001, 0.999], as in the authors' code (so pos_weight spans 0.001..999)."""
    q = t.detach().mean().clamp(*clamp)
    return (1.0 - q) / q


def gate_bce(
    logit: torch.Tensor, t: torch.Tensor, w: torch.Tensor, pos_weight: torch.Tensor
) -> torch.Tensor:
    """mean(-w [pw t log g + (1 - t) log(1 - g)]), g = sigmoid(logit)."""
    return F.binary_cross_entropy_with_logits(logit, t, weight=w, pos_weight=pos_weight)


def selected_probs(p_a: torch.Tensor, p_b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per cell, the path the target favours (B where t > 0.5, else A), detached."""
    return torch.where((t > 0.5).unsqueeze(1), p_b, p_a).detach()


def selection_kl(p_sel: torch.Tensor, p_mix: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """mean(w KL(p_sel || p_mix)), KL(p || q) = sum_c p_c (log p_c - log q_c)."""
    kl = (torch.special.xlogy(p_sel, p_sel) - p_sel * torch.log(p_mix.clamp_min(EPS))).sum(dim=1)
    return (w * kl).mean()


def binary_entropy_from_logit(logit: torch.Tensor) -> torch.Tensor:
    """H(g) = -g log g - (1 - g) log(1 - g) in nats, g = sigmoid(logit), computed stably."""
    g = torch.sigmoid(logit)
    return -(g * F.logsigmoid(logit) + (1.0 - g) * F.logsigmoid(-logit))


def gate_entropy_penalty(logit: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
    """mean(H(g) |gap|): the gate should be decisive where the two paths disagree most."""
    return (binary_entropy_from_logit(logit) * gap.detach().abs()).mean()


def gate_loss(
    out: dict[str, torch.Tensor],
    y: torch.Tensor,
    *,
    heads_trainable: bool,
    kl_weight: float = 0.1,
    entropy_weight: float = 0.05,
    head_ce_weight: float = 0.05,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The stage-3 loss on a `NuClass` forward output; returns (total, {term: detached value})."""
    t, w, gap = gate_targets(out["p_a"], out["p_b"], y)
    terms = {
        "nll": mixture_nll(out["p_mix"], y, w),
        "bce": gate_bce(out["gate_logit"], t, w, auto_pos_weight(t)),
        "kl": kl_weight * selection_kl(selected_probs(out["p_a"], out["p_b"], t), out["p_mix"], w),
        "entropy": entropy_weight * gate_entropy_penalty(out["gate_logit"], gap),
    }
    if heads_trainable:
        heads_ce = 0.5 * (cross_entropy(out["z_a"], y) + cross_entropy(out["z_b"], y))
        terms["heads_ce"] = head_ce_weight * heads_ce
    total = sum(terms.values())
    return total, {k: v.detach() for k, v in terms.items()}
