"""ONNX export of ``attnswap::attention`` (attnswap.onnx): every kind and option, exported once
with dynamic batch and sequence axes, run in stock onnxruntime at two other sizes, compared with
the PyTorch module (DESIGN.md §5.4).

Exports are slow (seconds each, mostly torch's ONNX graph optimizer), so one module holds many
attention sites (one output each) and each group is one export and one test, which names every
failing site in its message. The PyTorch side runs impl="reference", the oracle.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

import attnswap  # noqa: E402
from attnswap import onnx as aonnx  # noqa: E402

ATOL = 1e-4
EXPORT_SIZE = (3, 5, 7)  # (B, Tq, Tk) of the example inputs
RUN_SIZES = [(2, 6, 11), (4, 13, 3)]  # two other sizes run from the same file (Tq < Tk, Tq > Tk)
FMIN = torch.finfo(torch.float32).min


@dataclasses.dataclass(frozen=True)
class Site:
    name: str
    mask: str | None = "mask"  # which Net.forward input is the mask (None: no mask)
    kwargs: tuple = ()  # attnswap.attention options, as (key, value) pairs

    def options(self) -> dict:
        return dict(self.kwargs)


def site(name, mask="mask", **kw):
    return Site(name, mask, tuple(sorted(kw.items())))


ACTIVATIONS = ("relu", "relu2", "gelu", "softplus", "identity", "relu6", "sigmoid")

# Sites that read a [B, 1, Tq, Tk] mask (bool in one group, float in another).
MASKED_SITES = [
    site("softmax", kind="softmax"),
    site("softmax-causal", kind="softmax", is_causal=True),
    site("softmax-scale", kind="softmax", scale=0.3),
    site("sigmoid", kind="sigmoid"),
    site("sigmoid-causal", kind="sigmoid", is_causal=True),
    site("sigmoid-pinned", kind="sigmoid", sigmoid_bias=-3.0),
    site("sigmoid-pinned-causal-scale", kind="sigmoid", sigmoid_bias=-1.5, is_causal=True, scale=0.5),
    *[site(f"relu-{a}", kind="relu", activation=a) for a in ACTIVATIONS],
    *[site(f"relu-{a}-visible-causal", kind="relu", activation=a, length="visible", is_causal=True)
      for a in ("relu", "gelu", "identity", "softplus")],
    site("relu-relu2-visible", kind="relu", activation="relu2", length="visible"),
    site("relu-relu6-causal-alpha2", kind="relu", activation="relu6", is_causal=True, alpha=2.0),
    site("relu-softplus-L16-alpha0.5", kind="relu", activation="softplus", length=16, alpha=0.5),
    site("relu-sigmoid-alpha0", kind="relu", activation="sigmoid", alpha=0.0),
    site("relu-identity-visible-alpha0", kind="relu", activation="identity", length="visible",
         alpha=0.0),
    site("relu-keys-scale", kind="relu", length="keys", scale=0.9),
    # the same module also has unmasked sites
    site("nomask-softmax-causal", mask=None, kind="softmax", is_causal=True),
    site("nomask-sigmoid", mask=None, kind="sigmoid"),
    site("nomask-relu-visible-causal", mask=None, kind="relu", length="visible", is_causal=True),
]

# Float masks: the sites where the float-mask rules matter (softmax adds it; sigmoid/relu treat
# entries <= finfo.min / 2 as masked, after h), plus a float16 mask.
FLOAT_SITES = [
    s for s in MASKED_SITES
    if s.mask is not None and (
        not s.name.startswith("relu-")
        or s.name in ("relu-relu", "relu-gelu", "relu-identity", "relu-softplus")
        or "visible" in s.name
    )
]

# Float group only: a float16 additive mask (threshold 0.5 * finfo(float16).min).
MASK16_SITES = [
    site("mask16-softmax", mask="mask16", kind="softmax"),
    site("mask16-sigmoid-causal", mask="mask16", kind="sigmoid", is_causal=True),
    site("mask16-relu-gelu-visible", mask="mask16", kind="relu", activation="gelu", length="visible"),
]

# Self-attention (Tq = Tk = one "seq" axis), no GQA, no mask.
SELF_SITES = [
    site("self-softmax", mask=None, kind="softmax"),
    site("self-softmax-causal", mask=None, kind="softmax", is_causal=True),
    site("self-sigmoid", mask=None, kind="sigmoid"),
    site("self-sigmoid-causal", mask=None, kind="sigmoid", is_causal=True),
    site("self-relu-visible-causal", mask=None, kind="relu", length="visible", is_causal=True),
    site("self-relu-gelu", mask=None, kind="relu", activation="gelu"),
]

# A [B, 1, 1, Tk] key-padding mask (broadcast over heads and queries).
PADDING_SITES = [
    site("pad-softmax", kind="softmax"),
    site("pad-softmax-causal", kind="softmax", is_causal=True),
    site("pad-sigmoid", kind="sigmoid"),
    site("pad-relu-visible", kind="relu", length="visible"),
    site("pad-relu-gelu-visible-causal", kind="relu", activation="gelu", length="visible",
         is_causal=True),
]

# Opset 23: plain softmax sites become the ONNX Attention op; the rest stay decomposed.
OPSET23_SITES = [
    site("op23-softmax", kind="softmax"),
    site("op23-softmax-causal", kind="softmax", is_causal=True),
    site("op23-softmax-nomask", mask=None, kind="softmax"),
    site("op23-softmax-nomask-causal", mask=None, kind="softmax", is_causal=True, scale=0.4),
    site("op23-softmax-floatmask", mask="fmask", kind="softmax"),
    site("op23-softmax-padding", mask="pmask", kind="softmax"),
    site("op23-softmax-padding-causal", mask="pmask", kind="softmax", is_causal=True),
    site("op23-sigmoid", kind="sigmoid", is_causal=True),
    site("op23-relu-gelu", kind="relu", activation="gelu", length="visible"),
]


class Net(nn.Module):
    """q/k/v projections (GQA: Hq=4, Hkv=2; Dv != D), then one attention per site."""

    def __init__(self, sites, hq=4, hkv=2, d=8, dv=6, e=16):
        super().__init__()
        self.sites = list(sites)
        self.hq, self.hkv, self.d, self.dv = hq, hkv, d, dv
        self.q = nn.Linear(e, hq * d)
        self.k = nn.Linear(e, hkv * d)
        self.v = nn.Linear(e, hkv * dv)

    def forward(self, x, y=None, mask=None, mask16=None, fmask=None, pmask=None):
        y = x if y is None else y
        q = self.q(x).unflatten(-1, (self.hq, self.d)).transpose(1, 2)
        k = self.k(y).unflatten(-1, (self.hkv, self.d)).transpose(1, 2)
        v = self.v(y).unflatten(-1, (self.hkv, self.dv)).transpose(1, 2)
        masks = {None: None, "mask": mask, "mask16": mask16, "fmask": fmask, "pmask": pmask}
        return tuple(
            attnswap.attention(q, k, v, masks[s.mask], impl="reference", **s.options())
            for s in self.sites
        )


def bool_mask(B, Tq, Tk, g):
    m = torch.rand(B, 1, Tq, Tk, generator=g) > 0.35
    m[0, 0, 1, :] = False  # a fully-masked row
    m[-1, 0, -1, :] = False
    return m


def float_mask(B, Tq, Tk, g, dtype=torch.float32):
    lo = torch.finfo(dtype).min
    m = 0.5 * torch.randn(B, 1, Tq, Tk, generator=g)
    m = m.masked_fill(torch.rand(B, 1, Tq, Tk, generator=g) > 0.6, lo)
    m = m.masked_fill(torch.rand(B, 1, Tq, Tk, generator=g) > 0.9, float("-inf"))
    m[0, 0, 1, :] = lo  # a row all finfo.min: softmax averages it, sigmoid/relu give 0
    m[-1, 0, 2, :] = float("-inf")  # a row all -inf: every kind gives 0
    m[0, 0, 0, 0] = 0.7 * lo  # a large bias that is still "masked" for sigmoid/relu (<= min/2)
    m[0, 0, 0, 1] = 0.4 * lo  # ... and one that is only a bias (> min/2)
    return m.to(dtype)


def padding_mask(B, Tq, Tk, g):
    m = torch.ones(B, 1, 1, Tk, dtype=torch.bool)
    m[0, ..., :] = False  # a fully padded sequence
    m[-1, ..., Tk // 2:] = False
    return m


@dataclasses.dataclass
class Group:
    sites: list
    make_inputs: object  # (B, Tq, Tk, generator) -> dict of forward kwargs
    axes: dict
    opset: int | None = None
    self_attention: bool = False


E = 16


def _xy(B, Tq, Tk, g):
    return {"x": torch.randn(B, Tq, E, generator=g), "y": torch.randn(B, Tk, E, generator=g)}


GROUPS = {
    "bool": Group(
        MASKED_SITES,
        lambda B, Tq, Tk, g: {**_xy(B, Tq, Tk, g), "mask": bool_mask(B, Tq, Tk, g)},
        {"x": {0: "batch", 1: "tq"}, "y": {0: "batch", 1: "tk"},
         "mask": {0: "batch", 2: "tq", 3: "tk"}},
    ),
    "float": Group(
        FLOAT_SITES + MASK16_SITES,
        lambda B, Tq, Tk, g: {**_xy(B, Tq, Tk, g), "mask": float_mask(B, Tq, Tk, g),
                              "mask16": float_mask(B, Tq, Tk, g, torch.float16)},
        {"x": {0: "batch", 1: "tq"}, "y": {0: "batch", 1: "tk"},
         "mask": {0: "batch", 2: "tq", 3: "tk"}, "mask16": {0: "batch", 2: "tq", 3: "tk"}},
    ),
    "self": Group(
        SELF_SITES,
        lambda B, Tq, Tk, g: {"x": torch.randn(B, Tq, E, generator=g)},
        {"x": {0: "batch", 1: "seq"}},
        self_attention=True,
    ),
    "padding": Group(
        PADDING_SITES,
        lambda B, Tq, Tk, g: {**_xy(B, Tq, Tk, g), "mask": padding_mask(B, Tq, Tk, g)},
        {"x": {0: "batch", 1: "tq"}, "y": {0: "batch", 1: "tk"}, "mask": {0: "batch", 3: "tk"}},
    ),
    "opset23": Group(
        OPSET23_SITES,
        lambda B, Tq, Tk, g: {**_xy(B, Tq, Tk, g), "mask": bool_mask(B, Tq, Tk, g),
                              "fmask": float_mask(B, Tq, Tk, g),
                              "pmask": padding_mask(B, Tq, Tk, g)},
        {"x": {0: "batch", 1: "tq"}, "y": {0: "batch", 1: "tk"},
         "mask": {0: "batch", 2: "tq", 3: "tk"}, "fmask": {0: "batch", 2: "tq", 3: "tk"},
         "pmask": {0: "batch", 3: "tk"}},
        opset=23,
    ),
}


def _inputs(group: Group, size, seed):
    B, Tq, Tk = size
    if group.self_attention:
        Tk = Tq
    return group.make_inputs(B, Tq, Tk, torch.Generator().manual_seed(seed))


def _ops(model):
    return [(n.domain, n.op_type) for n in model.graph.node]


@pytest.mark.parametrize("group", list(GROUPS))
def test_export_once_run_at_two_sizes(group):
    """Export the group's module once (dynamic batch/sequence axes), check it, run it in
    onnxruntime at two other sizes and compare every site with PyTorch."""
    grp = GROUPS[group]
    torch.manual_seed(0)
    net = Net(grp.sites).eval()
    example = _inputs(grp, EXPORT_SIZE, seed=1)
    ds = aonnx.dynamic_shapes(net, (), example, axes=grp.axes)
    model = aonnx.export_module(net, (), example, dynamic_shapes=ds, opset=grp.opset)
    onnx.checker.check_model(model, full_check=True)

    # standard ONNX ops only; the opset-23 group has Attention nodes, the others none
    ops = _ops(model)
    assert all(domain in ("", "ai.onnx") for domain, _ in ops), sorted(set(ops))
    types = {t for _, t in ops}
    n_attention = sum(t == "Attention" for _, t in ops)
    if grp.opset == 23:  # softmax without a float mask → Attention; with one → decomposition
        assert n_attention == sum(s.options()["kind"] == "softmax" and s.mask != "fmask"
                                  for s in grp.sites)
        assert "Softmax" in types
    else:
        assert n_attention == 0, sorted(types)
    # the named dynamic axes reach the ONNX inputs
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input}
    if grp.self_attention:
        assert dims["x"][:2] == ["batch", "seq"], dims
    else:
        assert dims["x"][:2] == ["batch", "tq"] and dims["y"][:2] == ["batch", "tk"], dims

    sess = aonnx.session(model, threads=1)
    failures = []
    for i, size in enumerate(RUN_SIZES):
        inputs = _inputs(grp, size, seed=10 + i)
        with torch.no_grad():
            expected = net(**inputs)
        got = aonnx.run(sess, inputs)
        cmp = aonnx.compare_outputs(expected, got)
        for s, err, e, o in zip(grp.sites, cmp.outputs, expected, got):
            problems = []
            if torch.isnan(e).any():
                problems.append("PyTorch output has NaN")
            if np.isnan(o).any():
                problems.append("onnxruntime output has NaN")
            if not err.max_abs <= ATOL:
                problems.append(f"max abs error {err.max_abs:.3g} > {ATOL}")
            if problems:
                failures.append(f"{s.name} {dict(s.kwargs)} at (B, Tq, Tk)={size}: "
                                + "; ".join(problems))
    assert not failures, f"{len(failures)} site runs differ:\n" + "\n".join(failures)


# ----------------------------------------------------------------------------------------------
# dtypes, plain torch.onnx.export, ExportedProgram, saving


class Direct(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, q, k, v, mask=None):
        return attnswap.attention(q, k, v, mask, impl="reference", **self.options)


class Dtypes(nn.Module):
    def forward(self, q, k, v, mask):
        return tuple(
            attnswap.attention(q, k, v, mask, kind=kind, is_causal=True, impl="reference",
                               length="visible")
            for kind in ("softmax", "sigmoid", "relu")
        )


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.float64, 1e-10)])
def test_dtypes_compute_in_fp32_output_in_input_dtype(dtype, atol):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 5, 8, generator=g).to(dtype)
    k = torch.randn(2, 2, 7, 8, generator=g).to(dtype)
    v = torch.randn(2, 2, 7, 8, generator=g).to(dtype)
    mask = torch.rand(2, 1, 5, 7, generator=g) > 0.3
    net = Dtypes()
    model = aonnx.export_module(net, (q, k, v, mask))
    onnx_dtype = {torch.float16: onnx.TensorProto.FLOAT16, torch.float64: onnx.TensorProto.DOUBLE}
    assert all(o.type.tensor_type.elem_type == onnx_dtype[dtype] for o in model.graph.output)
    outs = aonnx.run(aonnx.session(model), [q, k, v, mask])
    assert all(o.dtype == aonnx.to_numpy(q).dtype for o in outs)
    # fp16: the same fp32 math, rounded once to fp16; fp64 stays fp64 (like the reference)
    assert aonnx.compare_outputs(net(q, k, v, mask), outs).max_abs <= atol


class BroadcastMasks(nn.Module):
    """Masks of fewer dims, and a mask that broadcasts over keys ([Tq, 1])."""

    def forward(self, q, k, v, m2d, m1d, mcol, f2d):
        a = attnswap.attention
        return (
            a(q, k, v, m2d, kind="relu", length="visible", impl="reference"),
            a(q, k, v, m1d, kind="sigmoid", is_causal=True, impl="reference"),
            a(q, k, v, mcol, kind="relu", activation="gelu", length="visible", impl="reference"),
            a(q, k, v, mcol, kind="softmax", is_causal=True, impl="reference"),
            a(q, k, v, f2d, kind="relu", activation="identity", length="visible",
              impl="reference"),
            a(q, k, v, f2d, kind="softmax", impl="reference"),
        )


def test_broadcast_masks():
    def inputs(tq, tk, seed):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(2, 2, tq, 8, generator=g)
        k, v = (torch.randn(2, 1, tk, 8, generator=g) for _ in range(2))
        mcol = torch.rand(tq, 1, generator=g) > 0.4
        mcol[0] = False
        f2d = torch.randn(tq, tk, generator=g).masked_fill(torch.rand(tq, tk, generator=g) > 0.5, FMIN)
        return (q, k, v, torch.rand(tq, tk, generator=g) > 0.4, torch.rand(tk, generator=g) > 0.3,
                mcol, f2d)

    net = BroadcastMasks()
    example = inputs(5, 7, 0)
    T, S = torch.export.Dim("tq"), torch.export.Dim("tk")
    ds = {"q": {2: T}, "k": {2: S}, "v": {2: S}, "m2d": {0: T, 1: S}, "m1d": {0: S},
          "mcol": {0: T}, "f2d": {0: T, 1: S}}
    sess = aonnx.session(aonnx.export_module(net, example, dynamic_shapes=ds))
    for tq, tk in [(6, 11), (9, 3)]:
        args = inputs(tq, tk, tq)
        cmp = aonnx.compare_outputs(net(*args), aonnx.run(sess, args))
        assert cmp.max_abs <= ATOL, cmp


def test_dynamic_head_counts():
    """Head counts unknown at export: the GQA group count comes from runtime shapes."""
    net = Direct(kind="relu", length="visible", is_causal=True)

    def inputs(hkv, seed):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(2, 2 * hkv, 5, 8, generator=g),
                *(torch.randn(2, hkv, 5, 8, generator=g) for _ in range(2)))

    H = torch.export.Dim("hkv")
    model = aonnx.export_module(net, inputs(3, 0),
                                dynamic_shapes={"q": {1: 2 * H}, "k": {1: H}, "v": {1: H}})
    sess = aonnx.session(model)
    for hkv in (1, 4):
        args = inputs(hkv, hkv)
        assert aonnx.compare_outputs(net(*args), aonnx.run(sess, args)).max_abs <= ATOL


def test_plain_torch_onnx_export_with_translation_table(tmp_path):
    """The translation table works with torch.onnx.export directly; translation_table() without
    an opset is valid at any opset >= 18 (here 18: gelu as its erf formula, no Gelu op)."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=g) for _ in range(3))
    net = Direct(kind="relu", activation="gelu", length="visible", is_causal=True).eval()
    path = tmp_path / "m.onnx"
    program = torch.onnx.export(
        net, (q, k, v), dynamo=True, verbose=False, opset_version=18,
        custom_translation_table=aonnx.translation_table(),
    )
    program.save(str(path))
    assert "Erf" in {n.op_type for n in onnx.load(str(path)).graph.node}
    out = aonnx.run(aonnx.session(str(path)), [q, k, v])
    assert aonnx.compare_outputs(net(q, k, v), out).max_abs <= ATOL


def test_exported_program_and_save(tmp_path):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=g) for _ in range(3))
    net = Direct(kind="relu", activation="gelu", length="visible", is_causal=True)
    ep = torch.export.export(net, (q, k, v))
    assert len(aonnx.attention_sites(ep)) == 1
    path = tmp_path / "sub" / "m.onnx"
    model = aonnx.export_module(ep, path=path)
    assert path.exists()
    sess = aonnx.session(path, optimize=False)
    out = aonnx.run(sess, {"q": q, "k": k, "v": v})
    cmp = aonnx.compare_outputs(net(q, k, v), out)
    assert cmp.within(ATOL) and cmp.max_abs <= ATOL
    assert aonnx.input_names(sess) == [i.name for i in model.graph.input]


def test_runtime_helpers():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g) for _ in range(3))
    net = Direct(kind="softmax")
    sess = aonnx.session(aonnx.export_module(net, (q, k, v)))
    t = aonnx.time_session(sess, [q, k, v], warmup=1, repeat=3)
    assert t.repeat == 3 and 0 < t.min_ms <= t.median_ms
    tt = aonnx.time_torch(net, (q, k, v), warmup=1, repeat=3)
    assert tt.repeat == 3 and tt.median_ms > 0
    with pytest.raises(ValueError, match="inputs"):
        aonnx.run(sess, {"q": q})
    with pytest.raises(ValueError, match="takes 3 inputs"):
        aonnx.run(sess, [q, k])
    cmp = aonnx.compare_outputs(torch.tensor([1.0, 2.0]), [torch.tensor([1.0, 2.5]).numpy()])
    assert cmp.max_abs == pytest.approx(0.5) and cmp.max_rel == pytest.approx(0.25)
    assert not cmp.within(1e-3) and cmp.within(1e-3, rtol=0.3)


# ----------------------------------------------------------------------------------------------
# errors


@pytest.fixture
def small():
    g = torch.Generator().manual_seed(7)
    return tuple(torch.randn(1, 2, 4, 8, generator=g) for _ in range(3))


def test_error_opset_too_old(small):
    with pytest.raises(ValueError, match=r"opset >= 18"):
        aonnx.export_module(Direct(), small, opset=17)
    with pytest.raises(ValueError, match=r"opset >= 23"):
        aonnx.export_module(Direct(), small, opset=20, attention_op=True)
    with pytest.raises(ValueError, match=r"opset >= 18"):
        aonnx.make_translation(16)


def test_error_dropout(small):
    with pytest.raises(aonnx.TranslationError, match=r"dropout_p=0\.1.*inference"):
        aonnx.export_module(Direct(kind="sigmoid", dropout_p=0.1), small)


def test_error_missing_dependencies(monkeypatch, small):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r'pip install "attnswap\[onnx\]"') as info:
        aonnx.session(b"")
    assert isinstance(info.value, aonnx.MissingOnnxDependencyError)
    assert "onnxruntime" in str(info.value)
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(aonnx.MissingOnnxDependencyError, match="onnxscript"):
        aonnx.export_module(Direct(), small)


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # branches on a value: torch.export cannot capture this
            x = x * 2
        q = x.unflatten(-1, (2, 4)).transpose(1, 2)
        return attnswap.attention(q, q, q, impl="reference")


class ShapeSpecialized(nn.Module):
    def forward(self, x):
        q = x.unflatten(-1, (2, 4)).transpose(1, 2)
        if x.shape[1] == 5:  # specializes the dynamic sequence axis
            q = q * 2
        return attnswap.attention(q, q, q, impl="reference")


def test_error_torch_export_data_dependent():
    x = torch.randn(2, 5, 8)
    with pytest.raises(RuntimeError) as info:
        aonnx.export_module(DataDependent(), (x,))
    msg = str(info.value)
    assert "torch.export (non-strict) failed" in msg
    assert "if x.sum() > 0" in msg  # names the construct
    assert "data-dependent" in msg and "attnswap.convert" in msg


def test_error_torch_export_specialized_dim():
    x = torch.randn(2, 5, 8)
    ds = aonnx.dynamic_shapes(ShapeSpecialized(), (x,), axes={"x": {0: "batch", 1: "seq"}})
    with pytest.raises(RuntimeError) as info:
        aonnx.export_module(ShapeSpecialized(), (x,), dynamic_shapes=ds)
    msg = str(info.value)
    assert "seq" in msg and "specialized" in msg
    assert "dynamic_shapes=None" in msg and "attnswap.convert" in msg


def test_dynamic_shapes_helper_errors():
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="not called with"):
        aonnx.dynamic_shapes(DataDependent(), (x,), axes={"y": {0: "b"}})
    with pytest.raises(ValueError, match="out of range"):
        aonnx.dynamic_shapes(DataDependent(), (x,), axes={"x": {3: "b"}})
    ds = aonnx.dynamic_shapes(DataDependent(), (x,), axes={"x": [0, 1]})
    assert [d.__name__ for d in ds["x"].values()] == ["x_dim0", "x_dim1"]


class SoftmaxAttention(nn.Module):
    def __init__(self, e=16, h=2):
        super().__init__()
        self.h = h
        self.qkv = nn.Linear(e, 3 * e)

    def forward(self, x):
        B, T, E = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, E // self.h).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-1, -2) / math.sqrt(E // self.h)).softmax(-1)
        return (a @ v).transpose(1, 2).reshape(B, T, E)


def test_converted_model_exports_its_swapped_attention_or_says_why():
    """The ONNX file of an attnswap.convert()ed model must hold the swapped attention (DESIGN
    §5.4); where torch.export cannot see the conversion, export_module refuses clearly instead
    of silently exporting the softmax original."""
    convert = getattr(attnswap, "convert", None)
    if convert is None:
        pytest.skip("attnswap.convert is not available")
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert(SoftmaxAttention().eval(), "sigmoid", example_inputs=(x,))
        try:
            proto = aonnx.export_module(model, (x,))
        except RuntimeError as e:
            assert "torch.export captured 0 attnswap::attention" in str(e)
            return
        out = aonnx.run(aonnx.session(proto), [x])
        expected = model(x)
    assert aonnx.compare_outputs(expected, out).max_abs <= ATOL
