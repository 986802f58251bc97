"""Discovery: which modules to compile as regions.

One eager call of the model, with a ``TorchFunctionMode`` that notes every softmax, SDPA and
``F.multi_head_attention_forward`` call and the stack of modules it ran in. The innermost module
of each call is a *candidate* region; the compile of that region then tells whether it holds the
whole site (``Conversion`` climbs to the parent when the scores come from outside it, as with
Swin's ``nn.Softmax`` child). The call runs the original code (``force_eager``: another
conversion's regions, or a user's own ``torch.compile``, do not hide a softmax), with PyTorch's
fused MHA fast path off, and the model's state is restored by the caller.

This costs one eager forward, independent of how many layers share a class — unlike capturing the
whole model, whose dynamo trace grows with depth.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..runtime.fastpath import no_mha_fastpath
from ..runtime.region import RegionForward, probing

_WATCHED = {
    F.softmax: "softmax", torch.softmax: "softmax", torch.Tensor.softmax: "softmax",
    torch.special.softmax: "softmax", torch._softmax: "softmax",
    F.scaled_dot_product_attention: "sdpa",
    F.multi_head_attention_forward: "mha",
    torch._native_multi_head_attention: "fused_mha",
}


# Code that calls aten directly (``torch.ops.aten._safe_softmax``, as Inductor's own patterns
# do) is seen at the dispatcher: the same ops, below the Python API.
_ATEN = {"_softmax": "softmax", "_safe_softmax": "softmax", "softmax": "softmax",
         "scaled_dot_product_attention": "sdpa", "_scaled_dot_product_flash_attention_for_cpu": "sdpa",
         "_scaled_dot_product_attention_math": "sdpa"}


@dataclass
class Hit:
    op: str
    path: str  # innermost module of the root's tree the call ran in ("" = the root's own code)
    inside_region: bool  # ran inside a region another conversion owns


@dataclass
class Discovery:
    hits: list[Hit] = field(default_factory=list)
    callers: dict = field(default_factory=dict)  # module path -> path of the module that called it

    def caller(self, path: str) -> str:
        """The module whose code called ``path`` (containers such as ModuleList never run)."""
        if path in self.callers:
            return self.callers[path]
        return path.rsplit(".", 1)[0] if "." in path else ""

    def candidates(self) -> list[str]:
        """Innermost module paths, outermost-wins when one candidate holds another."""
        paths = []
        for h in self.hits:
            if not h.inside_region and h.path not in paths:
                paths.append(h.path)
        return [p for p in paths if not any(_is_ancestor(o, p) for o in paths if o != p)]


def _is_ancestor(a: str, b: str) -> bool:
    return a == "" and b != "" or b.startswith(a + ".")


class _Watch(TorchFunctionMode):
    def __init__(self, disc: Discovery, stack: list, paths: dict):
        super().__init__()
        self.disc, self.stack, self.paths = disc, stack, paths
        self.depth = 0  # inside a watched Python-level call: its aten ops are the same hit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        op = _WATCHED.get(func)
        if op is None:
            return func(*args, **(kwargs or {}))
        self.note(op)
        self.depth += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.depth -= 1

    def note(self, op: str) -> None:
        inside = any(isinstance(m.__dict__.get("forward"), RegionForward) for m in self.stack)
        chain = [self.paths[id(m)] for m in self.stack if id(m) in self.paths]
        path = chain[-1] if chain else ""
        for outer, inner in zip(chain, chain[1:]):
            if inner != outer:
                self.disc.callers.setdefault(inner, outer)
        self.disc.hits.append(Hit(op, path, inside))


class _WatchAten(TorchDispatchMode):
    def __init__(self, watch: _Watch):
        super().__init__()
        self.watch = watch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = _ATEN.get(func.overloadpacket.__name__)
        if op is not None and self.watch.depth == 0:
            self.watch.note(op)
        return func(*args, **(kwargs or {}))


def discover(model: torch.nn.Module, args: tuple, kwargs: dict) -> Discovery:
    disc = Discovery()
    stack: list = []
    paths = {id(m): name for name, m in model.named_modules()}

    def push(module, _args):
        stack.append(module)

    def pop(module, _args, _out):
        if stack and stack[-1] is module:
            stack.pop()

    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    pre = register_module_forward_pre_hook(push)
    post = register_module_forward_hook(pop, always_call=True)
    try:
        with contextlib.ExitStack() as es:
            es.enter_context(probing())
            es.enter_context(no_mha_fastpath())
            es.enter_context(torch.compiler.set_stance("force_eager"))
            watch = es.enter_context(_Watch(disc, stack, paths))
            es.enter_context(_WatchAten(watch))
            model(*args, **kwargs)
    finally:
        pre.remove()
        post.remove()
    return disc
