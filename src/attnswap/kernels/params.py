"""The non-tensor arguments of ``attnswap::attention``, validated once and passed to every kernel."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .reference import ACTIVATIONS, KINDS

IMPLS = ("auto", "reference", "cpu", "triton", "sdpa")

# How ``length`` travels through the op schema (an int): 0 = Tk, -1 = per-row visible count.
LENGTH_KEYS = 0
LENGTH_VISIBLE = -1


def encode_length(length) -> int:
    if length is None or length == "keys":
        return LENGTH_KEYS
    if length == "visible":
        return LENGTH_VISIBLE
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        raise ValueError(
            f"length={length!r} is not allowed: use None or 'keys' (the key length at call time), "
            "'visible' (per-row count of unmasked keys) or a positive int (a fixed L)"
        )
    return length


def decode_length(code: int):
    return {LENGTH_KEYS: None, LENGTH_VISIBLE: "visible"}.get(code, code)


@dataclass(frozen=True)
class AttentionParams:
    kind: str
    scale: float
    is_causal: bool = False
    dropout_p: float = 0.0
    dropout_seed: int = 0
    sigmoid_bias: float | None = None
    activation: str = "relu"
    alpha: float = 1.0
    length: int = LENGTH_KEYS  # encoded, see encode_length
    fast_sigmoid: bool = False

    def sigmoid_b(self, tk: int) -> float:
        return -math.log(tk) if self.sigmoid_bias is None else self.sigmoid_bias

    def reference_kwargs(self) -> dict:
        return dict(
            kind=self.kind,
            scale=self.scale,
            is_causal=self.is_causal,
            dropout_p=self.dropout_p,
            dropout_seed=self.dropout_seed,
            sigmoid_bias=self.sigmoid_bias,
            activation=self.activation,
            alpha=self.alpha,
            length=decode_length(self.length),
        )


def validate_params(p: AttentionParams, impl: str) -> None:
    if p.kind not in KINDS:
        raise ValueError(
            f"kind={p.kind!r} is not a kind the attention op computes; allowed: {KINDS} "
            "('sas' is a rewrite around softmax: use attnswap.convert(model, attention='sas'))"
        )
    if p.activation not in ACTIVATIONS:
        raise ValueError(f"activation={p.activation!r} is not allowed; choose one of {ACTIVATIONS}")
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not allowed; choose one of {IMPLS}")
    if not (0.0 <= p.dropout_p < 1.0):
        raise ValueError(f"dropout_p={p.dropout_p!r} must be in [0, 1)")
    if not math.isfinite(p.scale):
        raise ValueError(f"scale={p.scale!r} must be a finite float")
    if not math.isfinite(p.alpha):
        raise ValueError(f"alpha={p.alpha!r} must be a finite float")
    if p.sigmoid_bias is not None and not math.isfinite(p.sigmoid_bias):
        raise ValueError(f"sigmoid_bias={p.sigmoid_bias!r} must be a finite float or None")
    if p.length < LENGTH_VISIBLE:
        raise ValueError(f"length code {p.length} is invalid")
    if impl == "sdpa" and (p.kind != "softmax" or p.dropout_p > 0):
        raise ValueError(
            f"impl='sdpa' computes softmax attention without dropout only (got kind={p.kind!r}, "
            f"dropout_p={p.dropout_p}); use impl='auto'"
        )
