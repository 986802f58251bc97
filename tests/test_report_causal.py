"""The report's causal column for masks built outside the compiled region (issue 13).

Under ``convert()`` an HF decoder's attention module receives its causal mask as an opaque
``[B, 1, T, T]`` tensor built by the model's mask builder, outside the region. The report
classifies the mask the site received in ``convert()``'s example call: "mask" when it hides every
key after its query (padding on top is still causal), "yes" when the op itself is called with
``is_causal=True``, "no" otherwise (BERT, with or without padding). The kernels are never told
``is_causal`` from the observation: a later call may pass any other mask, and stays exact.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import attnswap
from attnswap.passes.causal import is_causal_visibility
from attnswap.runtime import site_call

ATOL, RTOL = 1e-5, 1e-4  # fp32
D = 16


def _causal_column(report) -> list[str]:
    return [row[6] for row in report.rows()]


def _spy(monkeypatch):
    seen = []
    real = site_call.attention

    def spy(*a, **kw):
        seen.append(kw["is_causal"])
        return real(*a, **kw)

    monkeypatch.setattr(site_call, "attention", spy)
    return seen


# ---------------------------------------------------------------------------- the rule itself
def _tri(tq, tk, off=0):
    return torch.ones(tq, tk, dtype=torch.bool).tril(off)


def test_visibility_rule():
    T = 6
    tri = _tri(T, T)
    assert is_causal_visibility(tri, T, T)
    assert is_causal_visibility(tri[None, None].expand(2, 3, T, T), T, T)
    keys = torch.ones(2, 1, 1, T, dtype=torch.bool)
    keys[1, ..., :2] = False  # left padding
    assert is_causal_visibility(tri & keys, T, T)
    keys = torch.ones(2, 1, 1, T, dtype=torch.bool)
    keys[1, ..., -2:] = False  # right padding
    assert is_causal_visibility(tri & keys, T, T)
    window = tri & ~_tri(T, T, -3)  # sliding window: still nothing from the future
    assert is_causal_visibility(window, T, T)
    # a decoding chunk against a cache: bottom-right aligned
    assert is_causal_visibility(_tri(3, 8, 5), 3, 8)
    assert not is_causal_visibility(_tri(3, 8, 6), 3, 8)
    # not causal: one key ahead, all visible, key padding only, nothing visible, one query row
    assert not is_causal_visibility(_tri(T, T, 1), T, T)
    assert not is_causal_visibility(torch.ones(T, T, dtype=torch.bool), T, T)
    pad = torch.ones(1, 1, 1, T, dtype=torch.bool)
    pad[..., 3:] = False
    assert not is_causal_visibility(pad, T, T)
    only_first = torch.zeros(T, T, dtype=torch.bool)
    only_first[:, 0] = True  # every key but the first padded: no triangle to see
    assert not is_causal_visibility(only_first, T, T)
    assert not is_causal_visibility(torch.zeros(T, T, dtype=torch.bool), T, T)
    assert not is_causal_visibility(torch.ones(1, T, dtype=torch.bool), 1, T)


# ------------------------------------------------------- a mask given as an input of the model
class MaskArg(nn.Module):
    """Attention whose mask is an argument (built by the caller), in the given spelling."""

    def __init__(self, style):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.style = style

    def forward(self, x, mask):
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, 2, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        if self.style == "sdpa_bool":
            return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        a = q @ k.transpose(-2, -1) * 0.25
        if self.style == "additive":
            a = a + mask
        elif self.style == "where":
            a = torch.where(mask, a, torch.finfo(a.dtype).min)
        elif self.style == "masked_fill_inf":
            a = a.masked_fill(~mask, float("-inf"))
        return a.softmax(dim=-1) @ v


def _vis(T, kind, padded):
    i = torch.arange(T)
    vis = {"causal": i[:, None] >= i[None, :], "band": i[:, None] + 1 >= i[None, :],
           "full": torch.ones(T, T, dtype=torch.bool)}[kind].expand(2, 1, T, T).clone()
    if padded:
        vis[1, ..., :2] = False  # left padding
    return vis


def _as(style, vis):
    if style == "additive":
        return torch.zeros(vis.shape).masked_fill(~vis, torch.finfo(torch.float32).min)
    return vis


@pytest.mark.parametrize("style", ["additive", "where", "masked_fill_inf", "sdpa_bool"])
@pytest.mark.parametrize("kind,padded,expected", [
    ("causal", False, "mask"), ("causal", True, "mask"),
    ("band", False, "no"), ("full", True, "no"),
])
def test_mask_argument(style, kind, padded, expected, monkeypatch):
    torch.manual_seed(0)
    model = MaskArg(style)
    T = 6
    x = torch.randn(2, T, D)
    if style == "masked_fill_inf" and padded:  # fully hidden rows are NaN in the original
        vis = _vis(T, kind, padded)
        vis[..., 0] = True
    else:
        vis = _vis(T, kind, padded)
    converted = attnswap.convert(model, "softmax", (x, _as(style, vis)))
    report = converted.attnswap_report
    assert _causal_column(report) == [expected]
    (site,) = report.sites
    assert site.causal is False and site.causal_mask is (expected == "mask")
    assert report.to_dict()["sites"][0]["causal_mask"] is (expected == "mask")
    # The kernels are never told: the next call passes a bidirectional mask, and is exact.
    seen = _spy(monkeypatch)
    other = _as(style, _vis(T, "full", False))
    torch.testing.assert_close(converted(x, other), model(x, other), atol=ATOL, rtol=RTOL)
    assert seen == [False]


# --------------------------------------------------------------- HF models, from small configs
transformers = pytest.importorskip("transformers")


def _ids(seed, padding):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (2, 9), generator=g)
    kwargs = {"input_ids": ids}
    if padding:
        mask = torch.ones_like(ids)
        if padding == "left":
            mask[1, :3] = 0
        else:
            mask[1, -3:] = 0
        kwargs["attention_mask"] = mask
    return kwargs


def _llama(attn):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


def _gpt2(attn):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=0, attn_implementation=attn)
    return GPT2LMHeadModel(cfg).eval()


def _mistral(attn):
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                        attn_implementation=attn)
    return MistralForCausalLM(cfg).eval()


def _bert(attn):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, attn_implementation=attn)
    return BertModel(cfg).eval()


def _out(o):
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


# expected causal column: sdpa without padding passes is_causal=True itself ("yes"); with
# padding HF hands the region a [B, 1, T, T] bool mask, eager always a finfo.min float mask.
HF = [
    ("llama", _llama, "eager", None, "mask"), ("llama", _llama, "eager", "left", "mask"),
    ("llama", _llama, "sdpa", None, "yes"), ("llama", _llama, "sdpa", "left", "mask"),
    ("gpt2", _gpt2, "eager", None, "mask"), ("gpt2", _gpt2, "eager", "left", "mask"),
    ("gpt2", _gpt2, "sdpa", None, "yes"), ("gpt2", _gpt2, "sdpa", "left", "mask"),
    ("gpt2", _gpt2, "sdpa", "right", "mask"),
    # a sliding window (4) shorter than the sequence: still nothing from the future
    ("mistral", _mistral, "sdpa", None, "mask"), ("mistral", _mistral, "eager", "left", "mask"),
    ("bert", _bert, "eager", None, "no"), ("bert", _bert, "eager", "right", "no"),
    ("bert", _bert, "sdpa", "right", "no"), ("bert", _bert, "sdpa", "left", "no"),
]


@pytest.mark.parametrize("name,build,attn,padding,expected", HF,
                         ids=[f"{c[0]}-{c[2]}-{c[3] or 'nopad'}" for c in HF])
def test_hf_report_causal(name, build, attn, padding, expected, monkeypatch):
    model = build(attn)
    x = _ids(0, padding)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = attnswap.convert(model, "softmax", x)
    report = converted.attnswap_report
    assert len(report.sites) == 2
    assert _causal_column(report) == [expected, expected], str(report)
    assert f"  {expected}  " in str(report)
    seen = _spy(monkeypatch)
    y = _ids(1, padding)
    with torch.no_grad():
        torch.testing.assert_close(_out(converted(**y)), _out(model(**y)), atol=ATOL, rtol=RTOL)
    assert seen == [expected == "yes"] * 2  # "mask" is the report's word only


def test_report_causal_survives_a_reload(tmp_path):
    """The field goes through to_dict (describe, save/load); records saved before it existed
    still load (default: False)."""
    from attnswap.rewriter.persistence import _report_from_dict

    converted = attnswap.convert(_llama("eager"), "softmax", _ids(0, "left"))
    d = converted.attnswap_report.to_dict()
    back = _report_from_dict(d, "softmax", "LlamaForCausalLM")
    assert _causal_column(back) == ["mask", "mask"]
    for s in d["sites"]:
        del s["causal_mask"], s["scale_folded"]
    old = _report_from_dict(d, "softmax", "LlamaForCausalLM")
    assert _causal_column(old) == ["no", "no"]


def test_transformer_decoder_causal_tgt_mask():
    """torch's own decoder layer, masked the tutorial's way (a -inf triangle as tgt_mask):
    self-attention reports "mask", the cross-attention "no"."""

    class Dec(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True)

        def forward(self, x, mem, mask):
            return self.layer(x, mem, tgt_mask=mask)

    torch.manual_seed(0)
    model = Dec().eval()
    x, mem = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    mask = nn.Transformer.generate_square_subsequent_mask(7)
    converted = attnswap.convert(model, "softmax", (x, mem, mask))
    report = converted.attnswap_report
    assert [r.owner for r in report.sites] == ["layer.self_attn", "layer.multihead_attn"]
    assert _causal_column(report) == ["mask", "no"]
    with torch.no_grad():
        torch.testing.assert_close(converted(x, mem, mask), model(x, mem, mask),
                                   atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------ folded tensor scales
class TensorScaled(nn.Module):
    def __init__(self, learned: bool):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.learned = learned
        self.t = nn.Parameter(torch.rand(1, 2, 1, 1) + 0.5)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (z.view(B, T, 2, -1).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=-1))
        s = q @ k.transpose(-2, -1) * 0.125
        if self.learned:
            s = s * self.t  # a learned per-head temperature: folds into q
        return s.softmax(dim=-1) @ v


@pytest.mark.parametrize("learned", [True, False])
def test_report_scale_folded(learned):
    x = torch.randn(2, 6, D)
    converted = attnswap.convert(TensorScaled(learned), "softmax", x)
    report = converted.attnswap_report
    (site,) = report.sites
    assert site.scale_folded is learned
    assert report.to_dict()["sites"][0]["scale_folded"] is learned
    (row,) = report.rows()
    assert row[4] == ("0.125·t" if learned else "0.125")
