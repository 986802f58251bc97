"""attnswap: swap any PyTorch model's softmax attention for sigmoid, ReLU or SAS attention."""

from .kernels.op import attention, call_counts, reset_call_counts, total_calls

__version__ = "0.1.0"

__all__ = ["attention", "call_counts", "reset_call_counts", "total_calls", "__version__"]
