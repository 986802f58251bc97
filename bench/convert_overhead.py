"""Convert + first-call cost of attnswap.convert, measured in one run, against two baselines:

1. depth: a 24-layer vs a 2-layer BERT config (regional conversion compiles one region class
   once, so the cost should hardly grow with depth; target <= 2x);
2. BERT-base (12 layers) vs plain ``torch.compile(model, backend="eager")`` of the whole model
   (target <= 1.0x).

    python bench/convert_overhead.py [--seq 128] [--batch 2] [--attention sigmoid] [--out FILE]

Every number is the median of ``--repeat`` fresh runs (dynamo reset between runs), fp32 on the
CPU. ``--out`` appends the table as Markdown.
"""

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table
from transformers import BertConfig, BertModel

import attnswap


def _bert(layers, hidden=None):
    torch.manual_seed(0)
    kw = {} if hidden is None else dict(hidden_size=hidden, num_attention_heads=4,
                                        intermediate_size=4 * hidden)
    return BertModel(BertConfig(num_hidden_layers=layers, attn_implementation="eager", **kw)).eval()


def _inputs(model, batch, seq):
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def convert_and_first_call(model, inputs, attention):
    torch._dynamo.reset()
    t0 = time.perf_counter()
    conv = attnswap.convert(model, attention, inputs)
    conv(**inputs)
    return time.perf_counter() - t0, conv


def plain_first_call(model, inputs):
    torch._dynamo.reset()
    t0 = time.perf_counter()
    torch.compile(model, backend="eager")(**inputs)  # grad mode on, as convert() warms up
    return time.perf_counter() - t0


def median(fn, repeat):
    return statistics.median(fn() for _ in range(repeat))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--attention", default="sigmoid")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    rows = []
    warm = _bert(1, hidden=64)  # dynamo's one-off start-up must not be charged to the first row
    convert_and_first_call(warm, _inputs(warm, 1, 8), a.attention)
    plain_first_call(warm, _inputs(warm, 1, 8))
    small, deep = _bert(2, hidden=256), _bert(24, hidden=256)
    t2 = median(lambda: convert_and_first_call(small, _inputs(small, a.batch, a.seq), a.attention)[0], a.repeat)
    t24 = median(lambda: convert_and_first_call(deep, _inputs(deep, a.batch, a.seq), a.attention)[0], a.repeat)
    rows.append(("convert + first call, 2 layers (hidden 256)", t2, "1.00"))
    rows.append(("convert + first call, 24 layers (hidden 256)", t24, f"{t24 / t2:.2f} (target <= 2)"))

    base = _bert(12)  # BERT-base sizes
    inp = _inputs(base, a.batch, a.seq)
    tp = median(lambda: plain_first_call(base, inp), a.repeat)
    tc, conv = convert_and_first_call(base, inp, a.attention)
    tc = statistics.median([tc] + [convert_and_first_call(base, inp, a.attention)[0] for _ in range(a.repeat - 1)])
    rows.append(("torch.compile(BERT-base, backend='eager') first call", tp, "1.00"))
    rows.append(("attnswap.convert(BERT-base) + first call", tc, f"{tc / tp:.2f} (target <= 1.0)"))

    title = (f"convert overhead: BERT configs, batch {a.batch}, seq {a.seq}, fp32, CPU "
             f"({torch.get_num_threads()} threads), torch {torch.__version__}, attention={a.attention}, "
             f"median of {a.repeat}")
    t = Table(title=title)
    for c in ("what", "seconds", "ratio"):
        t.add_column(c)
    for what, sec, ratio in rows:
        t.add_row(what, f"{sec:.2f}", ratio)
    Console().print(t)
    rep = conv.attnswap_report
    print(f"BERT-base: {len(rep.sites)} sites in {len(rep.regions)} regions; graphs compiled: {rep.graphs}")
    if a.out:
        with open(a.out, "a") as f:
            f.write(f"\n### {title}\n\n| what | seconds | ratio |\n|---|---|---|\n")
            for what, sec, ratio in rows:
                f.write(f"| {what} | {sec:.2f} | {ratio} |\n")


if __name__ == "__main__":
    main()
