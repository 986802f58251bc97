"""SAS's fast head expansion and its per-head masks.

* The banded-matmul head expansion (head dims <= BAND_MAX_D) computes exactly what the paper's
  ``Conv1d`` over B·T ``[H, D]`` images computes (``HeadExpansion.conv_forward``), outputs and the
  gradients of the input and of the conv parameters, at random init.
* Identity init still reproduces softmax attention exactly (the identity oracle), with a rank-3
  per-head bias mask ``[H, Tq, Tk]`` as timm's LeViT / MaxViT / EfficientFormerV2 pass it; that
  call used to fail with "attn_mask of shape (4, 16, 16) does not broadcast".
"""

from __future__ import annotations

import pytest
import torch

from attnswap.kernels.reference import attention_reference
from attnswap.runtime import sas as sas_mod
from attnswap.runtime.sas import SAS, HeadExpansion


@pytest.mark.parametrize("H,D,ratio,ks", [(4, 12, 2, 3), (3, 8, 3, 5), (2, 32, 2, 3)])
def test_banded_head_expansion_equals_conv1d(H, D, ratio, ks):
    torch.manual_seed(0)
    he = HeadExpansion(H, ratio, ks, init="random")
    x = torch.randn(2, 7, H, D).transpose(1, 2)  # the [B, T, H, D] projection layout
    assert D <= sas_mod.BAND_MAX_D
    go = torch.randn(2, ratio * H, 7, D)
    res = []
    for fn in (he.forward, he.conv_forward):
        xx = x.detach().clone().requires_grad_(True)
        out = fn(xx)
        grads = torch.autograd.grad(out, [xx, *he.parameters()], go)
        res.append([out, *grads])
    for a, e in zip(*res):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_conv_path_is_kept_for_large_heads():
    torch.manual_seed(0)
    he = HeadExpansion(2, 2, 3, init="random")
    x = torch.randn(1, 2, 5, sas_mod.BAND_MAX_D + 8)
    torch.testing.assert_close(he(x), he.conv_forward(x))


@pytest.mark.parametrize("D", [12, 40], ids=["banded", "conv"])
def test_identity_init_with_a_rank3_per_head_bias_mask(D):
    torch.manual_seed(0)
    B, H, T = 2, 4, 16
    q, k, v = (torch.randn(B, T, H, D).transpose(1, 2) for _ in range(3))
    bias = torch.randn(H, T, T)  # per-head attention bias, rank 3
    mod = SAS(H, H, D)
    scale = D ** -0.5
    out = mod(q, k, v, bias, scale=scale, is_causal=False, dropout_p=0.0,
              options={"impl": "reference"})
    ref = attention_reference(q, k, v, bias, kind="softmax", scale=scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # a [B, H, T, T] mask and a rank-2 one take the same path
    full = bias.expand(B, H, T, T)
    out4 = mod(q, k, v, full, scale=scale, is_causal=True, dropout_p=0.0,
               options={"impl": "cpu"})
    torch.testing.assert_close(out4, attention_reference(q, k, v, full, kind="softmax",
                                                         scale=scale, is_causal=True),
                               atol=1e-5, rtol=1e-5)
