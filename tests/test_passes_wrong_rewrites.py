"""The forms that used to be rewritten wrongly (the identity conversion changed the outputs) or
crashed the conversion, each checked against the original model or a plain-torch reference.

* ``masked_fill(~keep, finfo.min)`` with a query row that sees no key: softmax gives that row
  uniform weights (the mean of V); the converted softmax must too. For sigmoid and ReLU a fill
  of at most half the dtype's lowest value means *masked* (weight exactly 0), so such a row is 0.
* a float mask added *before* the 1/√d scale: its masked entries are decided on the mask's own
  values, before the rescaling.
* an in-place op next to a site (``acc = out.clone(); alias = acc; alias += 1``) stays.
* keys or values computed from parameters alone (``F.normalize(param)``, a weight-normed matrix)
  are a lookup into learned memory: left alone with a reason, never a crash.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnswap

ATOL, RTOL = 1e-5, 1e-4  # fp32
D = 16


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, args):
    model.zero_grad(set_to_none=True)
    out = model(*args)
    out.square().mean().backward()
    return out.detach(), _grads(model)


def assert_identity(model, example, check):
    """convert(model, "softmax") equals ``model`` on ``check`` in outputs and parameter grads."""
    converted = attnswap.convert(model, "softmax", example)
    assert len(converted.attnswap_report.sites) >= 1, str(converted.attnswap_report)
    ref_out, ref_grads = _run(model, check)
    out, grads = _run(converted, check)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=RTOL)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=ATOL, rtol=RTOL,
                                   msg=lambda m: f"{name}: {m}")
    return converted


def _heads(x, h=2):
    b, t, _ = x.shape
    return x.view(b, t, h, -1).transpose(1, 2)


class FillAttention(nn.Module):
    """``masked_fill(~keep, finfo.min)`` after the scale, as DeBERTa-v2 and MPT write it."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)

    def forward(self, x, keep):
        q, k, v = (_heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        return scores.softmax(dim=-1) @ v


def _keep(b=2, t=6):
    keep = torch.ones(b, 1, t, t, dtype=torch.bool)
    keep[1, :, 2] = False  # query row 2 of batch 1 sees no key
    keep[0, :, :, 4] = False  # key 4 hidden from every query of batch 0
    return keep


def _x(seed, b=2, t=6):
    return torch.randn(b, t, D, generator=torch.Generator().manual_seed(seed))


def test_finfo_min_fill_with_a_fully_masked_row_is_exact():
    torch.manual_seed(0)
    model = FillAttention()
    keep = _keep()
    converted = assert_identity(model, (_x(0), keep), (_x(1), keep))
    # the fully masked row really is the mean of V in the original: the case is exercised
    with torch.no_grad():
        q, k, v = (_heads(t) for t in model.qkv(_x(1)).chunk(3, dim=-1))
        torch.testing.assert_close(converted(_x(1), keep)[1, :, 2], v[1].mean(dim=-2), atol=ATOL,
                                   rtol=RTOL)


@pytest.mark.parametrize("kind,options", [("sigmoid", {}), ("relu", {"activation": "identity"})])
def test_finite_fill_is_masked_for_sigmoid_and_relu(kind, options):
    """For the kinds without a normalisation, a ``finfo.min`` fill hides the key (weight 0), and a
    row that sees no key is 0 (documented in the README)."""
    torch.manual_seed(0)
    model = FillAttention()
    keep = _keep()
    converted = attnswap.convert(model, kind, (_x(0), keep), **options)
    x = _x(1)
    with torch.no_grad():
        q, k, v = (_heads(t) for t in model.qkv(x).chunk(3, dim=-1))
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        tk = s.shape[-1]
        w = torch.sigmoid(s - math.log(tk)) if kind == "sigmoid" else s / tk
        expected = w.masked_fill(~keep, 0.0) @ v
        out = converted(x, keep)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    assert torch.equal(out[1, :, 2], torch.zeros_like(out[1, :, 2]))


class MaskBeforeScale(nn.Module):
    """``softmax((q @ kᵀ + mask) / √d)`` with ``finfo.min`` entries in the float mask."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)

    def forward(self, x, mask):
        q, k, v = (_heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        scores = (q @ k.transpose(-2, -1) + mask) / math.sqrt(q.shape[-1])
        return scores.softmax(dim=-1) @ v


def _additive(keep):
    return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)


def test_float_mask_before_the_scale_softmax_identity():
    torch.manual_seed(0)
    keep = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    keep[0, :, :, 4] = False
    mask = _additive(keep)
    assert_identity(MaskBeforeScale(), (_x(0), mask), (_x(1), mask))


def test_float_mask_before_the_scale_is_masked_for_relu():
    torch.manual_seed(0)
    model = MaskBeforeScale()
    keep = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    keep[0, :, :, 4] = False
    mask = _additive(keep)
    converted = attnswap.convert(model, "relu", (_x(0), mask), activation="identity")
    x = _x(1)
    with torch.no_grad():
        q, k, v = (_heads(t) for t in model.qkv(x).chunk(3, dim=-1))
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        expected = (s / s.shape[-1]).masked_fill(~keep, 0.0) @ v
        out = converted(x, mask)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)


class InplaceAfterSite(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)

    def forward(self, x):
        q, k, v = (_heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        out = F.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1) @ v
        acc = out.clone()
        alias = acc
        alias += 1  # mutates acc; its own result is unused
        return acc


def test_inplace_op_next_to_a_site_is_kept():
    torch.manual_seed(0)
    assert_identity(InplaceAfterSite(), (_x(0),), (_x(1),))


class NormalizedCentroids(nn.Module):
    """Soft assignment to learned centroids: keys and values are ``F.normalize(param)``."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(D, D)
        self.centroids = nn.Parameter(torch.randn(5, D))

    def forward(self, x):
        c = F.normalize(self.centroids, dim=-1)
        return F.softmax(self.q(x) @ c.T, dim=-1) @ c


class WeightNormKeys(nn.Module):
    """``softmax(x @ f(W).T) @ v(x)``: a 2-d key computed from a parameter (weight norm)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, D))
        self.v = nn.Linear(D, D)

    def forward(self, x):
        k = self.w / self.w.norm(dim=-1, keepdim=True)
        return F.softmax(x @ k.T, dim=-1) @ self.v(x)[:, :6]


@pytest.mark.parametrize("build", [NormalizedCentroids, WeightNormKeys])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "relu"])
def test_parameter_keys_are_left_alone_with_a_reason(build, kind):
    torch.manual_seed(0)
    model = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = attnswap.convert(model, kind, (_x(0),))
    report = converted.attnswap_report
    assert len(report.sites) == 0, str(report)
    assert any("parameters alone" in s.reason and "key" in s.reason for s in report.skipped), \
        str(report)
    with torch.no_grad():
        assert torch.equal(converted(_x(1)), model(_x(1)))


class LearnedQueries(nn.Module):
    """The other half of the rule: queries from parameters alone are attention."""

    def __init__(self):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(2, 3, D // 2))
        self.kv = nn.Linear(D, 2 * D)

    def forward(self, x):
        k, v = (_heads(t) for t in self.kv(x).chunk(2, dim=-1))
        return F.softmax(self.latents @ k.transpose(-2, -1) * 0.3, dim=-1) @ v


def test_learned_queries_are_attention():
    torch.manual_seed(0)
    assert_identity(LearnedQueries(), (_x(0),), (_x(1),))
