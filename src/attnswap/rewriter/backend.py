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

        return lookup_backend(self.inner)(gm, example_inputs)


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
