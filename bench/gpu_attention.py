#!/usr/bin/env python
"""Attention throughput on a CUDA GPU: attnswap's Triton sigmoid and ReLU kernels against
``F.scaled_dot_product_attention`` with the flash backend (softmax), measured in the same run.

Standard shapes (PRIOR_ART.md §3): bf16, B·T = 16k tokens, H·D = 2048, head dim 64 and 128,
T = 1k … 16k, causal and not. FLOPs: forward ``4·B·H·T²·D`` (half when causal), backward 2.5× the
forward, forward+backward 3.5×. Times are ``triton.testing.do_bench`` medians. Printed: TFLOP/s,
the ratio to SDPA-flash in the same setting, and the fraction of the card's dense bf16 peak.

    python bench/gpu_attention.py                          # everything (several minutes)
    python bench/gpu_attention.py --seqlens 1024,4096 --head-dims 128 --out docs/benchmarks.md

Without a CUDA GPU it prints one line and exits with status 0.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

# dense bf16 tensor-core peaks (TFLOP/s, fp32 accumulate), matched against the device name in order
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
]

TOKENS = 16 * 1024
HIDDEN = 2048


def peak_for(name: str):
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return peak
    return None


def _csv(s, cast=str):
    return [cast(x) for x in s.split(",") if x.strip()]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", default="1024,2048,4096,8192,16384", help="comma-separated T")
    ap.add_argument("--head-dims", default="64,128", help="comma-separated head dims")
    ap.add_argument("--kinds", default="sigmoid,relu", help="attnswap kinds to time")
    ap.add_argument("--causal", default="false,true", help="comma-separated: false,true")
    ap.add_argument("--modes", default="fwd,bwd,fwd+bwd", help="comma-separated: fwd,bwd,fwd+bwd")
    ap.add_argument("--fast-sigmoid", action="store_true", help="sigmoid through tanh.approx")
    ap.add_argument("--padded", type=float, default=0.0,
                    help="a padded batch: every other row hides this fraction of its keys with a "
                         "[B, 1, 1, T] bool mask (SDPA then runs its efficient backend; FLOPs "
                         "stay those of the unpadded problem, so the ratio shows what skipping "
                         "the hidden tiles buys)")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    ap.add_argument("--out", default=None, help="append the results as a markdown table to this file")
    return ap.parse_args(argv)


COLUMNS = ["kind", "D", "causal", "T", "B×H", "mode", "ms", "TFLOP/s", "SDPA-flash TFLOP/s",
           "vs SDPA", "% of peak"]


def fmt_row(r) -> list:
    f = lambda x, s: "—" if x is None else s.format(x)  # noqa: E731
    return [r["kind"], str(r["D"]), "yes" if r["causal"] else "no", str(r["T"]),
            f"{r['B']}×{r['H']}", r["mode"], f(r["ms"], "{:.3f}"), f(r["tflops"], "{:.1f}"),
            f(r["sdpa_tflops"], "{:.1f}"), f(r["ratio"], "{:.2f}×"),
            f(None if r["peak"] is None else 100 * r["peak"], "{:.1f}%")]


def render(rows, header, name, out, console) -> None:
    """Print the rich table; append a markdown table to ``out`` if given."""
    from rich.table import Table

    table = Table(title=f"attnswap Triton vs SDPA-flash — {name}")
    for c in COLUMNS:
        table.add_column(c, justify="left" if c in ("kind", "mode") else "right")
    for r in rows:
        table.add_row(*fmt_row(r))
    console.print(table)
    if out:
        lines = ["", f"## GPU attention — {header['device']}, {header['date']}", ""]
        lines += [f"- {k}: {v}" for k, v in header.items() if k not in ("device", "date")]
        lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(fmt_row(r)) + " |" for r in rows]
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        console.print(f"appended {len(rows)} rows to {out}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("gpu_attention: torch is not installed; nothing to benchmark.")
        return 0
    if not torch.cuda.is_available():
        print("gpu_attention: no CUDA GPU found; nothing to benchmark (the kernels' GPU timings need one).")
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("gpu_attention: TRITON_INTERPRET=1 is set, so Triton would interpret on the CPU; unset it to benchmark.")
        return 0

    import torch.nn.functional as F
    import triton
    from rich.console import Console
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import attnswap
    from attnswap import attention

    console = Console(width=max(Console().width, 132))
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    cap = torch.cuda.get_device_capability(dev)
    peak = peak_for(name)
    header = {
        "device": f"{name} (sm{cap[0]}{cap[1]})",
        "peak bf16 dense": f"{peak:g} TFLOP/s" if peak else "unknown (add it to PEAK_BF16_TFLOPS)",
        "torch": torch.__version__,
        "CUDA": torch.version.cuda,
        "triton": triton.__version__,
        "attnswap": attnswap.__version__,
        "python": platform.python_version(),
        "shapes": f"bf16, B*T = {TOKENS}, H*D = {HIDDEN}",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    for k, v in header.items():
        console.print(f"[bold]{k}[/bold]: {v}")

    seqlens = _csv(args.seqlens, int)
    head_dims = _csv(args.head_dims, int)
    kinds = _csv(args.kinds)
    causals = [c.lower() in ("1", "true", "yes") for c in _csv(args.causal)]
    modes = _csv(args.modes)
    dtype = torch.bfloat16

    def timed(fn, grads):
        return triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, grad_to_none=grads)

    def measure(run, q, k, v, do):
        """{mode: ms} for one implementation; run(q, k, v) -> out."""
        res = {}
        grads = [q, k, v]
        if "fwd" in modes:
            with torch.no_grad():
                res["fwd"] = timed(lambda: run(q, k, v), None)
        if "bwd" in modes:
            out = run(q, k, v)
            res["bwd"] = timed(lambda: out.backward(do, retain_graph=True), grads)
            del out
        if "fwd+bwd" in modes:
            res["fwd+bwd"] = timed(lambda: run(q, k, v).backward(do), grads)
        return res

    rows = []
    for D in head_dims:
        H = HIDDEN // D
        for causal in causals:
            for T in seqlens:
                B = max(1, TOKENS // T)
                fwd_flops = 4.0 * B * H * T * T * D * (0.5 if causal else 1.0)
                flops = {"fwd": fwd_flops, "bwd": 2.5 * fwd_flops, "fwd+bwd": 3.5 * fwd_flops}
                torch.manual_seed(0)
                q, k, v, do = (torch.randn(B, H, T, D, device=dev, dtype=dtype) for _ in range(4))
                for t in (q, k, v):
                    t.requires_grad_(True)

                mask = None
                if args.padded > 0:
                    mask = torch.ones(B, 1, 1, T, dtype=torch.bool, device=dev)
                    mask[::2, ..., T - int(args.padded * T):] = False

                def sdpa(q, k, v):
                    if mask is not None:  # flash takes no mask
                        if causal:
                            tri = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
                            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask & tri)
                        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

                try:
                    base = measure(sdpa, q, k, v, do)
                except Exception as e:  # noqa: BLE001 - report and carry on
                    console.print(f"[red]SDPA flash failed at T={T} D={D}: {e}[/red]")
                    base = {}
                for kind in kinds:
                    opts = dict(kind=kind, is_causal=causal, impl="triton")
                    if kind == "sigmoid" and args.fast_sigmoid:
                        opts["fast_sigmoid"] = True

                    def ours(q, k, v, opts=opts):
                        return attention(q, k, v, mask, **opts)

                    try:
                        res = measure(ours, q, k, v, do)
                    except Exception as e:  # noqa: BLE001
                        console.print(f"[red]{kind} failed at T={T} D={D}: {e}[/red]")
                        res = {}
                    for mode in modes:
                        ms, base_ms = res.get(mode), base.get(mode)
                        tf = flops[mode] / (ms * 1e-3) / 1e12 if ms else None
                        btf = flops[mode] / (base_ms * 1e-3) / 1e12 if base_ms else None
                        rows.append(dict(
                            kind=kind + (" (fast)" if opts.get("fast_sigmoid") else "")
                            + (f" (padded {args.padded:g})" if mask is not None else ""), D=D,
                            causal=causal, T=T, B=B, H=H, mode=mode, ms=ms, tflops=tf,
                            sdpa_tflops=btf, ratio=(tf / btf) if tf and btf else None,
                            peak=(tf / peak) if tf and peak else None,
                        ))
                del q, k, v, do
                torch.cuda.empty_cache()

    render(rows, header, name, args.out, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
