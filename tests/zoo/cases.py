"""The model zoo: small, seeded, randomly initialised models whose attention is written the way
real code writes it (and negatives whose softmax must be left alone).

Every case is a :class:`ZooCase`. ``ZOO`` maps case names to cases; the names are
``"<source>:<model>-<variant>"`` with source one of ``hf``, ``timm``, ``torch``, ``hand``, ``neg``.

Contract of a case:

* ``build()`` returns a fresh model: fp32, ``eval()``, weights drawn from a fixed seed (the global
  RNG is left untouched). Nothing is ever downloaded.
* ``inputs(batch=2, seq=None, seed=0)`` returns ``(args, kwargs)`` for ``model(*args, **kwargs)``.
  Encoders get a padded batch (odd rows end with zeros in ``attention_mask``); causal LMs take
  ``seq`` so they can be run at two lengths; vision models ignore ``seq``.
* ``count_attention(model)`` counts the attention sites *from the model itself* (modules of the
  model's attention class, or the ``ATTENTION_SITES`` class attribute of hand-written blocks).
* ``output_of(output)`` picks the tensor to compare between an original and a converted model.
* ``positive=False`` cases must be left alone (0 sites); ``skip_reason`` says why.

Import the zoo as ``from zoo import ZOO`` (``tests/`` is on ``sys.path`` under pytest, since it
has a ``conftest.py`` and no ``__init__.py``) or as ``tests.zoo`` from the repository root; the
package only uses relative imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from attnswap.models import output_tensor

__all__ = [
    "ZooCase", "ZOO", "positives", "negatives", "by_tag", "default_output_of",
    "count_modules", "count_sites_attr", "seeded", "padded_mask", "token_ids",
]


# --------------------------------------------------------------------------------------------
# helpers shared by the source modules
# --------------------------------------------------------------------------------------------

# The tensor to compare: the package's own rule (a tensor; a HF output's ``logits`` or
# ``last_hidden_state``; else the first tensor of a tuple/list/dict, depth first).
default_output_of = output_tensor


def count_modules(model: nn.Module, classes: type | tuple[type, ...]) -> int:
    """Number of submodules (including ``model``) that are instances of ``classes``."""
    return sum(isinstance(m, classes) for m in model.modules())


def count_sites_attr(model: nn.Module) -> int:
    """Sum of the ``ATTENTION_SITES`` class attribute over all submodules (hand-written blocks)."""
    return sum(int(getattr(type(m), "ATTENTION_SITES", 0)) for m in model.modules())


def seeded(fn: Callable[[], nn.Module], seed: int = 0) -> Callable[[], nn.Module]:
    """Wrap a constructor: build under ``torch.manual_seed(seed)`` without touching the caller's
    RNG state; return the model in fp32 and eval mode."""

    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = fn()
        return model.float().eval()

    build.__name__ = getattr(fn, "__name__", "build")
    return build


def generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def token_ids(batch: int, seq: int, vocab: int, seed: int, low: int = 1) -> torch.Tensor:
    """Random token ids in ``[low, vocab)`` (0 is kept free as a pad id)."""
    return torch.randint(low, vocab, (batch, seq), generator=generator(seed))


def padded_mask(batch: int, seq: int, dtype=torch.long) -> torch.Tensor:
    """``[batch, seq]`` 1/0 mask; odd rows are right-padded by ``max(1, seq // 3)`` positions, so
    any batch of 2 or more has padded and unpadded rows."""
    mask = torch.ones(batch, seq, dtype=dtype)
    pad = max(1, seq // 3)
    for row in range(1, batch, 2):
        mask[row, seq - pad:] = 0
    return mask


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator(seed))


# --------------------------------------------------------------------------------------------
# the case type and the registry
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ZooCase:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[..., tuple[tuple, dict]]
    count_attention: Callable[[nn.Module], int]
    positive: bool = True
    tags: frozenset[str] = frozenset()
    output_of: Callable[[Any], torch.Tensor] = default_output_of
    # For negatives (and positives with a known caveat): why the pass must leave it alone.
    skip_reason: str = ""
    # Free-form note for readers of test output (e.g. which code path the model takes).
    note: str = field(default="", compare=False)

    def __post_init__(self):
        if not self.positive and not self.skip_reason:
            raise ValueError(f"negative case {self.name} needs a skip_reason")
        object.__setattr__(self, "tags", frozenset(self.tags))

    def __repr__(self) -> str:  # short, for pytest ids and reports
        return f"ZooCase({self.name!r})"


ZOO: dict[str, ZooCase] = {}


def _register(cases: Iterable[ZooCase]) -> None:
    for case in cases:
        if case.name in ZOO:
            raise ValueError(f"duplicate zoo case {case.name}")
        ZOO[case.name] = case


def positives() -> list[ZooCase]:
    return [c for c in ZOO.values() if c.positive]


def negatives() -> list[ZooCase]:
    return [c for c in ZOO.values() if not c.positive]


def by_tag(tag: str) -> list[ZooCase]:
    return [c for c in ZOO.values() if tag in c.tags]


# Populate. The source modules import the helpers above from this (partly initialised) module,
# which is why this comes last. Sources whose library is missing are skipped silently.
def _populate() -> None:
    import importlib
    import importlib.util

    for mod_name, required in (
        ("hf", "transformers"),
        ("timm_models", "timm"),
        ("torch_models", "torchvision"),
        ("handwritten", None),
        ("negatives", None),
    ):
        if required is not None and importlib.util.find_spec(required) is None:
            continue
        mod = importlib.import_module(f"{__package__}.{mod_name}")
        _register(mod.cases())


_populate()
