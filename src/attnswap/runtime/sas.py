"""SAS, simulated attention score (arXiv 2507.07694; design §3): head and dim expansion, softmax
over the expanded heads, and the PEAA group average back to the model's heads."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.op import attention
from ..config import impl_default


# Head dims up to this run the head expansion as one dense matmul per conv (see HeadExpansion).
BAND_MAX_D = 32


def _shift(D: int, k: int, pad: int, device, dtype) -> torch.Tensor:
    """``[k, D, D]`` one-hot taps of a length-``D`` Conv1d (kernel ``k``, zero padding ``pad``):
    ``S[t, d_in, d_out] = 1`` iff ``d_in - d_out + pad == t``. Built with ``arange`` each call
    (not cached): inside a compiled graph it must be traced, not a constant tensor from outside
    (fake-tensor tracing refuses those)."""
    d = torch.arange(D, device=device)
    t = torch.arange(k, device=device)
    return ((d[:, None] - d[None, :] + pad)[None] == t[:, None, None]).to(dtype)


def _banded_stack(convs, D: int):
    """``n`` same-shaped ``Conv1d(Cin, Cout, k)`` over length ``D`` as dense ``[n, Cin·D, Cout·D]``
    matrices and ``[n, 1, Cout·D]`` biases: ``conv_i(x)`` for ``x [N, Cin, D]`` is
    ``x.view(N, Cin·D) @ W[i] + b[i]``. Built from the convs' own parameters each call with one
    matmul against the one-hot taps (:func:`_shift`), so the backward is a matmul too (an index
    gather's backward is a scatter-add); gradients flow back to the parameters and the
    state_dict stays the convs'."""
    w = torch.stack([c.weight for c in convs]) if len(convs) > 1 else convs[0].weight[None]
    n, cout, cin, k = w.shape
    shift = _shift(D, k, convs[0].padding[0], w.device, w.dtype)
    big = (w.reshape(n * cout * cin, k) @ shift.reshape(k, D * D)).view(n, cout, cin, D, D)
    big = big.permute(0, 2, 3, 1, 4).reshape(n, cin * D, cout * D)
    b = torch.stack([c.bias for c in convs]) if len(convs) > 1 else convs[0].bias[None]
    return big, b[:, None, :, None].expand(n, 1, cout, D).reshape(n, 1, cout * D)


def _banded(conv: nn.Conv1d, D: int):
    """One ``Conv1d`` as its ``[Cin·D, Cout·D]`` banded matrix and ``[Cout·D]`` bias."""
    w, b = _banded_stack([conv], D)
    return w[0], b[0, 0]


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D]`` → ``[B·T, H·D]``: a free view of the usual ``[B, T, H, D]`` projection."""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B * T, H * D)


def _expand_heads(mods, xs):
    """Head expansions of same-shaped inputs ``xs [B, H, T, D]``, batched: one bmm per conv for
    all of them. Returns ``[n, B·T, r·H·D]`` (token-major: ``[B, T, r·H, D]`` per input)."""
    B, H, T, D = xs[0].shape
    if D > BAND_MAX_D:
        return torch.stack([m.conv_forward(x).transpose(1, 2).reshape(B * T, -1)
                            for m, x in zip(mods, xs)])
    w1, b1 = _banded_stack([m.expand for m in mods], D)
    w2, b2 = _banded_stack([m.residual for m in mods], D)
    x = torch.stack([_tokens(x) for x in xs]) if len(xs) > 1 else _tokens(xs[0])[None]
    y = torch.baddbmm(b1, x, w1)
    return torch.baddbmm(b2, F.relu(y), w2).add_(y)


def _expand_dims(mods, ys):
    """Dim expansions of same-shaped ``ys [n, M, D]``, batched: ``[n, M, D']``."""
    n = len(mods)
    p = [m.proj for m in mods]
    r = [m.residual for m in mods]
    w1 = torch.stack([l.weight for l in p]).transpose(1, 2) if n > 1 else p[0].weight.t()[None]
    b1 = torch.stack([l.bias for l in p])[:, None] if n > 1 else p[0].bias[None, None]
    w2 = torch.stack([l.weight for l in r]).transpose(1, 2) if n > 1 else r[0].weight.t()[None]
    b2 = torch.stack([l.bias for l in r])[:, None] if n > 1 else r[0].bias[None, None]
    z = torch.baddbmm(b1, ys, w1)
    return torch.baddbmm(b2, F.relu(z), w2).add_(z)


def _group_mean(out: torch.Tensor, r: int, D: int) -> torch.Tensor:
    """PEAA: ``out [B, r·H, T, D'']`` → the mean of its ``r`` groups of ``H`` heads, first ``D``
    columns (``D'' > D`` where V was zero-padded). Summed over the full width, then sliced and
    scaled: the sum's backward is a free broadcast view and the slice's zero fill is 1/r of the
    heads. The gradient reaching the padded output columns is zero either way (they multiply
    V's zero columns)."""
    B, Hr, T, _ = out.shape
    return out.unflatten(1, (r, Hr // r)).sum(1)[..., :D] * (1.0 / r)


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
            y = _expand_heads([self], [x])[0]
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

    def expand(self, q, k, v):
        """Head and dim expansions: ``q [B, H, T, D]``, ``k, v [B, Hkv, Tk, D]`` →
        ``q2 [B, r·H, T, D']``, ``k2 [B, r·Hkv, Tk, D']``, ``v2 [B, r·Hkv, Tk, D]``.

        The expansions run token-major (``[B·T, heads·dim]``: free views of the projections'
        usual ``[B, T, H, D]``, and the layout PyTorch's CPU SDPA returns its gradients in) and
        batched: same-shaped q / k / v share one bmm per layer, q and k one per dim layer. Same
        math as the modules' own forwards (tests/test_sas_fast.py)."""
        B, H, T, D = q.shape
        Bk, Hkv, Tk, _ = k.shape
        Dv = v.shape[-1]
        r, D2 = self.ratio, self.dim
        if Hkv == H and Tk == T and Bk == B and Dv == D:
            qk, vh = _expand_heads([self.q_heads, self.k_heads, self.v_heads], [q, k, v]).split(
                [2, 1])  # split, not slicing: its backward is one cat, not zero-filled copies
            qd, kd = _expand_dims([self.q_dim, self.k_dim], qk.view(2, B * T * r * H, D))
        else:
            qh = _expand_heads([self.q_heads], [q])
            if Dv == D:
                kh, vh = _expand_heads([self.k_heads, self.v_heads], [k, v]).split([1, 1])
            else:  # (MLA: DeepSeek-V2/V3's value heads are narrower than q/k's)
                kh, vh = _expand_heads([self.k_heads], [k]), _expand_heads([self.v_heads], [v])
            qd = _expand_dims([self.q_dim], qh.view(1, -1, D))
            kd = _expand_dims([self.k_dim], kh.view(1, -1, D))
        return (qd.view(B, T, r * H, D2).transpose(1, 2),
                kd.view(Bk, Tk, r * Hkv, D2).transpose(1, 2),
                vh.view(Bk, Tk, r * Hkv, Dv).transpose(1, 2))

    def forward(self, q, k, v, mask, *, scale, is_causal, dropout_p, options):
        B, H, T, D = q.shape
        if k.shape[1] != self.kv_heads and k.shape[1] == H:
            # A capture that did not fold repeat_kv hands over repeated K/V: head j*G is kv head j.
            g = H // self.kv_heads
            k, v = k[:, ::g], v[:, ::g]
        q2, k2, v2 = self.expand(q, k, v)
        r, D2, Dv = self.ratio, self.dim, v.shape[-1]
        impl = options.get("impl") or impl_default()
        if Dv < D2 and q.device.type == "cpu" and impl in ("auto", "sdpa") and dropout_p == 0.0:
            # PyTorch's fused CPU kernel needs one head dim for q, k and v; else SDPA runs its
            # unfused math path (2.5x slower fwd+bwd at 8 heads, T = 64). Zero columns of V
            # add nothing to the outputs' first D columns: same math, sliced off below.
            v2 = F.pad(v2.transpose(1, 2), (0, D2 - Dv)).transpose(1, 2)
        if mask is not None:
            # SDPA broadcasting aligns a mask from the right: a rank-3 mask [H, Tq, Tk] is
            # per-head (timm LeViT / MaxViT / EfficientFormerV2 attention biases).
            while mask.dim() < 4:
                mask = mask.unsqueeze(0)
            if mask.shape[1] == H and H > 1:
                mask = mask.repeat(1, r, 1, 1)  # head g·H+h uses head h's mask
        # 1/sqrt(D') for the usual 1/sqrt(D) site scale; any other site scale keeps its ratio.
        sas_scale = scale * math.sqrt(D / D2)
        out = attention(q2, k2, v2, mask, kind="softmax", scale=sas_scale, is_causal=is_causal,
                        dropout_p=dropout_p, impl=impl)
        return _group_mean(out, r, Dv)
