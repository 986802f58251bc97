"""Property tests of detection and canonicalization (DESIGN.md §1.2, §5.1): attention blocks are
composed from random choices of spelling, and near-misses from the same pieces with one flaw.

Positive blocks (1-2 per model, residual stack ``h = h + block(h, pad)``) draw independently:

* layout: heads kept 4-d ``[B, H, T, D]`` or flattened ``[B*H, T, D]`` (scores viewed back to
  ``[B*H, T, S]`` before softmax, after it (Bloom), or kept 4-d for a 4-d value matmul); q/k/v
  split from ``[B, T, H, D]`` by ``transpose(1, 2)`` or ``permute(0, 2, 1, 3)``;
* the QK and PV matmul spelling: ``@``, ``torch.matmul``, ``Tensor.matmul``, ``torch.bmm``
  (flattened), ``torch.einsum`` (K transposed or not), ``torch.baddbmm`` (flattened; a zero
  buffer with ``beta=1`` or the additive mask as the buffer, or ``torch.empty`` with ``beta=0``);
* how K is transposed: ``transpose(-2, -1)``, ``transpose(-1, -2)``, ``transpose(2, 3)`` /
  ``transpose(1, 2)``, ``permute``, ``swapaxes``, ``.mT``;
* the scale: none, on q, on k (before or after its transpose), split √ on both, mul (either
  operand order), div or in-place ``/=`` of the scores, ``baddbmm(alpha=)``; as a Python float,
  ``torch.tensor(c)`` or ``torch.full([], c)``; before or after the masks;
* padding mask: none, additive ``finfo.min`` float mask (``s + m``, ``m + s``, ``s += m``),
  ``masked_fill(mask == 0, finfo.min | -inf)`` (also via ``.expand_as(scores)``),
  ``torch.where(bool, scores, tensor(finfo.min))``; causal mask: none, or sliced from a registered
  ``tril`` buffer ``self.bias[:, :, :T, :T]`` (``masked_fill(... == 0, -inf)``,
  ``masked_fill(~..., finfo.min)``, ``where(..., full([], finfo.min))``), before or after the
  padding mask;
* softmax spelling (``F.softmax`` keyword/positional dim, ``torch.softmax``, ``Tensor.softmax``,
  ``nn.Softmax``; dim ``-1`` or its positive spelling) and casts around it (``.float()`` then
  ``.to``, ``dtype=torch.float32`` with or without ``.to(q.dtype)``, ``.type_as(q)``,
  ``.type_as(scores)``); dropout (``nn.Dropout`` / ``F.dropout``, model in eval);
* GQA: none, HF ``repeat_kv`` (``x[:, :, None]`` or ``unsqueeze(2)``, expand, reshape),
  ``repeat_interleave`` (method or function).

Module classes and attribute names are random (detection must not depend on names).

Checked: exactly one site per block, owned by that block, with the scale/mask/GQA/pattern the
spelling means; the op runs once per block per call; outputs and all gradients equal the
original's (fp32, 1e-5) on a new batch of the example's shape and on one of another length (a
recompile with a dynamic length); ``"sigmoid"`` equals a hand-computed ``attention_reference``
from the blocks' own Linear weights (scale and masks folded *semantically*). Near-misses (softmax
over another axis, scores against a parameter or keys and values from parameters alone, probabilities used twice, no
value matmul, tanh soft-capping, a temperature that varies along queries and keys) give 0 sites, a reason in ``skipped``
and bit-identical outputs; next to a positive block in the same graph they are left exactly as
they were while the positive one converts.

Spellings that once failed (``.mT``, ``W.T``) are pinned by ordinary reproducer tests
(``test_known_bugs``) and are part of the generator again.

The number of generated cases (and how often each spelling came up) is written at module
teardown (visible with ``-s``, also under xdist) and attached to each property test with
``record_property("generated_cases", n)``.
"""

from __future__ import annotations

import collections
import dataclasses
import keyword
import math
import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import attnswap
from attnswap import AttentionSwapWarning
from attnswap.kernels.reference import attention_reference

B = 2
TMAX = 16  # size of the registered causal buffer
ATOL = RTOL = 1e-5

GENERATED: collections.Counter = collections.Counter()
SPELLINGS: dict = collections.defaultdict(collections.Counter)  # field -> value -> count

# --------------------------------------------------------------------------------------------
# block specification
# --------------------------------------------------------------------------------------------

FLAWS = ("softmax_dim", "param_scores", "param_memory", "probs_returned", "probs_added",
         "no_pv_return", "no_pv_sum", "softcap", "temperature")

# The skip reason of each flaw must contain one of these words (the report says *why*).
FLAW_REASON = {
    "softmax_dim": ("axis", "dim"),
    "param_scores": ("parameter",),
    "param_memory": ("parameters alone",),
    "probs_returned": ("consumers",),
    "probs_added": ("consumers",),
    "no_pv_return": ("value matmul",),
    "no_pv_sum": ("value matmul",),
    "softcap": ("soft-capping", "tanh"),
    # (after a baddbmm, whose input term counts as a mask, the scale-after-mask reason comes first)
    "temperature": ("key axis", "scaled by a tensor after a mask"),
}


ADDITIVE = ("additive", "additive_r", "additive_iadd")


@dataclasses.dataclass(frozen=True)
class Spec:
    layout: str  # "4d" | "flat"
    flat_back: str  # flat only: scores viewed back to [B*H, T, S] "pre" softmax, "post" softmax,
    #                 or kept 4-d for a [B, H, T, D] value matmul ("v4")
    split: str  # "transpose" | "permute"
    qk_op: str  # "@", "torch.matmul", "Tensor.matmul", "bmm", "einsum", "einsum_t", "baddbmm",
    #             "baddbmm0" (beta=0)
    k_t: str  # "t-2-1", "t-1-2", "t-pos", "permute", "swapaxes", "mT"
    pv_op: str  # "@", "torch.matmul", "Tensor.matmul", "bmm", "einsum"
    scale_form: str  # "none", "q", "k", "kT", "split", "mul", "rmul", "div", "idiv", "alpha"
    scale_op: str  # for q/k/split: "mul" | "div"
    scale_const: str  # "float" | "tensor" | "full"
    scale_value: float
    scale_after_mask: bool
    pad_form: str  # "none", "additive", "additive_r", "additive_iadd", "mf_min", "mf_inf",
    #                "mf_expand_as" (4-d only), "where"
    causal_form: str  # "none", "mf_eq0", "mf_not", "where_full"
    causal_first: bool
    softmax: str  # "F", "F_pos", "torch", "Tensor", "module"
    dim_positive: bool
    cast: str  # "none", "float_to", "dtype_kw", "dtype_kw_to", "type_as_q", "type_as_s"
    heads: int
    head_dim: int
    n_rep: int
    gqa: str  # "none", "repeat_kv", "repeat_kv_unsq", "repeat_interleave",
    #           "torch_repeat_interleave"
    dropout: str  # "none", "module", "functional"
    bias: bool
    flaw: str = "none"
    flaw_variant: int = 0

    @property
    def kv_heads(self) -> int:
        return self.heads // self.n_rep

    @property
    def embed(self) -> int:
        return self.heads * self.head_dim

    @property
    def scale(self) -> float:
        return 1.0 if self.scale_form == "none" else self.scale_value

    def expected_mask(self, causal_flag: bool) -> set:
        """The report's ``mask`` values this spelling allows. A causal buffer may be folded as a
        bool mask or (``causal_flag``) as ``is_causal``; baddbmm's zero buffer may be kept as a
        float mask or dropped."""
        bool_ = (self.pad_form in ("mf_min", "mf_inf", "mf_expand_as", "where")
                 or (self.causal_form != "none" and not causal_flag))
        floats = {True} if self.pad_form in ADDITIVE else {False}
        if self.qk_op == "baddbmm":
            floats = {True, False} if self.pad_form not in ADDITIVE else {True}
        out = set()
        for f in floats:
            kinds = (["bool"] if bool_ else []) + (["float"] if f else [])
            out.add("+".join(kinds) or "none")
        return out

    @property
    def expected_pattern(self) -> str:
        if self.qk_op.startswith("baddbmm"):
            return "baddbmm-softmax-bmm"
        if self.qk_op.startswith("einsum"):
            return "einsum-softmax-einsum"
        return "matmul-softmax-matmul"


# Spellings that failed once (found by this file); fixed in passes/normalize.py. The reproducers
# in test_known_bugs stay as regressions and the generator draws these spellings too.
BUG_MT = (
    "k.mT is recorded by dynamo as torch.ops.aten.mT (an OpOverloadPacket) which normalize.spell "
    "does not know: K is taken as an opaque pre-transposed operand, so repeat_kv/repeat_interleave "
    "is not folded (gqa_groups=1) and a scale applied to k before .mT is not folded (the report's "
    "scale is wrong; softmax/sigmoid outputs stay right, qk_norm=True then differs from the "
    "k.transpose(-2, -1) spelling of the same model)")
BUG_NUMPY_T = (
    "x @ self.W.T / x @ self.W.mT: dynamo records Tensor.T as torch.ops.aten.numpy_T (and .mT as "
    "aten.mT), unknown to normalize.spell, so is_parameter() cannot see through it: a softmax over "
    "scores against a parameter is taken as attention (K = the parameter); convert() then raises "
    "ValueError from the op's shape check (or, where shapes happen to fit, silently converts it)")


def known_bug(spec: "Spec") -> str | None:  # noqa: C901 - kept for the record
    return None


def _formerly_known_bug(spec: "Spec") -> str | None:
    """The known bug a spec would hit, or None. (``param_scores`` variants: 0 ``W.t()``,
    1 ``W.transpose(0, 1)``, 2 ``W.T``, 3 ``W.mT``; the generator draws all four.)"""
    if spec.flaw == "param_scores" and spec.flaw_variant >= 2:
        return BUG_NUMPY_T
    if spec.k_t == "mT" and spec.qk_op != "einsum" and spec.flaw == "none" and (
            (spec.gqa != "none" and spec.layout == "4d") or spec.scale_form in ("k", "split")):
        return BUG_MT
    return None


@st.composite
def specs(draw, flaw: str = "none", layout: str | None = None):
    layout = layout or draw(st.sampled_from(["4d", "flat"]))
    if layout == "4d":
        qk_op = draw(st.sampled_from(["@", "torch.matmul", "Tensor.matmul", "einsum", "einsum_t"]))
        pv_op = draw(st.sampled_from(["@", "torch.matmul", "Tensor.matmul", "einsum"]))
    else:
        qk_op = draw(st.sampled_from(["bmm", "@", "torch.matmul", "Tensor.matmul", "einsum",
                                      "einsum_t", "baddbmm", "baddbmm0"]))
        pv_op = draw(st.sampled_from(["bmm", "@", "torch.matmul", "Tensor.matmul", "einsum"]))
    scale_forms = ["none", "q", "k", "kT", "split", "mul", "rmul", "div", "idiv"]
    if qk_op.startswith("baddbmm"):
        scale_forms += ["alpha"] * 4
    scale_form = draw(st.sampled_from(scale_forms))
    heads = draw(st.sampled_from([2, 4]))
    head_dim = draw(st.sampled_from([4, 8]))
    gqa = draw(st.sampled_from(["none", "repeat_kv", "repeat_kv_unsq", "repeat_interleave",
                                "torch_repeat_interleave"]))
    n_rep = 1 if gqa == "none" else draw(st.sampled_from(sorted({2, heads})))
    softmax = draw(st.sampled_from(["F", "F_pos", "torch", "Tensor", "module"]))
    cast = draw(st.sampled_from(["none", "float_to", "dtype_kw", "dtype_kw_to", "type_as_q",
                                 "type_as_s"]))
    if softmax == "module" and cast.startswith("dtype_kw"):
        cast = "float_to"  # nn.Softmax takes no dtype
    pad_forms = ["none", "additive", "additive_r", "additive_iadd", "mf_min", "mf_inf", "where"]
    if layout == "4d":
        pad_forms.append("mf_expand_as")
    spec = Spec(
        layout=layout,
        flat_back=draw(st.sampled_from(["pre", "post", "v4"])) if layout == "flat" else "pre",
        split=draw(st.sampled_from(["transpose", "permute"])),
        qk_op=qk_op,
        k_t=draw(st.sampled_from(["t-2-1", "t-1-2", "t-pos", "permute", "swapaxes", "mT"])),
        pv_op=pv_op,
        scale_form=scale_form,
        scale_op=draw(st.sampled_from(["mul", "div"])),
        scale_const=draw(st.sampled_from(["float", "tensor", "full"])),
        scale_value=draw(st.sampled_from([head_dim ** -0.5, head_dim ** -0.5, 0.3, 1.7])),
        scale_after_mask=draw(st.booleans()),
        pad_form=draw(st.sampled_from(pad_forms)),
        causal_form=draw(st.sampled_from(["none", "none", "mf_eq0", "mf_not", "where_full"])),
        causal_first=draw(st.booleans()),
        softmax=softmax,
        dim_positive=draw(st.booleans()),
        cast=cast,
        heads=heads,
        head_dim=head_dim,
        n_rep=n_rep,
        gqa=gqa,
        dropout=draw(st.sampled_from(["none", "module", "functional"])),
        bias=draw(st.booleans()),
        flaw=flaw,
        flaw_variant=draw(st.integers(0, 3 if flaw == "param_scores" else 1)),
    )
    if known_bug(spec):  # always None now: every spelling is generated
        spec = dataclasses.replace(spec, k_t=draw(st.sampled_from(["t-2-1", "t-pos", "swapaxes"])))
    assert not known_bug(spec)
    return spec


def _count_spellings(spec: Spec) -> None:
    for f in dataclasses.fields(Spec):
        if f.name not in ("scale_value",):
            SPELLINGS[f.name][getattr(spec, f.name)] += 1


# --------------------------------------------------------------------------------------------
# the generated modules
# --------------------------------------------------------------------------------------------

_RESERVED = {"spec", "pn", "sm", "drop", "bias", "W", "temp", "query"}


def _ok_name(n: str) -> bool:
    return (not keyword.iskeyword(n) and n not in _RESERVED and not hasattr(nn.Module(), n)
            and not n.startswith("_"))


ATTR_NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True).filter(_ok_name)
CLASS_NAMES = st.one_of(
    st.sampled_from(["Attention", "SelfAttention", "LlamaAttention", "Classifier", "Router",
                     "MLP", "Softmax", "Block", "Identity", "Foo"]),
    st.from_regex(r"[A-Z][A-Za-z0-9_]{0,11}", fullmatch=True),
)


def _const(spec: Spec, c: float):
    if spec.scale_const == "tensor":
        return torch.tensor(c)
    if spec.scale_const == "full":
        return torch.full([], c)
    return c


def _scale_t(spec: Spec, t, c: float):
    """``t`` scaled by ``c`` (as ``t * c`` or ``t / (1/c)``)."""
    if spec.scale_op == "div":
        return t / _const(spec, 1.0 / c)
    return t * _const(spec, c)


def _block_init(self, spec: Spec, pnames):
    nn.Module.__init__(self)
    self.spec = spec
    self.pn = tuple(pnames)  # names of the q, k, v, o projections
    E, kv = spec.embed, spec.kv_heads * spec.head_dim
    for name, (i, o) in zip(pnames, [(E, E), (E, kv), (E, kv), (E, E)]):
        setattr(self, name, nn.Linear(i, o, bias=spec.bias))
    if spec.softmax == "module":
        dim = -1
        if spec.flaw == "softmax_dim":
            dim = -2 if spec.flaw_variant == 0 else 1
        self.sm = nn.Softmax(dim=dim)
    if spec.dropout == "module":
        self.drop = nn.Dropout(0.1)
    if spec.causal_form == "mf_eq0":
        self.register_buffer("bias", torch.tril(torch.ones(TMAX, TMAX)).view(1, 1, TMAX, TMAX))
    elif spec.causal_form != "none":
        self.register_buffer(
            "bias", torch.tril(torch.ones(TMAX, TMAX, dtype=torch.bool)).view(1, 1, TMAX, TMAX),
            persistent=False)
    if spec.flaw == "param_scores":
        self.W = nn.Parameter(torch.randn(E, E) / math.sqrt(E))
    if spec.flaw == "param_memory":  # keys/values from parameters alone: a learned memory
        self.mem = nn.Parameter(torch.randn(1, spec.heads, TMAX, spec.head_dim))
    if spec.flaw == "temperature":  # a learnable temperature varying along queries and keys
        self.temp = nn.Parameter(torch.linspace(0.8, 1.6, TMAX * TMAX).view(TMAX, TMAX))


def _repeat(spec: Spec, t, T):
    """``[B, Hkv, T, D]`` → ``[B, H, T, D]`` in the spec's GQA spelling."""
    n, hkv, d = spec.n_rep, spec.kv_heads, spec.head_dim
    if spec.gqa == "repeat_kv":
        return t[:, :, None, :, :].expand(B_(t), hkv, n, T, d).reshape(B_(t), hkv * n, T, d)
    if spec.gqa == "repeat_kv_unsq":
        return t.unsqueeze(2).expand(B_(t), hkv, n, T, d).reshape(B_(t), hkv * n, T, d)
    if spec.gqa == "repeat_interleave":
        return t.repeat_interleave(n, dim=1)
    if spec.gqa == "torch_repeat_interleave":
        return torch.repeat_interleave(t, n, dim=1)
    return t


def B_(t):
    return t.shape[0]


def _transpose_k(spec: Spec, k):
    if spec.k_t == "t-2-1":
        return k.transpose(-2, -1)
    if spec.k_t == "t-1-2":
        return k.transpose(-1, -2)
    if spec.k_t == "swapaxes":
        return k.swapaxes(-2, -1)
    if spec.k_t == "t-pos":
        return k.transpose(2, 3) if k.dim() == 4 else k.transpose(1, 2)
    if spec.k_t == "permute":
        return k.permute(0, 1, 3, 2) if k.dim() == 4 else k.permute(0, 2, 1)
    return k.mT


def _matmul(op: str, a, b):
    if op == "@":
        return a @ b
    if op == "torch.matmul":
        return torch.matmul(a, b)
    if op == "Tensor.matmul":
        return a.matmul(b)
    if op == "bmm":
        return torch.bmm(a, b)
    raise AssertionError(op)


def _pad_mask(self, s, pad):
    """Apply the padding mask to 4-d scores ``[B, H, T, T]``; ``pad`` is ``[B, T]`` (1 = keep)."""
    spec = self.spec
    m = pad[:, None, None, :]
    if spec.pad_form == "additive":
        return s + (1.0 - m.to(s.dtype)) * torch.finfo(s.dtype).min
    if spec.pad_form == "additive_r":
        return (1.0 - m.to(s.dtype)) * torch.finfo(s.dtype).min + s
    if spec.pad_form == "additive_iadd":
        s += (1.0 - m.to(s.dtype)) * torch.finfo(s.dtype).min
        return s
    if spec.pad_form == "mf_min":
        return s.masked_fill(m == 0, torch.finfo(s.dtype).min)
    if spec.pad_form == "mf_inf":
        return s.masked_fill(m == 0, float("-inf"))
    if spec.pad_form == "mf_expand_as":  # DistilBERT: (mask == 0).view(...).expand_as(scores)
        return s.masked_fill((m == 0).expand_as(s), torch.finfo(s.dtype).min)
    if spec.pad_form == "where":
        return torch.where(m.bool(), s, torch.tensor(torch.finfo(s.dtype).min, dtype=s.dtype))
    return s


def _causal_mask(self, s, T):
    spec = self.spec
    if spec.causal_form == "none":
        return s
    c = self.bias[:, :, :T, :T]
    if spec.causal_form == "mf_eq0":
        return s.masked_fill(c == 0, float("-inf"))
    if spec.causal_form == "mf_not":
        return s.masked_fill(~c, torch.finfo(s.dtype).min)
    if spec.causal_form == "where_full":
        return torch.where(c, s, torch.full([], torch.finfo(s.dtype).min, dtype=s.dtype))
    return s


def _softmax(self, s, q):
    spec = self.spec
    dim = s.dim() - 1 if spec.dim_positive else -1
    if spec.flaw == "softmax_dim":
        dim = -2 if spec.flaw_variant == 0 else 1
    x = s.float() if spec.cast in ("float_to", "type_as_q", "type_as_s") else s
    kw = {"dtype": torch.float32} if spec.cast.startswith("dtype_kw") else {}
    if spec.softmax == "F":
        p = F.softmax(x, dim=dim, **kw)
    elif spec.softmax == "F_pos":
        p = F.softmax(x, dim, **kw)
    elif spec.softmax == "torch":
        p = torch.softmax(x, dim, **kw)
    elif spec.softmax == "Tensor":
        p = x.softmax(dim=dim, **kw)
    else:
        p = self.sm(x)
    if spec.cast == "float_to":
        p = p.to(s.dtype)
    elif spec.cast == "dtype_kw_to":  # Llama: softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        p = p.to(q.dtype)
    elif spec.cast == "type_as_q":
        p = p.type_as(q)
    elif spec.cast == "type_as_s":  # T5: softmax(scores.float()).type_as(scores)
        p = p.type_as(s)
    return p


def _block_forward(self, x, pad):
    spec = self.spec
    Bx, T, E = x.shape
    H, Hkv, D = spec.heads, spec.kv_heads, spec.head_dim
    pq, pk, pv, po = (getattr(self, n) for n in self.pn)

    def split(t, h):
        t = t.view(Bx, T, h, D)
        return t.transpose(1, 2) if spec.split == "transpose" else t.permute(0, 2, 1, 3)

    if spec.flaw == "param_scores":  # scores x @ W.T, softmax, @ an activation
        w = self.W
        wt = (w.t(), w.transpose(0, 1), w.T, w.mT)[spec.flaw_variant]
        s = x @ wt
        p = _softmax(self, s, x)
        vv = x.transpose(-2, -1) @ pv(x).repeat(1, 1, E // pv.out_features)  # [B, E, E]
        return po(p @ vv)

    q = split(pq(x), H)
    k = _repeat(spec, split(pk(x), Hkv), T)
    v = _repeat(spec, split(pv(x), Hkv), T)
    if spec.flaw == "param_memory":
        k = F.normalize(self.mem[:, :, :T], dim=-1).expand(Bx, -1, -1, -1)
        v = k * 0.5
    Tq = q.shape[-2]
    flat = spec.layout == "flat"
    v4 = v
    if flat:
        q, k, v = (t.reshape(Bx * H, t.shape[-2], D) for t in (q, k, v))

    c = spec.scale_value
    if spec.scale_form == "q":
        q = _scale_t(spec, q, c)
    elif spec.scale_form == "k":
        k = _scale_t(spec, k, c)
    elif spec.scale_form == "split":
        q = _scale_t(spec, q, math.sqrt(c))
        k = _scale_t(spec, k, math.sqrt(c))

    base_has_mask = spec.qk_op == "baddbmm" and spec.pad_form in ADDITIVE
    if spec.qk_op == "einsum":
        eq = "bhqd,bhkd->bhqk" if not flat else "bqd,bkd->bqk"
        if spec.scale_form == "kT":
            k = _scale_t(spec, k, c)
        s = torch.einsum(eq, q, k)
    else:
        kt = _transpose_k(spec, k)
        if spec.scale_form == "kT":
            kt = _scale_t(spec, kt, c)
        if spec.qk_op == "einsum_t":
            s = torch.einsum("bhqd,bhdk->bhqk" if not flat else "bqd,bdk->bqk", q, kt)
        elif spec.qk_op == "baddbmm":
            if base_has_mask:
                m = (1.0 - pad[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min
                base = m.expand(Bx, H, Tq, T).reshape(Bx * H, Tq, T)
            else:
                base = torch.zeros(Bx * H, Tq, T, dtype=q.dtype)
            s = torch.baddbmm(base, q, kt, alpha=c if spec.scale_form == "alpha" else 1.0)
        elif spec.qk_op == "baddbmm0":  # GPT-2 reorder_and_upcast_attn: beta=0 ignores the buffer
            buf = torch.empty(Bx * H, Tq, T, dtype=q.dtype)
            s = torch.baddbmm(buf, q, kt, beta=0, alpha=c if spec.scale_form == "alpha" else 1.0)
        else:
            s = _matmul(spec.qk_op, q, kt)

    def scale_scores(s):
        if spec.scale_form == "mul":
            return s * _const(spec, c)
        if spec.scale_form == "rmul":
            return _const(spec, c) * s
        if spec.scale_form == "div":
            return s / _const(spec, 1.0 / c)
        if spec.scale_form == "idiv":
            s /= _const(spec, 1.0 / c)
        return s

    if not spec.scale_after_mask:
        s = scale_scores(s)
    if spec.flaw == "softcap":
        cap = 20.0 if spec.flaw_variant == 0 else 5.0
        s = torch.tanh(s / cap) * cap if spec.flaw_variant == 0 else cap * (s / cap).tanh()
    if spec.flaw == "temperature":
        s = s * self.temp[:Tq, :T] if spec.flaw_variant == 0 else s / self.temp[:Tq, :T]
    masks = spec.pad_form != "none" or spec.causal_form != "none"
    kept4 = flat and spec.flat_back in ("post", "v4")
    if kept4:  # flattened scores viewed to [B, H, T, S] and kept there through softmax
        s = s.view(Bx, H, Tq, T)
    if masks:
        s4 = s.view(Bx, H, Tq, T) if flat and not kept4 else s
        order = [_causal_mask, _pad_mask] if spec.causal_first else [_pad_mask, _causal_mask]
        for fn in order:
            if fn is _causal_mask:
                s4 = _causal_mask(self, s4, T)
            elif fn is _pad_mask and not (base_has_mask and spec.pad_form in ADDITIVE):
                s4 = _pad_mask(self, s4, pad)
        s = s4.view(Bx * H, Tq, T) if flat and not kept4 else s4
    if spec.scale_after_mask:
        s = scale_scores(s)

    p = _softmax(self, s, q)
    if spec.dropout == "module":
        p = self.drop(p)
    elif spec.dropout == "functional":
        p = F.dropout(p, 0.1, self.training)

    if spec.flaw == "no_pv_return":
        return p
    if spec.flaw == "no_pv_sum":
        return p.sum(dim=-2) if spec.flaw_variant == 0 else p.sum()

    if kept4 and spec.flat_back == "post":  # Bloom: probabilities viewed back, then bmm
        p = p.view(Bx * H, Tq, T)
    if kept4 and spec.flat_back == "v4":  # the value matmul in [B, H, T, D]
        o = (torch.einsum("bhqk,bhkd->bhqd", p, v4) if spec.pv_op == "einsum"
             else _matmul("@" if spec.pv_op == "bmm" else spec.pv_op, p, v4))
    elif spec.pv_op == "einsum":
        o = torch.einsum("bhqk,bhkd->bhqd" if not flat else "bqk,bkd->bqd", p, v)
    else:
        o = _matmul(spec.pv_op, p, v)
    if flat:
        o = o.view(Bx, H, Tq, D)
    out = po(o.transpose(1, 2).reshape(Bx, Tq, E))
    if spec.flaw == "probs_returned":
        return out, p
    if spec.flaw == "probs_added":
        if spec.flaw_variant == 0:
            return out + p.reshape(Bx, H, Tq, T).sum(1).mean(-1, keepdim=True)
        return out, p + s.reshape(p.shape)  # probabilities added to the scores, returned
    return out


def _model_init(self, blocks, names, list_name):
    nn.Module.__init__(self)
    self.list_name = list_name
    if list_name is None:
        self.names = tuple(names)
        for n, b in zip(names, blocks):
            setattr(self, n, b)
    else:
        setattr(self, list_name, nn.ModuleList(blocks))


def _blocks(self):
    if self.list_name is None:
        return [getattr(self, n) for n in self.names]
    return list(getattr(self, self.list_name))


def _residual_forward(self, x, pad):
    h = x
    for blk in _blocks(self):
        h = h + blk(h, pad)
    return h


def _flatten(out, acc):
    if isinstance(out, (tuple, list)):
        for o in out:
            _flatten(o, acc)
    else:
        acc.append(out)
    return acc


def _parallel_forward(self, x, pad):
    outs = []
    for blk in _blocks(self):
        _flatten(blk(x, pad), outs)
    return tuple(outs)


@dataclasses.dataclass
class Case:
    model: nn.Module
    specs: list
    paths: list  # module path of each block
    seed: int
    T: int  # length of the example input
    T2: int  # another length, for the recompiled graph


def _with_head_dim(s: Spec, d: int) -> Spec:
    typical = s.scale_value == s.head_dim ** -0.5
    return dataclasses.replace(s, head_dim=d, scale_value=d ** -0.5 if typical else s.scale_value)


def build(block_specs, *, class_names, attr_names, proj_names, use_list, seed, T, T2,
          parallel=False) -> Case:
    """A model of one block per spec: residual stack ``h = h + blk(h, pad)``, or (``parallel``)
    every block applied to ``x`` and all their outputs returned as one tuple."""
    n = len(block_specs)
    blocks = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for spec, cname, pnames in zip(block_specs, class_names, proj_names):
            cls = type(cname, (nn.Module,), {"__init__": _block_init, "forward": _block_forward})
            blocks.append(cls(spec, pnames))
    fwd = _parallel_forward if parallel else _residual_forward
    mcls = type(class_names[n], (nn.Module,), {"__init__": _model_init, "forward": fwd})
    list_name = attr_names[n] if use_list else None
    model = mcls(blocks, attr_names[:n], list_name).eval()
    paths = [f"{list_name}.{i}" for i in range(n)] if use_list else list(attr_names[:n])
    return Case(model, list(block_specs), paths, seed, T, T2)


@st.composite
def models(draw, n_blocks, flaws=None, parallel=False, layout=None):
    """A model of blocks drawn with ``specs``; ``flaws[i]`` is block i's flaw ("none": a
    positive block)."""
    n = draw(n_blocks) if not isinstance(n_blocks, int) else n_blocks
    flaws = flaws or ["none"] * n
    block_specs = []
    for i in range(n):
        flaw = flaws[i] if isinstance(flaws[i], str) else draw(flaws[i])
        block_specs.append(draw(specs(flaw=flaw, layout=layout)))
    # All blocks of one model share the embedding width (a model-level choice).
    e = block_specs[0].embed
    block_specs = [s if s.embed == e else _with_head_dim(s, e // s.heads) for s in block_specs]
    T = draw(st.integers(3, 9))
    case = build(
        block_specs,
        class_names=draw(st.lists(CLASS_NAMES, min_size=n + 1, max_size=n + 1)),
        attr_names=draw(st.lists(ATTR_NAMES, min_size=n + 1, max_size=n + 1, unique=True)),
        proj_names=[draw(st.lists(ATTR_NAMES, min_size=4, max_size=4, unique=True))
                    for _ in range(n)],
        use_list=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        T=T,
        T2=draw(st.integers(3, 9).filter(lambda t: t != T)),
        parallel=parallel,
    )
    for s in block_specs:
        _count_spellings(s)
    return case


def fixed_case(*block_specs, parallel=False) -> Case:
    """A deterministic case (for the known-bug reproducers)."""
    n = len(block_specs)
    return build(block_specs, class_names=[f"Blk{i}" for i in range(n)] + ["Net"],
                 attr_names=[f"blk{i}" for i in range(n)] + ["blocks"],
                 proj_names=[["wq", "wk", "wv", "wo"]] * n, use_list=False, seed=0, T=5, T2=7,
                 parallel=parallel)


def inputs(case: Case, T: int, salt: int):
    """``x [B, T, E]`` and a padding mask ``[B, T]`` (1 = keep; row 0 pads at least one key, key 0
    is never padded so no query row is fully masked)."""
    g = torch.Generator().manual_seed(case.seed * 7 + salt)
    (E,) = {s.embed for s in case.specs}
    x = torch.randn(B, T, E, generator=g)
    pad = torch.ones(B, T)
    n0 = int(torch.randint(1, T, (), generator=g))
    n1 = int(torch.randint(0, T, (), generator=g))
    pad[0, T - n0:] = 0
    if n1:
        pad[1, T - n1:] = 0
    return x, pad


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


def _identical(u, w) -> bool:
    """Bit-identical, NaN included (a softmax over the heads axis of -inf-masked scores is NaN)."""
    return (u.shape == w.shape and u.dtype == w.dtype and torch.equal(u.isnan(), w.isnan())
            and torch.equal(u.nan_to_num(0.0), w.nan_to_num(0.0)))


def _fresh():
    torch._dynamo.reset()  # every example builds new classes and code: keep the caches small


def _grads(model, out, w):
    model.zero_grad(set_to_none=True)
    loss = sum((o * wi).sum() for o, wi in zip(_flatten(out, []), w))
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _check_identity(case: Case, conv, x, pad, n_sites, input_grad):
    """Outputs, parameter gradients (and the input gradient) of ``conv`` equal the original's.

    An input that requires grad is a new guard (a recompile): only ask for it on a call that
    recompiles anyway (another length)."""
    ref_model = case.model
    xr = x.clone().requires_grad_(input_grad)
    xc = x.clone().requires_grad_(input_grad)
    out_ref = ref_model(xr, pad)
    before = attnswap.total_calls()
    out_conv = conv(xc, pad)
    ran = attnswap.total_calls() - before
    assert ran == n_sites, f"the converted model ran the attention op {ran}x, expected {n_sites}"
    refs, convs = _flatten(out_ref, []), _flatten(out_conv, [])
    assert len(refs) == len(convs)
    for a, b in zip(convs, refs):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f"output: {m}")
    g = torch.Generator().manual_seed(case.seed + 17)
    w = [torch.randn(r.shape, generator=g) for r in refs]
    gr, gc = _grads(ref_model, out_ref, w), _grads(conv, out_conv, w)
    assert gr.keys() == gc.keys()
    for name in gr:
        assert (gr[name] is None) == (gc[name] is None), name
        if gr[name] is not None:
            torch.testing.assert_close(gc[name], gr[name], atol=ATOL, rtol=RTOL,
                                       msg=lambda m, name=name: f"grad of {name}: {m}")
    if input_grad:
        torch.testing.assert_close(xc.grad, xr.grad, atol=ATOL, rtol=RTOL,
                                   msg=lambda m: f"grad of the input: {m}")


def _check_report(case: Case, report, positive_idx):
    """One site per positive block, owned by it, with the attributes its spelling means."""
    sites = list(report.sites)
    assert len(sites) == len(positive_idx), str(report)
    by_owner = {r.owner: r for r in sites}
    assert sorted(by_owner) == sorted(case.paths[i] for i in positive_idx), str(report)
    for i in positive_idx:
        spec, rec = case.specs[i], by_owner[case.paths[i]]
        assert rec.owner_type == type(_blocks(case.model)[i]).__name__, str(report)
        assert rec.scale == pytest.approx(spec.scale, rel=1e-6), (spec, str(report))
        assert rec.causal is False or spec.causal_form != "none", (spec, str(report))
        assert rec.mask in spec.expected_mask(rec.causal), (spec, str(report))
        assert rec.pattern == spec.expected_pattern, (spec, str(report))
        if spec.layout == "4d":
            assert rec.gqa_groups == spec.n_rep, (spec, str(report))
        else:  # flattened heads hide the head axis: folding GQA there is optional
            assert rec.gqa_groups in (1, spec.n_rep), (spec, str(report))


def _assert_skipped(case: Case, report, idx):
    """Each near-miss block ``idx`` has a skip record at (or below) its path, with a reason that
    says why."""
    for i in idx:
        spec, path = case.specs[i], case.paths[i]
        here = [s for s in report.skipped
                if s.location == path or s.location.startswith(path + ".")]
        assert here, f"no skip record at {path!r} for flaw {spec.flaw}:\n{report}"
        assert all(s.reason for s in here)
        words = FLAW_REASON[spec.flaw]
        assert any(w in s.reason for s in here for w in words), (
            f"flaw {spec.flaw}: no reason mentions any of {words}:\n{report}")


def _convert(model, kind, example):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        conv = attnswap.convert(model, kind, example_inputs=example)
    loud = [str(w.message) for w in caught if issubclass(w.category, AttentionSwapWarning)]
    return conv, loud


def _reference_block(blk, spec: Spec, h, pad):
    """``blk(h, pad)`` with the attention computed by ``attention_reference(kind="sigmoid")``
    from the block's own Linear weights and the mask its spelling means (DESIGN.md §2)."""
    Bx, T, E = h.shape
    pq, pk, pv, po = (getattr(blk, n) for n in blk.pn)
    q = pq(h).view(Bx, T, spec.heads, spec.head_dim).transpose(1, 2)
    k = pk(h).view(Bx, T, spec.kv_heads, spec.head_dim).transpose(1, 2)
    v = pv(h).view(Bx, T, spec.kv_heads, spec.head_dim).transpose(1, 2)
    keep = None
    if spec.pad_form != "none":
        keep = (pad != 0)[:, None, None, :].expand(Bx, 1, T, T)
    if spec.causal_form != "none":
        tri = torch.ones(T, T, dtype=torch.bool).tril()
        keep = tri.expand(Bx, 1, T, T) if keep is None else keep & tri
    att = attention_reference(q, k, v, keep, kind="sigmoid", scale=spec.scale)
    return po(att.transpose(1, 2).reshape(Bx, T, E))


def _reference_model(case: Case, x, pad):
    h = x
    for blk, spec in zip(_blocks(case.model), case.specs):
        h = h + _reference_block(blk, spec, h, pad)
    return h


def check_positive(case: Case):
    """``convert(model, "softmax")``: one site per block; outputs and all gradients equal the
    original's on a new batch and on another length (a recompile with a dynamic length)."""
    _fresh()
    n = len(case.specs)
    x, pad = inputs(case, case.T, 0)
    conv, loud = _convert(case.model, "softmax", (x, pad))
    assert not loud, loud
    _check_report(case, conv.attnswap_report, list(range(n)))
    assert not conv.attnswap_report.skipped, str(conv.attnswap_report)
    for T, salt in ((case.T, 1), (case.T2, 2)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", AttentionSwapWarning)
            _check_identity(case, conv, *inputs(case, T, salt), n_sites=n, input_grad=T != case.T)
    assert len(conv.attnswap_report.sites) == n, str(conv.attnswap_report)


def check_sigmoid(case: Case):
    """``convert(model, "sigmoid")`` equals the hand-computed reference (scale and masks folded
    semantically: masked keys get weight exactly 0, the bias is −ln Tk at each length)."""
    _fresh()
    n = len(case.specs)
    x, pad = inputs(case, case.T, 0)
    conv, loud = _convert(case.model, "sigmoid", (x, pad))
    assert not loud, loud
    _check_report(case, conv.attnswap_report, list(range(n)))
    for T, salt in ((case.T, 1), (case.T2, 2)):
        xx, pp = inputs(case, T, salt)
        with warnings.catch_warnings():  # grad mode as at conversion: no recompile for no_grad
            warnings.simplefilter("error", AttentionSwapWarning)
            got = conv(xx, pp).detach()
        with torch.no_grad():
            want = _reference_model(case, xx, pp)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def check_near_miss(case: Case):
    """0 sites, a reason per near-miss, outputs bit-identical to the original's."""
    _fresh()
    x, pad = inputs(case, case.T, 0)
    conv, loud = _convert(case.model, "softmax", (x, pad))
    assert any("no softmax attention found" in w for w in loud), loud
    report = conv.attnswap_report
    assert len(report.sites) == 0, str(report)
    _assert_skipped(case, report, range(len(case.specs)))
    for T, salt in ((case.T, 1), (case.T2, 2)):
        xx, pp = inputs(case, T, salt)
        with torch.no_grad():
            a, b = _flatten(conv(xx, pp), []), _flatten(case.model(xx, pp), [])
        assert len(a) == len(b)
        assert all(_identical(u, w) for u, w in zip(a, b))


def check_mixed(case: Case):
    """A near-miss in the same graph as a real site (parallel blocks): the site converts, the
    near-miss's outputs stay bit-identical, and the report says why it was left alone."""
    _fresh()
    pi, ni = (0, 1) if case.specs[0].flaw == "none" else (1, 0)
    x, pad = inputs(case, case.T, 0)
    conv, _ = _convert(case.model, "softmax", (x, pad))  # the near-miss may warn (loudly)
    report = conv.attnswap_report
    _check_report(case, report, [pi])
    _assert_skipped(case, report, [ni])
    for T, salt in ((case.T, 1), (case.T2, 2)):
        xx, pp = inputs(case, T, salt)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            before = attnswap.total_calls()
            got = [t.detach() for t in _flatten(conv(xx, pp), [])]
            assert attnswap.total_calls() - before == 1
        # Recompiles repeat the near-miss's skip warning; a fallback to the original is a failure.
        assert not [w for w in caught if "outside the rewritten" in str(w.message)]
        want = [t.detach() for t in _flatten(case.model(xx, pp), [])]
        # The positive block returns one tensor: the first or the last of the model's outputs.
        at = 0 if pi == 0 else len(want) - 1
        pos_out, pos_ref = got[at], want[at]
        neg_out, neg_ref = got[:at] + got[at + 1:], want[:at] + want[at + 1:]
        torch.testing.assert_close(pos_out, pos_ref, atol=ATOL, rtol=RTOL)
        assert len(neg_out) == len(neg_ref)
        assert all(_identical(u, w) for u, w in zip(neg_out, neg_ref)), (
            "the near-miss block next to a converted one was changed")


# --------------------------------------------------------------------------------------------
# the number of generated cases
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _generated_cases_summary():
    """At module teardown, how many cases were generated and which spellings they used. Written
    to the real stderr, so ``-s`` shows it with xdist too (one summary per worker)."""
    yield
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    lines = [f"test_detect_properties [{worker}]: {sum(GENERATED.values())} generated cases "
             f"({', '.join(f'{k}={v}' for k, v in sorted(GENERATED.items()))})"]
    for f, counts in sorted(SPELLINGS.items()):
        lines.append(f"  {f}: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=str)))
    sys.__stderr__.write("\n" + "\n".join(lines) + "\n")
    sys.__stderr__.flush()


def _run_counted(name: str, inner, record_property):
    before = GENERATED[name]
    inner()
    record_property("generated_cases", GENERATED[name] - before)


_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                       HealthCheck.data_too_large])


def _budget(n: int) -> int:
    """``n`` examples under the CI profile (25 examples by default); scaled with the profile
    (``HYPOTHESIS_PROFILE=dev`` runs 4x as many). Each example compiles with dynamo (~1-3 s)."""
    return max(1, round(n * settings.default.max_examples / 25))


# --------------------------------------------------------------------------------------------
# the properties
# --------------------------------------------------------------------------------------------


@settings(max_examples=_budget(10), **_SETTINGS)
@given(st.data())
def _positive_4d(data):
    case = data.draw(models(st.integers(1, 2), layout="4d"), label="case")
    GENERATED["positive"] += 1
    check_positive(case)


@settings(max_examples=_budget(10), **_SETTINGS)
@given(st.data())
def _positive_flat(data):
    case = data.draw(models(st.integers(1, 2), layout="flat"), label="case")
    GENERATED["positive"] += 1
    check_positive(case)


@settings(max_examples=_budget(10), **_SETTINGS)
@given(st.data())
def _sigmoid(data):
    case = data.draw(models(st.integers(1, 2)), label="case")
    GENERATED["sigmoid"] += 1
    check_sigmoid(case)


@settings(max_examples=_budget(12), **_SETTINGS)
@given(st.data())
def _near_miss(data):
    n = data.draw(st.integers(1, 2), label="blocks")
    case = data.draw(models(n, flaws=[st.sampled_from(FLAWS)] * n, parallel=True), label="case")
    GENERATED["near_miss"] += 1
    check_near_miss(case)


@settings(max_examples=_budget(6), **_SETTINGS)
@given(st.data())
def _mixed(data):
    flaw = data.draw(st.sampled_from(FLAWS), label="flaw")
    flaws = ["none", flaw] if data.draw(st.booleans(), label="positive_first") else [flaw, "none"]
    case = data.draw(models(2, flaws=flaws, parallel=True), label="case")
    GENERATED["mixed"] += 1
    check_mixed(case)


def test_positive_4d_identity(record_property):
    """Heads kept 4-d ``[B, H, T, D]``: identity oracle (outputs and gradients) and the report."""
    _run_counted("positive", _positive_4d, record_property)


def test_positive_flat_identity(record_property):
    """Heads flattened to ``[B*H, T, D]`` (``bmm``, ``baddbmm`` and friends)."""
    _run_counted("positive", _positive_flat, record_property)


def test_sigmoid_matches_reference(record_property):
    """``"sigmoid"`` equals ``attention_reference`` computed from the blocks' own weights."""
    _run_counted("sigmoid", _sigmoid, record_property)


def test_near_miss_left_alone(record_property):
    _run_counted("near_miss", _near_miss, record_property)


def test_near_miss_next_to_attention(record_property):
    _run_counted("mixed", _mixed, record_property)


# --------------------------------------------------------------------------------------------
# former bugs: minimal reproducers, now ordinary regression tests
# --------------------------------------------------------------------------------------------

_PLAIN = Spec(layout="4d", flat_back="pre", split="transpose", qk_op="@", k_t="t-2-1", pv_op="@",
              scale_form="mul", scale_op="mul", scale_const="float", scale_value=0.5,
              scale_after_mask=False, pad_form="none", causal_form="none", causal_first=False,
              softmax="F", dim_positive=False, cast="none", heads=4, head_dim=4, n_rep=1,
              gqa="none", dropout="none", bias=False)

KNOWN_BUGS = [
    pytest.param(check_positive, dataclasses.replace(_PLAIN, k_t="mT", gqa="repeat_kv", n_rep=2),
                 id="mT-repeat_kv-gqa"),
    pytest.param(check_positive, dataclasses.replace(_PLAIN, k_t="mT", scale_form="k"),
                 id="mT-scale-on-k"),
    pytest.param(check_near_miss,
                 dataclasses.replace(_PLAIN, flaw="param_scores", flaw_variant=2),
                 id="param-scores-W.T"),
    pytest.param(check_near_miss,
                 dataclasses.replace(_PLAIN, flaw="param_scores", flaw_variant=3),
                 id="param-scores-W.mT"),
]


@pytest.mark.parametrize("check, spec", KNOWN_BUGS)
def test_known_bugs(check, spec):
    check(fixed_case(spec, parallel=spec.flaw != "none"))


def test_former_bugs_are_recognized():
    """These spellings (``.mT``, ``W.T``) once escaped normalization; the generator now covers
    them and the reproducers above run as ordinary tests."""
    for _, spec in (p.values for p in KNOWN_BUGS):
        assert _formerly_known_bug(spec)
