"""convert(): retargeted outputs against independent references, options, bad input, no silent
fallback, recompiles, and the torch.compile entry point."""

import math
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import attnswap
from attnswap.kernels.reference import attention_reference

transformers = pytest.importorskip("transformers")
from transformers import AttentionInterface, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-4)  # fp32


def tiny_llama(attn="eager", layers=2, heads=4, kv_heads=2, hidden=32, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=128,
                      attn_implementation=attn, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(attn="eager", layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_positions=128, n_embd=32, n_layer=layers, n_head=4,
                     attn_implementation=attn, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def ids(batch=2, seq=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 128, (batch, seq), generator=g)


# ------------------------------------------------------------------------------------------------
# retargeted outputs equal a hand-written model whose attention is kernels/reference.py


def _reference_interface(kind, **options):
    """A HuggingFace attention function computing ``kind`` with the plain-math reference."""

    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        mask = attention_mask
        if mask is not None:
            mask = mask[:, :, :, : key.shape[-2]]
        causal = mask is None and query.shape[2] > 1 and getattr(module, "is_causal", False)
        out = attention_reference(query, key, value, mask, kind=kind, scale=scaling,
                                  is_causal=causal, **options)
        return out.transpose(1, 2).contiguous(), None

    return fn


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama-gqa", "gpt2"])
@pytest.mark.parametrize("kind,options", [
    ("sigmoid", {}),
    ("sigmoid", {"sigmoid_bias": -2.0}),
    ("relu", {}),
    ("relu", {"activation": "relu2", "alpha": 0.5, "length": "visible"}),
    ("relu", {"activation": "gelu", "length": 64}),
])
def test_retarget_matches_reference_model(build, kind, options):
    name = f"ref_{kind}_{abs(hash(tuple(sorted(options.items())))) % 10**6}"
    AttentionInterface.register(name, _reference_interface(kind, **options))
    model = build()
    x = ids()
    mask = torch.ones_like(x)
    mask[1, -3:] = 0
    converted = attnswap.convert(model, kind, {"input_ids": x, "attention_mask": mask}, **options)
    reference = build(attn=name)
    reference.load_state_dict(model.state_dict())
    x2, mask2 = ids(3, 11, seed=5), torch.ones(3, 11, dtype=torch.long)
    mask2[0, -4:] = 0
    with torch.no_grad():
        want = reference(input_ids=x2, attention_mask=mask2).logits
        got = converted(input_ids=x2, attention_mask=mask2).logits
    # Padded query rows see no valid key in some kinds; compare the rows a user reads.
    keep = mask2.bool()
    torch.testing.assert_close(got[keep], want[keep], **TOL)


@pytest.mark.parametrize("init", ["identity"])
def test_sas_identity_init_is_exact(init):
    model = tiny_llama()
    x = ids()
    converted = attnswap.convert(model, "sas", {"input_ids": x}, init=init)
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids=ids(2, 13, 3)).logits,
                                   model(input_ids=ids(2, 13, 3)).logits, **TOL)
    names = [n for n, _ in converted.named_parameters() if ".attnswap.0.sas." in n]
    assert names and all(n.startswith("model.layers.") for n in names)


def test_sas_random_init_changes_outputs_and_has_new_parameters():
    model = tiny_llama()
    converted = attnswap.convert(model, "sas", {"input_ids": ids()}, init="random",
                                 heads_ratio=3, dim=12, kernel_size=5)
    extra = sum(p.numel() for p in converted.parameters()) - sum(p.numel() for p in model.parameters())
    assert extra > 0
    with torch.no_grad():
        assert not torch.allclose(converted(input_ids=ids()).logits, model(input_ids=ids()).logits)


def test_qk_norm_adds_owned_parameters():
    converted = attnswap.convert(tiny_gpt2(), "sigmoid", {"input_ids": ids()}, qk_norm="rmsnorm")
    names = [n for n, _ in converted.named_parameters() if ".attnswap.0.qk_norm." in n]
    assert len(names) == 2 * 2  # q and k norms, two layers


def test_include_exclude_select_sites():
    model = tiny_llama(layers=3)
    c = attnswap.convert(model, "relu", {"input_ids": ids()}, include="model.layers.1.*")
    assert [r.owner for r in c.attnswap_report.sites] == ["model.layers.1.self_attn"]
    c = attnswap.convert(model, "relu", {"input_ids": ids()}, exclude=["*.layers.0.*"])
    assert sorted(r.owner for r in c.attnswap_report.sites) == [
        "model.layers.1.self_attn", "model.layers.2.self_attn"]
    assert any("excluded" in s.reason for s in c.attnswap_report.skipped)


def test_input_model_is_untouched_and_report_is_complete():
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    c = attnswap.convert(model, "sigmoid", {"input_ids": ids()})
    assert type(c) is type(model) and c is not model
    assert "forward" not in model.__dict__ and not hasattr(model, "attnswap_report")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    d = c.attnswap_report.to_dict()
    assert d["attention"] == "sigmoid" and len(d["sites"]) == 2
    site = d["sites"][0]
    for key in ("owner", "pattern", "q_shape", "k_shape", "scale", "mask", "causal", "gqa_groups"):
        assert key in site
    assert math.isclose(site["scale"], 1 / math.sqrt(8))
    assert "transformer.h.0.attn" in str(c.attnswap_report)


def test_inplace_conversion():
    model = tiny_gpt2()
    c = attnswap.convert(model, "relu", {"input_ids": ids()}, inplace=True)
    assert c is model and len(model.attnswap_report.sites) == 2


# ------------------------------------------------------------------------------------------------
# no silent fallback


def test_twenty_models_of_one_class_all_run_converted_attention():
    for i in range(20):
        model = tiny_llama(layers=1 + i % 3, hidden=16 * (1 + i % 2), heads=2 * (1 + i % 2),
                           kv_heads=1 + i % 2, seed=i)
        c = attnswap.convert(model, "sigmoid", {"input_ids": ids(seq=4 + i % 5)})
        attnswap.reset_call_counts()
        with torch.no_grad():
            c(input_ids=ids(seq=3 + i))
        assert attnswap.total_calls("sigmoid") == model.config.num_hidden_layers, i


def test_ten_lengths_few_recompiles_every_call_converted():
    c = attnswap.convert(tiny_gpt2(), "relu", {"input_ids": ids(seq=4)})
    after_convert = c.attnswap_report.graphs
    for n in range(5, 15):
        attnswap.reset_call_counts()
        with warnings.catch_warnings():
            warnings.simplefilter("error", attnswap.AttentionSwapWarning)
            c(input_ids=ids(seq=n))
        assert attnswap.total_calls("relu") == 2
    # one dynamic graph per region for every other length (the KV cache indexes its layers by
    # the region's layer_idx, so each layer specializes once)
    assert c.attnswap_report.graphs - after_convert <= 2, c.attnswap_report.graphs


def test_strict_mode_raises_when_a_call_runs_no_converted_attention():
    c = attnswap.convert(tiny_gpt2(), "sigmoid", {"input_ids": ids()}, strict=True)
    compiler_calls = c.attnswap_report.graphs
    c(input_ids=ids(seq=6))  # converted: fine
    assert c.attnswap_report.graphs >= compiler_calls


# ------------------------------------------------------------------------------------------------
# generate


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_generate_softmax_identity_and_sigmoid_cache(build):
    model = build()
    prompt = ids(1, 5, seed=7)
    gen = dict(max_new_tokens=6, do_sample=False)
    c = attnswap.convert(model, "softmax", {"input_ids": prompt})
    assert torch.equal(c.generate(prompt, **gen), model.generate(prompt, **gen))
    s = attnswap.convert(model, "sigmoid", {"input_ids": prompt})
    attnswap.reset_call_counts()
    with_cache = s.generate(prompt, use_cache=True, **gen)
    assert attnswap.total_calls("sigmoid") >= 6 * model.config.num_hidden_layers
    without = s.generate(prompt, use_cache=False, **gen)
    assert torch.equal(with_cache, without)


# ------------------------------------------------------------------------------------------------
# bad input


class NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return torch.softmax(self.fc(x), dim=-1)


def test_model_without_attention_warns_and_is_untouched():
    m = NoAttention()
    with pytest.warns(attnswap.AttentionSwapWarning, match="no softmax attention"):
        c = attnswap.convert(m, "sigmoid", torch.randn(2, 8))
    assert "forward" not in c.__dict__
    assert len(c.attnswap_report.sites) == 0 and c.attnswap_report.skipped
    x = torch.randn(2, 8)
    assert torch.equal(c(x), m(x))


@pytest.mark.parametrize("kwargs,match", [
    (dict(attention="cosine"), "attention='cosine' is not supported"),
    (dict(attention="relu", activation="tanh"), "activation='tanh'"),
    (dict(attention="relu", length="all"), "length='all'"),
    (dict(attention="sigmoid", alpha=1.0), "attention='sigmoid' takes no option 'alpha'"),
    (dict(attention="sas", heads_ratio=1), "heads_ratio=1 is not supported: it must be an int >= 2"),
    (dict(attention="sas", kernel_size=2), "kernel_size=2 is not supported: it must be an odd"),
    (dict(attention="sas", init="xavier"), "init='xavier'"),
    (dict(attention="sigmoid", impl="cuda"), "impl='cuda'"),
])
def test_bad_options_are_clear_errors(kwargs, match):
    model = tiny_gpt2()
    with pytest.raises(ValueError, match=match):
        attnswap.convert(model, example_inputs={"input_ids": ids()}, **kwargs)
    assert "forward" not in model.__dict__


def test_example_inputs_that_do_not_fit():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="the original GPT2LMHeadModel fails on these example_inputs"):
        attnswap.convert(model, "sigmoid", {"input_ids": torch.randn(2, 3, 4)})
    with pytest.raises(ValueError, match="cannot describe its own inputs"):
        attnswap.convert(NoAttention(), "sigmoid")


def test_hf_dummy_inputs_are_used_when_no_example_is_given():
    c = attnswap.convert(tiny_gpt2(), "sigmoid")
    assert len(c.attnswap_report.sites) == 2


# ------------------------------------------------------------------------------------------------
# the torch.compile backend


def test_backend_entry_point_without_import(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch\n"
        "import torch.nn.functional as F\n"
        "class M(torch.nn.Module):\n"
        "    def forward(self, q, k, v):\n"
        "        return F.scaled_dot_product_attention(q, k, v, is_causal=True)\n"
        "q = torch.randn(1, 2, 5, 8)\n"
        "m = torch.compile(M(), backend='attnswap', options={'attention': 'relu', 'activation': 'relu2'})\n"
        "out = m(q, q, q)\n"
        "import attnswap\n"
        "from attnswap.kernels.reference import attention_reference\n"
        "ref = attention_reference(q, q, q, kind='relu', activation='relu2', is_causal=True)\n"
        "assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()\n"
        "print(dict(attnswap.call_counts))\n"
    )
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "('relu', 'cpu'): 1" in r.stdout


def test_backend_refuses_sas_on_unconverted_model():
    m = tiny_gpt2()
    compiled = torch.compile(m, backend="attnswap", options={"attention": "sas"})
    with pytest.raises(Exception, match="attnswap.convert"):
        compiled(input_ids=ids())


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_aot_inner_compilers_keep_sas_parameters_trainable(inner):
    model = tiny_gpt2(layers=1)
    c = attnswap.convert(model, "sas", {"input_ids": ids()}, inner=inner)
    out = c(input_ids=ids()).logits
    torch.testing.assert_close(out, model(input_ids=ids()).logits, **TOL)
    out.square().mean().backward()
    sas = [(n, p) for n, p in c.named_parameters() if ".attnswap.0.sas." in n]
    assert sas and all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in sas)
