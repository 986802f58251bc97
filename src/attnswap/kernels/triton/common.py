"""Shared pieces of the Triton attention kernels: codes, host-side checks, mask preparation and the
small ``@triton.jit`` helpers (sigmoid, the ReLU family's h and h', the dropout hash).

Everything here is shared by :mod:`.forward` and :mod:`.backward`; nothing launches a kernel.

Interpreter notes (``TRITON_INTERPRET=1``, see PRIOR_ART.md §4): it is read when a kernel is
decorated, so :data:`INTERPRET` is frozen at import time. Under it every tile is converted to fp32
right after ``tl.load`` (bf16 arithmetic is wrong there), inline asm is never emitted, and the
autotuner sees exactly one config.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..params import LENGTH_VISIBLE, AttentionParams
from ..mask_cache import MaskObjectCache
from ..reference import masked_threshold

# ``triton.jit`` decides at decoration time whether it builds an interpreted function; this module
# is imported before any kernel module, so the value below is the one the kernels were built with.
try:
    INTERPRET: bool = bool(triton.knobs.runtime.interpret)
except AttributeError:  # pragma: no cover - older triton
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# Opt-out for the PTX ``tanh.approx.f32`` fast sigmoid on a real GPU (never used when interpreting).
TANH_APPROX_ASM: bool = (not INTERPRET) and os.environ.get("ATTNSWAP_TANH_APPROX", "1") != "0"

# ---------------------------------------------------------------------------------------------
# codes shared by host and kernels (plain ints: passed as tl.constexpr)

KIND_SOFTMAX, KIND_SIGMOID, KIND_RELU = 0, 1, 2
KIND_CODES = {"softmax": KIND_SOFTMAX, "sigmoid": KIND_SIGMOID, "relu": KIND_RELU}

ACT_RELU, ACT_RELU2, ACT_GELU, ACT_SOFTPLUS, ACT_IDENTITY, ACT_RELU6, ACT_SIGMOID = range(7)
ACT_CODES = {
    "relu": ACT_RELU, "relu2": ACT_RELU2, "gelu": ACT_GELU, "softplus": ACT_SOFTPLUS,
    "identity": ACT_IDENTITY, "relu6": ACT_RELU6, "sigmoid": ACT_SIGMOID,
}

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------
# host-side checks


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Device, dtype and head-dim checks with messages that say what to do instead."""
    from .compile_check import collecting  # (compile_check imports this module)

    for t in (q, k, v):
        if t.device.type != "cuda" and not INTERPRET and not collecting():
            raise RuntimeError(
                f"attnswap's Triton kernels got a tensor on {t.device} but Triton runs CPU tensors "
                "only through its interpreter: set TRITON_INTERPRET=1 in the environment *before* "
                "importing attnswap (it is read when the kernels are defined), or use impl='cpu'."
            )
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"the Triton kernels compute fp16, bf16 and fp32 inputs; got {q.dtype}. "
            "Use impl='cpu' or impl='reference' for other dtypes."
        )
    D, Dv = q.shape[-1], v.shape[-1]
    if not (1 <= D <= MAX_HEAD_DIM and 1 <= Dv <= MAX_HEAD_DIM):
        raise ValueError(
            f"the Triton kernels support head dims 1..{MAX_HEAD_DIM} (q/k: {D}, v: {Dv}); "
            "use impl='cpu' for larger heads."
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")


def block_dim(d: int) -> int:
    """Padded tile width of a head dim: a power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(d))


def compute_in_fp32(dtype: torch.dtype) -> bool:
    """Convert every tile to fp32 right after loading: only bf16 under the interpreter (whose bf16
    is not arithmetic). fp16 and fp32 tiles stay in their dtype there, as on a GPU, so the
    interpreter sees what the GPU computes in fp16: P cast to fp16 before ``tl.dot``, with its
    overflow (fp16 max 65504) and rounding; ``tl.dot`` of fp16 tiles accumulates in fp32 in both."""
    return INTERPRET and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs are multiplied exactly (``ieee``), not in TF32: the fp32 tolerances are 1e-5.
    (16-bit inputs use the tensor cores whatever this says.)"""
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------------------------
# masks


@dataclass
class MaskInfo:
    """How a kernel reads ``attn_mask``.

    ``tensor`` is the mask as the kernel reads it (bool viewed as uint8; fp64 narrowed to fp32) or a
    1-element dummy; ``strides`` are its strides expanded to ``[B, Hq, Tq, Tk]`` (0 on broadcast
    dims: the mask is never materialized at full size). ``add``: the float values are added to the
    scores. ``vis``: the mask decides which keys are visible (bool masks; float masks for
    sigmoid/ReLU, where entries <= ``threshold`` are masked). ``is_bool``: the tile is a 0/1 byte.
    """

    tensor: torch.Tensor
    strides: tuple
    add: bool
    vis: bool
    is_bool: bool
    threshold: float
    cells: torch.Tensor = None  # uint8 [Bm, Hm, ceil(R/16), ceil(C/16)]: any entry visible (a
    # 1-element dummy without a visibility mask)
    cell_strides: tuple = (0, 0, 0, 0)  # expanded to [B, Hq, ceil(Tq/16), ceil(Tk/16)]


# Granularity of the visible-cell table (every autotuned BLOCK_M / BLOCK_N is a multiple of it).
CELL_SIZE = 16
CELL: tl.constexpr = tl.constexpr(CELL_SIZE)
_cells_cache = MaskObjectCache()


def visible_cells(vis: torch.Tensor) -> torch.Tensor:
    """``vis [Bm, Hm, R, C]`` (bool, the mask's own broadcast shape) → uint8 ``[Bm, Hm,
    ceil(R/16), ceil(C/16)]``: 1 where a 16 x 16 cell holds a visible entry. Size-1 (broadcast)
    dims stay 1."""
    Bm, Hm, R, C = vis.shape
    cr, cc = (CELL_SIZE if R > 1 else 1), (CELL_SIZE if C > 1 else 1)
    nr, nc = -(-R // cr), -(-C // cc)
    if nr * cr != R or nc * cc != C:
        vis = torch.nn.functional.pad(vis, (0, nc * cc - C, 0, nr * cr - R))
    cells = vis.view(Bm, Hm, nr, cr, nc, cc).any(5).any(3)
    return cells.to(torch.uint8).contiguous()


def _cells_fields(cells: torch.Tensor, B: int, Hq: int, Tq: int, Tk: int) -> dict:
    """``MaskInfo``'s cell table and its strides expanded to the kernels' cell grid."""
    grid = (B, Hq, -(-Tq // CELL_SIZE), -(-Tk // CELL_SIZE))
    return {"cells": cells, "cell_strides": cells.expand(grid).stride()}


def prepare_mask(attn_mask, kind: str, q: torch.Tensor, Tk: int) -> MaskInfo:
    B, Hq, Tq = q.shape[:3]
    if attn_mask is None:
        none = q.new_empty(1)
        return MaskInfo(none, (0, 0, 0, 0), False, False, False, 0.0, cells=none)
    if attn_mask.dim() != 4:
        raise ValueError(f"the Triton kernels take a 4-dim (unsqueezed) mask; got {attn_mask.shape}")
    m = attn_mask
    if m.device != q.device:
        m = m.to(q.device)
    if m.dtype == torch.bool:
        strides = m.expand(B, Hq, Tq, Tk).stride()
        cells = _cells_cache.get(attn_mask, ("bool", m.device), lambda: visible_cells(m))
        return MaskInfo(m.view(torch.uint8), strides, False, True, True, 0.0,
                        **_cells_fields(cells, B, Hq, Tq, Tk))
    threshold = masked_threshold(m.dtype)
    if m.dtype == torch.float64:
        # Kernels read fp32. Keep the "masked" decision exact: decide it in fp64, then mark -inf.
        m = m.masked_fill(m <= threshold, float("-inf")).to(torch.float32)
        threshold = masked_threshold(torch.float32)
    strides = m.expand(B, Hq, Tq, Tk).stride()
    if kind == "softmax":  # a float mask is a pure addition there (SDPA), it hides nothing
        return MaskInfo(m, strides, True, False, False, float(threshold), cells=q.new_empty(1))
    # For the other kinds it also hides keys: the kernels' own rule, (m <= threshold) == 0
    # (so NaN counts as visible: a cell is skipped only where the kernel would see nothing).
    cells = _cells_cache.get(attn_mask, ("float", m.device, float(threshold)),
                             lambda: visible_cells((m <= threshold) == 0))
    return MaskInfo(m, strides, True, True, False, float(threshold),
                    **_cells_fields(cells, B, Hq, Tq, Tk))


def reduce_mask_grad(dmask_full: torch.Tensor, mask_shape) -> torch.Tensor:
    """Sum a ``[B, Hq, Tq, Tk]`` gradient over the dims a 4-dim mask broadcasts along."""
    dims = [d for d, (n, full) in enumerate(zip(mask_shape, dmask_full.shape)) if n == 1 and full != 1]
    g = dmask_full.sum(dim=dims, keepdim=True) if dims else dmask_full
    return g.reshape(mask_shape)


# ---------------------------------------------------------------------------------------------
# scalar arguments derived from AttentionParams


@dataclass
class KernelScalars:
    kind: int
    act: int
    sig_bias: float  # sigmoid's b
    post: float  # relu: L^-alpha for a fixed L, Tk^-alpha for length="visible"; else 1
    alpha: float
    visible: bool  # relu with L = per-row visible count
    dropout: bool
    drop_thr: int  # keep iff hash >= drop_thr (uint32)
    seed_term: int  # ((seed & M32) * 0x9E3779B9) & M32, the high word's additive term
    drop_scale: float  # 1 / (1 - p)
    fast_sigmoid: bool


_M32 = 0xFFFFFFFF


def kernel_scalars(p: AttentionParams, Tk: int) -> KernelScalars:
    kind = KIND_CODES[p.kind]
    post = 1.0
    visible = False
    if kind == KIND_RELU:
        if p.length == LENGTH_VISIBLE:
            # The kernels scale h(S) by this before any cast (every row's cnt <= Tk, so the
            # weights carried are at most the true ones) and fix the ratio per row at the end.
            visible = True
            post = max(float(Tk), 1.0) ** (-p.alpha)
        else:
            post = p.relu_factor(Tk)
    dropout = p.dropout_p > 0.0
    return KernelScalars(
        kind=kind,
        act=ACT_CODES[p.activation],
        sig_bias=float(p.sigmoid_b(Tk)) if kind == KIND_SIGMOID else 0.0,
        post=float(post),
        alpha=float(p.alpha),
        visible=visible,
        dropout=dropout,
        drop_thr=int(p.dropout_p * 4294967296.0) if dropout else 0,
        seed_term=((p.dropout_seed & _M32) * 0x9E3779B9) & _M32,
        drop_scale=1.0 / (1.0 - p.dropout_p) if dropout else 1.0,
        fast_sigmoid=bool(p.fast_sigmoid),
    )


# ---------------------------------------------------------------------------------------------
# device helpers

@triton.jit
def _rcp_1_2(d):
    """1 / d for d in [1, 2] on the FMA pipe, without a MUFU op: the linear minimax start
    24/17 - 8/17 d (relative error <= 1/17), then three Newton steps r += r (1 - d r), each of
    which squares the error: 1/17 -> 3.5e-3 -> 1.2e-5 -> 1.4e-10, i.e. fp32 rounding (7 FMAs)."""
    r = 1.411764705882353 - 0.47058823529411764 * d
    r = r + r * (1.0 - d * r)
    r = r + r * (1.0 - d * r)
    r = r + r * (1.0 - d * r)
    return r


@triton.jit
def sigmoid_accurate(x):
    """sigma(x) with ONE MUFU op per element (the ``ex2`` of e^-|x|); the reciprocal of
    1 + e^-|x| (in [1, 2]) is refined on the FMA pipe (:func:`_rcp_1_2`) instead of ``div.full``
    (a second MUFU op, ``rcp``). No overflow (e^-|x| <= 1) and full relative accuracy for x << 0:
    there the result is e^x / (1 + e^x), not 1 - something. Relative error vs fp64: a few fp32
    ulp plus ``ex2.approx``'s ~2 ulp and the rounding of |x| log2(e) (~|x| * 6e-8)."""
    z = tl.exp2(tl.abs(x) * -1.4426950408889634)
    r = _rcp_1_2(1.0 + z)
    return tl.where(x >= 0, r, z * r)


@triton.jit
def _tanh_emulated(y):
    # tanh through exp in fp32: what the fast path computes where no tanh.approx exists (the
    # interpreter). Same cancellation behaviour in 0.5 + 0.5 * tanh as the hardware path.
    e = tl.exp(-2.0 * tl.abs(y))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(y >= 0, t, -t)


@triton.jit
def sigmoid_fast(x, USE_ASM: tl.constexpr):
    """FlashSigmoid's sigma(x) = 0.5 + 0.5 tanh(x / 2): one MUFU op with tanh.approx.f32, but it
    loses relative accuracy for x << 0 (1 - |tanh| cancels)."""
    if USE_ASM:
        t = tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=f,f", [x * 0.5], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        t = _tanh_emulated(x * 0.5)
    return 0.5 + 0.5 * t


@triton.jit
def sigmoid_kind(x, FAST: tl.constexpr, USE_ASM: tl.constexpr):
    if FAST:
        return sigmoid_fast(x, USE_ASM)
    else:
        return sigmoid_accurate(x)


@triton.jit
def _softplus(x):
    # torch's F.softplus (beta 1, threshold 20): x above 20, else log1p(exp(x)), stable.
    z = tl.exp(-tl.abs(x))
    l1p = tl.where(z < 1e-3, z * (1.0 - z * (0.5 - z * (1.0 / 3.0))), tl.log(1.0 + z))
    sp = tl.maximum(x, 0.0) + l1p
    return tl.where(x > 20.0, x, sp)


@triton.jit
def activation(s, ACT: tl.constexpr):
    """The ReLU family's h(S), in fp32."""
    if ACT == 0:  # relu
        return tl.maximum(s, 0.0)
    elif ACT == 1:  # relu2
        r = tl.maximum(s, 0.0)
        return r * r
    elif ACT == 2:  # gelu (erf)
        return 0.5 * s * (1.0 + tl.math.erf(s * 0.7071067811865476))
    elif ACT == 3:  # softplus
        return _softplus(s)
    elif ACT == 4:  # identity
        return s
    elif ACT == 5:  # relu6
        return tl.minimum(tl.maximum(s, 0.0), 6.0)
    else:  # sigmoid
        return sigmoid_accurate(s)


@triton.jit
def activation_grad(s, ACT: tl.constexpr):
    """h'(S), matching torch's backward formulas (relu'(0) = 0, relu6' = 0 at 0 and 6,
    softplus' = 1 above the threshold)."""
    if ACT == 0:
        return tl.where(s > 0.0, 1.0, 0.0)
    elif ACT == 1:
        return 2.0 * tl.maximum(s, 0.0)
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(s * 0.7071067811865476))
        pdf = tl.exp(-0.5 * s * s) * 0.3989422804014327
        return cdf + s * pdf
    elif ACT == 3:
        return tl.where(s > 20.0, 1.0, sigmoid_accurate(s))
    elif ACT == 4:
        return tl.full(s.shape, 1.0, tl.float32)
    elif ACT == 5:
        return tl.where((s > 0.0) & (s < 6.0), 1.0, 0.0)
    else:
        sg = sigmoid_accurate(s)
        return sg * (1.0 - sg)


@triton.jit
def tile_visible(Tiles, t_base, start_m, start_n, stm, stn, Tq, Tk,
                 MASK_VIS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Whether the user mask lets any query of ``[start_m, start_m + BLOCK_M)`` see any key of
    ``[start_n, start_n + BLOCK_N)``, read off the mask's table of visible 16 x 16 cells
    (:func:`visible_cells`): BLOCK_M/16 x BLOCK_N/16 bytes, not the mask tile itself, so the check
    costs no registers the tile loops need (the forward's 128 x 128 tiles sit at the sm90 limit).
    A tile the mask hides entirely (padded keys, a padded query block) adds nothing to O, dQ, dK,
    dV or the mask gradient in any kind (softmax included: its weights there are 0, and a row
    max still at -inf leaves the running sums as they are), so the kernels skip its matmuls.
    Without a visibility mask every tile is visited."""
    if MASK_VIS:
        r = start_m // CELL + tl.arange(0, BLOCK_M // CELL)
        c = start_n // CELL + tl.arange(0, BLOCK_N // CELL)
        inb = (r[:, None] < tl.cdiv(Tq, CELL)) & (c[None, :] < tl.cdiv(Tk, CELL))
        cells = tl.load(Tiles + t_base + r[:, None] * stm + c[None, :] * stn, mask=inb, other=0)
        return tl.max(cells) != 0
    else:
        return True


@triton.jit
def lowbias32(x):
    """Chris Wellons' lowbias32 on uint32 (products wrap mod 2^32), as in kernels/dropout.py."""
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    x = x ^ (x >> 16)
    return x


@triton.jit
def dropout_keep(index, seed_term, drop_thr):
    """Bit-identical to ``dropout.keep_from_index``: ``index`` is the int64 linear index of the
    score element in ``[B, Hq, Tq, Tk]``; ``seed_term`` = ((seed & M32) * 0x9E3779B9) & M32."""
    hi = lowbias32((index >> 32).to(tl.uint32) + seed_term.to(tl.uint32))
    x = lowbias32(index.to(tl.uint32) ^ hi)
    return x >= drop_thr.to(tl.uint32)


def fast_sigmoid_error_bound(x: float) -> float:
    """Worst-case absolute error of 0.5 + 0.5 tanh.approx(x/2) on a GPU, from PTX's relative error
    bound of tanh.approx.f32 (about 2^-11): 0.5 * |tanh(x/2)| * 2^-11."""
    return 0.5 * abs(math.tanh(0.5 * x)) * 2.0 ** -11
