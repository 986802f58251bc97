"""The one pass pipeline, named, used by every capture front end (the regional backend, the
whole-graph ``backend="attnswap"`` entry point and the ONNX export).

    lower einsums → normalize (read-only spellings) → detect → canonicalize → [assign identities]
    → retarget → restore the einsums no site took

``assign`` runs between canonicalize and retarget because a site's learned parameters are keyed
by its identity. Every site that retargeting has to keep as softmax comes back as a
:class:`SkipRecord` with its reason, whatever the front end: nothing is dropped on the way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from .canonicalize import SiteRecord, SkipRecord, canonicalize
from .einsum_lowering import lower_einsums, restore
from .retarget import ExtrasFor, RetargetSpec, retarget

PASSES = ("lower_einsums", "normalize", "detect", "canonicalize", "assign", "retarget", "restore")


@dataclass
class PipelineResult:
    sites: list[SiteRecord] = field(default_factory=list)  # every rewritten site (its .kind says what it became)
    skipped: list[SkipRecord] = field(default_factory=list)  # left alone, each with a reason
    kept_softmax: list[SiteRecord] = field(default_factory=list)  # found, but had to stay softmax


def run_pipeline(
    gm: fx.GraphModule,
    spec: RetargetSpec,
    *,
    root: torch.nn.Module | None = None,
    accept: Callable[[SiteRecord], str | None] | None = None,
    assign: Callable[[list[SiteRecord], list[SkipRecord]], None] | None = None,
    extras_for: ExtrasFor | None = None,
) -> PipelineResult:
    """Rewrite ``gm`` in place. ``accept`` may veto a site (include/exclude); ``assign`` gives
    sites and skips their identities; ``extras_for`` provides SAS / QK-norm modules."""
    lowered = lower_einsums(gm)
    records, skipped = canonicalize(gm, root, accept=accept)
    if assign is not None:
        assign(records, skipped)
    result = PipelineResult(skipped=list(skipped))
    for rec, why in retarget(gm, records, spec, extras_for):
        rec.kind = "softmax"
        result.kept_softmax.append(rec)
        result.skipped.append(SkipRecord(rec.region or rec.owner, rec.owner_type, "attention",
                                         f"kept as softmax: {why}", node=rec.anchor))
    result.sites = records  # kept ones included: they run the op, as kind "softmax"
    restore(gm, lowered)
    return result
