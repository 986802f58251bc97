"""Retargeting: turn canonical ``kind="softmax"`` sites into the requested attention.

Sigmoid and ReLU only change the site call's keyword arguments. SAS and QK-norm need parameters:
the site call becomes a call of that site's :class:`~attnswap.runtime.extras.AttentionExtras`,
which ``convert()`` creates once per site identity and registers on the site's region; a later
recompile only looks it up, never creates it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from .. import options as _options
from .canonicalize import SiteRecord
from ..runtime.extras import SAS, AttentionExtras, QKNorm
from ..runtime.region import run_site_extras
from ..runtime.site_call import mha_site

# The kinds and their options live with every other option check (``attnswap/options.py``).
KINDS, KIND_OPTIONS, COMMON_OPTIONS = _options.KINDS, _options.KIND_OPTIONS, _options.COMMON_OPTIONS


@dataclass(frozen=True)
class RetargetSpec:
    kind: str = "softmax"
    options: dict = field(default_factory=dict)
    include: tuple = ()
    exclude: tuple = ()

    @classmethod
    def build(cls, kind: str, include=None, exclude=None, **options) -> "RetargetSpec":
        """A spec whose every option is checked (``AttnswapOptionError`` names a bad one)."""
        opts = _options.check_kind_options(kind, options)
        return cls(kind, opts, _options.check_globs("include", include),
                   _options.check_globs("exclude", exclude))

    def accept(self, rec: SiteRecord) -> str | None:
        return self.accept_path(rec.region or rec.owner)

    def accept_path(self, path: str) -> str | None:
        """Why the sites of the region at ``path`` are not selected, or None."""
        if self.include and not any(fnmatch.fnmatchcase(path, p) for p in self.include):
            return f"not selected by include={list(self.include)}"
        if any(fnmatch.fnmatchcase(path, p) for p in self.exclude):
            return f"excluded by exclude={list(self.exclude)}"
        return None

    def op_options(self) -> dict:
        o = self.options
        out = {}
        if o.get("impl") is not None:
            out["impl"] = o["impl"]
        if self.kind == "sigmoid":
            out.update(sigmoid_bias=o["sigmoid_bias"], fast_sigmoid=o["fast_sigmoid"])
        elif self.kind == "relu":
            out.update(activation=o["activation"], alpha=float(o["alpha"]), length=o["length"])
        return out

    @property
    def needs_parameters(self) -> bool:
        return self.kind == "sas" or bool(self.options.get("qk_norm"))


def _head_geometry(rec: SiteRecord, node: fx.Node):
    """(H, Hkv, D, Dv) of a site as the op sees it (``[B', H, T, D]``), or a reason why it has no
    head axis. The site call brings every layout it accepts to that view: flattened heads
    ``[B*H, T, D]`` by the head count the scores' own ``[B, H, Tq, Tk]`` view gives (BLOOM,
    DeBERTa, BART) or by the value's 4-d layout; windowed sites ``[B, nW, H, T, D]`` fold the
    leading axes into the batch; a head axis elsewhere (timm Nest ``[B, H, blocks, N, d]``) is
    moved to -3 (``head_axis``)."""
    if node.target is mha_site:
        H = node.args[4]
        E = node.args[3]
        return (H, H, E // H, E // H), None
    qs, ks, vs = rec.q_shape, rec.k_shape, rec.v_shape
    kw = node.kwargs
    if not qs or not ks or not vs:
        return None, "SAS/QK-norm need the site's shapes, which the graph did not record"
    if len(qs) == 3 and kw.get("heads") is not None:
        H = kw["heads"]
        return (H, H, qs[-1], vs[-1]), None
    if len(qs) == 3 and len(vs) == 4:
        geom = (vs[1], vs[1], qs[-1], vs[-1])
    elif len(qs) >= 4 and len(ks) == len(qs) and len(vs) == len(qs):
        ax = kw.get("head_axis")
        if ax is None and len(qs) > 4:
            return None, (f"SAS/QK-norm need the site's head axis; this rank-{len(qs)} site's q, "
                          "k and v could not be traced back to the projection that splits the "
                          "channels into heads")
        ax = -3 if ax is None else ax
        geom = (qs[ax], ks[ax], qs[-1], vs[-1])
    elif len(qs) < 4:
        return None, ("SAS/QK-norm need the site's head axis; this site computes attention on "
                      f"rank-{len(qs)} tensors (flattened batch*heads, or no heads) and no view "
                      "of its scores gives the heads back")
    else:
        return None, (f"SAS/QK-norm need one head axis; q, k and v have ranks {len(qs)}, "
                      f"{len(ks)}, {len(vs)}")
    if not all(isinstance(x, int) for x in geom):
        return None, "head counts are symbolic"
    return geom, None


def make_extras(spec: RetargetSpec, geometry, like: torch.nn.Module | None = None) -> AttentionExtras:
    """A fresh SAS / QK-norm module for one site of geometry ``(H, Hkv, D, Dv)``, on the device
    and in the dtype of ``like``'s parameters."""
    H, Hkv, D, Dv = geometry
    o = spec.options
    qk = None
    if o.get("qk_norm"):
        qk = QKNorm(D, "layernorm" if o["qk_norm"] is True else o["qk_norm"])
    sas = None
    if spec.kind == "sas":
        sas = SAS(H, Hkv, D, ratio=o["heads_ratio"], dim=o["dim"], kernel_size=o["kernel_size"],
                  init=o["init"])
    extras = AttentionExtras(qk, sas)
    ref = next(iter(like.parameters()), None) if like is not None else None
    if ref is not None:
        extras = extras.to(device=ref.device, dtype=ref.dtype)
    return extras


def head_geometry(rec: SiteRecord, node: fx.Node):
    """(H, Hkv, D, Dv) of a site, or a reason why it has none."""
    return _head_geometry(rec, node)


# ``extras_for(record, node) -> (what, reason)``: what the site's learned parameters are —
# an ``nn.Module`` (baked into the graph, e.g. for a ``torch.export`` graph of one model), a
# ``(owner path in the region, ordinal)`` pair (the graph looks the module up in the region being
# called, so one compiled graph serves every instance of a region class), or ``None`` + reason.
ExtrasFor = Callable[[SiteRecord, fx.Node], tuple]


def retarget(gm: fx.GraphModule, records: list[SiteRecord], spec: RetargetSpec,
             extras_for: ExtrasFor | None = None):
    """Apply ``spec`` to every canonical site of ``gm``; returns ``[(record, reason)]`` of sites
    that had to stay softmax (a reason is always given)."""
    left = []
    base_kind = "softmax" if spec.kind == "sas" else spec.kind
    for i, rec in enumerate(records):
        node = rec.node
        opts = spec.op_options()
        if not spec.needs_parameters:
            node.kwargs = {**node.kwargs, "kind": base_kind, "options": opts}
            rec.kind, rec.options = spec.kind, opts
            continue
        if extras_for is None:
            raise ValueError(
                f"attention={spec.kind!r}{' with qk_norm' if spec.options.get('qk_norm') else ''} "
                "adds parameters that the optimizer must know before compiling: convert the model "
                "first with attnswap.convert(model, attention=...), then train or compile it"
            )
        what, why = extras_for(rec, node)
        if what is None:
            left.append((rec, why))
            continue
        kwargs = {**node.kwargs, "kind": base_kind, "options": opts,
                  "site": "mha" if node.target is mha_site else "attention"}
        with gm.graph.inserting_before(node):
            if isinstance(what, torch.nn.Module):
                name = f"attnswap_site_{i}"
                gm.add_submodule(name, what)
                new = gm.graph.call_module(name, args=node.args, kwargs=kwargs)
            else:
                new = gm.graph.call_function(run_site_extras, args=(tuple(what), *node.args),
                                             kwargs=kwargs)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        rec.node, rec.kind, rec.options = new, spec.kind, {**opts, **_sas_opts(spec)}
    gm.recompile()
    return left


def _sas_opts(spec: RetargetSpec) -> dict:
    o = spec.options
    out = {"qk_norm": o["qk_norm"]} if o.get("qk_norm") else {}
    if spec.kind == "sas":
        out.update(heads_ratio=o["heads_ratio"], dim=o["dim"], kernel_size=o["kernel_size"],
                   init=o["init"])
    return out
