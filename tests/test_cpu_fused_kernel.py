"""The fused C++ CPU kernel (``kernels/cpu_fused``) against the plain-math oracle.

Every case runs ``attnswap.attention(..., impl="cpu")`` forward and backward, asserts from
``cpu_fused.path_counts`` that the fused kernel (not the tiled one) computed both passes, and
compares with autograd through ``attention_reference``. Tiles are made small (``ATTNSWAP_CPU_BLOCK``)
so that every case has partial, diagonal and skipped tiles; one case runs the default tiles.
The calls the fused kernel does not take are checked to run the tiled kernel *and say so*.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import attnswap
from attnswap.kernels import cpu, cpu_fused
from attnswap.kernels.reference import ACTIVATIONS, attention_reference
from tolerances import assert_close

FLOAT_MIN = torch.finfo(torch.float32).min


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setenv(cpu.ENV_BLOCK, "8,16")
    monkeypatch.delenv(cpu_fused.ENV_FUSED, raising=False)
    cpu_fused.path_counts.clear()


def make_qkv(B, Hq, Hkv, Tq, Tk, D, Dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, generator=g)
    k = torch.randn(B, Hkv, Tk, D, generator=g)
    v = torch.randn(B, Hkv, Tk, Dv, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def make_mask(kind, B, Hq, Tq, Tk, seed=1):
    """The masks real models pass: HF's padding and causal masks, per-head biases, 2-d masks."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, Hq, Tq, Tk, generator=g) > 0.3
    if kind == "none":
        return None
    if kind == "bool":
        return keep[:, :1]
    if kind == "bool_2d":
        return keep[0, 0]
    if kind == "float_bias":  # an ALiBi/T5-like bias with hidden entries (per head)
        return (0.5 * torch.randn(B, Hq, Tq, Tk, generator=g)).masked_fill(~keep, float("-inf"))
    if kind == "hf_padding":  # [B, 1, 1, Tk] finfo.min on the padded keys
        m = torch.zeros(B, 1, 1, Tk)
        m[0, ..., Tk - Tk // 3:] = FLOAT_MIN
        return m
    if kind == "hf_causal_padding":  # [B, 1, Tq, Tk]: causal plus left padding, as HF builds it
        vis = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq).expand(B, 1, Tq, Tk).clone()
        vis[-1, ..., : Tk // 4] = False
        return torch.zeros(B, 1, Tq, Tk).masked_fill(~vis, FLOAT_MIN)
    raise AssertionError(kind)


def run_both(q, k, v, mask, **kw):
    ins = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = attnswap.attention(*ins, mask, impl="cpu", **kw)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype)
    grads = torch.autograd.grad(out, ins, go)
    rin = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    ref = attention_reference(*rin, mask, **kw)
    rgrads = torch.autograd.grad(ref, rin, go.float())
    return out, grads, ref, rgrads


def check(q, k, v, mask, **kw):
    before = dict(cpu_fused.path_counts)
    out, grads, ref, rgrads = run_both(q, k, v, mask, **kw)
    ran = {key: n - before.get(key, 0) for key, n in cpu_fused.path_counts.items()}
    assert ran.get(("forward", "fused")) == 1 and ran.get(("backward", "fused")) == 1, ran
    assert out.dtype == q.dtype and out.shape == ref.shape
    assert_close(out, ref, dtype=q.dtype, msg=lambda m: f"forward {kw}\n{m}")
    for name, a, b in zip("qkv", grads, rgrads):
        assert a.dtype == q.dtype and torch.isfinite(a).all(), name
        assert_close(a, b, dtype=q.dtype, msg=lambda m, name=name: f"d{name} {kw}\n{m}")


SHAPES = [  # (B, Hq, Hkv, Tq, Tk, D, Dv): GQA 1, 2, 4; Tq != Tk both ways; nothing divides 8/16
    (2, 2, 2, 37, 37, 16, 16),
    (1, 4, 2, 19, 45, 8, 5),
    (2, 4, 1, 41, 23, 12, 20),
]
MASKS = ["none", "bool", "bool_2d", "float_bias", "hf_padding", "hf_causal_padding"]


def _cases():
    for n, (kind, causal, mask) in enumerate(itertools.product(("sigmoid", "relu"), (False, True),
                                                               MASKS)):
        shape = SHAPES[n % len(SHAPES)]
        yield pytest.param(kind, causal, mask, shape,
                           id=f"{kind}-{'causal' if causal else 'full'}-{mask}-g{shape[1] // shape[2]}")


@pytest.mark.parametrize("kind,causal,mask_kind,shape", list(_cases()))
def test_matches_reference(kind, causal, mask_kind, shape):
    B, Hq, Hkv, Tq, Tk, D, Dv = shape
    q, k, v = make_qkv(*shape)
    check(q, k, v, make_mask(mask_kind, B, Hq, Tq, Tk), kind=kind, is_causal=causal)


@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS])
@pytest.mark.parametrize("causal", [False, True])
def test_relu_activations(activation, causal):
    q, k, v = make_qkv(2, 4, 2, 29, 29, 16, 16)
    check(q, k, v, make_mask("float_bias", 2, 4, 29, 29), kind="relu", activation=activation,
          is_causal=causal)


@pytest.mark.parametrize("alpha,length", [(1.0, None), (0.5, 64), (2.0, "keys")])
def test_relu_lengths_and_alpha(alpha, length):
    q, k, v = make_qkv(1, 2, 2, 21, 33, 8, 8)
    check(q, k, v, None, kind="relu", activation="relu2", alpha=alpha, length=length)


@pytest.mark.parametrize("bias", [None, 0.0, -3.5, 2.0])
def test_sigmoid_bias(bias):
    q, k, v = make_qkv(1, 2, 1, 17, 40, 8, 8)
    check(q, k, v, make_mask("hf_padding", 1, 2, 17, 40), kind="sigmoid", sigmoid_bias=bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["sigmoid", "relu"])
def test_low_precision_inputs(kind, dtype):
    q, k, v = make_qkv(2, 4, 2, 25, 25, 16, 16, dtype=dtype)
    mask = make_mask("hf_causal_padding", 2, 4, 25, 25).to(dtype)  # a mask in the model's dtype
    check(q, k, v, mask, kind=kind)


def test_default_tiles_and_long_sequences(monkeypatch):
    monkeypatch.delenv(cpu.ENV_BLOCK)
    q, k, v = make_qkv(1, 2, 1, 300, 600, 32, 32)
    check(q, k, v, make_mask("hf_padding", 1, 2, 300, 600), kind="sigmoid")
    check(q, k, v, None, kind="relu", is_causal=True)


def test_strided_inputs_as_models_pass_them():
    """q, k, v as ``[B, T, H, D]`` projections viewed ``[B, H, T, D]`` (no copy needed)."""
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 19, 3, 4, 16, generator=g)  # a fused qkv projection
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    check(q, k, v, make_mask("bool", 2, 4, 19, 19), kind="sigmoid", is_causal=True)


def test_rows_that_see_nothing_are_zero():
    q, k, v = make_qkv(1, 2, 2, 9, 12, 8, 8)
    mask = torch.ones(1, 1, 9, 12, dtype=torch.bool)
    mask[..., 3, :] = False
    check(q, k, v, mask, kind="sigmoid")
    out = attnswap.attention(q, k, v, mask, kind="relu", impl="cpu")
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))


def test_results_are_bitwise_repeatable_and_thread_count_independent_in_the_forward(monkeypatch):
    q, k, v = make_qkv(2, 8, 2, 70, 70, 16, 16)
    go = torch.randn(2, 8, 70, 16)
    runs = []
    for threads in ("1", "2", "2"):
        monkeypatch.setenv(cpu.ENV_THREADS, threads)
        ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = attnswap.attention(*ins, kind="sigmoid", is_causal=True, impl="cpu")
        runs.append((out, *torch.autograd.grad(out, ins, go)))
    assert torch.equal(runs[0][0], runs[1][0])  # one task per query block: order-free
    for a, b in zip(runs[1], runs[2]):
        assert torch.equal(a, b)  # same thread count: bitwise the same
    for a, b in zip(runs[0][1:], runs[1][1:]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_a_changed_mask_is_classified_again():
    """The tile classes are cached per mask object and version: an in-place edit is seen."""
    q, k, v = make_qkv(1, 1, 1, 16, 32, 8, 8)
    mask = torch.zeros(1, 1, 1, 32)
    attnswap.attention(q, k, v, mask, kind="sigmoid", impl="cpu")
    mask[..., 16:] = FLOAT_MIN  # the whole second key tile is now hidden
    out = attnswap.attention(q, k, v, mask, kind="sigmoid", impl="cpu")
    ref = attention_reference(q, k, v, mask, kind="sigmoid")
    assert_close(out, ref)


# ----------------------------------------------------------------------------------------------
# what the fused kernel does not take runs the tiled kernel, and is counted with the reason


@pytest.mark.parametrize("kw,reason_fwd,reason_bwd", [
    (dict(kind="sigmoid", dropout_p=0.2, dropout_seed=3), "dropout", "dropout"),
    (dict(kind="relu", length="visible"), "length='visible'", "length='visible'"),
    (dict(kind="softmax"), "kind=softmax", "kind=softmax"),
])
def test_unsupported_calls_run_tiled_and_say_why(kw, reason_fwd, reason_bwd):
    q, k, v = (t.requires_grad_(True) for t in make_qkv(1, 2, 2, 9, 9, 8, 8))
    mask = make_mask("bool", 1, 2, 9, 9)
    attnswap.attention(q, k, v, mask, impl="cpu", **kw).sum().backward()
    assert cpu_fused.path_counts[("forward", f"tiled: {reason_fwd}")] == 1
    assert cpu_fused.path_counts[("backward", f"tiled: {reason_bwd}")] == 1
    assert not any(path == "fused" for _, path in cpu_fused.path_counts)


def test_mask_gradient_takes_the_tiled_backward_only():
    q, k, v = (t.requires_grad_(True) for t in make_qkv(1, 2, 2, 9, 9, 8, 8))
    mask = torch.randn(1, 2, 9, 9, requires_grad=True)
    out = attnswap.attention(q, k, v, mask, kind="sigmoid", impl="cpu")
    ref = attention_reference(q, k, v, mask, kind="sigmoid")
    assert_close(out, ref)
    dm, = torch.autograd.grad(out.sum(), mask)
    rdm, = torch.autograd.grad(ref.sum(), mask)
    assert_close(dm, rdm)
    assert cpu_fused.path_counts[("forward", "fused")] == 1
    assert cpu_fused.path_counts[("backward", "tiled: mask gradient")] == 1


def test_float64_runs_tiled():
    q, k, v = make_qkv(1, 1, 1, 5, 5, 4, 4, dtype=torch.float64)
    attnswap.attention(q, k, v, kind="relu", impl="cpu")
    assert cpu_fused.path_counts[("forward", "tiled: dtype torch.float64")] == 1


def test_env_switch_selects_the_tiled_kernel(monkeypatch):
    monkeypatch.setenv(cpu_fused.ENV_FUSED, "0")
    q, k, v = make_qkv(1, 1, 1, 5, 5, 4, 4)
    attnswap.attention(q, k, v, kind="relu", impl="cpu")
    assert cpu_fused.path_counts[("forward", f"tiled: {cpu_fused.ENV_FUSED}=0")] == 1


@pytest.mark.parametrize("case", ["no compiler", "unwritable cache"])
def test_a_machine_that_cannot_build_it_is_told_once_and_gets_the_tiled_kernel(tmp_path, case):
    """A fresh process that cannot build the kernel (no compiler; a cache folder it cannot
    write): one warning that names the problem and the remedy, correct results from the tiled
    kernel, every call counted."""
    if case == "no compiler":
        env = {"ATTNSWAP_CACHE_DIR": str(tmp_path), "CXX": "no-such-compiler"}
        words = ("no-such-compiler", "g++")
    else:
        env = {"ATTNSWAP_CACHE_DIR": "/proc/attnswap-cache"}
        words = ("ATTNSWAP_CACHE_DIR", "/proc/attnswap-cache")
    code = textwrap.dedent("""
        import warnings, torch, attnswap
        from attnswap.kernels import cpu_fused
        q = k = v = torch.randn(1, 2, 7, 8)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            a = attnswap.attention(q, k, v, kind="sigmoid", impl="cpu")
            b = attnswap.attention(q, k, v, kind="sigmoid", impl="cpu")
        ref = attnswap.kernels.reference.attention_reference(q, k, v, kind="sigmoid")
        msgs = [str(x.message) for x in w if issubclass(x.category, cpu_fused.FusedKernelWarning)]
        assert len(msgs) == 1, msgs
        assert all(w in msgs[0] for w in WORDS), msgs[0]
        assert cpu_fused.path_counts[("forward", "tiled: not built")] == 2, cpu_fused.path_counts
        torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-4)
        print("ok")
    """)
    code = f"WORDS = {words!r}\n" + code
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_the_build_is_cached_per_source_and_machine(tmp_path, monkeypatch):
    from attnswap.kernels.cpu_fused import build

    monkeypatch.setenv(build.ENV_CACHE, str(tmp_path))
    path = build.library_path()
    assert path.parent == tmp_path and path.name.startswith("attnswap_cpu_fused_")
    monkeypatch.setenv("CXX", "clang++")
    assert build.library_path() != path  # another compiler is another build


def test_sigmoid_polynomial_exp_is_accurate_over_the_range_that_matters():
    """The kernel's exp is Cephes' polynomial; its sigmoid must match torch's to fp32 rounding
    over scores from saturation to saturation (incl. b = -ln n for n up to 1M)."""
    s = torch.linspace(-40.0, 40.0, 4097).view(1, 1, 1, -1)
    q = torch.ones(1, 1, 1, 1)
    k = s.transpose(-1, -2)  # scores = s with scale 1
    v = torch.eye(4097).view(1, 1, 4097, 4097)
    for b in (0.0, -math.log(1e6)):
        out = attnswap.attention(q, k, v, kind="sigmoid", scale=1.0, sigmoid_bias=b, impl="cpu")
        ref = torch.sigmoid(s + b)
        torch.testing.assert_close(out.view(-1), ref.view(-1), atol=1e-7, rtol=2e-6)


def test_tile_classes_of_the_masks_hf_builds():
    """Hidden tiles are skipped (no matmul), free ones read no mask, and only tiles with a real
    bias add it: the classes the C++ classification gives HF's causal and padding masks."""
    lib = cpu_fused.load()
    T = 32
    causal = torch.zeros(1, 1, T, T).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), FLOAT_MIN)
    m, is_bool, thr = cpu_fused._mask_operand(causal, T)
    classes = cpu_fused._classify(lib, m, is_bool, thr, 8, 8)[0, 0]
    HIDDEN, FREE, VISIBILITY, BIASED = 0, 1, 2, 3
    for i in range(4):
        for j in range(4):
            want = HIDDEN if j > i else FREE if j < i else VISIBILITY
            assert classes[i, j] == want, (i, j, classes)
    bias = causal.clone()
    bias[..., 20, 3] = 0.25
    m, is_bool, thr = cpu_fused._mask_operand(bias, T)
    assert cpu_fused._classify(lib, m, is_bool, thr, 8, 8)[0, 0, 2, 0] == BIASED
    pad = torch.ones(2, 1, 1, T, dtype=torch.bool)
    pad[1, ..., 16:] = False
    m, is_bool, thr = cpu_fused._mask_operand(pad, T)
    classes = cpu_fused._classify(lib, m, is_bool, thr, 8, 8)
    assert classes.shape == (2, 1, 1, 4)  # a broadcast query dim is one tile along it
    assert classes[0].flatten().tolist() == [FREE] * 4
    assert classes[1].flatten().tolist() == [FREE, FREE, HIDDEN, HIDDEN]


@pytest.mark.parametrize("kind", ["sigmoid", "relu"])
def test_a_converted_hf_model_runs_the_fused_kernel_at_every_site(kind, monkeypatch):
    """HF BERT with a padded batch (its [B, 1, 1, T] finfo.min mask), trained one step: every
    site's forward and backward are counted as fused, and the model matches the same conversion
    on the plain-math reference kernel."""
    from transformers import BertConfig, BertModel

    monkeypatch.delenv(cpu.ENV_BLOCK)
    cfg = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, attn_implementation="eager")
    torch.manual_seed(0)
    model = BertModel(cfg)
    ids = torch.randint(0, 128, (3, 40))
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, 25:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    outs = {}
    for impl in ("cpu", "reference"):
        conv = attnswap.convert(model, kind, batch, impl=impl, strict=True)
        cpu_fused.path_counts.clear()
        out = conv(**batch).last_hidden_state
        out.pow(2).mean().backward()
        outs[impl] = (out.detach(), [p.grad.clone() for p in conv.parameters() if p.grad is not None])
        if impl == "cpu":
            assert dict(cpu_fused.path_counts) == {("forward", "fused"): 2, ("backward", "fused"): 2}
    assert_close(outs["cpu"][0], outs["reference"][0])
    assert len(outs["cpu"][1]) == len(outs["reference"][1]) > 20
    for a, b in zip(outs["cpu"][1], outs["reference"][1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def _bthd(B, H, T, D, seed):
    """A ``[B, H, T, D]`` view of a ``[B, T, H, D]`` tensor: what ``proj(x).view(B, T, H, D)
    .transpose(1, 2)`` hands to SDPA in HF / timm models."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, H, D, generator=g).transpose(1, 2)


def _is_bthd(t):
    return t.transpose(1, 2).is_contiguous() and not t.is_contiguous()


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("kind", ["sigmoid", "relu"])
def test_outputs_and_gradients_in_the_layouts_models_use(kind, threads, monkeypatch):
    """layout="bthd": the output is written [B, T, H, D] in memory (as CPU SDPA returns it for
    such views), and dq, dk, dv come back in q's, k's, v's own layouts from a [B, T, H, D]-strided
    grad_out, without copies; values as the reference's. 256 x 256 scores per head and one KV
    head: with 2 threads the query group is split and the partial dK, dV are summed into the
    strided gradients."""
    monkeypatch.setenv(cpu.ENV_THREADS, threads)
    B, Hq, Hkv, T, D = 1, 4, 1, 256, 16
    q, k, v = _bthd(B, Hq, T, D, 0), _bthd(B, Hkv, T, D, 1), _bthd(B, Hkv, T, D, 2)
    mask = make_mask("hf_padding", B, Hq, T, T)
    ins = [t.detach().requires_grad_(True) for t in (q, k, v)]
    before = dict(cpu_fused.path_counts)
    out = attnswap.attention(*ins, mask, kind=kind, impl="cpu", layout="bthd")
    go = _bthd(B, Hq, T, D, 3)
    grads = torch.autograd.grad(out, ins, go)
    ran = {key: n - before.get(key, 0) for key, n in cpu_fused.path_counts.items()}
    assert ran.get(("forward", "fused")) == 1 and ran.get(("backward", "fused")) == 1, ran
    assert _is_bthd(out), out.stride()
    for g, x in zip(grads, (q, k, v)):
        assert g.stride() == x.stride(), (g.stride(), x.stride())
    rin = [t.detach().requires_grad_(True) for t in (q, k, v)]
    ref = attention_reference(*rin, mask, kind=kind)
    rgrads = torch.autograd.grad(ref, rin, go)
    assert_close(out, ref, dtype=torch.float32)
    for name, a, b in zip("qkv", grads, rgrads):
        assert_close(a, b, dtype=torch.float32, msg=lambda m, name=name: f"d{name}\n{m}")


def test_default_layout_is_contiguous_and_expanded_inputs_get_contiguous_gradients():
    q = _bthd(2, 4, 21, 8, 0)
    k = torch.randn(1, 2, 21, 8).expand(2, 2, 21, 8)  # broadcast over the batch
    v = torch.randn(2, 2, 21, 8)
    ins = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = attnswap.attention(*ins, kind="sigmoid", impl="cpu")
    assert out.is_contiguous()
    dq, dk, dv = torch.autograd.grad(out, ins, torch.randn_like(out))
    assert dq.stride() == q.stride() and dk.is_contiguous() and dv.is_contiguous()
    rin = [t.detach().requires_grad_(True) for t in (q, k, v)]
    ref = attention_reference(*rin, None, kind="sigmoid")
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    for a, b in zip(torch.autograd.grad(attnswap.attention(*ins, kind="sigmoid", impl="cpu"),
                                        ins, go), torch.autograd.grad(ref, rin, go)):
        assert_close(a, b, dtype=torch.float32)


@pytest.mark.parametrize("impl,env", [("cpu", "0"), ("reference", "1"), ("cpu", "1")])
def test_every_path_returns_the_layout_asked_for(impl, env, monkeypatch):
    """The tiled kernel and the reference write contiguous outputs: they are copied into the
    layout asked for, so a model's code sees the same strides whichever kernel ran."""
    monkeypatch.setenv(cpu_fused.ENV_FUSED, env)
    q, k, v = (_bthd(2, 3, 13, 8, s) for s in range(3))
    out = attnswap.attention(q, k, v, kind="relu", impl=impl, layout="bthd")
    assert _is_bthd(out)
    assert_close(out, attention_reference(q, k, v, None, kind="relu"), dtype=torch.float32)
    with pytest.raises(ValueError, match="layout"):
        attnswap.attention(q, k, v, kind="relu", impl=impl, layout="bhtd")


@pytest.mark.parametrize("layout", [None, "bthd"])
def test_token_broadcast_operands_are_read_as_what_they_are(layout):
    """Operands whose token dim is expanded (stride 0): a ``grad_out`` from ``out.sum(dim=2)``
    (any reduction over tokens right after the site) and a key expanded over T. BLAS walks token
    rows with a leading dimension; a stride-0 row must be materialized, not read as D apart."""
    B, H, T, D = 2, 3, 40, 8
    q, v = _bthd(B, H, T, D, 0), _bthd(B, H, T, D, 1)
    k = torch.randn(B, H, 1, D, generator=torch.Generator().manual_seed(2)).expand(B, H, T, D)
    ins = [t.detach().requires_grad_(True) for t in (q, k, v)]
    before = dict(cpu_fused.path_counts)
    out = attnswap.attention(*ins, kind="sigmoid", impl="cpu", layout=layout)
    grads = torch.autograd.grad(out.sum(2).square().sum(), ins)
    ran = {key: n - before.get(key, 0) for key, n in cpu_fused.path_counts.items()}
    assert ran.get(("forward", "fused")) == 1 and ran.get(("backward", "fused")) == 1, ran
    rin = [t.detach().requires_grad_(True) for t in (q, k, v)]
    ref = attention_reference(*rin, None, kind="sigmoid")
    rgrads = torch.autograd.grad(ref.sum(2).square().sum(), rin)
    assert_close(out, ref, dtype=torch.float32)
    for name, a, b in zip("qkv", grads, rgrads):
        assert_close(a, b, dtype=torch.float32, msg=lambda m, name=name: f"d{name}\n{m}")


@pytest.mark.parametrize("fused", ["1", "0"])
def test_a_bthd_output_is_its_own_tensor(fused, monkeypatch):
    """Not a transposed view: in-place ops on the site output (a model's ``out.mul_(gate)``) are
    allowed where they were before."""
    monkeypatch.setenv(cpu_fused.ENV_FUSED, fused)
    q, k, v = (_bthd(1, 2, 9, 8, s).requires_grad_(True) for s in range(3))
    out = attnswap.attention(q, k, v, kind="relu", impl="cpu", layout="bthd")
    assert out._base is None and _is_bthd(out)
    out.mul_(2.0)  # in grad mode: no "output of a Function is a view ... modified inplace"


def test_calls_of_one_shape_with_other_strides_masks_and_options_never_share_a_template():
    """The kernel's C struct is cached per call geometry (``cpu_fused._problem``); calls that
    share every shape but differ in strides, mask dtype or layout, kind, options or tiling must
    each get their own fields. They run interleaved, twice, each against the reference."""
    B, H, T, D = 2, 2, 26, 8  # the padding starts inside a key tile: the kernel reads the mask
    q, k, v = make_qkv(B, H, H, T, T, D, D)
    k_bthd = k.transpose(1, 2).contiguous().transpose(1, 2)  # same shape, [B, T, H, D] strides
    pad = make_mask("hf_padding", B, H, T, T)
    cases = [
        (k, None, dict(kind="sigmoid")),
        (k_bthd, None, dict(kind="sigmoid")),
        (k, pad, dict(kind="sigmoid")),
        (k, pad.to(torch.float16), dict(kind="sigmoid")),
        (k, pad > FLOAT_MIN, dict(kind="sigmoid")),
        (k, pad.expand(B, H, T, T), dict(kind="sigmoid")),
        (k, pad, dict(kind="sigmoid", sigmoid_bias=-1.0)),
        (k, pad, dict(kind="sigmoid", is_causal=True)),
        (k, pad, dict(kind="relu")),
        (k, pad, dict(kind="relu", activation="relu2", alpha=0.5)),
        (k, pad, dict(kind="sigmoid", scale=0.3)),
    ]
    for _ in range(2):
        for kk, mask, kw in cases:
            check(q, kk, v, mask, **kw)
