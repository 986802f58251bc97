"""``attnswap.convert``: the same model, its attention computed by ``attnswap::attention``.

The returned model is the user's model (a deep copy unless ``inplace=True``) whose attention
regions — the smallest modules holding a whole site, usually the attention modules — are
compiled with the attnswap backend (``rewriter/regions.py``). Its class, call signature, root
forward, outputs, ``generate()``, ``parameters()`` and ``state_dict()`` are the model's own; SAS /
QK-norm parameters are registered on the regions (``<region>.attnswap.<ordinal>``) during
conversion, before any optimizer is built. It deep-copies, pickles (``torch.save(model)``) and,
for HuggingFace models, saves and reloads (``save_pretrained`` → ``attnswap.from_pretrained``)
as what it is; :func:`unconvert` gives the original back.

No silent fallback: every region call checks that each of its sites ran as the op; a site that
ran as the original softmax gives an ``AttentionSwapWarning`` per site and reason, or an error
with ``strict=True``. Every softmax left alone is in the report, with its reason.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import traceback
import warnings
from dataclasses import dataclass, field

import torch

from ..options import AttnswapOptionError, check_convert_args
from ..passes.retarget import RetargetSpec
from ..runtime.fastpath import no_mha_fastpath
from .backend import AttentionSwapWarning, AttnswapError, backend_report, is_loud
from .discovery import discover
from .regions import MAX_DISCOVERY_ROUNDS, Conversion, dynamo_disabled
from .report import ConversionReport
from .state import StateSnapshot


@dataclass(frozen=True)
class ExampleInputs:
    """Positional and keyword arguments together, for models that take both."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


def _example_call(model, example_inputs):
    if isinstance(example_inputs, ExampleInputs):
        return tuple(example_inputs.args), dict(example_inputs.kwargs)
    if example_inputs is None:
        dummy = getattr(model, "dummy_inputs", None)
        if isinstance(dummy, dict) and dummy:
            return (), dict(dummy)
        raise ValueError(
            f"{type(model).__name__} cannot describe its own inputs: pass example_inputs= "
            "(a tensor, a tuple of positional args, or a dict of keyword args) that the model "
            "accepts, e.g. attnswap.convert(model, 'sigmoid', example_inputs=torch.randn(2, 3, 224, 224))"
        )
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise ValueError(
        f"example_inputs must be a tensor, a tuple/list of positional args, a dict of keyword "
        f"args or attnswap.ExampleInputs(args, kwargs); got {type(example_inputs).__name__}"
    )


def conversion_of(model) -> Conversion | None:
    conv = getattr(model, "__dict__", {}).get("_attnswap")
    return conv if isinstance(conv, Conversion) else None


def _unwrap(model):
    """The module a user converts when they hand us a wrapper (DDP, torch.compile)."""
    return getattr(model, "_orig_mod", model)


def convert(
    model: torch.nn.Module,
    attention: str = "sigmoid",
    example_inputs=None,
    *,
    include=None,
    exclude=None,
    inplace: bool = False,
    inner: str = "eager",
    dynamic: bool | None = None,
    strict: bool = False,
    **options,
) -> torch.nn.Module:
    """Swap ``model``'s softmax attention for ``attention`` ("sigmoid", "relu", "sas", "softmax").

    Options per kind — sigmoid: ``sigmoid_bias`` (None → −ln Tk), ``fast_sigmoid``; relu:
    ``activation``, ``alpha``, ``length`` (None/"keys", "visible", int); sas: ``heads_ratio``,
    ``dim``, ``kernel_size``, ``init`` ("identity"/"random"); all: ``qk_norm``
    (False/True/"layernorm"/"rmsnorm"), ``impl`` (auto/reference/cpu/triton).
    ``include``/``exclude``: glob(s) over region paths (``model.layers.0.self_attn``).
    ``strict=True`` turns "a site ran as the original softmax" into an error, at conversion and
    on every call. The report is ``model.attnswap_report`` (or ``attnswap.report_of(model)``).
    """
    if not isinstance(model, torch.nn.Module):
        raise AttnswapOptionError("model", model, "it must be a torch.nn.Module",
                                  "pass the model itself (an nn.Module), not its class or output")
    spec = RetargetSpec.build(attention, include=include, exclude=exclude, **options)
    check_convert_args(inplace=inplace, inner=inner, dynamic=dynamic, strict=strict)
    if conversion_of(model) is not None:
        raise ValueError("this model is already converted; convert the original model instead "
                         "(attnswap.unconvert(model) gives it back)")
    args, kwargs = _example_call(model, example_inputs)
    snapshot = StateSnapshot(model)
    target = model if inplace else _copy_of(model)
    target_snapshot = snapshot if inplace else StateSnapshot(target)
    conv = Conversion(target, spec, inner=inner, dynamic=dynamic, strict=strict,
                      model_name=type(model).__name__)
    try:
        _build(conv, args, kwargs)
    except BaseException as e:
        conv.uninstall()
        target_snapshot.restore()
        snapshot.restore()
        if isinstance(e, (AttnswapError, KeyboardInterrupt)):
            raise
        _blame_inputs(model, args, kwargs, e)
        raise
    finally:
        target_snapshot.restore()
        if not inplace:
            snapshot.restore()
    if not conv.report.sites:
        conv.uninstall()
        _nothing_converted(conv, model)
        target.__dict__["attnswap_report"] = conv.report
        return target
    _attach(target, conv)
    return target


def _copy_of(model):
    try:
        return copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001 - any copy failure has the same remedy
        raise AttnswapOptionError(
            "inplace", False, f"{type(model).__name__} cannot be deep-copied "
            f"({type(e).__name__}: {' '.join(str(e).split())[:200]})",
            "pass inplace=True to convert the model itself (it is left as it was if conversion "
            "fails), or drop the tensors that block copying (often a cache that a forward "
            "outside torch.no_grad() filled)") from e


_DYNAMO_DISABLED = ("dynamo is disabled (TORCHDYNAMO_DISABLE=1 or torch._dynamo.config.disable), "
                    "and attnswap compiles each attention region with dynamo: it runs as the "
                    "original softmax; unset TORCHDYNAMO_DISABLE to convert it")


def _build(conv: Conversion, args, kwargs) -> None:
    """Discovery, then rounds of region calls until every region holds its whole site."""
    root = conv.root
    disc = discover(root, args, kwargs)
    conv.discovered = [h.path for h in disc.hits]
    candidates = disc.candidates()
    if not candidates:
        return
    if dynamo_disabled():
        from ..passes.canonicalize import SkipRecord

        for h in disc.hits:
            conv.report.add_skip(SkipRecord(h.path, "", h.op, _DYNAMO_DISABLED))
        if conv.strict:
            raise AttnswapError(f"attnswap: nothing converted in {conv.report.model}: "
                                f"{_DYNAMO_DISABLED} (strict=True)")
        return
    conv.converting = True
    try:
        for path in candidates:
            conv.install(path)
        conv.install_fastpath_hooks()
        for _ in range(MAX_DISCOVERY_ROUNDS):
            conv.climb.clear()
            with no_mha_fastpath():
                root(*args, **kwargs)
            if not conv.climb:
                break
            for path in sorted(conv.climb, key=len, reverse=True):
                if path not in conv.regions or path == "":
                    continue
                conv.uninstall_region(path)
                parent = disc.caller(path)
                if any(parent == p or parent.startswith(p + ".") or p == "" for p in conv.regions):
                    continue  # an installed region already holds the parent
                for p in [p for p in conv.regions if p.startswith(parent + ".") or parent == ""]:
                    conv.uninstall_region(p)
                conv.install(parent)
            conv.report.sites.clear()
            conv.report.skipped.clear()
            conv._seen.clear()
        for path in [p for p in conv.regions if not conv.expected.get(p)]:
            conv.check_recompile_limit(conv.regions[path])
            conv.uninstall_region(path)  # held no attention; its skips stay in the report
        _report_unseen(conv, disc)
    finally:
        conv.converting = False
    if conv.strict:
        loud = [s for s in conv.report.skipped if is_loud(s.reason)]
        if loud:
            s = loud[0]
            raise AttnswapError(f"attnswap: softmax at {s.location or '<root>'} of "
                                f"{conv.report.model} was not converted: {s.reason} (strict=True)")


def _related(a: str, b: str) -> bool:
    return a == b or not a or not b or a.startswith(b + ".") or b.startswith(a + ".")


def _report_unseen(conv: Conversion, disc) -> None:
    """A softmax/attention call that ran, but that no compiled graph of its region showed to the
    passes (dynamo graph-broke inside it, e.g. in torch's own mask checks), is neither a site nor
    a reasoned skip: say so, loudly, rather than leave it out of the report."""
    from ..passes.canonicalize import SkipRecord

    seen = [r.owner for r in conv.report.sites] + [s.location for s in conv.report.skipped]
    for h in disc.hits:
        if h.inside_region or any(_related(h.path, p) for p in seen):
            continue
        reason = (f"a {h.op} call ran here, but no compiled graph of its region holds it: dynamo "
                  "made a graph break inside the attention (for nn.MultiheadAttention often in "
                  "torch's own mask checks: pass masks of one dtype and explicit is_causal), so "
                  "it runs as the original softmax")
        if conv.report.add_skip(SkipRecord(h.path, "", h.op, reason)):
            warnings.warn(f"attnswap: softmax at {h.path or '<root>'} not converted to "
                    f"{conv.spec.kind}: {reason}", AttentionSwapWarning, stacklevel=4)
            seen.append(h.path)


def _blame_inputs(model, args, kwargs, error) -> None:
    """Were the inputs or the model at fault rather than attnswap? The original model tells."""
    try:
        inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise AttnswapOptionError(
            "example_inputs", ExampleInputs(args, kwargs), f"they do not fit "
            f"{type(model).__name__}.forward{_signature(model)} ({e})",
            "pass a tensor, a tuple of positional args, a dict of keyword args or "
            "attnswap.ExampleInputs(args, kwargs) that the model accepts") from None
    except ValueError:
        pass  # no signature to read (a builtin): let the call below tell
    snapshot = StateSnapshot(model)
    try:
        with torch.no_grad(), no_mha_fastpath():
            model(*args, **kwargs)
    except Exception as original_error:
        where = _raising_frame(original_error)
        raise ValueError(
            f"the original {type(model).__name__} fails on these example_inputs, before any "
            f"conversion: its forward raised {type(original_error).__name__}: "
            f"{' '.join(str(original_error).split())[:300]}{where}. Fix the inputs (or the "
            "model) so that model(example_inputs) runs; attnswap did not change the model."
        ) from original_error
    finally:
        snapshot.restore()


def _signature(model) -> str:
    try:
        return str(inspect.signature(model.forward))
    except (TypeError, ValueError):
        return "(...)"


def _raising_frame(error) -> str:
    tb = traceback.extract_tb(error.__traceback__)
    return f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""


def _nothing_converted(conv: Conversion, model) -> None:
    report = conv.report
    name = type(model).__name__
    hits = getattr(conv, "discovered", [])
    if hits and (conv.spec.include or conv.spec.exclude) and any(
            "include=" in s.reason or "exclude=" in s.reason for s in report.skipped):
        why = (f"every attention site was deselected by include={list(conv.spec.include)} / "
               f"exclude={list(conv.spec.exclude)}")
    elif hits and dynamo_disabled():
        why = ("dynamo is disabled (TORCHDYNAMO_DISABLE=1 or torch._dynamo.config.disable), so "
               "attnswap cannot compile the attention")
    elif hits:
        why = (f"no softmax attention found: {len(hits)} softmax/attention call(s) ran, none of "
               "them convertible attention (reasons below)")
    else:
        why = "no softmax attention found: no softmax or attention call ran"
    msg = f"attnswap: nothing converted in {name}: {why}; the model is returned unconverted.\n{report}"
    if conv.strict:
        raise AttnswapError(msg + " (strict=True)")
    warnings.warn(msg, AttentionSwapWarning, stacklevel=3)


def _attach(target, conv: Conversion) -> None:
    target.__dict__["_attnswap"] = conv
    target.__dict__["attnswap_report"] = conv.report
    target.__dict__["attnswap_spec"] = conv.spec
    cfg = getattr(target, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict") and hasattr(cfg, "architectures"):
        info = conv.describe()
        # The same code path on reload: the sites' code keys are those of this implementation.
        info["attn_implementation"] = getattr(cfg, "_attn_implementation", None)
        cfg.attnswap = info  # save_pretrained writes it into config.json


def unconvert(model: torch.nn.Module) -> torch.nn.Module:
    """Give the original model back (in place): region forwards, SAS / QK-norm modules, hooks
    and attributes removed. Its parameters are the ones it was trained to."""
    conv = conversion_of(model)
    if conv is None:
        raise ValueError(f"{type(model).__name__} is not a model returned by attnswap.convert")
    conv.uninstall()
    for name in ("_attnswap", "attnswap_report", "attnswap_spec"):
        model.__dict__.pop(name, None)
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "attnswap"):
        delattr(cfg, "attnswap")
    return model


@contextlib.contextmanager
def original_code(model):
    """Run a converted model's original code (no region's compiled forward) for the duration:
    what ``torch.export`` must trace (it cannot trace a compiled region)."""
    conv = conversion_of(model)
    saved = []
    if conv is not None:
        for rf in conv.regions.values():
            saved.append((rf.module, rf.module.__dict__.pop("forward", None)))
            if rf.previous is not None:
                rf.module.forward = rf.previous
    try:
        yield
    finally:
        for m, fwd in saved:
            if fwd is not None:
                m.__dict__["forward"] = fwd


def report_of(model) -> ConversionReport | None:
    """The report of a converted model, or of a model compiled with ``backend="attnswap"``."""
    if not isinstance(model, torch.nn.Module):
        raise AttnswapOptionError("model", model, "it must be a torch.nn.Module (a converted model "
                                  "or one compiled with backend='attnswap')")
    conv = conversion_of(model)
    if conv is not None:
        return conv.report
    inner = _unwrap(model)
    conv = conversion_of(inner)
    if conv is not None:
        return conv.report
    return backend_report(inner) or backend_report(model)
