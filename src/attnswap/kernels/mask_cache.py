"""Values computed from a mask tensor (its tile classes), remembered per mask *object*.

HF models pass one mask object to every layer, and the backward gets the forward's, so a
classification computed once serves the whole forward and backward. A weak reference proves the
object is the same one (an id alone could be reused by a new tensor), and an in-place change
bumps the tensor's ``_version``, which invalidates the entry. Inference tensors have no version
counter to prove them unchanged: they are computed afresh every call. A write the version
counter does not see (through ``mask.data``, or through a numpy / DLPack alias of its memory)
leaves the entry stale: change a mask with an in-place tensor op, or pass a new mask.
"""

from __future__ import annotations

import weakref
from typing import Callable, Hashable

import torch


class MaskObjectCache:
    def __init__(self, size: int = 8):
        self.size = size
        self._entries: dict = {}

    def get(self, mask: torch.Tensor, key: Hashable, compute: Callable[[], object]):
        if mask.is_inference():
            return compute()
        ent = self._entries.get(id(mask))
        if ent is None or ent[0]() is not mask or ent[1] != mask._version:
            while len(self._entries) >= self.size:
                self._entries.pop(next(iter(self._entries)))
            ent = (weakref.ref(mask), mask._version, {})
            self._entries[id(mask)] = ent
        if key not in ent[2]:
            ent[2][key] = compute()
        return ent[2][key]


__all__ = ["MaskObjectCache"]
