"""What a rewritten site runs: fold the site's masks, bring q/k/v to the op's 4-d layout, call
``attnswap::attention``, and hand the result back in the layout the model expects.

The canonicalize pass replaces each attention site by one call to :func:`attention_site` whose
arguments are the site's activations and whose keyword arguments are the canonical attributes
(kind, scale, causal, dropout, options). Retargeting edits those keyword arguments; SAS and
QK-norm wrap the same call with learnable transforms of q, k and v (see ``runtime/extras.py``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..kernels.layout import in_layout
from ..kernels.op import attention
from ..kernels.reference import float_mask_is_masked

# (tensor, coefficient, shape the tensor was broadcast against or None)
FloatMask = tuple
# (tensor, negate, shape or None): attend where (~tensor if negate else tensor)
BoolMask = tuple
# ("add", t, coef, shape) | ("keep", t, negate, shape) | ("fill", t, negate, value, shape), in the
# order the model applies them (see fold_masks)
Mask = tuple


def _to_scores(t: torch.Tensor, at_shape, scores_shape) -> torch.Tensor:
    """``t`` was broadcast against the scores viewed as ``at_shape``; bring it to the scores'
    own shape. A ``-1`` in ``at_shape`` (a view's inferred size) is resolved from the scores."""
    if at_shape is None:
        return t
    shape = list(at_shape)
    if -1 in shape:
        known = 1
        for i, s in enumerate(shape):
            if i != shape.index(-1):
                known *= s
        numel = 1
        for s in scores_shape:
            numel *= s
        shape[shape.index(-1)] = numel // known
    return t.expand(*shape).reshape(scores_shape)


def _scores_shape(q: torch.Tensor, k: torch.Tensor, k_transposed: bool, shape) -> tuple:
    if shape is not None:  # a static shape recorded at compile time (a broadcasting site)
        return tuple(shape)
    return (*q.shape[:-1], k.shape[-1] if k_transposed else k.shape[-2])


def expand_to_scores(t: torch.Tensor, q: torch.Tensor, k: torch.Tensor, *, k_transposed=False,
                     shape=None):
    """``t.expand_as(q @ kᵀ)`` without computing the scores (GQA: q's heads)."""
    return t.expand(*_scores_shape(q, k, k_transposed, shape))


def scores_size(q: torch.Tensor, k: torch.Tensor, *dim, k_transposed=False, shape=None):
    """``(q @ kᵀ).size(*dim)`` without computing the scores: a shape check on the scores or
    probabilities (``if attn_weights.size() != ...: raise``, HF ProphetNet and older HF code) is
    a node of the graph once dynamo traces with symbolic sizes."""
    size = torch.Size(_scores_shape(q, k, k_transposed, shape))
    return size[dim[0]] if dim else size


def _legacy_masks(float_masks, bool_masks) -> list:
    return ([("add", m, c, a) for m, c, a in float_masks]
            + [("keep", m, n, a) for m, n, a in bool_masks])


def _attend(m, negate, at, scores_shape):
    t = _to_scores(m, at, scores_shape)
    if t.dtype != torch.bool:
        t = t.bool()
    return ~t if negate else t


def _float_masked(t: torch.Tensor) -> torch.Tensor:
    return torch.isneginf(t) | float_mask_is_masked(t)


def fold_masks(masks: Sequence[Mask], scores_shape, *, kind: str = "softmax", dtype=None):
    """One mask with the op's semantics (bool True = attend, float = added) and the rows whose
    scores the masks fully replace, ``(mask or None, replaced_rows or None)``.

    ``masks`` come in the order the model applies them. For softmax the result is exact:

    * ``add``: added, times the scales applied after it;
    * ``keep`` (a ``-inf`` fill): a hard mask;
    * ``fill`` (a finite fill, ``masked_fill(~keep, finfo.min)``): the entry *becomes* the value.
      Added to the scores, a value as large as ``finfo.min`` absorbs them exactly; and a query row
      whose every key was filled attends uniformly in the original (the mean of V): the caller
      zeroes q on those rows, so that the scores there are exactly the fill values.

    For sigmoid and ReLU, a masked entry (a fill, a ``-inf``, a float entry at most half the
    dtype's lowest value) has weight exactly 0, decided on the mask's own values before any
    later rescaling: a fully masked row gives 0 (there is no normalisation to make it uniform).
    """
    has_fill = any(m[0] == "fill" for m in masks)
    softmax = kind == "softmax"
    if softmax and has_fill:
        total, replaced = None, None  # float, and positions whose value no longer depends on S
        for m in masks:
            if m[0] == "add":
                t = _to_scores(m[1], m[3], scores_shape)
                t = t * m[2] if m[2] != 1.0 else t
                total = t if total is None else total + t
                continue
            hide = ~_attend(m[1], m[2], m[-1], scores_shape)
            value = float("-inf") if m[0] == "keep" else m[3]
            if total is None:
                total = torch.zeros((), dtype=dtype or torch.float32, device=hide.device)
            total = torch.where(hide, torch.tensor(value, dtype=total.dtype, device=hide.device),
                                total)
            replaced = hide if replaced is None else replaced | hide
        rows = replaced.all(-1, keepdim=True)
        # A replaced row holds only fill values (the caller zeroes q there). Shifted so that its
        # largest is 0, softmax is unchanged, and a kernel's log-sum-exp stays exact: at
        # finfo.min, ``max + log(sum)`` rounds back to ``max`` and the weights would come out
        # n times too large (SDPA's backward does exactly that).
        top = total.amax(-1, keepdim=True)
        total = torch.where(rows & torch.isfinite(top), total - top, total)
        return total, rows
    total, attend = None, None
    # One additive mask with coefficient 1 goes to the op as it is: the op hides the same
    # entries (at most half its dtype's lowest value), and marking them -inf here would cost
    # a few full passes over a [B, 1, T, T] mask on every call.
    lone = sum(1 for m in masks if m[0] == "add") == 1
    for m in masks:
        if m[0] == "add":
            t = _to_scores(m[1], m[3], scores_shape)
            if not softmax and t.dtype != torch.bool and not (lone and m[2] == 1.0):
                hidden = _float_masked(t)  # decided before rescaling (a mask added before 1/√d)
                t = t * m[2] if m[2] != 1.0 else t
                t = t.masked_fill(hidden, float("-inf"))
            elif m[2] != 1.0:
                t = t * m[2]
            total = t if total is None else total + t
        else:
            t = _attend(m[1], m[2], m[-1], scores_shape)
            attend = t if attend is None else attend & t
    if attend is None:
        return total, None
    if total is None:
        return attend, None
    return total.masked_fill(~attend, float("-inf")), None


def _batch_to_4d(t: torch.Tensor) -> torch.Tensor:
    r = t.dim()
    if r == 4:
        return t
    if r < 4:
        return t.reshape((1,) * (4 - r) + tuple(t.shape))
    return t.reshape(-1, *t.shape[-3:])


def attention_site(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    masks: Sequence[Mask] = (),
    float_masks: Sequence[FloatMask] = (),
    bool_masks: Sequence[BoolMask] = (),
    q_factors: Sequence[tuple] = (),
    k_factors: Sequence[tuple] = (),
    heads: int | None = None,
    head_axis: int | None = None,
    broadcast: bool = False,
    kind: str = "softmax",
    scale: float,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    k_transposed: bool = False,
    out_dtype: torch.dtype | None = None,
    options: dict | None = None,
    qkv_transform: Callable | None = None,
    out_layout: str | None = None,
) -> torch.Tensor:
    """Attention of ``kind`` with the layout of the site it replaces.

    ``q`` is ``[*batch, Tq, D]``; ``k`` is ``[*batch_kv, Tk, D]`` (or its transpose when
    ``k_transposed``); ``v`` is ``[*batch_kv, Tk, Dv]``. ``batch_kv`` may have fewer heads than
    ``batch`` (grouped-query attention, folded from ``repeat_kv``). ``q_factors`` are tensor
    scales of the scores constant along the key axis (a learned per-head temperature, cosine
    attention's logit scale, a 0-d tensor ``sqrt(d)``): ``(f·Q)Kᵀ = f·(QKᵀ)``, so they multiply q
    and the op's ``scale`` stays a float; ``k_factors``, constant along the queries, multiply k.
    ``heads``: a flattened-head site (``[B*H, T, D]``)
    computed as ``[B, H, T, D]``; ``head_axis``: where the heads sit when not at -3.
    ``out_layout``: the memory layout the site's own output had (``"bthd"``: an SDPA call on
    ``[B, T, H, D]``-in-memory views, whose output PyTorch's CPU kernel lays out that way), kept
    so the model's code after the site sees the strides it was written against.
    """
    masks = list(masks) + _legacy_masks(float_masks, bool_masks)
    if k_transposed:
        k = k.transpose(-2, -1)
    dtype = q.dtype
    for f, how in q_factors:
        q = q * f if how == "mul" else q / f
    for f, how in k_factors:  # [..., 1, Tk] (or [Tk]) scales key j: a column of the scores
        f = f.unsqueeze(-1) if f.dim() <= 1 else f.transpose(-2, -1)
        k = k * f if how == "mul" else k / f
    if q.dtype != dtype:
        q = q.to(dtype)
    if k.dtype != dtype:
        k = k.to(dtype)
    if v.dtype != dtype:
        v = v.to(dtype)
    if broadcast:
        batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        q, k, v = (t.expand(*batch, *t.shape[-2:]) for t in (q, k, v))
    scores_shape = (*q.shape[:-1], k.shape[-2])
    mask, replaced = fold_masks(masks, scores_shape, kind=kind, dtype=dtype)
    if replaced is not None:
        # rows whose scores the model replaced entirely by fill values: with q = 0 there the
        # op's scores are exactly those values (uniform weights for a constant fill).
        q = q.masked_fill(replaced, 0.0)
    if mask is not None and mask.dim() > q.dim():
        raise ValueError(f"attnswap: a mask of shape {tuple(mask.shape)} for scores "
                         f"{tuple(scores_shape)}")
    out_shape = None
    if heads is not None and q.dim() == 3 and v.dim() == 3:
        out_shape = (*q.shape[:-1], v.shape[-1])
        q, k, v = (t.reshape(-1, heads, *t.shape[-2:]) for t in (q, k, v))
        if mask is not None:
            mask = mask.expand(scores_shape).reshape(*q.shape[:-1], k.shape[-2])
        scores_shape = (*q.shape[:-1], k.shape[-2])
    elif v.dim() > q.dim():
        # Scores on flattened heads (bmm/baddbmm on [B*H, T, D]) viewed back to [B, H, T, S]
        # before the value matmul: compute in the value matmul's layout.
        q = q.reshape(*v.shape[:-2], q.shape[-2], q.shape[-1])
        k = k.reshape(*v.shape[:-2], k.shape[-2], k.shape[-1])
        if mask is not None:
            mask = mask.expand(scores_shape).reshape(*q.shape[:-1], k.shape[-2])
        scores_shape = (*q.shape[:-1], k.shape[-2])
    moved = (head_axis is not None and head_axis != -3 and q.dim() >= 5 and k.dim() == q.dim()
             and v.dim() == q.dim())
    if moved:
        q, k, v = (t.movedim(head_axis, -3) for t in (q, k, v))
        if mask is not None:
            mask = mask.expand(scores_shape).movedim(head_axis, -3)
        scores_shape = (*q.shape[:-1], k.shape[-2])
    batch_shape = q.shape[:-2]
    q4, k4, v4 = _batch_to_4d(q), _batch_to_4d(k), _batch_to_4d(v)
    if mask is not None and q.dim() > 4:
        mask = mask.expand(scores_shape).reshape(*q4.shape[:-1], k4.shape[-2])
    opts = dict(options or {})
    layout = out_layout if q.dim() == 4 and out_shape is None and not moved else None
    if qkv_transform is not None:
        out4 = qkv_transform(q4, k4, v4, mask, kind=kind, scale=scale, is_causal=is_causal,
                             dropout_p=dropout_p, options=opts)
        if layout is not None:
            out4 = in_layout(out4, layout)
    else:
        out4 = attention(q4, k4, v4, mask, kind=kind, scale=scale, is_causal=is_causal,
                         dropout_p=dropout_p, layout=layout, **opts)
    out = out4.reshape(*batch_shape, q.shape[-2], v.shape[-1])
    if moved:
        out = out.movedim(-3, head_axis)
    if out_shape is not None:
        out = out.reshape(out_shape)
    if out_dtype is not None and out.dtype != out_dtype:
        out = out.to(out_dtype)
    return out


def _mha_additive(mask, dtype):
    """nn.MultiheadAttention masks are True = *not* allowed; float masks are added."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def mha_site(
    query, key, value, embed_dim, num_heads, in_proj_weight, in_proj_bias, out_proj_weight,
    out_proj_bias, *, key_padding_mask=None, attn_mask=None, dropout_p=0.0, training=True,
    use_separate_proj_weight=False, q_proj_weight=None, k_proj_weight=None, v_proj_weight=None,
    kind="softmax", options=None, qkv_transform=None, batched=True,
):
    """``F.multi_head_attention_forward`` (sequence-first, no bias_k/bias_v/zero-attn) with the
    attention itself computed by ``attnswap::attention``; returns the attention output only."""
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt, bsz, _ = query.shape
    src = key.shape[0]
    head_dim = embed_dim // num_heads
    weights = ((q_proj_weight, k_proj_weight, v_proj_weight) if use_separate_proj_weight
               else in_proj_weight.chunk(3))
    biases = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
    q, k, v = (F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases))
    # [T, N, E] -> [N, H, T, hd]
    q = q.view(tgt, bsz, num_heads, head_dim).permute(1, 2, 0, 3)
    k = k.view(src, bsz, num_heads, head_dim).permute(1, 2, 0, 3)
    v = v.view(src, bsz, num_heads, head_dim).permute(1, 2, 0, 3)
    float_masks = []
    am = _mha_additive(attn_mask, q.dtype)
    if am is not None:
        am = am.view(bsz, num_heads, tgt, src) if am.dim() == 3 else am
        float_masks.append(("add", am, 1.0, None))
    kpm = _mha_additive(key_padding_mask, q.dtype)
    if kpm is not None:
        float_masks.append(("add", kpm.view(bsz, 1, 1, src), 1.0, None))
    out = attention_site(
        q, k, v, masks=float_masks, kind=kind, scale=head_dim ** -0.5,
        dropout_p=dropout_p if training else 0.0, options=options, qkv_transform=qkv_transform,
    )
    out = out.permute(2, 0, 1, 3).reshape(tgt * bsz, embed_dim)
    out = F.linear(out, out_proj_weight, out_proj_bias).view(tgt, bsz, embed_dim)
    if not batched:
        out = out.squeeze(1)
    return out
