"""Canonicalization: replace every detected site by one ``attention_site`` call (kind="softmax").

After this pass the graph computes exactly what it computed before (the identity oracle), but
each attention is one node whose keyword arguments are the canonical attributes; retargeting
then only edits those arguments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .detect import Rejection, Site, find_sites
from .normalize import is_assertion, is_mutating, shape_of, spell
from ..runtime.site_call import attention_site, expand_to_scores, mha_site, scores_size


@dataclass
class SiteRecord:
    """What the report says about one rewritten site."""

    owner: str
    owner_type: str
    pattern: str
    q_shape: tuple | None
    k_shape: tuple | None
    v_shape: tuple | None
    scale: float
    mask: str
    causal: bool
    gqa_groups: int
    dropout_p: float
    kind: str = "softmax"
    options: dict = field(default_factory=dict)
    node: Any = None  # the call node in the rewritten graph (not serialized)
    anchor: Any = None  # the softmax / sdpa / mha node the site was anchored on (not serialized)
    # Identity (design §1.3): the region that holds the site and the site's ordinal in its code.
    region: str = ""
    ordinal: int = 0
    # Report only, never told to a kernel: the site keeps a mask, and the mask it received in the
    # call that compiled it (convert()'s example call) hid every key after the query (causal,
    # possibly plus padding); see passes/causal.py observed_causal.
    causal_mask: bool = False
    # A tensor factor of the scores (a 0-d tensor scale, a buffer, a learned per-head
    # temperature, cosine attention's logit scale) was folded into q (or k): ``scale`` is only
    # the float part of the site's scale.
    scale_folded: bool = False

    def key(self):
        # Recompiles (new lengths, train/eval) meet the same site again: one entry per identity.
        return (self.owner, self.ordinal)

    def detached(self) -> "SiteRecord":
        """The record without its graph nodes (picklable, copyable, small)."""
        import dataclasses

        return dataclasses.replace(self, node=None, anchor=None)


@dataclass
class SkipRecord:
    location: str
    location_type: str
    op: str
    reason: str
    node: Any = field(default=None, compare=False, repr=False)  # the softmax left alone (not serialized)

    def detached(self) -> "SkipRecord":
        import dataclasses

        return dataclasses.replace(self, node=None)


_ROOT = re.compile(r"^L\[['\"][^'\"]+['\"]\](\[\d+\])?")


def _normalize_path(raw: str) -> str:
    p = _ROOT.sub("", raw)
    p = p.replace("._modules", "")
    p = re.sub(r"\[['\"]([^'\"]+)['\"]\]", r".\1", p)
    p = re.sub(r"\[(\d+)\]", r".\1", p)
    return p.strip(".")


def owner_of(node: fx.Node, root: torch.nn.Module | None = None) -> tuple[str, str]:
    """Dotted path (relative to ``root``) and class name of the module whose code made ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", type(root).__name__ if root is not None else ""
    raw, typ = list(stack.values())[-1]
    typename = typ if isinstance(typ, str) else getattr(typ, "__qualname__", str(typ))
    typename = typename.rsplit(".", 1)[-1]
    path = _normalize_path(raw)
    if root is not None:
        names = dict(root.named_modules())
        parts = path.split(".") if path else []
        for i in range(len(parts) + 1):
            cand = ".".join(parts[i:])
            if cand in names and type(names[cand]).__name__ == typename:
                return cand, typename
    return path, typename


def _plain(shape):
    """Shapes for the report: ints stay ints, symbolic sizes become their names (``s0``)."""
    return None if shape is None else tuple(x if isinstance(x, int) else str(x) for x in shape)


def _record(site: Site, root) -> SiteRecord:
    owner, typ = owner_of(site.output, root)
    k = site.k
    ks = shape_of(k)
    if ks is not None and site.k_transposed:
        ks = ks[:-2] + (ks[-1], ks[-2])
    return SiteRecord(
        owner=owner, owner_type=typ, pattern=site.pattern, q_shape=_plain(shape_of(site.q)),
        k_shape=_plain(ks), v_shape=_plain(shape_of(site.v)), scale=site.scale, mask=site.mask_kind, causal=site.is_causal,
        gqa_groups=site.gqa_groups, dropout_p=site.dropout_p, anchor=site.anchor,
        causal_mask=bool(site.causal_mask) and not site.is_causal,
        scale_folded=bool(site.q_factors or site.k_factors),
    )


def _emit(gm: fx.GraphModule, site: Site) -> fx.Node:
    g = gm.graph
    for u in site.shape_users:  # `mask.expand_as(scores)`, `scores.size()`: without the scores
        kw = {"k_transposed": site.k_transposed}
        if u in site.shape_static:
            kw["shape"] = site.shape_static[u]
        with g.inserting_before(u):
            if u.target == "expand_as":
                new_u = g.call_function(expand_to_scores, (u.args[0], site.q, site.k), kw)
            elif u.target == "dim":
                new_u = g.call_function(int, (len(shape_of(u.args[0])),))  # a constant node
            else:
                dims = (*u.args[1:], *u.kwargs.values())
                new_u = g.call_function(scores_size, (site.q, site.k, *dims), kw)
        new_u.meta.update(u.meta)
        u.replace_all_uses_with(new_u)
        g.erase_node(u)
        site.masks = [(m[0], new_u if m[1] is u else m[1], *m[2:]) for m in site.masks]
    with g.inserting_before(site.output):
        if site.pattern == "nn.MultiheadAttention":
            a = site.mha_call
            q_rank = len(shape_of(a["query"]) or (0, 0, 0))
            new = g.call_function(
                mha_site,
                args=(a["query"], a["key"], a["value"], a["embed_dim_to_check"], a["num_heads"],
                      a.get("in_proj_weight"), a.get("in_proj_bias"), a["out_proj_weight"],
                      a["out_proj_bias"]),
                kwargs=dict(
                    key_padding_mask=a.get("key_padding_mask"), attn_mask=a.get("attn_mask"),
                    dropout_p=site.dropout_p, training=bool(a.get("training", True)),
                    use_separate_proj_weight=bool(a.get("use_separate_proj_weight", False)),
                    q_proj_weight=a.get("q_proj_weight"), k_proj_weight=a.get("k_proj_weight"),
                    v_proj_weight=a.get("v_proj_weight"), kind="softmax", options={},
                    batched=q_rank == 3,
                ),
            )
        else:
            new = g.call_function(
                attention_site,
                args=(site.q, site.k, site.v),
                kwargs=dict(
                    masks=[tuple(m) for m in site.masks],
                    **_layout_kwargs(site),
                    kind="softmax", scale=float(site.scale), is_causal=site.is_causal,
                    dropout_p=float(site.dropout_p), k_transposed=site.k_transposed,
                    out_dtype=site.out_dtype, options={},
                ),
            )
    for key in ("nn_module_stack", "source_fn_stack", "stack_trace", "example_value", "val"):
        if key in site.output.meta:
            new.meta[key] = site.output.meta[key]
    site.output.replace_all_uses_with(new)
    return new


def _layout_kwargs(site: Site) -> dict:
    """Only what a site needs, so the common site call reads as before."""
    out = {}
    if site.q_factors:
        out["q_factors"] = [tuple(f) for f in site.q_factors]
    if site.k_factors:
        out["k_factors"] = [tuple(f) for f in site.k_factors]
    if site.heads is not None:
        out["heads"] = site.heads
    if site.head_axis is not None:
        out["head_axis"] = site.head_axis
    if site.broadcast:
        out["broadcast"] = True
    if _bthd_output(site):
        out["out_layout"] = "bthd"
    return out


def _bthd_output(site: Site) -> bool:
    """The site's own output was ``[B, T, H, D]`` in memory (PyTorch's CPU SDPA on projection
    views): the rewritten site returns the same layout, so the model's code after it (a free
    ``transpose(1, 2).reshape``, or a ``view`` that relies on those strides) runs as before."""
    val = site.output.meta.get("example_value", site.output.meta.get("val"))
    if not isinstance(val, torch.Tensor) or val.dim() != 4 or val.is_contiguous():
        return False
    return val.shape[1] > 1 and val.shape[2] > 1 and val.transpose(1, 2).is_contiguous()


def _erase_dead(gm: fx.GraphModule, site: Site) -> None:
    """Remove the replaced nodes (they may be in-place ops that generic DCE keeps)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    doomed = [n for n in set(site.nodes + [site.output, site.anchor]) if n in order]
    for n in sorted(doomed, key=order.get, reverse=True):
        if n.users and all(is_assertion(u) for u in n.users):
            for u in list(n.users):
                gm.graph.erase_node(u)
        if not n.users and (not is_mutating(n) or _mutates_only(n, doomed)):
            gm.graph.erase_node(n)


def _mutates_only(n: fx.Node, doomed) -> bool:
    """An in-place op of the site (``scores += mask``) writes into a tensor that belongs to the
    site itself; one that writes anywhere else must stay."""
    return bool(n.args) and isinstance(n.args[0], fx.Node) and n.args[0] in doomed


_PURE = ("view", "transpose", "permute", "mul", "div", "add", "cast", "identity", "expand",
         "unsqueeze", "getitem", "repeat_interleave", "matmul")


def _erase_unused_pure(gm: fx.GraphModule) -> None:
    """Drop what the rewritten sites no longer need (the ``k.transpose``, ``q * scale``, the
    ``repeat_kv`` expansion...). Only out-of-place ops that :func:`spell` knows are removed, so an
    in-place op whose result is unused but whose effect matters is never touched."""
    changed = True
    while changed:
        changed = False
        for n in reversed(list(gm.graph.nodes)):
            if n.users or n.op not in ("call_function", "call_method"):
                continue
            if is_mutating(n):
                continue
            s = spell(n)
            if s is not None and s.op in _PURE:
                gm.graph.erase_node(n)
                changed = True


def canonicalize(
    gm: fx.GraphModule,
    root: torch.nn.Module | None = None,
    *,
    accept=None,
) -> tuple[list[SiteRecord], list[SkipRecord]]:
    """Rewrite every site of ``gm`` into ``attention_site(kind="softmax")`` in place.

    ``accept(record) -> str | None`` may veto a site (returns the reason it is left alone), e.g.
    an include/exclude filter. Returns the records of rewritten sites and of softmaxes left alone.
    """
    sites, rejected = find_sites(gm)
    records, skipped = [], []
    for r in rejected:
        skipped.append(_skip(r, root))
    for site in sites:
        rec = _record(site, root)
        veto = accept(rec) if accept is not None else None
        if veto:
            skipped.append(_skip(Rejection(site.anchor, veto), root))
            continue
        rec.node = _emit(gm, site)
        _erase_dead(gm, site)
        records.append(rec)
    if records:
        _erase_unused_pure(gm)
        gm.recompile()
    return records, skipped


def _skip(r: Rejection, root) -> SkipRecord:
    owner, typ = owner_of(r.node, root)
    return SkipRecord(location=owner, location_type=typ, op=str(getattr(r.node.target, "__name__", r.node.target)),
                      reason=r.reason, node=r.node)
