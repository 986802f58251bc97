"""ConversionReport: what a conversion found, rewrote and left alone, and why.

Columns of the sites table (``str(report)``, ``report.table()``):

* ``scale``: the site's float scale; ``·t`` after it (``0.125·t``) when a tensor factor was
  folded into q or k as well (a 0-d tensor scale, a buffer, a learned per-head temperature,
  cosine attention's logit scale): the scores are ``scale · t · QKᵀ``. ``to_dict()``:
  ``scale_folded``.
* ``mask``: the masks the site keeps (``none``, ``bool``, ``float``, ``bool+float``).
* ``causal``:

  - ``yes``: the op is called with ``is_causal=True`` (SDPA's flag, or causal structure built
    from constants in the graph and recognized at compile time); kernels skip the hidden
    blocks statically. ``to_dict()``: ``causal``.
  - ``mask``: the site keeps its mask tensor (built outside the compiled region, e.g. HF's mask
    builders under ``convert()``), and the mask it received in the call that compiled it
    (``convert()``'s example call) hid every key after its query -- a causal mask, possibly
    with left or right padding on top. An observation for the report, not a promise: the
    kernels are not told ``is_causal`` from it (another call may pass another mask); the CPU
    kernel skips the hidden tiles of whatever mask it receives. ``to_dict()``: ``causal_mask``.
  - ``no``: neither (bidirectional attention, a mask that lets some query see a later key, or a
    mask attnswap could not observe).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..passes.canonicalize import SiteRecord, SkipRecord
from .site_identity import identity


def _fmt_shape(s):
    return "×".join(str(x) for x in s) if s else "?"


def _fmt_scale(r: SiteRecord) -> str:
    return f"{r.scale:.4g}·t" if getattr(r, "scale_folded", False) else f"{r.scale:.4g}"


def _fmt_causal(r: SiteRecord) -> str:
    if r.causal:
        return "yes"
    return "mask" if getattr(r, "causal_mask", False) else "no"


@dataclass
class ConversionReport:
    attention: str = "softmax"
    model: str = ""
    sites: list[SiteRecord] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)
    graphs: int = 0  # graphs the backend rewrote (compiles and recompiles)
    regions: list[str] = field(default_factory=list)  # module paths compiled on their own

    def add_graph(self, records, skipped) -> None:
        self.graphs += 1
        for r in records:
            self.add_site(r)
        for s in skipped:
            self.add_skip(s)

    def add_site(self, rec: SiteRecord) -> bool:
        """Add one site (once per identity); the report keeps no graph nodes."""
        if any(r.key() == rec.key() for r in self.sites):
            return False
        self.sites.append(rec.detached())
        return True

    def add_skip(self, skip: SkipRecord) -> bool:
        if any((s.location, s.reason) == (skip.location, skip.reason) for s in self.skipped):
            return False
        self.skipped.append(skip.detached())
        return True

    def site(self, owner: str, ordinal: int = 0) -> SiteRecord | None:
        """The site whose identity is ``owner[ordinal]``."""
        return next((r for r in self.sites if r.owner == owner and r.ordinal == ordinal), None)

    @property
    def identities(self) -> list[str]:
        """``owner[ordinal]`` of every site, in the order they were found."""
        return [identity(r.owner, r.ordinal) for r in self.sites]

    @property
    def owners(self) -> list[str]:
        return sorted({r.owner for r in self.sites})

    def __len__(self) -> int:
        return len(self.sites)

    def to_dict(self) -> dict:
        def site(r: SiteRecord):
            d = dataclasses.asdict(r.detached())
            d.pop("node")
            d.pop("anchor")
            d["identity"] = identity(r.owner, r.ordinal)
            return d

        def skip(s: SkipRecord):
            d = dataclasses.asdict(s.detached())
            d.pop("node")
            return d

        return {
            "attention": self.attention,
            "model": self.model,
            "graphs": self.graphs,
            "sites": [site(r) for r in self.sites],
            "skipped": [skip(s) for s in self.skipped],
        }

    def rows(self):
        for r in self.sites:
            yield [identity(r.owner, r.ordinal), r.pattern, _fmt_shape(r.q_shape), _fmt_shape(r.k_shape),
                   _fmt_scale(r), r.mask, _fmt_causal(r), str(r.gqa_groups), r.kind]

    def table(self):
        """A rich Table (falls back to plain text in ``__str__`` without rich)."""
        from rich.table import Table

        t = Table(title=f"attnswap: {len(self.sites)} site(s) → {self.attention} in {self.model}")
        for col in ("site", "pattern", "q", "k", "scale", "mask", "causal", "gqa", "kind"):
            t.add_column(col)
        for row in self.rows():
            t.add_row(*row)
        return t

    def skipped_table(self):
        from rich.table import Table

        t = Table(title=f"left alone: {len(self.skipped)}")
        for col in ("location", "op", "reason"):
            t.add_column(col)
        for s in self.skipped:
            t.add_row(s.location or "<root>", s.op, s.reason)
        return t

    def __str__(self) -> str:
        where = f", {len(self.regions)} region(s)" if self.regions else ""
        lines = [f"attnswap: {len(self.sites)} attention site(s) → {self.attention} "
                 f"in {self.model} ({self.graphs} graph(s){where})"]
        hdr = ["site", "pattern", "q", "k", "scale", "mask", "causal", "gqa", "kind"]
        rows = [hdr] + list(self.rows())
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(hdr))]
        for r in rows:
            lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
        if self.skipped:
            lines.append(f"left alone ({len(self.skipped)}):")
            for s in self.skipped:
                lines.append(f"  {s.location or '<root>'} [{s.op}]: {s.reason}")
        return "\n".join(lines)
