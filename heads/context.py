"""Stage 2, the global path: nucleus + context vectors, trained where the local path fails."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .standardize import Standardize

ALPHA_START = 0.25
ALPHA_RAMP_EPOCHS = 2.0


ALPHA_SCHEDULES = ("step", "epoch")


def alpha_at(epoch_progress: float, schedule: str = "step") -> float:
    """Context scale α after `epoch_progress` (fractional) epochs: 0.25 -> 1 over 2 epochs.

    "step" ramps linearly at every optimiser step (the default: no jump in the input scale);
    "epoch" steps once per epoch as the authors' code does (0.25, 0.625, 1.0).
    """
    if schedule not in ALPHA_SCHEDULES:
        raise ValueError(f"alpha schedule must be one of {ALPHA_SCHEDULES}, got {schedule!r}")
    progress = float(int(epoch_progress)) if schedule == "epoch" else epoch_progress
    frac = min(max(progress / ALPHA_RAMP_EPOCHS, 0.0), 1.0)
    return ALPHA_START + (1.0 - ALPHA_START) * frac


class ContextHead(nn.Module):
    """z_B = MLP([u', α c']), u' = Linear(LN(s(u))), c' = Linear(LN(s(c))), s = per-feature
    standardisation with training statistics (see `standardize`).

    Training also uses an internal gate g = sigmoid(MLP([u', c', a])) (a = the frozen local
    head's probability of the true class) to form z_F = z_A + g z_B; only z_B is exported, so
    inference needs neither z_A nor a. α is a buffer: the trainer ramps it, and a checkpoint
    carries the value its weights were trained with (1 once the ramp is over).
    """

    def __init__(
        self,
        local_dim: int,
        context_dim: int,
        n_classes: int,
        *,
        proj: int = 512,
        hidden: int = 1024,
        gate_hidden: int = 256,
        dropout: float = 0.2,
        context_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.local_dim, self.context_dim, self.n_classes = local_dim, context_dim, n_classes
        self.context_dropout = context_dropout
        self.standardize_u = Standardize(local_dim)  # fitted on the training cells
        self.standardize_c = Standardize(context_dim)
        self.norm_u = nn.LayerNorm(local_dim)
        self.proj_u = nn.Linear(local_dim, proj)
        self.norm_c = nn.LayerNorm(context_dim)
        self.proj_c = nn.Linear(context_dim, proj)
        self.drop_in = nn.Dropout(dropout)
        self.fc1 = nn.Linear(2 * proj, hidden)
        self.drop_hidden = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, n_classes)
        self.gate = nn.Sequential(
            nn.Linear(2 * proj + 1, gate_hidden), nn.SiLU(), nn.Linear(gate_hidden, 1)
        )
        self.register_buffer("alpha", torch.tensor(1.0))
        self.feature_dim = 2 * proj

    def config(self) -> dict:
        return {
            "local_dim": self.local_dim,
            "context_dim": self.context_dim,
            "n_classes": self.n_classes,
            "proj": self.proj_u.out_features,
            "hidden": self.fc1.out_features,
            "gate_hidden": self.gate[0].out_features,
            "dropout": self.drop_in.p,
            "context_dropout": self.context_dropout,
        }

    def set_alpha(self, value: float) -> None:
        self.alpha.fill_(value)

    def projections(self, u: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u', c'. In training, with probability `context_dropout` the whole batch's context
        is zeroed before its LayerNorm, as in the authors' code (c' is then the projection of
        the LayerNorm bias, a learnt "no context" input)."""
        u_p = self.proj_u(self.norm_u(self.standardize_u(u)))
        c_s = self.standardize_c(c)
        if self.training and self.context_dropout > 0:
            if float(torch.rand(())) < self.context_dropout:
                c_s = torch.zeros_like(c_s)
        return u_p, self.proj_c(self.norm_c(c_s))

    def classify(self, u_p: torch.Tensor, c_p: torch.Tensor) -> torch.Tensor:
        x = torch.cat([u_p, self.alpha * c_p], dim=1)
        return self.fc2(self.drop_hidden(F.silu(self.fc1(self.drop_in(x)))))

    def forward(
        self, u: torch.Tensor, c: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """z_B, and with `return_features` also [u', c'] (the gate's global feature)."""
        u_p, c_p = self.projections(u, c)
        z_b = self.classify(u_p, c_p)
        return (z_b, torch.cat([u_p, c_p], dim=1)) if return_features else z_b

    def forward_train(
        self, u: torch.Tensor, c: torch.Tensor, z_a: torch.Tensor, a: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_F, z_B, g) with z_F = z_A + g z_B and g = sigmoid(MLP([u', c', a]))."""
        u_p, c_p = self.projections(u, c)
        z_b = self.classify(u_p, c_p)
        g = torch.sigmoid(self.gate(torch.cat([u_p, c_p, a.unsqueeze(1)], dim=1)))
        return z_a + g * z_b, z_b, g.squeeze(1)
