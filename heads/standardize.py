"""Per-feature standardisation of frozen embeddings, fitted on the training cells.

Foundation-model vectors are anisotropic: a few directions shared by every cell dominate, and
a LayerNorm over features (METHOD.md's first step) does not remove them. Subtracting each
feature's training mean and dividing by its standard deviation first (as a linear probe's
StandardScaler does) puts the informative variation on a usable scale. The statistics are
buffers, so they travel with the head's weights in its checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn


class Standardize(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: torch.Tensor, chunk: int = 65536) -> Standardize:
        """Mean and std of the rows of `x` (float64 accumulation, chunked for large sets)."""
        n = x.shape[0]
        total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        total_sq = torch.zeros_like(total)
        for i in range(0, n, chunk):
            part = x[i : i + chunk].double()
            total += part.sum(0)
            total_sq += (part * part).sum(0)
        mean = total / max(n, 1)
        var = (total_sq / max(n, 1) - mean * mean).clamp_min(0)
        self.mean.copy_(mean.to(self.mean.dtype))
        self.std.copy_(var.sqrt().clamp_min(self.eps).to(self.std.dtype))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
