"""The ``attnswap`` command line.

    attnswap inspect MODEL                       # sites found and softmaxes left alone
    attnswap convert MODEL --attention sigmoid [--option key=value ...] --out DIR
    attnswap zoo [--json]                        # built-in models: sites, identity error, timings
    attnswap train --task digits|text --attention softmax sigmoid relu sas --steps N [--out DIR]
    attnswap study --task digits|text --study kinds|sigmoid-bias|relu-alpha|relu-activation|scale|sas
                   --seeds 0 1 2 [--steps N] [--out DIR]  # the papers' claims, mean ± std over seeds

MODEL is a built-in name (``attnswap zoo --list``; e.g. ``hf:gpt2-tiny``) or ``module.path:factory``
for your own model: ``factory()`` returns the model or ``(model, example_inputs)``.

Bad input (unknown model, a module that does not import, an unknown attention kind or option)
exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

KINDS = ("softmax", "sigmoid", "relu", "sas")
SWAP_KINDS = ("sigmoid", "relu", "sas")


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise UsageError(f"{message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _console(stderr=False):
    try:
        from rich.console import Console
    except ImportError:
        raise UsageError("the command line needs rich: pip install 'attnswap[cli]'") from None
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else max(160, int(os.environ.get("COLUMNS", 0) or 0))
    return Console(stderr=stderr, width=width)


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text} is below {low}; give an integer >= {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number > 0")
    return value


def _output_dir(path: str, what: str = "--out") -> str:
    """Create ``path`` now (before minutes of work) or say in one line why it cannot be."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{what} {path!r} is an existing file, not a directory; give a directory path")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{what} {path!r} cannot be created ({e.strerror or e}); give a writable "
                         "directory") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"{what} {path!r} is not writable; give a writable directory")
    return path


def _check_kinds(kinds, allowed=KINDS):
    for k in kinds:
        if k not in allowed:
            raise UsageError(f"unknown attention kind {k!r}; choose from {', '.join(allowed)}")


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _parse_options(items) -> dict:
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--option {item!r} is not key=value (e.g. --option sigmoid_bias=-2.5)")
        out[key.replace("-", "_")] = _parse_value(value)
    return out


def _validate_spec(attention, options):
    from .passes.retarget import RetargetSpec

    try:
        RetargetSpec.build(attention, **options)
    except ValueError as e:
        raise UsageError(" ".join(str(e).split())) from None


def _resolve(spec):
    from .models import ModelSpecError, resolve

    try:
        return resolve(spec)
    except ModelSpecError as e:
        raise UsageError(str(e)) from None


def _convert(built, attention, **options):
    from .rewriter.convert import convert

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return convert(built.model, attention, built.example_inputs, **options)
    except ValueError as e:  # bad example inputs / options: the user's to fix
        raise UsageError(" ".join(str(e).split())) from None


def _call(model, example):
    from .rewriter.convert import _example_call

    args, kwargs = _example_call(model, example)
    return model(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# inspect / convert
# --------------------------------------------------------------------------------------------

def cmd_inspect(a):
    built = _resolve(a.model)
    converted = _convert(built, "softmax")
    report = converted.attnswap_report
    if a.json:
        print(json.dumps({**report.to_dict(), "model": a.model, "class": report.model}, indent=2, default=str))
        return 0
    con = _console()
    con.print(report.table())
    if report.skipped:
        con.print(report.skipped_table())
    else:
        con.print("left alone: none (every softmax found is attention)")
    if not report.sites:
        con.print(f"no softmax attention found in {a.model}; nothing would be converted")
    return 0


def cmd_convert(a):
    import torch

    _check_kinds([a.attention])
    options = _parse_options(a.option)
    if a.qk_norm:
        options["qk_norm"] = True
    _validate_spec(a.attention, options)
    _output_dir(a.out)
    built = _resolve(a.model)
    converted = _convert(built, a.attention, **options)
    report = converted.attnswap_report
    if not report.sites:
        why = next((s.reason for s in report.skipped), "no softmax or attention call ran")
        raise UsageError(f"nothing converted in {a.model}: {' '.join(why.split())}; nothing saved "
                         f"(see 'attnswap inspect {a.model}')")
    torch.save(converted.state_dict(), os.path.join(a.out, "model.pt"))
    meta = {"model": a.model, "attention": a.attention, "options": options,
            "sites": len(report.sites), "report": report.to_dict(),
            "rebuild": "attnswap.models.rebuild(DIR)"}
    with open(os.path.join(a.out, "attnswap.json"), "w") as f:
        json.dump(meta, f, indent=2, default=str)
    con = _console()
    con.print(report.table())
    if report.skipped:
        con.print(report.skipped_table())
    con.print(f"saved {os.path.join(a.out, 'model.pt')} and {os.path.join(a.out, 'attnswap.json')} "
              f"({len(report.sites)} site(s) → {a.attention})")
    return 0


# --------------------------------------------------------------------------------------------
# zoo
# --------------------------------------------------------------------------------------------

def _time_fwd_bwd(model, example, reps):
    from .models import output_tensor

    def step():
        model.zero_grad(set_to_none=True)
        out = output_tensor(_call(model, example))
        out.float().pow(2).mean().backward()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):  # warm-up (compiles the backward)
            step()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def cmd_zoo(a):
    import torch

    from .models import REGISTRY, output_tensor

    if a.list:
        for name, e in REGISTRY.items():
            print(f"{name:28s} {e.description}")
        return 0
    models = a.models or list(REGISTRY)
    for m in models:
        if m not in REGISTRY:
            raise UsageError(f"unknown model {m!r}; choose from {', '.join(REGISTRY)}")
    _check_kinds(a.attention, SWAP_KINDS)
    rows = []
    from tqdm import tqdm

    for name in tqdm(models, desc="zoo", disable=a.json or None, file=sys.stderr):
        built = _resolve(name)
        model, ex = built.model, built.example_inputs
        with torch.no_grad():
            ref = output_tensor(_call(model, ex))
        ident = _convert(built, "softmax")
        with torch.no_grad():
            err = (output_tensor(_call(ident, ex)) - ref).abs().max().item()
        base = _time_fwd_bwd(model, ex, a.reps)
        row = {"model": name, "sites": len(ident.attnswap_report.sites),
               "left_alone": len(ident.attnswap_report.skipped), "identity_max_abs_err": err,
               "original_ms": base * 1e3, "ratio": {}}
        for kind in a.attention:
            conv = _convert(built, kind)
            row["ratio"][kind] = _time_fwd_bwd(conv, ex, a.reps) / base
        rows.append(row)
    if a.json:
        print(json.dumps({"reps": a.reps, "threads": torch.get_num_threads(), "models": rows}, indent=2))
        return 0
    from rich.table import Table

    t = Table(title="attnswap zoo: forward+backward time as a ratio to the original model (same run)")
    for col in ("model", "sites", "left alone", "identity max|Δ|", "original ms"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for kind in a.attention:
        t.add_column(f"{kind} ×", justify="right")
    for r in rows:
        t.add_row(r["model"], str(r["sites"]), str(r["left_alone"]), f"{r['identity_max_abs_err']:.1e}",
                  f"{r['original_ms']:.1f}", *(f"{r['ratio'][k]:.2f}" for k in a.attention))
    _console().print(t)
    return 0


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------

def cmd_train(a):
    _check_kinds(a.attention)
    options = _parse_options(a.option)
    from .training import options_for

    for key in options:
        if not any(options_for(k, {key: options[key]}) for k in a.attention):
            raise UsageError(f"option {key!r} applies to none of {', '.join(a.attention)}")
    for kind in a.attention:
        _validate_spec(kind, options_for(kind, options, a.qk_norm))
    _output_dir(a.out)
    from . import training

    try:
        result = training.compare(task=a.task, kinds=a.attention, steps=a.steps, seed=a.seed,
                                  out=a.out, qk_norm=a.qk_norm, options=options,
                                  batch_size=a.batch_size, lr=a.lr, eval_every=a.eval_every,
                                  threads=a.threads)
    except training.MissingDependency as e:
        raise UsageError(str(e)) from None
    con = _console()
    con.print(training.rich_table(result))
    con.print(f"wrote {', '.join(result['files'])}")
    return 0


# --------------------------------------------------------------------------------------------
# study
# --------------------------------------------------------------------------------------------

def cmd_study(a):
    _output_dir(a.out)
    arch = _parse_options(a.model_option)
    from . import training
    from .study import run_study

    import shlex

    command = "attnswap " + shlex.join(a.argv)
    try:
        result = run_study(task=a.task, study=a.study, seeds=a.seeds, steps=a.steps, out=a.out,
                           batch_size=a.batch_size, lr=a.lr, eval_every=a.eval_every, threads=a.threads,
                           arch=arch or None, arms=a.arms, head_dims=a.head_dims or None,
                           command=command)
    except training.MissingDependency as e:
        raise UsageError(str(e)) from None
    except ValueError as e:
        raise UsageError(" ".join(str(e).split())) from None
    from .study.aggregate import markdown_table

    print(markdown_table(result))
    print(f"wall time {result['wall_s']:.1f} s; wrote {', '.join(result['files'])}")
    return 0


# --------------------------------------------------------------------------------------------
# the parser
# --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="attnswap", description="Swap any PyTorch model's softmax attention for sigmoid, "
                "ReLU or SAS attention; inspect, convert, benchmark and train.",
                epilog="MODEL: a built-in name (attnswap zoo --list) or module.path:factory, where "
                "factory() returns the model or (model, example_inputs).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    s = sub.add_parser("inspect", help="report the attention sites found and the softmaxes left alone")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("convert", help="convert a model and save its state_dict and options")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--attention", required=True, metavar="KIND", help=f"one of {', '.join(KINDS)}")
    s.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="an attnswap.convert option, e.g. sigmoid_bias=-2.5, activation=relu2 (repeatable)")
    s.add_argument("--qk-norm", action="store_true", help="add QK-norm (same as --option qk_norm=true)")
    s.add_argument("--out", required=True, metavar="DIR")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("zoo", help="built-in models: sites, identity error, fwd+bwd time ratios")
    s.add_argument("--json", action="store_true", help="print machine-readable JSON")
    s.add_argument("--list", action="store_true", help="list the built-in model names and exit")
    s.add_argument("--models", nargs="+", metavar="MODEL", help="a subset of the built-in models")
    s.add_argument("--attention", nargs="+", default=list(SWAP_KINDS), metavar="KIND",
                   help="kinds to time (default: sigmoid relu sas)")
    s.add_argument("--reps", type=_at_least(1), default=10, help="timed repetitions (median; default 10)")
    s.set_defaults(fn=cmd_zoo)

    s = sub.add_parser("train", help="train one small model per attention kind; plot and summarize")
    s.add_argument("--task", choices=("digits", "text"), default="digits",
                   help="digits: tiny ViT on sklearn's 8x8 digits; text: byte-level GPT-2 on the "
                        "Python standard library's source")
    s.add_argument("--attention", nargs="+", default=list(KINDS), metavar="KIND",
                   help="kinds to train (default: softmax sigmoid relu sas)")
    s.add_argument("--steps", type=_at_least(1), default=None, help="optimizer steps per kind (default: 300)")
    s.add_argument("--out", default=None, metavar="DIR", help="where the PNG/JSON/markdown go "
                   "(default: runs/train_<task>)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=_at_least(1), default=None)
    s.add_argument("--lr", type=_positive_float, default=None)
    s.add_argument("--eval-every", type=_at_least(1), default=None)
    s.add_argument("--threads", type=_at_least(1), default=None, help="torch threads (default: torch's)")
    s.add_argument("--qk-norm", action="store_true", help="QK-norm on every kind (the sigmoid paper "
                   "pairs b = -ln n with QK-norm)")
    s.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="an attnswap.convert option for every kind that accepts it")
    s.set_defaults(fn=cmd_train)

    from .study.arms import STUDIES

    s = sub.add_parser("study", help="a paper's claim at small scale: every arm per seed, mean ± std, "
                       "table and plot with a band over seeds")
    s.add_argument("--task", choices=("digits", "text"), default="digits")
    s.add_argument("--study", choices=STUDIES, required=True,
                   help="kinds: all four kinds; sigmoid-bias: b=-ln n vs b=0 vs +QK-norm; relu-alpha: "
                        "alpha in 0, 0.5, 1, 1.5; relu-activation: the seven h; scale: 1/sqrt(d) at init "
                        "and in training; sas: SAS vs softmax at near-equal parameters")
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    s.add_argument("--steps", type=_at_least(1), default=300, help="optimizer steps per arm and seed (default 300)")
    s.add_argument("--out", default="runs/study", metavar="DIR",
                   help="where study_<task>_<study>.{json,md,png} go (default runs/study)")
    s.add_argument("--batch-size", type=_at_least(1), default=None)
    s.add_argument("--lr", type=_positive_float, default=None)
    s.add_argument("--eval-every", type=_at_least(1), default=None)
    s.add_argument("--threads", type=_at_least(1), default=1, help="torch threads (default 1: the same numbers "
                   "on any machine with this CPU type)")
    s.add_argument("--arms", nargs="+", default=None, metavar="ARM", help="a subset of the study's arms")
    s.add_argument("--model-option", action="append", metavar="KEY=VALUE",
                   help="override the task's model for every arm, e.g. embed_dim=32, depth=1")
    s.add_argument("--head-dims", type=_at_least(1), nargs="+", default=None,
                   help="scale study: head dims of the analysis at init (default 16 32 64 128 256)")
    s.set_defaults(fn=cmd_study)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
        a.argv = list(sys.argv[1:] if argv is None else argv)   # recorded with a study's results
        if not getattr(a, "command", None):
            parser.print_help()
            return 2
        if a.command == "train":
            a.steps = a.steps if a.steps is not None else 300
            a.out = a.out or os.path.join("runs", f"train_{a.task}")
        return a.fn(a) or 0
    except UsageError as e:
        print(f"attnswap: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnswap: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
