"""Tensor scales of the scores: a factor constant along the key axis moves onto q, one constant
along the query axis onto k (``(f·Q)Kᵀ = f·QKᵀ``), exactly, in outputs and in the gradients of
the factor itself; the op's ``scale`` stays a float. A factor that varies along both axes, or
one applied after a mask, is left alone with the reason.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import attnswap

ATOL, RTOL = 1e-5, 1e-4  # fp32
SCALAR_GRAD_RTOL = 1e-3  # a 0-d factor's gradient sums every score


class Scaled(nn.Module):
    """``softmax((q @ kᵀ) * t) @ v`` with ``t`` a parameter of ``shape`` (sliced to the lengths),
    a 0-d buffer, or a 0-d tensor argument."""

    def __init__(self, shape=None, source="param", after_mask=False):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.source, self.after_mask = source, after_mask
        if source == "param":
            self.t = nn.Parameter(torch.rand(*shape) + 0.5)
        elif source == "buffer":
            self.register_buffer("t", torch.tensor(0.35))

    def forward(self, x, t=None):
        B, T, _ = x.shape
        q, k, v = (z.view(B, T, 2, 8).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=-1))
        f = t if self.source == "input" else self.t
        if f.dim() >= 1:
            f = f[..., :T] if f.dim() == 1 or f.shape[-2] == 1 else f[..., :T, :T]
        s = q @ k.transpose(-2, -1)
        if self.after_mask:
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).tril().logical_not(), -1e9)
        s = s * f
        return s.softmax(dim=-1) @ v


def _x(seed):
    return torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(seed))


CONVERTED = {
    "per-head (1, H, 1, 1)": dict(shape=(1, 2, 1, 1)),
    "per-query (H, T, 1)": dict(shape=(2, 8, 1)),
    "per-key (T,) -> onto k": dict(shape=(8,)),
    "per-head-and-key (1, H, 1, T) -> onto k": dict(shape=(1, 2, 1, 8)),
    "0-d buffer": dict(source="buffer"),
}


def _grads(model, extra=()):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    out.update({f"arg{i}": t.grad.clone() for i, t in enumerate(extra) if t.grad is not None})
    return out


@pytest.mark.parametrize("name", list(CONVERTED))
def test_tensor_factor_folds_exactly(name):
    torch.manual_seed(0)
    model = Scaled(**CONVERTED[name])
    converted = attnswap.convert(model, "softmax", (_x(0),))
    (site,) = converted.attnswap_report.sites
    results = []
    for m in (model, converted):
        m.zero_grad(set_to_none=True)
        out = m(_x(1))
        out.square().mean().backward()
        results.append((out.detach(), _grads(m)))
    (ref, gref), (got, ggot) = results
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)
    assert ggot.keys() == gref.keys()
    for k in gref:
        rtol = SCALAR_GRAD_RTOL if gref[k].dim() == 0 else RTOL
        torch.testing.assert_close(ggot[k], gref[k], atol=ATOL, rtol=rtol, msg=lambda m: f"{k}: {m}")


def test_zero_d_tensor_argument_scale():
    torch.manual_seed(0)
    model = Scaled(source="input")
    t0, t1 = torch.tensor(0.4), torch.tensor(0.25, requires_grad=True)
    converted = attnswap.convert(model, "softmax", (_x(0), t0))
    assert len(converted.attnswap_report.sites) == 1
    ref = model(_x(1), t1)
    ref.square().mean().backward()
    g_ref, t1.grad = t1.grad.clone(), None
    out = converted(_x(1), t1)
    out.square().mean().backward()
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(t1.grad, g_ref, atol=ATOL, rtol=SCALAR_GRAD_RTOL)


@pytest.mark.parametrize("kwargs,reason", [
    (dict(shape=(8, 8)), "query axis"),
    (dict(shape=(1, 2, 1, 1), after_mask=True), "after a mask"),
])
def test_tensor_factor_left_alone(kwargs, reason):
    torch.manual_seed(0)
    model = Scaled(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = attnswap.convert(model, "sigmoid", (_x(0),))
    report = converted.attnswap_report
    assert not report.sites and any(reason in s.reason for s in report.skipped), str(report)
    with torch.no_grad():
        assert torch.equal(converted(_x(1)), model(_x(1)))
