"""The Triton kernels in real fp16 under the interpreter: P (and dS) are cast to fp16 before the
``tl.dot`` that consumes them, as on a GPU, so what overflows there overflows here.

Why this can run on a CPU: the interpreter computes fp16 tiles in numpy's float16 and ``tl.dot``
of fp16 tiles as ``np.matmul(..., dtype=float32)`` (fp16 inputs, fp32 accumulation, like the
tensor cores). Only bf16 is emulated wrongly there, so the kernels upcast bf16 tiles alone under
the interpreter (``common.compute_in_fp32``); fp16 and fp32 tiles keep their dtype.

The case: ReLU² attention, whose h(S) = S² exceeds fp16's 65504 for S > 256 while the weight it
becomes, L^-α S², does not. A kernel that casts h(S) (or h'(S)·dP in the dQ pass) to fp16 before
multiplying by L^-α writes inf; the fixed kernels scale first.
"""

from __future__ import annotations

import os

import pytest
import torch

from attnswap import attention
from attnswap.kernels.reference import attention_reference
from tolerances import assert_close

HAS_CUDA = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
pytestmark = [
    pytest.mark.skipif(not (HAS_CUDA or INTERPRETING), reason="needs a GPU or TRITON_INTERPRET=1"),
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _hot_key_inputs(Tq=16, Tk=70, D=64, seed=0):
    """Scores of ~N(0, 25) against a 'hot' key 0 whose score is ~320 for every query (S² ≈ 1e5),
    with dO·v_0 ≈ 128 so that h'(S)·dP = 2S·dP ≈ 8e4 too. Every true output and gradient, once
    multiplied by L^-α = 1/Tk, stays far below fp16's max."""
    g = torch.Generator().manual_seed(seed)
    q = 5.0 + 0.1 * torch.randn(1, 1, Tq, D, generator=g)
    k = torch.randn(1, 1, Tk, D, generator=g)
    k[:, :, 0] = 8.0
    v = torch.randn(1, 1, Tk, D, generator=g)
    v[:, :, 0] = 4.0
    do = 0.5 + 0.05 * torch.randn(1, 1, Tq, D, generator=g)
    return [t.to(DEVICE, torch.float16) for t in (q, k, v, do)]


@pytest.mark.parametrize("length", [None, "visible"], ids=["L=Tk", "L=visible"])
def test_relu2_fp16_does_not_overflow(length):
    q, k, v, do = _hot_key_inputs()
    s_hot = (q.float() @ k[:, :, :1].float().transpose(-1, -2) / 8.0).min().item()
    assert s_hot > 256.0, "the case must push h(S) = S² past fp16's max"

    def run(fn):
        ins = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*ins, None, kind="relu", activation="relu2", length=length, is_causal=False)
        return [out.detach()] + [g.detach() for g in torch.autograd.grad(out, ins, do)]

    ours = run(lambda *a, **kw: attention(*a, impl="triton", **kw))
    ref = run(attention_reference)
    for name, a, e in zip(["out", "dq", "dk", "dv"], ours, ref):
        assert torch.isfinite(e).all(), f"the reference's {name} must be finite for this case"
        assert torch.isfinite(a).all(), f"{name}: fp16 overflow (h(S) cast before L^-alpha)"
        # fp16 tolerance, relative to the magnitudes of this case (|out| ~ 5e3)
        scale = e.float().abs().max().item()
        assert_close(a / scale, e / scale, dtype=torch.float16, msg=f"relu2 fp16 {name}")
