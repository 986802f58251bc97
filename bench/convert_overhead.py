"""Convert-time and first-call overhead of attnswap.convert versus plain
torch.compile(backend="eager") on the same 12-layer BERT-base-sized model, measured in one run.

    python bench/convert_overhead.py [--layers 12] [--seq 128] [--batch 2]

Prints: plain compile's first call (trace + run), attnswap.convert (its warm-up call compiles),
the converted model's first user call, and the ratio (convert + first call) / plain first call.
Target (issue 4): at most 1.5x.
"""

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table
from transformers import BertConfig, BertModel

import attnswap


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--attention", default="sigmoid")
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=a.layers, attn_implementation="eager")  # BERT-base sizes
    model = BertModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq))
    mask = torch.ones_like(ids)
    inputs = {"input_ids": ids, "attention_mask": mask}

    torch._dynamo.reset()
    t0 = time.perf_counter()
    plain = torch.compile(model, backend="eager")
    plain(**inputs)  # grad mode on, as when training; convert() warms up the same way
    t_plain = time.perf_counter() - t0

    torch._dynamo.reset()
    t0 = time.perf_counter()
    conv = attnswap.convert(model, a.attention, inputs)
    t_convert = time.perf_counter() - t0
    t0 = time.perf_counter()
    conv(**inputs)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():  # inference mode is another dynamo guard: one more compile
        conv(**inputs)
    t_nograd = time.perf_counter() - t0

    t = Table(title=f"convert overhead: BERT-base config, {a.layers} layers, batch {a.batch}, "
                    f"seq {a.seq}, fp32, CPU ({torch.get_num_threads()} threads), torch {torch.__version__}")
    for c in ("step", "seconds", "ratio vs plain compile"):
        t.add_column(c)
    t.add_row("torch.compile(backend='eager') first call", f"{t_plain:.2f}", "1.00")
    t.add_row("attnswap.convert (compiles in its warm-up call)", f"{t_convert:.2f}",
              f"{t_convert / t_plain:.2f}")
    t.add_row("converted model: first user call", f"{t_first:.2f}", f"{t_first / t_plain:.2f}")
    t.add_row("convert + first call", f"{t_convert + t_first:.2f}",
              f"{(t_convert + t_first) / t_plain:.2f}")
    t.add_row("(then a first call under torch.no_grad: recompiles)", f"{t_nograd:.2f}",
              f"{t_nograd / t_plain:.2f}")
    Console().print(t)
    print(f"sites: {len(conv.attnswap_report.sites)}; graphs compiled: {conv.attnswap_report.graphs}")


if __name__ == "__main__":
    main()
