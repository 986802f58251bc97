"""ONNX export of models with swapped attention, and onnxruntime helpers.

    proto, report = attnswap.onnx.export(model, example_inputs, "model.onnx", attention="relu",
                                         dynamic_shapes={"input_ids": {0: "batch", 1: "seq"}})
    attnswap.onnx.compare(model, example_inputs, attention="sigmoid")   # table vs the original

``export`` also takes a model returned by ``attnswap.convert`` (exported as converted, SAS
parameters included). Lower level: ``export_module`` for a module that calls
``attnswap.attention`` itself.

Needs the ``onnx`` extra (``pip install "attnswap[onnx]"``); importing this package does not,
the functions raise :class:`MissingOnnxDependencyError` (an ImportError) when it is missing.

    from attnswap import onnx as aonnx
    ds = aonnx.dynamic_shapes(model, (x,), axes={"x": {0: "batch", 1: "seq"}})
    proto = aonnx.export_module(model, (x,), path="model.onnx", dynamic_shapes=ds)
    sess = aonnx.session(proto)
    err = aonnx.compare_outputs(model(x), aonnx.run(sess, [x]))
"""

from .export import (
    DEFAULT_OPSET,
    MissingOnnxDependencyError,
    attention_sites,
    dynamic_shapes,
    export_module,
    export_program,
    save,
    translation_table,
)
from .model_export import compare, export, rewrite_for_export
from .runtime import (
    Comparison,
    OutputError,
    Timing,
    compare_outputs,
    feeds,
    input_names,
    run,
    session,
    time_session,
    time_torch,
    to_numpy,
)
from .translation import (
    ATTENTION_OP_OPSET,
    MIN_OPSET,
    TranslationError,
    attnswap_attention,
    make_translation,
)

__all__ = [
    "compare",
    "export",
    "rewrite_for_export",
    "ATTENTION_OP_OPSET",
    "Comparison",
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "MissingOnnxDependencyError",
    "OutputError",
    "Timing",
    "TranslationError",
    "attention_sites",
    "attnswap_attention",
    "compare_outputs",
    "dynamic_shapes",
    "export_module",
    "export_program",
    "feeds",
    "input_names",
    "make_translation",
    "run",
    "save",
    "session",
    "time_session",
    "time_torch",
    "to_numpy",
    "translation_table",
]
