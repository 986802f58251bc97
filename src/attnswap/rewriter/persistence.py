"""Saving and reloading converted models.

* ``copy.deepcopy(model)`` and ``torch.save(model)`` / pickle work as they do for any module: the
  conversion is data (spec, regions, site identities, report); compiled code is rebuilt on the
  next call.
* HuggingFace: ``convert()`` writes what the conversion was into ``model.config.attnswap``, so
  ``save_pretrained`` stores it in ``config.json`` beside the weights (SAS / QK-norm parameters
  included, under their regions' paths). :func:`from_pretrained` reads it back: it loads the
  model with the class's own ``from_pretrained``, re-installs the same regions, re-creates the
  sites' learned modules from their recorded geometry and loads their weights — no example
  inputs and no discovery run needed. A plain ``AutoModel.from_pretrained`` of such a directory
  gives the *unconverted* model; :func:`from_pretrained` is the way back to the converted one.
"""

from __future__ import annotations

import json
import os

import torch

from ..passes.canonicalize import SiteRecord, SkipRecord
from ..passes.retarget import RetargetSpec
from .regions import Conversion
from .report import ConversionReport

FORMAT = 1


def rebuild(model: torch.nn.Module, info: dict) -> torch.nn.Module:
    """Install the conversion ``info`` (``Conversion.describe()``) on a freshly built ``model``
    whose weights are the converted model's (SAS / QK-norm weights are loaded separately)."""
    from .convert import _attach, conversion_of

    if conversion_of(model) is not None:
        raise ValueError("this model is already converted")
    if info.get("format") != FORMAT:
        raise ValueError(f"attnswap conversion record format {info.get('format')!r} is not "
                         f"{FORMAT}; re-convert the model with this attnswap version")
    spec = RetargetSpec.build(info["attention"], include=info.get("include") or None,
                              exclude=info.get("exclude") or None, **_kind_options(info))
    conv = Conversion(model, spec, inner=info.get("inner", "eager"),
                      strict=bool(info.get("strict", False)), model_name=type(model).__name__)
    conv.ordinals = {k: dict(v) for k, v in info.get("ordinals", {}).items()}
    conv.geometry = {k: list(v) for k, v in info.get("geometry", {}).items()}
    for path, sites in info.get("regions", {}).items():
        conv.install(path)
        conv.expected[path] = {(str(o), int(i)) for o, i in sites}
        for owner_rel, ordinal in conv.expected[path]:
            owner_path = ".".join(p for p in (path, owner_rel) if p)
            geom = conv.geometry.get(f"{owner_path or '<root>'}[{ordinal}]")
            if spec.needs_parameters and geom is not None:
                owner = model.get_submodule(owner_path) if owner_path else model
                conv._ensure_extras(owner, owner_path, ordinal, geom)
    conv.install_fastpath_hooks()
    conv.report = _report_from_dict(info.get("report", {}), spec.kind, type(model).__name__)
    _attach(model, conv)
    return model


def _kind_options(info: dict) -> dict:
    from ..passes.retarget import COMMON_OPTIONS, KIND_OPTIONS

    allowed = {**KIND_OPTIONS[info["attention"]], **COMMON_OPTIONS}
    return {k: v for k, v in info.get("options", {}).items() if k in allowed}


def _report_from_dict(d: dict, kind: str, model: str) -> ConversionReport:
    r = ConversionReport(attention=d.get("attention", kind), model=d.get("model", model),
                         graphs=0, regions=list(d.get("regions", [])))
    for s in d.get("sites", []):
        s = {k: v for k, v in s.items() if k != "identity"}
        for f in ("q_shape", "k_shape", "v_shape"):
            if s.get(f) is not None:
                s[f] = tuple(s[f])
        r.sites.append(SiteRecord(**s))
    for s in d.get("skipped", []):
        r.skipped.append(SkipRecord(**s))
    return r


def _checkpoint_tensors(path: str, keep) -> dict:
    """The tensors of a saved HF checkpoint (single file or sharded) whose names pass ``keep``."""
    from safetensors.torch import load_file

    out = {}
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        bins = os.path.join(path, "pytorch_model.bin")
        if os.path.exists(bins):
            sd = torch.load(bins, map_location="cpu", weights_only=True)
            return {k: v for k, v in sd.items() if keep(k)}
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")
    for name in files:
        for k, v in load_file(os.path.join(path, name)).items():
            if keep(k):
                out[k] = v
    return out


def from_pretrained(path: str, **hf_kwargs) -> torch.nn.Module:
    """Reload a converted HuggingFace model saved with ``save_pretrained``: the same class, the
    same converted attention, its SAS / QK-norm parameters as trained."""
    import logging

    import transformers

    from ..options import AttnswapOptionError

    if not isinstance(path, (str, os.PathLike)):
        raise AttnswapOptionError("path", path, "it must be the directory that save_pretrained "
                                  "wrote (a str or os.PathLike)")
    text = os.fspath(path)
    if (os.path.isabs(text) or text.startswith((".", "~"))) and not os.path.isdir(text):
        raise AttnswapOptionError("path", path, "no such directory",
                                  "give the directory that save_pretrained wrote")
    config = transformers.AutoConfig.from_pretrained(path)
    info = getattr(config, "attnswap", None)
    if not isinstance(info, dict):
        raise ValueError(f"{path} was not saved from a model converted by attnswap (its "
                         "config.json has no 'attnswap' entry); load it with transformers, then "
                         "attnswap.convert() it")
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ValueError(f"{path}: config.json names architecture {arch!r}, which transformers "
                         f"{transformers.__version__} does not have")
    # The checkpoint holds the SAS / QK-norm weights that the plain class does not know; they are
    # loaded below, so HF's "unexpected keys" notice about them would only mislead.
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    impl = info.get("attn_implementation")
    if impl and "attn_implementation" not in hf_kwargs:
        hf_kwargs["attn_implementation"] = impl
    try:
        model = cls.from_pretrained(path, config=config, **hf_kwargs)
    finally:
        logger.setLevel(level)
    rebuild(model, info)
    extras = {n for n, _ in model.named_parameters() if ".attnswap." in n or n.startswith("attnswap.")}
    extras |= {n for n, _ in model.named_buffers() if ".attnswap." in n}
    if extras:
        sd = _checkpoint_tensors(path, lambda k: k in extras)
        missing = sorted(extras - set(sd))
        if missing:
            raise ValueError(f"{path} lacks {len(missing)} SAS/QK-norm tensor(s) of the "
                             f"conversion, e.g. {missing[0]}; the checkpoint is incomplete")
        model.load_state_dict(sd, strict=False)
    return model
