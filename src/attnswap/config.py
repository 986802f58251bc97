"""Every environment flag attnswap reads, in one place (read when asked, so tests can set them).

| variable | default | effect |
|---|---|---|
| ``ATTNSWAP_IMPL`` | ``auto`` | the op's kernel when a site does not pin ``impl=`` (auto, reference, cpu, triton, sdpa) |
| ``ATTNSWAP_CPU_BLOCK`` | (sized per call) | the CPU kernel's tile edge |
| ``ATTNSWAP_CPU_THREADS`` | torch's thread count | the CPU kernels' worker threads |
| ``ATTNSWAP_CPU_FUSED`` | ``1`` | sigmoid/ReLU on CPU run the fused C++ kernel where it supports the call (``0``: always the tiled torch kernel) |
| ``ATTNSWAP_CACHE_DIR`` | ``~/.cache/attnswap`` | where the fused CPU kernel is built, once per machine and source |
| ``CXX`` | ``g++`` | the compiler that builds it |
| ``ATTNSWAP_TANH_APPROX`` | ``1`` | Triton's ``fast_sigmoid`` uses ``tanh.approx.f32`` inline asm on GPUs |
| ``TRITON_INTERPRET`` | ``0`` | run the Triton kernels on the CPU in Triton's interpreter (must be set before import) |
| ``TORCHDYNAMO_DISABLE`` | ``0`` | PyTorch's own switch: regions then run their original code, and attnswap says so |
"""

from __future__ import annotations

import os

_TRUE = ("1", "true", "on", "yes")


def env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_flag(name: str, default: bool = False) -> bool:
    v = env(name)
    return default if not v else v.lower() in _TRUE


def impl_default() -> str:
    return env("ATTNSWAP_IMPL", "auto") or "auto"


def triton_interpret() -> bool:
    return env_flag("TRITON_INTERPRET")


def dynamo_disabled_by_env() -> bool:
    return env_flag("TORCHDYNAMO_DISABLE")
