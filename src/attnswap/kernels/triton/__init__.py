"""Fused Triton kernels behind ``attnswap::attention`` (``impl="triton"``; ``"auto"`` on CUDA).

``op.py`` calls exactly two functions:

* :func:`forward` ``(q, k, v, attn_mask, p) -> out [B, Hq, Tq, Dv]`` in q's dtype;
* :func:`backward` ``(grad_out, q, k, v, attn_mask, out, p, need_mask_grad) -> (dq, dk, dv, dmask)``.

Layout: :mod:`.common` (codes, checks, masks, jit helpers: sigmoid, the ReLU family, the dropout
hash), :mod:`.autotune` (tiles per device; one config under the interpreter), :mod:`.fwd`
(forward, and the softmax statistics pass of the backward), :mod:`.bwd` (dQ kernel, dK/dV kernel).

Semantics are those of :mod:`attnswap.kernels.reference`: GQA without repeating K/V, masks read
through their broadcast strides, top-left causal, fp32 accumulation, dropout masks bit-identical to
:mod:`attnswap.kernels.dropout`. On CPU tensors the kernels need ``TRITON_INTERPRET=1`` set before
attnswap is imported.

Environment: ``ATTNSWAP_TANH_APPROX=0`` disables the PTX ``tanh.approx.f32`` instruction that the
``fast_sigmoid`` path uses on a GPU (it is never used under the interpreter, which computes the
same ``0.5 + 0.5 tanh(x/2)`` formula with an exp-based tanh).
"""

from __future__ import annotations

from .bwd import backward
from .common import INTERPRET, TANH_APPROX_ASM
from .fwd import forward, softmax_stats

__all__ = ["forward", "backward", "softmax_stats", "INTERPRET", "TANH_APPROX_ASM"]
