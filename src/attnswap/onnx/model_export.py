"""Export any model with swapped attention to ONNX, and compare it against the original.

``convert()`` rewrites attention inside a dynamo-compiled forward, which ``torch.export`` does not
trace. So the export path runs the *same passes* on the ``torch.export`` graph instead:
``torch.export`` of the original code → ``ExportedProgram.module()`` (parameters as ``get_attr``)
→ canonicalize → retarget (SAS / QK-norm modules are the converted model's own) → export again
with the ``attnswap::attention`` translation. One pass library, two capture front ends.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..models import output_tensor
from ..passes.pipeline import run_pipeline
from ..passes.retarget import RetargetSpec
from ..rewriter.convert import ExampleInputs, _example_call, conversion_of, convert, original_code
from ..rewriter.site_identity import code_key, key_matches_suffix
from ..rewriter.report import ConversionReport
from .export import _export_error, _strings_to_dims, export_module, export_program


def _complete_shapes(dynamic_shapes, kwargs):
    """torch.export wants a key for every keyword input; the ones not named are static."""
    if isinstance(dynamic_shapes, dict) and kwargs:
        return {**{k: None for k in kwargs}, **dynamic_shapes}
    return dynamic_shapes


def rewrite_for_export(model, example_inputs=None, attention: str | None = None, *,
                       dynamic_shapes=None, strict: bool = False, **options):
    """``(graph_module, report, args, kwargs, model, dynamic_shapes)``: the model's exported graph with its
    attention rewritten. ``model`` is either converted already (its spec is used) or converted
    now with ``attention``/``options`` (SAS and QK-norm need their parameters first)."""
    args, kwargs = _example_call(model, example_inputs)
    import inspect

    if "use_cache" in inspect.signature(type(model).forward).parameters:
        # A KV cache object is not an ONNX value: export the cache-free forward.
        kwargs.setdefault("use_cache", False)
    dynamic_shapes = _complete_shapes(dynamic_shapes, kwargs)
    spec = getattr(model, "attnswap_spec", None)
    if spec is None:
        if attention is None:
            raise ValueError("pass attention=... or a model returned by attnswap.convert")
        spec = RetargetSpec.build(attention, **options)
        if spec.needs_parameters:
            model = convert(model, attention, ExampleInputs(args, kwargs), **options)
            spec = model.attnswap_spec
    elif attention is not None and attention != spec.kind:
        raise ValueError(f"the model was converted to {spec.kind!r}; cannot export it as "
                         f"{attention!r}. Export the original model instead.")
    with original_code(model):
        ep = export_program(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    gm = ep.module()
    report = ConversionReport(attention=spec.kind, model=type(model).__name__)
    result = run_pipeline(gm, spec, root=model, accept=spec.accept,
                          extras_for=_converted_extras(model) if spec.needs_parameters else None)
    report.add_graph(result.sites, result.skipped)
    return gm, report, args, kwargs, model, dynamic_shapes


def _converted_extras(model):
    """SAS / QK-norm modules for the sites of a whole-model export graph: the converted model's
    own, found by the site's owner module and its code key (the region's keys are the tail of the
    export graph's frames)."""
    conv = conversion_of(model)

    def extras_for(rec, node):
        try:
            owner = model.get_submodule(rec.owner) if rec.owner else model
        except AttributeError:
            return None, f"owner module {rec.owner!r} not found in the model"
        holder = owner._modules.get("attnswap")
        if holder is None or not len(holder):
            return None, (f"{rec.owner or '<root>'} has no SAS/QK-norm parameters: it was not "
                          "converted (or was deselected)")
        if len(holder) == 1:
            return next(iter(holder.values())), None
        key = code_key(rec.anchor)
        for _table, entries in (conv.ordinals.items() if conv else ()):
            for region_key, ordinal in entries.items():
                if key_matches_suffix(region_key, key) and str(ordinal) in holder._modules:
                    return holder[str(ordinal)], None
        return None, f"could not tell which of {rec.owner}'s {len(holder)} sites this is"

    return extras_for


def export(model, example_inputs=None, path=None, attention: str | None = None, *,
           dynamic_shapes=None, opset: int | None = None, strict: bool = False,
           **options):
    """Export ``model`` with its attention swapped to ``attention`` (or, for a model returned
    by :func:`attnswap.convert`, as converted). Returns ``(onnx.ModelProto, ConversionReport)``.

    ``dynamic_shapes``: torch.export's spec for the model's inputs, e.g. from
    :func:`attnswap.onnx.dynamic_shapes` (axis names as strings are accepted).
    """
    gm, report, args, kwargs, _, dynamic_shapes = rewrite_for_export(
        model, example_inputs, attention, dynamic_shapes=dynamic_shapes, strict=strict, **options)
    if not report.sites:
        raise ValueError(f"no attention site found in {type(model).__name__}'s exported graph; "
                         f"nothing to swap.\n{report}")
    # ExportedProgram.module() refuses .eval(); it is already an inference graph, so export it
    # directly (export_module's own eval-mode wrapper is for user modules).
    shapes = _strings_to_dims(dynamic_shapes)
    with torch.no_grad():
        try:
            ep = torch.export.export(gm, tuple(args), kwargs=dict(kwargs) or None,
                                     dynamic_shapes=shapes, strict=False)
        except Exception as e:
            raise _export_error(e, strict=False, dynamic=shapes is not None) from e
        proto = export_module(ep, path=path, opset=opset)
    return proto, report


def compare(model, example_inputs=None, attention: str = "sigmoid", *, inputs=None,
            dynamic_shapes=None, opset: int | None = None, repeat: int = 20, print_table=True,
            **options) -> list[dict]:
    """Original (softmax) vs converted model, each in PyTorch and in onnxruntime (graph
    optimizations on), on the same inputs: max abs / rel error ONNX vs PyTorch and the median
    latency of each, measured in this process. Returns the rows; prints a rich table."""
    from . import runtime

    args, kwargs = _example_call(model, example_inputs)
    run_args, run_kwargs = _example_call(model, inputs) if inputs is not None else (args, kwargs)
    rows = []
    converted = model if getattr(model, "attnswap_spec", None) else convert(
        model, attention, ExampleInputs(args, kwargs), **options)
    original = model if converted is not model else None
    for label, kind, m in (("original", "softmax", original), ("converted", attention, converted)):
        if m is None:
            continue
        proto, report = export(m, ExampleInputs(args, kwargs), attention=kind,
                               dynamic_shapes=dynamic_shapes, opset=opset)
        sess = runtime.session(proto)
        feed = {k: v for k, v in run_kwargs.items() if isinstance(v, torch.Tensor)}
        feed = list(run_args) if run_args else feed
        ort_out = runtime.run(sess, feed)
        with torch.no_grad():
            torch_out = m(*run_args, **run_kwargs)
        cmp = runtime.compare_outputs(output_tensor(torch_out), ort_out[:1])
        t_torch = runtime.time_torch(m, run_args, run_kwargs, repeat=repeat)
        t_ort = runtime.time_session(sess, feed, repeat=repeat)
        rows.append({
            "model": type(model).__name__, "variant": label, "attention": kind,
            "sites": len(report.sites), "max_abs_err": cmp.max_abs, "max_rel_err": cmp.max_rel,
            "torch_ms": t_torch.median_ms, "ort_ms": t_ort.median_ms,
        })
    if print_table:
        _print(rows)
    return rows


def _print(rows):
    from rich.console import Console
    from rich.table import Table

    t = Table(title="ONNX (onnxruntime, CPU) vs PyTorch, same inputs, same process")
    for col in ("model", "variant", "attention", "sites", "max abs err", "max rel err",
                "torch ms", "ORT ms"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["model"], r["variant"], r["attention"], str(r["sites"]),
                  f"{r['max_abs_err']:.2e}", f"{r['max_rel_err']:.2e}", f"{r['torch_ms']:.2f}",
                  f"{r['ort_ms']:.2f}")
    Console().print(t)
