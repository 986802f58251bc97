"""PyTorch's fused inference fast path for ``nn.MultiheadAttention`` / ``TransformerEncoderLayer``
computes attention inside one fused kernel, never calling the module whose code holds the site: a
converted model must always take the decomposed path.

``DisableFastpath`` is installed as a forward pre-hook and an ``always_call`` forward hook on the
root of a converted model that has such modules, so the switch covers exactly the model's calls
(and is picklable, unlike a closure).
"""

from __future__ import annotations

import contextlib
import threading

import torch

_state = threading.local()


@contextlib.contextmanager
def no_mha_fastpath():
    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(prev)


class DisableFastpath:
    """``pre`` hook: switch the fast path off; ``post`` hook: put it back (nesting-safe)."""

    def __init__(self, enter: bool):
        self.enter = enter

    def __call__(self, module, *rest):
        saved = getattr(_state, "saved", None)
        if saved is None:
            saved = _state.saved = []
        if self.enter:
            saved.append(torch.backends.mha.get_fastpath_enabled())
            torch.backends.mha.set_fastpath_enabled(False)
        elif saved:
            torch.backends.mha.set_fastpath_enabled(saved.pop())
        return None
