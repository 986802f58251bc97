"""Causal structure built inside the graph is recognized as ``is_causal`` (and only then).

Spellings from real code: GPT-2's sliced ``tril`` bool buffer with ``torch.where(.., -inf)``,
an ``arange`` comparison with ``masked_fill``, an additive ``full(-inf).triu(1)``; a finite
``finfo.min`` causal fill is causal only when it is the site's only mask (next to a padding mask
it is not the hard triangle for rows whose causal keys are all padded). Every case keeps the
identity oracle; the converted op really receives ``is_causal=True``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnswap
from attnswap.runtime import site_call

ATOL, RTOL = 1e-5, 1e-4  # fp32
D = 16


class Causal(nn.Module):
    def __init__(self, style):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.style = style
        tri = torch.tril(torch.ones(32, 32, dtype=torch.bool)).view(1, 1, 32, 32)
        self.register_buffer("bias", tri, persistent=False)

    def forward(self, x, pad=None):
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, 2, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        a = q @ k.transpose(-2, -1) * 0.3
        if self.style == "tril_buffer":
            a = torch.where(self.bias[:, :, :T, :T], a, torch.tensor(float("-inf")))
        elif self.style == "tril_buffer_finfo_min":
            a = torch.where(self.bias[:, :, :T, :T], a, torch.finfo(a.dtype).min)
        elif self.style == "arange":
            i = torch.arange(T)
            a = a.masked_fill(~(i[:, None] >= i[None, :]), float("-inf"))
        elif self.style == "triu_additive":
            a = a + torch.full((T, T), float("-inf")).triu(1)
        elif self.style == "band":  # not causal: one key ahead is visible
            i = torch.arange(T)
            a = a.masked_fill(~(i[:, None] + 1 >= i[None, :]), float("-inf"))
        if pad is not None:
            a = a + pad
        return a.softmax(dim=-1) @ v


def _inputs(seed, padded):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, D, generator=g)
    if not padded:
        return (x,)
    pad = torch.zeros(2, 1, 1, 6)
    pad[1, ..., :2] = torch.finfo(torch.float32).min  # left padding: early rows see only pads
    return x, pad


CASES = [  # style, with a padding mask, expected causal
    ("tril_buffer", False, True), ("tril_buffer", True, True),
    ("arange", False, True), ("arange", True, True),
    ("triu_additive", False, True), ("triu_additive", True, True),
    ("tril_buffer_finfo_min", False, True), ("tril_buffer_finfo_min", True, False),
    ("band", False, False),
]


@pytest.mark.parametrize("style,padded,causal", CASES)
def test_in_graph_causal_mask(style, padded, causal, monkeypatch):
    torch.manual_seed(0)
    model = Causal(style)
    converted = attnswap.convert(model, "softmax", _inputs(0, padded))
    (site,) = converted.attnswap_report.sites
    assert site.causal is causal
    seen = []
    real = site_call.attention

    def spy(*a, **kw):
        seen.append(kw["is_causal"])
        return real(*a, **kw)

    monkeypatch.setattr(site_call, "attention", spy)
    x = _inputs(1, padded)
    ref = model(*x)
    out = converted(*x)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    assert seen == [causal]


transformers = pytest.importorskip("transformers")


def _llama(attn):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


def _ids(seed, padded):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (2, 9), generator=g)
    kwargs = {"input_ids": ids}
    if padded:
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # left padding
        kwargs["attention_mask"] = mask
    return kwargs


@pytest.mark.parametrize("attn,padded,causal", [
    ("sdpa", False, True),  # HF passes is_causal=True itself
    ("sdpa", True, True),  # bool and_masks(causal, padding) built in the graph: split
    ("eager", False, True),  # additive finfo.min triangle, the only mask
    ("eager", True, False),  # one finite mask holding causal and padding: stays a mask
])
def test_hf_llama_mask_builder_in_graph(attn, padded, causal, monkeypatch):
    """A whole-model capture (the ``torch.compile(backend="attnswap")`` entry point) sees HF's
    mask builders: what the op receives as ``is_causal``. (``convert()`` compiles each attention
    region on its own; there the mask is an input of the region, opaque: the op gets no
    is_causal from it, and the report's causal column says "mask" -- tests/test_report_causal.py.)"""
    model = _llama(attn)
    seen = []
    real = site_call.attention

    def spy(*a, **kw):
        seen.append(kw["is_causal"])
        return real(*a, **kw)

    monkeypatch.setattr(site_call, "attention", spy)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="attnswap", options={"attention": "softmax"})
    x = _ids(1, padded)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**x).logits, model(**x).logits, atol=ATOL, rtol=RTOL)
    assert seen == [causal, causal]
