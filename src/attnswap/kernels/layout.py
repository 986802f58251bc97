"""The memory layouts an attention output can be asked for (``attention(..., layout=)``).

``None``: contiguous ``[B, H, T, D]``, as a matmul returns it. ``"bthd"``: ``[B, H, T, D]`` laid out
``[B, T, H, D]`` in memory, as PyTorch's CPU SDPA returns it for projection views (the model's
``transpose(1, 2).reshape(B, T, H·D)`` is then free). Tensors are allocated with those strides,
never as transposed views: an ``autograd.Function`` output that is a view refuses in-place ops.
"""

from __future__ import annotations

import torch

LAYOUTS = (None, "bthd")


def check_layout(layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")


def empty(shape, layout: str | None, dtype: torch.dtype, device=None) -> torch.Tensor:
    """An uninitialized ``[B, H, T, D]`` tensor in ``layout``."""
    if layout is None:
        return torch.empty(shape, dtype=dtype, device=device)
    B, H, T, D = shape
    return torch.empty_strided(shape, (T * H * D, D, H * D, 1), dtype=dtype, device=device)


def in_layout(out: torch.Tensor, layout: str | None) -> torch.Tensor:
    """``out [B, H, T, D]`` in ``layout`` (a copy only if it is not already)."""
    if layout is None:
        return out.contiguous()
    if out.transpose(1, 2).is_contiguous():
        return out
    return empty(out.shape, layout, out.dtype, out.device).copy_(out)


__all__ = ["LAYOUTS", "check_layout", "empty", "in_layout"]
