"""QK-norm: a LayerNorm or RMSNorm over the head dim on q and k, before the scores."""

from __future__ import annotations

import torch.nn as nn


class QKNorm(nn.Module):
    """LayerNorm or RMSNorm over the head dim on q and k (separate weights)."""

    def __init__(self, head_dim: int, norm: str = "layernorm"):
        super().__init__()
        make = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}[norm]
        self.q = make(head_dim)
        self.k = make(head_dim)

    def forward(self, q, k):
        return self.q(q), self.k(k)
