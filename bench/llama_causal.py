"""A converted HF Llama decoder layer on CPU: its outer causal mask vs ``is_causal=True``.

Under ``convert()`` an HF decoder builds its causal mask outside the attention module (the
model's mask builder) and hands each layer's attention an opaque ``[B, 1, T, T]`` tensor: a
``finfo.min`` float mask with ``attn_implementation="eager"``, a bool mask with ``"sdpa"`` (when
there is padding; without it HF passes no mask and ``is_causal=True``). This bench converts one
``LlamaDecoderLayer`` (built from a small config, no weights), calls it with the mask HF builds
(``create_causal_mask(..., allow_is_causal_skip=False)``), and compares it with the same layer
run with ``is_causal=True`` and no mask:

* ``kernel``: the ``attnswap.attention`` call the converted layer makes (its q, k, v, mask and
  options, captured from the layer), timed alone: with the mask vs with ``is_causal=True`` and no
  mask. "mask" reuses one mask object (HF passes one object to every layer: the CPU kernel's
  tile classification is cached per object); "fresh mask" is a new object each call (the first
  layer of each forward pays the classification).
* ``layer``: the converted layer's whole forward (and forward+backward): with the mask vs the
  same converted layer whose op is called with ``is_causal=True`` and no mask (sdpa: HF's own
  path, ``attention_mask=None``; eager has no such path, so the site's op call is redirected).

Same process, interleaved rounds, medians; ratio = mask / is_causal (target <= 1.1x).

Usage::

    python bench/llama_causal.py                       # T=2048, hidden 256, 4 heads, 2 kv heads
    python bench/llama_causal.py --T 1024 --rounds 3 --kinds sigmoid --attn eager
    python bench/llama_causal.py --threads 1          # a shared (loaded) machine
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
import warnings

import torch

import attnswap
from attnswap.runtime import site_call


def _build(attn: str, args):
    from transformers import LlamaConfig
    from transformers.masking_utils import create_causal_mask
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=1, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=args.T,
                      attn_implementation=attn)
    layer = LlamaDecoderLayer(cfg, layer_idx=0).train()  # dropout 0 in Llama's config
    h = torch.randn(args.B, args.T, args.hidden)
    pos = torch.arange(args.T)[None].expand(args.B, -1)
    pe = LlamaRotaryEmbedding(cfg)(h, pos)
    mask = create_causal_mask(config=cfg, inputs_embeds=h, attention_mask=None, cache=None,
                              position_ids=pos, allow_is_causal_skip=False)
    return cfg, layer, h, pe, mask


@contextlib.contextmanager
def _forced_causal():
    """The site's op call with ``is_causal=True`` and no mask (same layer, same kernel)."""
    real = site_call.attention

    def causal(q, k, v, mask=None, **kw):
        return real(q, k, v, None, **{**kw, "is_causal": True})

    site_call.attention = causal
    try:
        yield
    finally:
        site_call.attention = real


def _capture(converted, h, pe, mask):
    """The (q, k, v, mask, options) of the converted layer's op call."""
    seen = []
    real = site_call.attention

    def spy(q, k, v, m=None, **kw):
        seen.append((q.detach().clone(), k.detach().clone(), v.detach().clone(), m, dict(kw)))
        return real(q, k, v, m, **kw)

    site_call.attention = spy
    try:
        with torch.no_grad():
            converted(h, attention_mask=mask, position_embeddings=pe)
    finally:
        site_call.attention = real
    (call,) = seen
    return call


def _time(fns: dict, rounds: int) -> dict:
    for f in fns.values():  # warm-up (compiles, caches)
        f()
    times = {n: [] for n in fns}
    for _ in range(rounds):
        for n, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def bench(kind: str, attn: str, args) -> list[tuple]:
    cfg, layer, h, pe, mask = _build(attn, args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = attnswap.convert(
            layer, kind, attnswap.ExampleInputs((h,), {"attention_mask": mask,
                                                      "position_embeddings": pe}), impl="cpu")
    (site,) = converted.attnswap_report.sites
    causal_col = next(iter(converted.attnswap_report.rows()))[6]
    q, k, v, m, kw = _capture(converted, h, pe, mask)
    assert m is not None and not kw["is_causal"], "the layer's op did not get the mask"
    ckw = {**kw, "is_causal": True}
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    go = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=torch.Generator().manual_seed(1))
    fresh = [m.clone() for _ in range(2 * args.rounds + 2)]

    def fresh_mask():
        return fresh.pop() if fresh else m.clone()

    def k_fwd(mask_, kws):
        def run():
            with torch.no_grad():
                attnswap.attention(q, k, v, mask_() if callable(mask_) else mask_, **kws)
        return run

    def k_bwd(mask_, kws):
        def run():
            out = attnswap.attention(qg, kg, vg, mask_() if callable(mask_) else mask_, **kws)
            torch.autograd.grad(out, (qg, kg, vg), go)
        return run

    rows = []
    for what, make in (("kernel fwd", k_fwd), ("kernel fwd+bwd", k_bwd)):
        med = _time({"is_causal": make(None, ckw), "mask": make(m, kw),
                     "fresh mask": make(fresh_mask, kw)}, args.rounds)
        rows.append((what, med))
        fresh = [m.clone() for _ in range(2 * args.rounds + 2)]

    hg = h.clone().requires_grad_(True)
    gh = torch.randn_like(h)

    def layer_call(with_mask: bool, grad: bool):
        def run():
            x = hg if grad else h
            if with_mask:
                ctx = contextlib.nullcontext()
                am = mask
            elif attn == "sdpa":
                ctx, am = contextlib.nullcontext(), None  # HF's own is_causal=True path
            else:
                ctx, am = _forced_causal(), mask
            with ctx, (contextlib.nullcontext() if grad else torch.no_grad()):
                out = converted(x, attention_mask=am, position_embeddings=pe)
                out = out[0] if isinstance(out, tuple) else out
                if grad:
                    torch.autograd.grad(out, [x] + [p for p in converted.parameters()], gh)
        return run

    for what, grad in (("layer fwd", False), ("layer fwd+bwd", True)):
        med = _time({"is_causal": layer_call(False, grad), "mask": layer_call(True, grad)},
                    args.rounds)
        rows.append((what, med))
    return [(kind, attn, causal_col, site.mask, what, med) for what, med in rows]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--kinds", default="sigmoid,softmax")
    ap.add_argument("--attn", default="eager,sdpa")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); on a shared machine 1 avoids "
                         "OpenMP barrier stalls that cost milliseconds per op")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    D = args.hidden // args.heads
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load {load:.1f}; LlamaDecoderLayer hidden "
          f"{args.hidden}, Hq={args.heads} Hkv={args.kv_heads} D={D}, B={args.B} T={args.T} "
          f"fp32, impl=cpu, median of {args.rounds} interleaved rounds")
    print(f"{'kind':8} {'attn':6} {'report':6} {'mask':6} {'what':15} {'is_causal':>10} "
          f"{'mask':>9} {'ratio':>6} {'fresh mask':>11} {'ratio':>6}")
    for kind in args.kinds.split(","):
        for attn in args.attn.split(","):
            for kind_, attn_, col, mk, what, med in bench(kind, attn, args):
                base = med["is_causal"]
                line = (f"{kind_:8} {attn_:6} {col:6} {mk:6} {what:15} {base * 1e3:8.1f}ms "
                        f"{med['mask'] * 1e3:7.1f}ms {med['mask'] / base:5.2f}x")
                if "fresh mask" in med:
                    line += f" {med['fresh mask'] * 1e3:9.1f}ms {med['fresh mask'] / base:5.2f}x"
                print(line, flush=True)
    print(f"# load at end {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "")


if __name__ == "__main__":
    main()
