"""The ``attnswap`` torch.compile backend.

Registered through the ``torch_dynamo_backends`` entry point, so::

    torch.compile(model, backend="attnswap", options={"attention": "relu", "activation": "relu2"})

works without importing attnswap. Options: ``attention`` (kind), the kind's options (see
``passes/retarget.py``), ``include``/``exclude`` globs, ``inner`` (``"eager"`` default,
``"inductor"``, ``"aot_eager"`` or any registered backend).
"""

from __future__ import annotations

import warnings

import torch
import torch.fx as fx

from ..passes.canonicalize import SkipRecord, canonicalize
from ..passes.retarget import RetargetSpec, retarget
from .report import ConversionReport

# Skip reasons that mean "this softmax probably *was* attention, and it still runs as softmax".
_LOUD = ("graph break", "fused attention kernel", "not found in the model", "head axis",
         "symbolic", "consumers")


class AttentionSwapWarning(UserWarning):
    """A site that attnswap could not convert, or a fallback the user must know about."""


class AttnswapCompiler:
    """Dynamo backend: canonicalize, retarget, then hand the graph to the inner compiler."""

    def __init__(self, spec: RetargetSpec, root: torch.nn.Module | None = None,
                 report: ConversionReport | None = None, inner: str = "eager"):
        self.spec = spec
        self.root = root
        if report is None:
            report = ConversionReport(attention=spec.kind, model=type(root).__name__ if root else "")
        self.report = report
        self.inner = inner
        self.expected_calls = 0  # op executions the rewritten graphs have promised so far

    def __call__(self, gm: fx.GraphModule, example_inputs):
        records, skipped = canonicalize(gm, self.root, accept=self.spec.accept)
        for rec, why in retarget(gm, records, self.spec, self.root):
            rec.kind = "softmax"
            skipped.append(SkipRecord(rec.owner, rec.owner_type, "attention",
                                      f"kept as softmax: {why}"))
        self.report.add_graph(records, skipped)
        for s in skipped:
            if any(word in s.reason for word in _LOUD):
                warnings.warn(f"attnswap: softmax at {s.location or '<root>'} not converted to "
                              f"{self.spec.kind}: {s.reason}", AttentionSwapWarning, stacklevel=2)
        compiled = self._inner(gm, example_inputs)
        n = len(records)

        def run(*args):
            self.expected_calls += n
            return compiled(*args)

        run.attnswap_sites = n
        return run

    def _inner(self, gm, example_inputs):
        if self.inner == "eager":
            return gm.forward
        from torch._dynamo import lookup_backend

        if not any(n.op == "call_module" and n.target.startswith("attnswap_site_")
                   for n in gm.graph.nodes):
            return lookup_backend(self.inner)(gm, example_inputs)
        # Dynamo still reads this graph's placeholders after we return: lift on a copy.
        g = fx.Graph()
        g.output(g.graph_copy(gm.graph, {}))
        gm = fx.GraphModule(gm, g)
        params = _lift_extras(gm)
        # Compiled on first run, outside dynamo's tracing context, whose input-source
        # bookkeeping does not know the lifted parameters.
        compiled = []

        def run(*args):
            if not compiled:
                compiled.append(lookup_backend(self.inner)(gm, list(args) + params))
            return compiled[0](*args, *params)

        return run


# AOT-based compilers (inductor, aot_eager) only accept parameters that dynamo saw as inputs.
# The SAS / QK-norm parameters are added after dynamo, so they become extra graph inputs, and the
# modules are called functionally on them: gradients still reach the very same Parameters.
_EXTRAS: dict[int, torch.nn.Module] = {}


def call_extras(key: int, names: tuple, params: list, *args, **kwargs):
    return torch.func.functional_call(_EXTRAS[key], dict(zip(names, params)), args, kwargs)


def _lift_extras(gm: fx.GraphModule) -> list:
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("attnswap_site_")]
    if not nodes:
        return []
    anchor = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    lifted, values = {}, []
    for n in nodes:
        mod = gm.get_submodule(n.target)
        if id(mod) not in lifted:
            names = tuple(name for name, _ in mod.named_parameters())
            phs = []
            for name in names:
                with gm.graph.inserting_after(anchor):
                    anchor = gm.graph.placeholder(f"attnswap_{n.target}_{name.replace('.', '_')}")
                phs.append(anchor)
                values.append(mod.get_parameter(name))
            _EXTRAS[id(mod)] = mod
            lifted[id(mod)] = (names, phs)
        names, phs = lifted[id(mod)]
        with gm.graph.inserting_before(n):
            new = gm.graph.call_function(call_extras, (id(mod), names, list(phs), *n.args), dict(n.kwargs))
        new.meta.update(n.meta)
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
    for target in {n.target for n in nodes}:
        gm.delete_submodule(target)
    gm.recompile()
    return values


last_report: ConversionReport | None = None


def attnswap_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, **_):
    """Entry point for ``torch.compile(..., backend="attnswap", options={...})``."""
    global last_report
    opts = dict(options or {})
    kind = opts.pop("attention", "softmax")
    inner = opts.pop("inner", "eager")
    include, exclude = opts.pop("include", None), opts.pop("exclude", None)
    spec = RetargetSpec.build(kind, include=include, exclude=exclude, **opts)
    if spec.needs_parameters:
        raise ValueError(
            f"backend='attnswap' with attention={kind!r}"
            f"{' and qk_norm' if spec.options.get('qk_norm') else ''} needs new parameters that "
            "the optimizer must know before compiling. Convert first: "
            f"model = attnswap.convert(model, attention={kind!r}, ...); it returns a compiled, "
            "trainable model."
        )
    if last_report is None or last_report.attention != kind:
        last_report = ConversionReport(attention=kind)
    return AttnswapCompiler(spec, report=last_report, inner=inner)(gm, example_inputs)
