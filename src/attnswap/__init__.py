"""attnswap: swap any PyTorch model's softmax attention for sigmoid, ReLU or SAS attention.

    model = attnswap.convert(model, attention="sigmoid")     # same class, same call signature
    print(model.attnswap_report)                              # what was found, changed, left alone
"""

from .kernels.op import attention, call_counts, reset_call_counts, total_calls
from .passes.retarget import RetargetSpec as AttentionSpec
from .rewriter.backend import AttentionSwapWarning, AttnswapError, attnswap_backend
from .rewriter.convert import ExampleInputs, convert, report_of, unconvert
from .rewriter.persistence import from_pretrained
from .rewriter.report import ConversionReport

__version__ = "0.1.0"

__all__ = [
    "convert", "unconvert", "from_pretrained", "report_of", "ExampleInputs", "ConversionReport",
    "AttentionSpec", "AttentionSwapWarning", "AttnswapError", "attention", "attnswap_backend",
    "call_counts", "reset_call_counts", "total_calls", "__version__",
]
