"""onnxruntime helpers: sessions, running, comparing against PyTorch, timing.

The pieces are small and composable so a higher-level report (original vs converted model,
PyTorch vs onnxruntime, errors and timings in one table) is a loop over :func:`compare_outputs`,
:func:`time_session` and :func:`time_torch`, whose results (:class:`Comparison`, :class:`Timing`)
have ``as_dict()`` for table rows.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .export import _eval_mode, require


# ----------------------------------------------------------------------------------------------
# sessions


def session(model_or_path, optimize: bool = True, *, threads: int | None = None,
            providers: Sequence[str] | None = None):
    """An ``onnxruntime.InferenceSession`` on the CPU provider.

    ``model_or_path``: an ``onnx.ModelProto``, serialized bytes, or a path. ``optimize`` turns on
    all graph optimizations (``ORT_ENABLE_ALL``; off → ``ORT_DISABLE_ALL``). ``threads`` sets
    intra-op threads (default: onnxruntime's choice).
    """
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
    if isinstance(model_or_path, (bytes, bytearray)):
        src = bytes(model_or_path)
    elif isinstance(model_or_path, (str, os.PathLike)):
        src = os.fspath(model_or_path)
    elif hasattr(model_or_path, "SerializeToString"):
        src = model_or_path.SerializeToString()
    else:
        raise TypeError(
            "session() takes an onnx.ModelProto, serialized model bytes or a path; got "
            f"{type(model_or_path).__name__}"
        )
    return ort.InferenceSession(src, opts, providers=list(providers or ["CPUExecutionProvider"]))


def input_names(sess) -> list[str]:
    return [i.name for i in sess.get_inputs()]


def to_numpy(x) -> np.ndarray:
    """A torch tensor (any device; not bfloat16), numpy array or Python scalar → numpy."""
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bfloat16:
            raise TypeError(
                "numpy has no bfloat16: feed float32 (or export a float16/float32 model) to "
                "onnxruntime"
            )
        return x.detach().cpu().contiguous().numpy()
    return np.asarray(x)


def _tensor_leaves(obj) -> list:
    from torch.utils import _pytree

    return [
        leaf for leaf in _pytree.tree_leaves(obj)
        if isinstance(leaf, (torch.Tensor, np.ndarray))
    ]


def feeds(sess, inputs) -> dict[str, np.ndarray]:
    """The ``{name: array}`` feed for ``sess`` from a dict, or a (nested) list/tuple of tensors
    in the model's input order (``None`` and non-tensor leaves are skipped: the exporter bakes
    them into the graph)."""
    names = input_names(sess)
    if isinstance(inputs, Mapping):
        unknown = set(inputs) - set(names)
        missing = [n for n in names if n not in inputs]
        if unknown or missing:
            raise ValueError(
                f"the model's inputs are {names}; got {sorted(inputs)}"
                + (f" (unknown: {sorted(unknown)})" if unknown else "")
                + (f" (missing: {missing})" if missing else "")
            )
        return {n: to_numpy(inputs[n]) for n in names}
    leaves = _tensor_leaves(inputs if isinstance(inputs, (list, tuple)) else (inputs,))
    if len(leaves) != len(names):
        raise ValueError(
            f"the model takes {len(names)} inputs {names}, got {len(leaves)} tensors"
        )
    return {n: to_numpy(x) for n, x in zip(names, leaves)}


def run(sess, inputs) -> list[np.ndarray]:
    """Run ``sess`` on ``inputs`` (see :func:`feeds`) and return all outputs as numpy arrays."""
    return list(sess.run(None, feeds(sess, inputs)))


# ----------------------------------------------------------------------------------------------
# comparing


@dataclasses.dataclass(frozen=True)
class OutputError:
    index: int
    shape: tuple
    max_abs: float
    max_rel: float


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Errors of onnxruntime's outputs against PyTorch's (the reference)."""

    max_abs: float
    max_rel: float
    outputs: tuple[OutputError, ...]

    def within(self, atol: float = 1e-4, rtol: float | None = None) -> bool:
        """Every output's max abs error <= ``atol`` (or, with ``rtol``, its max rel error
        <= ``rtol``)."""
        return all(
            o.max_abs <= atol or (rtol is not None and o.max_rel <= rtol) for o in self.outputs
        )

    def as_dict(self) -> dict:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "n_outputs": len(self.outputs)}


def compare_outputs(torch_out, ort_out, *, rel_floor: float = 1e-6) -> Comparison:
    """Max absolute and relative error of ``ort_out`` against ``torch_out``.

    ``torch_out``: a tensor or a (nested) tuple/list/dict of tensors as the module returned it;
    ``ort_out``: the list :func:`run` returns (same order as the flattened tensors). The relative
    error is ``|ort - torch| / max(|torch|, rel_floor)``. NaN at the same position on both sides
    counts as equal; NaN on one side only counts as infinite error.
    """
    expected = [to_numpy(t) for t in _tensor_leaves(torch_out)]
    actual = [np.asarray(a) for a in (ort_out if isinstance(ort_out, (list, tuple)) else [ort_out])]
    if len(expected) != len(actual):
        raise ValueError(
            f"PyTorch returned {len(expected)} tensors, onnxruntime {len(actual)} outputs"
        )
    errors = []
    for i, (e, a) in enumerate(zip(expected, actual)):
        if e.shape != a.shape:
            raise ValueError(f"output {i}: PyTorch shape {e.shape} vs onnxruntime shape {a.shape}")
        e64 = e.astype(np.float64)
        a64 = a.astype(np.float64)
        both_nan = np.isnan(e64) & np.isnan(a64)
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(a64 - e64)
            same_inf = np.isinf(e64) & (a64 == e64)
        diff = np.where(both_nan | same_inf, 0.0, diff)
        diff = np.where(np.isnan(diff), np.inf, diff)
        rel = diff / np.maximum(np.abs(np.where(np.isfinite(e64), e64, 0.0)), rel_floor)
        errors.append(OutputError(
            index=i, shape=tuple(e.shape),
            max_abs=float(diff.max()) if diff.size else 0.0,
            max_rel=float(rel.max()) if rel.size else 0.0,
        ))
    return Comparison(
        max_abs=max((o.max_abs for o in errors), default=0.0),
        max_rel=max((o.max_rel for o in errors), default=0.0),
        outputs=tuple(errors),
    )


# ----------------------------------------------------------------------------------------------
# timing


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock times of repeated runs, in milliseconds."""

    median_ms: float
    min_ms: float
    mean_ms: float
    repeat: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_seconds(cls, times: Sequence[float]) -> "Timing":
        ms = [t * 1e3 for t in times]
        return cls(statistics.median(ms), min(ms), statistics.fmean(ms), len(ms))


def _time(fn: Callable[[], Any], warmup: int, repeat: int, sync: Callable[[], None] | None) -> Timing:
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    for _ in range(max(0, warmup)):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return Timing.from_seconds(times)


def time_session(sess, inputs, *, warmup: int = 3, repeat: int = 20) -> Timing:
    """Median (and min/mean) time of ``sess.run`` on ``inputs``; conversion to numpy is done
    once, outside the timed region."""
    feed = feeds(sess, inputs)
    return _time(lambda: sess.run(None, feed), warmup, repeat, None)


def time_torch(fn, args=(), kwargs: Mapping[str, Any] | None = None, *, warmup: int = 3,
               repeat: int = 20) -> Timing:
    """Median (and min/mean) time of ``fn(*args, **kwargs)`` under ``torch.inference_mode``
    (a module is put in eval mode for the measurement and restored after). CUDA work is
    synchronized inside the timed region."""
    args = tuple(args) if isinstance(args, (list, tuple)) else (args,)
    kwargs = dict(kwargs or {})
    uses_cuda = any(
        isinstance(t, torch.Tensor) and t.is_cuda for t in _tensor_leaves((args, kwargs))
    )
    sync = torch.cuda.synchronize if uses_cuda else None
    with _eval_mode(fn), torch.inference_mode():
        return _time(lambda: fn(*args, **kwargs), warmup, repeat, sync)


__all__ = [
    "Comparison",
    "OutputError",
    "Timing",
    "compare_outputs",
    "feeds",
    "input_names",
    "run",
    "session",
    "time_session",
    "time_torch",
    "to_numpy",
]
