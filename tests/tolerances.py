"""Per-dtype tolerances, stated once. Kernels compute in fp32 whatever the input dtype, so the
error is dominated by rounding the inputs/outputs to the storage dtype."""

import torch

# (atol, rtol) for outputs and gradients compared against kernels/reference.py (fp32 reference
# computed from the same low-precision inputs).
TOL = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual, expected, dtype=None, msg=""):
    dtype = dtype or expected.dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.float() if dtype != torch.float64 else actual,
                               expected.float() if dtype != torch.float64 else expected,
                               atol=atol, rtol=rtol, msg=msg or None)
