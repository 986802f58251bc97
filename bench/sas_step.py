"""SAS vs softmax: one full training step of ``attnswap train``'s two tasks, interleaved.

Builds each task's model exactly as ``attnswap train`` does (:func:`attnswap.training.text_task`
/ :func:`~attnswap.training.digits_task`, converted with :func:`attnswap.convert` from the same
initial weights, AdamW), then times full training steps (forward + backward + optimizer step,
the span ``train_one`` reports as ms/step) of softmax and SAS alternately on the same batches,
and prints medians and the SAS / softmax ratio.

``--flops`` also counts each arm's FLOPs per training step (forward + backward) with
``torch.utils.flop_counter.FlopCounterMode``, every site computed by ``impl="reference"`` (plain
matmuls the counter sees; full, not causal-halved, score matrices for both arms): softmax, SAS as
the paper writes it (``Conv1d`` head expansion: its intrinsic arithmetic) and SAS as it runs here
(the banded head expansion, which spends D/k times the conv's FLOPs to run as one GEMM). The
intrinsic ratio is the floor of SAS / softmax at equal arithmetic efficiency.

``--breakdown`` also times SAS's pieces fwd+bwd at one site's shapes (each piece on its own,
through the SAS module's own submodules): the q / k / v head expansions, the q / k dim
expansions, the softmax on the expanded heads, the group mean, the whole SAS call, and the
softmax on the original heads; then the rest of the step (step minus attention sites).

Usage::

    python bench/sas_step.py --threads 1                # both tasks, 30 rounds each
    python bench/sas_step.py --task text --rounds 60 --breakdown
    python bench/sas_step.py --flops --rounds 15        # with each arm's FLOPs per step
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings

import torch

import attnswap
from attnswap.study.runner import _cpu_name
from attnswap.training import TASKS, options_for


def cpu_model() -> str:
    return _cpu_name()


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def build(task, kind: str, seed: int, lr: float):
    """What ``train_one`` builds: the converted model and its AdamW."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = attnswap.convert(copy.deepcopy(task.model), attention=kind,
                                 example_inputs=task.example, **options_for(kind, {}))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    return model, opt


def step_fn(task, model, opt, opt_times=None):
    def step(batch):
        t = time.perf_counter()
        loss = task.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t_opt = time.perf_counter()
        opt.step()
        end = time.perf_counter()
        if opt_times is not None:
            opt_times.append(end - t_opt)
        return end - t
    return step


def median_ms(xs):
    return 1e3 * statistics.median(xs)


def time_fn(fn, rounds: int, warm: int = 3):
    for _ in range(warm):
        fn()
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def site_shapes(task_name: str, batch: int):
    """(B, H, T, D, causal) of one attention site of the task's model."""
    if task_name == "text":
        return batch, 4, 64, 12, True
    return batch, 4, 16, 12, False  # ViT: 8x8 image, patch 2 -> 16 tokens; embed 48 / 4 heads


def breakdown(task_name: str, batch: int, rounds: int):
    """fwd+bwd ms of SAS's pieces at one site's shapes; interleaved rounds, medians."""
    import torch.nn.functional as F

    from attnswap.kernels.op import attention
    from attnswap.runtime.sas import SAS, _group_mean

    B, H, T, D, causal = site_shapes(task_name, batch)
    torch.manual_seed(0)
    sas = SAS(H, H, D, init="random")
    r, D2 = sas.ratio, sas.dim
    # q, k, v as a projection makes them: [B, T, H, D] transposed to [B, H, T, D]
    q, k, v = (torch.randn(B, T, H, D).transpose(1, 2).requires_grad_(True) for _ in range(3))
    scale = D ** -0.5
    mask = None
    if causal:  # HF GPT-2 (eager) hands its causal mask over as a float [B, 1, T, T]
        tri = torch.ones(T, T, dtype=torch.bool).tril()
        mask = torch.zeros(T, T).masked_fill(~tri, torch.finfo(torch.float32).min)
        mask = mask.expand(B, 1, T, T)
    expand = getattr(sas, "expand", None) or (
        lambda q, k, v: (sas.q_dim(sas.q_heads(q)), sas.k_dim(sas.k_heads(k)), sas.v_heads(v)))
    with torch.no_grad():
        q2, k2, v2 = (t.detach().requires_grad_(True) for t in expand(q, k, v))
    v2p = F.pad(v2.detach().transpose(1, 2), (0, D2 - D)).transpose(1, 2).requires_grad_(True)
    out2 = attention(q2, k2, v2p, mask, kind="softmax", scale=scale).detach()
    out2.requires_grad_(True)

    def bwd(*ys):
        torch.autograd.backward(list(ys), [torch.ones_like(y) for y in ys])

    parts = {
        "q/k/v head + dim expansions": lambda: bwd(*expand(q, k, v)),
        f"softmax on {r * H} heads, q/k D'={D2}, v D={D} (SDPA math path)":
            lambda: bwd(attention(q2, k2, v2, mask, kind="softmax", scale=scale)),
        f"softmax on {r * H} heads, q/k/v D'={D2} (v zero-padded, fused SDPA)":
            lambda: bwd(attention(q2, k2, v2p, mask, kind="softmax", scale=scale)),
        "slice + group mean (before)": lambda: bwd(out2[..., :D].unflatten(1, (r, H)).mean(1)),
        "slice + group mean (_group_mean)": lambda: bwd(_group_mean(out2, r, D)),
        "SAS site total": lambda: bwd(sas(q, k, v, mask, scale=scale, is_causal=False,
                                          dropout_p=0.0, options={})),
        f"softmax site ({H} heads, D={D})": lambda: bwd(attention(q, k, v, mask, kind="softmax",
                                                                  scale=scale)),
    }
    times = {name: [] for name in parts}
    for fn in parts.values():
        for _ in range(3):
            fn()
    for _ in range(rounds):
        for name, fn in parts.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return (B, H, T, D, causal), {name: median_ms(ts) for name, ts in times.items()}


def step_flops(name: str, seed: int = 0) -> dict:
    """FLOPs of one training step (forward + backward, optimizer excluded) per arm, counted by
    ``FlopCounterMode``. The converted models themselves cannot be counted (dynamo does not trace
    under a dispatch mode: the regions would run as the original softmax, and attnswap says so),
    so: the original model's step without its attention (the counter has no formula for PyTorch's
    CPU flash kernel, so it counts everything but the sites), plus per site one attention call
    fwd+bwd at the site's shapes on ``impl="reference"`` (plain matmuls, full score matrices for
    every arm) or one SAS module call."""
    from torch.utils.flop_counter import FlopCounterMode

    from attnswap.kernels.op import attention
    from attnswap.runtime import sas as sas_mod

    def count(fn):
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        ops = {str(op) for per_op in counter.get_flop_counts().values() for op in per_op}
        return counter.get_total_flops(), ops

    batch = 64 if name == "digits" else 32
    task = TASKS[name](seed, batch)
    g = torch.Generator().manual_seed(seed + 1)
    data = task.sample(g, batch)
    model = copy.deepcopy(task.model).train()
    rest, ops = count(lambda: task.loss(model, data).backward())
    assert not any("attention" in op for op in ops), ops  # the sites are counted below
    n_sites = 2
    B, H, T, D, causal = site_shapes(name, batch)
    q, k, v = (torch.randn(B, T, H, D).transpose(1, 2).requires_grad_(True) for _ in range(3))

    def site(fn):
        return count(lambda: fn().sum().backward())[0]

    softmax = site(lambda: attention(q, k, v, None, kind="softmax", scale=D ** -0.5,
                                     impl="reference"))
    sas = sas_mod.SAS(H, H, D, init="random")
    band = sas_mod.BAND_MAX_D
    out = {"softmax": rest + n_sites * softmax}
    for arm, band_max in (("sas_paper", 0), ("sas_run", band)):
        sas_mod.BAND_MAX_D = band_max  # 0: every head expansion as the paper's Conv1d
        try:
            out[arm] = rest + n_sites * site(lambda: sas(
                q, k, v, None, scale=D ** -0.5, is_causal=causal, dropout_p=0.0,
                options={"impl": "reference"}))
        finally:
            sas_mod.BAND_MAX_D = band
    return out


def run_task(name: str, rounds: int, seed: int = 0):
    batch = 64 if name == "digits" else 32
    task = TASKS[name](seed, batch)
    lr = task.defaults["lr"]
    opt_times = {kind: [] for kind in ("softmax", "sas")}
    arms = {kind: step_fn(task, *build(task, kind, seed, lr), opt_times[kind])
            for kind in opt_times}
    g = torch.Generator().manual_seed(seed + 1)
    batches = [task.sample(g, batch) for _ in range(8)]
    times = {kind: [] for kind in arms}
    for i in range(3):  # warm-up
        for fn in arms.values():
            fn(batches[i % len(batches)])
    for i in range(rounds):
        order = list(arms.items()) if i % 2 == 0 else list(arms.items())[::-1]
        for kind, fn in order:
            times[kind].append(fn(batches[i % len(batches)]))
    med = {kind: median_ms(ts) for kind, ts in times.items()}
    med.update({f"{kind} optimizer": median_ms(ts[-rounds:]) for kind, ts in opt_times.items()})
    return batch, med, times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=("text", "digits", "both"), default="both")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument("--flops", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from rich.console import Console
    from rich.table import Table

    con = Console(width=150)
    con.print(f"# {cpu_model()}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
              f"{torch.get_num_threads()} thread(s), fp32; load average {loadavg()}")
    names = ("text", "digits") if args.task == "both" else (args.task,)
    table = Table(title=f"training step, median of {args.rounds} interleaved rounds")
    for col in ("task", "shapes", "softmax ms", "SAS ms", "SAS / softmax", ("AdamW step ms "
                "(softmax / SAS)"), "load"):
        table.add_column(col, justify="left" if col in ("task", "shapes") else "right")
    if args.flops:
        table.add_column("FLOP ratio: paper SAS / as run", justify="right")
    breakdowns = []
    for name in names:
        batch, med, _ = run_task(name, args.rounds)
        B, H, T, D, causal = site_shapes(name, batch)
        row = [name, f"B={B} H={H} T={T} D={D}{' causal' if causal else ''}, 2 layers",
               f"{med['softmax']:.1f}", f"{med['sas']:.1f}", f"{med['sas'] / med['softmax']:.2f}x",
               f"{med['softmax optimizer']:.2f} / {med['sas optimizer']:.2f}", loadavg()]
        if args.flops:
            f = step_flops(name)
            row.append(f"{f['sas_paper'] / f['softmax']:.2f}x / {f['sas_run'] / f['softmax']:.2f}x"
                       f" ({f['softmax'] / 1e6:.0f} / {f['sas_paper'] / 1e6:.0f} / "
                       f"{f['sas_run'] / 1e6:.0f} MFLOP)")
        table.add_row(*row)
        if args.breakdown:
            breakdowns.append((name, med, *breakdown(name, batch, max(args.rounds, 20))))
    con.print(table)
    for name, med, shapes, parts in breakdowns:
        B, H, T, D, causal = shapes
        t = Table(title=f"{name}: one SAS site fwd+bwd (B={B}, H={H}, T={T}, D={D}), "
                        f"median ms; load {loadavg()}")
        t.add_column("piece")
        t.add_column("ms", justify="right")
        t.add_column("x2 layers", justify="right")
        for piece, ms in parts.items():
            t.add_row(piece, f"{ms:.2f}", f"{2 * ms:.2f}")
        rest = med["softmax"] - 2 * parts[next(p for p in parts if p.startswith("softmax site"))]
        t.add_row("rest of the softmax step (step - 2 softmax sites)", f"{rest:.2f}", "")
        t.add_row("SAS step predicted (rest + 2 SAS sites)",
                  f"{rest + 2 * parts['SAS site total']:.2f}", "")
        con.print(t)


if __name__ == "__main__":
    main()
