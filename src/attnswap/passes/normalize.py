"""Op normalization: one spelling per operation, over dynamo graphs and torch.export graphs.

The matcher never looks at ``node.target`` directly. It asks :func:`spell` what a node *is*:
``torch.matmul``, ``@``, ``Tensor.matmul``, ``bmm`` and ``aten.matmul`` are all ``"matmul"``;
``F.softmax``, ``Tensor.softmax``, ``nn.Softmax``, ``aten._softmax`` and ``aten._safe_softmax`` are
all ``"softmax"``; and so on. This is what lets one anchored matcher replace a pattern zoo.

Normalization is a *view*, not a graph mutation: a site that does not match in the end leaves
its graph exactly as it was.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

aten = torch.ops.aten


@dataclass
class Spelling:
    op: str
    args: tuple  # canonical positional operands
    attrs: dict = field(default_factory=dict)


def _a(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _method(node: fx.Node) -> str | None:
    return node.target if node.op == "call_method" else None


def _fn(node: fx.Node):
    return node.target if node.op == "call_function" else None


_MATMUL_FNS = {torch.matmul, operator.matmul, torch.bmm, aten.matmul.default, aten.bmm.default}
_SOFTMAX_FNS = {F.softmax, torch.softmax, torch.Tensor.softmax, aten.softmax.int}
_TRANSPOSE_FNS = {torch.transpose, aten.transpose.int, torch.swapaxes, torch.swapdims}
_MUL_FNS = {operator.mul, operator.imul, torch.mul, aten.mul.Tensor, aten.mul.Scalar}
_DIV_FNS = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, aten.div.Tensor,
            aten.div.Scalar}
_ADD_FNS = {operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add.Scalar}
_SUB_FNS = {operator.sub, operator.isub, torch.sub, aten.sub.Tensor, aten.sub.Scalar}
_WHERE_FNS = {torch.where, aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf,
              aten.where.Scalar}
_MASKED_FILL_FNS = {torch.masked_fill, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
                    aten.masked_fill_.Scalar, aten.masked_fill_.Tensor}
_VIEW_FNS = {torch.reshape, aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_IDENTITY_FNS = {torch.clone, aten.clone.default, aten.contiguous.default, aten.alias.default}
_DROPOUT_FNS = {F.dropout, torch.dropout, aten.dropout.default}
_SDPA_FNS = {F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default}
_PERMUTE_FNS = {torch.permute, aten.permute.default}
_EXPAND_FNS = {aten.expand.default}
_UNSQUEEZE_FNS = {torch.unsqueeze, aten.unsqueeze.default}
_MHA_FNS = {F.multi_head_attention_forward}
_BADDBMM_FNS = {torch.baddbmm, aten.baddbmm.default}
_EINSUM_FNS = {torch.einsum, aten.einsum.default}
_REPEAT_INTERLEAVE_FNS = {torch.repeat_interleave, aten.repeat_interleave.self_int}
_CAST_FNS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout,
             torch.ops.prims.convert_element_type.default}
_TANH_FNS = {torch.tanh, aten.tanh.default}
_FUSED_MHA_FNS = {torch._native_multi_head_attention, torch._transformer_encoder_layer_fwd}
_FLASH_CPU = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
# dynamo records ``x.mT`` / ``x.T`` as these (packet or overload) rather than getattr.
_MT_FNS = {aten.mT, aten.mT.default} if hasattr(aten, "mT") else set()
_NUMPY_T_FNS = {aten.numpy_T, aten.numpy_T.default} if hasattr(aten, "numpy_T") else set()


_ASSERTIONS = {getattr(aten, "_assert_tensor_metadata", None), getattr(aten, "_assert_scalar", None),
               getattr(aten, "sym_constrain_range_for_size", None)}
_ASSERTIONS = {getattr(op, "default", None) for op in _ASSERTIONS if op is not None}


def is_assertion(node: fx.Node) -> bool:
    """torch.export's metadata checks (``_assert_tensor_metadata``): they read, never consume."""
    return node.op == "call_function" and node.target in _ASSERTIONS


def live_users(node: fx.Node) -> list:
    return [u for u in node.users if not is_assertion(u)]


def example(node: Any):
    """The (fake) tensor a node produces, when the graph recorded it."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("val", node.meta.get("example_value"))


def shape_of(node: Any):
    ex = example(node)
    return tuple(ex.shape) if isinstance(ex, torch.Tensor) else None


def dtype_of(node: Any):
    ex = example(node)
    return ex.dtype if isinstance(ex, torch.Tensor) else None


def _cast_target(node: fx.Node):
    """dtype a cast node converts to, or None when the node is not a pure dtype cast."""
    m = _method(node)
    if m in ("float",):
        return torch.float32
    if m in ("half",):
        return torch.float16
    if m in ("bfloat16",):
        return torch.bfloat16
    if m in ("double",):
        return torch.float64
    if m in ("type_as",):
        return dtype_of(node.args[1]) or "type_as"
    if m in ("to", "type"):
        for a in list(node.args[1:]) + list(node.kwargs.values()):
            if isinstance(a, torch.dtype):
                return a
            if isinstance(a, fx.Node) and isinstance(example(a), torch.Tensor) and m == "to":
                return dtype_of(a)
        # .to(device) only: a no-op for matching purposes
        return "same"
    if _fn(node) in _CAST_FNS:
        return node.kwargs.get("dtype", _a(node, 1, "dtype"))
    return None


def spell(node: Any) -> Spelling | None:
    """Classify ``node``; ``None`` when it is not an operation the matcher knows."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method", "call_module"):
        return None
    fn, m = _fn(node), _method(node)

    if fn in _MATMUL_FNS or m in ("matmul", "bmm", "__matmul__"):
        return Spelling("matmul", (node.args[0], node.args[1]))
    if fn in _EINSUM_FNS:
        return _spell_einsum(node)
    if fn in _BADDBMM_FNS or m == "baddbmm":
        base, b1, b2 = node.args[0], _a(node, 1, "batch1"), _a(node, 2, "batch2")
        return Spelling("baddbmm", (base, b1, b2),
                        {"beta": node.kwargs.get("beta", 1), "alpha": node.kwargs.get("alpha", 1)})
    if fn in _SOFTMAX_FNS or m == "softmax":
        return Spelling("softmax", (node.args[0],), {"dim": _a(node, 1, "dim")})
    if fn in (aten._softmax.default,):
        return Spelling("softmax", (node.args[0],), {"dim": node.args[1]})
    if fn is getattr(aten, "_safe_softmax", None) or fn is getattr(aten._safe_softmax, "default", None):
        return Spelling("softmax", (node.args[0],), {"dim": node.args[1]})
    if fn in _TRANSPOSE_FNS or m in ("transpose", "swapaxes", "swapdims", "transpose_"):
        return Spelling("transpose", (node.args[0],), {"dims": (node.args[1], node.args[2])})
    if m == "t" or fn in (torch.t, aten.t.default):
        return Spelling("transpose", (node.args[0],), {"dims": (-2, -1)})
    if (fn is getattr and node.args[1] == "mT") or fn in _MT_FNS:
        return Spelling("transpose", (node.args[0],), {"dims": (-2, -1)})
    if (fn is getattr and node.args[1] == "T") or fn in _NUMPY_T_FNS:
        # Tensor.T reverses every axis: a last-two swap only for matrices.
        if len(shape_of(node.args[0]) or ()) == 2:
            return Spelling("transpose", (node.args[0],), {"dims": (-2, -1)})
        return None
    if fn in _PERMUTE_FNS or m == "permute":
        dims = node.args[1:] if m == "permute" else (node.args[1],)
        dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else tuple(dims)
        return Spelling("permute", (node.args[0],), {"dims": dims})
    if fn in _MUL_FNS or m in ("mul", "mul_", "__mul__", "__rmul__"):
        return Spelling("mul", (node.args[0], node.args[1]))
    if fn in _DIV_FNS or m in ("div", "div_", "__truediv__", "true_divide"):
        if node.kwargs.get("rounding_mode") is not None:
            return None
        return Spelling("div", (node.args[0], node.args[1]))
    if fn in _ADD_FNS or m in ("add", "add_", "__add__", "__radd__"):
        if node.kwargs.get("alpha", 1) != 1:
            return None
        return Spelling("add", (node.args[0], node.args[1]))
    if fn in _SUB_FNS or m in ("sub", "sub_", "__sub__", "__rsub__"):
        if node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
            return None
        a, b = node.args
        return Spelling("sub", (b, a) if m == "__rsub__" else (a, b))
    if fn in _MASKED_FILL_FNS or m in ("masked_fill", "masked_fill_"):
        return Spelling("masked_fill", (node.args[0], _a(node, 1, "mask")), {"value": _a(node, 2, "value")})
    if fn in _WHERE_FNS and len(node.args) == 3:
        return Spelling("where", tuple(node.args))
    if m == "where" and len(node.args) == 3:  # x.where(cond, y) == where(cond, x, y)
        return Spelling("where", (node.args[1], node.args[0], node.args[2]))
    ct = _cast_target(node)
    if ct is not None:
        return Spelling("cast", (node.args[0],), {"dtype": ct})
    if fn in _VIEW_FNS or m in ("view", "reshape"):
        return Spelling("view", (node.args[0],), {"shape": tuple(node.args[1:]) if m else node.args[1]})
    if fn in _IDENTITY_FNS or m in ("contiguous", "clone"):
        return Spelling("identity", (node.args[0],))
    if fn in _DROPOUT_FNS:
        p = _a(node, 1, "p", 0.5)
        training = _a(node, 2, "training" if fn is F.dropout else "train", True)
        return Spelling("dropout", (node.args[0],), {"p": p, "training": training})
    if fn in _SDPA_FNS:
        return Spelling("sdpa", (node.args[0], node.args[1], node.args[2]))
    if _FLASH_CPU is not None and fn is getattr(_FLASH_CPU, "default", None):
        return Spelling("sdpa_flash_cpu", (node.args[0], node.args[1], node.args[2]))
    if fn in _MHA_FNS:
        return Spelling("mha", tuple(node.args))
    if fn in _FUSED_MHA_FNS:
        return Spelling("fused_mha", tuple(node.args))
    if fn in _EXPAND_FNS or m == "expand":
        shape = tuple(node.args[1:]) if m else tuple(node.args[1])
        if m and len(shape) == 1 and isinstance(shape[0], (list, tuple, torch.Size)):
            shape = tuple(shape[0])
        return Spelling("expand", (node.args[0],), {"shape": shape})
    if fn in _UNSQUEEZE_FNS or m == "unsqueeze":
        return Spelling("unsqueeze", (node.args[0],), {"dim": _a(node, 1, "dim")})
    if fn is operator.getitem:
        return Spelling("getitem", (node.args[0],), {"index": node.args[1]})
    if fn in _REPEAT_INTERLEAVE_FNS or m == "repeat_interleave":
        return Spelling("repeat_interleave", (node.args[0],),
                        {"repeats": _a(node, 1, "repeats"), "dim": _a(node, 2, "dim")})
    if fn in _TANH_FNS or m == "tanh":
        return Spelling("tanh", (node.args[0],))
    if node.op == "call_module":
        return None
    return None


_EINSUM_RE = re.compile(r"^\s*([a-zA-Z.]+)\s*,\s*([a-zA-Z.]+)\s*->\s*([a-zA-Z.]+)\s*$")


def _spell_einsum(node: fx.Node) -> Spelling | None:
    """A two-operand einsum that is a batched ``A @ B`` or ``A @ Bᵀ`` over the last two axes."""
    eq = node.args[0]
    ops = node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = tuple(ops[0])
    if not isinstance(eq, str) or len(ops) != 2:
        return None
    mt = _EINSUM_RE.match(eq.replace(" ", ""))
    if not mt or "." in eq:
        return None
    a, b, out = mt.groups()
    if len(a) < 2 or len(b) < 2 or len(a) != len(b) or len(out) != len(a):
        return None
    batch = a[:-2]
    if b[:-2] != batch or out[:-2] != batch:
        return None
    i, r = a[-2], a[-1]
    if b == batch + r + b[-1] and out == batch + i + b[-1]:  # ...ir,...rj->...ij
        return Spelling("matmul", (ops[0], ops[1]))
    if b[-1] == r and out == batch + i + b[-2]:  # ...ir,...jr->...ij  (A @ Bᵀ)
        return Spelling("matmul", (ops[0], ops[1]), {"rhs_transposed": True})
    return None


# ----------------------------------------------------------------------------------------------
# constants


def constant_value(arg: Any):
    """The Python number an argument stands for, or None when it is not a graph constant.

    Folds 0-d tensors built from constants (``torch.full([], c)``, ``torch.tensor(c)``,
    ``scalar_tensor``), ``math.sqrt`` of constants and casts of those — the spellings real models
    use for ``sqrt(head_dim)`` and ``finfo.min``.
    """
    if isinstance(arg, bool):
        return None
    if isinstance(arg, (int, float)):
        return float(arg)
    if not isinstance(arg, fx.Node) or arg.op != "call_function":
        if isinstance(arg, fx.Node):
            s = spell(arg)
            if s is not None and s.op in ("cast", "identity"):
                return constant_value(s.args[0])
        return None
    fn = arg.target
    if fn in (torch.full, aten.full.default) and tuple(arg.args[0]) == ():
        return constant_value(arg.args[1])
    if fn in (torch.tensor, torch.scalar_tensor, torch.as_tensor, aten.scalar_tensor.default):
        return constant_value(arg.args[0])
    if fn in (math.sqrt, getattr(torch, "sym_sqrt", math.sqrt)):
        v = constant_value(arg.args[0])
        return None if v is None else math.sqrt(v)
    if fn in (operator.truediv, operator.mul, operator.pow, operator.neg):
        vals = [constant_value(a) for a in arg.args]
        if any(v is None for v in vals):
            return None
        return {operator.truediv: lambda a, b: a / b, operator.mul: lambda a, b: a * b,
                operator.pow: lambda a, b: a ** b, operator.neg: lambda a: -a}[fn](*vals)
    s = spell(arg)
    if s is not None and s.op in ("cast", "identity"):
        return constant_value(s.args[0])
    return None


def is_very_negative(value) -> bool:
    """A fill value that means "masked" (``-inf``, ``finfo.min``, ``-1e9``, ``-10000``...)."""
    return value is not None and value <= -1e4


# ----------------------------------------------------------------------------------------------
# parameters


def _placeholder_is_param(node: fx.Node) -> bool:
    ga = node.meta.get("grapharg")
    if ga is not None:
        ex = getattr(ga, "example", None)
        if isinstance(ex, torch.nn.Parameter):
            return True
        src = getattr(ga, "source", None)
        if src is not None and "parameters" in src.name:
            return True
    # torch.export graphs are matched after ``ExportedProgram.module()``, where parameters are
    # get_attr nodes, so a placeholder without a dynamo grapharg is a user input.
    return False


def _placeholder_kind(node: fx.Node) -> str:
    """``"param"``, ``"buffer"``, ``"size"`` (a symbolic int/float) or ``"input"``."""
    if _placeholder_is_param(node):
        return "param"
    ex = example(node)
    if ex is not None and not isinstance(ex, torch.Tensor):
        return "size"
    ga = node.meta.get("grapharg")
    src = getattr(getattr(ga, "source", None), "name", "") if ga is not None else ""
    if "_buffers" in src:
        return "buffer"
    return "input"


def depends_on_input(node: Any, _memo: dict | None = None) -> bool:
    """True when ``node``'s value depends on a graph input that is neither a parameter nor a
    buffer (nor a symbolic size): the data the model was called with.

    This is the rule that separates attention from a lookup into learned memory: keys and values
    must be computed from the input (``F.normalize(param)``, ``param / param.norm()``, a weight
    norm are all still parameters), while queries may be parameters (learned latents)."""
    if not isinstance(node, fx.Node):
        return False
    memo = _memo if _memo is not None else node.graph.__dict__.setdefault("_attnswap_dep", {})
    stack, order = [node], []
    while stack:  # iterative post-order: graphs can be deeper than Python's recursion limit
        n = stack.pop()
        if n in memo:
            continue
        if n.op == "placeholder":
            memo[n] = _placeholder_kind(n) == "input"
            continue
        if n.op == "get_attr":
            memo[n] = False
            continue
        pending = [a for a in n.all_input_nodes if a not in memo]
        if pending:
            stack.append(n)
            stack.extend(pending)
            continue
        memo[n] = any(memo[a] for a in n.all_input_nodes)
    return memo[node]


_INPLACE_FNS = {operator.iadd, operator.imul, operator.itruediv, operator.isub, operator.ifloordiv,
                operator.ipow, operator.imod, operator.iand, operator.ior, operator.ixor,
                operator.ilshift, operator.irshift, operator.setitem}


_INPLACE_DUNDERS = {f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "pow", "mod",
                                             "and", "or", "xor", "lshift", "rshift", "matmul")}
_INPLACE_DUNDERS.add("__setitem__")


def is_mutating(node: fx.Node) -> bool:
    """An op that writes into one of its operands (``x += 1``, ``x.add_(1)``, ``x[i] = y``,
    an aten op whose schema mutates): erasing it changes what the program computes even when
    its result has no users."""
    if node.op == "call_method":
        t = node.target if isinstance(node.target, str) else ""
        if t in _INPLACE_DUNDERS:  # x.__iadd__(y), x.__setitem__(i, y)
            return True
        return t.endswith("_") and not t.endswith("__")
    if node.op != "call_function":
        return False
    if node.target in _INPLACE_FNS:
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is not None and getattr(schema, "is_mutable", False):
        return True
    name = getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def is_parameter(node: Any) -> bool:
    """True when ``node`` is (a view, cast or transpose of) a parameter or another constant."""
    seen = 0
    while isinstance(node, fx.Node) and seen < 16:
        seen += 1
        if node.op == "get_attr":
            return True
        if node.op == "placeholder":
            return _placeholder_is_param(node)
        s = spell(node)
        if s is None or s.op not in ("cast", "identity", "view", "transpose", "permute", "unsqueeze",
                                     "expand"):
            return False
        node = s.args[0]
    return False


def is_learnable(node: Any) -> bool:
    if not isinstance(node, fx.Node):
        return False
    ex = example(node)
    return isinstance(ex, torch.Tensor) and ex.requires_grad and is_parameter(node)
