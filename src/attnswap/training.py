"""A small, real training comparison of attention kinds (``attnswap train``).

Two tasks, each seeded and small enough for a laptop CPU:

* ``digits`` — a timm ``VisionTransformer`` (img_size 8, patch_size 2, 1 channel, embed_dim 48,
  depth 2, 4 heads, mean-pooled, 10 classes) on scikit-learn's bundled 8×8 digits (1797 images; a seeded,
  stratified 80/20 train/test split). Metric: test accuracy.
* ``text`` — a byte-level causal LM (GPT-2 config: vocab 256, n_embd 48, 2 layers, 4 heads,
  context 64) on the Python standard library's own ``*.py`` files (the directory of the ``os``
  module; a seeded shuffle of the files, the first 400 KB; the last 10 % held out). Metrics:
  validation loss (nats/byte) and perplexity.

For every kind the model is built once from the seed, converted with :func:`attnswap.convert`
from the same initial weights, and trained with AdamW (linear warm-up, cosine decay) on the same
sequence of batches. Sigmoid attention uses the paper's default bias b = −ln n (n = number of keys);
the paper (arXiv 2409.04431) pairs it with QK-norm, LayerScale and hybrid-norm for stability at
scale: ``qk_norm=True`` (``--qk-norm``) adds QK-norm to every kind; the other two are model changes
attnswap does not make.
"""

from __future__ import annotations

import copy
import glob
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["compare", "options_for", "rich_table", "markdown_table", "MissingDependency", "TASKS"]


class MissingDependency(RuntimeError):
    pass


def options_for(kind: str, options: dict, qk_norm: bool = False) -> dict:
    """The subset of ``options`` that ``kind`` accepts (plus ``qk_norm`` when asked)."""
    from .passes.retarget import COMMON_OPTIONS, KIND_OPTIONS

    allowed = {**KIND_OPTIONS.get(kind, {}), **COMMON_OPTIONS}
    out = {k: v for k, v in (options or {}).items() if k in allowed}
    if qk_norm:
        out["qk_norm"] = True
    return out


@dataclass
class Task:
    name: str
    model: torch.nn.Module           # initial weights (shared by every kind)
    example: object                  # example inputs for convert
    sample: Callable                 # (generator, batch_size) -> batch
    loss: Callable                   # (model, batch) -> scalar loss
    evaluate: Callable               # (model) -> dict of metrics
    metric: str                      # the headline metric key
    higher_is_better: bool
    defaults: dict
    description: str


def _need(module: str, extra: str = "cli"):
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingDependency(f"this task needs {module}: pip install 'attnswap[{extra}]'")


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------

def _arch(arch: dict | None, defaults: dict) -> dict:
    unknown = sorted(set(arch or {}) - set(defaults))
    if unknown:
        raise ValueError(f"unknown model setting(s) {unknown}; allowed: {sorted(defaults)}")
    return {**defaults, **(arch or {})}


DIGITS_ARCH = {"embed_dim": 48, "depth": 2, "num_heads": 4, "mlp_hidden": None, "attn_scale": "default"}


def digits_task(seed: int, batch_size: int, data_seed: int | None = None, arch: dict | None = None) -> Task:
    """``seed`` draws the initial weights; ``data_seed`` (default: ``seed``) the train/test split.

    ``arch`` overrides the model: ``embed_dim``, ``depth``, ``num_heads``, ``mlp_hidden`` (default
    2 × embed_dim) and ``attn_scale``: "default" (timm's fused SDPA path), or "scaled" / "unscaled"
    (timm's own unfused path, which multiplies q by ``Attention.scale``: d^-1/2 or 1).
    """
    _need("sklearn")
    _need("timm", "zoo")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from timm.models.vision_transformer import VisionTransformer

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    a = _arch(arch, DIGITS_ARCH)
    data_seed = seed if data_seed is None else data_seed
    tr, te = train_test_split(range(len(y)), test_size=0.2, random_state=data_seed, stratify=data.target)
    xtr, ytr, xte, yte = x[tr], y[tr], x[te], y[te]
    mean, std = xtr.mean(), xtr.std()
    xtr, xte = (xtr - mean) / std, (xte - mean) / std

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hidden = a["mlp_hidden"] or 2 * a["embed_dim"]
        model = VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10,
                                  embed_dim=a["embed_dim"], depth=a["depth"], num_heads=a["num_heads"],
                                  mlp_ratio=hidden / a["embed_dim"], global_pool="avg", class_token=False)
    if a["attn_scale"] != "default":
        if a["attn_scale"] not in ("scaled", "unscaled"):
            raise ValueError(f"attn_scale={a['attn_scale']!r}: choose default, scaled or unscaled")
        for blk in model.blocks:  # timm's unfused path reads the scale from this attribute
            blk.attn.fused_attn = False
            blk.attn.scale = blk.attn.head_dim ** -0.5 if a["attn_scale"] == "scaled" else 1.0

    def sample(g, bs):
        idx = torch.randint(0, len(ytr), (bs,), generator=g)
        return xtr[idx], ytr[idx]

    def loss(m, batch):
        xb, yb = batch
        return F.cross_entropy(m(xb), yb)

    def evaluate(m):
        correct, total_loss = 0, 0.0
        with torch.no_grad():
            for i in range(0, len(yte), batch_size):
                xb, yb = xte[i:i + batch_size], yte[i:i + batch_size]
                if len(yb) < batch_size:  # keep one batch shape: pad, then drop the padding
                    pad = batch_size - len(yb)
                    logits = m(torch.cat([xb, xb[:1].expand(pad, -1, -1, -1)]))[:len(yb)]
                else:
                    logits = m(xb)
                total_loss += F.cross_entropy(logits, yb, reduction="sum").item()
                correct += (logits.argmax(-1) == yb).sum().item()
        return {"test_acc": correct / len(yte), "test_loss": total_loss / len(yte)}

    return Task("digits", model, xtr[:batch_size], sample, loss, evaluate, "test_acc", True,
                {"lr": 5e-3, "eval_every": 25},
                f"timm ViT (img 8, patch 2, dim {a['embed_dim']}, depth {a['depth']}, {a['num_heads']} heads, "
                f"mean pool) on sklearn digits: "
                f"{len(ytr)} train / {len(yte)} test images")


# --------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------

CONTEXT = 64


def stdlib_bytes(seed: int, limit: int = 400_000) -> bytes:
    """The first ``limit`` bytes of a seeded shuffle of the ``*.py`` files next to ``os.py``."""
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    random.Random(seed).shuffle(files)
    chunks, size = [], 0
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


TEXT_ARCH = {"n_embd": 48, "n_layer": 2, "n_head": 4, "mlp_hidden": None, "attn_scale": "default"}


def text_task(seed: int, batch_size: int, data_seed: int | None = None, arch: dict | None = None) -> Task:
    """``seed`` draws the initial weights; ``data_seed`` (default: ``seed``) the file shuffle.

    ``arch`` overrides ``n_embd``, ``n_layer``, ``n_head``, ``mlp_hidden`` (GPT-2's ``n_inner``,
    default 4 × n_embd) and ``attn_scale``: "default"/"scaled" (GPT-2 divides by √d) or
    "unscaled" (``scale_attn_weights=False``).
    """
    _need("transformers", "zoo")
    from transformers import GPT2Config, GPT2LMHeadModel

    a = _arch(arch, TEXT_ARCH)
    if a["attn_scale"] not in ("default", "scaled", "unscaled"):
        raise ValueError(f"attn_scale={a['attn_scale']!r}: choose default, scaled or unscaled")
    data_seed = seed if data_seed is None else data_seed
    data = torch.frombuffer(bytearray(stdlib_bytes(data_seed)), dtype=torch.uint8).long()
    split = int(len(data) * 0.9)
    train, val = data[:split], data[split:]
    n_val = 128
    starts = torch.linspace(0, len(val) - CONTEXT - 1, n_val).long()
    val_windows = torch.stack([val[s:s + CONTEXT] for s in starts.tolist()])

    config = GPT2Config(vocab_size=256, n_positions=CONTEXT, n_embd=a["n_embd"], n_layer=a["n_layer"],
                        n_head=a["n_head"], n_inner=a["mlp_hidden"],
                        scale_attn_weights=a["attn_scale"] != "unscaled",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel._from_config(config, attn_implementation="eager")

    def sample(g, bs):
        idx = torch.randint(0, len(train) - CONTEXT - 1, (bs,), generator=g)
        return torch.stack([train[i:i + CONTEXT] for i in idx.tolist()])

    def loss(m, ids):
        return m(input_ids=ids, labels=ids, use_cache=False).loss

    def evaluate(m):
        total = 0.0
        with torch.no_grad():
            for i in range(0, n_val, batch_size):
                ids = val_windows[i:i + batch_size]
                total += m(input_ids=ids, labels=ids, use_cache=False).loss.item() * len(ids)
        vl = total / n_val
        return {"val_loss": vl, "val_ppl": math.exp(vl)}

    ex = train[:batch_size * CONTEXT].view(batch_size, CONTEXT)
    return Task("text", model, {"input_ids": ex, "labels": ex, "use_cache": False}, sample, loss,
                evaluate, "val_loss", False, {"lr": 3e-3, "eval_every": 25},
                f"byte-level GPT-2 (n_embd {a['n_embd']}, {a['n_layer']} layers, {a['n_head']} heads, "
                f"context {CONTEXT}) on "
                f"{len(data) // 1000} KB of Python stdlib source ({len(val) // 1000} KB held out)")


TASKS = {"digits": digits_task, "text": text_task}


# --------------------------------------------------------------------------------------------
# the comparison
# --------------------------------------------------------------------------------------------

def _lr_at(step, steps, lr):
    warm = max(1, steps // 10)
    if step < warm:
        return lr * (step + 1) / warm
    p = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def train_one(task: Task, kind: str, steps: int, seed: int, batch_size: int, lr: float,
              eval_every: int, options: dict, progress: bool = True, label: str | None = None) -> dict:
    from . import convert

    t0 = time.perf_counter()
    torch.manual_seed(seed)  # SAS / QK-norm parameters are drawn here: the same for every run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert(copy.deepcopy(task.model), attention=kind, example_inputs=task.example, **options)
    sites = model.attnswap_report.sites
    from .kernels.op import reset_call_counts, total_calls

    reset_call_counts()
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed + 1)  # same batches for every kind
    losses, evals, step_times = [], [], []
    try:
        from tqdm import tqdm
        bar = tqdm(range(steps), desc=f"{task.name}:{label or kind}", disable=None if progress else True,
                   file=sys.stderr, leave=False)
    except ImportError:
        bar = range(steps)
    for step in bar:
        batch = task.sample(g, batch_size)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        ts = time.perf_counter()
        loss = task.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step_times.append(time.perf_counter() - ts)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            model.eval()
            evals.append({"step": step + 1, **task.evaluate(model)})
            model.train()
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if not evals or evals[-1]["step"] != len(losses):
        model.eval()
        evals.append({"step": len(losses), **task.evaluate(model)})
    wall = time.perf_counter() - t0
    steady = step_times[2:] or step_times
    tail = losses[-max(1, min(20, len(losses) // 5)):]
    return {"kind": kind, "steps": len(losses), "wall_s": wall,
            "ms_per_step": 1e3 * sorted(steady)[len(steady) // 2], "params": n_params,
            "final_train_loss": sum(tail) / len(tail), "train_loss_mean": sum(losses) / len(losses),
            **{k: v for k, v in evals[-1].items() if k != "step"},
            "options": options, "sites": len(sites), "site_scales": [r.scale for r in sites],
            "site_kinds": [r.kind for r in sites], "op_calls": total_calls(), "losses": losses, "evals": evals}


def compare(task="digits", kinds=("softmax", "sigmoid", "relu", "sas"), steps=300, seed=0,
            out=None, qk_norm=False, options=None, batch_size=None, lr=None, eval_every=None,
            threads=None, progress=True) -> dict:
    """Train the task's model once per kind; write ``DIR/train_<task>.{png,json,md}``."""
    if threads:
        torch.set_num_threads(threads)
    batch_size = batch_size or (64 if task == "digits" else 32)
    t = TASKS[task](seed, batch_size)
    lr = lr or t.defaults["lr"]
    eval_every = eval_every or max(1, min(t.defaults["eval_every"], steps))
    runs = [train_one(t, k, steps, seed, batch_size, lr, eval_every, options_for(k, options or {}, qk_norm),
                      progress) for k in kinds]
    result = {"task": task, "description": t.description, "metric": t.metric,
              "higher_is_better": t.higher_is_better, "steps": steps, "seed": seed,
              "batch_size": batch_size, "lr": lr, "qk_norm": qk_norm, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "runs": runs, "files": []}
    if out:
        os.makedirs(out, exist_ok=True)
        base = os.path.join(out, f"train_{task}")
        result["files"] = [base + ".png", base + ".json", base + ".md"]
        plot(result, base + ".png")
        with open(base + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(base + ".md", "w") as f:
            f.write(markdown_table(result) + "\n")
    return result


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------

def _columns(result):
    if result["task"] == "digits":
        return [("test acc", lambda r: f"{r['test_acc']:.3f}"), ("test loss", lambda r: f"{r['test_loss']:.3f}")]
    return [("val loss", lambda r: f"{r['val_loss']:.3f}"), ("val ppl", lambda r: f"{r['val_ppl']:.2f}")]


def _rows(result):
    cols = _columns(result)
    header = ["kind", "steps", "wall s", "ms/step", "params", "train loss"] + [c for c, _ in cols]
    rows = [[r["kind"], str(r["steps"]), f"{r['wall_s']:.1f}", f"{r['ms_per_step']:.1f}", str(r["params"]),
             f"{r['final_train_loss']:.3f}"] + [fn(r) for _, fn in cols] for r in result["runs"]]
    return header, rows


def markdown_table(result) -> str:
    header, rows = _rows(result)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def rich_table(result):
    from rich.table import Table

    header, rows = _rows(result)
    t = Table(title=f"attnswap train --task {result['task']} (seed {result['seed']}, "
                    f"{result['threads']} thread(s))", caption=result["description"])
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*r)
    return t


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    metric = result["metric"]
    for r in result["runs"]:
        ls = r["losses"]
        ema, smooth = None, []
        for v in ls:
            ema = v if ema is None else 0.9 * ema + 0.1 * v
            smooth.append(ema)
        ax1.plot(range(1, len(ls) + 1), smooth, label=r["kind"])
        ax2.plot([e["step"] for e in r["evals"]], [e[metric] for e in r["evals"]], marker="o", ms=3,
                 label=r["kind"])
    ax1.set_xlabel("step")
    ax1.set_ylabel("train loss (EMA 0.9)")
    ax2.set_xlabel("step")
    ax2.set_ylabel({"test_acc": "test accuracy", "val_loss": "validation loss (nats/byte)"}[metric])
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"attnswap train --task {result['task']}: {result['description']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
