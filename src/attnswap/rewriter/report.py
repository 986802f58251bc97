"""ConversionReport: what a conversion found, rewrote and left alone, and why."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..passes.canonicalize import SiteRecord, SkipRecord


def _fmt_shape(s):
    return "×".join(str(x) for x in s) if s else "?"


@dataclass
class ConversionReport:
    attention: str = "softmax"
    model: str = ""
    sites: list[SiteRecord] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)
    graphs: int = 0  # graphs the backend rewrote (compiles and recompiles)

    def add_graph(self, records, skipped) -> None:
        self.graphs += 1
        seen = {r.key() for r in self.sites}
        for r in records:
            if r.key() not in seen:
                self.sites.append(r)
                seen.add(r.key())
        seen_s = {(s.location, s.reason) for s in self.skipped}
        for s in skipped:
            if (s.location, s.reason) not in seen_s:
                self.skipped.append(s)
                seen_s.add((s.location, s.reason))

    @property
    def owners(self) -> list[str]:
        return sorted({r.owner for r in self.sites})

    def __len__(self) -> int:
        return len(self.sites)

    def to_dict(self) -> dict:
        def site(r: SiteRecord):
            d = dataclasses.asdict(dataclasses.replace(r, node=None))
            d.pop("node")
            return d

        return {
            "attention": self.attention,
            "model": self.model,
            "graphs": self.graphs,
            "sites": [site(r) for r in self.sites],
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
        }

    def rows(self):
        for r in self.sites:
            yield [r.owner or "<root>", r.pattern, _fmt_shape(r.q_shape), _fmt_shape(r.k_shape),
                   f"{r.scale:.4g}", r.mask, "yes" if r.causal else "no", str(r.gqa_groups),
                   r.kind]

    def table(self):
        """A rich Table (falls back to plain text in ``__str__`` without rich)."""
        from rich.table import Table

        t = Table(title=f"attnswap: {len(self.sites)} site(s) → {self.attention} in {self.model}")
        for col in ("module", "pattern", "q", "k", "scale", "mask", "causal", "gqa", "kind"):
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
        lines = [f"attnswap: {len(self.sites)} attention site(s) → {self.attention} "
                 f"in {self.model} ({self.graphs} graph(s))"]
        hdr = ["module", "pattern", "q", "k", "scale", "mask", "causal", "gqa", "kind"]
        rows = [hdr] + list(self.rows())
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(hdr))]
        for r in rows:
            lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
        if self.skipped:
            lines.append(f"left alone ({len(self.skipped)}):")
            for s in self.skipped:
                lines.append(f"  {s.location or '<root>'} [{s.op}]: {s.reason}")
        return "\n".join(lines)
