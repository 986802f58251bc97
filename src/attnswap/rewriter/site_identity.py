"""A site's identity: region path + its ordinal in that region's code (design §1.3).

The ordinal is keyed by the site's *code key*: the chain of ``(file, line)`` frames of its anchor
node (the softmax, SDPA or MHA call), counted from the region's own forward inwards. Dynamo
records that chain in ``node.meta["stack_trace"]``; it is the same for every instance of the
region's class, for every recompile, and after a graph break elsewhere, so a site keeps its
ordinal whatever frame dynamo happened to compile. Frames inside attnswap itself (the region
trampoline) are not part of the key; file names are reduced to their base name so that a key
survives a move of the installed packages.
"""

from __future__ import annotations

import os
import re

import torch.fx as fx

_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')
_OWN = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def frames(stack_trace: str | None) -> tuple:
    if not stack_trace:
        return ()
    out = []
    for path, line, _fn in _FRAME.findall(stack_trace):
        if os.path.abspath(path).startswith(_OWN + os.sep):
            continue
        out.append(f"{os.path.basename(path)}:{line}")
    return tuple(out)


def code_key(node: fx.Node | None, stack_trace: str | None = None) -> str:
    """The code key of an anchor node (or of a stack trace string)."""
    if stack_trace is None and node is not None:
        stack_trace = node.meta.get("stack_trace")
    f = frames(stack_trace)
    if f:
        return "|".join(f)
    return f"node:{node.name}" if node is not None else "node:?"


def unique_keys(keys: list[str]) -> list[str]:
    """A site reached twice through the same frames (a helper called in a loop) gets ``#n``."""
    seen: dict[str, int] = {}
    out = []
    for k in keys:
        n = seen.get(k, 0)
        seen[k] = n + 1
        out.append(k if n == 0 else f"{k}#{n}")
    return out


def key_matches_suffix(region_key: str, longer_key: str) -> bool:
    """True when ``region_key`` (frames from the region's forward inwards) is the tail of
    ``longer_key`` (frames from some outer forward, e.g. a whole-model ``torch.export``)."""
    a, b = region_key.split("#")[0].split("|"), longer_key.split("#")[0].split("|")
    return len(a) <= len(b) and b[len(b) - len(a):] == a


def identity(path: str, ordinal: int) -> str:
    return f"{path or '<root>'}[{ordinal}]"
