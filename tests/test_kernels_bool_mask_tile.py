"""CPU kernel mask tiles: a bool mask's 0/−inf tiles (softmax) by bit pattern equal ``log`` of
the 0/1 floats, the kernel with a bool causal mask equals ``is_causal=True``, and "pure" float
tiles (only 0 and masked entries) read tile by tile equal the whole-mask formula."""

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


def _pure_whole_mask(mask, bq, bk):
    """The former whole-mask formula: min and max of the mask with masked entries zeroed."""
    from attnswap.kernels.cpu import _tile_minmax

    thr = 0.5 * torch.finfo(mask.dtype).min
    lo, hi = _tile_minmax(mask.masked_fill(mask <= thr, 0.0), bq, bk)
    return (lo == 0) & (hi == 0)


@pytest.mark.parametrize("shape", [(2, 1, 45, 45), (1, 3, 45, 30), (2, 1, 1, 45), (2, 2, 45, 1)])
def test_pure_tiles_read_only_undecided_tiles(shape):
    """Pure tiles (only 0 and masked entries) decided on the tiles min/max leaves open equal the
    whole-mask formula, for causal, padding and biased masks with partial tiles."""
    from attnswap.kernels.cpu import _mask_tiles

    g = torch.Generator().manual_seed(0)
    low = torch.finfo(torch.float32).min
    R, C = shape[2], shape[3]
    vis = torch.rand(shape, generator=g) > 0.3
    if R > 1 and C > 1:
        vis &= torch.ones(R, C, dtype=torch.bool).tril()
    masks = [torch.zeros(shape).masked_fill(~vis, low)]
    biased = masks[0].clone()
    biased[..., :7, :5] += torch.randn(biased[..., :7, :5].shape, generator=g)
    masks.append(biased)
    masks.append(torch.full(shape, low))
    for mask in masks:
        for bq, bk in ((16, 16), (8, 32), (64, 64)):
            _, _, pure = _mask_tiles(mask, "sigmoid", bq, bk)
            want = _pure_whole_mask(mask, bq, bk)
            for i in range(want.shape[0]):
                for j in range(want.shape[1]):
                    assert pure(i, j) == bool(want[i, j]), (shape, bq, bk, i, j)
