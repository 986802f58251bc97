"""The ``attnswap::attention`` op contract: opcheck, validation, dispatch, counters, compile, export."""

from __future__ import annotations

import math

import pytest
import torch

import attnswap
from attnswap.kernels import op as op_module
from attnswap.kernels.op import attention_op
from attnswap.kernels.params import encode_length
from attnswap.kernels.reference import attention_reference
from tolerances import assert_close

KINDS = ("softmax", "sigmoid", "relu")
DEFAULT_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
                 "test_aot_dispatch_dynamic")


def qkv(B=1, Hq=2, Hkv=2, Tq=5, Tk=6, D=4, Dv=4, dtype=torch.float32, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    ts = (torch.randn(B, Hq, Tq, D, generator=g), torch.randn(B, Hkv, Tk, D, generator=g),
          torch.randn(B, Hkv, Tk, Dv, generator=g))
    return tuple(t.to(dtype).requires_grad_(requires_grad) for t in ts)


def op_args(q, k, v, mask, kind, impl, *, is_causal=False, dropout_p=0.0, seed=None,
            sigmoid_bias=None, activation="relu", alpha=1.0, length=None):
    return (q, k, v, mask, kind, 1.0 / math.sqrt(q.shape[-1]), is_causal, dropout_p, seed,
            sigmoid_bias, activation, alpha, encode_length(length), False, impl)


# ----------------------------------------------------------------------------------------------
# opcheck


@pytest.mark.parametrize("impl", ["reference", "cpu"])
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(kind, impl):
    # No mask, MHA; then a float mask (requires grad, broadcast over heads) with GQA and causal.
    # The reference's AOT checks trace its whole recomputed backward (~3 s each on 2 cores):
    # run them on the second, richer case only.
    q, k, v = qkv(requires_grad=True)
    cheap = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(attention_op, op_args(q, k, v, None, kind, impl),
                          test_utils=cheap if impl == "reference" else DEFAULT_UTILS)
    q, k, v = qkv(Hq=4, Hkv=2, requires_grad=True, seed=1)
    mask = (0.5 * torch.randn(1, 1, 5, 6)).requires_grad_(True)
    extra = {"activation": "gelu", "length": "visible"} if kind == "relu" else {}
    torch.library.opcheck(attention_op, op_args(q, k, v, mask, kind, impl, is_causal=True,
                                                **extra))


@pytest.mark.parametrize("kind", KINDS)
def test_opcheck_bool_mask_and_dropout(kind):
    # The dropout seed is a tensor: the autograd formula must not read it (.item()) while
    # resolving the impl, or AOT tracing (fake seed) fails.
    q, k, v = qkv(Hq=4, Hkv=1, requires_grad=True, seed=2)
    mask = torch.rand(1, 4, 5, 6, generator=torch.Generator().manual_seed(0)) > 0.3
    args = op_args(q, k, v, mask, kind, "cpu", dropout_p=0.25, seed=torch.tensor(11))
    torch.library.opcheck(attention_op, args)


def test_compile_aot_eager_with_dropout_seed_from_generator():
    torch._dynamo.reset()
    q, k, v = qkv(requires_grad=True, seed=2)

    def f(q, k, v):  # no dropout_seed: drawn from torch's generator inside the graph
        return attnswap.attention(q, k, v, kind="sigmoid", dropout_p=0.2, impl="cpu")

    torch.manual_seed(5)
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    torch.manual_seed(5)
    eager = f(q, k, v)
    egrads = torch.autograd.grad(eager.sum(), (q, k, v))
    assert_close(out, eager)
    for a, b in zip(grads, egrads):
        assert_close(a, b)


# ----------------------------------------------------------------------------------------------
# validation: ValueError naming the argument


def _bad_calls():
    q, k, v = qkv()
    return [
        ("q", lambda: attnswap.attention(q[0], k, v)),
        ("k", lambda: attnswap.attention(q, k[0], v)),
        ("v", lambda: attnswap.attention(q, k, v.unsqueeze(0))),
        ("multiple of", lambda: attnswap.attention(*qkv(Hq=3, Hkv=2))),
        ("kind", lambda: attnswap.attention(q, k, v, kind="linear")),
        ("activation", lambda: attnswap.attention(q, k, v, kind="relu", activation="tanh")),
        ("impl", lambda: attnswap.attention(q, k, v, impl="cuda")),
        ("attn_mask", lambda: attnswap.attention(q, k, v, torch.zeros(5, 7))),
        ("attn_mask", lambda: attnswap.attention(q, k, v, torch.zeros(1, 3, 5, 6))),
        ("attn_mask", lambda: attnswap.attention(q, k, v, torch.zeros(5, 6, dtype=torch.int64))),
        ("attn_mask", lambda: attnswap.attention(q, k, v, torch.zeros(1, 1, 1, 5, 6))),
        ("dtype", lambda: attnswap.attention(q, k.double(), v)),
        ("length", lambda: attnswap.attention(q, k, v, kind="relu", length=0)),
        ("length", lambda: attnswap.attention(q, k, v, kind="relu", length="all")),
        ("length", lambda: attnswap.attention(q, k, v, kind="relu", length=2.5)),
        ("dropout_p", lambda: attnswap.attention(q, k, v, dropout_p=1.0)),
        ("dropout_p", lambda: attnswap.attention(q, k, v, dropout_p=-0.1)),
        ("scale", lambda: attnswap.attention(q, k, v, scale=float("nan"))),
        ("alpha", lambda: attnswap.attention(q, k, v, kind="relu", alpha=float("inf"))),
        ("sigmoid_bias", lambda: attnswap.attention(q, k, v, kind="sigmoid",
                                                    sigmoid_bias=float("inf"))),
    ]


@pytest.mark.parametrize("name,call", _bad_calls(), ids=[f"{i}-{n}" for i, (n, _) in
                                                         enumerate(_bad_calls())])
def test_validation_errors(name, call):
    with pytest.raises(ValueError, match=name):
        call()


def test_validation_messages_name_the_argument():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must have 4 dims"):
        attnswap.attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"q's heads \(3\).*k's and v's heads \(2\)"):
        attnswap.attention(*qkv(Hq=3, Hkv=2))
    with pytest.raises(ValueError, match=r"attn_mask must be bool .* or floating point"):
        attnswap.attention(q, k, v, torch.ones(5, 6, dtype=torch.int32))


# ----------------------------------------------------------------------------------------------
# dispatch and counters


def test_call_counts_and_auto_is_the_cpu_kernel_on_cpu_for_other_kinds():
    q, k, v = qkv(requires_grad=True)
    attnswap.reset_call_counts()
    attnswap.attention(q, k, v, kind="sigmoid", impl="cpu")
    attnswap.attention(q, k, v, kind="sigmoid", impl="cpu")
    out = attnswap.attention(q, k, v, kind="relu", impl="auto")
    out.sum().backward()  # the backward is not a forward execution
    attnswap.attention(q, k, v, kind="softmax", impl="reference")
    assert attnswap.call_counts[("sigmoid", "cpu")] == 2
    assert attnswap.call_counts[("relu", "cpu")] == 1
    assert attnswap.call_counts[("softmax", "reference")] == 1
    assert ("relu", "auto") not in attnswap.call_counts
    assert attnswap.total_calls() == 4 and attnswap.total_calls("sigmoid") == 2
    attnswap.reset_call_counts()
    assert attnswap.total_calls() == 0


FMIN = torch.finfo(torch.float32).min


@pytest.mark.parametrize("mask_case, expected", [
    ("none", "sdpa"), ("bool-with-empty-row", "sdpa"), ("float-additive", "sdpa"),
    ("float-neg-inf-row", "sdpa"), ("float-fill-only-row", "cpu"),
])
@pytest.mark.parametrize("path", ["eager", "op"])
def test_auto_softmax_runs_sdpa_unless_a_row_is_finite_fills_only(mask_case, expected, path):
    """``impl='auto'`` runs softmax on SDPA (the baseline), except where SDPA's backward is not
    exact: a float mask row of finite fills only (HF's padded query rows), whose log-sum-exp
    rounds back to ``finfo.min``. Outputs and gradients equal the reference either way; the
    traced op decides on the mask's dtype alone (it cannot read values in its traced backward)."""
    q, k, v = qkv(B=2, Hq=2, Hkv=2, Tq=5, Tk=5, D=8, Dv=8, requires_grad=True, seed=7)
    mask = None
    if mask_case == "bool-with-empty-row":
        mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
        mask[0, :, 1, :] = False
        mask[1, :, :, 3:] = False
    elif mask_case != "none":
        mask = torch.randn(2, 1, 5, 5, generator=torch.Generator().manual_seed(8))
        fill = {"float-additive": FMIN, "float-neg-inf-row": float("-inf"),
                "float-fill-only-row": FMIN}[mask_case]
        mask[1, :, :, 3:] = fill
        if mask_case != "float-additive":
            mask[0, :, 2, :] = fill
    if path == "op":
        expected = "cpu" if mask is not None and mask.dtype != torch.bool else "sdpa"
    go = torch.randn(2, 2, 5, 8, generator=torch.Generator().manual_seed(9))
    attnswap.reset_call_counts()
    if path == "eager":
        out = attnswap.attention(q, k, v, mask, kind="softmax", impl="auto")
    else:
        out = attention_op(*op_args(q, k, v, mask, "softmax", "auto"))
    grads = torch.autograd.grad(out, (q, k, v), go)
    assert dict(attnswap.call_counts) == {("softmax", expected): 1}
    ref = attention_reference(q, k, v, mask, kind="softmax")
    ref_grads = torch.autograd.grad(ref, (q, k, v), go)
    assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r)


def test_env_impl(monkeypatch):
    q, k, v = qkv()
    attnswap.reset_call_counts()
    monkeypatch.setenv("ATTNSWAP_IMPL", "reference")
    ref = attnswap.attention(q, k, v, kind="sigmoid")
    monkeypatch.setenv("ATTNSWAP_IMPL", "cpu")
    out = attnswap.attention(q, k, v, kind="sigmoid")
    out2 = attnswap.attention(q, k, v, kind="sigmoid", impl="reference")  # explicit impl wins
    assert attnswap.call_counts[("sigmoid", "reference")] == 2
    assert attnswap.call_counts[("sigmoid", "cpu")] == 1
    assert_close(out, ref)
    assert torch.equal(out2, ref)
    monkeypatch.setenv("ATTNSWAP_IMPL", "bogus")
    with pytest.raises(ValueError, match="impl"):
        attnswap.attention(q, k, v)


def test_impl_sdpa_softmax_only():
    q, k, v = qkv()
    out = attnswap.attention(q, k, v, impl="sdpa", is_causal=True)
    assert_close(out, attention_reference(q, k, v, is_causal=True))
    with pytest.raises(ValueError, match="impl='sdpa'"):
        attnswap.attention(q, k, v, kind="sigmoid", impl="sdpa")


def test_dropout_seed_from_global_generator():
    q, k, v = qkv()
    torch.manual_seed(0)
    a = attnswap.attention(q, k, v, kind="sigmoid", dropout_p=0.5, impl="cpu")
    torch.manual_seed(0)
    b = attnswap.attention(q, k, v, kind="sigmoid", dropout_p=0.5, impl="cpu")
    assert torch.equal(a, b)
    c = attnswap.attention(q, k, v, kind="sigmoid", dropout_p=0.5, impl="cpu", dropout_seed=3)
    d = attnswap.attention(q, k, v, kind="sigmoid", dropout_p=0.5, impl="cpu",
                           dropout_seed=torch.tensor(3))
    assert torch.equal(c, d)


# ----------------------------------------------------------------------------------------------
# torch.compile and torch.export


class Attn(torch.nn.Module):
    def __init__(self, kind, impl="cpu"):
        super().__init__()
        self.kind, self.impl = kind, impl
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, q, k, v, mask):
        out = attnswap.attention(q, k, v, mask, kind=self.kind, is_causal=True, impl=self.impl)
        return self.proj(out)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph(kind, backend):
    torch._dynamo.reset()
    mod = Attn(kind)
    q, k, v = qkv(Hq=4, Hkv=2, requires_grad=True, seed=3)
    mask = (0.3 * torch.randn(1, 1, 5, 6)).requires_grad_(True)
    ins = (q, k, v, mask)
    eager = mod(*ins)
    geager = torch.autograd.grad(eager.sum(), ins)
    compiled = torch.compile(mod, backend=backend, fullgraph=True)
    attnswap.reset_call_counts()
    out = compiled(*ins)
    gout = torch.autograd.grad(out.sum(), ins)
    assert attnswap.call_counts[(kind, "cpu")] == 1
    assert_close(out, eager)
    for a, b in zip(gout, geager):
        assert_close(a, b)


def test_export_keeps_one_node():
    mod = Attn("sigmoid").eval()
    q, k, v = qkv(Hq=4, Hkv=2, seed=4)
    mask = torch.zeros(1, 1, 5, 6)
    ep = torch.export.export(mod, (q, k, v, mask))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    ours = [t for t in targets if "attnswap" in str(t)]
    assert ours == [torch.ops.attnswap.attention.default]
    assert_close(ep.module()(q, k, v, mask), mod(q, k, v, mask))


def test_backward_op_registered_and_fake():
    # The backward is itself an opaque op with a fake implementation (shapes only).
    q, k, v = qkv(Hq=4, Hkv=2, seed=5)
    mask = torch.zeros(1, 1, 5, 6)
    out = attnswap.attention(q, k, v, mask, kind="relu", impl="cpu")
    args = (torch.ones_like(out), q, k, v, mask, out) + op_args(
        q, k, v, mask, "relu", "cpu")[4:] + (True,)
    dq, dk, dv, dmask = op_module.attention_backward_op(*args)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert dmask.shape == mask.shape
    torch.library.opcheck(op_module.attention_backward_op, args,
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------------------------
# eager calls run the op's kernels without the dispatcher; traced calls keep the op node


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["plain", "float-mask-grad", "gqa-causal", "dropout"])
def test_eager_path_equals_the_dispatched_op_bitwise(kind, case):
    """``attention()`` outside any trace skips the custom op's dispatch (for speed): its
    outputs and gradients must be exactly the op's, and it is counted the same."""
    Hkv = 1 if case == "gqa-causal" else 2
    q, k, v = qkv(B=2, Hq=2, Hkv=Hkv, Tq=7, Tk=7, D=8, Dv=8, requires_grad=True, seed=3)
    mask = None
    if case == "float-mask-grad":
        mask = torch.randn(2, 1, 7, 7, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    kw = dict(is_causal=case == "gqa-causal", dropout_p=0.25 if case == "dropout" else 0.0,
              seed=torch.tensor(123) if case == "dropout" else None)
    leaves = [t for t in (q, k, v, mask) if t is not None]
    go = torch.randn(2, 2, 7, 8, generator=torch.Generator().manual_seed(5))

    attnswap.reset_call_counts()
    out = attnswap.attention(q, k, v, mask, kind=kind, impl="cpu", is_causal=kw["is_causal"],
                             dropout_p=kw["dropout_p"], dropout_seed=kw["seed"])
    grads = torch.autograd.grad(out, leaves, go)
    assert attnswap.call_counts[(kind, "cpu")] == 1
    assert out.grad_fn is not None and "EagerAttention" in type(out.grad_fn).__name__

    ref = attention_op(*op_args(q, k, v, mask, kind, "cpu", **kw))
    ref_grads = torch.autograd.grad(ref, leaves, go)
    assert "EagerAttention" not in type(ref.grad_fn).__name__
    assert torch.equal(out, ref)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)


def test_traced_calls_keep_the_op_node():
    """Under dynamo / make_fx the call must stay one ``attnswap::attention`` node (export, ONNX
    and AOT compilers key on it)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    q, k, v = qkv(D=8, Dv=8)
    gm = make_fx(lambda a, b, c: attnswap.attention(a, b, c, kind="sigmoid", impl="cpu"))(q, k, v)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.attnswap.attention.default in targets

    seen = []

    def backend(gm, example_inputs):
        seen.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    f = torch.compile(lambda a, b, c: attnswap.attention(a, b, c, kind="relu", impl="cpu"),
                      backend=backend, fullgraph=True)
    torch.testing.assert_close(f(q, k, v), attnswap.attention(q, k, v, kind="relu", impl="cpu"))
    assert any("attnswap" in str(t) for t in seen), seen
