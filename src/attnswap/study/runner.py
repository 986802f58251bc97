"""``attnswap study``: every arm of a study, once per seed, deterministically; then the files.

Per seed, every arm is converted with ``attnswap.convert`` from the same initial weights (drawn
from the seed) and trained on the same batches (drawn from the seed); the data split is the
same for every seed (``data_seed``), so the spread over seeds is the spread of training itself.
Two studies change the model, and say so in their arms: the scale study builds the model at
two head dims with and without the 1/√d scale, and the SAS study adds a softmax arm whose MLP
is widened until its parameter count matches SAS's (new shapes, hence other initial weights).
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from contextlib import contextmanager

import torch

from .. import training
from .aggregate import markdown_table, summarize
from .arms import SCALE_HEADS, STUDIES, study_arms
from .plot import plot_study
from .scale import HEAD_DIMS, init_analysis

__all__ = ["run_study", "write_files", "resummarize", "deterministic"]

METRICS = {"digits": ("test_acc", "test_loss"), "text": ("val_loss", "val_ppl")}


@contextmanager
def deterministic(threads: int | None):
    """Deterministic kernels and a fixed thread count for the duration (restored afterwards)."""
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_rng = torch.random.get_rng_state()
    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.set_num_threads(prev_threads)
        torch.random.set_rng_state(prev_rng)


def _param_count(task) -> int:
    return sum(p.numel() for p in task.model.parameters())


def _matched_hidden(build, seed, arch, target: int) -> tuple[int, int]:
    """The MLP width whose model has the parameter count closest to ``target`` (counts are
    affine in the width, so two builds give the answer)."""
    width_key = "embed_dim" if "embed_dim" in arch else "n_embd"
    default_mult = 2 if width_key == "embed_dim" else 4
    h0 = arch.get("mlp_hidden") or default_mult * arch[width_key]
    p0 = _param_count(build(seed, {**arch, "mlp_hidden": h0}))
    p1 = _param_count(build(seed, {**arch, "mlp_hidden": h0 + 1}))
    h = max(1, round(h0 + (target - p0) / (p1 - p0)))
    return h, _param_count(build(seed, {**arch, "mlp_hidden": h}))


def _layers(task) -> int:
    m = task.model
    return len(m.blocks) if task.name == "digits" else len(m.transformer.h)


def _check_converted(run: dict, arm, task) -> None:
    """Never report an arm whose model did not run the attention it names at every layer."""
    want = [arm.attention] * _layers(task)
    if run["site_kinds"] != want:
        raise RuntimeError(f"arm {arm.name!r} (seed {run['seed']}): converted sites {run['site_kinds']}, "
                           f"expected {want}; not a valid comparison")
    if run["op_calls"] < run["steps"] * len(want):   # every training step ran our op at every site
        raise RuntimeError(f"arm {arm.name!r} (seed {run['seed']}): {run['op_calls']} attnswap op calls in "
                           f"{run['steps']} steps of {len(want)} site(s); some ran as the original softmax")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine() -> dict:
    return {"platform": platform.platform(), "processor": _cpu_name(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "device": "cpu"}


def run_study(task: str = "digits", study: str = "kinds", seeds=(0, 1, 2), steps: int | None = None,
              out: str | None = None, batch_size: int | None = None, lr: float | None = None,
              eval_every: int | None = None, threads: int | None = 1, arch: dict | None = None,
              arms=None, head_dims=HEAD_DIMS, data_seed: int = 0, progress: bool = True,
              command: str | None = None) -> dict:
    """Run ``study`` on ``task`` for every seed; write ``out/study_<task>_<study>.{json,md,png}``.

    ``arch`` overrides the task's model for every arm (an arm's own overrides win); ``arms``
    restricts to a subset of arm names; ``head_dims`` are the scale study's analysis dims.
    """
    if task not in training.TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(training.TASKS)}")
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; choose from {', '.join(STUDIES)}")
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise ValueError("give at least one seed")
    spec = study_arms(task, study)
    chosen = list(spec.arms)
    if arms:
        names = [a.name for a in spec.arms]
        unknown = [a for a in arms if a not in names]
        if unknown:
            raise ValueError(f"unknown arm(s) {unknown} for study {study!r}; arms: {names}")
        chosen = [a for a in spec.arms if a.name in arms]
        for a in chosen:
            if a.match_params_of and a.match_params_of not in arms:
                raise ValueError(f"arm {a.name!r} matches the parameter count of {a.match_params_of!r}: "
                                 f"select that arm too")
        spec = type(spec)(spec.name, spec.claim, spec.source, tuple(chosen))
    steps = steps or 300
    head_dims = tuple(head_dims or HEAD_DIMS)
    batch_size = batch_size or (64 if task == "digits" else 32)
    base_arch = dict(arch or {})
    builder = training.TASKS[task]

    def build(seed, a):
        return builder(seed, batch_size, data_seed=data_seed, arch={**base_arch, **a})

    t_start = time.perf_counter()
    runs, analysis, matched = [], None, {}
    with deterministic(threads):
        defaults = build(seeds[0], {})
        lr = lr or defaults.defaults["lr"]
        eval_every = eval_every or max(1, min(defaults.defaults["eval_every"], steps))
        if study == "scale":
            analysis = init_analysis(task, build, seeds, head_dims)
        # an arm matched to another arm's parameter count runs after it
        order = sorted(chosen, key=lambda a: a.match_params_of is not None)
        for seed in seeds:
            done = {}
            for arm in order:
                arm_arch = dict(arm.arch)
                if arm.match_params_of:
                    target = done[arm.match_params_of]["params"]
                    full = {**(training.DIGITS_ARCH if task == "digits" else training.TEXT_ARCH), **base_arch,
                            **arm_arch}
                    hidden, count = _matched_hidden(build, seed, full, target)
                    arm_arch["mlp_hidden"] = hidden
                    matched[arm.name] = {"mlp_hidden": hidden, "params": count, "target_params": target}
                t = build(seed, arm_arch)
                # Every run starts from an empty dynamo cache: otherwise dynamo, having seen a
                # module attribute (GPT-2's ``scaling``) change between conversions, turns it
                # into a symbolic float and the next conversion finds "a scale that is a tensor".
                # It also makes a run's numbers independent of the arms that ran before it.
                torch._dynamo.reset()
                r = training.train_one(t, arm.attention, steps, seed, batch_size, lr, eval_every,
                                       dict(arm.options), progress, label=arm.name)
                r.update(arm=arm.name, seed=seed, arch={**base_arch, **arm_arch}, description=t.description,
                         diverged=r["steps"] < steps)
                _check_converted(r, arm, t)
                done[arm.name] = r
            runs += [done[a.name] for a in chosen]
    wall = time.perf_counter() - t_start

    metric_keys = METRICS[task]
    headline = defaults.metric
    description = defaults.description
    if study == "scale":  # the arms' models: 4 heads of dim d, whatever the default width
        description = re.sub(r"(dim|n_embd) \d+", r"\1 4·d", description)
        description = re.sub(r"\d+ heads", f"{SCALE_HEADS} heads", description)
    result = {
        "task": task, "study": spec.to_dict(), "seeds": seeds, "steps": steps, "batch_size": batch_size,
        "lr": lr, "eval_every": eval_every, "data_seed": data_seed, "arch": base_arch,
        "description": description, "metric": headline, "metric_keys": list(metric_keys),
        "higher_is_better": defaults.higher_is_better, "threads": threads or torch.get_num_threads(),
        "deterministic": True, "machine": _machine(), "wall_s": wall, "command": command,
        "matched_params": matched, "runs": runs,
        "summary": summarize(spec, runs, metric_keys, headline, defaults.higher_is_better),
        "files": [],
    }
    if analysis is not None:
        result["init_analysis"] = analysis
    if out:
        write_files(result, out)
    return result


def resummarize(result: dict) -> dict:
    """Recompute a saved result's summary from its per-seed runs (after a change to the rules)."""
    spec = study_arms(result["task"], result["study"]["name"])
    names = [a["name"] for a in result["study"]["arms"]]
    spec = type(spec)(spec.name, spec.claim, spec.source, tuple(a for a in spec.arms if a.name in names))
    result["summary"] = summarize(spec, result["runs"], tuple(result["metric_keys"]), result["metric"],
                                  result["higher_is_better"])
    return result


def write_files(result: dict, out: str) -> list[str]:
    """``out/study_<task>_<study>.{json,md,png}`` from a result (also to re-render a saved JSON)."""
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, f"study_{result['task']}_{result['study']['name']}")
    result["files"] = [base + ".json", base + ".md", base + ".png"]
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(report_markdown(result) + "\n")
    plot_study(result, base + ".png")
    return result["files"]


def report_markdown(result: dict) -> str:
    s = result["study"]
    m = result["machine"]
    lines = [f"# attnswap study --task {result['task']} --study {s['name']}", "",
             f"Claim tested ({s['source']}): {s['claim']}.", "",
             f"Model and data: {result['description']}. {result['steps']} steps, batch {result['batch_size']}, "
             f"AdamW lr {result['lr']:g} (warm-up + cosine), eval every {result['eval_every']} steps.", "",
             f"Command: `{result['command'] or 'attnswap.study.run_study(...)'}` — {m['processor']}, "
             f"{m['cpus']} CPUs, {result['threads']} torch thread(s), torch {m['torch']}; "
             f"wall time {result['wall_s'] / 60:.1f} min.", ""]
    if result["matched_params"]:
        for name, info in result["matched_params"].items():
            lines.append(f"`{name}`: MLP hidden width {info['mlp_hidden']} so that its parameter count is "
                         f"closest to {info['target_params']}.")
        lines.append("")
    lines.append(markdown_table(result))
    if "init_analysis" in result:
        lines += ["", "## At initialization", "", init_table(result["init_analysis"])]
    return "\n".join(lines)


def init_table(analysis: dict) -> str:
    header = ["q, k from", "head dim", "scale", "logit std", "mean max prob", "softmax ‖J·u‖/‖u‖",
              "‖∂L/∂logits‖", "‖∂L/∂q‖"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in analysis["rows"]:
        cells = [r["source"], str(r["head_dim"]), "1/sqrt(d)" if r["scaled"] else "1"]
        for qn, fmt in (("logit_std", ".3g"), ("max_prob", ".3f"), ("softmax_grad", ".3g"), ("grad_logits", ".3g"),
                        ("grad_q", ".3g")):
            cells.append(f"{r[qn]['mean']:{fmt}} ± {r[qn]['std']:{fmt}}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"{analysis['heads']} heads (width 4·d), first layer, mean ± std over seeds. "
              "`model`: the task's model at initialization on a real batch; `unit`: i.i.d. N(0, 1) q, k, v "
              "(the textbook premise)." + (" Causal; rows that see at least half the keys." if analysis["causal"]
                                           else "")]
    return "\n".join(lines)
