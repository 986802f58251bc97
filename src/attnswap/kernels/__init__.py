"""Kernels behind ``attnswap::attention``: ``reference`` (the oracle), ``cpu`` (tiled torch),
``triton`` (fused GPU kernels, also run on CPU by ``TRITON_INTERPRET=1``), and ``op`` (the op)."""

from .op import attention, call_counts, reset_call_counts, total_calls

__all__ = ["attention", "call_counts", "reset_call_counts", "total_calls"]
