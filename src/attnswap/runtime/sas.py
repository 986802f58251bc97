"""SAS, simulated attention score (arXiv 2507.07694; design §3): head and dim expansion, softmax
over the expanded heads, and the PEAA group average back to the model's heads."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.op import attention


# Head dims up to this run the head expansion as one dense matmul per conv (see HeadExpansion).
BAND_MAX_D = 32


def _tap_index(D: int, k: int, pad: int, device) -> torch.Tensor:
    """``[D, D]`` tap of a length-``D`` Conv1d (kernel ``k``, zero padding ``pad``) linking input
    position ``d_in`` to output ``d_out``: ``d_in - d_out + pad``, or ``k`` (a zero tap) outside
    the kernel. Built with ``arange`` each call (not cached): inside a compiled graph it must be
    traced, not a constant tensor from outside (fake-tensor tracing refuses those)."""
    d = torch.arange(D, device=device)
    tau = d[:, None] - d[None, :] + pad
    return torch.where((tau >= 0) & (tau < k), tau, torch.full_like(tau, k))


def _banded(conv: nn.Conv1d, D: int):
    """A ``Conv1d(Cin, Cout, k)`` over length ``D`` as a dense ``[Cin·D, Cout·D]`` matrix and its
    ``[Cout·D]`` bias: ``conv(x)`` for ``x [N, Cin, D]`` is ``x.view(N, Cin·D) @ W + b``. Built from
    the conv's own parameters each call (gradients flow back to them; the state_dict is the
    conv's)."""
    w = conv.weight  # [Cout, Cin, k]
    cout, cin, k = w.shape
    tau = _tap_index(D, k, conv.padding[0], w.device)
    big = F.pad(w, (0, 1))[:, :, tau]  # [Cout, Cin, D_in, D_out]
    return big.permute(1, 2, 0, 3).reshape(cin * D, cout * D), conv.bias.repeat_interleave(D)


class HeadExpansion(nn.Module):
    """H → r·H heads: ``Conv1d`` over the feature axis with heads as channels, then a
    pre-activation residual block ``x + Conv1d(ReLU(x))``.

    The convs are applied to all B·T tokens at once. For head dims up to :data:`BAND_MAX_D` each
    conv runs as one matmul of the tokens ``[B·T, H·D]`` (a free view of the usual ``[B, T, H, D]``
    projection output) with the conv's banded ``[H·D, H'·D]`` matrix: no transposes, no copies,
    one MKL call instead of ``Conv1d`` over B·T tiny ``[H, D]`` images (1.5x faster fwd+bwd at
    D = 12 on one core; the band costs D/k times the conv's FLOPs, so larger heads keep Conv1d:
    1.8x slower banded at D = 64). Same math either way (tests/test_sas_fast.py)."""

    def __init__(self, heads: int, ratio: int, kernel_size: int, init: str):
        super().__init__()
        self.heads, self.ratio = heads, ratio
        pad = kernel_size // 2
        self.expand = nn.Conv1d(heads, ratio * heads, kernel_size, padding=pad)
        self.residual = nn.Conv1d(ratio * heads, ratio * heads, kernel_size, padding=pad)
        if init == "identity":
            with torch.no_grad():
                # Centre tap copies head h to heads h, h+H, h+2H, ...: group g is the original.
                self.expand.weight.zero_()
                self.expand.bias.zero_()
                for g in range(ratio):
                    for h in range(heads):
                        self.expand.weight[g * heads + h, h, pad] = 1.0
                self.residual.weight.zero_()
                self.residual.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, T, D = x.shape
        if D <= BAND_MAX_D:
            w1, b1 = _banded(self.expand, D)
            w2, b2 = _banded(self.residual, D)
            y = torch.addmm(b1, x.transpose(1, 2).reshape(B * T, H * D), w1)
            y = y + torch.addmm(b2, F.relu(y), w2)
            return y.view(B, T, self.ratio * H, D).transpose(1, 2)
        return self.conv_forward(x)

    def conv_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's formulation: ``Conv1d`` over B·T images of ``[H, D]``."""
        B, H, T, D = x.shape
        y = x.transpose(1, 2).reshape(B * T, H, D)
        y = self.expand(y)
        y = y + self.residual(F.relu(y))
        return y.view(B, T, self.ratio * H, D).transpose(1, 2)


class DimExpansion(nn.Module):
    """D → D' for q and k: ``Linear(D, D')`` then ``x + Linear(D', D')(ReLU(x))``."""

    def __init__(self, dim: int, new_dim: int, init: str):
        super().__init__()
        self.proj = nn.Linear(dim, new_dim)
        self.residual = nn.Linear(new_dim, new_dim)
        if init == "identity":
            with torch.no_grad():
                # [I; 0] scaled by (D'/D)^(1/4): with the SAS scale below, logits are unchanged.
                self.proj.weight.zero_()
                self.proj.weight[:dim, :dim] = torch.eye(dim) * (new_dim / dim) ** 0.25
                self.proj.bias.zero_()
                self.residual.weight.zero_()
                self.residual.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        return y + self.residual(F.relu(y))


class SAS(nn.Module):
    """Simulated attention score: expanded heads and dims, softmax, PEAA group average."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, ratio: int = 2,
                 dim: int | None = None, kernel_size: int = 3, init: str = "identity"):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.ratio = heads, kv_heads, head_dim, ratio
        self.dim = dim or 2 * head_dim
        self.q_heads = HeadExpansion(heads, ratio, kernel_size, init)
        self.k_heads = HeadExpansion(kv_heads, ratio, kernel_size, init)
        self.v_heads = HeadExpansion(kv_heads, ratio, kernel_size, init)
        self.q_dim = DimExpansion(head_dim, self.dim, init)
        self.k_dim = DimExpansion(head_dim, self.dim, init)

    def forward(self, q, k, v, mask, *, scale, is_causal, dropout_p, options):
        B, H, T, D = q.shape
        if k.shape[1] != self.kv_heads and k.shape[1] == H:
            # A capture that did not fold repeat_kv hands over repeated K/V: head j*G is kv head j.
            g = H // self.kv_heads
            k, v = k[:, ::g], v[:, ::g]
        q2 = self.q_dim(self.q_heads(q))
        k2 = self.k_dim(self.k_heads(k))
        v2 = self.v_heads(v)
        if mask is not None:
            # SDPA broadcasting aligns a mask from the right: a rank-3 mask [H, Tq, Tk] is
            # per-head (timm LeViT / MaxViT / EfficientFormerV2 attention biases).
            while mask.dim() < 4:
                mask = mask.unsqueeze(0)
            if mask.shape[1] == H and H > 1:
                mask = mask.repeat(1, self.ratio, 1, 1)  # head g·H+h uses head h's mask
        # 1/sqrt(D') for the usual 1/sqrt(D) site scale; any other site scale keeps its ratio.
        sas_scale = scale * math.sqrt(D / self.dim)
        opts = {k_: v_ for k_, v_ in options.items() if k_ in ("impl",)}
        out = attention(q2, k2, v2, mask, kind="softmax", scale=sas_scale, is_causal=is_causal,
                        dropout_p=dropout_p, **opts)
        return out.view(B, self.ratio, H, T, out.shape[-1]).mean(1)
