"""Per-call overhead of ``attnswap::attention`` on CPU: what one call costs beyond the math.

At a tiny shape (default B=1, H=2, T=16, D=16: the math is a few microseconds) it times, in the
same process and interleaved, forward and forward+backward of

* ``sdpa``: ``F.scaled_dot_product_attention`` (the baseline);
* ``op``: ``attnswap.attention(..., impl="cpu")``: validation, the custom op's dispatch, the
  autograd node, the tiled kernel's set-up;
* ``kernel``: ``attnswap.kernels.cpu.forward`` / ``backward`` called directly (no op, no autograd);

and prints microseconds per call and the op's overhead over SDPA. Usage::

    python bench/cpu_op_overhead.py [--T 16] [--kinds softmax,sigmoid,relu] [--calls 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import attnswap
from attnswap.kernels import cpu
from attnswap.kernels.params import AttentionParams


def per_call(fn, calls):
    for _ in range(min(100, calls)):
        fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=2)
    ap.add_argument("--T", type=int, default=16)
    ap.add_argument("--D", type=int, default=16)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--kinds", default="softmax,sigmoid,relu")
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(args.B, args.H, args.T, args.D, generator=g).requires_grad_(True)
               for _ in range(3))
    go = torch.randn(args.B, args.H, args.T, args.D, generator=g)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; B={args.B} H={args.H} "
          f"T={args.T} D={args.D} fp32; median of {args.rounds} rounds of {args.calls} calls; "
          "microseconds per call")

    def fwd_bwd(f):
        return lambda: torch.autograd.grad(f(), (q, k, v), go)

    sdpa = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    print(f"{'kind':8} {'':9} {'sdpa':>8} {'op':>8} {'kernel':>8} {'op - sdpa':>10}")
    for kind in args.kinds.split(","):
        op = lambda: attnswap.attention(q, k, v, kind=kind, impl="cpu")  # noqa: E731
        p = AttentionParams(kind, args.D ** -0.5)
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        out = cpu.forward(qd, kd, vd, None, p)
        kern_f = lambda: cpu.forward(qd, kd, vd, None, p)  # noqa: E731
        kern_fb = lambda: (cpu.forward(qd, kd, vd, None, p),  # noqa: E731
                           cpu.backward(go, qd, kd, vd, None, out, p, False))
        for label, cands in (("fwd", (sdpa, op, kern_f)),
                             ("fwd+bwd", (fwd_bwd(sdpa), fwd_bwd(op), kern_fb))):
            res = [[] for _ in cands]
            with torch.no_grad() if label == "fwd" else torch.enable_grad():
                for _ in range(args.rounds):
                    for i, f in enumerate(cands):
                        res[i].append(per_call(f, args.calls))
            s, o, kk = (statistics.median(r) for r in res)
            print(f"{kind:8} {label:9} {s:8.1f} {o:8.1f} {kk:8.1f} {o - s:+10.1f}", flush=True)


if __name__ == "__main__":
    main()
