"""A converted model end to end on CPU vs the model it came from, in the same process.

HF BERT from a config (hidden 256, 4 layers, 4 heads, intermediate 1024, dropout 0, batch 4), its
original run with ``attn_implementation="sdpa"`` (the baseline) against ``attnswap.convert`` of
that same model to softmax (the identity), sigmoid and relu. Forward (``no_grad``) and
forward+backward, at each sequence length; every round times every variant once, interleaved,
and the medians are printed as ratios to the baseline, with what the conversion adds per layer.

Usage::

    python bench/cpu_model_overhead.py                     # seq 128 and 512, 10 rounds: ~3 min
    python bench/cpu_model_overhead.py --seq 128 --rounds 5 --threads 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import torch

import attnswap


def build(attn: str, layers: int):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=256, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=1024, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, vocab_size=1000,
                     max_position_embeddings=512, attn_implementation=attn)
    torch.manual_seed(0)
    return BertModel(cfg).eval()


def timer(model, ids, mask, backward: bool):
    def run():
        if backward:
            model.zero_grad(set_to_none=True)
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
            out.float().pow(2).mean().backward()
        else:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)

    def timed():
        t = time.perf_counter()
        run()
        return time.perf_counter() - t

    return run, timed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", default="128,512")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kinds", default="softmax,sigmoid,relu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = args.kinds.split(",")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; HF BERT hidden 256, {args.layers} layers, 4 heads "
          f"(D=64), batch {args.batch}, fp32, padded batch (last quarter of row 0 masked); "
          f"median of {args.rounds} interleaved rounds")
    original = build("sdpa", args.layers)
    print(f"{'seq':>5} {'pass':8} {'original':>10} " + " ".join(f"{k:>16}" for k in kinds)
          + "   added per layer (µs)")
    for T in (int(t) for t in args.seq.split(",")):
        g = torch.Generator().manual_seed(T)
        ids = torch.randint(0, 1000, (args.batch, T), generator=g)
        mask = torch.ones(args.batch, T, dtype=torch.long)
        mask[0, -T // 4:] = 0
        models = {"original": original}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for k in kinds:
                models[k] = attnswap.convert(original, k, {"input_ids": ids, "attention_mask": mask})
                assert len(models[k].attnswap_report.sites) == args.layers
        for backward in (False, True):
            runs = {n: timer(m, ids, mask, backward) for n, m in models.items()}
            for run, _ in runs.values():  # warm-up: compiles, the backward's first run
                run()
                run()
            times = {n: [] for n in runs}
            for _ in range(args.rounds):
                for n, (_, timed) in runs.items():
                    times[n].append(timed())
            med = {n: statistics.median(t) for n, t in times.items()}
            base = med["original"]
            cells = " ".join(f"{med[k] * 1e3:8.1f} ms {med[k] / base:4.2f}x" for k in kinds)
            added = " ".join(f"{k}:{(med[k] - base) / args.layers * 1e6:+.0f}" for k in kinds)
            print(f"{T:5d} {'fwd+bwd' if backward else 'fwd':8} {base * 1e3:7.1f} ms {cells}   {added}",
                  flush=True)
        print("      " + region_overhead(original, models[kinds[0]], ids, mask), flush=True)
    print("      " + op_overhead(kinds), flush=True)


def op_overhead(kinds, reps: int = 2000) -> str:
    """Per-call cost of ``attnswap.attention`` itself (validation, dispatch, the kernel's set-up)
    on a problem too small to compute anything (``[1, 2, 8, 8]``, a key-padding float mask),
    against ``F.scaled_dot_product_attention`` on the same inputs; forward, and forward+backward."""
    import timeit

    import torch.nn.functional as F

    q, k, v = (torch.randn(1, 2, 8, 8) for _ in range(3))
    mask = torch.zeros(1, 1, 1, 8)
    mask[..., -2:] = torch.finfo(torch.float32).min
    qg = q.clone().requires_grad_(True)

    def fb(fn):
        def run():
            fn(qg).sum().backward()
        return run

    arms = {"sdpa": lambda x: F.scaled_dot_product_attention(x, k, v, mask)}
    arms.update({kind: (lambda x, kind=kind: attnswap.attention(x, k, v, mask, kind=kind))
                 for kind in kinds})
    out = []
    for name, fn in arms.items():
        with torch.no_grad():
            fwd = min(timeit.repeat(lambda: fn(q), number=reps // 10, repeat=10)) / (reps // 10)
        both = min(timeit.repeat(fb(fn), number=reps // 10, repeat=10)) / (reps // 10)
        out.append(f"{name} {fwd * 1e6:.0f} / {both * 1e6:.0f} µs")
    return "one op call at [1, 2, 8, 8], fwd / fwd+bwd (the per-call overhead): " + ", ".join(out)


def region_overhead(original, converted, ids, mask, reps: int = 300) -> str:
    """What one converted region call costs beyond the original module's own call, with the
    inputs the model passes it: the whole wrapper, and the part that is dynamo's (guards and
    frame of the compiled region, measured by calling the compiled function directly)."""
    import timeit

    orig_mod = original.encoder.layer[0].attention.self
    conv_mod = converted.encoder.layer[0].attention.self
    seen = {}
    hook = orig_mod.register_forward_pre_hook(lambda m, a, k: seen.update(a=a, k=k),
                                              with_kwargs=True)
    with torch.no_grad():
        original(input_ids=ids, attention_mask=mask)
    hook.remove()
    a, k = seen["a"], seen["k"]
    rf = conv_mod.forward
    compiled = rf.conversion._compiled_for(rf)
    arms = {"original module": lambda: orig_mod(*a, **k),
            "converted module": lambda: conv_mod(*a, **k),
            "compiled region alone": lambda: compiled(conv_mod, *a, **k)}
    best = {n: float("inf") for n in arms}
    # The flags run_region sets for its calls (the compiled code is guarded on them).
    with torch.no_grad(), torch._dynamo.config.patch(specialize_float=True,
                                                     capture_scalar_outputs=True):
        for _ in range(5):
            for n, f in arms.items():
                best[n] = min(best[n], min(timeit.repeat(f, number=reps // 5, repeat=3)) / (reps // 5))
    o, c, r = best["original module"], best["converted module"], best["compiled region alone"]
    return (f"one BertSelfAttention call (seq {ids.shape[1]}): original {o * 1e6:.0f} µs, "
            f"converted {c * 1e6:.0f} µs (+{(c - o) * 1e6:.0f} µs: attnswap's region wrapper "
            f"{(c - r) * 1e6:.0f} µs, the compiled region's guards, frame and graph "
            f"{(r - o) * 1e6:.0f} µs)")


if __name__ == "__main__":
    main()
