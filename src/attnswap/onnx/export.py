"""Export a module that calls ``attnswap.attention`` (or an ``ExportedProgram``) to ONNX.

The path is ``torch.export.export`` (non-strict by default) → ``torch.onnx.export(dynamo=True)``
with :func:`translation_table`, so every ``attnswap::attention`` node becomes standard ONNX ops
(see :mod:`attnswap.onnx.translation`). Dynamic axes are ``torch.export`` dynamic shapes:
``Dim`` objects, ``Dim.AUTO``/``Dim.DYNAMIC`` hints or plain strings (an axis name, exported as
``Dim.DYNAMIC``); :func:`dynamic_shapes` builds them from a ``dynamic_axes``-style mapping. The
ONNX inputs' symbolic dims get those names.

Export is for inference: the module is exported in eval mode (its training flag is restored
afterwards) and a site with ``dropout_p > 0`` is an error.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
from typing import Any, Mapping, Sequence

import torch

from .translation import (
    ATTENTION_OP_OPSET,
    MIN_OPSET,
    TranslationError,
    make_translation,
)

DEFAULT_OPSET = 20
"""The opset used when none is given (torch's own default; runs on onnxruntime >= 1.17).
Pass ``opset=23`` to emit plain softmax sites as the faster ONNX ``Attention`` op."""

_PIP_HINT = 'pip install "attnswap[onnx]"'


class MissingOnnxDependencyError(ImportError):
    """onnx, onnxscript or onnxruntime is not installed."""


def require(*modules: str):
    """Import and return ``modules`` (e.g. ``"onnx"``), or raise a clear ImportError."""
    import importlib

    loaded = []
    missing = []
    for name in modules:
        try:
            loaded.append(importlib.import_module(name))
        except ImportError as e:
            missing.append(f"{name} ({e})")
    if missing:
        raise MissingOnnxDependencyError(
            "attnswap's ONNX support needs onnx, onnxscript and onnxruntime; missing: "
            + ", ".join(missing)
            + f". Install them with: {_PIP_HINT}"
        )
    return loaded[0] if len(loaded) == 1 else tuple(loaded)


def translation_table(opset: int | None = None, *, attention_op: bool | None = None) -> dict:
    """``{torch.ops.attnswap.attention.default: translation}`` for ``torch.onnx.export``'s
    ``custom_translation_table=``. Without ``opset`` the translation uses opset-18 ops only, so
    it is valid whatever ``opset_version=`` the export uses; with ``opset``, pass the same value
    as ``opset_version=`` (it enables ``Gelu`` from 20 and the ``Attention`` op from 23)."""
    require("onnx", "onnxscript")
    from .translation import translation_table as _table

    return _table(opset, attention_op=attention_op)


# ----------------------------------------------------------------------------------------------
# dynamic shapes


def _forward_signature(module) -> inspect.Signature:
    fn = module.forward if isinstance(module, torch.nn.Module) else module
    return inspect.signature(fn)


def dynamic_shapes(
    module,
    args: tuple = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    axes: Mapping[str, Mapping[int, str] | Sequence[int]],
) -> dict[str, Any]:
    """torch.export ``dynamic_shapes`` from a ``dynamic_axes``-style mapping.

    ``axes`` maps a ``forward`` argument name to ``{axis: name}`` (or a list of axes, named
    ``"<arg>_dim<axis>"``). One name used on several axes is one ``torch.export.Dim``, so those
    sizes must be equal::

        ds = dynamic_shapes(model, (x, mask), axes={"x": {0: "batch", 1: "seq"},
                                                   "mask": {0: "batch", 2: "seq", 3: "seq"}})
        export_module(model, (x, mask), dynamic_shapes=ds)

    Every bound argument gets an entry (``None`` = static), as ``torch.export`` wants.
    """
    sig = _forward_signature(module)
    try:
        bound = sig.bind(*args, **dict(kwargs or {}))
    except TypeError as e:
        raise ValueError(f"args/kwargs do not match {type(module).__name__}.forward{sig}: {e}") from None
    unknown = set(axes) - set(bound.arguments)
    if unknown:
        raise ValueError(
            f"dynamic axes name arguments {sorted(unknown)} that forward{sig} was not called with; "
            f"known: {list(bound.arguments)}"
        )
    dims: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        spec = axes.get(name)
        if spec is None:
            out[name] = None
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"dynamic axes given for {name!r}, which is not a tensor")
        if not isinstance(spec, Mapping):
            spec = {int(a): f"{name}_dim{int(a)}" for a in spec}
        entry = {}
        for axis, dim_name in spec.items():
            axis = int(axis)
            if not -value.dim() <= axis < value.dim():
                raise ValueError(f"axis {axis} is out of range for {name!r} of shape {tuple(value.shape)}")
            if not isinstance(dim_name, str) or not dim_name.isidentifier():
                raise ValueError(f"dynamic axis name {dim_name!r} for {name!r} must be an identifier")
            if dim_name not in dims:
                dims[dim_name] = torch.export.Dim(dim_name)
            entry[axis % value.dim()] = dims[dim_name]
        out[name] = entry
    return out


def _dim_name(dim) -> str | None:
    if isinstance(dim, str):
        return dim
    if isinstance(dim, torch.export.Dim) or type(dim).__name__ in ("Dim", "_Dim", "_DerivedDim"):
        name = getattr(dim, "__name__", None)
        return name if isinstance(name, str) else None
    return None


def _strings_to_dims(spec):
    """Replace string axis names by ``Dim.DYNAMIC`` (as torch.onnx.export does)."""
    if isinstance(spec, str):
        return torch.export.Dim.DYNAMIC
    if isinstance(spec, Mapping):
        return {k: _strings_to_dims(v) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return type(spec)(_strings_to_dims(v) for v in spec)
    return spec


def _wanted_dim_names(module, args, kwargs, shapes) -> dict[tuple[str, int], str]:
    """``{(top-level input name, axis): dim name}`` for renaming the ONNX inputs' dims."""
    if shapes is None:
        return {}
    if isinstance(shapes, Mapping):
        items = list(shapes.items())
    else:
        try:
            names = list(_forward_signature(module).bind(*args, **dict(kwargs or {})).arguments)
        except TypeError:
            return {}
        items = list(zip(names, shapes))
    wanted = {}
    for name, spec in items:
        if isinstance(spec, Mapping):
            pairs = spec.items()
        elif isinstance(spec, (list, tuple)):
            pairs = enumerate(spec)
        else:
            continue
        for axis, dim in pairs:
            dim_name = _dim_name(dim)
            if dim_name is not None and isinstance(axis, int):
                wanted[(name, axis)] = dim_name
    return wanted


def _rename_dims(model, wanted: Mapping[tuple[str, int], str]) -> None:
    """Rename symbolic dims (``s0`` …) of the graph's inputs, everywhere they occur."""
    if not wanted:
        return
    mapping: dict[str, str] = {}
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        for axis, d in enumerate(dims):
            new = wanted.get((inp.name, axis)) or wanted.get((inp.name, axis - len(dims)))
            if new and d.dim_param and d.dim_param not in mapping:
                mapping[d.dim_param] = new
    if not mapping:
        return
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if not vi.type.HasField("tensor_type"):
            continue
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in mapping:
                d.dim_param = mapping[d.dim_param]


# ----------------------------------------------------------------------------------------------
# errors


_EXPORT_HINTS = (
    (
        re.compile(r"Constraints violated|specializ|not.*dynamic|marked as dynamic", re.I),
        "a dimension marked dynamic was specialized to a constant (Python code branches on it, "
        "compares it with a constant, or the example size is 0 or 1). Give example inputs whose "
        "dynamic sizes are >= 2, use Dim.AUTO for that axis, or make it static (drop it from "
        "dynamic_shapes)",
    ),
    (
        re.compile(r"data[- ]dependent|GuardOnDataDependent|\.item\(\)|nonzero|unbacked", re.I),
        "the model branches on a tensor's *value* (data-dependent control flow, .item(), "
        "nonzero()). Rewrite it with torch.where / torch.cond, or export with fixed inputs",
    ),
    (
        re.compile(r"Unsupported|dynamo|graph break", re.I),
        "torch.export could not trace a Python construct. Try non-strict export (strict=False, "
        "the default)",
    ),
)


def _user_code(lines: list[str]) -> list[str]:
    """The last ``File "...", line N, in fn`` frame torch names, with its code line."""
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].lstrip().startswith('File "'):
            return [ln.strip() for ln in lines[i:i + 2]]
    return []


def _export_error(exc: BaseException, *, strict: bool, dynamic: bool) -> RuntimeError:
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # torch's message: first lines say what failed; "You marked ..." lines say which dim.
    keep = lines[:3] + [ln for ln in lines[3:] if re.search(r"You marked|specialized", ln)][:3]
    for i, ln in enumerate(lines[:3]):
        if ln.strip().startswith("Suggested fixes") and i + 1 < len(lines):
            keep = lines[:i + 2]
            break
    summary = "\n".join("    " + ln.strip() for ln in keep)
    code = _user_code(lines)
    cause = None
    for pattern, hint in _EXPORT_HINTS:
        if pattern.search(text) or pattern.search(type(exc).__name__):
            cause = hint
            break
    tries = ["non-strict export (strict=False)" if strict else
             "strict export (strict=True) if the failing construct is plain Python"]
    if dynamic:
        tries.append("fixed shapes (dynamic_shapes=None)")
    tries.append(
        "if the failing code is the attention itself: replace it by one attnswap.attention call "
        "(an opaque op that torch.export keeps as one node; attnswap.convert(model) finds and "
        "rewrites such sites)"
    )
    msg = (
        f"torch.export ({'strict' if strict else 'non-strict'}) failed on the model "
        f"({type(exc).__name__}):\n{summary}\n"
        + ("  at:\n" + "\n".join("    " + ln for ln in code) + "\n" if code else "")
        + (f"Likely cause: {cause}.\n" if cause else "")
        + "Things to try: " + "; ".join(tries) + ". (The full torch error is chained below.)"
    )
    return RuntimeError(msg)


def _find_translation_error(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (TranslationError, MissingOnnxDependencyError)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


# ----------------------------------------------------------------------------------------------
# export


@contextlib.contextmanager
def _eval_mode(module):
    if not isinstance(module, torch.nn.Module):
        yield
        return
    was_training = [m.training for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, t in zip(module.modules(), was_training):
            m.training = t


def attention_sites(ep) -> list:
    """The ``attnswap::attention`` nodes of an ExportedProgram (or fx graph)."""
    graph = ep.graph if hasattr(ep, "graph") else ep
    target = torch.ops.attnswap.attention.default
    return [n for n in graph.nodes if n.op == "call_function" and n.target is target]


def _check_sites(ep) -> None:
    for node in attention_sites(ep):
        args = list(node.args)
        dropout_p = args[7] if len(args) > 7 else node.kwargs.get("dropout_p", 0.0)
        if float(dropout_p) > 0.0:
            stack = node.meta.get("nn_module_stack") or {}
            where = next(reversed(stack.values()))[0] if stack else node.name
            raise TranslationError(
                f"attention site {where!r} has dropout_p={dropout_p}: ONNX export is for "
                "inference. Pass dropout_p=0.0 outside training (e.g. "
                "dropout_p=self.p if self.training else 0.0); the exporter runs the module in "
                "eval mode."
            )


def _check_converted(module, ep) -> None:
    """A model from ``attnswap.convert`` must have its sites in the exported program."""
    report = getattr(module, "attnswap_report", None)
    sites = getattr(report, "sites", None) or ()
    found = len(attention_sites(ep))
    if len(sites) > found:
        raise RuntimeError(
            f"{type(module).__name__} was converted by attnswap.convert ({len(sites)} attention "
            f"site(s)), but torch.export captured {found} attnswap::attention op(s): convert() "
            "swaps attention inside a torch.compile wrapper that torch.export does not trace, so "
            "the ONNX file would hold the original softmax model. Export a module whose forward "
            "calls attnswap.attention, or an ExportedProgram whose sites were rewritten to "
            "attnswap::attention."
        )


def export_program(module, args=(), kwargs=None, *, dynamic_shapes=None, strict: bool = False):
    """``torch.export.export`` in eval mode, with errors turned into actionable RuntimeErrors."""
    if isinstance(module, torch.export.ExportedProgram):
        return module
    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            f"export needs an nn.Module or a torch.export.ExportedProgram, got {type(module).__name__}"
        )
    args = tuple(args) if isinstance(args, (list, tuple)) else (args,)
    shapes = _strings_to_dims(dynamic_shapes)
    from ..rewriter.convert import original_code

    # A converted model's regions run compiled code torch.export cannot trace: export traces the
    # original code (attnswap.onnx.export then rewrites it with the same passes).
    with _eval_mode(module), original_code(module):
        try:
            return torch.export.export(
                module, args, kwargs=dict(kwargs or {}) or None, dynamic_shapes=shapes,
                strict=strict,
            )
        except Exception as e:  # torch raises many types here
            raise _export_error(e, strict=strict, dynamic=dynamic_shapes is not None) from e


def export_module(
    module,
    args=(),
    kwargs: Mapping[str, Any] | None = None,
    path: str | os.PathLike | None = None,
    *,
    dynamic_shapes=None,
    opset: int | None = None,
    attention_op: bool | None = None,
    strict: bool = False,
    optimize: bool = True,
    check: bool = True,
):
    """Export ``module`` (an ``nn.Module`` whose forward calls ``attnswap.attention``, or an
    ``ExportedProgram``) to an ``onnx.ModelProto``; also save it to ``path`` if given.

    ``dynamic_shapes``: torch.export's (``Dim`` objects, ``Dim.AUTO``/``Dim.DYNAMIC``, or axis
    names as strings); see :func:`dynamic_shapes`. Ignored for an ExportedProgram (its shapes
    are already decided). ``opset``: the ONNX opset (default :data:`DEFAULT_OPSET`, at least
    18). ``attention_op``: see :func:`attnswap.onnx.translation.make_translation`.
    ``strict``: torch.export's strict mode (non-strict is the default and the most permissive).
    ``check``: run ``onnx.checker.check_model``.
    """
    onnx, _ = require("onnx", "onnxscript")
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if opset < MIN_OPSET:
        raise ValueError(
            f"opset={opset} is too old: exporting attnswap::attention needs ONNX opset >= {MIN_OPSET}"
        )
    if attention_op and opset < ATTENTION_OP_OPSET:
        raise ValueError(
            f"attention_op=True needs ONNX opset >= {ATTENTION_OP_OPSET} (the ONNX Attention "
            f"op); got opset={opset}"
        )
    table = {torch.ops.attnswap.attention.default: make_translation(opset, attention_op=attention_op)}

    if isinstance(module, torch.export.ExportedProgram):
        ep = module
        wanted = {}
    else:
        args = tuple(args) if isinstance(args, (list, tuple)) else (args,)
        ep = export_program(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
        wanted = _wanted_dim_names(module, args, kwargs, dynamic_shapes)
        _check_converted(module, ep)
    _check_sites(ep)

    try:
        program = torch.onnx.export(
            ep, (), dynamo=True, custom_translation_table=table, opset_version=opset,
            optimize=optimize, verbose=False, report=False,
        )
    except Exception as e:
        inner = _find_translation_error(e)
        if inner is not None:
            raise type(inner)(str(inner)) from e
        raise RuntimeError(
            f"translating the exported program to ONNX (opset {opset}) failed: "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}\n"
            "Every attnswap::attention node is translated by attnswap; another op in the model "
            "may lack an ONNX translation in this torch version (see the chained error)."
        ) from e

    model = program.model_proto
    _rename_dims(model, wanted)
    if check and model.ByteSize() < 2**31:  # the in-memory checker is limited to 2 GB
        onnx.checker.check_model(model)
    if path is not None:
        save(model, path)
    return model


def save(model, path: str | os.PathLike) -> None:
    """Save a ModelProto; weights go to an external file when the model is >= 2 GB."""
    import onnx

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    big = model.ByteSize() >= 2**31 - 2**24
    if big:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(path) + ".data")
    else:
        onnx.save_model(model, path)


__all__ = [
    "DEFAULT_OPSET",
    "MissingOnnxDependencyError",
    "attention_sites",
    "dynamic_shapes",
    "export_module",
    "export_program",
    "require",
    "save",
    "translation_table",
]
