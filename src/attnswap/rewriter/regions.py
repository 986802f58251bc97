"""Regional conversion: compile where the attention is, and nowhere else (design §1.3–1.7).

A :class:`Conversion` belongs to one converted model (``model._attnswap``). It

* installs a :class:`~attnswap.runtime.region.RegionForward` on each region module (the smallest
  module that holds a whole site); the root's forward runs as the user wrote it, so its kwargs,
  Python control flow and graph breaks cost nothing and break nothing;
* compiles each region *class* once (a private trampoline code object per conversion and class,
  so repeated layers share compiled code and two conversions never share a dynamo cache);
* gives every site an identity — region path + ordinal keyed by the site's code key — and keys
  the report, include/exclude, SAS / QK-norm parameters and accounting by it;
* creates learned parameters only while ``convert()`` runs; a later recompile looks them up;
* accounts for every region call: a site that ran as the original softmax is told, per site and
  reason, and ``strict=True`` raises;
* pickles and deep-copies as data (the compiled functions are rebuilt on the next call).
"""

from __future__ import annotations

import operator
import types
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..config import dynamo_disabled_by_env
from ..passes.pipeline import run_pipeline
from ..passes.retarget import RetargetSpec, head_geometry, make_extras
from ..runtime.fastpath import DisableFastpath
from ..runtime.mha_masks import consistent_mha_masks
from ..runtime.region import RegionForward, current_call
from .backend import AttentionSwapWarning, AttnswapCompiler, AttnswapError, is_loud
from .report import ConversionReport
from .site_identity import code_key, identity, unique_keys

# Recompiles one region class may need: train/eval, grad modes, mask / no mask, the switch to
# dynamic shapes — and, for layers that index a per-layer cache with their layer index (HF's KV
# caches), one entry per layer. Past it, dynamo raises rather than running the original code.
BASE_RECOMPILE_LIMIT = 32
PER_INSTANCE_RECOMPILES = 4
MAX_DISCOVERY_ROUNDS = 8

_BOUNDARY = ("come from outside this graph",)


def _cls_key(module) -> str:
    t = type(module)
    return f"{t.__module__}.{t.__qualname__}"


def _trampoline(forward, name: str):
    """A function with a code object of its own that calls ``forward(self, ...)``.

    Dynamo caches and counts recompiles per code object: one trampoline per (conversion, region
    class) gives every conversion its own cache, while the instances of a class share it."""

    def region_forward(self, *args, **kwargs):
        return forward(self, *args, **kwargs)

    code = region_forward.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, region_forward.__globals__, name, None,
                              region_forward.__closure__)


_MATMULS = ("matmul", "bmm", "baddbmm", "einsum", "linear", "scaled_dot_product")


def _escapes(node: fx.Node | None) -> bool:
    """The attention probabilities (or MHA's weights) reach the graph's output without a value
    matmul: the compiled module hands them to its caller, which may well drop them (HF attention
    modules return ``(out, weights)``; the decoder layer keeps ``out``). Only a larger region can
    tell, so discovery moves to the parent module."""
    if node is None:
        return False
    if "multi_head_attention_forward" in str(node.target):
        start = [u for u in node.users if u.target is operator.getitem and u.args[1] == 1]
    else:
        start = [node]
    seen, todo = set(), [(n, 0) for n in start]
    while todo:
        cur, depth = todo.pop()
        for u in cur.users:
            if u.op == "output":
                return True
            if u in seen or depth >= 8 or any(m in str(u.target) for m in _MATMULS):
                continue
            seen.add(u)
            todo.append((u, depth + 1))
    return False


@dataclass
class _GraphInfo:
    """What one compiled region graph holds, noted into the report the first time it runs in
    each region instance."""

    gid: int
    cls: str
    sites: list = field(default_factory=list)  # ((owner, ordinal), record, geometry, kept softmax)
    skips: list = field(default_factory=list)  # (detached SkipRecord, code key)
    climb: bool = False


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def dynamo_disabled() -> bool:
    return bool(torch._dynamo.config.disable) or dynamo_disabled_by_env()


class Conversion:
    def __init__(self, root: torch.nn.Module, spec: RetargetSpec, *, inner: str = "eager",
                 dynamic=None, strict: bool = False, model_name: str = ""):
        self.root = root
        self.spec = spec
        self.inner = inner
        self.dynamic = dynamic
        self.strict = strict
        self.report = ConversionReport(attention=spec.kind, model=model_name or type(root).__name__)
        self.regions: dict[str, RegionForward] = {}
        self.ordinals: dict[str, dict[str, int]] = {}  # region class -> code key -> ordinal
        self.expected: dict[str, set] = {}  # region path -> ordinals it holds
        self.geometry: dict[str, list] = {}  # "path[ordinal]" -> [H, Hkv, D, Dv]
        self.reasons: dict[tuple, str] = {}  # (region class, code key) -> why it stayed softmax
        self.converting = False
        self.climb: set = set()
        self.hook_ids: list = []
        self.holders: set = set()  # owner paths that hold an ``attnswap`` ModuleDict of ours
        self.compiles: dict = {}  # region class -> graphs compiled for it
        self._warned: set = set()
        self._seen: set = set()  # (region path, graph id) already noted
        self._graph_ids = 0
        self._compiled: dict = {}
        self._compiler: AttnswapCompiler | None = None

    # ------------------------------------------------------------------ persistence
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_compiled"] = {}
        state["_compiler"] = None
        state["_seen"] = set()
        return state

    # ------------------------------------------------------------------ installation
    def install(self, path: str) -> RegionForward:
        module = self.root.get_submodule(path) if path else self.root
        rf = RegionForward(module, self, path, previous=module.__dict__.get("forward"))
        module.forward = rf  # an instance attribute: the class and its other instances stay
        self.regions[path] = rf
        self.expected.setdefault(path, set())
        if path not in self.report.regions:
            self.report.regions.append(path)
        return rf

    def uninstall_region(self, path: str) -> None:
        rf = self.regions.pop(path)
        m = rf.module
        if rf.previous is not None:
            m.forward = rf.previous
        else:
            m.__dict__.pop("forward", None)
        for owner_path in [o for o in self.holders if o == path or o.startswith(path + ".") or not path]:
            owner = self.root.get_submodule(owner_path) if owner_path else self.root
            owner._modules.pop("attnswap", None)
            self.holders.discard(owner_path)
        self.expected.pop(path, None)
        if path in self.report.regions:
            self.report.regions.remove(path)
        self.report.sites = [r for r in self.report.sites if r.region != path]
        prefix = f"{path or '<root>'}["
        for k in [k for k in self.geometry if k.startswith(prefix)]:
            del self.geometry[k]

    def install_fastpath_hooks(self) -> None:
        if any(isinstance(m, (torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer))
               for m in self.root.modules()):
            h1 = self.root.register_forward_pre_hook(DisableFastpath(True))
            h2 = self.root.register_forward_hook(DisableFastpath(False), always_call=True)
            self.hook_ids = [h1.id, h2.id]

    def uninstall(self) -> None:
        for path in list(self.regions):
            self.uninstall_region(path)
        if self.hook_ids:
            self.root._forward_pre_hooks.pop(self.hook_ids[0], None)
            self.root._forward_hooks.pop(self.hook_ids[1], None)
            self.root._forward_hooks_always_called.pop(self.hook_ids[1], None)
            self.hook_ids = []

    # ------------------------------------------------------------------ running
    @property
    def compiler(self) -> AttnswapCompiler:
        if self._compiler is None:
            self._compiler = AttnswapCompiler(self.spec, report=self.report, inner=self.inner,
                                              regional=self)
        return self._compiler

    def _compiled_for(self, rf: RegionForward):
        shared = rf.previous is None and not (self.spec.include or self.spec.exclude)
        # The class object, not its name: two classes of one module and qualname (made by a
        # factory function, or a module reloaded) have other code, and must not share a graph.
        key = type(rf.module) if shared else ("instance", rf.path)
        fn = self._compiled.get(key)
        if fn is None:
            if rf.previous is None:
                forward = type(rf.module).forward
            else:
                prev = rf.previous

                def forward(_self, *a, **k):
                    return prev(*a, **k)

            name = f"{type(rf.module).__name__}_attnswap_region{id(self) % 10**8}"
            fn = torch.compile(_trampoline(forward, name), backend=self.compiler,
                               dynamic=self.dynamic, recompile_limit=self._recompile_limit(rf.module))
            self._compiled[key] = fn
        return fn

    def _recompile_limit(self, module) -> int:
        n = sum(1 for rf in self.regions.values() if type(rf.module) is type(module))
        return BASE_RECOMPILE_LIMIT + PER_INSTANCE_RECOMPILES * n

    def run_region(self, rf: RegionForward, args, kwargs):
        # No config.patch here: it costs milliseconds per call. The recompile limit is the
        # compiled function's own; past it dynamo runs the original code, which the accounting
        # turns into an error naming the region. Floats stay specialized (one attribute, ~8 us):
        # instances of one class with different float attributes (a per-stage scale) would
        # otherwise make the scale symbolic after the second instance, and the site unfoldable.
        fn = self._compiled_for(rf)
        if isinstance(rf.module, torch.nn.MultiheadAttention):
            args, kwargs = consistent_mha_masks(args, kwargs)
        cfg = torch._dynamo.config
        prev = cfg.specialize_float, cfg.capture_scalar_outputs
        # `.item()` inside a site (HF DeBERTa slices its relative embeddings by
        # `torch.tensor(span)`) would otherwise break the graph between the scores and the
        # softmax, and the site would run unconverted.
        cfg.specialize_float, cfg.capture_scalar_outputs = True, True
        try:
            return fn(rf.module, *args, **kwargs)
        finally:
            cfg.specialize_float, cfg.capture_scalar_outputs = prev

    # ------------------------------------------------------------------ compiling (the backend)
    def _ordinal(self, cls: str, owner_rel: str, key: str, n_in_graph: int) -> int:
        """The ordinal of a site among the sites its owner module's code holds."""
        table = self.ordinals.setdefault(f"{cls}::{owner_rel}", {})
        if key in table:
            return table[key]
        if not self.converting and len(table) == 1 and n_in_graph == 1:
            # The same one-site owner seen through other source lines (another library
            # version after a reload): it is the same site.
            return next(iter(table.values()))
        table[key] = len(table)
        return table[key]

    def compile_graph(self, compiler: AttnswapCompiler, gm: fx.GraphModule, example_inputs):
        call = current_call()
        if call is None:
            raise AttnswapError("attnswap: a region graph was compiled outside its region's call")
        module, cls, region = call.module, _cls_key(call.module), call.path
        self._graph_ids += 1
        self.compiles[cls] = self.compiles.get(cls, 0) + 1
        info = _GraphInfo(self._graph_ids, cls)
        geometries: dict[tuple, list] = {}
        accept = None
        if self.spec.include or self.spec.exclude:  # such regions compile per instance
            def accept(rec):
                return self.spec.accept_path(_join(region, rec.owner))

        def assign(records, skipped):
            keys = unique_keys([code_key(r.anchor) for r in records])
            for r, k in zip(records, keys):
                n = sum(1 for x in records if x.owner == r.owner)
                r.ordinal = self._ordinal(cls, r.owner, k, n)
                r.region = r.owner  # relative to the region until noted for an instance
            for s, k in zip(skipped, unique_keys([code_key(s.node) for s in skipped])):
                if _escapes(s.node) or any(b in s.reason for b in _BOUNDARY):
                    info.climb = True
                    if not region:  # the root has no parent to hold the rest of the site
                        s.reason = (f"{s.reason}: the attention probabilities leave the compiled "
                                    "graph before the value matmul (a graph break inside the "
                                    "attention, or the weights are returned to the caller)")
                self.reasons[(cls, k)] = s.reason
                info.skips.append((s, k))

        def extras_for(rec, node):
            site = (rec.owner, rec.ordinal)
            geom, why = head_geometry(rec, node)
            if geom is not None:
                geometries[site] = list(geom)
            owner = module.get_submodule(rec.owner) if rec.owner else module
            have = owner._modules.get("attnswap")
            if have is not None and str(rec.ordinal) in have._modules:
                return site, None
            if not self.converting:
                return None, ("this site was first compiled after attnswap.convert() returned, "
                              "so it has no SAS/QK-norm parameters; convert with example inputs "
                              "that reach it")
            if geom is None:
                return None, why
            self._ensure_extras(owner, _join(region, rec.owner), rec.ordinal, geom)
            return site, None

        result = run_pipeline(gm, self.spec, root=module, accept=accept, assign=assign,
                              extras_for=extras_for if self.spec.needs_parameters else None)
        self.report.graphs += 1
        kept = {id(r) for r in result.kept_softmax}
        for r in result.sites:
            site = (r.owner, r.ordinal)
            info.sites.append((site, r.detached(), geometries.get(site), id(r) in kept))
        for s in result.skipped[len(info.skips):]:  # kept-as-softmax sites, from retarget
            k = code_key(s.node)
            info.skips.append((s, k))
            self.reasons[(cls, k)] = s.reason
        info.skips = [(s.detached(), k) for s, k in info.skips]
        converted = frozenset(site for site, _, _, k in info.sites if not k)
        inner = compiler.inner_compile(gm, example_inputs)
        seen = self._seen

        def run(*args):
            c = current_call()
            if c is not None and (c.path, info.gid) not in seen:
                seen.add((c.path, info.gid))
                self._note(c, info)  # first, so another instance's SAS modules exist in convert()
            out = inner(*args)
            if c is not None:
                c.ran.update(converted)
            return out

        return run

    def _ensure_extras(self, owner: torch.nn.Module, owner_path: str, ordinal: int, geom) -> None:
        holder = owner._modules.get("attnswap")
        if holder is None:
            holder = torch.nn.ModuleDict()
            owner.add_module("attnswap", holder)
            self.holders.add(owner_path)
        if str(ordinal) not in holder._modules:
            holder[str(ordinal)] = make_extras(self.spec, geom, like=owner)
        self.geometry[identity(owner_path, ordinal)] = list(geom)

    def _note(self, call, info: _GraphInfo) -> None:
        """A graph ran in region ``call.path`` for the first time: report what it holds."""
        import dataclasses

        for site, rec, geom, kept in info.sites:
            owner_rel, ordinal = site
            rec = dataclasses.replace(rec, region=call.path, owner=_join(call.path, owner_rel))
            expected = self.expected.setdefault(call.path, set())
            if site not in expected:
                expected.add(site)
                if self.converting and geom is not None and self.spec.needs_parameters and not kept:
                    owner = call.module.get_submodule(owner_rel) if owner_rel else call.module
                    self._ensure_extras(owner, rec.owner, ordinal, geom)
            self.report.add_site(rec)
        for skip, _key in info.skips:
            loc = _join(call.path, skip.location) if skip.location else call.path
            skip = dataclasses.replace(skip, location=loc)
            if info.climb and call.path and (any(b in skip.reason for b in _BOUNDARY)
                                             or "consumers" in skip.reason):
                continue  # discovery moves to the parent module; not a user-facing skip yet
            self.report.add_skip(skip)
            if is_loud(skip.reason):
                self._tell(loc, None, skip.reason, raise_strict=False)
        if info.climb and self.converting and call.path:
            self.climb.add(call.path)  # the root has no parent: its skips stand

    # ------------------------------------------------------------------ accounting
    def account(self, rf: RegionForward, call) -> None:
        if self.converting:
            return
        expected = self.expected.get(rf.path)
        if not expected:
            return
        missing = expected - call.ran
        if missing:
            self.check_recompile_limit(rf)
        for owner_rel, ordinal in sorted(missing):
            self._tell(_join(rf.path, owner_rel), ordinal, self._why_softmax(rf, owner_rel, ordinal))

    def check_recompile_limit(self, rf: RegionForward) -> None:
        limit = self._recompile_limit(rf.module)
        if self.compiles.get(_cls_key(rf.module), 0) >= limit:
            raise AttnswapError(
                f"attnswap: region {rf.path or '<root>'} ({type(rf.module).__name__}) of "
                f"{self.report.model} was recompiled {limit} times, so dynamo ran it as the "
                "original code (softmax). The guard that keeps failing is in "
                "TORCH_LOGS=recompiles; pass dynamic=True to attnswap.convert for varying "
                "shapes, or report the call pattern as an attnswap issue.")

    def _why_softmax(self, rf: RegionForward, owner_rel: str, ordinal: int) -> str:
        if dynamo_disabled():
            return ("dynamo is disabled (TORCHDYNAMO_DISABLE=1 or torch._dynamo.config.disable), "
                    "so the region ran its original code")
        cls = _cls_key(rf.module)
        for key, o in self.ordinals.get(f"{cls}::{owner_rel}", {}).items():
            if o == ordinal and (cls, key) in self.reasons:
                return self.reasons[(cls, key)]
        return ("the region ran outside its compiled graphs (dynamo ran the original code, e.g. "
                "under torch.compiler.set_stance('force_eager') or after a compile error)")

    def _tell(self, path: str, ordinal, reason: str, raise_strict: bool = True) -> None:
        where = identity(path, ordinal) if ordinal is not None else (path or "<root>")
        msg = (f"attnswap: site {where} of {self.report.model} ran as the original softmax, "
               f"not {self.spec.kind}: {reason}")
        if self.strict and raise_strict:
            raise AttnswapError(msg + " (strict=True)")
        if (where, reason) not in self._warned:
            self._warned.add((where, reason))
            warnings.warn(msg, AttentionSwapWarning, stacklevel=4)

    # ------------------------------------------------------------------ description
    def describe(self) -> dict:
        """JSON-able: what the conversion was, enough to rebuild it on a freshly loaded model."""
        return {
            "format": 1,
            "attention": self.spec.kind,
            "options": {k: v for k, v in self.spec.options.items()},
            "include": list(self.spec.include),
            "exclude": list(self.spec.exclude),
            "inner": self.inner,
            "strict": self.strict,
            "regions": {p: [list(x) for x in sorted(self.expected.get(p, ()))] for p in self.regions},
            "ordinals": self.ordinals,
            "geometry": self.geometry,
            "report": self.report.to_dict(),
        }
