"""CPU attention benchmark: the CPU kernels (sigmoid, ReLU) against SDPA and the reference.

For each sequence length T (B=1, H=8, D=64, fp32 by default), non-causal and causal, it measures
forward+backward wall time of

* ``sdpa``: ``F.scaled_dot_product_attention`` (softmax), the baseline, in the same run;
* ``sigmoid`` / ``relu``: ``attnswap.attention(..., impl="cpu")`` (what users get on CPU: the
  fused C++ kernel, ``kernels/cpu_fused``; the run checks that it, not the tiled one, ran);
* ``tiled-sigmoid`` / ``tiled-relu`` (``--tiled``): the same call with ``ATTNSWAP_CPU_FUSED=0``,
  the tiled torch kernel (``kernels/cpu.py``);
* ``ref-sigmoid`` / ``ref-relu``: ``attention_reference`` through autograd (materializes T×T);

and prints the ratios (wall time, and process CPU time alongside). Everything is warmed up once
on a small problem; then the implementations are interleaved within each round (so a burst of
load from another process hits all of them) and each one's best round is reported.

Peak memory is the peak resident set size (``VmHWM``) of a fresh worker process over one
forward+backward, minus its resident size just before (inputs already allocated): the worker
resets the high-water mark through ``/proc/self/clear_refs`` before each implementation, calls
``malloc_trim`` between implementations, and runs with ``MALLOC_MMAP_THRESHOLD_`` pinned so that
large blocks go straight back to the OS. This counts every allocation (torch, MKL workspaces,
the allocator's own slack) without tracing, and does not slow the run down. Linux only.

Usage::

    python bench/cpu_attention.py                      # T = 512 … 8192: 2–6 min on 2 cores
    python bench/cpu_attention.py --T 1024,2048 --repeats 5 --no-memory
    python bench/cpu_attention.py --threads 1 --markdown /tmp/cpu_bench.md
    python bench/cpu_attention.py --threads 1 --T 512,1024,2048 --no-memory --tiled
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import attnswap
from attnswap.kernels import cpu_fused
from attnswap.kernels.reference import attention_reference

KINDS = ("sigmoid", "relu")


# ----------------------------------------------------------------------------------------------
# the functions timed


def make_inputs(T, B, H, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(dtype).requires_grad_(True)
               for _ in range(3))
    go = torch.randn(B, H, T, D, generator=g).to(dtype)
    return q, k, v, go


def impl_fn(name: str, causal: bool):
    """A callable (q, k, v) -> out for one implementation."""
    if name == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if name.startswith("ref-"):
        kind = name[4:]
        return lambda q, k, v: attention_reference(q, k, v, kind=kind, is_causal=causal)
    if name.startswith("direct-"):  # the kernel module without the op around it
        from attnswap.kernels import cpu
        from attnswap.kernels.params import AttentionParams

        kind = name[7:]

        class _Direct(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v):
                p = AttentionParams(kind, 1.0 / q.shape[-1] ** 0.5, causal)
                out = cpu.forward(q, k, v, None, p)
                ctx.save_for_backward(q, k, v, out)
                ctx.p = p
                return out

            @staticmethod
            def backward(ctx, go):
                q, k, v, out = ctx.saved_tensors
                dq, dk, dv, _ = cpu.backward(go, q, k, v, None, out, ctx.p, False)
                return dq, dk, dv

        return _Direct.apply
    kind = name[6:] if name.startswith("tiled-") else name
    return lambda q, k, v: attnswap.attention(q, k, v, kind=kind, is_causal=causal, impl="cpu")


def fwd_bwd(fn, q, k, v, go, name=""):
    for t in (q, k, v):
        t.grad = None
    tiled = name.startswith("tiled-")
    if tiled:
        os.environ[cpu_fused.ENV_FUSED] = "0"
    try:
        out = fn(q, k, v)
        out.backward(go)
    finally:
        if tiled:
            os.environ.pop(cpu_fused.ENV_FUSED, None)


def repeats_for(T: int, args) -> int:
    if args.repeats:
        return args.repeats
    return 7 if T <= 1024 else 5 if T <= 2048 else 3


def warm_up(names, args):
    """One small run of everything: lazy imports, the kernel's thread pool, MKL/OpenMP set-up."""
    q, k, v, go = make_inputs(512, args.B, args.H, args.D, args.dtype)
    for causal in (False, True):
        for n in names:
            fwd_bwd(impl_fn(n, causal), q, k, v, go, n)


def time_all(names, T, causal, args):
    """Best-of-N forward+backward (wall seconds, process CPU seconds) per implementation.

    The implementations are interleaved within each round, so that load from other processes
    hits all of them alike; every allocation is fresh in each run (torch's CPU allocator does not
    cache), so the first run at a new size is not special and is counted.
    """
    q, k, v, go = make_inputs(T, args.B, args.H, args.D, args.dtype)
    fns = {n: impl_fn(n, causal) for n in names}
    best = {n: (float("inf"), float("inf")) for n in names}
    for _ in range(repeats_for(T, args)):
        for n in names:
            t0, c0 = time.perf_counter(), time.process_time()
            fwd_bwd(fns[n], q, k, v, go, n)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            best[n] = (min(best[n][0], dt), min(best[n][1], dc))
    return best


# ----------------------------------------------------------------------------------------------
# memory, in a fresh worker process


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass


def memory_worker(spec: dict) -> dict:
    """Runs in the worker: peak RSS increase of one forward+backward per implementation."""
    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    # Warm every implementation up on a small problem first: one-time costs (the kernel's thread
    # pool, per-thread MKL/OpenMP buffers, lazy imports) are not per-call peak memory.
    for name in spec["names"]:
        q, k, v, go = make_inputs(512, spec["B"], spec["H"], spec["D"], dtype)
        fwd_bwd(impl_fn(name, spec["causal"]), q, k, v, go)
    del q, k, v, go
    _trim()
    result = {}
    for name in spec["names"]:
        q, k, v, go = make_inputs(spec["T"], spec["B"], spec["H"], spec["D"], dtype)
        fn = impl_fn(name, spec["causal"])
        _trim()
        base = _status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        fwd_bwd(fn, q, k, v, go)
        result[name] = _status_bytes("VmHWM") - base
        del q, k, v, go, fn
        _trim()
    return result


def measure_memory(names, T, causal, args) -> dict:
    spec = dict(names=list(names), T=T, causal=causal, B=args.B, H=args.H, D=args.D,
                dtype=str(args.dtype).replace("torch.", ""), threads=torch.get_num_threads())
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20), MALLOC_TRIM_THRESHOLD_=str(1 << 20))
    proc = subprocess.run([sys.executable, __file__, "--_memory-worker", json.dumps(spec)],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# the report


def fmt_s(x):
    if x is None:
        return "—"
    return f"{x * 1e3:.0f} ms" if x < 10 else f"{x:.1f} s"


def fmt_mb(x):
    return "—" if x is None else f"{x / 2**20:,.0f}"


def fmt_ratio(a, b):
    return "—" if a is None or b is None or b <= 0 else f"{a / b:.2f}×"


def machine_line(args) -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; B={args.B} H={args.H} D={args.D} "
            f"{str(args.dtype).replace('torch.', '')}; best of "
            f"{args.repeats or '7/5/3 (T ≤ 1024 / 2048 / more)'} runs after a warm-up; "
            f"1-min load average at start {load:.1f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", default="512,1024,2048,4096,8192",
                    help="comma-separated sequence lengths")
    ap.add_argument("--repeats", type=int, default=0,
                    help="timed runs per implementation (default: 7 up to T=1024, 5 at 2048, "
                         "3 above)")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    ap.add_argument("--causal", default="both", choices=["both", "yes", "no"])
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--ref-time-max-T", type=int, default=2048,
                    help="time the materialized reference up to this T (it is slow)")
    ap.add_argument("--mem-T", default="8192",
                    help="lengths whose peak memory is measured (subprocess per length/causal)")
    ap.add_argument("--mem-causal", action="store_true",
                    help="also measure memory for causal (default: non-causal only)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--direct", action="store_true",
                    help="also time the kernel module directly, without the custom op")
    ap.add_argument("--tiled", action="store_true",
                    help="also time the tiled torch kernel (ATTNSWAP_CPU_FUSED=0)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--markdown", default=None, help="also write the tables as markdown here")
    ap.add_argument("--_memory-worker", dest="memory_worker", default=None,
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.memory_worker is not None:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return

    from rich.console import Console
    from rich.table import Table

    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = getattr(torch, args.dtype)
    Ts = [int(t) for t in args.T.split(",") if t]
    kinds = [k for k in args.kinds.split(",") if k]
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    mem_Ts = [] if args.no_memory else [int(t) for t in args.mem_T.split(",") if t]
    console = Console(width=max(110, Console().width))
    header = machine_line(args)
    console.print(header)

    time_rows, mem_rows = [], []
    t_start = time.perf_counter()
    all_names = ["sdpa"] + kinds + [f"ref-{k}" for k in kinds]
    if args.direct:
        all_names += [f"direct-{k}" for k in kinds]
    if args.tiled:
        all_names += [f"tiled-{k}" for k in kinds]
    warm_up(all_names, args)
    cpu_fused.path_counts.clear()
    for T in Ts:
        for causal in causals:
            names = ["sdpa"] + kinds
            if args.direct:
                names += [f"direct-{k}" for k in kinds]
            if args.tiled:
                names += [f"tiled-{k}" for k in kinds]
            if T <= args.ref_time_max_T:
                names += [f"ref-{k}" for k in kinds]
            best = time_all(names, T, causal, args)
            time_rows.append((T, causal, best))
            console.print(f"  timed T={T} causal={causal} "
                          f"({time.perf_counter() - t_start:.0f} s elapsed)")
    for T in mem_Ts:
        for causal in ([False, True] if args.mem_causal else [False]):
            names = ["sdpa"] + kinds + [f"ref-{k}" for k in kinds]
            mem_rows.append((T, causal, measure_memory(names, T, causal, args)))
            console.print(f"  memory T={T} causal={causal} "
                          f"({time.perf_counter() - t_start:.0f} s elapsed)")

    # time table: one row per (T, causal, kind)
    tt = Table(title="forward+backward, best of runs: wall time (and process CPU time); "
                     "ratios < 1 mean faster")
    cols = ["T", "causal", "kind", "SDPA", "cpu kernel", "cpu / SDPA", "(CPU time)"]
    if args.direct:
        cols += ["direct / SDPA"]
    if args.tiled:
        cols += ["tiled / SDPA"]
    cols += ["reference", "cpu / reference"]
    for c in cols:
        tt.add_column(c, justify="right")
    md_time = []
    for T, causal, best in time_rows:
        sd = best["sdpa"]
        for k in kinds:
            ref = best.get(f"ref-{k}", (None, None))
            row = [str(T), "yes" if causal else "no", k, fmt_s(sd[0]), fmt_s(best[k][0]),
                   fmt_ratio(best[k][0], sd[0]), fmt_ratio(best[k][1], sd[1])]
            if args.direct:
                row += [fmt_ratio(best[f"direct-{k}"][0], sd[0])]
            if args.tiled:
                row += [fmt_ratio(best[f"tiled-{k}"][0], sd[0])]
            row += [fmt_s(ref[0]), fmt_ratio(best[k][0], ref[0])]
            tt.add_row(*row)
            md_time.append(row)
    console.print(tt)
    paths = ", ".join(f"{p} {n}: {c}" for (p, n), c in sorted(cpu_fused.path_counts.items()))
    console.print(f"CPU kernel paths that ran (timed runs): {paths}")

    md_mem = []
    if mem_rows:
        mt = Table(title="peak memory of one forward+backward: MiB of peak RSS above the inputs")
        mcols = ["T", "causal", "kind", "SDPA", "cpu kernel", "reference", "cpu / reference"]
        for c in mcols:
            mt.add_column(c, justify="right")
        for T, causal, mem in mem_rows:
            for k in kinds:
                row = [str(T), "yes" if causal else "no", k, fmt_mb(mem["sdpa"]), fmt_mb(mem[k]),
                       fmt_mb(mem[f"ref-{k}"]), fmt_ratio(mem[k], mem[f"ref-{k}"])]
                mt.add_row(*row)
                md_mem.append(row)
        console.print(mt)
    console.print(f"total {time.perf_counter() - t_start:.0f} s; "
                  f"1-min load average at end {os.getloadavg()[0]:.1f}")

    if args.markdown:
        def md(cols, rows):
            out = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
            out += ["| " + " | ".join(r) + " |" for r in rows]
            return "\n".join(out)

        text = [header, "", md(cols, md_time)]
        if md_mem:
            text += ["", md(mcols, md_mem)]
        with open(args.markdown, "w") as f:
            f.write("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
