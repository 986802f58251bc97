"""The fused CPU kernel (``attention.cpp``): sigmoid and ReLU attention, forward and backward.

``impl="cpu"`` (and ``"auto"`` on CPU for sigmoid/ReLU) runs this kernel whenever
:func:`unsupported` finds nothing it lacks; otherwise the tiled torch kernel in ``cpu.py`` runs
the call, with the same results. Which of the two ran, and why, is counted per pass in
:data:`path_counts` (``("forward", "fused")``, ``("backward", "tiled: dropout")``...), and a
kernel that cannot be built on this machine is reported by one :class:`FusedKernelWarning` per
process naming the compiler's error. ``ATTNSWAP_CPU_FUSED=0`` turns it off.

What it lacks (the tiled kernel has them): dropout, ``length="visible"``, gradients for a float
mask that requires grad, float64, softmax (which ``impl="auto"`` runs on SDPA anyway).
"""

from __future__ import annotations

import collections
import ctypes
import os
import warnings

import torch

from ..layout import empty
from ..mask_cache import MaskObjectCache
from ..params import LENGTH_VISIBLE, AttentionParams
from ..reference import ACTIVATIONS, masked_threshold
from .build import FusedBuildError, load

ENV_FUSED = "ATTNSWAP_CPU_FUSED"
# Query rows x keys per tile: a 128 x 256 fp32 score tile (128 KiB) and, in the backward, its
# gradient stay in a core's L2 (1 MiB on the AMD EPYC measured) from one matmul to the next;
# larger query blocks keep BLAS efficient on the short inner dimensions of dV += PᵀdO and
# dK += dSᵀQ. One grid for the forward and the backward, so the mask tile classes computed for
# one serve the other. (Measured fwd+bwd against SDPA, one thread, B1 H8 D64, T 512 and 2048:
# 128x256 3.34 / 3.49x SDPA's forward, 64x512 3.50 / 3.59x, 32x512 3.58 / 3.65x, 256x512
# 3.48 / 3.45x.)
BLOCK_Q = 128
BLOCK_K = 256

path_counts: collections.Counter = collections.Counter()


class FusedKernelWarning(UserWarning):
    """The fused CPU kernel is unavailable; the tiled kernel runs instead."""


class _Problem(ctypes.Structure):
    _fields_ = [
        ("B", ctypes.c_int64), ("Hq", ctypes.c_int64), ("Hkv", ctypes.c_int64),
        ("Tq", ctypes.c_int64), ("Tk", ctypes.c_int64), ("D", ctypes.c_int64),
        ("Dv", ctypes.c_int64),
        ("q", ctypes.c_void_p), ("qs", ctypes.c_int64 * 3),
        ("k", ctypes.c_void_p), ("ks", ctypes.c_int64 * 3),
        ("v", ctypes.c_void_p), ("vs", ctypes.c_int64 * 3),
        ("mask", ctypes.c_void_p), ("mask_bool", ctypes.c_int), ("ms", ctypes.c_int64 * 4),
        ("mask_thr", ctypes.c_float),
        ("tiles", ctypes.c_void_p), ("ts", ctypes.c_int64 * 4),
        ("kind", ctypes.c_int), ("act", ctypes.c_int),
        ("scale", ctypes.c_float), ("bias", ctypes.c_float), ("factor", ctypes.c_float),
        ("causal", ctypes.c_int), ("bq", ctypes.c_int), ("bk", ctypes.c_int),
        ("threads", ctypes.c_int),
    ]


_warned = False


def enabled() -> bool:
    return os.environ.get(ENV_FUSED, "1").strip().lower() not in ("0", "false", "off", "no")


def library():
    """The loaded kernel, or None after one warning per process saying why not."""
    global _warned
    try:
        return load()
    except FusedBuildError as e:
        if not _warned:
            _warned = True
            warnings.warn(
                f"attnswap: the fused CPU kernel is unavailable ({e}); impl='cpu' runs the tiled "
                f"torch kernel instead (same results, slower). Install g++ to get it, or set "
                f"{ENV_FUSED}=0 to choose the tiled kernel and silence this.",
                FusedKernelWarning, stacklevel=3)
        return None


_MAX_INT = 2**31 - 1  # BLAS dimensions and leading dimensions are 32-bit ints


def unsupported(q, k, v, mask, p: AttentionParams, need_mask_grad: bool = False) -> str | None:
    """Why the fused kernel cannot run this call (None: it can)."""
    if not enabled():
        return f"{ENV_FUSED}=0"
    if p.kind not in ("sigmoid", "relu"):
        return f"kind={p.kind}"
    if p.dropout_p > 0.0:
        return "dropout"
    if p.kind == "relu" and p.length == LENGTH_VISIBLE:
        return "length='visible'"
    if need_mask_grad:
        return "mask gradient"
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {q.dtype}"
    if q.device.type != "cpu":
        return f"device {q.device.type}"
    if 0 in q.shape or 0 in k.shape or v.shape[-1] == 0:
        return "empty"
    if max(q.shape[2], k.shape[2], q.shape[3], v.shape[3]) > _MAX_INT // 64:
        return "size"
    if library() is None:
        return "not built"
    return None


_cpu_module = None


def _cpu():
    global _cpu_module
    if _cpu_module is None:
        from .. import cpu  # cpu imports this module: bound on first use

        _cpu_module = cpu
    return _cpu_module


def block_sizes() -> tuple[int, int]:
    cpu = _cpu()
    if os.environ.get(cpu.ENV_BLOCK, "").strip():
        return cpu.block_sizes(1)  # the same override (and its error) as the tiled kernel
    return BLOCK_Q, BLOCK_K


def threads(scores: int | None = None) -> int:
    """OpenMP threads for a call with ``scores`` score elements: the tiled kernel's rule (one
    thread below ``PARALLEL_MIN_SCORES``), since a team's barrier waits for its slowest thread,
    and on a machine where another process holds a core that costs a small call more than its
    work (measured: the training CLI's tiny steps 16 % slower with 2 threads under pytest -n 2)."""
    cpu = _cpu()
    if scores is not None and scores < cpu.PARALLEL_MIN_SCORES:
        return 1
    return max(1, cpu.num_workers())


# ----------------------------------------------------------------------------------------------
# operands


def _f32(t: torch.Tensor) -> torch.Tensor:
    """fp32 as BLAS reads it: a unit head-dim stride and token rows that do not overlap (a token
    stride of at least the row: BLAS's leading dimension). Any batch/head strides, 0 included.
    An expanded token dim (a ``grad_out`` from ``out.sum(dim=tokens)``, a ``[.., 1, D]`` key
    expanded over T) is materialized. (The kernel reads only ``data_ptr``: no ``detach`` is
    needed where nothing is converted.)"""
    if t.dtype != torch.float32:
        t = t.detach().to(torch.float32)
    n, s = t.shape, t.stride()
    if (s[3] != 1 and n[3] != 1) or not (n[2] == 1 or s[2] >= n[3]):
        t = t.detach().contiguous()
    return t


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    s = t.stride()
    # A dim of size 1 is never stepped along, but BLAS wants a leading dimension >= the row.
    tok = s[2] if t.shape[2] > 1 else t.shape[3]
    return s[0], s[1], max(tok, t.shape[3])


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """An fp32 gradient for ``t`` in ``t``'s own layout when it is dense (the usual
    ``[B, T, H, D]``-in-memory projection view): autograd hands it back to the projection without
    a copy. Overlapping or gapped inputs (expanded, sliced) get a contiguous one."""
    g = torch.empty_like(t, dtype=torch.float32, memory_format=torch.preserve_format)
    # (preserve_format may pick channels_last for an overlapping 4-dim input: the kernel needs
    # a unit head-dim stride)
    return g if g.stride(-1) == 1 else torch.empty(t.shape, dtype=torch.float32)


def _mask_operand(mask: torch.Tensor, Tk: int):
    """(tensor, is_bool, threshold): the mask as bytes or fp32 with a unit key stride."""
    if mask.dtype == torch.bool:
        thr = 0.0
    else:
        thr = masked_threshold(mask.dtype)
        if mask.dtype != torch.float32:
            mask = mask.to(torch.float32)
    if mask.shape[3] != Tk or mask.stride(3) != 1:
        mask = mask.expand(*mask.shape[:3], Tk).contiguous()
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    return mask, mask.dtype == torch.uint8, thr


def _broadcast_strides(t: torch.Tensor) -> list[int]:
    return [0 if n == 1 else s for n, s in zip(t.shape, t.stride())]


_tile_cache = MaskObjectCache()


def _classify(lib, m: torch.Tensor, is_bool: bool, thr: float, bq: int, bk: int):
    Bm, Hm, R, C = m.shape
    tr, tc = (bq if R > 1 else 1), (bk if C > 1 else 1)
    out = torch.empty(Bm, Hm, -(-R // tr), -(-C // tc), dtype=torch.uint8)
    ms = (ctypes.c_int64 * 4)(*_broadcast_strides(m))
    lib.attnswap_classify_mask(m.data_ptr(), int(is_bool), Bm, Hm, R, C, ms, thr, bq, bk,
                               out.data_ptr(), threads())
    return out


def _tile_classes(lib, mask, m, is_bool, thr, bq, bk):
    """The mask's tile classes, remembered per mask object and version (``mask_cache``)."""
    return _tile_cache.get(mask, (bq, bk), lambda: _classify(lib, m, is_bool, thr, bq, bk))


_ACT_CODE = {a: i for i, a in enumerate(ACTIVATIONS)}
_I64x3 = ctypes.c_int64 * 3
_I64x4 = ctypes.c_int64 * 4


def _rows(t: torch.Tensor):
    """``(data_ptr, strides3)`` of a 4-dim operand (see :func:`_strides3`)."""
    return t.data_ptr(), _I64x3(*_strides3(t))


def _problem_template(lib, q, k, v, mask, p: AttentionParams, threads_: int):
    """The C struct for a call's geometry, with every field but the data pointers filled, and
    how its mask is read: ``(struct, (mask passes unchanged, is_bool, threshold))``."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[3]
    bq, bk = block_sizes()
    bq, bk = min(bq, Tq), min(bk, Tk)
    pr = _Problem()
    pr.B, pr.Hq, pr.Hkv, pr.Tq, pr.Tk, pr.D, pr.Dv = B, Hq, Hkv, Tq, Tk, D, Dv
    pr.qs, pr.ks, pr.vs = _I64x3(*_strides3(q)), _I64x3(*_strides3(k)), _I64x3(*_strides3(v))
    how = None
    if mask is not None:
        m, is_bool, thr = _mask_operand(mask.detach(), Tk)
        passes = m.data_ptr() == mask.data_ptr() and _broadcast_strides(m) == _broadcast_strides(mask)
        how = (passes, is_bool, thr)
        tiles = _tile_classes(lib, mask, m, is_bool, thr, bq, bk)
        pr.mask_bool, pr.mask_thr = int(is_bool), thr
        pr.ms = _I64x4(*_broadcast_strides(m))  # 4-dim: strides 0 where size 1
        pr.ts = _I64x4(*_broadcast_strides(tiles))
    if p.kind == "sigmoid":
        pr.kind, pr.act, pr.bias, pr.factor = 0, _ACT_CODE["sigmoid"], p.sigmoid_b(Tk), 1.0
    else:
        pr.kind, pr.act, pr.bias, pr.factor = 1, _ACT_CODE[p.activation], 0.0, p.relu_factor(Tk)
    pr.scale = p.scale
    pr.causal = int(p.is_causal)
    pr.bq, pr.bk = bq, bk
    pr.threads = threads_
    return pr, how


# Templates by call geometry: a converted model calls each site with the same few geometries on
# every step, so a call copies its template and sets five pointers (~8 µs) instead of filling
# the struct (~30 µs, a visible part of a small layer's time).
_templates: dict = {}
_MAX_TEMPLATES = 4096


def _problem(lib, q, k, v, mask, p: AttentionParams):
    """The C struct for one call, and the tensors it points into (kept alive by the caller)."""
    B, Hq, Tq, _ = q.shape
    threads_ = threads(B * Hq * Tq * k.shape[2])
    mkey = None if mask is None else (mask.shape, mask.stride(), mask.dtype)
    # Everything the template's fields are computed from (the block override is read here,
    # so a change of the environment variable is a new template, as it is a new tiling).
    key = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), mkey, p, threads_,
           os.environ.get(_cpu().ENV_BLOCK, ""))
    hit = _templates.get(key)
    if hit is None:
        hit = _problem_template(lib, q, k, v, mask, p, threads_)
        if len(_templates) >= _MAX_TEMPLATES:
            _templates.clear()
        _templates[key] = hit
    tpl, how = hit
    pr = _Problem.from_buffer_copy(tpl)
    pr.q, pr.k, pr.v = q.data_ptr(), k.data_ptr(), v.data_ptr()
    keep = [q, k, v]
    if mask is not None:
        passes, is_bool, thr = how
        m = mask if passes else _mask_operand(mask.detach(), k.shape[2])[0]
        # The tile classes are cached on the caller's mask object itself (a detached copy
        # would be a new object every call).
        tiles = _tile_classes(lib, mask, m, is_bool, thr, pr.bq, pr.bk)
        keep += [m, tiles]
        pr.mask, pr.tiles = m.data_ptr(), tiles.data_ptr()
    return pr, keep


# ----------------------------------------------------------------------------------------------
# entry points (called by cpu.py once unsupported() said None)


def forward(q, k, v, mask, p: AttentionParams, layout: str | None = None) -> torch.Tensor:
    lib = load()
    q32, k32, v32 = _f32(q), _f32(k), _f32(v)
    pr, keep = _problem(lib, q32, k32, v32, mask, p)
    out = empty((*q.shape[:3], v.shape[3]), layout, torch.float32)
    lib.attnswap_forward(ctypes.byref(pr), *_rows(out))
    del keep
    return out if q.dtype == torch.float32 else out.to(q.dtype)


def backward(grad_out, q, k, v, mask, p: AttentionParams):
    lib = load()
    q32, k32, v32 = _f32(q), _f32(k), _f32(v)
    do32 = _f32(grad_out)
    pr, keep = _problem(lib, q32, k32, v32, mask, p)
    dq, dk, dv = _empty_like(q32), _empty_like(k32), _empty_like(v32)
    lib.attnswap_backward(ctypes.byref(pr), *_rows(do32), *_rows(dq), *_rows(dk), *_rows(dv))
    del keep
    return dq, dk, dv


__all__ = ["forward", "backward", "unsupported", "path_counts", "FusedKernelWarning",
           "FusedBuildError", "ENV_FUSED", "BLOCK_Q", "BLOCK_K"]
