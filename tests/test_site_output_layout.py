"""A rewritten site returns its output in the memory layout the original site's output had.

PyTorch's CPU SDPA returns ``[B, H, T, D]`` outputs laid out ``[B, T, H, D]`` in memory when q is
the usual projection view (``proj(x).view(B, T, H, D).transpose(1, 2)``). The model's code after
the site was written against those strides: ``out.transpose(1, 2).view(B, T, C)`` works on them
and fails on a contiguous tensor, and the common ``.reshape`` is a free view on them and a copy
on a contiguous one. Sites written as matmuls return contiguous outputs, as their matmul did.
Checked for every kind, against the original model (softmax) or the plain-math reference.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnswap
from attnswap.kernels import cpu_fused
from attnswap.kernels.reference import attention_reference
from attnswap.runtime.site_call import attention_site
from tolerances import assert_close

B, T, H, D = 2, 24, 4, 8
C = H * D


class ViewAfterSdpa(nn.Module):
    """SDPA on projection views, then ``transpose(1, 2).view``: legal only on SDPA's strides."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)
        self.proj = nn.Linear(C, C)

    def forward(self, x):
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).view(B, T, C))


class MatmulSite(nn.Module):
    """The eager form; its output is contiguous, and ``view`` after the head merge needs that."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)

    def forward(self, x):
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
        out = torch.softmax(q @ k.transpose(-2, -1) * D ** -0.5, dim=-1) @ v
        return out.view(B, H * T, D)  # only a contiguous [B, H, T, D] allows this view


def _site_layouts(converted):
    """The ``out_layout`` of every rewritten site in the converted model's compiled graphs."""
    layouts = []

    def spy(*args, **kwargs):
        layouts.append(kwargs.get("out_layout"))
        return attention_site(*args, **kwargs)

    return layouts, spy


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "relu", "sas"])
def test_a_view_that_relies_on_sdpa_strides_still_works(kind):
    torch.manual_seed(0)
    model = ViewAfterSdpa()
    x = torch.randn(B, T, C)
    with warnings.catch_warnings():
        warnings.simplefilter("error", attnswap.AttentionSwapWarning)
        converted = attnswap.convert(model, kind, (x,))
    assert len(converted.attnswap_report.sites) == 1
    y = converted(x)  # a contiguous site output would fail here ("view size is not compatible")
    y.square().mean().backward()
    if kind in ("softmax", "sas"):  # softmax and identity-initialised SAS: the original model
        assert_close(y, model(x), dtype=torch.float32)
    else:
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in model.qkv(x).split(C, dim=-1))
        ref = attention_reference(q, k, v, None, kind=kind)
        assert_close(y, model.proj(ref.transpose(1, 2).reshape(B, T, C)), dtype=torch.float32)
    assert all(p.grad is not None for p in converted.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", ["sigmoid", "relu"])
def test_the_fused_kernel_writes_the_sdpa_layout_itself(kind, monkeypatch):
    """No copy on the fused path: the kernel's own output reaches the model's head merge."""
    monkeypatch.delenv(cpu_fused.ENV_FUSED, raising=False)
    torch.manual_seed(0)
    model = ViewAfterSdpa()
    x = torch.randn(B, T, C)
    converted = attnswap.convert(model, kind, (x,), impl="cpu")
    seen = []
    real = cpu_fused.forward

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out.stride())
        return out

    monkeypatch.setattr(cpu_fused, "forward", spy)
    converted(x)
    assert seen == [(T * H * D, D, H * D, 1)], seen


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "relu", "sas"])
def test_matmul_sites_keep_contiguous_outputs(kind):
    torch.manual_seed(0)
    model = MatmulSite()
    x = torch.randn(B, T, C)
    converted = attnswap.convert(model, kind, (x,))
    assert len(converted.attnswap_report.sites) == 1
    y = converted(x)
    assert y.shape == (B, H * T, D)
    if kind in ("softmax", "sas"):
        assert_close(y, model(x), dtype=torch.float32)


def test_only_sdpa_sites_on_projection_views_ask_for_the_layout():
    from attnswap.passes.canonicalize import _bthd_output
    from attnswap.passes.detect import Site

    class Node:
        def __init__(self, val):
            self.meta = {"example_value": val}

    def site(val):
        return Site(pattern="scaled_dot_product_attention", anchor=None, output=Node(val))

    assert _bthd_output(site(torch.empty(B, T, H, D).transpose(1, 2)))
    assert not _bthd_output(site(torch.empty(B, H, T, D)))
    assert not _bthd_output(site(torch.empty(B, T, 1, D).transpose(1, 2)))  # one head: ambiguous
    assert not _bthd_output(site(torch.empty(B * H, T, D)))


@pytest.mark.parametrize("kind", ["sigmoid", "sas"])
def test_traced_sites_keep_the_layout_too(kind):
    """Under an AOT inner compiler the site is traced as the ``attnswap::attention`` op: the
    layout is a copy in the graph, so the model's stride-bound ``view`` after it still traces."""
    from attnswap.kernels import op

    torch.manual_seed(0)
    model = ViewAfterSdpa()
    x = torch.randn(B, T, C)
    converted = attnswap.convert(model, kind, (x,), inner="aot_eager")
    before = op.total_calls()
    y = converted(x)
    assert op.total_calls() > before
    y.square().mean().backward()
    if kind == "sas":
        assert_close(y, model(x), dtype=torch.float32)
    else:
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in model.qkv(x).split(C, dim=-1))
        ref = attention_reference(q, k, v, None, kind=kind)
        assert_close(y, model.proj(ref.transpose(1, 2).reshape(B, T, C)), dtype=torch.float32)
