"""Compile the Triton kernels for a GPU that is not there, through the real launch path, and read
what the compiler emitted: registers, spills, shared memory and MUFU ops per score.

``with compile_only(arch=90):`` makes :func:`.fwd.forward` and :func:`.bwd.backward` do everything
a launch does (argument preparation, Triton's specialization of every argument, the autotuner's
pruning for the device) but, at the point of the launch, compile every surviving autotune config
(``Autotuner.warmup``) instead of running one. A stand-in driver answers Triton's three questions
about the device (which device, which stream, which target); nothing else of the CUDA driver is
needed to compile, so this runs on any machine with ``ptxas`` (Triton ships it). It must run in a
process where ``TRITON_INTERPRET`` is unset (the kernels are then real ``JITFunction`` objects):
``python -m attnswap.kernels.triton.compile_check`` prints one JSON line per compiled kernel.

What is read, per compiled kernel:

* registers and spill bytes: ``ptxas -v`` on the emitted PTX, with Triton's own flags;
* shared memory: the compiler's ``metadata.shared``;
* MUFU ops (the SFU: ``ex2``, ``rcp``, ``tanh``, ``lg2``, ...) in the SASS (``cuobjdump``), divided by
  the score elements one thread computes per loop body times the number of loop bodies: MUFU ops
  per score. The budget on Hopper is one (the MUFU unit is ~16x slower per element than the FMA
  pipe, and a 128x128 score tile has to go through it once per step).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

import torch

from . import autotune, common

HOPPER_SMEM = 232_448  # H100/H200: shared_memory_per_block_optin

# Loop bodies per kernel: each loop inlines its block function once (fwd.py/bwd.py: interior and
# boundary key blocks; dK/dV: boundary, interior, boundary query blocks).
LOOP_BODIES = {"_attn_fwd": 2, "_attn_bwd_dq": 2, "_attn_bwd_dkdv": 3}


class _TargetOnlyDriver:
    """What ``JITFunction.run(warmup=True)`` asks the driver; no CUDA context is created."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True


@dataclass
class Compiled:
    kernel: str
    config: dict
    kind: int
    regs: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    shared: int = -1
    mufu: dict = field(default_factory=dict)
    scores_per_thread: int = 0
    mufu_per_score: float = -1.0


_collected: list | None = None


def collecting() -> bool:
    return _collected is not None


def launch(kernel, grid, *args, **kwargs):
    """Launch ``kernel`` on ``grid``; under :func:`compile_only`, compile its configs instead."""
    if _collected is None:
        kernel[grid](*args, **kwargs)
        return
    compiled = kernel.warmup(*args, grid=grid, **kwargs)
    _collected.extend((kernel.fn.__name__, kwargs.get("KIND"), c) for c in compiled)


@contextlib.contextmanager
def compile_only(arch: int = 90, smem: int = HOPPER_SMEM):
    global _collected
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    if common.INTERPRET:
        raise RuntimeError("compile_only needs TRITON_INTERPRET unset when attnswap is imported")
    previous = driver._active
    driver.set_active(_TargetOnlyDriver(GPUTarget("cuda", arch, 32)))
    autotune.DEVICE_OVERRIDE = ((arch // 10, arch % 10), smem)
    _collected = []
    try:
        yield _collected
    finally:
        _collected = None
        autotune.DEVICE_OVERRIDE = None
        driver._active = previous


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    from triton import knobs

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        r = subprocess.run([knobs.nvidia.ptxas.path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                            f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.o")],
                           capture_output=True, text=True, check=True)
    log = r.stderr + r.stdout
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    st = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    ld = int(re.search(r"(\d+) bytes spill loads", log).group(1))
    return regs, st, ld


def analyse(name: str, kind, ck, arch: int = 90) -> Compiled:
    from triton.tools.disasm import get_sass

    md = ck.metadata
    cfg = dict(num_warps=md.num_warps, num_stages=md.num_stages)
    out = Compiled(kernel=name, config=cfg, kind=kind)
    out.regs, out.spill_stores, out.spill_loads = _ptxas_usage(ck.asm["ptx"], arch)
    out.shared = int(md.shared)
    with contextlib.redirect_stderr(open(os.devnull, "w")):
        sass = get_sass(ck.asm["cubin"])
    ops = re.findall(r"\bMUFU\.(\w+)", sass)
    out.mufu = {op: ops.count(op) for op in sorted(set(ops))}
    bm, bn = _block(ck)
    cfg.update(BLOCK_M=bm, BLOCK_N=bn)
    out.scores_per_thread = bm * bn // (32 * md.num_warps)
    out.mufu_per_score = len(ops) / (LOOP_BODIES[name] * out.scores_per_thread)
    return out


def _block(ck):
    """BLOCK_M / BLOCK_N: constexprs of the compiled specialization (keyed by argument index)."""
    names = ck.src.fn.arg_names
    vals = {}
    for key, v in ck.src.constants.items():
        idx = key[0] if isinstance(key, tuple) else key
        if isinstance(idx, int):
            vals[names[idx]] = v
        else:
            vals[idx] = v
    return int(vals["BLOCK_M"]), int(vals["BLOCK_N"])


# ---------------------------------------------------------------------------------------------
# the cases the check compiles

def cases():
    """(label, kind, dtype, head dim, causal, mask kind, op kwargs): every kind, the mask kinds
    that change the kernels' shared-memory use, the head dims the benchmarks run."""
    out = []
    for D in (64, 128):
        out.append((f"sigmoid-causal-bool-hd{D}", "sigmoid", torch.bfloat16, D, True, "bool", {}))
    out += [
        ("sigmoid-hd128", "sigmoid", torch.bfloat16, 128, False, None, {}),
        ("sigmoid-fast-hd128", "sigmoid", torch.bfloat16, 128, False, None, {"fast_sigmoid": True}),
        ("relu-visible-fp16-hd128", "relu", torch.float16, 128, True, "float",
         {"activation": "relu2", "length": "visible"}),
        ("softmax-hd128", "softmax", torch.bfloat16, 128, True, None, {}),
        ("sigmoid-atomic-dq-hd128", "sigmoid", torch.bfloat16, 128, True, None, {"_dq": "atomic"}),
    ]
    return out


def run_case(kind, dtype, D, causal, mask_kind, kw, T=256, analyse_fn=analyse):
    from ..op import _mask4d
    from ..params import AttentionParams, encode_length
    from . import bwd, fwd

    q = torch.randn(1, 2, T, D).to(dtype)
    k = torch.randn(1, 2, T, D).to(dtype)
    v = torch.randn(1, 2, T, D).to(dtype)
    mask = None
    if mask_kind == "bool":
        mask = torch.ones(1, 1, T, T, dtype=torch.bool)
    elif mask_kind == "float":
        mask = torch.zeros(1, 1, T, T, dtype=dtype)
    kw = dict(kw)
    dq_mode = kw.pop("_dq", None)
    length = encode_length(kw.pop("length", None))
    p = AttentionParams(kind=kind, scale=D ** -0.5, is_causal=causal, length=length, **kw)
    saved = os.environ.get(bwd.ENV_DQ)
    if dq_mode:
        os.environ[bwd.ENV_DQ] = dq_mode
    try:
        with compile_only() as got:
            fwd.forward(q, k, v, _mask4d(mask), p)
            bwd.backward(q, q, k, v, _mask4d(mask), q, p, need_mask_grad=mask_kind == "float")
    finally:
        if dq_mode:
            os.environ.pop(bwd.ENV_DQ) if saved is None else os.environ.__setitem__(bwd.ENV_DQ, saved)
    return [analyse_fn(name, kd, ck) for name, kd, ck in got]


def main(argv=None) -> int:
    """``python -m attnswap.kernels.triton.compile_check [LABEL ...]``: one JSON line per
    compiled kernel and config, for the named cases (default: all of :func:`cases`)."""
    argv = sys.argv[1:] if argv is None else argv
    os.environ.pop("TRITON_INTERPRET", None)
    for label, kind, dtype, D, causal, mk, kw in cases():
        if argv and label not in argv:
            continue
        for c in run_case(kind, dtype, D, causal, mk, kw):
            print(json.dumps({"case": label, **asdict(c)}), flush=True)
    return 0


if __name__ == "__main__":
    # run the package's module, not this __main__ copy (its module state is what launch() reads)
    from attnswap.kernels.triton import compile_check as _self

    sys.exit(_self.main())
