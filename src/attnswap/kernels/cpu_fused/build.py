"""Build ``attention.cpp`` once per machine and load it with ctypes.

The library is plain C++ with a C ABI (no torch headers), so it compiles in about a second with
the system's ``g++`` (``$CXX``). It links the ``sgemm_`` that ``libtorch_cpu`` exports (MKL on
x86-64) and the ``libgomp`` torch ships, so the process keeps one BLAS and one OpenMP runtime.

The build is keyed by a hash of the source, the compiler command, torch's version and the CPU's
instruction-set flags (``-march=native``), and cached under ``$ATTNSWAP_CACHE_DIR`` (default
``~/.cache/attnswap``). Concurrent builds (pytest-xdist workers) each write a private temporary
file and rename it into place: the last rename wins, every one of them is complete.

Nothing here falls back silently: :func:`load` returns the library or raises
:class:`FusedBuildError` with the compiler's own message; ``__init__.py`` turns that into one
warning per process and counts every call that took the tiled kernel instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("attention.cpp")
ABI_VERSION = 2
ENV_CACHE = "ATTNSWAP_CACHE_DIR"
ENV_CXX = "CXX"


class FusedBuildError(RuntimeError):
    """The fused CPU kernel could not be built or loaded on this machine."""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _torch_lib() -> Path:
    return Path(torch.__file__).parent / "lib"


def _command(cxx: str, src: Path, out: Path) -> list[str]:
    lib = _torch_lib()
    return [*shlex.split(cxx), "-O3", "-march=native", "-std=c++17", "-fPIC", "-shared",
            "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast", str(src), "-o", str(out),
            f"-L{lib}", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]


def _cache_dir() -> Path:
    d = os.environ.get(ENV_CACHE, "").strip()
    return Path(d) if d else Path.home() / ".cache" / "attnswap"


def library_path() -> Path:
    cxx = os.environ.get(ENV_CXX, "").strip() or "g++"
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(_command(cxx, Path("s"), Path("o"))).encode(),
                 torch.__version__.encode(), _cpu_flags().encode(), platform.machine().encode()):
        key.update(part)
        key.update(b"\0")
    return _cache_dir() / f"attnswap_cpu_fused_{key.hexdigest()[:16]}.so"


def _build(target: Path) -> None:
    cxx = os.environ.get(ENV_CXX, "").strip() or "g++"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = _command(cxx, SOURCE, Path(tmp))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        os.unlink(tmp)
        raise FusedBuildError(f"could not run the C++ compiler {cxx!r} ({e}); install g++ or "
                              f"set {ENV_CXX}") from None
    if res.returncode != 0:
        os.unlink(tmp)
        tail = (res.stderr or res.stdout).strip().splitlines()[-6:]
        raise FusedBuildError(f"{shlex.join(cmd)} failed: " + " | ".join(tail))
    os.replace(tmp, target)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    if lib.attnswap_abi_version() != ABI_VERSION:
        raise FusedBuildError("the cached fused kernel has another ABI version; delete "
                              f"{_cache_dir()} and retry")
    vp, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.attnswap_forward.argtypes = [vp, vp, vp]
    lib.attnswap_forward.restype = None
    lib.attnswap_backward.argtypes = [vp, vp, vp, vp, vp, vp, vp, vp, vp]
    lib.attnswap_backward.restype = None
    lib.attnswap_classify_mask.argtypes = [vp, i32, i64, i64, i64, i64, vp, f32, i32, i32, vp, i32]
    lib.attnswap_classify_mask.restype = None
    return lib


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: FusedBuildError | None = None


def load() -> ctypes.CDLL:
    """The loaded library (built on first use); :class:`FusedBuildError` if that fails. The
    outcome is remembered for the process: a failed build is not retried on every call."""
    global _lib, _error
    if _lib is not None:
        return _lib
    if _error is not None:
        raise _error
    with _lock:
        if _lib is None and _error is None:
            try:
                path = library_path()
                if not path.exists():
                    _build(path)
                _lib = _bind(ctypes.CDLL(str(path)))
            except FusedBuildError as e:
                _error = e
            except OSError as e:  # an unwritable cache, a corrupt file, a missing symbol...
                _error = FusedBuildError(f"could not build or load {library_path()}: {e} "
                                         f"(set {ENV_CACHE} to a writable folder)")
    if _error is not None:
        raise _error
    return _lib


__all__ = ["FusedBuildError", "load", "library_path", "SOURCE"]
