"""A causal mask *tensor* vs ``is_causal=True`` on the CPU kernel (fwd+bwd), Llama-layer-shaped.

A converted HF Llama (and most decoder models) builds its causal mask outside the attention
module, so the op receives it as a ``[B, 1, T, T]`` tensor (bool from the SDPA mask builder,
finfo.min float from the eager one) instead of ``is_causal=True``. The CPU kernel classifies the
mask's tiles once per call (hidden: skipped; fully visible with zero bias: no mask work) so that
this costs about what ``is_causal`` costs. Same process, interleaved rounds, medians.

Usage::

    python bench/cpu_mask_tiles.py                    # T=2048, Hq=8, Hkv=2, D=64: ~1-2 min
    python bench/cpu_mask_tiles.py --T 1024 --rounds 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import attnswap


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--Hq", type=int, default=8)
    ap.add_argument("--Hkv", type=int, default=2)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--kinds", default="sigmoid,relu,softmax")
    args = ap.parse_args(argv)
    B, Hq, Hkv, T, D = args.B, args.Hq, args.Hkv, args.T, args.D
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, T, D, generator=g).requires_grad_(True)
    k = torch.randn(B, Hkv, T, D, generator=g).requires_grad_(True)
    v = torch.randn(B, Hkv, T, D, generator=g).requires_grad_(True)
    go = torch.randn(B, Hq, T, D, generator=g)
    vis = torch.ones(T, T, dtype=torch.bool).tril().expand(B, 1, T, T)
    masks = {"bool mask": vis, "float mask": torch.zeros(B, 1, T, T).masked_fill(
        ~vis, torch.finfo(torch.float32).min)}
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; B={B} Hq={Hq} Hkv={Hkv} T={T} D={D} fp32, "
          f"fwd+bwd, median of {args.rounds} interleaved rounds")

    def run(kind, mask, causal):
        out = attnswap.attention(q, k, v, mask, kind=kind, is_causal=causal, impl="cpu")
        torch.autograd.grad(out, (q, k, v), go)

    print(f"{'kind':8} {'is_causal':>10} {'bool mask':>10} {'ratio':>6} {'float mask':>11} {'ratio':>6}")
    for kind in args.kinds.split(","):
        variants = {"is_causal": (None, True), **{n: (m, False) for n, m in masks.items()}}
        for m, c in variants.values():  # warm-up
            run(kind, m, c)
        times = {n: [] for n in variants}
        for _ in range(args.rounds):
            for n, (m, c) in variants.items():
                t0 = time.perf_counter()
                run(kind, m, c)
                times[n].append(time.perf_counter() - t0)
        med = {n: statistics.median(t) for n, t in times.items()}
        base = med["is_causal"]
        print(f"{kind:8} {base * 1e3:8.1f}ms {med['bool mask'] * 1e3:8.1f}ms "
              f"{med['bool mask'] / base:5.2f}x {med['float mask'] * 1e3:9.1f}ms "
              f"{med['float mask'] / base:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
