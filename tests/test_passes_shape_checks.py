"""Shape checks on the scores or probabilities (``if attn_weights.size() != (...): raise``).

HF ProphetNet's attention and the attention of older HF models (BART, Marian, Pegasus,
Speech2Text, ... before transformers 4.48) check the scores' shape before the softmax. Dynamo
resolves such a check into guards while every size is static, but once it traces with symbolic
sizes (a second sequence length, or a recompile) the ``size()`` call is a node of the graph, a
second consumer of the scores. That used to reject the site at run time: it ran as the original
softmax (with a warning) although the report listed it as converted. A size read is re-sourced
from q and k now; these tests count that the op ran at every length and compare the sigmoid
output with the plain-torch math of design §2 (``σ(S + b)``, ``b = −ln Tk``).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import attnswap

ATOL, RTOL = 1e-5, 1e-4  # fp32
E, H = 32, 4


class BartStyleAttention(nn.Module):
    """transformers 4.4x ``BartAttention``: heads flattened into the batch (``bmm``), shape checks
    on the scores, the mask and the output, the mask added through a ``[B, H, T, S]`` view."""

    def __init__(self, check_probs: bool = False):
        super().__init__()
        self.d = E // H
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(E, E) for _ in range(4))
        self.check_probs = check_probs

    def _shape(self, x, t, b):
        return x.view(b, t, H, self.d).transpose(1, 2).contiguous()

    def forward(self, x, key_value_states=None, attention_mask=None):
        b, t, _ = x.size()
        kv = x if key_value_states is None else key_value_states
        q = self.q_proj(x) * self.d ** -0.5
        shape = (b * H, -1, self.d)
        q = self._shape(q, t, b).view(*shape)
        k = self._shape(self.k_proj(kv), -1, b).view(*shape)
        v = self._shape(self.v_proj(kv), -1, b).view(*shape)
        s = k.size(1)
        w = torch.bmm(q, k.transpose(1, 2))
        if w.size() != (b * H, t, s):
            raise ValueError(f"Attention weights should be of size {(b * H, t, s)}")
        if attention_mask is not None:
            if attention_mask.size() != (b, 1, t, s):
                raise ValueError("Attention mask has the wrong size")
            w = w.view(b, H, t, s) + attention_mask
            w = w.view(b * H, t, s)
        w = nn.functional.softmax(w, dim=-1)
        if self.check_probs and (w.size(-1) != s or w.dim() != 3):
            raise ValueError("probabilities of the wrong size")
        out = torch.bmm(w, v)
        if out.size() != (b * H, t, self.d):
            raise ValueError("attn_output has the wrong size")
        out = out.view(b, H, t, self.d).transpose(1, 2).reshape(b, t, E)
        return self.out_proj(out)

    def sigmoid_reference(self, x, key_value_states=None, attention_mask=None):
        """Design §2's sigmoid attention, written plainly (additive mask: 0 or finfo.min)."""
        b, t, _ = x.shape
        kv = x if key_value_states is None else key_value_states
        heads = lambda y: y.view(b, -1, H, self.d).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(kv)), heads(self.v_proj(kv))
        s = q @ k.transpose(-1, -2) / math.sqrt(self.d)
        if attention_mask is None:
            attention_mask = torch.zeros(())
        keep = attention_mask > torch.finfo(torch.float32).min / 2
        p = torch.where(keep, torch.sigmoid(s + attention_mask - math.log(k.shape[2])), 0.0)
        return self.out_proj((p @ v).transpose(1, 2).reshape(b, t, E))


class ProphetNetStyleAttention(nn.Module):
    """HF ``ProphetNetAttention`` (transformers 5.x): ``einsum`` scores with a ``size()`` check."""

    def __init__(self):
        super().__init__()
        self.d = E // H
        self.query_proj, self.key_proj, self.value_proj, self.out_proj = (
            nn.Linear(E, E) for _ in range(4))

    def forward(self, x, key_value_states=None, attention_mask=None):
        b, t, e = x.size()
        assert list(x.size()) == [b, t, e]
        kv = x if key_value_states is None else key_value_states
        heads = lambda y: y.view(b, -1, H, self.d).transpose(1, 2)  # noqa: E731
        q = heads(self.query_proj(x) / self.d ** 0.5)
        k, v = heads(self.key_proj(kv)), heads(self.value_proj(kv))
        src_len = k.size(2)
        w = torch.einsum("bsij,bsjk->bsik", q, k.transpose(2, 3))
        expected = (b, H, t, src_len)
        if w.size() != expected:
            raise ValueError(f"Attention weights should have size {expected}")
        if attention_mask is not None:
            w = w + attention_mask
        w = nn.functional.softmax(w, dim=-1)
        out = torch.einsum("bsij,bsjk->bsik", w, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, E))


class EncoderDecoder(nn.Module):
    """One attention class for self- and cross-attention, as BART and ProphetNet have it: the
    class's compiled region sees two geometries (decoder queries are 2 shorter than the keys)."""

    def __init__(self, attention):
        super().__init__()
        self.encoder, self.cross = attention(), attention()

    def forward(self, x, y, attention_mask):
        h = self.encoder(x, attention_mask=attention_mask)
        return self.cross(y, key_value_states=h)

    def sigmoid_reference(self, x, y, attention_mask):
        h = self.encoder.sigmoid_reference(x, attention_mask=attention_mask)
        return self.cross.sigmoid_reference(y, key_value_states=h)


def _inputs(b, t, seed, pad: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(b, t, E, generator=g), torch.randn(b, t - 2, E, generator=g)
    mask = torch.zeros(b, 1, t, t)
    if pad:
        mask[0, ..., t - pad:] = torch.finfo(torch.float32).min  # row 0's last keys are padding
    return x, y, mask


def _run_both_sites(converted, args):
    """``converted(*args)``, asserting that both sites ran as the op and none as the original."""
    attnswap.reset_call_counts()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = converted(*args)
    original = [str(w.message) for w in caught if "ran as the original" in str(w.message)]
    assert attnswap.total_calls() == 2 and not original, (args[0].shape, original)
    return out


BUILDS = {
    "bart-4.4x": lambda: EncoderDecoder(BartStyleAttention),
    "bart-4.4x-probs-checked": lambda: EncoderDecoder(lambda: BartStyleAttention(check_probs=True)),
    "prophetnet": lambda: EncoderDecoder(ProphetNetStyleAttention),
}
# The example's shape, then a new batch size and new lengths (dynamo traces them symbolically;
# the batch change is the one that put the `size()` node into the graph).
SHAPES = ((2, 8), (3, 8), (2, 6), (3, 11))


@pytest.mark.parametrize("build", BUILDS.values(), ids=BUILDS.keys())
def test_identity_at_every_length(build):
    torch.manual_seed(0)
    model = build()
    converted = attnswap.convert(model, "softmax", attnswap.ExampleInputs(_inputs(2, 8, 0)))
    assert len(converted.attnswap_report.sites) == 2, str(converted.attnswap_report)
    for i, (b, t) in enumerate(SHAPES):
        args = _inputs(b, t, seed=i + 1, pad=2)
        out = _run_both_sites(converted, args)
        ref = model(*args)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
        ref.square().mean().backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        out.square().mean().backward()
        for n, p in converted.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[n], atol=ATOL, rtol=RTOL,
                                       msg=lambda m: f"T={t} {n}: {m}")
        converted.zero_grad(set_to_none=True)


@pytest.mark.parametrize("check_probs", [False, True], ids=["scores-checked", "probs-checked"])
def test_sigmoid_runs_at_every_length(check_probs):
    torch.manual_seed(0)
    model = EncoderDecoder(lambda: BartStyleAttention(check_probs=check_probs))
    converted = attnswap.convert(model, "sigmoid", attnswap.ExampleInputs(_inputs(2, 8, 0)))
    assert [r.kind for r in converted.attnswap_report.sites] == ["sigmoid"] * 2
    with torch.no_grad():
        for i, (b, t) in enumerate(SHAPES):
            args = _inputs(b, t, seed=i + 1, pad=2)
            out = _run_both_sites(converted, args)
            torch.testing.assert_close(out, model.sigmoid_reference(*args), atol=ATOL, rtol=RTOL)


class BroadcastShapeCheck(nn.Module):
    """Learned queries ``[H, Tq, d]`` against keys ``[B, H, Tk, d]`` (a perceiver-style
    cross-attention) with a shape check: the scores' batch dims are not q's, so the check is
    re-sourced as the static shape dynamo recorded."""

    def __init__(self, tq=5):
        super().__init__()
        self.d = E // H
        self.queries = nn.Parameter(torch.randn(H, tq, self.d))
        self.k_proj, self.v_proj = nn.Linear(E, E), nn.Linear(E, E)

    def forward(self, x, attention_mask):
        b, t, _ = x.shape
        heads = lambda y: y.view(b, t, H, self.d).transpose(1, 2)  # noqa: E731
        k, v = heads(self.k_proj(x)), heads(self.v_proj(x))
        w = self.queries @ k.transpose(-1, -2) * self.d ** -0.5
        if w.size() != (b, H, self.queries.shape[1], t):
            raise ValueError("bad shape")
        w = (w + attention_mask).softmax(-1)
        return (w @ v).transpose(1, 2).reshape(b, -1, E)


def test_a_broadcasting_site_checks_its_recorded_shape():
    torch.manual_seed(0)
    model = BroadcastShapeCheck()
    example = (torch.randn(2, 8, E), torch.zeros(2, 1, 1, 8))
    converted = attnswap.convert(model, "softmax", attnswap.ExampleInputs(example))
    assert len(converted.attnswap_report.sites) == 1, str(converted.attnswap_report)
    attnswap.reset_call_counts()
    x = (torch.randn(2, 8, E), torch.zeros(2, 1, 1, 8))
    x[1][1, ..., 6:] = torch.finfo(torch.float32).min
    torch.testing.assert_close(converted(*x), model(*x), atol=ATOL, rtol=RTOL)
    assert attnswap.total_calls() == 1
