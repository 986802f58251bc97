"""A model's mutable state around conversion: ``convert()`` runs the model (discovery and the
first compile), and that must leave the user's model bitwise as it was — buffers such as
BatchNorm's running statistics, every module's train/eval flag, parameters and their ``.grad``
(parameters are never written by a forward) — on success and on failure, ``inplace`` or not."""

from __future__ import annotations

import torch


class StateSnapshot:
    def __init__(self, model: torch.nn.Module):
        self.flags = [(m, m.training) for m in model.modules()]
        self.buffers = []
        for m in model.modules():
            for name, b in m._buffers.items():
                self.buffers.append((m, name, b, None if b is None else b.detach().clone(),
                                     _version(b)))
        self.params = []
        for m in model.modules():
            for name, p in m._parameters.items():
                if p is not None:
                    # Parameters are not copied: a forward does not write them, and a copy
                    # would double the memory of a large model.
                    self.params.append((m, name, p, p.grad))

    @torch.no_grad()
    def restore(self) -> None:
        for m, flag in self.flags:
            m.training = flag
        for m, name, obj, saved, version in self.buffers:
            if m._buffers.get(name) is not obj:
                m._buffers[name] = obj
            # Only a buffer the calls wrote is copied back: a copy bumps the version counter,
            # and autograd graphs the model cached during those calls (timm LeViT keeps its
            # gathered attention biases in eval mode) would refuse to backward through an
            # index buffer that merely looks modified.
            if obj is not None and saved is not None and (version is None or _version(obj) != version):
                obj.copy_(saved)
        for m, name, p, grad in self.params:
            if m._parameters.get(name) is not p:
                m._parameters[name] = p
            p.grad = grad


def _version(t):
    """The version counter, or None for tensors without one (inference tensors)."""
    if t is None:
        return None
    try:
        return t._version
    except RuntimeError:
        return None
