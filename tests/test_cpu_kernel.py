"""The tiled CPU kernel (``impl="cpu"`` with the fused kernel switched off: this file is the tiled
kernel's; ``test_cpu_fused_kernel.py`` is the fused one's) against the plain-math oracle,
``kernels/reference.py``.

Every case runs the op forward and backward (q, k, v and, for float masks that require grad, the
mask) and compares with autograd through ``attention_reference`` computed in fp32 (fp64 for fp64)
from the same inputs. Tiles are made tiny (``ATTNSWAP_CPU_BLOCK``) so that every case has partial
tiles, diagonal tiles and skipped tiles. Cases are hand-combined rather than a full cartesian
product, plus hypothesis-generated shapes.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import attnswap
from attnswap.kernels import cpu, cpu_fused
from attnswap.kernels.dropout import dropout_keep_mask
from attnswap.kernels.reference import ACTIVATIONS, attention_reference
from tolerances import assert_close

KINDS = ("softmax", "sigmoid", "relu")
MASKS = ("none", "bool", "float", "float_min", "float_inf")


@pytest.fixture(autouse=True)
def tiny_tiles(monkeypatch):
    """Tiles smaller than every length used here, and not dividing them; the tiled kernel."""
    monkeypatch.setenv(cpu.ENV_BLOCK, "4,8")
    monkeypatch.setenv(cpu_fused.ENV_FUSED, "0")


@contextlib.contextmanager
def tiles(spec: str | None):
    old = os.environ.get(cpu.ENV_BLOCK)
    try:
        if spec is None:
            os.environ.pop(cpu.ENV_BLOCK, None)
        else:
            os.environ[cpu.ENV_BLOCK] = spec
        yield
    finally:
        if old is None:
            os.environ.pop(cpu.ENV_BLOCK, None)
        else:
            os.environ[cpu.ENV_BLOCK] = old


# ----------------------------------------------------------------------------------------------
# helpers


def make_qkv(B, Hq, Hkv, Tq, Tk, D, Dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, generator=g)
    k = torch.randn(B, Hkv, Tk, D, generator=g)
    v = torch.randn(B, Hkv, Tk, Dv, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def make_mask(kind, shape, dtype, seed=1, empty_rows=()):
    """A mask of ``shape`` (any broadcastable shape); rows in ``empty_rows`` see no key."""
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(shape, generator=g) > 0.3
    if kind == "bool":
        m = keep
        for r in empty_rows:
            m[..., r, :] = False
        return m
    m = (0.5 * torch.randn(shape, generator=g)).to(dtype)
    low = {"float": -1e4, "float_min": torch.finfo(dtype).min, "float_inf": float("-inf")}[kind]
    m = m.masked_fill(~keep, low)
    for r in empty_rows:
        m[..., r, :] = low
    return m


def run_op(q, k, v, mask, mask_grad=False, grad_seed=2, **kw):
    """Output and gradients (q, k, v[, mask]) of ``attnswap.attention``."""
    ins = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    m = mask
    if mask_grad:
        m = mask.detach().clone().requires_grad_(True)
        ins.append(m)
    out = attnswap.attention(ins[0], ins[1], ins[2], m, **kw)
    g = torch.Generator().manual_seed(grad_seed)
    go = torch.randn(out.shape, generator=g).to(out.dtype)
    grads = torch.autograd.grad(out, ins, go)
    return out, grads, go


def run_reference(q, k, v, mask, go, mask_grad=False, **kw):
    """The oracle, in fp32 (fp64 stays fp64), from the same (possibly low-precision) inputs."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    ins = [t.detach().to(ct).requires_grad_(True) for t in (q, k, v)]
    m = mask
    if mask_grad:
        m = mask.detach().clone().requires_grad_(True)  # its own dtype: same masking threshold
        ins.append(m)
    out = attention_reference(ins[0], ins[1], ins[2], m, **kw)
    grads = torch.autograd.grad(out, ins, go.to(ct))
    return out, grads


def check_against_reference(q, k, v, mask, mask_grad=False, **kw):
    out, grads, go = run_op(q, k, v, mask, mask_grad=mask_grad, impl="cpu", **kw)
    ref, rgrads = run_reference(q, k, v, mask, go, mask_grad=mask_grad, **kw)
    assert out.dtype == q.dtype and out.shape == ref.shape
    dt = q.dtype
    assert_close(out, ref, dtype=dt, msg=lambda m: f"forward {kw}\n{m}")
    for name, a, b in zip("qkvm", grads, rgrads):
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"non-finite d{name}"
        assert_close(a, b, dtype=dt, msg=lambda m, name=name: f"d{name} {kw}\n{m}")
    return out, grads


# ----------------------------------------------------------------------------------------------
# hand-combined cases: every kind × causal × mask type, rotating GQA, lengths, mask shapes, dtypes

SHAPES = [  # (B, Hq, Hkv, Tq, Tk, D, Dv): GQA 1, 2, 4; Tq ≠ Tk both ways; nothing divides 4 or 8
    (2, 2, 2, 13, 13, 8, 8),
    (1, 4, 2, 9, 21, 8, 5),
    (2, 4, 1, 19, 11, 6, 7),
]
MASK_SHAPES = ["full", "heads", "keys", "rows"]


def _mask_shape(which, B, Hq, Tq, Tk):
    return {"full": (B, Hq, Tq, Tk), "heads": (1, Hq, Tq, Tk), "keys": (B, 1, 1, Tk),
            "rows": (Tq, Tk)}[which]


def _core_cases():
    cases = []
    for n, (kind, causal, mask) in enumerate(itertools.product(KINDS, (False, True), MASKS)):
        shape = SHAPES[n % len(SHAPES)]
        mshape = MASK_SHAPES[n % len(MASK_SHAPES)]
        cases.append(pytest.param(kind, causal, mask, shape, mshape,
                                  id=f"{kind}-{'causal' if causal else 'full'}-{mask}-"
                                     f"g{shape[1] // shape[2]}-{mshape}"))
    return cases


@pytest.mark.parametrize("kind,causal,mask_kind,shape,mask_shape", _core_cases())
def test_matches_reference_fp32(kind, causal, mask_kind, shape, mask_shape):
    B, Hq, Hkv, Tq, Tk, D, Dv = shape
    q, k, v = make_qkv(*shape, torch.float32)
    mask = make_mask(mask_kind, _mask_shape(mask_shape, B, Hq, Tq, Tk), torch.float32)
    mask_grad = mask is not None and mask.dtype.is_floating_point
    check_against_reference(q, k, v, mask, mask_grad=mask_grad, kind=kind, is_causal=causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_dtypes(kind, dtype):
    shape = (1, 4, 2, 11, 17, 8, 8)
    q, k, v = make_qkv(*shape, dtype, seed=3)
    mask = make_mask("float_min", (1, 1, 11, 17), dtype)
    check_against_reference(q, k, v, mask, mask_grad=True, kind=kind, is_causal=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_bool_mask_gqa(kind, dtype):
    shape = (2, 4, 1, 16, 12, 16, 8)
    q, k, v = make_qkv(*shape, dtype, seed=4)
    mask = make_mask("bool", (2, 1, 16, 12), dtype)
    check_against_reference(q, k, v, mask, kind=kind, is_causal=False)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("length", [None, "visible", 7])
def test_relu_activations_and_lengths(activation, length):
    # alpha != 1, a causal + bool mask so "visible" counts differ per row, one empty row.
    shape = (1, 2, 1, 10, 13, 4, 4)
    q, k, v = make_qkv(*shape, torch.float64, seed=5)
    mask = make_mask("bool", (1, 2, 10, 13), torch.float64, empty_rows=(3,))
    out, _ = check_against_reference(q, k, v, mask, kind="relu", activation=activation,
                                     alpha=0.7, length=length, is_causal=True)
    assert (out[:, :, 3] == 0).all()


@pytest.mark.parametrize("activation", ["gelu", "identity", "softplus", "relu2"])
def test_relu_float_mask_grad_activations(activation):
    # Activations that are nonzero at negative scores: masked positions must not leak.
    shape = (2, 2, 2, 9, 9, 4, 4)
    q, k, v = make_qkv(*shape, torch.float32, seed=6)
    mask = make_mask("float_inf", (2, 1, 9, 9), torch.float32, empty_rows=(2,))
    check_against_reference(q, k, v, mask, mask_grad=True, kind="relu", activation=activation,
                            length="visible", alpha=1.5)


@pytest.mark.parametrize("bias", [-2.0, 0.0, -math.log(4096)])
def test_sigmoid_pinned_bias(bias):
    shape = (1, 2, 1, 12, 7, 8, 8)
    q, k, v = make_qkv(*shape, torch.float32, seed=7)
    check_against_reference(q, k, v, None, kind="sigmoid", sigmoid_bias=bias, is_causal=True)


def test_scale_and_noncontiguous_inputs():
    # [B, T, H, D] transposed to [B, H, T, D], a custom scale.
    B, T, H, D = 2, 11, 4, 8
    g = torch.Generator().manual_seed(8)
    q = torch.randn(B, T, H, D, generator=g).transpose(1, 2)
    k = torch.randn(B, T, 2, D, generator=g).transpose(1, 2)
    v = torch.randn(B, T, 2, D, generator=g).transpose(1, 2)
    for kind in KINDS:
        check_against_reference(q, k, v, None, kind=kind, scale=0.3, is_causal=True)


@pytest.mark.parametrize("block", ["1,3", "5,2", "64,64", None])
def test_tile_sizes(block):
    # Tiles of one query row, tiles larger than the problem, and the default sizes.
    shape = (1, 2, 1, 14, 10, 4, 4)
    q, k, v = make_qkv(*shape, torch.float64, seed=9)
    mask = make_mask("float", (1, 2, 14, 10), torch.float64)
    with tiles(block):
        for kind in KINDS:
            check_against_reference(q, k, v, mask, mask_grad=True, kind=kind, is_causal=True)


# ----------------------------------------------------------------------------------------------
# fully-masked rows: softmax gives 0 (like SDPA), sigmoid/relu exactly 0, no NaN anywhere


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mask_kind", ["bool", "float_inf", "float_min"])
def test_fully_masked_rows(kind, mask_kind):
    shape = (2, 2, 1, 9, 11, 4, 4)
    q, k, v = make_qkv(*shape, torch.float32, seed=10)
    empty = (0, 4, 8)
    mask = make_mask(mask_kind, (2, 1, 9, 11), torch.float32, empty_rows=empty)
    mask_grad = mask.dtype.is_floating_point
    out, grads, go = run_op(q, k, v, mask, mask_grad=mask_grad, impl="cpu", kind=kind)
    for gr in grads:
        assert torch.isfinite(gr).all()
    rows = out[:, :, list(empty)]
    if kind != "softmax" or mask_kind != "float_min":
        assert (rows == 0).all()
        assert (grads[0][:, :, list(empty)] == 0).all()
    # float_min + softmax: the oracle (and SDPA) average over every key — not 0.
    check_against_reference(q, k, v, mask, mask_grad=mask_grad, kind=kind)
    if kind == "softmax":  # and SDPA agrees, gradients included
        ins = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        m = mask.detach().clone().requires_grad_(mask_grad)
        ref = F.scaled_dot_product_attention(*ins, attn_mask=m, enable_gqa=True)
        rgrads = torch.autograd.grad(ref, ins + ([m] if mask_grad else []), go)
        assert_close(out, ref, dtype=torch.float32)
        for a, b in zip(grads, rgrads):
            assert_close(a, b, dtype=torch.float32)


def test_causal_rows_beyond_keys():
    # Tq > Tk, causal: queries past the last key see every key; Tq < Tk: most keys unseen.
    for shape in [(1, 2, 2, 17, 5, 4, 4), (1, 2, 2, 3, 17, 4, 4)]:
        q, k, v = make_qkv(*shape, torch.float64, seed=11)
        for kind in KINDS:
            check_against_reference(q, k, v, None, kind=kind, is_causal=True)


# ----------------------------------------------------------------------------------------------
# dropout: the same pattern as the oracle, bit for bit


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_pattern_is_the_reference_pattern(kind):
    # With V = identity, the output *is* the dropped weight matrix: its zeros are the pattern.
    B, Hq, Hkv, Tq, Tk = 2, 4, 2, 9, 13
    q, k, _ = make_qkv(B, Hq, Hkv, Tq, Tk, 4, 4, torch.float64, seed=12)
    v = torch.eye(Tk, dtype=torch.float64).expand(B, Hkv, Tk, Tk).contiguous()
    kw = dict(kind=kind, dropout_p=0.4, dropout_seed=1234)
    if kind == "relu":
        kw["activation"] = "softplus"  # nonzero everywhere, so every zero is a dropped weight
    out = attnswap.attention(q, k, v, impl="cpu", **kw)
    ref = attention_reference(q, k, v, **kw)
    keep = dropout_keep_mask(1234, 0.4, (B, Hq, Tq, Tk))
    assert torch.equal(out != 0, keep)
    assert torch.equal(ref != 0, keep)
    assert_close(out, ref, dtype=torch.float64)
    # A different seed gives a different pattern.
    other = attnswap.attention(q, k, v, impl="cpu", **{**kw, "dropout_seed": 99})
    assert not torch.equal(other != 0, keep)


@pytest.mark.parametrize("kind,causal,mask_kind",
                         [("softmax", True, "float"), ("softmax", False, "bool"),
                          ("sigmoid", True, "float_inf"), ("relu", False, "float_min")])
def test_dropout_gradients(kind, causal, mask_kind):
    shape = (2, 4, 2, 10, 12, 4, 4)
    q, k, v = make_qkv(*shape, torch.float64, seed=13)
    mask = make_mask(mask_kind, (2, 1, 10, 12), torch.float64)
    mask_grad = mask.dtype.is_floating_point
    extra = {"activation": "gelu", "length": "visible"} if kind == "relu" else {}
    check_against_reference(q, k, v, mask, mask_grad=mask_grad, kind=kind, is_causal=causal,
                            dropout_p=0.3, dropout_seed=77, **extra)


# ----------------------------------------------------------------------------------------------
# softmax is SDPA


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_softmax_equals_sdpa(causal, mask_kind):
    B, Hq, Hkv, Tq, Tk = 2, 4, 2, 15, 15
    q, k, v = make_qkv(B, Hq, Hkv, Tq, Tk, 8, 8, torch.float32, seed=14)
    mask = make_mask(mask_kind, (B, 1, Tq, Tk), torch.float32)
    if mask is not None and mask.dtype == torch.bool:
        mask[..., 0] = True
    out, grads, go = run_op(q, k, v, mask, impl="cpu", kind="softmax", is_causal=causal)
    ins = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    sm = mask
    if causal:
        tri = torch.ones(Tq, Tk, dtype=torch.bool).tril()
        sm = tri if mask is None else (
            mask & tri if mask.dtype == torch.bool else mask.masked_fill(~tri, float("-inf")))
    ref = F.scaled_dot_product_attention(*ins, attn_mask=sm, enable_gqa=True)
    rgrads = torch.autograd.grad(ref, ins, go)
    assert_close(out, ref, dtype=torch.float32)
    for a, b in zip(grads, rgrads):
        assert_close(a, b, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# gradcheck (fp64) through the op


@pytest.mark.parametrize("kind,extra", [
    ("softmax", {}),
    ("sigmoid", {}),
    ("relu", {"activation": "gelu", "length": "visible"}),
    ("relu", {"activation": "relu", "alpha": 0.5}),
])
def test_gradcheck(kind, extra):
    g = torch.Generator().manual_seed(15)
    q = torch.randn(1, 2, 5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 1, 6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(1, 1, 6, 2, dtype=torch.float64, generator=g, requires_grad=True)
    mask = 0.3 * torch.randn(1, 1, 5, 6, dtype=torch.float64, generator=g)  # broadcast heads
    mask[0, 0, 1, 2] = float("-inf")
    mask = mask.requires_grad_(True)

    def f(q, k, v, mask):
        return attnswap.attention(q, k, v, mask, kind=kind, is_causal=True, impl="cpu",
                                  dropout_p=0.2, dropout_seed=3, **extra)

    assert torch.autograd.gradcheck(f, (q, k, v, mask), eps=1e-6, atol=1e-6, fast_mode=True)


# ----------------------------------------------------------------------------------------------
# hypothesis: shapes, tiles, options


@given(
    kind=st.sampled_from(KINDS),
    B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.sampled_from([1, 2, 3]),
    Tq=st.integers(1, 19), Tk=st.integers(1, 19), D=st.integers(1, 9), Dv=st.integers(1, 9),
    causal=st.booleans(), mask_kind=st.sampled_from(MASKS),
    mask_shape=st.sampled_from(MASK_SHAPES),
    bq=st.integers(2, 9), bk=st.integers(2, 9),
    activation=st.sampled_from(ACTIVATIONS), length=st.sampled_from([None, "visible", 3]),
    dropout=st.sampled_from([0.0, 0.0, 0.25]),
)
def test_hypothesis_shapes(kind, B, Hkv, G, Tq, Tk, D, Dv, causal, mask_kind, mask_shape, bq, bk,
                           activation, length, dropout):
    Hq = Hkv * G
    q, k, v = make_qkv(B, Hq, Hkv, Tq, Tk, D, Dv, torch.float64, seed=Tq * 31 + Tk)
    mask = make_mask(mask_kind, _mask_shape(mask_shape, B, Hq, Tq, Tk), torch.float64)
    kw = dict(kind=kind, is_causal=causal, dropout_p=dropout, dropout_seed=5)
    if kind == "relu":
        kw.update(activation=activation, length=length)
    mask_grad = mask is not None and mask.dtype.is_floating_point
    with tiles(f"{bq},{bk}"):
        check_against_reference(q, k, v, mask, mask_grad=mask_grad, **kw)


# ----------------------------------------------------------------------------------------------
# tile sizes


def test_block_sizes_defaults_and_env(monkeypatch):
    monkeypatch.delenv(cpu.ENV_BLOCK, raising=False)
    assert cpu.block_sizes(8) == (cpu.BLOCK_Q, cpu.BLOCK_K)
    assert cpu.block_sizes(8, causal=True) == (cpu.BLOCK_Q, cpu.BLOCK_K_CAUSAL)
    bq, bk = cpu.block_sizes(4096)  # many heads: the tile shrinks to the budget
    assert 4096 * bq * bk <= cpu.MAX_TILE_ELEMS and min(bq, bk) >= cpu.MIN_BLOCK
    monkeypatch.setenv(cpu.ENV_BLOCK, "16")
    assert cpu.block_sizes(4096) == (16, 16)
    monkeypatch.setenv(cpu.ENV_BLOCK, "16, 32")
    assert cpu.block_sizes(1) == (16, 32)
    monkeypatch.setenv(cpu.ENV_BLOCK, "0,4")
    with pytest.raises(ValueError, match=cpu.ENV_BLOCK):
        cpu.block_sizes(1)


def test_empty_sequences():
    for Tq, Tk in [(0, 5), (5, 0)]:
        q, k, v = make_qkv(1, 2, 1, Tq, Tk, 4, 3, torch.float32)
        for kind in KINDS:
            out, grads, _ = run_op(q, k, v, None, impl="cpu", kind=kind)
            assert out.shape == (1, 2, Tq, 3) and (out == 0).all()
            assert all((g == 0).all() for g in grads)


# ----------------------------------------------------------------------------------------------
# the thread pool: (batch, head) blocks run as separate tasks


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
@pytest.mark.parametrize("B,Hq,Hkv", [(1, 8, 8), (3, 8, 8), (1, 8, 1), (2, 6, 2), (9, 2, 1),
                                      (1, 1, 1)])
def test_plan_tasks_cover_every_head_once(B, Hq, Hkv, workers):
    tasks = cpu.plan_tasks(B, Hq, Hkv, workers)
    seen = torch.zeros(B, Hq, dtype=torch.int64)
    G = Hq // Hkv
    for b0, b1, h0, h1 in tasks:
        seen[b0:b1, h0:h1] += 1
        whole_groups = h0 % G == 0 and h1 % G == 0
        one_group = h0 // G == (h1 - 1) // G
        assert whole_groups or one_group, (h0, h1, G)
    assert (seen == 1).all()
    if workers == 1:
        assert tasks == [(0, B, 0, Hq)]


def test_num_workers_env(monkeypatch):
    monkeypatch.setenv(cpu.ENV_THREADS, "3")
    assert cpu.num_workers() == 3
    monkeypatch.setenv(cpu.ENV_THREADS, "0")
    assert cpu.num_workers() == 1
    monkeypatch.setenv(cpu.ENV_THREADS, "many")
    with pytest.raises(ValueError, match=cpu.ENV_THREADS):
        cpu.num_workers()
    monkeypatch.delenv(cpu.ENV_THREADS)
    assert cpu.num_workers() == torch.get_num_threads()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,mask_shape", [
    ((1, 4, 1, 11, 13, 4, 4), "rows"),    # one key/value head shared by every task: dK, dV summed
    ((3, 4, 2, 9, 9, 4, 4), "keys"),      # batches split; the mask gradient summed over tasks
    ((2, 6, 3, 10, 7, 4, 4), "heads"),
])
def test_threaded_tasks_match_reference(monkeypatch, kind, shape, mask_shape):
    monkeypatch.setattr(cpu, "PARALLEL_MIN_SCORES", 0)
    monkeypatch.setenv(cpu.ENV_THREADS, "3")
    B, Hq, Hkv, Tq, Tk = shape[:5]
    q, k, v = make_qkv(*shape, torch.float64, seed=16)
    mask = make_mask("float_inf", _mask_shape(mask_shape, B, Hq, Tq, Tk), torch.float64,
                     empty_rows=() if mask_shape == "keys" else (1,))
    extra = {"activation": "gelu", "length": "visible"} if kind == "relu" else {}
    check_against_reference(q, k, v, mask, mask_grad=True, kind=kind, is_causal=True,
                            dropout_p=0.3, dropout_seed=21, **extra)
    assert cpu._pool is not None and cpu._pool_size == 3


def test_threaded_under_inference_mode(monkeypatch):
    # Grad / inference mode are thread-local: the workers must run under the caller's.
    monkeypatch.setattr(cpu, "PARALLEL_MIN_SCORES", 0)
    monkeypatch.setenv(cpu.ENV_THREADS, "2")
    q, k, v = make_qkv(1, 4, 2, 9, 9, 4, 4, torch.float32, seed=17)
    for kind in KINDS:
        expected = attention_reference(q, k, v, kind=kind, is_causal=True)
        with torch.inference_mode():
            out = attnswap.attention(q, k, v, kind=kind, is_causal=True, impl="cpu")
        assert out.is_inference()
        assert_close(out, expected)


def test_pool_leaves_other_threads_alone(monkeypatch):
    # Workers run single-threaded ops; threads started later keep torch's default count.
    import threading

    monkeypatch.setattr(cpu, "PARALLEL_MIN_SCORES", 0)
    monkeypatch.setenv(cpu.ENV_THREADS, "2")
    q, k, v = make_qkv(1, 4, 4, 6, 6, 4, 4, torch.float32)
    attnswap.attention(q, k, v, kind="sigmoid", impl="cpu")
    seen = set(cpu._get_pool(2).map(lambda _: torch.get_num_threads(), range(4)))
    assert seen == {1}
    new = []
    t = threading.Thread(target=lambda: new.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert new == [torch.get_num_threads()]
