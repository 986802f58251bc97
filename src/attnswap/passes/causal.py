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
an argument of the attention module) are opaque here: they stay masks, and the kernels get no
``is_causal`` from them (the value can change from call to call; the CPU kernel skips the hidden
tiles of the mask it receives at run time). For the *report* only, :func:`observed_causal`
classifies the mask the site received in the call that compiled it (dynamo's example inputs,
during ``convert()`` its example call): when every key after the query is hidden there, the
site's record says ``causal_mask`` and the report's causal column says "mask". Buffers are taken
as the constants models use them for; a converted model whose causal buffer is rewritten in
place afterwards would not see the change.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from ..kernels.reference import float_mask_is_masked, masked_threshold
from .normalize import _placeholder_kind, example, is_mutating

_MAX_NUMEL = 1 << 22  # evaluate masks up to 4M entries at compile time
_MAX_OBSERVED = 1 << 24  # observe (report only) masks up to 16M entries
_LOW_FILL = masked_threshold(torch.float16)  # a finite fill at or below this hides
_RANDOM = ("rand", "randn", "randint", "bernoulli", "dropout", "normal", "uniform")


def constant_tensor(node) -> torch.Tensor | None:
    """The value of ``node`` when it is computed from constants and buffers alone (static
    shapes), else None."""
    return _evaluate(node, inputs=False)


def observed_tensor(node) -> torch.Tensor | None:
    """The value ``node`` had in the call that compiled its graph: computed from the real tensors
    dynamo recorded for the graph's inputs (its example inputs), else None (no recorded inputs, a
    random or in-place op on the way, or too large). A report-only observation: another call may
    give another value, so nothing the kernels are told may rest on it."""
    return _evaluate(node, inputs=True)


def _hint(value):
    """A plain int for an int or a SymInt with a hint (the size of the compiling call), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt):
        hint = getattr(value.node, "hint", None)
        return hint if isinstance(hint, int) else None
    return None


def _evaluate(node, inputs: bool) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    env = {}
    order, seen, stack = [], set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if inputs:
            size = _hint(example(n))
            if size is not None:  # a size: its value in the compiling call, no need to compute it
                env[n] = size
                continue
        order.append(n)
        stack.extend(n.all_input_nodes)
    gm = node.graph.owning_module
    try:
        with torch.no_grad():
            for n in sorted(order, key=_position(node.graph)):
                ex = example(n)
                if inputs:
                    if any(is_mutating(u) for u in n.users):
                        return None  # written in place somewhere: the value at the site differs
                elif isinstance(ex, torch.Tensor) and not _small_and_static(ex):
                    return None
                if n.op == "placeholder":
                    if not inputs and _placeholder_kind(n) != "buffer":
                        return None
                    value = getattr(n.meta.get("grapharg"), "example", None)
                    if inputs and _hint(value) is not None:
                        env[n] = _hint(value)
                        continue
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
                    if is_mutating(n):
                        return None
                    args = map_arg(n.args, env.__getitem__)
                    kwargs = map_arg(n.kwargs, env.__getitem__)
                    if n.op == "call_method":
                        env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
                    else:
                        env[n] = n.target(*args, **kwargs)
                    out = env[n]
                    if inputs and isinstance(out, torch.Tensor) and out.numel() > _MAX_OBSERVED:
                        return None
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
    hidden = float_mask_is_masked(value)
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


import operator

_AND = {operator.and_, torch.logical_and, torch.bitwise_and, torch.ops.aten.bitwise_and.Tensor,
        torch.ops.aten.logical_and.default}
_NOT = {operator.invert, torch.logical_not, torch.bitwise_not, torch.ops.aten.bitwise_not.default,
        torch.ops.aten.logical_not.default}


def _is(node, fns, methods) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in fns)
        or (node.op == "call_method" and node.target in methods))


def _and_terms(node, depth=0) -> list:
    """The operands of a bool AND (through broadcasts and device moves), e.g. HF's
    ``and_masks(causal, padding)`` as built by its SDPA mask builder."""
    if depth > 16:
        return [node]
    if _is(node, _AND, ("__and__", "logical_and", "bitwise_and")):
        return _and_terms(node.args[0], depth + 1) + _and_terms(node.args[1], depth + 1)
    if _is(node, {torch.ops.aten.expand.default}, ("expand", "to", "contiguous")):
        if node.target == "to" and any(isinstance(a, torch.dtype) for a in
                                       list(node.args[1:]) + list(node.kwargs.values())):
            return [node]
        return _and_terms(node.args[0], depth + 1)
    return [node]


def _split_causal(site, scores_shape, tq, tk) -> bool:
    """A hard bool mask that is ``causal & rest`` (constant causal terms ANDed with
    input-dependent ones): is_causal plus the rest as the mask."""
    for i, entry in enumerate(site.masks):
        if entry[0] != "keep" or entry[-1] is not None:
            continue
        attend = entry[1]
        if entry[2]:  # attend where ~tensor
            if not _is(attend, _NOT, ("__invert__", "logical_not", "bitwise_not")):
                continue
            attend = attend.args[0]
        terms = _and_terms(attend)
        if len(terms) < 2:
            continue
        values = [constant_tensor(t) for t in terms]
        const = [v for v in values if v is not None]
        rest = [t for t, v in zip(terms, values) if v is None]
        if not const or not rest or any(v.dtype != torch.bool for v in const):
            continue
        vis = const[0]
        for v in const[1:]:
            vis = vis & v
        if not _is_top_left_causal(vis, tq, tk):
            continue
        if any(m[0] == "fill" for m in site.masks[i + 1:]):
            continue
        from .normalize import dtype_of
        if any(dtype_of(t) != torch.bool for t in rest):
            continue
        site.masks = site.masks[:i] + [("keep", t, False, None) for t in rest] + site.masks[i + 1:]
        site.is_causal = True
        return True
    return False


def recognize_causal(site, scores_shape) -> None:
    """Turn one constant causal mask entry of ``site`` into ``site.is_causal`` (in place); when
    the site stays masked, note in ``site.causal_mask`` whether the mask it received in the
    compiling call was causal (report only, see :func:`observed_causal`)."""
    _recognize(site, scores_shape)
    if not site.is_causal and site.masks:
        site.causal_mask = observed_causal(site, scores_shape)


def _recognize(site, scores_shape) -> None:
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
    _split_causal(site, scores_shape, tq, tk)


def _entry_visible(entry, value: torch.Tensor) -> torch.Tensor | None:
    """Where one mask entry (as observed) lets a score through, as bool; None when unknown.
    A finite fill as low as ``finfo.min`` hides (a row it fills entirely attends uniformly in
    the original softmax: those are padding rows); additive finite values are a bias, visible."""
    kind = entry[0]
    if kind in ("keep", "fill"):
        attend = value.bool()
        attend = ~attend if entry[2] else attend
        if kind == "keep":
            return attend
        # fp16's finfo.min and anything lower (fp32/bf16 finfo.min, -1e30) hides
        return attend if entry[3] <= _LOW_FILL else torch.ones_like(attend)
    if value.dtype == torch.bool or not value.is_floating_point():
        return None
    coef = entry[2]
    scaled = value if coef == 1.0 else value * coef
    return ~float_mask_is_masked(scaled)


def is_causal_visibility(vis: torch.Tensor, tq: int, tk: int) -> bool:
    """``vis`` (bool, broadcastable to ``[..., tq, tk]``) hides every key after its query --
    top-left aligned for ``tq == tk``, bottom-right (a decoder's KV cache) for ``tq < tk`` --
    and the triangle is really there: some key that the first query may not see is seen by a
    later query (not a key-padding mask that happens to leave only the first keys). Padding
    on top of the triangle (left or right, per batch element) is still causal."""
    if vis.dim() < 2 or tq < 2 or tk < tq:
        return False
    if vis.shape[-2] not in (1, tq) or vis.shape[-1] not in (1, tk) or vis.shape[-2] == 1:
        return False
    vis = vis.expand(*vis.shape[:-2], tq, tk)
    off = tk - tq
    future = torch.ones(tq, tk, dtype=torch.bool, device=vis.device).triu(off + 1)
    if bool((vis & future).any()):
        return False
    return bool(vis[..., off + 1:].any())


def observed_causal(site, scores_shape) -> bool:
    """The masks ``site`` received in the call that compiled it (:func:`observed_tensor`) hide
    every key after the query, together (:func:`is_causal_visibility`). False when any entry is
    unknown there (an input dynamo recorded no value for, a random op) or too large."""
    if not site.masks or scores_shape is None or len(scores_shape) < 2:
        return False
    shape = tuple(_hint(s) for s in scores_shape)
    if any(s is None for s in shape):
        return False
    tq, tk = shape[-2], shape[-1]
    vis = None
    try:
        for entry in site.masks:
            value = observed_tensor(entry[1])
            if value is None:
                return False
            at = entry[-1]
            if at is not None:
                numel = 1
                for s in shape:
                    numel *= s
                if numel > _MAX_OBSERVED:
                    return False
                from ..runtime.site_call import _to_scores
                at = tuple(_hint(s) if _hint(s) is not None else s for s in at)
                value = _to_scores(value, at, shape)
            seen = _entry_visible(entry, value)
            if seen is None:
                return False
            vis = seen if vis is None else vis & seen
        return is_causal_visibility(vis, tq, tk)
    except (RuntimeError, TypeError, ValueError):
        return False


def observed_causal_mha(call: dict) -> bool:
    """:func:`observed_causal` for an ``nn.MultiheadAttention`` site (``call``: the arguments of
    ``multi_head_attention_forward``): its ``attn_mask`` (bool True = not allowed, or added) and
    ``key_padding_mask`` (bool True = padding, or added), as received in the compiling call."""
    am_node, kpm_node = call.get("attn_mask"), call.get("key_padding_mask")
    if am_node is None:
        return False
    try:
        am = observed_tensor(am_node)
        if am is None or am.dim() not in (2, 3):
            return False
        am_vis = ~am if am.dtype == torch.bool else ~float_mask_is_masked(am)
        if kpm_node is not None:
            kpm = observed_tensor(kpm_node)
            if kpm is None:
                return False
            kpm_vis = ~kpm if kpm.dtype == torch.bool else ~float_mask_is_masked(kpm)
            if kpm_vis.dim() == 1:
                kpm_vis = kpm_vis[None]
            b = kpm_vis.shape[0]
            if am_vis.dim() == 3:
                am_vis = am_vis.reshape(b, -1, *am_vis.shape[-2:])
            else:
                am_vis = am_vis[None, None]
            am_vis = am_vis & kpm_vis[:, None, None, :]
        return is_causal_visibility(am_vis, am_vis.shape[-2], am_vis.shape[-1])
    except (RuntimeError, TypeError, ValueError):
        return False
