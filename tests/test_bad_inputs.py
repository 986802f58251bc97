"""Bad input, as careless users give it, through every door: ``convert()``, the ``attnswap``
backend's ``options=``, the op ``attnswap.attention`` and the command line.

Each case asserts the exception type, that the one-line message names the argument (and the
value, where it has one), and that the user's model is bitwise as it was: parameters, buffers,
train/eval flags and every module's attributes. CLI cases assert exit status 2 and exactly one
line on stderr.
"""

from __future__ import annotations

import re
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnswap
from attnswap.options import AttnswapOptionError, show
from attnswap.rewriter.backend import BackendOptionError


# ----------------------------------------------------------------------------------------------
# a model with one attention site, in the shape timm's Attention writes it


class Attention(nn.Module):
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (C // self.heads) ** -0.5
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
        return self.proj(x)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.attn = Attention()
        self.bn = nn.BatchNorm1d(5)  # running statistics a careless restore would not bring back

    def forward(self, x):
        return self.bn(x + self.attn(self.norm(x)))


def make_model():
    torch.manual_seed(0)
    m = Block()
    m.train()
    m.norm.eval()  # a mixed train/eval state must survive too
    return m


X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))


def fingerprint(model: nn.Module):
    tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    flags = {n: m.training for n, m in model.named_modules()}
    # torch.compile(model) itself marks the module it wraps (_is_torch_compile), with any backend.
    attrs = {n: sorted(set(m.__dict__) - {"_is_torch_compile"}) for n, m in model.named_modules()}
    versions = {k: v._version for k, v in model.state_dict(keep_vars=True).items()}
    return tensors, flags, attrs, versions


def assert_unchanged(model, before):
    tensors, flags, attrs, _ = fingerprint(model)
    assert tensors.keys() == before[0].keys()
    for k in tensors:
        assert torch.equal(tensors[k], before[0][k]), f"{k} changed"
    assert flags == before[1]
    assert attrs == before[2]


def assert_one_line_naming(message: str, *words):
    assert "\n" not in message.strip(), message
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"


# ----------------------------------------------------------------------------------------------
# convert(): (kwargs, argument named, words the message must hold)

CONVERT = [
    # the kind
    (dict(attention="cosine"), "attention", ["'cosine'", "'sigmoid'"]),
    (dict(attention="Sigmoid"), "attention", ["did you mean 'sigmoid'"]),
    (dict(attention=None), "attention", ["None"]),
    (dict(attention=3), "attention", ["3"]),
    (dict(attention=["relu"]), "attention", ["['relu']"]),
    # options of another kind, or of none
    (dict(attention="sigmoid", alpha=1.0), "alpha", ["attention='relu'"]),
    (dict(attention="relu", sigmoid_bias=-2.0), "sigmoid_bias", ["attention='sigmoid'"]),
    (dict(attention="softmax", heads_ratio=2), "heads_ratio", ["attention='sas'"]),
    (dict(attention="relu", activaton="relu2"), "activaton", ["spelling"]),
    # sigmoid
    (dict(attention="sigmoid", sigmoid_bias="auto"), "sigmoid_bias", ["'auto'", "None"]),
    (dict(attention="sigmoid", sigmoid_bias=True), "sigmoid_bias", ["True"]),
    (dict(attention="sigmoid", sigmoid_bias=float("inf")), "sigmoid_bias", ["inf"]),
    (dict(attention="sigmoid", sigmoid_bias=float("nan")), "sigmoid_bias", ["nan"]),
    (dict(attention="sigmoid", sigmoid_bias=torch.tensor(-2.0)), "sigmoid_bias", ["tensor(", ".item()"]),
    (dict(attention="sigmoid", fast_sigmoid="no"), "fast_sigmoid", ["'no'", "True or False"]),
    (dict(attention="sigmoid", fast_sigmoid=1), "fast_sigmoid", ["=1 "]),
    (dict(attention="sigmoid", fast_sigmoid=None), "fast_sigmoid", ["None"]),
    # relu
    (dict(attention="relu", activation="tanh"), "activation", ["'tanh'", "'relu2'"]),
    (dict(attention="relu", activation=None), "activation", ["None"]),
    (dict(attention="relu", activation=F.relu), "activation", ["function"]),
    (dict(attention="relu", alpha=True), "alpha", ["True"]),
    (dict(attention="relu", alpha="1"), "alpha", ["'1'"]),
    (dict(attention="relu", alpha=-0.5), "alpha", ["-0.5", ">= 0"]),
    (dict(attention="relu", alpha=float("nan")), "alpha", ["nan"]),
    (dict(attention="relu", length="all"), "length", ["'all'", "'visible'"]),
    (dict(attention="relu", length=0), "length", ["=0 ", "positive"]),
    (dict(attention="relu", length=-3), "length", ["-3"]),
    (dict(attention="relu", length=True), "length", ["True"]),
    (dict(attention="relu", length=64.0), "length", ["64.0"]),
    # sas
    (dict(attention="sas", heads_ratio=1), "heads_ratio", [">= 2"]),
    (dict(attention="sas", heads_ratio=2.0), "heads_ratio", ["2.0"]),
    (dict(attention="sas", heads_ratio=True), "heads_ratio", ["True"]),
    (dict(attention="sas", dim=0), "dim", ["=0 "]),
    (dict(attention="sas", dim=12.5), "dim", ["12.5"]),
    (dict(attention="sas", kernel_size=2), "kernel_size", ["odd"]),
    (dict(attention="sas", kernel_size=0), "kernel_size", ["odd"]),
    (dict(attention="sas", kernel_size=True), "kernel_size", ["True"]),
    (dict(attention="sas", init="xavier"), "init", ["'identity'", "'random'"]),
    # every kind
    (dict(attention="sigmoid", qk_norm="l2"), "qk_norm", ["'layernorm'", "'rmsnorm'"]),
    (dict(attention="sigmoid", qk_norm=1), "qk_norm", ["=1 "]),
    (dict(attention="relu", qk_norm="yes"), "qk_norm", ["'yes'"]),
    (dict(attention="sigmoid", impl="cuda"), "impl", ["'cuda'", "'triton'"]),
    (dict(attention="sigmoid", impl="sdpa"), "impl", ["softmax only"]),
    (dict(attention="relu", impl="sdpa"), "impl", ["softmax only"]),
    (dict(attention="relu", impl=1), "impl", ["=1 "]),
    # selection
    (dict(attention="sigmoid", include=5), "include", ["=5 "]),
    (dict(attention="sigmoid", include=""), "include", ["non-empty"]),
    (dict(attention="sigmoid", include=["attn", ""]), "include", ["non-empty"]),
    (dict(attention="sigmoid", include=[3]), "include", ["[3]"]),
    (dict(attention="sigmoid", exclude=object), "exclude", ["class"]),
    # convert()'s own arguments
    (dict(attention="sigmoid", inplace="yes"), "inplace", ["'yes'"]),
    (dict(attention="sigmoid", inplace=None), "inplace", ["None"]),
    (dict(attention="sigmoid", strict="no"), "strict", ["'no'"]),
    (dict(attention="sigmoid", strict=1), "strict", ["=1 "]),
    (dict(attention="sigmoid", dynamic="yes"), "dynamic", ["'yes'", "None"]),
    (dict(attention="sigmoid", dynamic=0), "dynamic", ["=0 "]),
    (dict(attention="sigmoid", inner="nope"), "inner", ["'nope'", "list_backends"]),
    (dict(attention="sigmoid", inner=5), "inner", ["=5 "]),
    (dict(attention="sigmoid", inner="attnswap"), "inner", ["its own"]),
    # example inputs
    (dict(attention="sigmoid", example_inputs=(X, X)), "example_inputs", ["forward(x)", "too many"]),
    (dict(attention="sigmoid", example_inputs={"y": X}), "example_inputs", ["'y'"]),
]


def _id(case):
    kwargs, name, _ = case
    return "-".join(f"{k}={show(v)}"[:40] for k, v in kwargs.items())


@pytest.mark.parametrize("kwargs,name,words", CONVERT, ids=[_id(c) for c in CONVERT])
def test_convert_bad_argument(kwargs, name, words):
    model = make_model()
    before = fingerprint(model)
    kwargs = dict(kwargs)
    example = kwargs.pop("example_inputs", X)
    with pytest.raises(AttnswapOptionError) as e:
        attnswap.convert(model, example_inputs=example, **kwargs)
    assert e.value.name == name
    assert_one_line_naming(str(e.value), f"{name}=", *words)
    assert_unchanged(model, before)
    assert attnswap.report_of(model) is None


def test_convert_bad_argument_with_inplace_leaves_the_model_as_it_was():
    model = make_model()
    before = fingerprint(model)
    with pytest.raises(AttnswapOptionError, match="alpha=-1"):
        attnswap.convert(model, "relu", X, inplace=True, alpha=-1)
    assert_unchanged(model, before)


def test_not_a_module():
    with pytest.raises(AttnswapOptionError, match="model=<class .*Block'> is not supported: it must "
                       "be a torch.nn.Module"):
        attnswap.convert(Block, "sigmoid", X)
    with pytest.raises(AttnswapOptionError, match="model=None"):
        attnswap.convert(None, "sigmoid", X)


def test_example_inputs_of_the_wrong_type():
    model = make_model()
    before = fingerprint(model)
    with pytest.raises(ValueError, match="example_inputs must be a tensor, a tuple/list"):
        attnswap.convert(model, "sigmoid", 5)
    assert_unchanged(model, before)


def test_inputs_the_forward_rejects_name_the_forward_not_the_inputs_type():
    model = make_model()
    before = fingerprint(model)
    with pytest.raises(ValueError) as e:
        attnswap.convert(model, "sigmoid", torch.randn(2, 5, 7))
    msg = str(e.value)
    assert_one_line_naming(msg, "the original Block fails on these example_inputs",
                           "before any conversion", "RuntimeError", "attnswap did not change")
    assert_unchanged(model, before)


class RaisingForward(Block):
    def forward(self, x):
        y = self.attn(x)
        raise KeyError("the model's own bug")


def test_a_forward_that_raises_is_reported_as_the_models_failure():
    model = RaisingForward()
    before = fingerprint(model)
    with pytest.raises(ValueError) as e:
        attnswap.convert(model, "sigmoid", X)
    assert_one_line_naming(str(e.value), "the original RaisingForward fails", "KeyError",
                           "the model's own bug", "test_bad_inputs.py:")
    assert_unchanged(model, before)


def test_already_converted():
    model = attnswap.convert(make_model(), "sigmoid", X)
    with pytest.raises(ValueError, match="already converted.*unconvert"):
        attnswap.convert(model, "relu", X)


class CachesGraph(Block):
    """Holds a non-leaf tensor from its last forward, as eval-time caches do (timm LeViT)."""

    def forward(self, x):
        out = super().forward(x)
        self.last = out * 2
        return out


def test_a_model_that_cannot_be_copied_says_to_convert_in_place():
    model = CachesGraph()
    model(X)  # self.last now holds an autograd graph: deepcopy refuses it
    with pytest.raises(AttnswapOptionError) as e:
        attnswap.convert(model, "sigmoid", X)
    assert e.value.name == "inplace"
    assert_one_line_naming(str(e.value), "inplace=False", "cannot be deep-copied", "inplace=True")
    converted = attnswap.convert(model, "sigmoid", X, inplace=True)
    assert len(converted.attnswap_report.sites) == 1


def test_globs_that_select_nothing_say_so(recwarn):
    for kw, words in ((dict(include="nothing.*"), "include=['nothing.*']"),
                      (dict(exclude="*"), "exclude=['*']")):
        model = make_model()
        before = fingerprint(model)
        with pytest.warns(attnswap.AttentionSwapWarning) as w:
            out = attnswap.convert(model, "sigmoid", X, **kw)
        msg = " ".join(str(x.message) for x in w)
        assert "every attention site was deselected" in msg and words in msg
        assert "no softmax attention found" not in msg
        assert not out.attnswap_report.sites
        assert_unchanged(model, before)


def test_dynamo_disabled_is_reported_as_such(monkeypatch):
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    model = make_model()
    before = fingerprint(model)
    with pytest.warns(attnswap.AttentionSwapWarning) as w:
        out = attnswap.convert(model, "sigmoid", X)
    msgs = [str(x.message) for x in w]
    assert any("dynamo is disabled" in m for m in msgs), msgs
    assert not any("no softmax attention found" in m or "graph break" in m for m in msgs), msgs
    assert not out.attnswap_report.sites
    assert any("dynamo is disabled" in s.reason for s in out.attnswap_report.skipped)
    with pytest.raises(attnswap.AttnswapError, match="dynamo is disabled.*strict=True"):
        attnswap.convert(model, "sigmoid", X, strict=True)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------------------------
# the backend: torch.compile(model, backend="attnswap", options=...)

BACKEND = [
    ({"attention": "cosine"}, "attention", ["'cosine'"]),
    ({"attention": "sas"}, "attention", ["attnswap.convert"]),
    ({"attention": "sigmoid", "qk_norm": True}, "attention", ["qk_norm", "attnswap.convert"]),
    ({"attention": "sigmoid", "alpha": True}, "alpha", ["attention='relu'"]),
    ({"attention": "relu", "alpha": True}, "alpha", ["True"]),
    ({"attention": "relu", "activation": "tanh"}, "activation", ["'tanh'"]),
    ({"attention": "sigmoid", "fast_sigmoid": "no"}, "fast_sigmoid", ["'no'"]),
    ({"attention": "sigmoid", "impl": "sdpa"}, "impl", ["softmax only"]),
    ({"attention": "sigmoid", "inner": "nope"}, "inner", ["'nope'"]),
    ({"attention": "sigmoid", "include": 5}, "include", ["=5 "]),
    ({"attention": "sigmoid", "exclude": [""]}, "exclude", ["non-empty"]),
    ({"attention": "relu", "length": "all"}, "length", ["'all'"]),
]


@pytest.mark.parametrize("options,name,words", BACKEND, ids=[str(o)[:40] for o, _, _ in BACKEND])
def test_backend_bad_option_is_one_line_not_a_BackendCompilerFailed(options, name, words):
    torch._dynamo.reset()
    model = make_model()
    before = fingerprint(model)
    with pytest.raises(BackendOptionError) as e:
        torch.compile(model, backend="attnswap", options=options)(X)
    assert isinstance(e.value, AttnswapOptionError) and isinstance(e.value, ValueError)
    assert e.value.name == name
    # Dynamo appends its own "Set TORCHDYNAMO_VERBOSE=1 ..." paragraph; ours is the first line.
    first, *rest = str(e.value).splitlines()
    assert first.startswith(f"torch.compile(backend='attnswap'): {name}="), first
    assert_one_line_naming(first, *words)
    assert all(not line.strip() or "TORCHDYNAMO_VERBOSE" in line for line in rest), rest
    assert "BackendCompilerFailed" not in str(e.value)
    assert_unchanged(model, before)


def test_backend_options_that_are_not_a_dict():
    torch._dynamo.reset()
    with pytest.raises(BackendOptionError, match="options='sigmoid' is not supported: it must be a dict"):
        torch.compile(make_model(), backend="attnswap", options="sigmoid")(X)


def test_backend_glob_that_matches_nothing_warns():
    torch._dynamo.reset()
    model = make_model()
    with pytest.warns(attnswap.AttentionSwapWarning, match=r"nothing converted in graph 1.*"
                      r"include=\['nothing\.\*'\].*deselect every site"):
        torch.compile(model, backend="attnswap",
                      options={"attention": "sigmoid", "include": "nothing.*"})(X)


# ----------------------------------------------------------------------------------------------
# the op: attnswap.attention(q, k, v, ...)

Q = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(1))
K = torch.randn(1, 2, 6, 8, generator=torch.Generator().manual_seed(2))

OP = [
    (dict(kind="cosine"), "kind", ["'cosine'"]),
    (dict(kind="sas"), "kind", ["attnswap.convert"]),
    (dict(kind="SOFTMAX"), "kind", ["did you mean 'softmax'"]),
    (dict(scale=0.0), "scale", ["non-zero", "1/sqrt(head_dim)"]),
    (dict(scale=float("nan")), "scale", ["nan"]),
    (dict(scale="0.125"), "scale", ["'0.125'"]),
    (dict(scale=True), "scale", ["True"]),
    (dict(scale=torch.tensor(0.125)), "scale", [".item()"]),
    (dict(is_causal="no"), "is_causal", ["'no'", "True or False"]),
    (dict(is_causal=1), "is_causal", ["=1 "]),
    (dict(is_causal=None), "is_causal", ["None"]),
    (dict(dropout_p=1.0), "dropout_p", ["[0, 1)"]),
    (dict(dropout_p=-0.1), "dropout_p", ["-0.1"]),
    (dict(dropout_p="0.1"), "dropout_p", ["'0.1'"]),
    (dict(dropout_p=0.1, dropout_seed="x"), "dropout_seed", ["'x'"]),
    (dict(dropout_p=0.1, dropout_seed=torch.tensor([1.5])), "dropout_seed", ["float32"]),
    (dict(kind="sigmoid", sigmoid_bias="auto"), "sigmoid_bias", ["'auto'"]),
    (dict(kind="sigmoid", sigmoid_bias=float("-inf")), "sigmoid_bias", ["-inf"]),
    (dict(kind="sigmoid", fast_sigmoid="no"), "fast_sigmoid", ["'no'"]),
    (dict(kind="relu", alpha="x"), "alpha", ["'x'"]),
    (dict(kind="relu", alpha=-1.0), "alpha", [">= 0"]),
    (dict(kind="relu", activation="tanh"), "activation", ["'tanh'"]),
    (dict(kind="relu", length="all"), "length", ["'all'"]),
    (dict(kind="relu", length=0), "length", ["positive"]),
    (dict(impl="gpu"), "impl", ["'gpu'"]),
    (dict(kind="sigmoid", impl="sdpa"), "impl", ["softmax only"]),
    (dict(impl="sdpa", dropout_p=0.1), "impl", ["dropout"]),
    (dict(impl="triton"), "impl", ["TRITON_INTERPRET=1"]),
]


@pytest.mark.parametrize("kwargs,name,words", OP, ids=[str(k)[:40] for k, _, _ in OP])
def test_op_bad_argument(kwargs, name, words, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k = Q.clone(), K.clone()
    with pytest.raises(AttnswapOptionError) as e:
        attnswap.attention(q, k, k, **kwargs)
    assert e.value.name == name
    assert_one_line_naming(str(e.value), f"{name}=", *words)
    assert torch.equal(q, Q) and torch.equal(k, K)


OP_TENSORS = [
    (dict(q=Q[0]), "q must have 4 dims"),
    (dict(q=Q.double()), "share one dtype"),
    (dict(q=Q.long()), "floating point"),
    (dict(q="q"), "must be a torch.Tensor"),
    (dict(k=torch.randn(1, 3, 6, 8)), "multiple of k's and v's heads"),
    (dict(k=torch.randn(1, 2, 6, 4)), "head dim"),
    (dict(attn_mask=torch.ones(6, 6, dtype=torch.long)), "attn_mask must be bool"),
    (dict(attn_mask=torch.ones(2, 6, 6, dtype=torch.bool)), "does not broadcast"),
    (dict(attn_mask="causal"), "attn_mask must be a tensor or None"),
]


@pytest.mark.parametrize("tensors,match", OP_TENSORS, ids=[m for _, m in OP_TENSORS])
def test_op_bad_tensor(tensors, match):
    args = {"q": Q, "k": K, "attn_mask": None, **tensors}
    v = args["k"] if isinstance(args["k"], torch.Tensor) else K
    with pytest.raises(ValueError, match=re.escape(match)):
        attnswap.attention(args["q"], args["k"], v, args["attn_mask"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA tensors")
def test_op_cpu_kernel_on_cuda_tensors():
    q = Q.cuda()
    with pytest.raises(AttnswapOptionError, match="impl='cpu'.*cannot run on cuda"):
        attnswap.attention(q, q, q, impl="cpu")


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "relu"])
@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_op_zero_keys_gives_zeros_not_a_crash(kind, impl):
    """No keys: every output row is a sum over nothing (sigmoid's -ln(Tk) must not be asked)."""
    q = torch.randn(1, 2, 3, 8, requires_grad=True)
    k = torch.randn(1, 2, 0, 8, requires_grad=True)
    out = attnswap.attention(q, k, k, kind=kind, impl=impl)
    out.sum().backward()
    assert out.shape == (1, 2, 3, 8) and torch.equal(out, torch.zeros_like(out))
    assert torch.equal(q.grad, torch.zeros_like(q))


# ----------------------------------------------------------------------------------------------
# F.multi_head_attention_forward as user code calls it: `training` left at its default


class FunctionalMHA(nn.Module):
    def __init__(self, E=16, H=2):
        super().__init__()
        self.E, self.H = E, H
        self.in_proj = nn.Linear(E, 3 * E)
        self.out_proj = nn.Linear(E, E)

    def forward(self, x):  # [T, B, E]
        out, _ = F.multi_head_attention_forward(
            x, x, x, self.E, self.H, self.in_proj.weight, self.in_proj.bias, None, None, False,
            0.0, self.out_proj.weight, self.out_proj.bias, need_weights=False)
        return out


def test_functional_mha_without_training_argument_converts_exactly():
    torch.manual_seed(0)
    model = FunctionalMHA().eval()
    x = torch.randn(5, 2, 16)
    ref = model(x)
    conv = attnswap.convert(model, "softmax", x)
    assert len(conv.attnswap_report.sites) == 1
    torch.testing.assert_close(conv(x), ref, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# the command line, in process: exit status 2 and one line on stderr

FACTORIES = textwrap.dedent('''
    import torch, torch.nn as nn

    def needs_arg(width):
        return nn.Linear(width, width)

    def raises():
        raise RuntimeError("factory exploded")

    def not_a_model():
        return 42

    def no_attention():
        return nn.Linear(4, 4), torch.randn(2, 4)
''')


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    root = tmp_path_factory.mktemp("factories")
    (root / "attnswap_bad_factories.py").write_text(FACTORIES)
    sys.path.insert(0, str(root))
    yield "attnswap_bad_factories"
    sys.path.remove(str(root))


def _cli(argv, capsys):
    from attnswap.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main([str(a) for a in argv])
    return code, capsys.readouterr()


CLI = [
    (["convert", "{f}:needs_arg", "--attention", "sigmoid", "--out", "{out}"], "needs_arg", "no arguments"),
    (["convert", "{f}:raises", "--attention", "sigmoid", "--out", "{out}"], "factory exploded", "raised"),
    (["inspect", "{f}:not_a_model"], "not a torch.nn.Module", "int"),
    (["inspect", "{f}:missing"], "no attribute", "missing"),
    (["inspect", "no_such_module_xyz:make"], "cannot import module", "no_such_module_xyz"),
    (["inspect", "hf:no-such-model"], "unknown model", "hf:no-such-model"),
    (["convert", "{f}:no_attention", "--attention", "sigmoid", "--out", "{out}"], "nothing converted",
     "nothing saved"),
    (["convert", "torch:transformer-encoder", "--attention", "sigmoid", "--out", "{file}"],
     "is an existing file", "--out"),
    (["convert", "torch:transformer-encoder", "--attention", "sigmoid", "--out", "/proc/attnswap/x"],
     "cannot be created", "--out"),
    (["convert", "torch:transformer-encoder", "--attention", "cosine", "--out", "{out}"],
     "unknown attention kind", "cosine"),
    (["convert", "torch:transformer-encoder", "--attention", "relu", "--option", "alpha", "--out",
      "{out}"], "not key=value", "alpha"),
    (["convert", "torch:transformer-encoder", "--attention", "relu", "--option", "alpha=x", "--out",
      "{out}"], "alpha='x'", "finite number"),
    (["convert", "torch:transformer-encoder", "--attention", "sigmoid", "--option", "alpha=1",
      "--out", "{out}"], "takes no option 'alpha'", "sigmoid"),
    (["convert", "torch:transformer-encoder", "--attention", "sigmoid", "--option",
      "fast_sigmoid=maybe", "--out", "{out}"], "fast_sigmoid='maybe'", "True or False"),
    (["zoo", "--reps", "0"], "--reps", "integer >= 1"),
    (["zoo", "--models", "nope"], "unknown model", "nope"),
    (["zoo", "--attention", "softmax", "--models", "torch:transformer-encoder"], "unknown attention kind",
     "softmax"),
    (["train", "--steps", "0"], "--steps", ">= 1"),
    (["train", "--steps", "two"], "--steps", "not an integer"),
    (["train", "--lr", "-1", "--steps", "1"], "--lr", "> 0"),
    (["train", "--batch-size", "0", "--steps", "1"], "--batch-size", ">= 1"),
    (["train", "--attention", "softmax", "linear", "--steps", "1"], "unknown attention kind", "linear"),
    (["train", "--option", "heads_ratio=1", "--attention", "sas", "--steps", "1"], "heads_ratio=1", ">= 2"),
    (["train", "--out", "{file}", "--steps", "1", "--attention", "softmax"], "is an existing file", "--out"),
    (["study", "--study", "kinds", "--steps", "0"], "--steps", ">= 1"),
    (["study", "--study", "nope"], "--study", "nope"),
    (["study", "--study", "kinds", "--threads", "0"], "--threads", ">= 1"),
]


@pytest.mark.parametrize("argv,w1,w2", CLI, ids=[" ".join(a[:4]) for a, _, _ in CLI])
def test_cli_bad_input_exits_2_with_one_line(argv, w1, w2, factories, tmp_path, capsys):
    afile = tmp_path / "a_file"
    afile.write_text("")
    out = tmp_path / "out"
    argv = [a.format(f=factories, out=out, file=afile) for a in argv]
    code, cap = _cli(argv, capsys)
    lines = cap.err.strip().splitlines()
    assert code == 2, cap.err
    assert len(lines) == 1, cap.err
    assert lines[0].startswith("attnswap: error:")
    assert w1 in lines[0] and w2 in lines[0], lines[0]
    assert not (out / "model.pt").exists()



# ----------------------------------------------------------------------------------------------
# the other entry points of the API


@pytest.mark.parametrize("call,name,words", [
    (lambda: attnswap.report_of(5), "model", ["=5 ", "nn.Module"]),
    (lambda: attnswap.from_pretrained(5), "path", ["=5 ", "save_pretrained"]),
    (lambda: attnswap.from_pretrained("/no/such/attnswap/dir"), "path", ["no such directory"]),
    (lambda: attnswap.from_pretrained("./no_such_attnswap_dir"), "path", ["no such directory"]),
], ids=["report_of-int", "from_pretrained-int", "from_pretrained-abs", "from_pretrained-rel"])
def test_api_entry_points_bad_argument(call, name, words):
    pytest.importorskip("transformers")
    with pytest.raises(AttnswapOptionError) as e:
        call()
    assert e.value.name == name
    assert_one_line_naming(str(e.value), f"{name}=", *words)


def test_unconvert_of_a_model_that_is_not_converted():
    model = make_model()
    before = fingerprint(model)
    with pytest.raises(ValueError, match="Block is not a model returned by attnswap.convert"):
        attnswap.unconvert(model)
    assert_unchanged(model, before)
