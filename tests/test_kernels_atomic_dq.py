"""The 5-matmul Triton backward (``ATTNSWAP_TRITON_DQ=atomic``: the dK/dV kernel also adds each
key block's dS·K into an fp32 dQ buffer with atomics, no dQ kernel) against the reference, over
kinds, masks (with the float-mask gradient), causality, GQA (several query heads add into their
own dQ rows from one key block program) and fp16; ``length="visible"`` is told and runs the
deterministic backward."""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.skipif(not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
                       reason="needs a GPU or TRITON_INTERPRET=1"),
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]

from test_triton_kernels import _bool_mask, _float_mask, check_against_reference  # noqa: E402


class _MustNotRun:
    fn = None

    def __getitem__(self, grid):
        raise AssertionError("the dQ kernel ran: the atomic backward was not taken")


@pytest.fixture(autouse=True)
def _atomic(monkeypatch, request):
    monkeypatch.setenv("ATTNSWAP_TRITON_DQ", "atomic")
    if "visible" not in request.node.name:
        import attnswap.kernels.triton.bwd as bwd

        monkeypatch.setattr(bwd, "_attn_bwd_dq", _MustNotRun())


@pytest.mark.parametrize("kind,causal,mask_kind,Hq,Hkv,Tq,Tk", [
    ("sigmoid", True, "bool", 4, 2, 111, 70),
    ("relu", False, "float", 2, 1, 63, 130),
    ("softmax", True, "float", 2, 2, 70, 70),
    ("softmax", False, None, 3, 1, 17, 64),
])
def test_atomic_dq_matches_reference(kind, causal, mask_kind, Hq, Hkv, Tq, Tk):
    mask = None
    if mask_kind == "bool":
        mask = _bool_mask((1, 1, Tq, Tk), seed=3)
    elif mask_kind == "float":
        mask = _float_mask((1, Hq, Tq, Tk), seed=4)
    check_against_reference(kind, Hq=Hq, Hkv=Hkv, Tq=Tq, Tk=Tk, is_causal=causal, mask=mask,
                            mask_grad=mask_kind == "float")


def test_atomic_dq_fp16_relu2():
    check_against_reference("relu", Tq=70, Tk=63, dtype=torch.float16, is_causal=True,
                            activation="relu2")


def test_visible_length_is_told_and_stays_correct():
    with pytest.warns(RuntimeWarning, match="deterministic"):
        check_against_reference("relu", Tq=63, Tk=63, length="visible")


def test_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv("ATTNSWAP_TRITON_DQ", "fast")
    with pytest.raises(ValueError, match="ATTNSWAP_TRITON_DQ"):
        check_against_reference("sigmoid", Tq=16, Tk=16)
