"""The Triton kernels (``impl="triton"``) against ``kernels/reference.py``: forward, dQ, dK, dV and
the float-mask gradient, over kinds, activations, length rules, masks, causality, GQA, Tq != Tk,
lengths that are not a multiple of the 64-wide blocks, fully-masked rows, dtypes, head dims and
dropout (bit-identical keep pattern).

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` (set by conftest.py) at ~3 ms per block
step, so shapes stay small (T <= 111: one or two blocks) and the cases are a lean selection, not a
cartesian product.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from attnswap import attention, call_counts, reset_call_counts
from attnswap.kernels.dropout import dropout_keep_mask
from attnswap.kernels.params import AttentionParams
from attnswap.kernels.reference import attention_reference
from tolerances import assert_close

HAS_CUDA = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False
RUNNABLE = HAS_TRITON and (HAS_CUDA or INTERPRETING)

pytestmark = [
    pytest.mark.skipif(
        not RUNNABLE,
        reason="the Triton kernels need triton plus a CUDA GPU, or TRITON_INTERPRET=1 set before "
        "attnswap is imported (tests/conftest.py sets it when no GPU is present)",
    ),
    # The interpreter evaluates both sides of tl.where in numpy (1/0, log2(0), exp overflow on
    # masked lanes, all discarded): its RuntimeWarnings are noise here.
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]

if RUNNABLE:

    import attnswap.kernels.triton as tk
    from attnswap.kernels.triton import common
    from attnswap.kernels.triton.common import sigmoid_accurate, sigmoid_fast

DEVICE = "cuda" if HAS_CUDA else "cpu"
FINFO_MIN = torch.finfo(torch.float32).min


# ---------------------------------------------------------------------------------------------
# helpers


def _qkv(B, Hq, Hkv, Tq, Tk, D, Dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or D
    mk = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype)  # noqa: E731
    return mk(B, Hq, Tq, D), mk(B, Hkv, Tk, D), mk(B, Hkv, Tk, Dv), mk(B, Hq, Tq, Dv)


def _bool_mask(shape, seed=1, p_keep=0.7):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) < p_keep).to(DEVICE)


def _float_mask(shape, seed=2, dtype=torch.float32):
    """Additive float mask: ordinary biases plus finfo(dtype).min and -inf entries (1/6 each)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(*shape, generator=g).to(dtype)
    flat = m.view(-1)
    idx = torch.randperm(flat.numel(), generator=g)
    n = max(1, flat.numel() // 6)
    flat[idx[:n]] = torch.finfo(dtype).min
    flat[idx[n:2 * n]] = float("-inf")
    return m.to(DEVICE)


def _run(fn, q, k, v, do, mask, mask_grad):
    ins = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    m = mask
    if mask_grad:
        m = mask.detach().clone().requires_grad_(True)
        ins.append(m)
    out = fn(ins[0], ins[1], ins[2], m)
    grads = torch.autograd.grad(out, ins, do)
    return out.detach(), [g.detach() for g in grads]


def check_against_reference(kind, *, B=1, Hq=2, Hkv=1, Tq=63, Tk=63, D=64, Dv=None,
                            dtype=torch.float32, mask=None, mask_grad=False, seed=0, **kw):
    q, k, v, do = _qkv(B, Hq, Hkv, Tq, Tk, D, Dv, dtype, seed)
    ours = lambda a, b, c, m: attention(a, b, c, m, kind=kind, impl="triton", **kw)  # noqa: E731
    ref = lambda a, b, c, m: attention_reference(a, b, c, m, kind=kind, **kw)  # noqa: E731
    out, grads = _run(ours, q, k, v, do, mask, mask_grad)
    rout, rgrads = _run(ref, q, k, v, do, mask, mask_grad)
    assert out.dtype == q.dtype and out.shape == rout.shape
    names = ["out", "dq", "dk", "dv", "dmask"]
    for name, a, e in zip(names, [out] + grads, [rout] + rgrads):
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        assert_close(a, e, dtype=dtype, msg=f"{kind} {name} differs from the reference ({kw})")
    return out, grads


# ---------------------------------------------------------------------------------------------
# kinds x masks x causal x GQA x lengths (fp32)

KIND_CASES = [
    # kind, causal, mask kind, Hq, Hkv, Tq, Tk
    ("softmax", False, None, 2, 2, 63, 63),
    ("softmax", True, "bool", 2, 1, 111, 70),
    ("softmax", False, "float", 4, 1, 70, 111),
    ("softmax", True, "float", 2, 2, 63, 111),
    ("sigmoid", False, None, 4, 1, 63, 63),
    ("sigmoid", True, "float", 2, 1, 111, 63),
    ("sigmoid", True, "bool", 2, 2, 63, 111),
    ("sigmoid", False, "bool", 4, 2, 111, 111),
    ("relu", False, None, 2, 2, 111, 111),
    ("relu", True, "float", 4, 2, 70, 63),
    ("relu", False, "bool", 4, 1, 63, 70),
    ("relu", True, None, 2, 1, 130, 63),
]


@pytest.mark.parametrize("kind,causal,mask_kind,Hq,Hkv,Tq,Tk", KIND_CASES)
def test_kinds_masks_causal_gqa(kind, causal, mask_kind, Hq, Hkv, Tq, Tk):
    mask = None
    if mask_kind == "bool":
        mask = _bool_mask((1, Hq, Tq, Tk))
    elif mask_kind == "float":
        mask = _float_mask((1, 1, Tq, Tk))
    check_against_reference(kind, Hq=Hq, Hkv=Hkv, Tq=Tq, Tk=Tk, is_causal=causal, mask=mask,
                            mask_grad=mask_kind == "float")


ACTIVATION_CASES = [
    # activation, length, alpha, causal, mask kind
    ("relu", None, 1.0, True, "float"),
    ("relu2", "visible", 1.5, False, "bool"),
    ("gelu", None, 1.0, True, None),
    ("softplus", 17, 0.5, False, "float"),
    ("identity", "visible", 1.0, True, "float"),
    ("relu6", "keys", 2.0, False, None),
    ("sigmoid", "visible", 1.0, True, "bool"),
]


@pytest.mark.parametrize("act,length,alpha,causal,mask_kind", ACTIVATION_CASES)
def test_relu_activations_and_lengths(act, length, alpha, causal, mask_kind):
    Tq, Tk = 70, 63
    mask = None
    if mask_kind == "bool":
        mask = _bool_mask((1, 1, Tq, Tk), seed=3)
    elif mask_kind == "float":
        mask = _float_mask((1, 2, Tq, Tk), seed=4)
    check_against_reference("relu", Tq=Tq, Tk=Tk, is_causal=causal, mask=mask,
                            mask_grad=mask_kind == "float", activation=act, length=length,
                            alpha=alpha)


def test_sigmoid_bias_and_scale():
    check_against_reference("sigmoid", Tq=63, Tk=111, sigmoid_bias=-2.5, scale=0.3)


# ---------------------------------------------------------------------------------------------
# dtypes, head dims, layouts


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "relu"])
def test_low_precision(kind, dtype):
    Tq, Tk = 70, 63
    mask = _float_mask((1, 1, Tq, Tk), seed=5, dtype=dtype)
    check_against_reference(kind, Hq=2, Hkv=1, Tq=Tq, Tk=Tk, dtype=dtype, is_causal=True, mask=mask,
                            mask_grad=True)


@pytest.mark.parametrize("kind,D,Dv", [
    ("sigmoid", 32, 32), ("softmax", 128, 128), ("relu", 80, 80), ("sigmoid", 64, 32),
    ("softmax", 48, 96),
])
def test_head_dims(kind, D, Dv):
    check_against_reference(kind, Tq=63, Tk=70, D=D, Dv=Dv, is_causal=True)


def test_non_contiguous_inputs():
    """q/k/v as views of a [B, T, H, D] layout (the usual projection output), mask broadcast."""
    B, T, H, D = 2, 63, 2, 64
    g = torch.Generator().manual_seed(7)
    q, k, v, do = (torch.randn(B, T, H, D, generator=g).to(DEVICE).transpose(1, 2) for _ in range(4))
    mask = _bool_mask((B, 1, 1, T), seed=8)
    for kind in ("sigmoid", "softmax"):
        ours = lambda a, b, c, m: attention(a, b, c, m, kind=kind, impl="triton")  # noqa: E731
        ref = lambda a, b, c, m: attention_reference(a, b, c, m, kind=kind)  # noqa: E731
        out, grads = _run(ours, q, k, v, do, mask, False)
        rout, rgrads = _run(ref, q, k, v, do, mask, False)
        for a, e in zip([out] + grads, [rout] + rgrads):
            assert_close(a, e)


# ---------------------------------------------------------------------------------------------
# mask shapes and the float-mask gradient's reduction


@pytest.mark.parametrize("kind,shape", [
    ("sigmoid", (63,)),  # 1-dim key padding bias → unsqueezed to [1, 1, 1, Tk]
    ("softmax", (2, 1, 1, 63)),  # per-batch key padding
    ("relu", (2, 1, 70, 1)),  # per-query bias broadcast over keys
    ("sigmoid", (2, 2, 70, 63)),  # full
])
def test_float_mask_broadcast_and_grad(kind, shape):
    mask = _float_mask(shape, seed=9)
    check_against_reference(kind, B=2, Hq=2, Hkv=1, Tq=70, Tk=63, mask=mask, mask_grad=True)


def test_mask_grad_through_direct_call():
    """backward() returns dmask in the 4-dim mask's shape (op.py reshapes it afterwards)."""
    q, k, v, do = _qkv(1, 2, 1, 63, 63, 32)
    mask = _float_mask((1, 1, 1, 63), seed=10)
    p = AttentionParams(kind="sigmoid", scale=1 / math.sqrt(32))
    out = tk.forward(q, k, v, mask, p)
    dq, dk, dv, dmask = tk.backward(do, q, k, v, mask, out, p, True)
    assert dmask.shape == mask.shape and dmask.dtype == torch.float32
    _, _, _, none = tk.backward(do, q, k, v, mask, out, p, False)
    assert none is None


# ---------------------------------------------------------------------------------------------
# fully-masked rows: 0, never NaN


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "relu"])
def test_fully_masked_rows(kind):
    B, Hq, Tq, Tk, D = 1, 2, 70, 63, 32
    q, k, v, do = _qkv(B, Hq, 1, Tq, Tk, D, seed=11)
    bmask = _bool_mask((B, Hq, Tq, Tk), seed=12)
    dead_rows = [0, 5, 64, 69]  # in both query blocks, incl. the tail row
    bmask[:, :, dead_rows] = False
    fmask = torch.where(bmask, 0.0, float("-inf")).to(DEVICE)
    kw = dict(length="visible") if kind == "relu" else {}
    for mask, mgrad in ((bmask, False), (fmask, True)):
        ours = lambda a, b, c, m: attention(a, b, c, m, kind=kind, impl="triton", **kw)  # noqa: E731
        out, grads = _run(ours, q, k, v, do, mask, mgrad)
        for t in [out] + grads:
            assert torch.isfinite(t).all()
        assert (out[:, :, dead_rows] == 0).all()
        assert (grads[0][:, :, dead_rows] == 0).all()
        # The reference's softmax backward is NaN on rows that see nothing, so compare the other
        # rows on a reference without the dead query rows (rows are independent without causal).
        live = [i for i in range(Tq) if i not in dead_rows]
        ref = lambda a, b, c, m: attention_reference(a, b, c, m, kind=kind, **kw)  # noqa: E731
        rout, rgrads = _run(ref, q[:, :, live], k, v, do[:, :, live], mask[:, :, live], mgrad)
        assert_close(out[:, :, live], rout)
        assert_close(grads[0][:, :, live], rgrads[0])
        assert_close(grads[1], rgrads[1])
        assert_close(grads[2], rgrads[2])
        if mgrad:
            assert (grads[3][:, :, dead_rows] == 0).all()
            assert_close(grads[3][:, :, live], rgrads[3])


def test_finfo_min_rows_are_uniform_softmax():
    """A softmax row whose mask is finfo.min everywhere is uniform (SDPA/reference semantics), in
    the forward and the backward (the kernels keep the row max and sum apart for this)."""
    Tq, Tk = 63, 63
    mask = torch.zeros(1, 1, Tq, Tk)
    mask[..., 3, :] = FINFO_MIN
    mask[..., 40, :] = FINFO_MIN
    check_against_reference("softmax", Tq=Tq, Tk=Tk, mask=mask.to(DEVICE), mask_grad=True)


# ---------------------------------------------------------------------------------------------
# dropout


@pytest.mark.parametrize("kind,causal", [("softmax", True), ("sigmoid", False), ("relu", True)])
def test_dropout_matches_reference(kind, causal):
    check_against_reference(kind, Hq=2, Hkv=1, Tq=111, Tk=70, is_causal=causal, dropout_p=0.3,
                            dropout_seed=1234)


@pytest.mark.parametrize("kind,dtype,kw", [
    ("softmax", torch.float32, {}),
    ("sigmoid", torch.bfloat16, {}),
    ("relu", torch.float16, dict(length="visible", activation="gelu")),
])
def test_dropout_with_mask_grad_and_gqa(kind, dtype, kw):
    mask = _float_mask((2, 1, 70, 63), seed=3, dtype=dtype)
    mask[..., 0] = 0.0  # every causal row sees key 0 (the reference's softmax grads are NaN else)
    check_against_reference(kind, B=2, Hq=4, Hkv=2, Tq=70, Tk=63, dtype=dtype, is_causal=True,
                            mask=mask, mask_grad=True, dropout_p=0.2, dropout_seed=99, **kw)


def test_dropout_keep_pattern_is_bit_identical():
    """With S = 1, identity activation, L = 1 and V = I, out = keep / (1 - p) exactly."""
    B, H, Tq, Tk, p = 2, 2, 70, 63, 0.25
    q = torch.zeros(B, H, Tq, 16, device=DEVICE)
    k = torch.zeros(B, H, Tk, 16, device=DEVICE)
    q[..., 0] = 1.0
    k[..., 0] = 1.0
    v = torch.eye(Tk, device=DEVICE).expand(B, H, Tk, Tk).contiguous()
    for seed in (0, 987654321, 2**40 + 3):
        out = attention(q, k, v, kind="relu", activation="identity", length=1, scale=1.0,
                        dropout_p=p, dropout_seed=seed, impl="triton")
        keep = dropout_keep_mask(seed, p, (B, H, Tq, Tk), device=DEVICE)
        assert torch.equal(out * (1 - p) != 0, keep)


# ---------------------------------------------------------------------------------------------
# fast sigmoid

if RUNNABLE:

    @triton.jit
    def _sigmoid_eval(X, ACC, FAST, N, USE_ASM: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + offs, mask=offs < N, other=0.0)
        tl.store(ACC + offs, sigmoid_accurate(x), mask=offs < N)
        tl.store(FAST + offs, sigmoid_fast(x, USE_ASM), mask=offs < N)


def _sigmoid_errors():
    x = torch.linspace(-30.0, 30.0, 60001, device=DEVICE)
    acc, fast = torch.empty_like(x), torch.empty_like(x)
    _sigmoid_eval[(triton.cdiv(x.numel(), 4096),)](
        x, acc, fast, x.numel(), USE_ASM=common.TANH_APPROX_ASM and x.is_cuda, BLOCK=4096)
    exact = torch.sigmoid(x.double())

    def err(y, lo, hi):
        sel = (x >= lo) & (x <= hi)
        ae = (y.double() - exact)[sel].abs()
        return ae.max().item(), (ae / exact[sel]).max().item()

    ranges = {"[-30,30]": (-30, 30), "[-9,-7]": (-9, -7), "[-4,4]": (-4, 4), "[-16,-12]": (-16, -12)}
    return ({r: err(acc, *b) for r, b in ranges.items()}, {r: err(fast, *b) for r, b in ranges.items()})


def test_fast_sigmoid_accuracy():
    accurate, fast = _sigmoid_errors()
    print("\nsigmoid max (abs, rel) error vs fp64:")
    for r in accurate:
        print(f"  {r:>10}: accurate {accurate[r][0]:.2e} {accurate[r][1]:.2e} | "
              f"fast {fast[r][0]:.2e} {fast[r][1]:.2e}")
    x = -8.0
    bound = common.fast_sigmoid_error_bound(x)
    print(f"  tanh.approx.f32 (GPU) worst case at x = {x:g}: abs {bound:.2e}, "
          f"rel {bound / (1 / (1 + math.exp(-x))):.0%} (PTX bound 2^-11 on tanh)")
    # The accurate path (one ex2, Newton-refined reciprocal): its error is the conditioning of
    # sigma for x << 0 (d ln sigma / dx -> 1, so rounding |x| log2(e) costs |x| 2^-24 relative,
    # as much as the fp32 rounding of S itself) plus a few ulp. Measured under the interpreter
    # (exact exp2): 3.6e-7 on [-4, 4], 1.0e-6 on [-16, -12], 1.8e-6 at |x| = 30; a GPU's
    # ex2.approx adds ~2 ulp (2.4e-7).
    ulp_budget = (3e-7 if HAS_CUDA else 0.0) + 2.5 * 2.0 ** -24
    assert accurate["[-4,4]"][1] < ulp_budget * 5
    assert accurate["[-16,-12]"][1] < ulp_budget * 17
    assert accurate["[-30,30]"][1] < ulp_budget * 31
    # the fast path: fine in absolute terms, but its relative error grows for x << 0
    assert fast["[-30,30]"][0] < (3e-4 if HAS_CUDA else 1e-6)
    assert fast["[-9,-7]"][1] > accurate["[-9,-7]"][1]
    if not HAS_CUDA:  # emulated tanh through exp in fp32: cancellation in 0.5 + 0.5 tanh
        assert fast["[-9,-7]"][1] < 1e-3


def test_fast_sigmoid_near_the_long_context_bias():
    """fast_sigmoid where the logits sit at n = 16k keys: x = S + b with b = -ln(16384) = -9.70
    and S within a few units of 0. PTX guarantees tanh.approx.f32 a relative error of 2^-11 on
    tanh; 0.5 + 0.5 tanh(x/2) turns that into an absolute error of up to 0.5 |tanh| 2^-11
    = 2.4e-4, against weights of 6.1e-5 at S = 0: the worst case is 4.0x the weight itself (3.0x
    at S = +0.3, 11x at S = -1, 54x at S = -2.6). That is why fast_sigmoid is off by default;
    since the accurate path also costs one MUFU op per score (test_kernels_sm90), it buys ~6 FMAs
    per score, nothing more. On a GPU this measures the actual error and checks it against the
    bound; on a CPU (no tanh.approx) the bound is all there is to state."""
    b = -math.log(16384)
    xs = [b + s for s in (-2.6, -1.0, 0.0, 0.3, 2.0)]
    rel = [common.fast_sigmoid_error_bound(x) * (1 + math.exp(-x)) for x in xs]
    print("\nfast_sigmoid worst-case relative error at b = -ln 16k, S = -2.6, -1, 0, 0.3, 2: "
          + ", ".join(f"{r:.2g}x" for r in rel))
    assert 3.9 < rel[2] < 4.1 and rel[0] > 50 and rel[4] > 0.5  # as the docstring and docs state
    if HAS_CUDA and common.TANH_APPROX_ASM:
        x = torch.linspace(b - 3, b + 3, 60001, device=DEVICE)
        acc, fast = torch.empty_like(x), torch.empty_like(x)
        _sigmoid_eval[(triton.cdiv(x.numel(), 4096),)](x, acc, fast, x.numel(), USE_ASM=True,
                                                       BLOCK=4096)
        exact = torch.sigmoid(x.double())
        measured = ((fast.double() - exact).abs() / exact).max().item()
        print(f"  measured on this GPU: {measured:.3g}x")
        bound = max(common.fast_sigmoid_error_bound(v) * (1 + math.exp(-v)) for v in x.tolist())
        assert measured <= bound * 1.01


def test_fast_sigmoid_attention_close_to_accurate():
    q, k, v, do = _qkv(1, 2, 1, 63, 70, 64, seed=13)
    accurate = attention(q, k, v, kind="sigmoid", is_causal=True, impl="triton")
    fast = attention(q, k, v, kind="sigmoid", is_causal=True, impl="triton", fast_sigmoid=True)
    torch.testing.assert_close(fast, accurate, atol=1e-3 if HAS_CUDA else 1e-5, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# plumbing and errors


def test_op_dispatch_counts_triton():
    q, k, v, _ = _qkv(1, 2, 1, 40, 40, 32)
    reset_call_counts()
    attention(q, k, v, kind="sigmoid", impl="triton")
    assert call_counts[("sigmoid", "triton")] == 1


def test_errors(monkeypatch):
    q, k, v, _ = _qkv(1, 2, 1, 16, 16, 32)
    p = AttentionParams(kind="sigmoid", scale=0.1)
    with pytest.raises(ValueError, match="fp16, bf16 and fp32"):
        tk.forward(q.double(), k.double(), v.double(), None, p)
    big = torch.zeros(1, 1, 16, 512, device=DEVICE)
    with pytest.raises(ValueError, match="head dims"):
        tk.forward(big, big, big, None, p)
    monkeypatch.setattr(common, "INTERPRET", False)
    cpu = torch.zeros(1, 1, 16, 32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tk.forward(cpu, cpu, cpu, None, p)


def test_empty_and_tiny_shapes():
    q, k, v, do = _qkv(1, 1, 1, 1, 1, 32)
    check_against_reference("sigmoid", Hq=1, Tq=1, Tk=1, D=32)
    p = AttentionParams(kind="relu", scale=0.1)
    out = tk.forward(q, k[:, :, :0], v[:, :, :0], None, p)
    assert out.shape == (1, 1, 1, 32) and (out == 0).all()


# ---------------------------------------------------------------------------------------------
# tiles a visibility mask hides entirely are skipped


def _count_tiles(monkeypatch):
    """Visited and skipped tiles of the forward and dQ kernels, read off ``tile_visible`` itself
    (the interpreter looks the kernels' globals up at run time, so a wrapper in the kernel
    modules sees every call)."""
    from attnswap.kernels.triton import bwd, fwd

    seen = {"visible": 0, "hidden": 0}
    for mod in (fwd, bwd):
        real = mod.tile_visible

        def spy(*args, _real=real):
            vis = _real(*args)
            seen["visible" if bool(vis) else "hidden"] += 1
            return vis

        monkeypatch.setattr(mod, "tile_visible", spy)
    return seen


@pytest.mark.skipif(not INTERPRETING, reason="counts tiles through the interpreter")
@pytest.mark.parametrize("kind,mask_kind", [("softmax", "bool"), ("sigmoid", "bool"),
                                            ("sigmoid", "hf_float"), ("relu", "hf_float")])
def test_tiles_a_padding_mask_hides_are_skipped_and_change_nothing(kind, mask_kind, monkeypatch):
    """A padded batch (HF's [B, 1, 1, Tk] key-padding mask; row 1 keeps 40 of 150 keys, so two of
    its three 64-key blocks are hidden for every query): those tiles are skipped in the forward
    and dQ kernels, and the outputs, q/k/v gradients and the float mask's gradient are the
    reference's."""
    B, Hq, Tq, Tk = 2, 2, 70, 150
    keep = torch.ones(B, 1, 1, Tk, dtype=torch.bool)
    keep[1, ..., 40:] = False
    mask = keep if mask_kind == "bool" else torch.zeros(B, 1, 1, Tk).masked_fill(~keep, FINFO_MIN)
    mask = mask.to(DEVICE)
    seen = _count_tiles(monkeypatch)
    check_against_reference(kind, B=B, Hq=Hq, Hkv=1, Tq=Tq, Tk=Tk, D=16, mask=mask,
                            mask_grad=mask_kind != "bool")
    # forward and dQ: 2 batches x 2 heads x 2 query blocks x 3 key blocks, of which batch 1's
    # last 2 key blocks hide everything: 8 of 24 tiles skipped per kernel (softmax's statistics
    # pass is another forward). The dK/dV kernel visits every tile (see bwd.py).
    passes = 3 if kind == "softmax" else 2
    assert seen == {"visible": 16 * passes, "hidden": 8 * passes}, seen
