"""The study's figure: per arm the mean curve over seeds with a ±1 std band (train loss and the
eval metric); the scale study adds its initialization analysis against head dim."""

from __future__ import annotations

import math

from .aggregate import mean_std

__all__ = ["plot_study"]

LABELS = {"test_acc": "test accuracy", "val_loss": "validation loss (nats/byte)"}


def _ema(values, beta=0.9):
    out, ema = [], None
    for v in values:
        ema = v if ema is None else beta * ema + (1 - beta) * v
        out.append(ema)
    return out


def _band(ax, xs, series, label, color):
    n = min(len(s) for s in series)
    xs = xs[:n]
    stats = [mean_std([s[i] for s in series]) for i in range(n)]
    keep = [i for i, (m, _) in enumerate(stats) if m is not None and math.isfinite(m)]
    x = [xs[i] for i in keep]
    m = [stats[i][0] for i in keep]
    sd = [stats[i][1] for i in keep]
    ax.plot(x, m, label=label, color=color)
    ax.fill_between(x, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], color=color, alpha=0.2,
                    linewidth=0)


def _curves(ax_loss, ax_metric, result):
    metric = result["metric"]
    colors = _colors(len(result["study"]["arms"]))
    for arm, color in zip(result["study"]["arms"], colors):
        runs = [r for r in result["runs"] if r["arm"] == arm["name"]]
        if not runs:
            continue
        losses = [_ema(r["losses"]) for r in runs]
        _band(ax_loss, list(range(1, max(len(x) for x in losses) + 1)), losses, arm["name"], color)
        evals = [[e[metric] for e in r["evals"]] for r in runs]
        _band(ax_metric, [e["step"] for e in runs[0]["evals"]], evals, arm["name"], color)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("train loss (EMA 0.9)")
    ax_metric.set_xlabel("step")
    ax_metric.set_ylabel(LABELS.get(metric, metric))
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def _colors(n):
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _init_panels(ax_prob, ax_grad, analysis):
    for source, ls in (("model", "-"), ("unit", "--")):
        for scaled, color in ((True, "tab:blue"), (False, "tab:red")):
            rows = [r for r in analysis["rows"] if r["source"] == source and r["scaled"] == scaled]
            d = [r["head_dim"] for r in rows]
            label = f"{'1/sqrt(d)' if scaled else 'no scale'}, {source} q,k"
            for ax, qn in ((ax_prob, "max_prob"), (ax_grad, "softmax_grad")):
                m = [r[qn]["mean"] for r in rows]
                sd = [r[qn]["std"] for r in rows]
                ax.errorbar(d, m, yerr=sd, ls=ls, color=color, marker="o", ms=3, capsize=2, label=label)
    keys = analysis["rows"][0]["keys"]
    ax_prob.axhline(1 / keys, color="gray", lw=0.8, ls=":")
    ax_prob.set_ylabel(f"mean max softmax prob at init ({keys} keys; dotted: uniform)")
    ax_grad.set_ylabel("gradient through the softmax at init, ‖J·u‖/‖u‖")
    ax_grad.set_yscale("log")
    for ax in (ax_prob, ax_grad):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("head dim d")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def plot_study(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    analysis = result.get("init_analysis")
    if analysis:
        fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
        _init_panels(axes[0], axes[1], analysis)
        _curves(axes[2], axes[3], result)
    else:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        _curves(axes[0], axes[1], result)
    n = len(result["seeds"])
    fig.suptitle(f"attnswap study --task {result['task']} --study {result['study']['name']}: mean ± 1 std over "
                 f"{n} seed(s), {result['steps']} steps\n{result['description']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
