"""``attnswap.convert``: the same model, its attention computed by ``attnswap::attention``.

The returned model is the user's model (a deep copy unless ``inplace=True``) whose ``forward`` is
compiled by dynamo with the attnswap backend. Its class, call signature, outputs, ``generate()``,
``parameters()`` and ``state_dict()`` are the model's own; SAS / QK-norm parameters are registered
on the attention modules (``<path>.attnswap``) during conversion, before any optimizer is built.

No silent fallback: every call counts the op executions against what the compiled graphs promise,
dynamo's recompile limit raises instead of falling back to the original code, and every softmax
that is left alone is in the report (with a warning when it looks like attention).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import types
import warnings
from dataclasses import dataclass, field

import torch

from ..kernels.op import total_calls
from ..passes.retarget import RetargetSpec
from .backend import AttentionSwapWarning, AttnswapCompiler
from .report import ConversionReport

_ids = itertools.count()

# Recompiles one converted model may need (train/eval, grad modes, cache/no-cache paths, the
# switch to dynamic shapes). Past it dynamo raises rather than silently running the original code.
RECOMPILE_LIMIT = 32


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


def _fresh_forward(model: torch.nn.Module):
    """``type(model).forward`` with a code object of its own.

    Dynamo caches compiled code per code object, and counts recompiles per code object: every
    conversion of the same class would share one cache and hit the recompile limit after a
    handful of models. A private copy of the code gives each converted model its own cache.
    """
    fn = type(model).forward
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_attnswap{next(_ids)}")
    new = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    new.__qualname__ = fn.__qualname__
    new.__doc__ = fn.__doc__
    return new.__get__(model)


@contextlib.contextmanager
def _no_mha_fastpath():
    # PyTorch's fused inference kernels for nn.MultiheadAttention / TransformerEncoderLayer hide
    # the attention from the graph; a converted model must always take the decomposed path.
    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(prev)


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
    ``include``/``exclude``: glob(s) over module paths. ``strict=True`` turns "a call ran no
    converted attention" into an error. The report is ``model.attnswap_report``.
    """
    spec = RetargetSpec.build(attention, include=include, exclude=exclude, **options)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, "attnswap_report", None) is not None and "forward" in model.__dict__:
        raise ValueError("this model is already converted; convert the original model instead")
    args, kwargs = _example_call(model, example_inputs)

    target = model if inplace else copy.deepcopy(model)
    report = ConversionReport(attention=attention, model=type(model).__name__)
    compiler = AttnswapCompiler(spec, root=target, report=report, inner=inner)
    original_forward = target.forward
    compiled = torch.compile(_fresh_forward(target), backend=compiler, dynamic=dynamic)
    state = {"strict": strict}

    @functools.wraps(original_forward)
    def forward(*a, **k):
        before, promised = total_calls(), compiler.expected_calls
        with _no_mha_fastpath(), torch._dynamo.config.patch(
            recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True
        ):
            out = compiled(*a, **k)
        ran, expected = total_calls() - before, compiler.expected_calls - promised
        if len(report.sites) and (ran < expected or expected == 0):
            msg = (f"attnswap: this call of {type(target).__name__} ran {ran} converted attention "
                   f"op(s) where its graphs hold {expected} and the model has "
                   f"{len(report.sites)} site(s): part of the model ran outside the rewritten "
                   "graphs")
            if state["strict"]:
                raise RuntimeError(msg)
            warnings.warn(msg, AttentionSwapWarning, stacklevel=2)
        return out

    target.forward = forward
    target.attnswap_report = report
    target.attnswap_spec = spec
    target._attnswap_original_forward = original_forward
    try:
        was_training = target.training
        target(*args, **kwargs)  # compile now: the report and any new parameters exist on return
        target.train(was_training)
    except Exception as e:
        _restore(target)
        try:  # were the inputs at fault rather than attnswap? The original model tells.
            with torch.no_grad(), _no_mha_fastpath():
                target(*args, **kwargs)
        except Exception as original_error:
            raise ValueError(
                f"example_inputs do not fit {type(model).__name__}: calling the original model "
                f"with them raised {type(original_error).__name__}: {original_error}. Pass "
                "inputs the model accepts."
            ) from original_error
        raise e
    if not report.sites:
        _restore(target)
        target.attnswap_report = report
        warnings.warn(
            f"attnswap: no softmax attention found in {type(model).__name__}; the model is "
            f"returned unconverted.\n{report}", AttentionSwapWarning, stacklevel=2,
        )
    return target


def _restore(model):
    for name in ("forward", "attnswap_spec", "_attnswap_original_forward", "attnswap_report"):
        model.__dict__.pop(name, None)
    for m in model.modules():
        if "attnswap" in m._modules:
            del m._modules["attnswap"]


def report_of(model) -> ConversionReport | None:
    return getattr(model, "attnswap_report", None)
