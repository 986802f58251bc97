"""Detection: one structural rule, anchored on each softmax (DESIGN.md §1.2).

A softmax over the last axis is attention only when

* its input is — through casts, views, constant scales, additive masks, ``masked_fill``/``where``
  with a very negative fill — the product ``Q @ Kᵀ`` of two *activations* (never a parameter), and
* its output is — through casts, views and dropout, with no other consumer — the left operand of a
  matmul with an activation ``V``.

Everything else (classifier heads, MoE routers, softmax over a learned query, probabilities that
are returned to the caller, soft-capping, learnable temperatures) is left alone with a reason.
``F.scaled_dot_product_attention`` and ``F.multi_head_attention_forward`` are sites by themselves.

Detection reads the graph only; it never depends on module or function names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .causal import observed_causal_mha, recognize_causal
from .normalize import (
    constant_value,
    example,
    depends_on_input,
    is_mutating,
    live_users,
    is_very_negative,
    shape_of,
    dtype_of,
    spell,
)

_PASS_THROUGH = ("cast", "identity")


@dataclass
class Site:
    """A matched attention site, with everything canonicalization needs."""

    pattern: str
    anchor: fx.Node  # the softmax / sdpa / mha node
    output: fx.Node  # whose uses the rewritten site takes over
    q: Any = None
    k: Any = None
    v: Any = None
    k_transposed: bool = False
    scale: float = 1.0
    # In the order the model applies them (matmul outwards); see runtime/site_call.py:
    # ("add", node, coef, at_shape), ("keep", node, negate, at_shape) (a -inf fill: masked),
    # ("fill", node, negate, value, at_shape) (a finite fill such as finfo.min: a replacement).
    masks: list = field(default_factory=list)
    q_factors: list = field(default_factory=list)  # (node, "mul" | "div"): tensor scales on q
    k_factors: list = field(default_factory=list)  # constant along the queries: scales on k
    heads: int | None = None  # flattened-head sites ([B*H, T, D]) whose scores are viewed [B, H, ..]
    head_axis: int | None = None  # where the head axis sits in q/k/v when not at -3
    broadcast: bool = False  # q/k/v batch shapes differ (a broadcasting matmul)
    is_causal: bool = False
    causal_mask: bool = False  # report only: the mask seen when compiling was causal (+padding)
    dropout_p: float = 0.0
    gqa_groups: int = 1
    out_dtype: Any = None
    mha_call: Any = None  # for pattern "nn.MultiheadAttention": (args, kwargs)
    nodes: list = field(default_factory=list)  # nodes the site replaces (for bookkeeping)
    shape_users: list = field(default_factory=list)  # `x.expand_as(scores)`, `scores.size()`
    shape_static: dict = field(default_factory=dict)  # shape user -> the static shape it reads

    @property
    def mask_kind(self) -> str:
        kinds = []
        if any(m[0] in ("keep", "fill") for m in self.masks):
            kinds.append("bool")
        if any(m[0] == "add" for m in self.masks):
            kinds.append("float")
        return "+".join(kinds) or "none"


@dataclass
class Rejection:
    node: fx.Node
    reason: str


class _Reject(Exception):
    pass


def _shape_only_user(user: fx.Node, node: fx.Node) -> bool:
    """``user`` reads only ``node``'s shape or dtype (``mask.expand_as(scores)``,
    ``probs.type_as(scores)``, ``scores.size()``, ``.size(d)``, ``.dim()``): it does not consume
    the scores' values."""
    if user.op != "call_method":
        return False
    if user.target in ("expand_as", "type_as"):
        return len(user.args) == 2 and user.args[1] is node and user.args[0] is not node
    return _size_read(user, node)


def _size_read(user: fx.Node, node: fx.Node) -> bool:
    """``node.size()``, ``node.size(d)``, ``node.size(dim=d)`` or ``node.dim()`` (a constant
    axis): a shape check, re-sourced from q and k when the site is rewritten."""
    if user.op != "call_method" or not user.args or user.args[0] is not node:
        return False
    if user.target == "dim":
        return len(user.args) == 1 and not user.kwargs
    if user.target != "size":
        return False
    dims = list(user.args[1:]) + list(user.kwargs.values())
    return set(user.kwargs) <= {"dim"} and len(dims) <= 1 and all(type(d) is int for d in dims)


def _shape_source(user: fx.Node) -> fx.Node:
    """The node whose shape a re-sourced shape user reads."""
    return user.args[1] if user.target == "expand_as" else user.args[0]


def _norm_dim(d, rank):
    return d + rank if isinstance(d, int) and d < 0 else d


def _is_last_two_swap(s, rank) -> bool:
    if s.op == "transpose":
        d = {_norm_dim(x, rank) for x in s.attrs["dims"]}
        return d == {rank - 2, rank - 1}
    if s.op == "permute":
        dims = [_norm_dim(x, rank) for x in s.attrs["dims"]]
        return dims == list(range(rank - 2)) + [rank - 1, rank - 2]
    return False


def _reaches_matmul(node, depth=0) -> bool:
    """Cheap test: can ``node`` be the score chain (leads back to a matmul through chain ops)?"""
    if depth > 24 or not isinstance(node, fx.Node):
        return False
    s = spell(node)
    if s is None:
        return False
    if s.op in ("matmul", "baddbmm"):
        return True
    if s.op in _PASS_THROUGH + ("view", "tanh"):
        return _reaches_matmul(s.args[0], depth + 1)
    if s.op in ("mul", "div", "add"):
        return _reaches_matmul(s.args[0], depth + 1) or _reaches_matmul(s.args[1], depth + 1)
    if s.op == "masked_fill":
        return _reaches_matmul(s.args[0], depth + 1)
    if s.op == "where":
        return _reaches_matmul(s.args[1], depth + 1) or _reaches_matmul(s.args[2], depth + 1)
    return False


def _scalar_factor(node) -> tuple[Any, float] | None:
    """``(inner, f)`` when ``node`` is ``inner * f`` or ``inner / f`` with a constant ``f``."""
    s = spell(node)
    if s is None or s.op not in ("mul", "div"):
        return None
    a, b = s.args
    if s.op == "mul" and constant_value(a) is not None and isinstance(b, fx.Node):
        a, b = b, a
    f = constant_value(b)
    if f is None or not isinstance(a, fx.Node):
        return None
    return a, (f if s.op == "mul" else 1.0 / f)


def _single_user(node: fx.Node, what: str, site=None):
    users = live_users(node)
    if site is not None:  # shape checks on the probabilities are re-sourced like the scores'
        reads = [u for u in users if _size_read(u, node)]
        site.shape_users.extend(reads)
        users = [u for u in users if u not in reads]
    if len(users) != 1:
        raise _Reject(
            f"the attention {what} have {len(users)} consumers (for example attention weights "
            "returned to the caller, need_weights=True or output_attentions=True); the canonical "
            "op cannot expose them"
        )
    return users[0]


def _unwrap_scales(node):
    f = 1.0
    while True:
        sf = _scalar_factor(node)
        if sf is None:
            s = spell(node)
            if s is not None and s.op == "identity":
                node = s.args[0]
                continue
            return node, f
        node, g = sf
        f *= g


def _repeat_kv_base(node, rank):
    """The un-repeated K/V of ``repeat_kv`` (expand+reshape) or ``repeat_interleave`` on dim 1."""
    if rank != 4:
        return None
    s = spell(node)
    if s is None:
        return None
    if s.op == "repeat_interleave":
        if _norm_dim(s.attrs.get("dim"), 4) == 1 and isinstance(s.attrs.get("repeats"), int):
            return s.args[0], s.attrs["repeats"]
        return None
    if s.op != "view":
        return None
    inner = s.args[0]
    while spell(inner) is not None and spell(inner).op == "identity":  # aten: expand → clone → view
        inner = spell(inner).args[0]
    e = spell(inner)
    if e is None or e.op != "expand":
        return None
    src = e.args[0]
    u = spell(src)
    base = None
    if u is not None and u.op == "unsqueeze" and _norm_dim(u.attrs["dim"], 5) == 2:
        base = u.args[0]
    elif u is not None and u.op == "getitem":
        idx = u.attrs["index"]
        if (isinstance(idx, tuple) and len(idx) >= 3 and idx[2] is None
                and all(isinstance(i, slice) and i == slice(None) for i in idx[:2])
                and all(isinstance(i, slice) and i == slice(None) for i in idx[3:])):
            base = u.args[0]
    if base is None:
        return None
    bs, full = shape_of(base), shape_of(node)
    if bs is None or full is None or len(bs) != 4:
        return None
    if not isinstance(bs[1], int) or not isinstance(full[1], int) or full[1] % bs[1]:
        return None
    return base, full[1] // bs[1]


def _match_probabilities(sm: fx.Node, site: Site):
    """Walk softmax → value matmul; return (pv_node, V, dropout_p)."""
    cur, dropout_p = sm, 0.0
    for _ in range(16):
        u = _single_user(cur, "probabilities", site)
        site.nodes.append(u)
        s = spell(u)
        if s is None:
            raise _Reject(f"the probabilities feed `{u.format_node()}` rather than a value matmul")
        if s.op in _PASS_THROUGH and s.args[0] is cur:
            cur = u
            continue
        if s.op == "view" and s.args[0] is cur:
            a, b = shape_of(cur), shape_of(u)
            if a is None or b is None or a[-1] != b[-1]:
                raise _Reject("a view between softmax and the value matmul changes the key axis")
            cur = u
            continue
        if s.op == "dropout" and s.args[0] is cur:
            p = constant_value(s.attrs["p"])
            if p is None or not isinstance(s.attrs["training"], bool):
                raise _Reject("attention dropout with a non-constant probability or mode")
            if s.attrs["training"] and p > 0:
                if dropout_p:
                    raise _Reject("two dropouts on the attention probabilities")
                dropout_p = p
            cur = u
            continue
        if s.op == "matmul" and s.args[0] is cur and not s.attrs.get("rhs_transposed"):
            return u, s.args[1], dropout_p
        if s.op == "mul":
            raise _Reject("the probabilities are multiplied by a tensor (e.g. a head mask) "
                          "before the value matmul")
        raise _Reject(f"the probabilities feed `{u.target}` rather than the left operand of a "
                      "value matmul")
    raise _Reject("probability chain too long")


def _match_scores(sm: fx.Node, site: Site):
    """Walk softmax input → Q @ Kᵀ, collecting scale and masks; return the QK matmul spelling."""
    steps = []  # from softmax inwards
    prev, cur = sm, spell(sm).args[0]
    for _ in range(32):
        if not isinstance(cur, fx.Node):
            raise _Reject("the scores are not a tensor computed in this graph")
        if cur.op == "placeholder":
            raise _Reject("the scores come from outside this graph (a graph break inside the "
                          "attention?)")
        s = spell(cur)
        if s is None:
            raise _Reject(f"the scores come from `{cur.target}`, not from a matmul of two "
                          "activations")
        site.nodes.append(cur)
        users = live_users(cur)
        if any(u is not prev and is_mutating(u) and u.args and u.args[0] is cur for u in users):
            raise _Reject(f"the intermediate scores `{cur.name}` are modified in place (slice "
                          "assignment `scores[..., a:, b:] = ...` or an in-place op, e.g. "
                          "MViTv2's decomposed relative-position term): a partial in-place "
                          "update of the scores is not a scale, bias or mask of one op")
        meta_users = [u for u in users if _shape_only_user(u, cur)]
        if len(users) - len(meta_users) != 1:
            raise _Reject(f"intermediate scores `{cur.name}` have {len(users)} consumers")
        # expand_as and size reads must be re-sourced from q and k; a type_as is on the
        # probability chain (then it goes with the site) or keeps the scores alive, which is
        # still exact.
        site.shape_users.extend(u for u in meta_users if u.target != "type_as")
        prev = cur
        if s.op in _PASS_THROUGH:
            cur = s.args[0]
            continue
        if s.op == "view":
            a, b = shape_of(cur), shape_of(s.args[0])
            if a is None or b is None or a[-1] != b[-1]:
                raise _Reject("a view of the scores changes the key axis")
            steps.append(("view", cur, None))
            cur = s.args[0]
            continue
        if s.op == "tanh":
            raise _Reject("logit soft-capping (tanh on the scores) is not expressible by the "
                          "canonical op")
        if s.op in ("mul", "div"):
            sf = _scalar_factor(cur)
            if sf is not None:
                steps.append(("scale", cur, sf[1]))
                cur = sf[0]
                continue
            a, b = s.args
            if s.op == "mul" and not _reaches_matmul(a) and _reaches_matmul(b):
                a, b = b, a
            if not _reaches_matmul(a) or _reaches_matmul(b):
                raise _Reject("the scores are divided into a tensor, or multiplied by scores")
            steps.append(("tensor_scale", cur, (b, s.op)))
            cur = a
            continue
        if s.op == "add":
            a, b = s.args
            if _reaches_matmul(a):
                chain, other = a, b
            elif _reaches_matmul(b):
                chain, other = b, a
            else:
                raise _Reject("no matmul found under the scores")
            if not isinstance(other, fx.Node):
                # `scores + 0` is what HF DeBERTa writes when it has no relative term
                # (`rel_att: int = 0`); adding zero is exact to drop, any other constant is not
                # (it shifts sigmoid and ReLU weights) and stays a reason.
                if isinstance(other, (int, float)) and not isinstance(other, bool) and other == 0:
                    cur = chain
                    continue
                raise _Reject(f"a constant ({other!r}) is added to the scores")
            steps.append(("add", cur, other))
            cur = chain
            continue
        if s.op == "sub":
            # `scores - 1e30 * mask` (XLNet, Funnel): an additive mask with coefficient -1.
            a, b = s.args
            if not _reaches_matmul(a) or (isinstance(b, fx.Node) and _reaches_matmul(b)):
                raise _Reject("the scores are subtracted from a tensor (negated scores)")
            if not isinstance(b, fx.Node):
                if isinstance(b, (int, float)) and not isinstance(b, bool) and b == 0:
                    cur = a
                    continue
                raise _Reject(f"a constant ({b!r}) is subtracted from the scores")
            steps.append(("sub", cur, b))
            cur = a
            continue
        if s.op == "masked_fill":
            val = constant_value(s.attrs["value"])
            if not is_very_negative(val):
                raise _Reject(f"masked_fill of the scores with {s.attrs['value']!r}, not a very "
                              "negative value")
            steps.append(("bool", cur, (s.args[1], True, val)))
            cur = s.args[0]
            continue
        if s.op == "where":
            cond, x, y = s.args
            if is_very_negative(constant_value(y)) and _reaches_matmul(x):
                steps.append(("bool", cur, (cond, False, constant_value(y))))
                cur = x
                continue
            if is_very_negative(constant_value(x)) and _reaches_matmul(y):
                steps.append(("bool", cur, (cond, True, constant_value(x))))
                cur = y
                continue
            raise _Reject("torch.where on the scores with a fill that is not very negative")
        if s.op == "matmul":
            return cur, s, steps
        if s.op == "baddbmm":
            beta, alpha = constant_value(s.attrs["beta"]), constant_value(s.attrs["alpha"])
            if beta not in (0.0, 1.0) or alpha is None:
                raise _Reject("baddbmm with beta not in {0, 1} or a non-constant alpha")
            if beta == 1.0:  # beta=0 ignores the input buffer (GPT-2's reorder_and_upcast_attn)
                steps.append(("add", cur, s.args[0]))
            if alpha != 1.0:
                steps.append(("scale", cur, alpha))
            return cur, s, steps
        raise _Reject(f"the scores come from `{cur.target}`, not from a matmul")
    raise _Reject("score chain too long")


def _fold_steps(site: Site, steps, scores_shape):
    """Fold the steps (matmul outwards) into one scale, tensor factors on q and the site's masks,
    in the order the model applies them. A mask's masked entries are decided before any later
    rescaling: the site call keeps each mask's value and its coefficient apart."""
    scale = 1.0
    at_shape = None
    for op, node, arg in reversed(steps):
        if op == "view":
            at_shape = _shape_args(node)
        elif op == "scale":
            if arg <= 0 and site.masks:
                raise _Reject("a non-positive scale after a mask")
            scale *= arg
            site.masks = [_rescaled(m, arg) for m in site.masks]
        elif op == "tensor_scale":
            factor, how = arg
            if site.masks:
                raise _Reject("the scores are scaled by a tensor after a mask was applied (the "
                              "factor would rescale the mask); only a tensor scale applied "
                              "before masks folds into q")
            if at_shape is not None:
                raise _Reject("a tensor scale on a reshaped view of the scores")
            where, why = _factor_target(factor, scores_shape)
            if why:
                raise _Reject(why)
            (site.q_factors if where == "q" else site.k_factors).append((factor, how))
        elif op in ("add", "sub"):
            site.masks.append(("add", arg, 1.0 if op == "add" else -1.0, at_shape))
        elif op == "bool":
            m, negate, value = arg
            if dtype_of(m) not in (torch.bool, None):
                raise _Reject("masked_fill/where condition is not a bool tensor")
            if value == float("-inf"):
                site.masks.append(("keep", m, negate, at_shape))
            else:
                site.masks.append(("fill", m, negate, float(value), at_shape))
    return scale


def _rescaled(mask, f):
    if mask[0] == "add":
        return ("add", mask[1], mask[2] * f, mask[3])
    if mask[0] == "fill":
        return ("fill", mask[1], mask[2], mask[3] * f, mask[4])
    return mask


def _factor_target(factor, scores_shape):
    """``("q" | "k", None)``: where a tensor factor on the scores moves exactly -- onto q when it
    is constant along the key axis, onto k when it is constant along the query axis -- or
    ``(None, why)``. It must not broaden the scores."""
    ex = example(factor)
    if not isinstance(ex, torch.Tensor):
        if isinstance(ex, (int, float, torch.SymInt, torch.SymFloat)):
            return "q", None  # a symbolic number (a dynamic-shape sqrt(d))
        return None, "the scores are scaled by something that is neither a tensor nor a number"
    fs = tuple(ex.shape)
    if scores_shape is None or len(fs) > len(scores_shape):
        return None, "a tensor scale of higher rank than the scores"
    try:
        if tuple(torch.broadcast_shapes(fs, scores_shape)) != tuple(scores_shape):
            return None, f"a tensor scale of shape {fs} broadens the scores {tuple(scores_shape)}"
    except RuntimeError:
        return None, f"a tensor scale of shape {fs} does not broadcast with the scores"
    if not fs or fs[-1] == 1:
        return "q", None
    if len(fs) == 1 or fs[-2] == 1:
        return "k", None
    return None, ("the scores are scaled by a tensor that varies along the key axis and the "
                  f"query axis (shape {fs}); only a factor constant along one of them folds "
                  "into q or k")


def _shape_args(view_node: fx.Node):
    s = spell(view_node)
    shape = s.attrs["shape"]
    if isinstance(shape, (list, tuple)) and len(shape) == 1 and isinstance(shape[0], (list, tuple)):
        shape = shape[0]
    shp = shape_of(view_node)
    # Prefer the recorded static shape (it resolves -1); fall back to the view's own arguments.
    if shp is not None and all(isinstance(x, int) for x in shp):
        return tuple(shp)
    return tuple(shape)


def match_softmax(sm: fx.Node) -> Site:
    s = spell(sm)
    rank = len(shape_of(sm) or ())
    dim = s.attrs["dim"]
    if not isinstance(dim, int) or _norm_dim(dim, rank) != rank - 1:
        raise _Reject(f"softmax over axis {dim}, not the last (key) axis")
    site = Site(pattern="matmul-softmax-matmul", anchor=sm, output=None, nodes=[sm])
    pv, v, dropout_p = _match_probabilities(sm, site)
    qk_node, qk, steps = _match_scores(sm, site)
    if qk.op == "baddbmm":
        site.pattern = "baddbmm-softmax-bmm"
        a, b = qk.args[1], qk.args[2]
    else:
        a, b = qk.args
        if qk_node.op == "call_function" and "einsum" in str(qk_node.target):
            site.pattern = "einsum-softmax-einsum"
    srank = len(shape_of(qk_node) or ())
    q, fq = _unwrap_scales(a)
    if qk.attrs.get("rhs_transposed"):
        kt, fk = _unwrap_scales(b)
        k, k_transposed = kt, False
    else:
        kt, fk = _unwrap_scales(b)
        ks = spell(kt)
        if ks is not None and _is_last_two_swap(ks, srank):
            k, fk2 = _unwrap_scales(ks.args[0])
            fk *= fk2
            k_transposed = False
        else:
            k, k_transposed = kt, True
    _require_activations(q, k, v)
    sshape = shape_of(qk_node)
    site.scale = fq * fk * _fold_steps(site, steps, sshape)
    if site.scale <= 0 or not math.isfinite(site.scale):
        raise _Reject(f"scale {site.scale} is not positive and finite")
    qs, vs = shape_of(q), shape_of(v)
    ks = shape_of(k)
    if ks is not None and k_transposed:
        ks = ks[:-2] + (ks[-1], ks[-2])
    if sshape is not None and qs is not None and ks is not None:
        if qs[:-2] != sshape[:-2] or ks[:-2] != sshape[:-2]:
            site.broadcast = True  # e.g. learned queries [H, Tq, D] against keys [B, H, Tk, D]
        for f, _ in site.q_factors:
            fs = shape_of(f)
            if fs is not None and len(fs) and len(fs) > len(qs):
                raise _Reject("a tensor scale of higher rank than the query")
        for f, _ in site.k_factors:
            fs = shape_of(f)
            if fs is not None and len(fs) > len(ks):
                raise _Reject("a tensor scale of higher rank than the key")
            as_k = (fs[-1], 1) if fs is not None and len(fs) == 1 else \
                (fs[:-2] + (fs[-1], fs[-2]) if fs else ())
            try:
                if tuple(torch.broadcast_shapes(as_k, ks[:-1] + (1,))) != ks[:-1] + (1,):
                    site.broadcast = True  # the factor has batch axes k lacks: expand all three
            except RuntimeError:
                raise _Reject(f"a tensor scale of shape {fs} does not fit the keys {ks}")
    if not k_transposed and not site.broadcast and not site.k_factors:
        base_k, base_v = _repeat_kv_base(k, srank), _repeat_kv_base(v, srank)
        if base_k and base_v and base_k[1] == base_v[1]:
            k, v = base_k[0], base_v[0]
            site.gqa_groups = base_k[1]
    from_qk = None if qs is None or ks is None else (*qs[:-1], ks[-2])  # (ks: [.., keys, D])
    for u in site.shape_users:
        # Re-sourced as q's batch and query dims with k's key count; where the shape read is
        # another one (a broadcasting site, reshaped scores, another layout) a static shape is
        # recorded instead, and a symbolic one cannot be rebuilt from q and k.
        want = shape_of(_shape_source(u))
        if want is None or from_qk is None:
            raise _Reject(f"`{u.format_node()}` reads the shape of the scores, and the graph "
                          "does not record the shapes to rebuild it from")
        if want == from_qk:
            continue
        if all(type(x) is int for x in want):
            site.shape_static[u] = want
        else:
            raise _Reject(f"`{u.format_node()}` reads the shape of the scores in a layout the "
                          "canonical op does not rebuild from q and k")
    recognize_causal(site, sshape)
    site.heads = _flattened_heads(steps, sshape, shape_of(sm), qs, vs)
    site.q, site.k, site.v, site.k_transposed = q, k, v, k_transposed
    site.head_axis = _layout_head_axis(q, k, v, qs)
    site.output = pv
    site.dropout_p = dropout_p
    site.out_dtype = dtype_of(pv)
    return site


def _require_activations(q, k, v):
    """K and V must be computed from the model's input; Q may come from parameters alone
    (learned queries: Perceiver latents, attention pooling). Keys from parameters alone are a
    lookup into learned memory (routers, classifier heads, learned centroids), not attention."""
    for name, t in (("key", k), ("value", v)):
        if not depends_on_input(t):
            raise _Reject(f"the {name} operand is computed from parameters alone, not from the "
                          "input (a learned memory, router or classifier head is not attention)")


def _flattened_heads(steps, sshape, smshape, qs, vs):
    """Heads H of a site computed on flattened heads ``[B*H, T, D]`` whose scores (or
    probabilities) are viewed as ``[B, H, Tq, Tk]`` around the softmax (BLOOM, DeBERTa, BART)."""
    if sshape is None or len(sshape) != 3 or qs is None or len(qs) != 3:
        return None
    if vs is not None and len(vs) == 4:
        return None  # the site call already computes in the value matmul's [B, H, T, D] layout
    views = [shape_of(n) for op, n, _ in steps if op == "view"] + [smshape]
    for shp in views:
        if shp is None or len(shp) != 4 or not isinstance(shp[1], int):
            continue
        if tuple(shp[-2:]) == tuple(sshape[-2:]) and shp[1] > 0:
            b = sshape[0]
            if not isinstance(b, int) or b % shp[1] == 0:
                return shp[1]
    return None


def _splits_channels(inp, out, head_dim) -> bool:
    """``out`` = ``inp`` with its channel axis split into ``(..., H, head_dim)`` (also a fused
    ``(3, H, d)`` of a qkv projection, and the token axis split into windows alongside, as in
    Hiera): the axis before ``head_dim`` holds the heads."""
    if not inp or not out or len(out) < 2 or out[-1] != head_dim:
        return False
    if not all(isinstance(x, int) for x in out[-2:]) or not isinstance(inp[-1], int):
        return False
    tail = 1
    for j in range(len(out) - 1, -1, -1):
        if not isinstance(out[j], int):
            return False
        tail *= out[j]
        if tail == inp[-1]:
            return j <= len(out) - 2
        if tail > inp[-1]:
            return False
    return False


def _layout_head_axis(q, k, v, qs):
    """The head axis of a site of rank 5 or more (None for rank 4, where it is -3, and when it
    cannot be traced: SAS then says so rather than guess). q, k and v share one layout; q may be
    pooled (Hiera's strided max over the queries)."""
    if qs is None or len(qs) < 5:
        return None
    for t in (q, k, v):
        found = _head_axis(t, shape_of(t))
        if found is not False:
            return found
    return None


def _head_axis(q, qs):
    """The axis of ``q`` that holds the heads when it is not -3 (5-d windowed sites such as timm
    Nest's ``[B, H, blocks, N, d]``), found where the channels were split into ``(..., H, d)``
    and followed through the permutes, transposes and unbinds down to ``q`` (a negative axis);
    False when it cannot be found."""
    if qs is None or len(qs) < 5:
        return False
    chain, node = [], q
    for _ in range(16):
        s = spell(node)
        if s is None or not s.args:
            return False
        src = s.args[0]
        if s.op == "view":
            out, inp = shape_of(node), shape_of(src)
            if _splits_channels(inp, out, qs[-1]):
                axis = len(out) - 2
                break
            return False
        if s.op == "getitem" and not isinstance(example(src), torch.Tensor):
            tgt = getattr(src, "target", None)
            name = tgt if isinstance(tgt, str) else getattr(tgt, "__name__", "")
            dim = (src.args[1] if len(src.args) > 1 else src.kwargs.get("dim", 0)) if name == "unbind" else None
            if name != "unbind" or dim != 0:
                return False
            chain.append(("drop0", None))
            node = src.args[0]
            continue
        if s.op == "getitem":
            idx = s.attrs["index"]
            if not isinstance(idx, int):
                return False
            chain.append(("drop0", None))
        elif s.op in ("permute", "transpose"):
            chain.append((s.op, s.attrs["dims"]))
        elif s.op not in ("identity", "cast"):
            return False
        node = src
    else:
        return False
    rank = len(shape_of(node) or ())
    for op, dims in reversed(chain):
        if op == "drop0":
            if axis == 0:
                return False
            axis, rank = axis - 1, rank - 1
        elif op == "permute":
            dims = [_norm_dim(d, rank) for d in dims]
            axis = dims.index(axis)
        elif op == "transpose":
            d0, d1 = (_norm_dim(d, rank) for d in dims)
            axis = d1 if axis == d0 else d0 if axis == d1 else axis
    return axis - rank


def match_sdpa(node: fx.Node) -> Site:
    def arg(i, name, default=None):
        return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)

    q, k, v = node.args[:3]
    mask = arg(3, "attn_mask")
    dropout_p = constant_value(arg(4, "dropout_p", 0.0))
    is_causal = arg(5, "is_causal", False)
    scale = arg(6, "scale", None)
    if dropout_p is None or not isinstance(is_causal, bool):
        raise _Reject("scaled_dot_product_attention with a non-constant dropout_p or is_causal")
    qs = shape_of(q)
    if scale is None:
        if qs is None or not isinstance(qs[-1], int):
            raise _Reject("query head dim unknown")
        scale = 1.0 / math.sqrt(qs[-1])
    else:
        scale = constant_value(scale)
        if scale is None:
            raise _Reject("scaled_dot_product_attention with a non-constant scale")
    _require_activations(q, k, v)
    site = Site(pattern="scaled_dot_product_attention", anchor=node, output=node, q=q, k=k, v=v,
                scale=scale, is_causal=is_causal, dropout_p=dropout_p, out_dtype=dtype_of(node))
    if mask is not None:
        if dtype_of(mask) == torch.bool:
            site.masks.append(("keep", mask, False, None))
        else:
            site.masks.append(("add", mask, 1.0, None))
    base_k, base_v = _repeat_kv_base(k, 4), _repeat_kv_base(v, 4)
    if base_k and base_v and base_k[1] == base_v[1]:
        site.k, site.v = base_k[0], base_v[0]
    ks = shape_of(site.k)
    if qs and ks and len(qs) == 4 and isinstance(qs[1], int) and isinstance(ks[1], int):
        site.gqa_groups = max(1, qs[1] // ks[1])
    site.head_axis = _layout_head_axis(q, site.k, site.v, qs)
    ks = shape_of(k)
    if qs is not None and ks is not None and len(qs) == len(ks):
        recognize_causal(site, (*qs[:-1], ks[-2]))
    return site


def match_mha(node: fx.Node) -> Site:
    names = ["query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight",
             "in_proj_bias", "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight",
             "out_proj_bias", "training", "key_padding_mask", "need_weights", "attn_mask",
             "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
             "static_k", "static_v", "average_attn_weights", "is_causal"]
    a = {"training": True}  # the one default the matcher reads (F.multi_head_attention_forward's)
    a.update(zip(names, node.args))
    a.update(node.kwargs)
    for unsupported in ("bias_k", "bias_v", "static_k", "static_v"):
        if a.get(unsupported) is not None:
            raise _Reject(f"nn.MultiheadAttention with {unsupported} is not supported")
    if a.get("add_zero_attn"):
        raise _Reject("nn.MultiheadAttention with add_zero_attn is not supported")
    # Attention weights are output [1]; if anything reads them, they escape the canonical op.
    out_node = None
    for u in node.users:
        s = spell(u)
        if s is None or s.op != "getitem" or s.attrs["index"] not in (0, 1):
            raise _Reject("the multi_head_attention_forward result is used as a whole")
        if s.attrs["index"] == 1 and len(u.users) > 0:
            raise _Reject("the attention weights of nn.MultiheadAttention are consumed "
                          "(need_weights=True and used)")
        if s.attrs["index"] == 0:
            out_node = u
    if out_node is None:
        raise _Reject("the attention output is unused")
    for k in ("embed_dim_to_check", "num_heads", "dropout_p", "training"):
        if isinstance(a.get(k), fx.Node):
            raise _Reject(f"nn.MultiheadAttention with a non-constant {k}")
    E, H = a["embed_dim_to_check"], a["num_heads"]
    site = Site(pattern="nn.MultiheadAttention", anchor=node, output=out_node,
                q=a["query"], k=a["key"], v=a["value"], scale=(E // H) ** -0.5,
                dropout_p=a["dropout_p"] if a["training"] else 0.0, out_dtype=dtype_of(out_node))
    if a.get("key_padding_mask") is not None:
        site.masks.append(("add", a["key_padding_mask"], 1.0, None))
    if a.get("attn_mask") is not None:
        site.masks.append(("add", a["attn_mask"], 1.0, None))
    site.mha_call = a
    site.causal_mask = observed_causal_mha(a)  # report only
    return site


def find_sites(gm: fx.GraphModule) -> tuple[list[Site], list[Rejection]]:
    """Every attention site in ``gm`` and every softmax-like node left alone, with the reason."""
    sites, rejected = [], []
    claimed = set()
    for node in list(gm.graph.nodes):
        s = spell(node)
        if s is None:
            continue
        try:
            if s.op == "softmax":
                site = match_softmax(node)
            elif s.op == "sdpa":
                site = match_sdpa(node)
            elif s.op == "mha":
                site = match_mha(node)
            elif s.op in ("fused_mha", "sdpa_flash_cpu"):
                raise _Reject(f"fused attention kernel `{node.target}` (PyTorch's inference fast "
                              "path) cannot be rewritten; run with torch.backends.mha."
                              "set_fastpath_enabled(False)")
            else:
                continue
        except _Reject as e:
            rejected.append(Rejection(node, str(e)))
            continue
        except Exception as e:  # a form the matcher did not foresee: leave it, never crash
            rejected.append(Rejection(node, f"not matched: the matcher met an unexpected form "
                                            f"({type(e).__name__}: {e})"))
            continue
        if site.output in claimed:
            rejected.append(Rejection(node, "overlaps another attention site"))
            continue
        claimed.add(site.output)
        sites.append(site)
    return sites, rejected
