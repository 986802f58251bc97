"""The CPU kernel's 0/−inf tiles of a bool mask (softmax): the bit-pattern conversion equals
``log`` of the 0/1 floats, and the kernel with a bool causal mask equals ``is_causal=True``."""

from __future__ import annotations

import pytest
import torch

import attnswap
from attnswap.kernels.cpu import _bool_additive


@pytest.mark.parametrize("ct", [torch.float32, torch.float64])
def test_bool_additive_is_log_of_visibility(ct):
    m = torch.rand(2, 1, 37, 53, generator=torch.Generator().manual_seed(0)) > 0.4
    tile = m[:, :, 3:30, 5:50]  # a strided slice, as the kernel reads it
    out = _bool_additive(tile, ct)
    assert out.dtype == ct and out.shape == tile.shape
    assert torch.equal(out, tile.to(ct).log())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bool_causal_mask_equals_is_causal(dtype, monkeypatch):
    monkeypatch.setenv("ATTNSWAP_CPU_BLOCK", "16")  # several tiles: diagonal, hidden, free
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, D = 2, 4, 2, 45, 8
    q = torch.randn(B, Hq, T, D, generator=g).to(dtype).requires_grad_(True)
    k = torch.randn(B, Hkv, T, D, generator=g).to(dtype).requires_grad_(True)
    v = torch.randn(B, Hkv, T, D, generator=g).to(dtype).requires_grad_(True)
    mask = torch.ones(T, T, dtype=torch.bool).tril().expand(B, 1, T, T)
    go = torch.randn(B, Hq, T, D, generator=g).to(dtype)
    outs = []
    for m, c in ((mask, False), (None, True)):
        out = attnswap.attention(q, k, v, m, kind="softmax", is_causal=c, impl="cpu")
        outs.append((out, *torch.autograd.grad(out, (q, k, v), go)))
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, **tol)
