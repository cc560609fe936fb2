"""Stage 1, the local path: a tissue-conditioned (FiLM) MLP head on the nucleus vector u."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .standardize import Standardize


class FiLMHead(nn.Module):
    """z_A = MLP(h'), h' = LN(s(u)) * (1 + γ_t) + β_t with [γ, β] from a tissue embedding,
    s = per-feature standardisation with training statistics (see `standardize`).

    `film=False` is the paper's "Concat" ablation: h' = [LN(u), Embedding_32(t)].
    `forward(..., return_features=True)` also returns h' (the gate's local feature).
    """

    def __init__(
        self,
        in_dim: int,
        n_tissues: int,
        n_classes: int,
        film: bool = True,
        *,
        hidden: int = 1024,
        tissue_dim: int | None = None,
        film_hidden: int = 128,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.in_dim, self.n_tissues, self.n_classes, self.film = in_dim, n_tissues, n_classes, film
        self.standardize = Standardize(in_dim)  # fitted on the training cells by the trainer
        self.norm = nn.LayerNorm(in_dim)
        if film:
            tissue_dim = 64 if tissue_dim is None else tissue_dim
            self.tissue_emb = nn.Embedding(n_tissues, tissue_dim)
            self.film_mlp = nn.Sequential(
                nn.Linear(tissue_dim, film_hidden), nn.SiLU(), nn.Linear(film_hidden, 2 * in_dim)
            )
            self.feature_dim = in_dim
        else:
            tissue_dim = 32 if tissue_dim is None else tissue_dim
            self.tissue_emb = nn.Embedding(n_tissues, tissue_dim)
            self.feature_dim = in_dim + tissue_dim
        self.tissue_dim = tissue_dim
        self.drop_in = nn.Dropout(dropout)
        self.fc1 = nn.Linear(self.feature_dim, hidden)
        self.drop_hidden = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, n_classes)

    def config(self) -> dict:
        """Constructor arguments (stored in checkpoints)."""
        return {
            "in_dim": self.in_dim,
            "n_tissues": self.n_tissues,
            "n_classes": self.n_classes,
            "film": self.film,
            "hidden": self.fc1.out_features,
            "tissue_dim": self.tissue_dim,
            "film_hidden": self.film_mlp[0].out_features if self.film else 128,
            "dropout": self.drop_in.p,
        }

    def features(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The modulated feature h' (N, feature_dim)."""
        h = self.norm(self.standardize(u))
        if not self.film:
            return torch.cat([h, self.tissue_emb(t)], dim=1)
        # γ/β depend on the tissue only: compute them once per tissue, then gather per cell
        gb = self.film_mlp(self.tissue_emb.weight)[t]
        gamma, beta = gb.chunk(2, dim=1)
        return h * (1 + gamma) + beta

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop_hidden(F.silu(self.fc1(self.drop_in(h)))))

    def forward(
        self, u: torch.Tensor, t: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = self.features(u, t)
        z = self.classify(h)
        return (z, h) if return_features else z
