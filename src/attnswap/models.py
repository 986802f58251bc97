"""A small built-in registry of models for the ``attnswap`` command line, and the resolver for
``module.path:factory`` specs that name the user's own model.

Built-in names (random weights from a fixed seed, fp32, ``eval()``; nothing is downloaded):

* ``hf:gpt2-tiny``, ``hf:llama-tiny``, ``hf:bert-tiny`` — transformers models built from configs
  (``attn_implementation="eager"``, hidden size 32–64, 2 layers);
* ``timm:vit_tiny_patch16_224`` — ``timm.create_model(..., pretrained=False)`` at
  ``img_size=64`` (16 patches) and ``depth=2``;
* ``torch:transformer-encoder`` — ``nn.TransformerEncoder`` (2 layers, d_model 32, batch_first).

Your own model: ``"my_pkg.my_module:make_model"``. ``make_model()`` is called with no arguments
and returns either the model, or ``(model, example_inputs)`` where ``example_inputs`` is what
:func:`attnswap.convert` takes (a tensor, a tuple of positional args, a dict of keyword args or
``attnswap.ExampleInputs``). Without example inputs the model must describe its own inputs
(HuggingFace models do, through ``dummy_inputs``). The current directory is on the import path.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["ModelSpecError", "BuiltModel", "REGISTRY", "names", "resolve", "output_tensor", "rebuild"]


class ModelSpecError(ValueError):
    """A model name or ``module:factory`` spec that cannot be resolved (the message says why)."""


@dataclass
class BuiltModel:
    name: str
    model: nn.Module
    example_inputs: Any  # what attnswap.convert takes, or None


@dataclass(frozen=True)
class Entry:
    name: str
    description: str
    build: Callable[[], tuple[nn.Module, Any]]
    needs: str | None = None  # import name of the optional dependency


def _seeded(fn, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = fn()
    return model.float().eval()


def _ids(batch, seq, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, seq), generator=g)


def _hf(model_cls: str, config_cls: str, **cfg):
    import transformers

    config = getattr(transformers, config_cls)(**cfg)
    return getattr(transformers, model_cls)._from_config(config, attn_implementation="eager")


def _gpt2():
    m = _seeded(lambda: _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=256, n_positions=64,
                            n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2))
    return m, {"input_ids": _ids(2, 16, 256), "use_cache": False}


def _llama():
    m = _seeded(lambda: _hf("LlamaForCausalLM", "LlamaConfig", vocab_size=256, hidden_size=64,
                            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2))
    return m, {"input_ids": _ids(2, 16, 256), "use_cache": False}


def _bert():
    m = _seeded(lambda: _hf("BertModel", "BertConfig", vocab_size=256, hidden_size=32,
                            num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=64, pad_token_id=0))
    ids = _ids(2, 16, 256)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # one padded row
    return m, {"input_ids": ids * mask, "attention_mask": mask}


def _timm_vit():
    import timm

    m = _seeded(lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64,
                                          depth=2, num_classes=10))
    return m, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


class TransformerEncoderModel(nn.Module):
    """``nn.TransformerEncoder`` (2 layers, d_model 32, 2 heads, batch_first) over ``[B, T, 32]``."""

    def __init__(self, d_model=32, nhead=2, layers=2):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=64, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)

    def forward(self, x):
        return self.encoder(x)


def _torch_encoder():
    m = _seeded(TransformerEncoderModel)
    return m, torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))


REGISTRY: dict[str, Entry] = {e.name: e for e in (
    Entry("hf:gpt2-tiny", "GPT2LMHeadModel, 2 layers, n_embd 32, 4 heads (eager)", _gpt2, "transformers"),
    Entry("hf:llama-tiny", "LlamaForCausalLM, 2 layers, hidden 64, GQA 4/2 heads, RoPE (eager)", _llama,
          "transformers"),
    Entry("hf:bert-tiny", "BertModel, 2 layers, hidden 32, padded batch (eager)", _bert, "transformers"),
    Entry("timm:vit_tiny_patch16_224", "timm ViT-Tiny, pretrained=False, img_size 64, depth 2",
          _timm_vit, "timm"),
    Entry("torch:transformer-encoder", "nn.TransformerEncoder, 2 layers, d_model 32", _torch_encoder),
)}


def names() -> list[str]:
    return list(REGISTRY)


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def _from_factory(spec: str) -> BuiltModel:
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ModelSpecError(f"{spec!r} is not 'module.path:factory'")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's to fix
        raise ModelSpecError(
            f"cannot import module {mod_name!r} ({_one_line(e)}); check the spelling and run from "
            f"the directory that holds it or put it on PYTHONPATH") from None
    fn = mod
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ModelSpecError(f"module {mod_name!r} has no attribute {attr!r}; "
                                 f"expected 'module.path:factory' with factory() returning the model")
    if not callable(fn):
        raise ModelSpecError(f"{spec!r} is not callable; the factory must return a model "
                             "or (model, example_inputs)")
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - the user's factory failed: say so in one line
        raise ModelSpecError(
            f"calling {spec}() raised {_one_line(e)}; the factory must take no "
            "arguments and return the model or (model, example_inputs)") from None
    example = None
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], nn.Module):
        out, example = out
    if not isinstance(out, nn.Module):
        raise ModelSpecError(f"{spec} returned {type(out).__name__}, not a torch.nn.Module "
                             "(or a (model, example_inputs) pair)")
    return BuiltModel(spec, out, example)


def resolve(spec: str) -> BuiltModel:
    """Build the model a CLI ``MODEL`` argument names: a registry name or ``module.path:factory``."""
    entry = REGISTRY.get(spec)
    if entry is not None:
        if entry.needs and importlib.util.find_spec(entry.needs) is None:
            raise ModelSpecError(f"{spec} needs {entry.needs}: pip install 'attnswap[zoo]'")
        model, example = entry.build()
        return BuiltModel(spec, model, example)
    prefix = spec.split(":", 1)[0]
    if prefix in ("hf", "timm", "torch") or ":" not in spec:
        raise ModelSpecError(f"unknown model {spec!r}; choose one of {', '.join(REGISTRY)} "
                             "or give your own as 'module.path:factory'")
    return _from_factory(spec)


def output_tensor(out: Any) -> torch.Tensor:
    """The tensor to compare / differentiate in a model output: the tensor itself, ``logits`` or
    ``last_hidden_state`` of a HuggingFace output, else the first tensor found."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("logits", "last_hidden_state"):
        val = getattr(out, attr, None)
        if isinstance(val, torch.Tensor):
            return val
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for item in out:
            try:
                return output_tensor(item)
            except TypeError:
                continue
    raise TypeError(f"no tensor in model output of type {type(out).__name__}")


def rebuild(directory: str) -> nn.Module:
    """Rebuild a model saved by ``attnswap convert ... --out DIR``: build the model named in
    ``DIR/attnswap.json``, convert it with the saved attention and options, load the weights."""
    import json

    from .rewriter.convert import convert

    with open(os.path.join(directory, "attnswap.json")) as f:
        meta = json.load(f)
    built = resolve(meta["model"])
    model = convert(built.model, meta["attention"], built.example_inputs, **meta.get("options", {}))
    state = torch.load(os.path.join(directory, "model.pt"), map_location="cpu")
    model.load_state_dict(state)
    return model
