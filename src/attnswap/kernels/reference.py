"""Plain-math definition of every attention kind: the oracle every kernel is tested against.

Materializes the full score matrix on purpose: it is short and obviously correct, never fast.
Conventions are those of ``F.scaled_dot_product_attention`` (DESIGN.md §2):

* q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]``, v ``[B, Hkv, Tk, Dv]``; query head ``h`` reads
  key/value head ``h // (Hq // Hkv)`` (GQA, the ``repeat_kv`` / ``repeat_interleave`` order).
* bool mask: True = attend. float mask: added to the scores.
* ``is_causal``: top-left aligned, query ``i`` sees keys ``j <= i``.
* Sigmoid and ReLU weights are exactly 0 at masked positions. For them a float-mask entry that
  is ``-inf`` or at most half the dtype's lowest value is a *masked* position (that is how
  HuggingFace and friends spell "masked" in additive masks); every other float entry is a bias.

Everything is computed in fp32 (fp64 stays fp64) and returned in the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dropout import dropout_keep_mask

ACTIVATIONS = ("relu", "relu2", "gelu", "softplus", "identity", "relu6", "sigmoid")
KINDS = ("softmax", "sigmoid", "relu")


def apply_activation(name: str, s: torch.Tensor) -> torch.Tensor:
    """The ReLU-attention family's h(S)."""
    if name == "relu":
        return torch.relu(s)
    if name == "relu2":
        return torch.relu(s) ** 2
    if name == "gelu":
        return F.gelu(s)
    if name == "softplus":
        return F.softplus(s)
    if name == "identity":
        return s
    if name == "relu6":
        return F.relu6(s)
    if name == "sigmoid":
        return torch.sigmoid(s)
    raise ValueError(f"activation={name!r} is not one of {ACTIVATIONS}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_threshold(dtype: torch.dtype) -> float:
    """A float-mask entry at or below this (half the dtype's lowest value) hides its key."""
    return 0.5 * torch.finfo(dtype).min


def float_mask_is_masked(mask: torch.Tensor) -> torch.Tensor:
    """Positions a float (additive) mask means to hide, for the kinds that are not softmax."""
    return mask <= masked_threshold(mask.dtype)


def visible_mask(
    attn_mask: torch.Tensor | None, is_causal: bool, tq: int, tk: int, device
) -> torch.Tensor:
    """Bool ``[..., Tq, Tk]`` (broadcastable): True where a query may attend a key."""
    vis = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if is_causal:
        vis = torch.ones(tq, tk, dtype=torch.bool, device=device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            vis = vis & attn_mask
        else:
            vis = vis & ~float_mask_is_masked(attn_mask)
    return vis


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    kind: str = "softmax",
    scale: float | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    sigmoid_bias: float | None = None,
    activation: str = "relu",
    alpha: float = 1.0,
    length: int | str | None = None,
) -> torch.Tensor:
    """Attention of the given kind, written as plainly as possible.

    ``length`` (relu only): ``None``/``"keys"`` → Tk; ``"visible"`` → per-row count of unmasked
    keys; an int → that constant. ``sigmoid_bias``: ``None`` → ``-ln(Tk)``; a float pins b.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    ct = compute_dtype(q.dtype)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    groups = Hq // Hkv
    qf = q.to(ct)
    kf = k.to(ct).repeat_interleave(groups, dim=1)
    vf = v.to(ct).repeat_interleave(groups, dim=1)
    s = scale * (qf @ kf.transpose(-1, -2))  # [B, Hq, Tq, Tk]
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        m = attn_mask.to(ct)
        # Masked positions of a float mask must not leak into h(S) as huge numbers.
        s = s + (m if kind == "softmax" else m.masked_fill(float_mask_is_masked(m), 0.0))
    vis = visible_mask(attn_mask, is_causal, Tq, Tk, q.device).expand(B, Hq, Tq, Tk)

    if kind == "softmax":
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            # Float masks are pure additions for softmax (SDPA); only causal/bool hide keys.
            hide = ~visible_mask(None, is_causal, Tq, Tk, q.device).expand(B, Hq, Tq, Tk)
        else:
            hide = ~vis
        s = s.masked_fill(hide, float("-inf"))
        # SDPA (torch >= 2.5) returns 0, not NaN, for a row with no visible key; masking before
        # the softmax (not nan_to_num after) keeps that row's gradients finite too.
        dead = torch.isneginf(s).all(-1, keepdim=True)
        p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    elif kind == "sigmoid":
        b = -math.log(max(Tk, 1)) if sigmoid_bias is None else sigmoid_bias  # no keys: output 0
        p = torch.sigmoid(s + b).masked_fill(~vis, 0.0)
    elif kind == "relu":
        h = apply_activation(activation, s).masked_fill(~vis, 0.0)
        if length is None or length == "keys":
            n = torch.tensor(float(Tk), dtype=ct)
        elif length == "visible":
            n = vis.sum(-1, keepdim=True).to(ct)
        else:
            n = torch.tensor(float(length), dtype=ct)
        # A row with nothing visible has h == 0 everywhere; keep it 0 rather than 0 * inf.
        p = h * torch.where(n > 0, n.clamp_min(1.0) ** (-alpha), torch.zeros_like(n))
    else:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")

    if dropout_p > 0.0:
        keep = dropout_keep_mask(dropout_seed, dropout_p, (B, Hq, Tq, Tk), device=q.device)
        p = p * keep.to(ct) / (1.0 - dropout_p)
    return (p @ vf).to(q.dtype)
