"""Stage 3, the gate: per-cell fusion of the local and global paths in probability space."""

from __future__ import annotations

import math

import torch
from torch import nn

from heads.context import ContextHead
from heads.film import FiLMHead

N_STATS = 8
STAT_NAMES = (
    "maxp_a", "entropy_a", "margin_a", "maxp_b", "entropy_b", "margin_b", "delta", "abs_delta"
)


def path_statistics(p_a: torch.Tensor, p_b: torch.Tensor) -> torch.Tensor:
    """The gate's 8 per-cell statistics (N, 8), in `STAT_NAMES` order.

    Per path: max probability, normalised entropy H / log C, top-1 minus top-2 probability;
    then Δ = maxp_B - maxp_A and |Δ|.
    """
    cols = []
    for p in (p_a, p_b):
        n_classes = p.shape[1]
        top2 = p.topk(2, dim=1).values
        entropy = -torch.special.xlogy(p, p).sum(dim=1) / math.log(n_classes)
        cols += [top2[:, 0], entropy, top2[:, 0] - top2[:, 1]]
    delta = cols[3] - cols[0]
    cols += [delta, delta.abs()]
    return torch.stack(cols, dim=1)


def mix(p_a: torch.Tensor, p_b: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """p_mix = (1 - g) p_A + g p_B, g of shape (N,)."""
    g = g.unsqueeze(1)
    return (1 - g) * p_a + g * p_b


class GateHead(nn.Module):
    """g = sigmoid(MLP([fA, fB, stats])): fA from the local head's h', fB from [u', c']."""

    def __init__(
        self,
        local_feature_dim: int,
        context_feature_dim: int,
        n_classes: int,
        *,
        proj: int = 128,
        hidden: tuple[int, int] = (256, 64),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.local_feature_dim, self.context_feature_dim = local_feature_dim, context_feature_dim
        self.n_classes = n_classes
        self.f_a = nn.Sequential(
            nn.LayerNorm(local_feature_dim),
            nn.Linear(local_feature_dim, proj),
            nn.SiLU(),
            nn.Dropout(dropout),
        )
        self.f_b = nn.Sequential(
            nn.LayerNorm(context_feature_dim),
            nn.Linear(context_feature_dim, proj),
            nn.SiLU(),
            nn.Dropout(dropout),
        )
        self.mlp = nn.Sequential(
            nn.Linear(2 * proj + N_STATS, hidden[0]),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden[0], hidden[1]),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden[1], 1),
        )

    def config(self) -> dict:
        return {
            "local_feature_dim": self.local_feature_dim,
            "context_feature_dim": self.context_feature_dim,
            "n_classes": self.n_classes,
            "proj": self.f_a[1].out_features,
            "hidden": [self.mlp[0].out_features, self.mlp[3].out_features],
            "dropout": self.f_a[3].p,
        }

    def forward(
        self, h_a: torch.Tensor, feat_b: torch.Tensor, p_a: torch.Tensor, p_b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(p_mix, g, gate logit). The statistics are inputs only: no gradient flows through them."""
        stats = path_statistics(p_a.detach(), p_b.detach())
        logit = self.mlp(torch.cat([self.f_a(h_a), self.f_b(feat_b), stats], dim=1)).squeeze(1)
        g = torch.sigmoid(logit)
        return mix(p_a, p_b, g), g, logit


class NuClass(nn.Module):
    """The three heads together: local (FiLM), global (context) and gate."""

    def __init__(self, local: FiLMHead, context: ContextHead, gate: GateHead) -> None:
        super().__init__()
        self.local, self.context, self.gate = local, context, gate

    def forward(
        self, u: torch.Tensor, t: torch.Tensor, c: torch.Tensor, freeze_heads: bool = False
    ) -> dict[str, torch.Tensor]:
        """Logits, probabilities, p_mix and g. `freeze_heads`: no autograd graph for the heads."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze_heads):
            z_a, h_a = self.local(u, t, return_features=True)
            z_b, feat_b = self.context(u, c, return_features=True)
        p_a, p_b = z_a.softmax(dim=1), z_b.softmax(dim=1)
        p_mix, g, logit = self.gate(h_a, feat_b, p_a, p_b)
        return {
            "z_a": z_a, "z_b": z_b, "p_a": p_a, "p_b": p_b, "p_mix": p_mix, "g": g,
            "gate_logit": logit,
        }
