"""Attention dropout that a kernel can regenerate in its backward without storing a mask.

The keep decision for score element ``(b, h, i, j)`` is a pure function of a seed and the
element's linear index in the ``[B, Hq, Tq, Tk]`` score tensor, through a 32-bit integer hash
(Chris Wellons' ``lowbias32``). Every path (reference, CPU tiles, Triton blocks) evaluates the
same function, so their dropout masks agree bit for bit and the tests can compare them exactly.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """``x`` holds uint32 values in an int64 tensor; products wrap, and the low 32 bits are kept."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    x = x ^ (x >> 16)
    return x


def keep_from_index(seed: int, index: torch.Tensor, p: float) -> torch.Tensor:
    """Bool tensor: True where the element at linear ``index`` (int64) survives dropout ``p``."""
    hi = lowbias32(((index >> 32) + (seed & _M32) * 0x9E3779B9) & _M32)
    x = lowbias32((index & _M32) ^ hi)
    threshold = int(p * 4294967296.0)
    return x >= threshold


def dropout_keep_mask(seed: int, p: float, shape, device=None) -> torch.Tensor:
    B, H, Tq, Tk = shape
    index = torch.arange(B * H * Tq * Tk, dtype=torch.int64, device=device).view(B, H, Tq, Tk)
    return keep_from_index(seed, index, p)


def tile_keep_mask(
    seed: int, p: float, shape, q_start: int, q_len: int, k_start: int, k_len: int, device=None
) -> torch.Tensor:
    """The ``[B, H, q_len, k_len]`` block of :func:`dropout_keep_mask` at ``(q_start, k_start)``."""
    B, H, Tq, Tk = shape
    bh = torch.arange(B * H, dtype=torch.int64, device=device).view(B, H, 1, 1)
    i = torch.arange(q_start, q_start + q_len, dtype=torch.int64, device=device).view(1, 1, -1, 1)
    j = torch.arange(k_start, k_start + k_len, dtype=torch.int64, device=device).view(1, 1, 1, -1)
    return keep_from_index(seed, (bh * Tq + i) * Tk + j, p)
