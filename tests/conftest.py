"""Suite-wide set-up. Owned by the maintainers: put fixtures for one concern in that test file."""

import os

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before any
# attnswap.kernels.triton module is imported. Without a GPU the interpreter is the only way the
# Triton kernels can run, and the suite runs them that way.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile("dev", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
