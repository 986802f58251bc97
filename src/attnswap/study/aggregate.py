"""Mean and spread over seeds, paired differences against a baseline arm, and the markdown table.

The spread is the sample standard deviation (n − 1 in the denominator) over seeds; with one seed
it is 0. A difference counts as measurable only when it clears one std both ways: the gap between
the two arms' means is larger than the larger of their stds, and the mean of the per-seed (paired)
differences is larger than those differences' std. Otherwise the table says "no measurable
difference". With three seeds this is a yardstick against noise, not a significance test.
"""

from __future__ import annotations

import math

__all__ = ["mean_std", "summarize", "verdict", "markdown_table", "SCALARS"]

# The per-run numbers that get a mean and std; the task's metrics are added to these.
SCALARS = ("final_train_loss", "train_loss_mean", "params", "ms_per_step", "wall_s")


def mean_std(values) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values]
    if not vals or not all(math.isfinite(v) for v in vals):
        return None, None
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def _finite(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def summarize(study, runs: list[dict], metric_keys: tuple, headline: str, higher_is_better: bool) -> dict:
    """Per arm: for every scalar, its per-seed values, mean and std; the paired difference of the
    headline metric and of the final train loss against the arm's baseline."""
    by_arm = {}
    for r in runs:
        by_arm.setdefault(r["arm"], {})[r["seed"]] = r
    out = {}
    for arm in study.arms:
        seeds = by_arm.get(arm.name, {})
        entry = {"seeds": sorted(seeds), "diverged_seeds": sorted(s for s, r in seeds.items() if r["diverged"])}
        for key in SCALARS + tuple(metric_keys):
            vals = [seeds[s][key] for s in sorted(seeds)]
            m, sd = mean_std(vals)
            entry[key] = {"values": [_finite(v) for v in vals], "mean": m, "std": sd}
        base = study.baseline_of(arm)
        if base is not None and base in by_arm:
            entry["baseline"] = base
            common = [s for s in sorted(seeds) if s in by_arm[base]]
            for key in (headline, "final_train_loss", "train_loss_mean"):
                diffs = [seeds[s][key] - by_arm[base][s][key] for s in common]
                m, sd = mean_std(diffs)
                entry[f"delta_{key}"] = {"values": [_finite(d) for d in diffs], "mean": m, "std": sd}
            entry["verdict"] = verdict(entry[headline], _stats(by_arm[base], headline), higher_is_better,
                                       entry[f"delta_{headline}"])
        out[arm.name] = entry
    return out


def _stats(seeds: dict, key: str) -> dict:
    m, sd = mean_std([seeds[s][key] for s in sorted(seeds)])
    return {"mean": m, "std": sd}


def verdict(a: dict, b: dict, higher_is_better: bool, paired: dict | None = None) -> str:
    """Plain words for arm ``a`` against baseline ``b`` (each {"mean", "std"}); ``paired``: the
    per-seed differences a − b ({"mean", "std"})."""
    if a["mean"] is None or b["mean"] is None:
        return "diverged"
    diff = a["mean"] - b["mean"]
    if abs(diff) <= max(a["std"], b["std"]):
        return "no measurable difference"
    if paired is not None and (paired["mean"] is None or abs(paired["mean"]) <= paired["std"]):
        return "no measurable difference"
    better = (diff > 0) == higher_is_better
    return "better" if better else "worse"


def _pm(stat: dict, fmt: str) -> str:
    if stat["mean"] is None:
        return "diverged"
    return f"{stat['mean']:{fmt}} ± {stat['std']:{fmt.lstrip('+')}}"


def markdown_table(result: dict) -> str:
    """One row per arm: mean ± std over seeds of each final number, and the paired difference."""
    metric_keys = result["metric_keys"]
    headline = result["metric"]
    fmts = {"test_acc": ".3f", "test_loss": ".3f", "val_loss": ".3f", "val_ppl": ".2f"}
    header = (["arm", "params", "final train loss", "mean train loss"] + [k.replace("_", " ") for k in metric_keys]
              + [f"Δ {headline.replace('_', ' ')} vs baseline (paired)", "verdict", "Δ mean train loss (paired)",
                 "ms/step"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in result["study"]["arms"]:
        s = result["summary"][arm["name"]]
        params = s["params"]
        p = (str(int(params["mean"])) if params["std"] == 0 else _pm(params, ".0f")) if params["mean"] else "-"
        delta = s.get(f"delta_{headline}")
        d = f"{_pm(delta, '+.3f')} (vs {s['baseline']})" if delta else ("reference" if arm["reference"] else "-")
        row = [arm["name"], p, _pm(s["final_train_loss"], ".3f"), _pm(s["train_loss_mean"], ".3f")]
        row += [_pm(s[k], fmts.get(k, ".3f")) for k in metric_keys]
        dl = s.get("delta_train_loss_mean")
        row += [d, s.get("verdict", "-"), _pm(dl, "+.3f") if dl else "-", _pm(s["ms_per_step"], ".1f")]
        lines.append("| " + " | ".join(row) + " |")
    n = len(result["seeds"])
    lines.append("")
    lines.append(f"mean ± sample std over {n} seed(s) {result['seeds']}; same initial weights and batches "
                 f"for every arm within a seed. Verdict on the {headline.replace('_', ' ')}: better/worse only "
                 f"when the gap between the means exceeds the larger std and the paired difference exceeds "
                 f"its own std, else \"no measurable difference\". \"mean train loss\" averages the loss over all steps (lower = faster "
                 f"convergence); its paired difference is per seed against the same baseline. ms/step is the "
                 f"median step time, indicative only on a shared machine.")
    return "\n".join(lines)
