"""PyTorch Inductor's own attention corpus (``torch/_inductor/fx_passes/fuse_attention.py``): every
one of its fp32 pattern candidates is found by attnswap's one anchored rule and converts exactly.

The pattern functions come from the installed torch, not from a copy: each is re-created with
this file as its code's file name, because dynamo does not trace into functions that live in
torch's own folders. The example inputs are Inductor's own (shapes, strides, dtypes), filled
with seeded random values; scalar arguments use Inductor's own workaround values (``inv_scale``
0.66666), and dropout is 0 so the original and the converted model draw no random numbers.
Many candidates pass the scale as a 0-d tensor argument (``torch.tensor(2.0)``): a tensor scale
constant along the keys, which the site folds into q.
"""

from __future__ import annotations

import inspect
import types

import pytest
import torch

import attnswap

fuse_attention = pytest.importorskip("torch._inductor.fx_passes.fuse_attention")

from tolerances import TOL  # noqa: E402

# fp32, and fp16 for the candidates that cast the probabilities to fp16 (patterns 7-10): the op
# computes in fp32 and rounds once, the original rounds P and computes P @ V in fp16. A 0-d
# scale's gradient is a reduction over every score, so it gets 1e-3 relative.
SCALAR_GRAD_RTOL = 1e-3


def _retraceable(fn, _globals={}):
    """``fn`` with this file as its code's file, calling the re-created versions of the other
    pattern functions (pattern 28 calls pattern 4)."""
    if not _globals:
        _globals.update(fn.__globals__)
        for name, f in list(_globals.items()):
            if name.startswith("_sfdp_pattern_") and isinstance(f, types.FunctionType):
                _globals[name] = types.FunctionType(f.__code__.replace(co_filename=__file__),
                                                    _globals, f.__name__, f.__defaults__)
    return _globals[fn.__name__]


def _candidates():
    """Inductor's fp32 inference candidates: (name, pattern function, example inputs, scalars)."""
    out = []
    for name, kw in fuse_attention._get_sfdp_patterns(torch.device("cpu")):
        if "_half" in name or not name.endswith("_inference"):
            continue
        base = "_sfdp_pattern_" + name.split("_sfdp_pattern_")[1].split("_")[0]
        fn = getattr(fuse_attention, base)
        scalars = {}
        params = inspect.signature(fn).parameters
        if "inv_scale" in kw["scalar_workaround"]:
            scalars["inv_scale"] = kw["scalar_workaround"]["inv_scale"]
        if "dropout_p" in params:
            scalars["dropout_p"] = 0.0
        out.append((name, fn, kw["example_inputs"], scalars))
    return out


CANDIDATES = _candidates()


def _fill(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    if t.dtype == torch.bool:
        vals = torch.rand(t.shape, generator=g) > 0.3
    else:
        vals = torch.randn(t.shape, generator=g, dtype=t.dtype)
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)
    out.copy_(vals)
    return out


class Pattern(torch.nn.Module):
    def __init__(self, fn, scalars, n_tensors):
        super().__init__()
        self.fn, self.scalars = _retraceable(fn), scalars
        names = list(inspect.signature(fn).parameters)
        self.names = names[:n_tensors]

    def forward(self, *tensors):
        out = self.fn(**dict(zip(self.names, tensors)), **self.scalars)
        return out[0] if isinstance(out, tuple) else out


def test_the_corpus_is_inductors_forty():
    assert len(CANDIDATES) == 40, [c[0] for c in CANDIDATES]


@pytest.mark.parametrize("name,fn,example,scalars", CANDIDATES, ids=[c[0] for c in CANDIDATES])
def test_inductor_pattern_found_and_exact(name, fn, example, scalars):
    g = torch.Generator().manual_seed(0)
    model = Pattern(fn, scalars, len(example))
    inputs = [_fill(t, g) for t in example]
    converted = attnswap.convert(model, "softmax", tuple(inputs))
    report = converted.attnswap_report
    assert len(report.sites) == 1, str(report)

    def run(m):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = m(*leaves)
        out.square().mean().backward()
        return out.detach(), [t.grad for t in leaves]

    ref_out, ref_grads = run(model)
    out, grads = run(converted)
    atol, rtol = TOL[ref_out.dtype]
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    for a, b in zip(grads, ref_grads):
        assert (a is None) == (b is None)
        if b is None:  # an input the output does not depend on differentiably (a compared mask)
            continue
        torch.testing.assert_close(a, b, atol=atol, rtol=SCALAR_GRAD_RTOL if b.dim() == 0 else rtol)
