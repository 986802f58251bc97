"""The CPU kernel skips the tiles a mask tensor hides entirely and does no mask work on tiles it
leaves entirely visible (cpu._mask_tiles), with results equal to the reference: key-padding masks,
causal masks handed over as tensors (how a converted HF Llama calls the op: the mask is built
outside the attention module), finfo.min float masks including rows that see nothing (softmax
is uniform there, so those row blocks must not be skipped), broadcast mask dims."""

from __future__ import annotations

import pytest
import torch

from attnswap import attention
from attnswap.kernels import cpu, cpu_fused
from attnswap.kernels.reference import attention_reference
from tolerances import assert_close

MIN = torch.finfo(torch.float32).min


@pytest.fixture(autouse=True, params=["fused", "tiled"])
def cpu_path(request, monkeypatch):
    """Both CPU kernels skip hidden tiles (the fused one classifies tiles in C++)."""
    monkeypatch.setenv(cpu_fused.ENV_FUSED, "1" if request.param == "fused" else "0")
    return request.param


def _inputs(B=2, H=2, T=80, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g) for _ in range(4)]


def _causal(T, B=1, dtype=torch.bool):
    vis = torch.ones(T, T, dtype=torch.bool).tril().expand(B, 1, T, T)
    return vis if dtype == torch.bool else torch.zeros(B, 1, T, T).masked_fill(~vis, MIN)


def _padding(B, T, lengths, dtype=torch.bool):
    vis = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).view(B, 1, 1, T)
    return vis if dtype == torch.bool else torch.zeros(B, 1, 1, T).masked_fill(~vis, MIN)


def _check(kind, mask, **kw):
    q, k, v, do = _inputs(B=mask.shape[0] if mask.shape[0] > 1 else 2, T=mask.shape[-1])
    outs = []
    for fn in (lambda *a: attention(*a, kind=kind, impl="cpu", **kw),
               lambda *a: attention_reference(*a, kind=kind, **kw)):
        ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*ins, mask)
        outs.append([out] + list(torch.autograd.grad(out, ins, do)))
    for name, a, e in zip(("out", "dq", "dk", "dv"), *outs):
        assert torch.isfinite(a).all()
        assert_close(a, e, dtype=torch.float32, msg=f"{kind} {name}")


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "relu"])
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32], ids=["bool", "float"])
@pytest.mark.parametrize("shape", ["causal", "padding", "causal+padding"])
def test_tensor_masks_with_skipped_tiles_match_reference(monkeypatch, kind, dtype, shape):
    monkeypatch.setenv(cpu.ENV_BLOCK, "16")
    T, B = 80, 2
    if shape == "causal":
        mask = _causal(T, 1, dtype)
    elif shape == "padding":
        mask = _padding(B, T, [80, 37], dtype)
    else:
        c = _causal(T, 1, torch.bool) & _padding(B, T, [80, 37], torch.bool)
        mask = c if dtype == torch.bool else torch.zeros(B, 1, T, T).masked_fill(~c, MIN)
    _check(kind, mask)


def test_softmax_rows_that_see_nothing_stay_uniform(monkeypatch):
    """Left padding with an HF-style finfo.min mask: the padded query rows see no key, so softmax
    is uniform over them (as SDPA computes it); skipping their tiles would zero them."""
    monkeypatch.setenv(cpu.ENV_BLOCK, "16")
    T = 64
    vis = torch.ones(T, T, dtype=torch.bool).tril().expand(2, 1, T, T).clone()
    vis[1, :, :, :20] = False  # batch 1: the first 20 keys are padding
    vis[1, :, :20, :] = False  # and its first 20 queries see nothing at all
    mask = torch.zeros(2, 1, T, T).masked_fill(~vis, MIN)
    _check("softmax", mask)
    _check("sigmoid", mask)


def test_tile_classes_of_a_causal_mask():
    T, bq, bk = 64, 16, 16
    skip, free, _ = cpu._mask_tiles(_causal(T, 2), "sigmoid", bq, bk)
    n = T // bq
    assert [[skip(i, j) for j in range(n)] for i in range(n)] == [[j > i for j in range(n)]
                                                                 for i in range(n)]
    assert [[free(i, j) for j in range(n)] for i in range(n)] == [[j < i for j in range(n)]
                                                                 for i in range(n)]
    # a padding mask broadcast over rows: one row of tiles serves every query block
    skip, free, _ = cpu._mask_tiles(_padding(2, T, [64, 20]), "relu", bq, bk)
    assert [skip(5, j) for j in range(4)] == [False, False, False, False]  # batch 0 sees all
    skip, free, _ = cpu._mask_tiles(_padding(2, T, [20, 20]), "relu", bq, bk)
    assert [skip(3, j) for j in range(4)] == [False, False, True, True]
    assert [free(3, j) for j in range(4)] == [True, False, False, False]


def test_float_mask_with_a_bias_is_not_taken_for_pure_visibility(monkeypatch):
    """A tile holding a real bias beside finfo.min entries must still add the bias (ALiBi-like
    slopes on a causal mask), while tiles with only 0 / finfo.min need no addition."""
    monkeypatch.setenv(cpu.ENV_BLOCK, "16")
    T = 64
    bias = torch.zeros(1, 1, T, T)
    bias[..., 40:, 10:20] = -0.7  # a biased block in tile rows 2-3, tile column 0-1
    mask = bias.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), MIN)
    _, _, pure = cpu._mask_tiles(mask, "sigmoid", 16, 16)
    assert not pure(3, 0) and pure(1, 1) and pure(3, 3)
    _check("sigmoid", mask)
    _check("relu", mask)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "relu"])
def test_lengths_that_are_not_a_multiple_of_the_tile(monkeypatch, kind):
    """Tail tiles (T = 71 on 16-wide tiles) are classified over their real extent only."""
    monkeypatch.setenv(cpu.ENV_BLOCK, "16,32")
    T, B = 71, 2
    c = _causal(T, 1, torch.bool) & _padding(B, T, [71, 50], torch.bool)
    _check(kind, c)
    _check(kind, torch.zeros(B, 1, T, T).masked_fill(~c, MIN))
    _check(kind, _padding(B, T, [71, 33], torch.float32))


def test_inference_mode_masks_are_classified_without_a_version_counter():
    """Inference tensors have no version counter; the tile cache must not need one."""
    import attnswap

    q = torch.randn(1, 2, 70, 16)
    mask = torch.ones(70, 70, dtype=torch.bool).tril()
    ref = attnswap.attention(q, q, q, mask, kind="sigmoid", scale=0.25, impl="reference")
    with torch.inference_mode():
        m = torch.ones(70, 70, dtype=torch.bool).tril()
        out = attnswap.attention(q, q, q, m, kind="sigmoid", scale=0.25, impl="cpu")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
