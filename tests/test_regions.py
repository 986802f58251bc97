"""Regional conversion (issue 10): a converted model is a durable, honest model.

Each scenario is built from the code shape users run: HF Llama with GQA, HF BERT, a PEFT-wrapped
Llama, a module holding two attentions, a BatchNorm model. Outputs are compared against the
original model (identity conversion, SAS identity init) or against the converted model before
the operation under test (copy, pickle, reload); tolerances are fp32's.
"""

import copy
import io
import threading
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnswap
import attnswap.rewriter.backend
from attnswap.kernels.reference import attention_reference

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-4)  # fp32


def tiny_llama(layers=2, seed=0, attn="eager"):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, attn_implementation=attn, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=layers,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                     attn_implementation="eager")
    return BertModel(cfg).eval()


def ids(batch=2, seq=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 128, (batch, seq), generator=g)


def logits(model, x=None, **kw):
    with torch.no_grad():
        return model(input_ids=ids() if x is None else x, **kw).logits


def swap_warnings(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn()
    return out, [x for x in w if issubclass(x.category, attnswap.AttentionSwapWarning)]


# ------------------------------------------------------------------------------------------------
# identity, regions, report


def test_regions_not_the_root_and_identities_by_owner():
    model = tiny_llama()
    c = attnswap.convert(model, "softmax", {"input_ids": ids()})
    r = c.attnswap_report
    assert r.identities == ["model.layers.0.self_attn[0]", "model.layers.1.self_attn[0]"]
    assert "" not in r.regions and len(r.regions) == 2
    assert "forward" not in c.__dict__  # the root's forward runs as the user wrote it
    torch.testing.assert_close(logits(c, ids(3, 11, 4)), logits(model, ids(3, 11, 4)), **TOL)


def test_bert_identity_in_outputs_and_gradients():
    model = tiny_bert().train()
    for m in model.modules():  # deterministic comparison: no dropout
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    x = ids()
    mask = torch.ones_like(x)
    mask[1, -3:] = 0
    c = attnswap.convert(model, "softmax", {"input_ids": x, "attention_mask": mask})
    assert len(c.attnswap_report.sites) == 2
    out_c = c(input_ids=x, attention_mask=mask).last_hidden_state
    out_m = model(input_ids=x, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out_c, out_m, **TOL)
    w = torch.randn(out_m.shape, generator=torch.Generator().manual_seed(1))
    (out_c * w).sum().backward()  # a loss whose gradient does not vanish through LayerNorm
    (out_m * w).sum().backward()
    for (n, p), (_, q) in zip(c.named_parameters(), model.named_parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)


# ------------------------------------------------------------------------------------------------
# persistence


def test_deepcopy_is_an_independent_converted_model():
    c = attnswap.convert(tiny_llama(), "sigmoid", {"input_ids": ids()})
    before = logits(c)
    d = copy.deepcopy(c)
    torch.testing.assert_close(logits(d), before, **TOL)
    with torch.no_grad():
        d.model.layers[0].self_attn.q_proj.weight.add_(0.5)
    attnswap.reset_call_counts()
    changed = logits(d)
    assert attnswap.total_calls("sigmoid") == 2  # the copy runs converted, with its own weights
    assert not torch.allclose(changed, before)
    torch.testing.assert_close(logits(c), before, **TOL)  # the original is untouched
    assert attnswap.report_of(d) is not attnswap.report_of(c)


@pytest.mark.parametrize("kind,opts", [("sigmoid", {}), ("sas", {"init": "random"})])
def test_torch_save_round_trip(kind, opts):
    c = attnswap.convert(tiny_llama(), kind, {"input_ids": ids()}, **opts)
    before = logits(c)
    buf = io.BytesIO()
    torch.save(c, buf)
    buf.seek(0)
    r = torch.load(buf, weights_only=False)
    attnswap.reset_call_counts()
    torch.testing.assert_close(logits(r), before, **TOL)
    assert attnswap.total_calls() == 2
    assert type(r) is type(c) and attnswap.report_of(r).identities == c.attnswap_report.identities


@pytest.mark.parametrize("kind,opts", [("sigmoid", {}), ("sas", {"init": "random"}),
                                       ("relu", {"qk_norm": True})])
def test_save_pretrained_then_attnswap_from_pretrained(tmp_path, kind, opts):
    c = attnswap.convert(tiny_llama(), kind, {"input_ids": ids()}, **opts)
    before = logits(c, ids(2, 7, 3))
    c.save_pretrained(tmp_path)
    r = attnswap.from_pretrained(tmp_path)
    assert type(r) is type(c)
    attnswap.reset_call_counts()
    torch.testing.assert_close(logits(r, ids(2, 7, 3)), before, **TOL)
    assert attnswap.total_calls() == 2
    extra = {n for n, _ in c.named_parameters() if ".attnswap." in n}
    assert extra == {n for n, _ in r.named_parameters() if ".attnswap." in n}
    plain = LlamaForCausalLM.from_pretrained(tmp_path)  # plain HF: the unconverted model
    assert attnswap.report_of(plain) is None


def test_from_pretrained_of_an_unconverted_checkpoint_is_a_clear_error(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not saved from a model converted by attnswap"):
        attnswap.from_pretrained(tmp_path)


def test_unconvert_gives_the_original_back():
    model = tiny_llama()
    c = attnswap.convert(model, "sas", {"input_ids": ids()})
    u = attnswap.unconvert(c)
    assert not any(".attnswap." in n for n, _ in u.named_parameters())
    assert all("forward" not in m.__dict__ for m in u.modules())
    torch.testing.assert_close(logits(u), logits(model), **TOL)
    assert attnswap.report_of(u) is None
    attnswap.convert(u, "relu", {"input_ids": ids()})  # can be converted again


# ------------------------------------------------------------------------------------------------
# convert() leaves the user's model bitwise as it was


class ConvAttention(nn.Module):
    """A small hybrid (conv stem with BatchNorm, then one attention block)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.qkv = nn.Linear(16, 48)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = self.stem(x).flatten(2).transpose(1, 2)  # [B, T, C]
        q, k, v = self.qkv(h).view(h.shape[0], h.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1)) * 8 ** -0.5
        o = a.softmax(-1) @ v
        return self.head(o.transpose(1, 2).reshape(h.shape).mean(1))


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()])


def _assert_same_state(model, state):
    sd, flags = state
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert [m.training for m in model.modules()] == flags


@pytest.mark.parametrize("inplace", [False, True])
def test_convert_leaves_batchnorm_statistics_and_flags_bitwise(inplace):
    model = ConvAttention().train()
    model.stem[1].eval()  # a mixed-mode model: the flags must come back as they were
    state = _state(model)
    x = torch.randn(2, 3, 4, 4)
    c = attnswap.convert(model, "sigmoid", x, inplace=inplace)
    assert len(c.attnswap_report.sites) == 1
    if not inplace:
        _assert_same_state(model, state)
    _assert_same_state(c, state)  # the converted model starts from the original state too


class CachedBiasAttention(nn.Module):
    """timm LeViT's shape: in eval mode the gathered per-head position bias is cached on the
    module, so the autograd graph of the gather (saving an index *buffer*) outlives the call
    that built it — here, convert()'s own calls."""

    def __init__(self, dim=16, heads=2, tokens=4):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.bias = nn.Parameter(torch.randn(heads, tokens))
        self.register_buffer("bias_idxs", torch.arange(tokens * tokens).remainder(tokens)
                             .view(tokens, tokens), persistent=False)
        self.cache = {}

    def biases(self):
        if self.training:
            return self.bias[:, self.bias_idxs]
        if "b" not in self.cache:
            self.cache["b"] = self.bias[:, self.bias_idxs]
        return self.cache["b"]

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * self.hd ** -0.5 + self.biases()
        return (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)


def test_restoring_state_keeps_autograd_graphs_the_model_cached_during_conversion():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16)
    model = CachedBiasAttention().eval()
    twin = copy.deepcopy(model)
    c = attnswap.convert(model, "softmax", x)
    assert len(c.attnswap_report.sites) == 1
    out = c(x)
    out.square().mean().backward()  # failed: "index buffer modified by an inplace operation"
    ref = twin(x)
    ref.square().mean().backward()
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(c.bias.grad, twin.bias.grad, **TOL)


def test_failed_inplace_conversion_leaves_the_model_bitwise():
    model = ConvAttention().train()
    state = _state(model)
    with pytest.raises(ValueError, match="the original ConvAttention fails on these example_inputs"):
        attnswap.convert(model, "sigmoid", torch.randn(2, 5, 4, 4), inplace=True)
    _assert_same_state(model, state)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert attnswap.report_of(model) is None


# ------------------------------------------------------------------------------------------------
# call variety never reaches a limit; every call is converted


def test_llama_call_variety_train_eval_grad_no_grad():
    c = attnswap.convert(tiny_llama(), "sigmoid", {"input_ids": ids()})
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    calls = [dict(input_ids=x), dict(input_ids=x, labels=x), dict(input_ids=x, attention_mask=mask),
             dict(input_ids=x, use_cache=False), dict(input_ids=x, output_hidden_states=True),
             dict(input_ids=ids(2, 13, 1), attention_mask=torch.ones(2, 13, dtype=torch.long))]
    with warnings.catch_warnings():
        warnings.simplefilter("error", attnswap.AttentionSwapWarning)
        for training in (False, True):
            c.train(training)
            for grad in (True, False):
                for kw in calls * 2:
                    attnswap.reset_call_counts()
                    with torch.set_grad_enabled(grad):
                        c(**kw)
                    assert attnswap.total_calls("sigmoid") == 2, kw


def test_recompile_limit_is_an_attnswap_error_naming_the_region(monkeypatch):
    from attnswap.rewriter import regions

    monkeypatch.setattr(regions, "BASE_RECOMPILE_LIMIT", 1)
    monkeypatch.setattr(regions, "PER_INSTANCE_RECOMPILES", 0)
    c = attnswap.convert(tiny_llama(layers=1), "sigmoid", {"input_ids": ids()})
    with pytest.raises(attnswap.AttnswapError, match=r"region model\.layers\.0 .*recompiled"):
        c.train()(input_ids=ids(3, 5))


# ------------------------------------------------------------------------------------------------
# a site that runs as softmax is told, per site and reason; strict raises


def test_sas_output_attentions_warns_per_site_and_creates_no_parameters():
    c = attnswap.convert(tiny_llama(), "sas", {"input_ids": ids()}, init="random")
    params = {n for n, _ in c.named_parameters()}
    before = logits(c)
    out, w = swap_warnings(lambda: c(input_ids=ids(), output_attentions=True))
    msgs = sorted({str(x.message).split(" of ")[0] for x in w if "ran as the original" in str(x.message)})
    assert msgs == ["attnswap: site model.layers.0.self_attn[0]", "attnswap: site model.layers.1.self_attn[0]"]
    assert {n for n, _ in c.named_parameters()} == params  # nothing created after convert()
    torch.testing.assert_close(logits(c), before, **TOL)  # the trained SAS modules still serve
    assert c.attnswap_report.identities == ["model.layers.0.self_attn[0]", "model.layers.1.self_attn[0]"]
    c._attnswap.strict = True
    with pytest.raises(attnswap.AttnswapError, match="ran as the original softmax"):
        c(input_ids=ids(), output_attentions=True)


def test_include_selects_by_owner_path():
    model = tiny_llama(layers=3)
    c = attnswap.convert(model, "relu", {"input_ids": ids()}, include="model.layers.0.*")
    assert c.attnswap_report.identities == ["model.layers.0.self_attn[0]"]
    attnswap.reset_call_counts()
    logits(c)
    assert attnswap.total_calls("relu") == 1
    c = attnswap.convert(model, "relu", {"input_ids": ids()}, exclude="*.layers.1.*")
    assert c.attnswap_report.identities == ["model.layers.0.self_attn[0]", "model.layers.2.self_attn[0]"]
    assert any("excluded" in s.reason for s in c.attnswap_report.skipped)


class BreakInsideSite(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).view(*x.shape[:2], 3, 2, 8).permute(2, 0, 3, 1, 4)
        p = (q @ k.transpose(-2, -1) / 8 ** 0.5).softmax(-1)
        torch._dynamo.graph_break()
        return (p @ v).transpose(1, 2).flatten(2)


def test_graph_break_inside_a_site_is_loud_and_strict_raises():
    x = torch.randn(2, 5, 16)
    with pytest.warns(attnswap.AttentionSwapWarning, match="graph break inside the attention"):
        attnswap.convert(BreakInsideSite(), "sigmoid", x)
    with pytest.raises(attnswap.AttnswapError, match="strict=True"):
        attnswap.convert(BreakInsideSite(), "sigmoid", x, strict=True)


def test_dynamo_disabled_after_conversion_is_told():
    c = attnswap.convert(tiny_llama(), "sigmoid", {"input_ids": ids()})
    with torch._dynamo.config.patch(disable=True):
        _, w = swap_warnings(lambda: logits(c))
        assert any("dynamo is disabled" in str(x.message) for x in w)
        c._attnswap.strict = True
        with pytest.raises(attnswap.AttnswapError, match="dynamo is disabled"):
            logits(c)


def test_two_threads_account_their_own_calls():
    c = attnswap.convert(tiny_llama(), "sigmoid", {"input_ids": ids()}, strict=True)
    logits(c)
    errors = []

    def work(seed):
        try:
            for i in range(4):
                logits(c, ids(2, 9, seed + i))
        except Exception as e:  # strict: any mis-accounting raises
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in (0, 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_converted_model_nested_in_another_model():
    inner = attnswap.convert(tiny_llama(), "sigmoid", {"input_ids": ids()})

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = inner
            self.q = nn.Linear(128, 16)

        def forward(self, input_ids):
            h = self.q(self.lm(input_ids=input_ids).logits)
            return (h @ h.transpose(-2, -1) / 4).softmax(-1) @ h

    outer = attnswap.convert(Wrapper(), "relu", {"input_ids": ids()}, strict=True)
    assert outer.attnswap_report.identities == ["[0]".join(["<root>", ""])]
    attnswap.reset_call_counts()
    with torch.no_grad():
        outer(input_ids=ids())
    assert attnswap.total_calls("sigmoid") == 2 and attnswap.total_calls("relu") == 1


# ------------------------------------------------------------------------------------------------
# wrappers and unusual owners


def test_peft_wrapped_llama_gets_sas_at_its_own_paths():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    c = attnswap.convert(model, "sas", {"input_ids": ids()})
    assert c.attnswap_report.identities == [
        "base_model.model.model.layers.0.self_attn[0]", "base_model.model.model.layers.1.self_attn[0]"]
    torch.testing.assert_close(logits(c), logits(model), **TOL)  # identity init
    c.train()
    c(input_ids=ids(), labels=ids()).loss.backward()
    grads = {n: p.grad for n, p in c.named_parameters() if p.requires_grad}
    assert any(".attnswap.0.sas." in n and g is not None for n, g in grads.items())
    assert any("lora_A" in n and g is not None for n, g in grads.items())


class SelfAndCross(nn.Module):
    """One module, two attentions of different head counts (decoder self + cross attention)."""

    def __init__(self):
        super().__init__()
        self.sq, self.skv = nn.Linear(16, 16), nn.Linear(16, 32)
        self.cq, self.ckv = nn.Linear(16, 16), nn.Linear(16, 32)

    @staticmethod
    def attend(q, kv, heads):
        B, T, _ = q.shape
        q = q.view(B, T, heads, -1).transpose(1, 2)
        k, v = kv.view(B, kv.shape[1], 2, heads, -1).permute(2, 0, 3, 1, 4)
        w = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        return (w @ v).transpose(1, 2).reshape(B, T, -1)

    def forward(self, x, memory):
        x = x + self.attend(self.sq(x), self.skv(x), 4)
        return x + self.attend(self.cq(x), self.ckv(memory), 2)


def test_two_attentions_in_one_module_are_two_sites_with_their_own_parameters():
    m = SelfAndCross()
    x, mem = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    c = attnswap.convert(m, "sas", (x, mem))
    assert c.attnswap_report.identities == ["<root>[0]", "<root>[1]"]
    heads = sorted(mod.sas.heads for mod in c.attnswap.values())
    assert heads == [2, 4]
    torch.testing.assert_close(c(x, mem), m(x, mem), **TOL)
    s = attnswap.convert(m, "sigmoid", (x, mem))
    ref = x + _ref_attend(m.sq(x), m.skv(x), 4)
    ref = ref + _ref_attend(m.cq(ref), m.ckv(mem), 2)
    torch.testing.assert_close(s(x, mem), ref, **TOL)


def _ref_attend(q, kv, heads):
    B, T, _ = q.shape
    q = q.view(B, T, heads, -1).transpose(1, 2)
    k, v = kv.view(B, kv.shape[1], 2, heads, -1).permute(2, 0, 3, 1, 4)
    out = attention_reference(q, k, v, kind="sigmoid", scale=q.shape[-1] ** -0.5)
    return out.transpose(1, 2).reshape(B, T, -1)


class SoftmaxChild(nn.Module):
    """timm Swin's shape: the softmax is a child module of the attention module."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        q, k, v = self.qkv(x).view(*x.shape[:2], 3, 2, 8).permute(2, 0, 3, 1, 4)
        return (self.softmax(q @ k.transpose(-2, -1) * 8 ** -0.5) @ v).transpose(1, 2).flatten(2)


def test_softmax_in_a_child_module_makes_the_parent_the_region():
    m = nn.Sequential(nn.Linear(16, 16), SoftmaxChild())
    c = attnswap.convert(m, "softmax", torch.randn(2, 5, 16))
    assert c.attnswap_report.identities == ["1[0]"] and c.attnswap_report.regions == ["1"]
    x = torch.randn(3, 6, 16)
    torch.testing.assert_close(c(x), m(x), **TOL)


# ------------------------------------------------------------------------------------------------
# the backend path reports per model


def test_backend_report_of_each_compiled_model():
    class SDPA(nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q, is_causal=True)

    a = torch.compile(SDPA(), backend="attnswap", options={"attention": "relu"})
    b = torch.compile(SDPA(), backend="attnswap", options={"attention": "sigmoid"})
    q = torch.randn(1, 2, 5, 8)
    a(q)
    b(q)
    ra, rb = attnswap.report_of(a), attnswap.report_of(b)
    assert ra is not rb and ra.attention == "relu" and rb.attention == "sigmoid"
    assert len(ra.sites) == 1 and len(rb.sites) == 1

    class NoAttention(nn.Module):
        def forward(self, x):
            return x.softmax(-1) * 2

    n = torch.compile(NoAttention(), backend="attnswap", options={"attention": "relu"})
    with pytest.warns(attnswap.AttentionSwapWarning, match="nothing converted"):
        n(torch.randn(3, 4))


@pytest.mark.parametrize("batch_first", [False, True])
def test_nn_transformer_the_tutorials_way_converts_all_three_attentions(batch_first):
    """PyTorch's tutorial masks nn.Transformer with a float causal mask and *bool* padding
    masks; torch's own mask canonicalization warns about the mix inside MultiheadAttention,
    which is a graph break in the middle of the site. The region call makes the masks one dtype
    first (the same values torch computes), so all three attentions convert, exactly."""
    torch.manual_seed(0)
    model = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1,
                           dim_feedforward=64, dropout=0.0, batch_first=batch_first).eval()

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        S, T, B = 6, 5, 2
        src, tgt = torch.randn(B, S, 32, generator=g), torch.randn(B, T, 32, generator=g)
        if not batch_first:
            src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
        spm = torch.zeros(B, S, dtype=torch.bool)
        spm[1, -2:] = True
        tpm = torch.zeros(B, T, dtype=torch.bool)
        tpm[1, -1] = True
        return dict(src=src, tgt=tgt, tgt_mask=nn.Transformer.generate_square_subsequent_mask(T),
                    src_key_padding_mask=spm, tgt_key_padding_mask=tpm, memory_key_padding_mask=spm)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's own deprecation notice
        warnings.simplefilter("error", attnswap.AttentionSwapWarning)
        c = attnswap.convert(model, "softmax", attnswap.ExampleInputs((), inputs(0)))
        mha = sorted(n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention))
        assert sorted(r.owner for r in c.attnswap_report.sites) == mha, str(c.attnswap_report)
        attnswap.reset_call_counts()
        with torch.no_grad():
            torch.testing.assert_close(c(**inputs(1)), model(**inputs(1)), **TOL)
        assert attnswap.total_calls() == 3


@torch.compiler.disable
def _attention_dynamo_never_sees(q, k, v):
    return (q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(-1) @ v


class HiddenFromDynamo(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).view(*x.shape[:2], 3, 2, 8).permute(2, 0, 3, 1, 4)
        return _attention_dynamo_never_sees(q, k, v).transpose(1, 2).flatten(2)


def test_attention_no_graph_shows_is_a_loud_skip_not_silence():
    x = torch.randn(2, 5, 16)
    with pytest.warns(attnswap.AttentionSwapWarning, match="no compiled graph of its region holds it"):
        c = attnswap.convert(HiddenFromDynamo(), "sigmoid", x)
    assert not c.attnswap_report.sites and c.attnswap_report.skipped
    with pytest.raises(attnswap.AttnswapError, match="strict=True"):
        attnswap.convert(HiddenFromDynamo(), "sigmoid", x, strict=True)


def _named_block(forward):
    """A class named ``Block`` in this module, built like generated or reloaded code: two such
    classes share ``__module__`` and ``__qualname__`` but not their code."""
    def init(self, d=8, **children):
        nn.Module.__init__(self)
        self.q, self.k, self.v = (nn.Linear(d, d) for _ in range(3))
        for name, child in children.items():
            setattr(self, name, child)
    return type("Block", (nn.Module,), {"__init__": init, "forward": forward,
                                        "__module__": __name__, "__qualname__": "Block"})


def _attend(self, x):
    s = self.q(x) @ self.k(x).transpose(-1, -2) * 0.5
    return s.softmax(-1) @ self.v(x)


def _weights(self, x):  # probabilities returned to the caller: not a site, its region climbs
    return (self.q(x) @ self.k(x).transpose(-1, -2)).softmax(-1)


def _container(self, x):
    return self.a(x), self.b(x)


def test_classes_of_one_name_keep_their_own_code():
    """Regions of one class share a compiled graph; two classes that only share a name must
    not (the root region used to run the attention block's compiled forward on itself)."""
    torch.manual_seed(0)
    model = _named_block(_container)(a=_named_block(_attend)(), b=_named_block(_weights)())
    assert len({type(m) for m in model.modules() if type(m).__qualname__ == "Block"}) == 3
    x = torch.randn(2, 5, 8)
    for kind in ("softmax", "sigmoid"):
        conv = attnswap.convert(model, kind, attnswap.ExampleInputs((x,)))
        assert [r.kind for r in conv.attnswap_report.sites] == [kind], str(conv.attnswap_report)
        attnswap.reset_call_counts()
        out, p = conv(x)
        assert attnswap.total_calls() == 1
        a = model.a
        ref = attention_reference(*(t(x).unsqueeze(1) for t in (a.q, a.k, a.v)), None,
                                  kind=kind, scale=0.5).squeeze(1)
        torch.testing.assert_close(out, ref, **TOL)
        torch.testing.assert_close(p, model.b(x), **TOL)
