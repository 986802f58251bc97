"""SAS's fast paths and its per-head masks.

* The banded-matmul head expansion (head dims <= BAND_MAX_D) computes exactly what the paper's
  ``Conv1d`` over B·T ``[H, D]`` images computes (``HeadExpansion.conv_forward``), outputs and the
  gradients of the input and of the conv parameters, at random init.
* The whole SAS call (q / k / v expansions batched token-major, V zero-padded so PyTorch's fused
  CPU kernel runs, the group mean over the padded width) equals the paper's formulation written
  out plainly, outputs and the gradients of q, k, v and every parameter: banded and Conv1d head
  dims, GQA / MQA, cross-attention, r = 3, masks of rank 2 / 3 / 4, causal, every impl; and it
  traces under dynamo (eager and aot_eager, fullgraph).
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


# fp32 sums the conv weights' gradients (2·7·D terms each) in another order than Conv1d does:
# at D = 32 one element lands 1.3e-5 off (relative 7e-5). fp64 checks the math itself.
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 3e-5), (torch.float64, 1e-10)],
                         ids=["fp32", "fp64"])
@pytest.mark.parametrize("H,D,ratio,ks", [(4, 12, 2, 3), (3, 8, 3, 5), (2, 32, 2, 3)])
def test_banded_head_expansion_equals_conv1d(H, D, ratio, ks, dtype, atol):
    torch.manual_seed(0)
    he = HeadExpansion(H, ratio, ks, init="random").to(dtype)
    x = torch.randn(2, 7, H, D, dtype=dtype).transpose(1, 2)  # the [B, T, H, D] layout
    assert D <= sas_mod.BAND_MAX_D
    go = torch.randn(2, ratio * H, 7, D, dtype=dtype)
    res = []
    for fn in (he.forward, he.conv_forward):
        xx = x.detach().clone().requires_grad_(True)
        out = fn(xx)
        grads = torch.autograd.grad(out, [xx, *he.parameters()], go)
        res.append([out, *grads])
    for a, e in zip(*res):
        torch.testing.assert_close(a, e, atol=atol, rtol=1e-5 if dtype == torch.float32 else 1e-10)


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


# ------------------------------------------------------------------------------------------
# The whole SAS call (batched token-major expansions, V zero-padded for the fused kernel,
# group mean over the padded width) against the paper's formulation written out plainly:
# Conv1d over B·T [H, D] images, nn.Linear dim expansions, reference softmax on the r·H heads
# with the per-head mask repeated, mean over the r groups.

def paper_sas(mod: SAS, q, k, v, mask, scale, is_causal):
    B, H, T, D = q.shape
    if k.shape[1] != mod.kv_heads and k.shape[1] == H:
        g = H // mod.kv_heads
        k, v = k[:, ::g], v[:, ::g]
    q2 = mod.q_dim(mod.q_heads.conv_forward(q))
    k2 = mod.k_dim(mod.k_heads.conv_forward(k))
    v2 = mod.v_heads.conv_forward(v)
    r = mod.ratio
    if mask is not None:
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        if mask.shape[1] == H and H > 1:
            mask = torch.cat([mask] * r, dim=1)
    out = attention_reference(q2, k2, v2, mask, kind="softmax",
                              scale=scale * (D / mod.dim) ** 0.5, is_causal=is_causal)
    return out.view(B, r, H, T, D).mean(1)


def _mask(kind, B, H, T, Tk, g):
    if kind is None:
        return None
    if kind == "bool2":
        m = torch.rand(T, Tk, generator=g) > 0.3
        m[:, 0] = True  # no fully masked row
        return m
    if kind == "float2":
        return torch.randn(T, Tk, generator=g)
    if kind == "float3_per_head":
        return torch.randn(H, T, Tk, generator=g)
    if kind == "float4":
        return torch.randn(B, 1, T, Tk, generator=g)
    if kind == "float4_per_head":
        return torch.randn(B, H, T, Tk, generator=g)
    if kind == "bool4":
        m = torch.rand(B, 1, T, Tk, generator=g) > 0.3
        m[..., 0] = True
        return m
    raise AssertionError(kind)


CASES = [
    # B, H, Hkv, T, Tk, D, ratio, kernel, mask, causal, impl
    (2, 4, 4, 16, 16, 12, 2, 3, None, True, "auto"),          # the text task's site (banded)
    (3, 4, 4, 16, 16, 12, 2, 3, None, False, "auto"),         # the digits task's site
    (2, 4, 4, 9, 9, 12, 2, 3, "float4", False, "auto"),
    (2, 4, 2, 8, 8, 8, 2, 3, "bool2", False, "auto"),         # GQA
    (2, 4, 1, 8, 8, 16, 2, 3, "float3_per_head", False, "auto"),  # MQA, rank-3 per-head bias
    (2, 3, 3, 6, 10, 8, 3, 5, "float4_per_head", False, "auto"),  # cross-attention, r = 3, k = 5
    (1, 2, 2, 7, 7, 40, 2, 3, "float2", True, "auto"),        # D > BAND_MAX_D: Conv1d path
    (2, 4, 2, 5, 5, 48, 2, 3, "bool4", False, "auto"),        # Conv1d path with GQA
    (2, 4, 4, 8, 8, 12, 2, 3, "float4", True, "cpu"),         # attnswap's CPU kernel, unpadded V
    (2, 4, 2, 8, 8, 12, 2, 3, "float3_per_head", False, "reference"),
    (2, 4, 4, 8, 8, 12, 2, 3, None, True, "sdpa"),
]


@pytest.mark.parametrize("B,H,Hkv,T,Tk,D,ratio,ks,mask_kind,causal,impl", CASES)
def test_sas_equals_the_papers_formulation(B, H, Hkv, T, Tk, D, ratio, ks, mask_kind, causal,
                                           impl):
    torch.manual_seed(0)
    mod = SAS(H, Hkv, D, ratio=ratio, kernel_size=ks, init="random")
    g = torch.Generator().manual_seed(1)
    # q, k, v in the [B, T, H, D] projection layout, as sites hand them over
    q = torch.randn(B, T, H, D, generator=g).transpose(1, 2)
    k = torch.randn(B, Tk, Hkv, D, generator=g).transpose(1, 2)
    v = torch.randn(B, Tk, Hkv, D, generator=g).transpose(1, 2)
    mask = _mask(mask_kind, B, H, T, Tk, g)
    go = torch.randn(B, H, T, D, generator=g)
    scale = D ** -0.5
    res = []
    for fn in ("fast", "paper"):
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        if fn == "fast":
            out = mod(qq, kk, vv, mask, scale=scale, is_causal=causal, dropout_p=0.0,
                      options={"impl": impl})
        else:
            out = paper_sas(mod, qq, kk, vv, mask, scale, causal)
        grads = torch.autograd.grad(out, [qq, kk, vv, *mod.parameters()], go)
        res.append([out, *grads])
    names = ["out", "dq", "dk", "dv"] + [n for n, _ in mod.named_parameters()]
    for name, a, e in zip(names, *res):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_sas_with_repeated_kv_handed_over():
    """A capture that did not fold repeat_kv passes K/V with H heads to a GQA SAS."""
    torch.manual_seed(0)
    B, H, Hkv, T, D = 2, 4, 2, 8, 12
    mod = SAS(H, Hkv, D, init="random")
    q = torch.randn(B, H, T, D)
    k, v = (torch.randn(B, Hkv, T, D).repeat_interleave(H // Hkv, dim=1) for _ in range(2))
    out = mod(q, k, v, None, scale=D ** -0.5, is_causal=True, dropout_p=0.0, options={})
    torch.testing.assert_close(out, paper_sas(mod, q, k, v, None, D ** -0.5, True),
                               atol=1e-5, rtol=1e-5)


def test_banded_stack_equals_each_conv():
    torch.manual_seed(0)
    convs = [torch.nn.Conv1d(4, 8, 3, padding=1) for _ in range(3)]
    w, b = sas_mod._banded_stack(convs, 12)
    x = torch.randn(5, 4, 12)
    for i, c in enumerate(convs):
        torch.testing.assert_close((x.reshape(5, 48) @ w[i] + b[i]).view(5, 8, 12), c(x),
                                   atol=1e-6, rtol=1e-6)


def test_identity_init_reproduces_softmax_on_the_padded_fused_path():
    torch.manual_seed(0)
    B, H, T, D = 2, 4, 16, 12
    q, k, v = (torch.randn(B, T, H, D).transpose(1, 2) for _ in range(3))
    mod = SAS(H, H, D)
    out = mod(q, k, v, None, scale=D ** -0.5, is_causal=True, dropout_p=0.0,
              options={"impl": "auto"})
    ref = attention_reference(q, k, v, None, kind="softmax", scale=D ** -0.5, is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_sas_traces_under_dynamo(backend):
    """SAS runs inside compiled region graphs: every tensor it builds must be traced (fake
    tensors refuse constants from outside the graph), forward and backward."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    B, H, T, D = 2, 4, 8, 12
    mod = SAS(H, 2, D, init="random")
    q = torch.randn(B, T, H, D).transpose(1, 2)
    k, v = (torch.randn(B, T, 2, D).transpose(1, 2) for _ in range(2))
    mask = torch.randn(B, 1, T, T)

    def fn(q, k, v, mask):
        return mod(q, k, v, mask, scale=D ** -0.5, is_causal=False, dropout_p=0.0, options={})

    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    res = []
    for f in (fn, compiled):
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out = f(qq, kk, vv, mask)
        res.append([out, *torch.autograd.grad(out.square().sum(), [qq, kk, vv,
                                                                    *mod.parameters()])])
    for a, e in zip(*res):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("Hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_value_heads_narrower_than_query_heads(Hkv, impl):
    """DeepSeek-V2/V3's multi-head latent attention: q/k head dim 24, v head dim 8 (this used to
    crash in the batched head expansion). Identity init reproduces softmax, and every SAS
    parameter gets a gradient."""
    torch.manual_seed(0)
    B, H, T, D, Dv = 2, 4, 16, 24, 8
    q = torch.randn(B, T, H, D).transpose(1, 2)
    k = torch.randn(B, T, Hkv, D).transpose(1, 2)
    v = torch.randn(B, T, Hkv, Dv).transpose(1, 2)
    mod = SAS(H, Hkv, D)
    out = mod(q, k, v, None, scale=D ** -0.5, is_causal=True, dropout_p=0.0,
              options={"impl": impl})
    assert out.shape == (B, H, T, Dv)
    ref = attention_reference(q, k, v, None, kind="softmax", scale=D ** -0.5, is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    assert all(p.grad is not None for p in mod.parameters())
