"""Every option attnswap takes, checked in one place.

``convert()``, the ``attnswap`` backend, the op (``attnswap.attention``) and the command line
all check their arguments here, so one value means the same thing everywhere and a bad one gets
the same message everywhere. The checks are type-strict because the cheap coercions are the
dangerous ones: ``bool("no")`` is ``True`` (``is_causal="no"`` would make attention causal),
``True`` is the number 1 (``alpha=True`` would be accepted as 1.0), ``0 in (False, ...)`` holds.

Every error is an :class:`AttnswapOptionError` (a ``ValueError``) whose message is one line that
names the argument, shows the value given, says what is allowed and, where it helps, what to do.
"""

from __future__ import annotations

import math
import re
import numbers
from typing import Any

import torch

from .kernels.reference import ACTIVATIONS
from .kernels.reference import KINDS as OP_KINDS  # what the op computes; SAS is a rewrite around softmax

KINDS = ("softmax", "sigmoid", "relu", "sas")
IMPLS = ("auto", "reference", "cpu", "triton", "sdpa")
QK_NORMS = ("layernorm", "rmsnorm")
SAS_INITS = ("identity", "random")

# Per-kind options of convert() / the backend and their defaults; anything else is an error that
# lists these.
KIND_OPTIONS = {
    "softmax": {},
    "sigmoid": {"sigmoid_bias": None, "fast_sigmoid": False},
    "relu": {"activation": "relu", "alpha": 1.0, "length": None},
    "sas": {"heads_ratio": 2, "dim": None, "kernel_size": 3, "init": "identity"},
}
COMMON_OPTIONS = {"impl": None, "qk_norm": False}


class AttnswapOptionError(ValueError):
    """A bad argument: the message names it, shows the value, says what is allowed and what to do,
    in one line. ``name`` and ``value`` are kept for programs that want them."""

    def __init__(self, name: str, value: Any, allowed: str, hint: str | None = None):
        self.name, self.value = name, value
        msg = f"{name}={show(value)} is not supported: {allowed}"
        if hint:
            msg += f"; {hint}"
        super().__init__(msg)


def show(value: Any) -> str:
    """A short, one-line rendering of a value for an error message (tensors by shape and dtype)."""
    text = " ".join(_render(value).split())
    return text if len(text) <= 100 else text[:97] + "..."


def _render(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        dev = "" if value.device.type == "cpu" else f", {value.device}"
        return f"tensor({list(value.shape)}, {str(value.dtype).replace('torch.', '')}{dev})"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_render(v) for v in value)
        return f"({inner}{',' if len(value) == 1 else ''})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_render(v)}" for k, v in value.items()) + "}"
    if hasattr(value, "args") and hasattr(value, "kwargs") and type(value).__name__ == "ExampleInputs":
        return f"ExampleInputs(args={_render(tuple(value.args))}, kwargs={_render(dict(value.kwargs))})"
    return re.sub(r" at 0x[0-9a-f]+", "", repr(value))  # addresses differ from run to run


# ----------------------------------------------------------------------------------------------
# the checks each option is made of

_SYMBOLIC_NUMBERS = (torch.SymInt, torch.SymFloat)


def _is_number(v) -> bool:
    return (isinstance(v, (numbers.Real, *_SYMBOLIC_NUMBERS))
            and not isinstance(v, (bool, torch.SymBool)))


def _is_int(v) -> bool:
    return isinstance(v, (numbers.Integral, torch.SymInt)) and not isinstance(v, bool)


def _concrete(v) -> bool:
    return not isinstance(v, _SYMBOLIC_NUMBERS)


def check_bool(name: str, value, hint: str | None = None) -> bool:
    # numpy's bool_ is not a Python bool but means one; a SymBool is what dynamo traces.
    if isinstance(value, (bool, torch.SymBool)) or type(value).__name__ == "bool_":
        return value if isinstance(value, torch.SymBool) else bool(value)
    raise AttnswapOptionError(name, value, "it must be True or False",
                              hint or "a string or a number is not a flag here")


def check_optional_bool(name: str, value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise AttnswapOptionError(name, value, "it must be True, False or None",
                              "a string or a number is not a flag here")


def check_choice(name: str, value, choices, *, optional: bool = False, hint: str | None = None):
    if value is None and optional:
        return None
    if isinstance(value, str) and value in choices:
        return value
    allowed = "choose one of " + ", ".join(repr(c) for c in choices) + (" or None" if optional else "")
    raise AttnswapOptionError(name, value, allowed, hint)


def check_real(name: str, value, *, low=None, low_open=False, high=None, high_open=False,
               optional=False, nonzero=False, what="a finite number", hint=None):
    """A finite real number (not a bool, not a string, not a tensor) within the bounds."""
    if value is None and optional:
        return None
    if not _is_number(value):
        if isinstance(value, torch.Tensor):
            hint = "pass a Python float (tensor.item())" + (f"; {hint}" if hint else "")
        raise AttnswapOptionError(name, value, f"it must be {what}" + (" or None" if optional else ""),
                                  hint)
    if not _concrete(value):
        return value  # a traced symbolic number: its value is checked when the graph runs eagerly
    v = float(value)
    bad = (not math.isfinite(v)
           or (low is not None and (v <= low if low_open else v < low))
           or (high is not None and (v >= high if high_open else v > high))
           or (nonzero and v == 0.0))
    if bad:
        raise AttnswapOptionError(name, value, f"it must be {what}", hint)
    return v


def check_int(name: str, value, *, low=None, optional=False, odd=False, what="an int", hint=None):
    if value is None and optional:
        return None
    ok = _is_int(value) and (not _concrete(value) or (
        (low is None or value >= low) and (not odd or value % 2 == 1)))
    if not ok:
        raise AttnswapOptionError(name, value, f"it must be {what}" + (" or None" if optional else ""),
                                  hint)
    return int(value) if _concrete(value) else value


def check_globs(name: str, value) -> tuple[str, ...]:
    """``include=`` / ``exclude=``: None, one glob, or a list/tuple of globs over region paths."""
    hint = "give a glob over module paths such as 'model.layers.*.self_attn' (or a list of them)"
    if value is None:
        return ()
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple, set, frozenset)):
        raise AttnswapOptionError(name, value, "it must be a glob string, a list of them or None", hint)
    out = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise AttnswapOptionError(name, value, "every pattern must be a non-empty string", hint)
        out.append(item)
    return tuple(sorted(out) if isinstance(items, (set, frozenset)) else out)


# ----------------------------------------------------------------------------------------------
# one checker per option; convert(), the backend and the op share them


def check_sigmoid_bias(value):
    return check_real("sigmoid_bias", value, optional=True,
                      what="a finite float (a pinned b)",
                      hint="None gives the paper's b = -ln(number of keys)")


def check_fast_sigmoid(value):
    return check_bool("fast_sigmoid", value)


def check_activation(value):
    return check_choice("activation", value, ACTIVATIONS)


def check_alpha(value):
    return check_real("alpha", value, low=0.0, what="a finite number >= 0 (the paper uses 1)",
                      hint="the ReLU weights are scaled by 1/L**alpha")


def check_length(value):
    if value is None or (isinstance(value, str) and value in ("keys", "visible")):
        return value
    if _is_int(value) and (not _concrete(value) or value > 0):
        return int(value) if _concrete(value) else value
    raise AttnswapOptionError(
        "length", value, "it must be None or 'keys' (the number of keys at call time), "
        "'visible' (each row's count of unmasked keys) or a positive int (a fixed L)")


def check_impl(value, kind: str | None = None, *, optional=True):
    impl = check_choice("impl", value, IMPLS, optional=optional,
                        hint="None follows ATTNSWAP_IMPL, else 'auto'")
    if impl == "sdpa" and kind in ("sigmoid", "relu"):
        raise AttnswapOptionError(
            "impl", value, f"'sdpa' computes softmax only, not {kind!r}",
            "use impl='auto' (Triton on CUDA, the tiled CPU kernel on CPU)")
    return impl


def check_qk_norm(value):
    if value is None or isinstance(value, bool):
        return value
    return check_choice("qk_norm", value, QK_NORMS,
                        hint="or True (layernorm) / False (none)")


def check_heads_ratio(value):
    return check_int("heads_ratio", value, low=2, what="an int >= 2",
                     hint="SAS expands H heads to heads_ratio*H")


def check_dim(value):
    return check_int("dim", value, low=1, optional=True, what="a positive int (the expanded head "
                     "dim D')", hint="None keeps the site's head dim")


def check_kernel_size(value):
    return check_int("kernel_size", value, low=1, odd=True, what="an odd positive int",
                     hint="an odd size keeps the head dim")


def check_init(value):
    return check_choice("init", value, SAS_INITS)


OPTION_CHECKS = {
    "sigmoid_bias": check_sigmoid_bias,
    "fast_sigmoid": check_fast_sigmoid,
    "activation": check_activation,
    "alpha": check_alpha,
    "length": check_length,
    "heads_ratio": check_heads_ratio,
    "dim": check_dim,
    "kernel_size": check_kernel_size,
    "init": check_init,
    "qk_norm": check_qk_norm,
}


def check_kind(value, name: str = "attention", choices=KINDS):
    hint = None
    if isinstance(value, str) and value.lower() in choices and value not in choices:
        hint = f"did you mean {value.lower()!r}?"
    elif value == "sas" and "sas" not in choices:
        hint = "SAS is a rewrite around softmax: use attnswap.convert(model, attention='sas')"
    return check_choice(name, value, choices, hint=hint)


def check_kind_options(kind: str, options: dict) -> dict:
    """``options`` of ``attention=kind`` checked, with the kind's defaults filled in."""
    kind = check_kind(kind)
    allowed = {**KIND_OPTIONS[kind], **COMMON_OPTIONS}
    for name in options:
        if name not in allowed:
            others = [k for k, o in KIND_OPTIONS.items() if name in o]
            hint = (f"{name!r} is an option of attention={others[0]!r}" if others
                    else "check the spelling")
            raise AttnswapOptionError(
                name, options[name], f"attention={kind!r} takes no option {name!r} (its options: "
                f"{', '.join(sorted(allowed))})", hint)
    out = {**allowed, **options}
    for name, value in options.items():
        if name == "impl":
            out[name] = check_impl(value, kind)
        else:
            out[name] = OPTION_CHECKS[name](value)
    return out


# ----------------------------------------------------------------------------------------------
# convert() / the backend's own arguments


def check_inner(value):
    """``inner=``: the compiler that runs each rewritten graph: a registered dynamo backend name
    or a callable backend."""
    if callable(value) and not isinstance(value, str):
        return value
    if not isinstance(value, str) or not value:
        raise AttnswapOptionError("inner", value, "it must be the name of a torch.compile backend "
                                  "('eager', 'aot_eager', 'inductor', ...) or a backend callable")
    if value == "eager":
        return value
    from torch._dynamo import list_backends

    names = set(list_backends(exclude_tags=())) | {"eager"}
    if value not in names:
        raise AttnswapOptionError("inner", value, "it is not a registered torch.compile backend",
                                  "use 'eager' (runs the rewritten graph as it is), 'aot_eager' or "
                                  "'inductor'; torch._dynamo.list_backends() lists the others")
    if value == "attnswap":
        raise AttnswapOptionError("inner", value, "attnswap cannot be its own inner compiler",
                                  "use 'eager' or 'inductor'")
    return value


def check_convert_args(*, inplace, inner, dynamic, strict):
    check_bool("inplace", inplace)
    check_inner(inner)
    check_optional_bool("dynamic", dynamic)
    check_bool("strict", strict)


# ----------------------------------------------------------------------------------------------
# the op's arguments


_HASHABLE = (str, int, float, bool, type(None))


def op_args_key(values: tuple) -> tuple | None:
    """A type-strict cache key of option values (``True``, ``1`` and ``1.0`` differ), or None
    when one of them is not a plain scalar."""
    for x in values:
        if type(x) not in _HASHABLE:
            return None
    return tuple((type(x), x) for x in values)


def check_seed(dropout_seed):
    if not (dropout_seed is None or _is_int(dropout_seed) or (
            isinstance(dropout_seed, torch.Tensor) and dropout_seed.numel() == 1
            and not dropout_seed.dtype.is_floating_point and dropout_seed.dtype != torch.bool)):
        raise AttnswapOptionError("dropout_seed", dropout_seed, "it must be None, an int or a "
                                  "one-element integer tensor")


def check_op_args(*, kind, scale, is_causal, dropout_p, dropout_seed, sigmoid_bias, activation,
                  alpha, length, fast_sigmoid, impl) -> dict:
    """The op's non-tensor arguments, checked and normalized (scale stays None when not given).
    (The op checks each argument set once, under :func:`op_args_key`: ``kernels/op.py``.)"""
    out = dict(
        kind=check_kind(kind, name="kind", choices=OP_KINDS),
        scale=check_real("scale", scale, optional=True, nonzero=True,
                         what="a finite non-zero number (the scores are q@k^T * scale)",
                         hint="None gives 1/sqrt(head_dim)"),
        is_causal=check_bool("is_causal", is_causal),
        dropout_p=check_real("dropout_p", dropout_p, low=0.0, high=1.0, high_open=True,
                             what="a number in [0, 1)"),
        sigmoid_bias=check_sigmoid_bias(sigmoid_bias),
        activation=check_activation(activation),
        alpha=check_alpha(alpha),
        length=check_length(length),
        fast_sigmoid=check_fast_sigmoid(fast_sigmoid),
    )
    out["impl"] = check_impl(impl, out["kind"], optional=False)
    check_seed(dropout_seed)
    if out["impl"] == "sdpa" and out["dropout_p"] > 0:
        raise AttnswapOptionError("impl", impl, "'sdpa' runs without dropout here",
                                  f"use impl='auto' with dropout_p={dropout_p}")
    return out
