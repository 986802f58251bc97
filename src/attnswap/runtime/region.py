"""What runs when a converted region is called: its compiled forward, inside a per-call record.

A *region* is the smallest module that holds a whole attention site (design §1.3). Its
``forward`` (an instance attribute) becomes a :class:`RegionForward`: a picklable callable that
runs the region's class-shared compiled code (repeated layers of one class compile once) inside a
:class:`RegionCall`. The compiled graphs write into that record which of the region's sites ran
as ``attnswap::attention``; when the call returns, every site the region is known to hold and that
did not run as our op is reported to the conversion (a warning per site and reason, or an error
under ``strict=True``). The record lives in a ``contextvars.ContextVar``, so two threads, or a
converted model nested in another, never see each other's records.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch

_current: contextvars.ContextVar["RegionCall | None"] = contextvars.ContextVar(
    "attnswap_region_call", default=None)


@dataclass
class RegionCall:
    """One call of one region: which module, for which conversion, and which sites ran."""

    module: torch.nn.Module
    conversion: object
    path: str
    ran: set = field(default_factory=set)


_probing: contextvars.ContextVar[bool] = contextvars.ContextVar("attnswap_probing", default=False)


@contextlib.contextmanager
def probing():
    """Discovery (of any conversion) is running: regions run their original code, unaccounted."""
    token = _probing.set(True)
    try:
        yield
    finally:
        _probing.reset(token)


def current_call() -> RegionCall | None:
    return _current.get()


def mark_ran(ordinals) -> None:
    call = _current.get()
    if call is not None:
        call.ran.update(ordinals)


def site_extras(site: tuple) -> torch.nn.Module:
    """The SAS / QK-norm module of ``site = (owner path inside the region, ordinal)`` in the
    region being called (``<owner>.attnswap.<ordinal>``)."""
    call = _current.get()
    if call is None:
        raise RuntimeError(
            "attnswap: a converted attention site with learned parameters ran outside its "
            "region's call; call the converted model (or the region module) itself")
    owner_rel, ordinal = site
    owner = call.module.get_submodule(owner_rel) if owner_rel else call.module
    extras = owner._modules.get("attnswap")
    if extras is None or str(ordinal) not in extras._modules:
        where = ".".join(p for p in (call.path, owner_rel) if p) or "<root>"
        raise RuntimeError(
            f"attnswap: {where} has no parameters for its site {ordinal}; SAS / QK-norm "
            "parameters are created by attnswap.convert() only")
    return extras._modules[str(ordinal)]


def run_site_extras(site_id: tuple, *args, **kwargs):
    """Graph node of a site with learned parameters: the region's own module for that site."""
    return site_extras(site_id)(*args, **kwargs)


class RegionForward:
    """A region module's ``forward`` after conversion (an instance attribute, so the class, its
    other instances and ``state_dict`` keys stay as they were)."""

    def __init__(self, module: torch.nn.Module, conversion, path: str, previous=None):
        self.module = module
        self.conversion = conversion
        self.path = path
        self.previous = previous  # an instance-level forward that was there before, if any

    def original(self):
        """The forward the region had before conversion (bound)."""
        if self.previous is not None:
            return self.previous
        return type(self.module).forward.__get__(self.module)

    def __call__(self, *args, **kwargs):
        conv = self.conversion
        if _probing.get():  # discovery (of this or an outer conversion) runs the original code
            return self.original()(*args, **kwargs)
        call = RegionCall(self.module, conv, self.path)
        token = _current.set(call)
        try:
            out = conv.run_region(self, args, kwargs)
        finally:
            _current.reset(token)
        conv.account(self, call)
        return out

    # Another compile (an outer conversion's region, or the user's torch.compile of the whole
    # converted model) must not trace into a region: it would re-detect the region's original
    # softmax and rewrite it to *its* kind. The region call is a graph break there, and runs
    # this conversion's own compiled code.
    __call__ = torch._dynamo.disable(__call__)

    # The signature users and libraries inspect is the original one.
    @property
    def __signature__(self):
        import inspect

        return inspect.signature(self.original())

    @property
    def __wrapped__(self):
        return self.original()

    def __repr__(self) -> str:
        return f"<attnswap region forward of {type(self.module).__name__} at {self.path or '<root>'}>"
