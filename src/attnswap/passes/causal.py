"""Causal structure built inside the captured graph becomes ``is_causal`` (DESIGN.md §1.2).

A mask that depends on nothing but constants and buffers (a ``tril`` buffer sliced to the
lengths, ``arange(T)[:, None] >= arange(T)[None, :]``, ``full((T, T), -inf).triu(1)``) has one
value for the graph's static shapes: it is evaluated at compile time, and when its visible set
is exactly the top-left causal triangle it is dropped from the masks and the site gets
``is_causal=True`` -- which is what lets a kernel skip the fully masked key blocks.

When it is exact:

* the entry hides with ``-inf`` (a bool mask, ``masked_fill``/``where`` with ``-inf``, an additive
  ``0 / -inf`` mask): hiding is the same whichever other masks there are;
* a finite ``finfo.min`` spelling only when it is the site's only mask: combined with another
  finite mask, a row whose causal keys are all masked otherwise gets weights the hard triangle
  would not give, so it stays a mask.

Masks that depend on an input (HF's mask builders under regional conversion, where the mask is
an argument of the attention module) are opaque here: they stay masks, and the report's causal
column says "no" for them. Buffers are taken as the constants models use them for; a converted
model whose causal buffer is rewritten in place afterwards would not see the change.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from .normalize import _placeholder_kind, example

_MAX_NUMEL = 1 << 22  # evaluate masks up to 4M entries at compile time
_RANDOM = ("rand", "randn", "randint", "bernoulli", "dropout", "normal", "uniform")


def constant_tensor(node) -> torch.Tensor | None:
    """The value of ``node`` when it is computed from constants and buffers alone (static
    shapes), else None."""
    if not isinstance(node, fx.Node):
        return None
    order, seen, stack = [], set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        order.append(n)
        stack.extend(n.all_input_nodes)
    env = {}
    gm = node.graph.owning_module
    try:
        with torch.no_grad():
            for n in sorted(order, key=_position(node.graph)):
                ex = example(n)
                if isinstance(ex, torch.Tensor) and not _small_and_static(ex):
                    return None
                if n.op == "placeholder":
                    if _placeholder_kind(n) != "buffer":
                        return None
                    value = getattr(n.meta.get("grapharg"), "example", None)
                    if not isinstance(value, torch.Tensor) or _is_fake(value):
                        return None
                    env[n] = value
                elif n.op == "get_attr":
                    value = gm
                    for part in n.target.split("."):
                        value = getattr(value, part)
                    env[n] = value
                elif n.op in ("call_function", "call_method"):
                    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
                    if any(r in str(name) for r in _RANDOM) or str(name).endswith("_"):
                        return None
                    args = map_arg(n.args, env.__getitem__)
                    kwargs = map_arg(n.kwargs, env.__getitem__)
                    if n.op == "call_method":
                        env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
                    else:
                        env[n] = n.target(*args, **kwargs)
                else:
                    return None
    except Exception:  # anything the evaluation cannot do: the mask stays a mask
        return None
    value = env.get(node)
    if not isinstance(value, torch.Tensor) or _is_fake(value):
        return None
    return value


def _small_and_static(t: torch.Tensor) -> bool:
    if not all(isinstance(x, int) for x in t.shape):
        return False  # symbolic sizes: one value per shape, not one per graph
    return t.numel() <= _MAX_NUMEL


def _position(graph):
    index = {n: i for i, n in enumerate(graph.nodes)}
    return index.__getitem__


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(t, FakeTensor)


def _visible(entry, value: torch.Tensor):
    """(bool visibility, hides with -inf) of one mask entry's constant value, or None when the
    entry is not a pure mask (an additive entry with finite non-zero values is a bias)."""
    kind = entry[0]
    if kind in ("keep", "fill"):
        vis = value.bool()
        vis = ~vis if entry[2] else vis
        return vis, kind == "keep"
    if value.dtype == torch.bool or not value.is_floating_point():
        return None
    hidden = value <= 0.5 * torch.finfo(value.dtype).min
    if not torch.equal(value.masked_fill(hidden, 0.0), torch.zeros_like(value)):
        return None  # a bias (e.g. relative positions), not only a mask
    hard = bool(torch.isneginf(value[hidden]).all()) if hidden.any() else True
    return ~hidden, hard


def _is_top_left_causal(vis: torch.Tensor, tq: int, tk: int) -> bool:
    if vis.dim() < 2:
        return False
    if vis.shape[-2] not in (1, tq) or vis.shape[-1] not in (1, tk):
        return False
    vis = vis.expand(*vis.shape[:-2], tq, tk)
    tri = torch.ones(tq, tk, dtype=torch.bool, device=vis.device).tril()
    return torch.equal(vis, tri.expand_as(vis))


def recognize_causal(site, scores_shape) -> None:
    """Turn one constant causal mask entry of ``site`` into ``site.is_causal`` (in place)."""
    if site.is_causal or not site.masks or scores_shape is None:
        return
    if not all(isinstance(s, int) for s in scores_shape) or len(scores_shape) < 2:
        return
    tq, tk = scores_shape[-2], scores_shape[-1]
    for i, entry in enumerate(site.masks):
        value = constant_tensor(entry[1])
        if value is None:
            continue
        at = entry[-1]
        if at is not None:  # broadcast against a view of the scores: bring it to the scores
            numel = 1
            for s in scores_shape:
                numel *= s
            if numel > _MAX_NUMEL:
                continue
            from ..runtime.site_call import _to_scores
            try:
                value = _to_scores(value, at, tuple(scores_shape))
            except RuntimeError:
                continue
        seen = _visible(entry, value)
        if seen is None:
            continue
        vis, hard = seen
        if not _is_top_left_causal(vis, tq, tk):
            continue
        if not hard and len(site.masks) > 1:
            continue  # a finite causal fill next to another mask: not the hard triangle
        if any(m[0] == "fill" for m in site.masks[i + 1:]):
            continue  # a later finite fill would override the hidden entries
        site.masks = site.masks[:i] + site.masks[i + 1:]
        site.is_causal = True
        return
