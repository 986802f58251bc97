"""Lower layout-changing einsums next to a softmax into permute · matmul · permute.

Research and older HF code (XLNet, Funnel, Transformer-XL) write attention with einsums whose
operands or result are not in ``[batch…, rows, cols]`` order: ``"ibnd,jbnd->bnij"`` for the
scores, ``"bnij,jbnd->ibnd"`` for the values. The detector reads batched matmuls over the last
two axes (``normalize._spell_einsum``); any other single contraction is the same matmul between
permutes, which this pass spells out so that the detector sees it.

The rewrite is only made for einsums within a few ops of a softmax, and it is undone
(``restore``) for every einsum whose site was not converted, so a graph without a converted
site leaves the pipeline as it came in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from .normalize import _EINSUM_FNS, _spell_einsum, example, spell

_EQ = re.compile(r"^([a-zA-Z]+),([a-zA-Z]+)->([a-zA-Z]*)$")
_NEAR = 6  # ops between an einsum and its softmax (scale, mask, cast, dropout...)


@dataclass
class Lowered:
    equation: str
    operands: tuple
    created: list  # the nodes that replaced the einsum, in graph order; the last one is its result
    matmul: fx.Node


def contraction_orders(eq: str):
    """``(a_perm, b_perm, out_perm)`` that turn ``eq`` into ``permute · matmul · permute``, or
    None when ``eq`` is not one batched matrix product (one row label, one column label, one
    contracted label, batch labels in all three)."""
    m = _EQ.match(eq.replace(" ", ""))
    if not m:
        return None
    a, b, out = m.groups()
    if len(set(a)) != len(a) or len(set(b)) != len(b) or len(set(out)) != len(out):
        return None
    if not set(out) <= set(a) | set(b):
        return None
    batch = [c for c in out if c in a and c in b]
    rows = [c for c in a if c in out and c not in b]
    cols = [c for c in b if c in out and c not in a]
    red = [c for c in a if c in b and c not in out]
    if len(rows) != 1 or len(cols) != 1 or len(red) != 1:
        return None
    if len(a) != len(batch) + 2 or len(b) != len(batch) + 2:
        return None  # a label summed out of one operand alone
    (i,), (j,), (r,) = rows, cols, red
    mm = batch + [i, j]
    return ([a.index(c) for c in batch + [i, r]], [b.index(c) for c in batch + [r, j]],
            [mm.index(c) for c in out])


def _operands(node: fx.Node):
    ops = node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = tuple(ops[0])
    return ops


def _near_softmax(node: fx.Node, forward: bool) -> bool:
    frontier, seen = [node], {node}
    for _ in range(_NEAR):
        nxt = []
        for n in frontier:
            for m in (n.users if forward else [a for a in n.all_input_nodes]):
                if m in seen:
                    continue
                seen.add(m)
                s = spell(m)
                if s is not None and s.op == "softmax":
                    return True
                nxt.append(m)
        frontier = nxt
    return False


def lower_einsums(gm: fx.GraphModule) -> list[Lowered]:
    done = []
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_function" or node.target not in _EINSUM_FNS:
            continue
        eq, ops = node.args[0], _operands(node)
        if not isinstance(eq, str) or len(ops) != 2 or _spell_einsum(node) is not None:
            continue
        orders = contraction_orders(eq)
        if orders is None or not (_near_softmax(node, True) or _near_softmax(node, False)):
            continue
        pa, pb, po = orders
        created: list[fx.Node] = []
        with g.inserting_before(node):
            a = _permute(g, ops[0], pa, created)
            b = _permute(g, ops[1], pb, created)
            mm = g.call_function(torch.matmul, (a, b))
            mm.meta.update({k: v for k, v in node.meta.items() if k not in ("val", "example_value")})
            _example(mm, torch.matmul, a, b)
            created.append(mm)
            out = _permute(g, mm, po, created)
        node.replace_all_uses_with(out)
        g.erase_node(node)
        done.append(Lowered(eq, tuple(ops), created, mm))
    if done:
        gm.recompile()
    return done


def _permute(g: fx.Graph, x, order, created):
    if list(order) == list(range(len(order))):
        return x
    n = g.call_method("permute", (x, *order))
    _example(n, lambda t: t.permute(*order), x)
    created.append(n)
    return n


def _example(node: fx.Node, fn, *inputs) -> None:
    """Record the fake tensor ``node`` produces, as dynamo does, so that later passes read its
    shape; computed in the inputs' own fake mode."""
    vals = [example(i) for i in inputs]
    if any(not isinstance(v, torch.Tensor) for v in vals):
        return
    mode = next((getattr(v, "fake_mode", None) for v in vals if getattr(v, "fake_mode", None)), None)
    if mode is None:
        return
    with mode:
        node.meta["example_value"] = fn(*vals)


def restore(gm: fx.GraphModule, lowered: list[Lowered]) -> None:
    """Put the einsum back wherever its matmul survived (its site was not converted)."""
    changed = False
    for low in lowered:
        live = set(gm.graph.nodes)
        if not all(n in live for n in low.created):
            continue  # the site consumed it
        result = low.created[-1]
        with gm.graph.inserting_before(result):
            ein = gm.graph.call_function(torch.einsum, (low.equation, *low.operands))
        ein.meta.update(result.meta)
        result.replace_all_uses_with(ein)
        for n in reversed(low.created):
            if not n.users:
                gm.graph.erase_node(n)
        changed = True
    if changed:
        gm.recompile()
