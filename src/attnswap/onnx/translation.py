"""ONNX translation of ``attnswap::attention`` into standard ONNX ops.

``torch.onnx.export(..., dynamo=True, custom_translation_table={op: fn})`` calls ``fn`` with the
FX node's arguments: ONNX IR values for the tensors (``None`` for an absent mask) and Python
constants for everything else. So ``kind``, ``activation``, ``length`` ... are known when the
graph is built and we branch on them in Python; everything that depends on a runtime shape
(the causal triangle, ``Tk`` in ``-ln(Tk)`` and ``L = Tk``, the GQA group count) is computed from
``Shape`` nodes, so dynamic batch and sequence axes work.

Only standard ONNX ops are emitted (MatMul, Mul, Add, Where, Softmax, Sigmoid, Relu, Clip, Erf,
Softplus, ReduceSum, Pow, Range, Expand, Reshape, ...), at opset 18 or later, so stock
onnxruntime runs the result. The math mirrors :mod:`attnswap.kernels.reference` exactly
(docs/design.md §2):

* compute in fp32 (fp64 stays fp64), output in the input dtype;
* GQA: query head ``h`` reads key/value head ``h // (Hq // Hkv)`` (``repeat_interleave`` order);
* causal is top-left aligned (query ``i`` sees keys ``j <= i``);
* bool mask True = attend; a float mask is added to the scores; for sigmoid/relu a float-mask
  entry ``<= 0.5 * finfo(mask dtype).min`` (or ``-inf``) is a *masked* position (weight exactly 0);
* softmax: masked → ``-inf`` then softmax, a fully-masked row gives 0 (not NaN);
* sigmoid: ``σ(S + b)``, ``b = -ln(Tk)`` from the runtime key length or the pinned
  ``sigmoid_bias``; relu: ``L^-α · h(S)`` with the mask applied *after* ``h``.

Softmax: at opset >= 23, a softmax site with no mask or a bool mask becomes one ONNX
``Attention`` node (onnxruntime 1.32's CPU kernel matches the reference there, fully-masked rows
included, and ran about 2x faster than the decomposition for B=4, H=8, T=512, D=64 causal).
Below opset 23, or with a float mask, softmax is the decomposition MatMul → Add/Where → Softmax
→ MatMul (+ a NaN → 0 guard for fully-masked rows): onnxruntime's ``Attention`` zeroes a row
whose float mask is all ``finfo.min`` where SDPA averages it, and rejects a mask that broadcasts
over the query axis (we expand it). ``make_translation(attention_op=...)`` forces either choice.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

# The ONNX opset our decomposition needs at least (ReduceSum with axes as an input is opset 13,
# torch's exporter itself needs 18).
MIN_OPSET = 18
# Features that need a newer opset.
GELU_OPSET = 20  # the ``Gelu`` op; older opsets get the exact erf decomposition
ATTENTION_OP_OPSET = 23  # the ``Attention`` op (softmax only)

_LENGTH_KEYS = 0
_LENGTH_VISIBLE = -1


class TranslationError(ValueError):
    """An ``attnswap::attention`` call that cannot be exported as it is (e.g. dropout_p > 0)."""


def _onnx_modules():
    from onnxscript import ir  # noqa: F401  (onnxscript re-exports onnx_ir)
    from onnxscript import opset18

    return ir, opset18


def _np_dtype(ir_dtype) -> np.dtype:
    """numpy dtype of an ONNX IR float dtype (bfloat16 → None: numpy has none)."""
    from onnxscript import ir

    table = {
        ir.DataType.FLOAT: np.float32,
        ir.DataType.DOUBLE: np.float64,
        ir.DataType.FLOAT16: np.float16,
    }
    return table.get(ir_dtype)


def _finfo_min(ir_dtype) -> float:
    """``torch.finfo(dtype).min`` of an ONNX IR float dtype, as a Python float."""
    from onnxscript import ir

    import torch

    table = {
        ir.DataType.FLOAT: torch.float32,
        ir.DataType.DOUBLE: torch.float64,
        ir.DataType.FLOAT16: torch.float16,
        ir.DataType.BFLOAT16: torch.bfloat16,
    }
    if ir_dtype not in table:
        raise TranslationError(
            f"attn_mask of ONNX dtype {ir_dtype} is not supported; use a bool mask or a float32/"
            "float64/float16/bfloat16 additive mask"
        )
    return float(torch.finfo(table[ir_dtype]).min)


def _static_dim(value, axis: int):
    """The int size of ``value``'s ``axis`` when it is known at export time, else None."""
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    try:
        dim = shape[axis]
    except (IndexError, TypeError):
        return None
    return dim if isinstance(dim, int) else None


class _Builder:
    """Small helpers around an onnxscript opset, bound to a compute dtype.

    Int lists for int64-only inputs (axes, shapes) are passed as Python values (the exporter's
    tracer turns them into Constants, deduplicated across the graph); float scalars go through
    :meth:`c`; variadic inputs (Concat, Max, Min) and Pow's exponent get explicit Constant nodes
    (:meth:`const_node`, :meth:`ints_node`).
    """

    def __init__(self, op, ct):
        from onnxscript import ir

        self.op = op
        self.ir = ir
        self.ct = ct  # ir.DataType of the compute dtype
        self.np_ct = _np_dtype(ct)

    def c(self, value: float):
        """A compute-dtype scalar: a Python float in fp32 (typed FLOAT and deduplicated by the
        tracer), a Constant node in fp64 (the tracer does not always know the dtype of the
        values we create, and would type a bare Python float as FLOAT)."""
        if self.ct == self.ir.DataType.FLOAT:
            return float(value)
        return self.const_node(value)

    def const_node(self, value: float):
        return self.op.Constant(value=self.ir.tensor(np.array(value, dtype=self.np_ct)))

    def ints_node(self, values):
        return self.op.Constant(value=self.ir.tensor(np.array(values, dtype=np.int64)))

    def dim(self, x, axis: int):
        """Runtime size of ``x``'s ``axis`` as an int64 tensor of shape [1]."""
        return self.op.Shape(x, start=axis, end=axis + 1)

    def scalar_dim(self, x, axis: int):
        return self.op.Squeeze(self.dim(x, axis), [0])

    def cast(self, x, to):
        if getattr(x, "dtype", None) == to:
            return x
        return self.op.Cast(x, to=to)


def _repeat_kv(b: _Builder, x, q):
    """``x.repeat_interleave(Hq // Hkv, dim=1)``: [B, Hkv, T, D] → [B, Hq, T, D].

    Through [B, Hkv, 1, T, D] → expand [B, Hkv, G, T, D] → reshape, so query head h reads
    key/value head h // G. Head counts and D are static in practice (constant shapes, 3 nodes);
    otherwise the group count comes from runtime shapes.
    """
    op = b.op
    hq, hkv, d = _static_dim(q, 1), _static_dim(x, 1), _static_dim(x, 3)
    if hq is not None and hkv is not None and hq == hkv:
        return x
    x5 = op.Unsqueeze(x, [2])
    if hq is not None and hkv is not None and d is not None:
        x5 = op.Expand(x5, [1, 1, hq // hkv, 1, 1])
        return op.Reshape(x5, [0, hq, -1, d])
    shape = op.Shape(x)  # [4]
    B = op.Slice(shape, [0], [1])
    Hkv = op.Slice(shape, [1], [2])
    TD = op.Slice(shape, [2], [4])
    Hq = b.dim(q, 1)
    x5 = op.Expand(x5, op.Concat(B, Hkv, op.Div(Hq, Hkv), TD, axis=0))
    return op.Reshape(x5, op.Concat(B, Hq, TD, axis=0))


def _causal_triangle(b: _Builder, q, k):
    """Bool [Tq, Tk]: True where key j <= query i (top-left aligned), from runtime shapes."""
    op = b.op
    rows = op.Unsqueeze(op.Range(0, b.scalar_dim(q, 2), 1), [1])  # [Tq, 1]
    cols = op.Range(0, b.scalar_dim(k, 2), 1)  # [Tk]
    return op.LessOrEqual(cols, rows)


def _activation(b: _Builder, name: str, s, opset: int):
    op = b.op
    if name == "relu":
        return op.Relu(s)
    if name == "relu2":
        r = op.Relu(s)
        return op.Mul(r, r)
    if name == "gelu":
        if opset >= GELU_OPSET:
            from onnxscript import opset20

            return opset20.Gelu(s, approximate="none")
        # exact gelu: 0.5 · x · (1 + erf(x / √2))
        return op.Mul(op.Mul(s, b.c(0.5)), op.Add(op.Erf(op.Mul(s, b.c(math.sqrt(0.5)))), b.c(1.0)))
    if name == "softplus":
        # torch's softplus (beta=1, threshold=20): x above the threshold, log1p(exp(x)) below.
        # Computing log(1 + exp(min(x, 20))) keeps Exp finite in the unselected branch.
        soft = op.Softplus(op.Min(s, b.const_node(20.0)))
        return op.Where(op.Greater(s, b.c(20.0)), s, soft)
    if name == "identity":
        return s
    if name == "relu6":
        return op.Clip(s, b.c(0.0), b.c(6.0))
    if name == "sigmoid":
        return op.Sigmoid(s)
    raise TranslationError(
        f"activation={name!r} has no ONNX translation; choose one of "
        "('relu', 'relu2', 'gelu', 'softplus', 'identity', 'relu6', 'sigmoid')"
    )


def make_translation(opset: int = MIN_OPSET, *, attention_op: bool | None = None) -> Callable:
    """A translation function for ``torch.ops.attnswap.attention.default`` at ``opset``.

    ``opset`` picks newer single ops where they exist (``Gelu`` at 20, ``Attention`` at 23);
    the decomposition itself is valid at any opset >= 18.

    ``attention_op`` decides how *softmax* sites without a float mask are emitted:
    ``None`` (auto) → the opset-23 ``Attention`` op when ``opset >= 23``, else the decomposition;
    ``True`` → always the ``Attention`` op (``ValueError`` below opset 23); ``False`` → always the
    decomposition. Softmax sites with a float mask always use the decomposition: onnxruntime's
    ``Attention`` zeroes rows whose mask is all ``finfo.min`` where SDPA (and so the reference)
    averages them. float64 sites also stay decomposed (fp64 compute).
    """
    opset = int(opset)
    if opset < MIN_OPSET:
        raise ValueError(
            f"opset {opset} is too old: exporting attnswap::attention needs ONNX opset >= "
            f"{MIN_OPSET}"
        )
    if attention_op and opset < ATTENTION_OP_OPSET:
        raise ValueError(
            f"attention_op=True needs ONNX opset >= {ATTENTION_OP_OPSET} (the Attention op); "
            f"got opset {opset}. Pass opset={ATTENTION_OP_OPSET} or attention_op=None."
        )
    use_attention_op = opset >= ATTENTION_OP_OPSET if attention_op is None else bool(attention_op)

    def attnswap_attention(
        q,
        k,
        v,
        attn_mask=None,
        kind: str = "softmax",
        scale: float = 1.0,
        is_causal: bool = False,
        dropout_p: float = 0.0,
        dropout_seed=None,
        sigmoid_bias=None,
        activation: str = "relu",
        alpha: float = 1.0,
        length: int = _LENGTH_KEYS,
        fast_sigmoid: bool = False,
        impl: str = "auto",
    ):
        # dropout_seed, fast_sigmoid and impl do not change the inference math: ignored.
        return _translate(
            q, k, v, attn_mask, kind=kind, scale=scale, is_causal=is_causal, dropout_p=dropout_p,
            sigmoid_bias=sigmoid_bias, activation=activation, alpha=alpha, length=length,
            opset=opset, use_attention_op=use_attention_op,
        )

    attnswap_attention.opset = opset  # type: ignore[attr-defined]
    attnswap_attention.uses_attention_op = use_attention_op  # type: ignore[attr-defined]
    return attnswap_attention


def _translate(q, k, v, attn_mask, *, kind, scale, is_causal, dropout_p, sigmoid_bias, activation,
               alpha, length, opset, use_attention_op):
    ir, op = _onnx_modules()
    if float(dropout_p) > 0.0:
        raise TranslationError(
            f"attnswap.attention with dropout_p={dropout_p} cannot be exported: ONNX export is for "
            "inference. Call model.eval() and pass dropout_p=0.0 outside training "
            "(e.g. dropout_p=self.p if self.training else 0.0)."
        )
    if kind not in ("softmax", "sigmoid", "relu"):
        raise TranslationError(f"kind={kind!r} has no ONNX translation (softmax, sigmoid, relu)")

    in_dtype = q.dtype
    ct = ir.DataType.DOUBLE if in_dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT
    b = _Builder(op, ct)

    if use_attention_op and kind == "softmax" and ct == ir.DataType.FLOAT and (
        attn_mask is None or attn_mask.dtype == ir.DataType.BOOL
    ):
        return _softmax_attention_op(b, q, k, v, attn_mask, scale=scale, is_causal=is_causal,
                                     in_dtype=in_dtype)

    qf = b.cast(q, ct)
    kf = _repeat_kv(b, b.cast(k, ct), q)
    vf = _repeat_kv(b, b.cast(v, ct), q)

    # S = scale · Q Kᵀ   [B, Hq, Tq, Tk]
    s = op.Mul(op.MatMul(qf, op.Transpose(kf, perm=[0, 1, 3, 2])), b.c(scale))

    tri = _causal_triangle(b, q, k) if is_causal else None
    vis = None  # bool, broadcastable to S: True where a query may attend a key
    float_mask = None
    masked = None  # float-mask positions that mean "hidden" (sigmoid / relu only)
    if attn_mask is not None:
        if attn_mask.dtype == ir.DataType.BOOL:
            vis = attn_mask
        else:
            float_mask = attn_mask
            if kind != "softmax":
                threshold = 0.5 * _finfo_min(attn_mask.dtype)
                # compare in the mask's own dtype (fp16/bf16 widen exactly to fp32)
                cmp_dtype = (
                    attn_mask.dtype
                    if attn_mask.dtype in (ir.DataType.FLOAT, ir.DataType.DOUBLE)
                    else ir.DataType.FLOAT
                )
                masked = op.LessOrEqual(b.cast(attn_mask, cmp_dtype),
                                        _Builder(op, cmp_dtype).c(threshold))
                vis = op.Not(masked)
    if tri is not None:
        vis = tri if vis is None else op.And(vis, tri)

    if kind == "softmax":
        if float_mask is not None:
            s = op.Add(s, b.cast(float_mask, ct))
        if vis is not None:
            s = op.Where(vis, s, b.c(float("-inf")))
        p = op.Softmax(s, axis=-1)
        if vis is not None or float_mask is not None:
            # a row with no visible key gives NaN from Softmax; SDPA and the reference give 0
            p = op.Where(op.IsNaN(p), b.c(0.0), p)
    else:
        if float_mask is not None:
            # masked positions of a float mask must not leak into h(S) as huge numbers
            s = op.Add(s, op.Where(masked, b.c(0.0), b.cast(float_mask, ct)))
        if kind == "sigmoid":
            if sigmoid_bias is None:
                tk = op.Cast(b.dim(k, 2), to=ct)
                bias = op.Neg(op.Log(tk))
            else:
                bias = b.c(sigmoid_bias)
            p = op.Sigmoid(op.Add(s, bias))
            if vis is not None:
                p = op.Where(vis, p, b.c(0.0))
        else:  # relu family
            h = _activation(b, activation, s, opset)
            if vis is not None:
                h = op.Where(vis, h, b.c(0.0))
            length = int(length)
            alpha = float(alpha)
            if length == _LENGTH_VISIBLE and vis is not None:
                # per-row count of visible keys; expand the key axis first in case the mask
                # broadcasts over keys (size 1 there)
                vis_full = op.Expand(vis, op.Concat(b.ints_node([1]), b.dim(k, 2), axis=0))
                n = op.ReduceSum(op.Cast(vis_full, to=ct), [-1], keepdims=1)
                if alpha == 0.0:
                    factor = op.Cast(op.Greater(n, b.c(0.0)), to=ct)
                else:
                    # L^-α; a row with nothing visible keeps 0 rather than 0 · inf
                    powed = op.Pow(op.Max(n, b.const_node(1.0)), b.const_node(-alpha))
                    factor = op.Where(op.Greater(n, b.c(0.0)), powed, b.c(0.0))
            elif length in (_LENGTH_KEYS, _LENGTH_VISIBLE):  # L = Tk, from the runtime shape
                factor = None if alpha == 0.0 else op.Pow(
                    op.Cast(b.dim(k, 2), to=ct), b.const_node(-alpha))
            elif length > 0:
                factor = None if alpha == 0.0 else b.c(float(length) ** (-alpha))
            else:
                raise TranslationError(f"length code {length} is invalid")
            p = h if factor is None else op.Mul(h, factor)

    out = op.MatMul(p, vf)
    return b.cast(out, in_dtype)


def _softmax_attention_op(b: _Builder, q, k, v, attn_mask, *, scale, is_causal, in_dtype):
    """Softmax attention as one opset-23 ``Attention`` node, fp32 inside (bool mask or none).

    onnxruntime's ``Attention`` takes GQA from the 4-D shapes, aligns ``is_causal`` top-left and
    gives 0 for a fully-masked row, like SDPA. It needs the mask's query and key axes at full
    size (no broadcasting there), and we fold ``is_causal`` into the mask when there is one (the
    spec allows one or the other).
    """
    from onnxscript import opset23

    op = b.op
    qf, kf, vf = b.cast(q, b.ct), b.cast(k, b.ct), b.cast(v, b.ct)
    mask = attn_mask
    causal = 1 if is_causal else 0
    if mask is not None:
        if is_causal:
            mask = op.And(mask, _causal_triangle(b, q, k))
            causal = 0
        else:
            # onnxruntime wants the mask's last two axes full size: [..., Tq, Tk] (rank >= 2)
            mask = op.Expand(mask, op.Concat(b.dim(q, 2), b.dim(k, 2), axis=0))
    outs = opset23.Attention(qf, kf, vf, mask, is_causal=causal, scale=float(scale))
    out = outs[0] if isinstance(outs, (tuple, list)) else outs
    return b.cast(out, in_dtype)


attnswap_attention = make_translation(MIN_OPSET)
"""The translation at the lowest supported opset (valid for any opset >= 18)."""


def translation_table(opset: int | None = None, *, attention_op: bool | None = None) -> dict:
    """``{torch.ops.attnswap.attention.default: fn}`` for ``torch.onnx.export``'s
    ``custom_translation_table=``. Pass the same ``opset`` as ``opset_version=`` (``None``: a
    translation valid at every opset >= 18)."""
    import torch

    import attnswap.kernels.op  # noqa: F401  (registers torch.ops.attnswap.attention)

    if opset is None and attention_op is None:
        fn = attnswap_attention
    else:
        fn = make_translation(MIN_OPSET if opset is None else opset, attention_op=attention_op)
    return {torch.ops.attnswap.attention.default: fn}


__all__ = [
    "ATTENTION_OP_OPSET",
    "GELU_OPSET",
    "MIN_OPSET",
    "TranslationError",
    "attnswap_attention",
    "make_translation",
    "translation_table",
]
