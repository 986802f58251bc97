"""The ``attnswap`` torch.compile backend.

Registered through the ``torch_dynamo_backends`` entry point, so::

    torch.compile(model, backend="attnswap", options={"attention": "relu", "activation": "relu2"})

works without importing attnswap. Options: ``attention`` (kind), the kind's options (see
``passes/retarget.py``), ``include``/``exclude`` globs, ``inner`` (``"eager"`` default,
``"inductor"``, ``"aot_eager"`` or any registered backend). ``attnswap.report_of(model)`` gives
the report of that model (each compiled model has its own).

``convert()`` uses the same compiler on each region (``rewriter/regions.py``): there the graph
is one region's forward, shared by every instance of its class, and the sites' identities and
learned parameters come from the region being called.
"""

from __future__ import annotations

import weakref
import warnings
from typing import Callable

import torch
import torch.fx as fx

from torch._dynamo.exc import ShortenTraceback

from ..options import AttnswapOptionError, check_inner
from ..passes.pipeline import PipelineResult, run_pipeline
from ..passes.retarget import RetargetSpec
from ..runtime.region import run_site_extras, site_extras
from .report import ConversionReport

# Skip reasons that mean "this softmax probably *was* attention, and it still runs as softmax".
LOUD = ("graph break", "fused attention kernel", "not found in the model", "head axis",
        "symbolic", "consumers", "kept as softmax", "outside this graph", "leave the compiled graph",
        "dynamo is disabled")


class AttentionSwapWarning(UserWarning):
    """A site that attnswap could not convert, or a fallback the user must know about."""


class AttnswapError(RuntimeError):
    """A converted model could not run as converted (strict mode, recompile limits...)."""


def is_loud(reason: str) -> bool:
    return any(word in reason for word in LOUD)


class AttnswapCompiler:
    """Dynamo backend: the pass pipeline, then the inner compiler.

    ``on_graph(gm, result) -> hooks`` lets a caller (the regional conversion) take part:
    ``hooks.assign``/``hooks.extras_for`` go to the pipeline, ``hooks.wrap(run)`` wraps the
    compiled callable. Without it, results go into ``report``.
    """

    def __init__(self, spec: RetargetSpec, report: ConversionReport | None = None,
                 inner: str = "eager", regional=None):
        self.spec = spec
        self.report = report if report is not None else ConversionReport(attention=spec.kind)
        self.inner = inner
        self.regional = regional
        self.graphs = 0

    def __call__(self, gm: fx.GraphModule, example_inputs):
        self.graphs += 1
        if self.regional is not None:
            return self.regional.compile_graph(self, gm, example_inputs)
        result = run_pipeline(gm, self.spec, accept=self.spec.accept)
        self.report.add_graph(result.sites, result.skipped)
        warn_loud(result, self.spec.kind)
        if not self.report.sites:
            deselected = [s for s in result.skipped
                          if s.reason.startswith(("not selected by include=", "excluded by exclude="))]
            if deselected:
                paths = sorted({s.location or "<root>" for s in deselected})
                why = (f"include={list(self.spec.include)} / exclude={list(self.spec.exclude)} "
                       f"deselect every site of this graph (site paths: {', '.join(paths)})")
            else:
                why = "it holds no softmax attention"
            warnings.warn(
                f"attnswap backend: nothing converted in graph {self.graphs} of "
                f"{self.report.model or 'this model'}: {why}.\n{self.report}",
                AttentionSwapWarning, stacklevel=2)
        return self.inner_compile(gm, example_inputs)

    def inner_compile(self, gm: fx.GraphModule, example_inputs, template_for=None) -> Callable:
        """``gm`` compiled by the inner compiler. Sites with learned parameters look their
        module up at run time (``run_site_extras``); AOT compilers instead get the parameters
        as extra graph inputs, read from the region being called on every run."""
        if self.inner == "eager":
            return gm.forward
        from torch._dynamo import lookup_backend

        backend = lookup_backend(self.inner)
        if not any(n.op == "call_function" and n.target is run_site_extras for n in gm.graph.nodes):
            return backend(gm, example_inputs)
        # Dynamo still reads this graph's placeholders after we return: lift on a copy.
        g = fx.Graph()
        g.output(g.graph_copy(gm.graph, {}))
        gm = fx.GraphModule(gm, g)
        order = _lift_extras(gm, template_for or site_extras)
        compiled = []

        def run(*args):
            params = [site_extras(o).get_parameter(name) for o, name in order]
            if not compiled:  # compiled on first run, outside dynamo's tracing context
                compiled.append(backend(gm, list(args) + params))
            return compiled[0](*args, *params)

        return run


def warn_loud(result: PipelineResult, kind: str, where=None) -> None:
    for s in result.skipped:
        if is_loud(s.reason):
            loc = where or s.location or "<root>"
            warnings.warn(f"attnswap: softmax at {loc} not converted to {kind}: {s.reason}",
                          AttentionSwapWarning, stacklevel=3)


# AOT-based compilers (inductor, aot_eager) only accept parameters that dynamo saw as inputs.
# The SAS / QK-norm parameters are not in the user's code, so they become extra graph inputs and
# the site's module is called functionally on them: gradients reach the very same Parameters.
_TEMPLATES: dict[int, torch.nn.Module] = {}


def call_extras(key: int, names: tuple, params: list, *args, **kwargs):
    return torch.func.functional_call(_TEMPLATES[key], dict(zip(names, params)), args, kwargs)


def _lift_extras(gm: fx.GraphModule, template_for) -> list:
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is run_site_extras]
    anchor = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    lifted, order = {}, []
    for n in nodes:
        ordinal = n.args[0]  # the site's (owner path in the region, ordinal)
        tag = "_".join(str(x) for x in ordinal).replace(".", "_")
        if ordinal not in lifted:
            mod = template_for(ordinal)
            names = tuple(name for name, _ in mod.named_parameters())
            phs = []
            for name in names:
                with gm.graph.inserting_after(anchor):
                    anchor = gm.graph.placeholder(f"attnswap_{tag}_{name.replace('.', '_')}")
                phs.append(anchor)
                order.append((ordinal, name))
            _TEMPLATES[id(mod)] = mod
            lifted[ordinal] = (id(mod), names, phs)
        key, names, phs = lifted[ordinal]
        with gm.graph.inserting_before(n):
            new = gm.graph.call_function(call_extras, (key, names, list(phs), *n.args[1:]), dict(n.kwargs))
        new.meta.update(n.meta)
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
    gm.recompile()
    return order


# Reports of models compiled through the entry point, keyed by the compiled module (weakly: the
# user's model is not touched and not kept alive).
_backend_reports: "weakref.WeakKeyDictionary[torch.nn.Module, ConversionReport]" = weakref.WeakKeyDictionary()
_backend_compilers: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_unowned = ConversionReport(attention="softmax", model="<function>")


def _compiled_module():
    """The nn.Module whose forward dynamo is tracing now, if the frame has a ``self``."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:
        return None
    obj = getattr(tx, "f_locals", {}).get("self") if tx is not None else None
    return obj if isinstance(obj, torch.nn.Module) else None


def backend_report(module) -> ConversionReport | None:
    return _backend_reports.get(module)


class BackendOptionError(AttnswapOptionError, ShortenTraceback):
    """A bad ``options=`` of ``torch.compile(backend="attnswap")``. Dynamo passes this kind of
    exception through as it is (any other becomes a ``BackendCompilerFailed`` whose first lines
    are dynamo's), so the user reads the option's one-line message first."""

    def __init__(self, error: AttnswapOptionError):
        ValueError.__init__(self, f"torch.compile(backend='attnswap'): {error}")
        self.name, self.value, self.first_useful_frame = error.name, error.value, None


def spec_from_options(options) -> tuple[RetargetSpec, str]:
    """The spec and inner compiler that ``torch.compile(..., options=options)`` asks for."""
    if options is not None and not isinstance(options, dict):
        raise AttnswapOptionError("options", options, "it must be a dict such as "
                                  "{'attention': 'sigmoid'}")
    opts = dict(options or {})
    kind = opts.pop("attention", "softmax")
    inner = check_inner(opts.pop("inner", "eager"))
    include, exclude = opts.pop("include", None), opts.pop("exclude", None)
    spec = RetargetSpec.build(kind, include=include, exclude=exclude, **opts)
    if spec.needs_parameters:
        what = f"attention={kind!r}" + (" with qk_norm" if spec.options.get("qk_norm") else "")
        raise AttnswapOptionError(
            "attention", kind, f"{what} adds parameters that the optimizer must know before "
            "compiling, which a torch.compile backend cannot do",
            f"convert first: model = attnswap.convert(model, attention={kind!r}, ...) returns a "
            "compiled, trainable model")
    return spec, inner


def attnswap_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, **_):
    """Entry point for ``torch.compile(..., backend="attnswap", options={...})``."""
    try:
        spec, inner = spec_from_options(options)
    except AttnswapOptionError as e:
        raise BackendOptionError(e) from None
    kind = spec.kind
    module = _compiled_module()
    if module is None:
        report = _unowned
    else:
        report = _backend_reports.get(module)
        if report is None or report.attention != kind:
            report = ConversionReport(attention=kind, model=type(module).__name__)
            _backend_reports[module] = report
    key = (kind, repr(sorted(spec.options.items())), spec.include, spec.exclude, inner)
    per_model = _backend_compilers.setdefault(module, {}) if module is not None else {}
    compiler = per_model.get(key)
    if compiler is None:
        compiler = per_model[key] = AttnswapCompiler(spec, report=report, inner=inner)
    return compiler(gm, example_inputs)
