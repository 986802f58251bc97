"""Attention written with einsums in other layouts and with subtracted masks.

XLNet and Funnel (HF) write the scores as ``einsum("ibnd,jbnd->bnij")`` and the values as
``einsum("bnij,jbnd->ibnd")`` and mask with ``scores - 1e30 * mask``; research code writes
``einsum("bihd,bjhd->bhij")`` on ``[B, T, H, D]`` projections. ``passes/einsum_lowering.py``
spells those einsums as permute · matmul · permute, the detector reads ``a - b`` as an additive
mask of coefficient -1. Identity oracle in outputs and gradients (fp32: 1e-5), sigmoid against
the plain reference, and an einsum whose site is rejected goes back into the graph as it was.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import attnswap
from attnswap.kernels import op
from attnswap.kernels.reference import attention_reference
from attnswap.passes.einsum_lowering import contraction_orders, lower_einsums, restore

TOL = dict(atol=1e-5, rtol=1e-4)  # fp32


class BTHDEinsum(nn.Module):
    """Projections kept as [B, T, H, D]; heads never moved by a transpose."""

    def __init__(self, dim=32, heads=4, subtract_mask=False):
        super().__init__()
        self.heads, self.hd, self.subtract_mask = heads, dim // heads, subtract_mask
        self.qkv = nn.Linear(dim, 3 * dim)

    def parts(self, x):
        b, t, _ = x.shape
        return self.qkv(x).view(b, t, 3, self.heads, self.hd).unbind(2)

    def forward(self, x, keep=None):
        q, k, v = self.parts(x)
        s = torch.einsum("bihd,bjhd->bhij", q, k) * self.hd ** -0.5
        if keep is not None:  # the TF-era spelling: subtract a large number where masked
            s = s - 10000.0 * (1.0 - keep[:, None, None, :].to(s.dtype))
        w = s.softmax(-1)
        return torch.einsum("bhij,bjhd->bihd", w, v).flatten(2)


def _run(model, *args):
    model.zero_grad(set_to_none=True)
    out = model(*args)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None}


def _assert_identity(model, example, check):
    with warnings.catch_warnings():
        warnings.simplefilter("error", attnswap.AttentionSwapWarning)
        conv = attnswap.convert(model, "softmax", example)
    assert conv.attnswap_report.sites, str(conv.attnswap_report)
    ref, ref_g = _run(model, *check)
    out, g = _run(conv, *check)
    torch.testing.assert_close(out, ref, **TOL)
    assert g.keys() == ref_g.keys()
    for n in ref_g:
        torch.testing.assert_close(g[n], ref_g[n], **TOL)
    return conv


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "subtracted_mask"])
def test_bthd_einsum_identity_and_sigmoid_against_reference(masked):
    torch.manual_seed(0)
    model = BTHDEinsum(subtract_mask=masked)
    x = torch.randn(2, 6, 32)
    keep = torch.ones(2, 6)
    keep[1, 4:] = 0
    args = (x, keep) if masked else (x,)
    _assert_identity(model, args, args)
    conv = attnswap.convert(model, "sigmoid", args)
    op.reset_call_counts()
    with torch.no_grad():
        out = conv(*args)
        assert op.total_calls("sigmoid") == 1
        q, k, v = (t.transpose(1, 2) for t in model.parts(x))
        mask = -10000.0 * (1.0 - keep[:, None, None, :]) if masked else None
        ref = attention_reference(q, k, v, mask, kind="sigmoid", scale=8 ** -0.5)
    torch.testing.assert_close(out, ref.transpose(1, 2).flatten(2), **TOL)


def _text(seed, batch=2, seq=8):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 5:] = 0
    return {"input_ids": torch.randint(1, 100, (batch, seq), generator=g), "attention_mask": mask}


@pytest.mark.parametrize("arch", ["xlnet", "funnel"])
def test_hf_relative_einsum_models_identity_and_sigmoid_runs(arch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "xlnet":
        model = transformers.XLNetModel(transformers.XLNetConfig(
            d_model=32, n_head=4, d_inner=64, n_layer=2, vocab_size=100))
        sites = 2
    else:
        model = transformers.FunnelModel(transformers.FunnelConfig(
            d_model=32, n_head=4, d_head=8, d_inner=64, block_sizes=[1, 1], vocab_size=100))
        sites = 4
    model = model.eval()

    class Call(nn.Module):  # the dict-of-inputs call, through a module so _run can take args
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, mask):
            return self.m(input_ids=ids, attention_mask=mask).last_hidden_state

    wrapped = Call(model)
    ex, chk = _text(0), _text(1)
    conv = _assert_identity(wrapped, (ex["input_ids"], ex["attention_mask"]),
                            (chk["input_ids"], chk["attention_mask"]))
    assert len(conv.attnswap_report.sites) == sites
    sig = attnswap.convert(wrapped, "sigmoid", (ex["input_ids"], ex["attention_mask"]))
    op.reset_call_counts()
    with torch.no_grad():
        sig(chk["input_ids"], chk["attention_mask"])
    assert op.total_calls("sigmoid") == sites


@pytest.mark.parametrize("eq,ok", [
    ("ibnd,jbnd->bnij", True), ("bnij,jbnd->ibnd", True), ("bihd,bjhd->bhij", True),
    ("bhid,bhjd->bhij", True), ("bhd,bhjd->bhj", False), ("bij,bjk->bik", True),
    ("bhid,bhjd->bhji", True), ("ii,ij->ij", False), ("bid,bjd->bi", False), ("ab,cd->abcd", False),
])
def test_contraction_orders_accepts_exactly_one_batched_matrix_product(eq, ok):
    orders = contraction_orders(eq)
    assert (orders is not None) == ok
    if ok:  # the permutes reproduce torch.einsum
        a_lab, rest = eq.split(",")
        b_lab, _ = rest.split("->")
        sizes = {c: 2 + n for n, c in enumerate(sorted(set(a_lab + b_lab)))}
        a = torch.randn(*[sizes[c] for c in a_lab], dtype=torch.float64)
        b = torch.randn(*[sizes[c] for c in b_lab], dtype=torch.float64)
        pa, pb, po = orders
        got = torch.matmul(a.permute(*pa), b.permute(*pb)).permute(*po)
        torch.testing.assert_close(got, torch.einsum(eq, a, b))


class TalkingHeadsEinsum(BTHDEinsum):
    """Mixes heads after the softmax: not one attention op, so the site must be left alone."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(4, 4))

    def forward(self, x, keep=None):
        q, k, v = self.parts(x)
        w = torch.einsum("bihd,bjhd->bhij", q, k).softmax(-1)
        w = torch.einsum("bhij,hg->bgij", w, self.mix)
        return torch.einsum("bhij,bjhd->bihd", w, v).flatten(2)


def test_an_einsum_no_site_took_goes_back_into_the_graph():
    model = TalkingHeadsEinsum()
    gm = torch.fx.symbolic_trace(model)
    einsums = [n.args[0] for n in gm.graph.nodes if n.target is torch.einsum]
    lowered = lower_einsums(gm)
    assert len(lowered) == 2  # the scores and the value einsum; the head mix is no matmul
    restore(gm, lowered)
    assert [n.args[0] for n in gm.graph.nodes if n.target is torch.einsum] == einsums
    assert not [n for n in gm.graph.nodes if n.target is torch.matmul or n.target == "permute"]
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(gm(x), model(x), atol=0, rtol=0)


def test_talking_heads_einsum_is_left_alone_with_a_reason():
    torch.manual_seed(0)
    model = TalkingHeadsEinsum()
    x = torch.randn(2, 5, 32)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        conv = attnswap.convert(model, "sigmoid", (x,))
    report = conv.attnswap_report
    assert not report.sites and report.skipped
    with torch.no_grad():
        torch.testing.assert_close(conv(x), model(x), atol=0, rtol=0)
