"""The non-tensor arguments of ``attnswap::attention`` as every kernel receives them (checked
before, by ``attnswap/options.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass


# How ``length`` travels through the op schema (an int): 0 = Tk, -1 = per-row visible count.
LENGTH_KEYS = 0
LENGTH_VISIBLE = -1


def encode_length(length) -> int:
    from ..options import check_length

    length = check_length(length)
    if length is None or length == "keys":
        return LENGTH_KEYS
    if length == "visible":
        return LENGTH_VISIBLE
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
        # No keys: every weight is a sum over nothing (the output is 0) whatever b is.
        return -math.log(max(tk, 1)) if self.sigmoid_bias is None else self.sigmoid_bias

    def relu_factor(self, tk: int) -> float:
        """ReLU's ``L^-alpha`` for a fixed length (``length`` = keys or a constant): 0 when
        there is nothing to attend, as in the reference."""
        if self.length == LENGTH_VISIBLE:
            raise ValueError("length='visible' has a per-row factor, not one number")
        n = float(tk if self.length == LENGTH_KEYS else self.length)
        return max(n, 1.0) ** (-self.alpha) if n > 0 else 0.0

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
