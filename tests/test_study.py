"""``attnswap study``: a tiny version of every study (2 steps, 2 seeds, a one-layer model).

Checks the JSON's structure, that every mean/std/paired difference is what the per-seed numbers
give (recomputed here with numpy, sample std), that each arm really ran the conversion it names
(kinds, options and — for the scale study — the scale the converter read from the graph), that
the same call gives the same numbers, and the initialization analysis against SDPA + autograd.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("timm")

from attnswap.study import STUDIES, run_study, study_arms  # noqa: E402
from attnswap.study.scale import attention_stats  # noqa: E402

SEEDS = [0, 1]
STEPS = 2
DIGITS = dict(batch_size=8, eval_every=STEPS, arch={"embed_dim": 16, "depth": 1, "num_heads": 2},
              head_dims=(16, 32))
# (task, study) → run_study settings: the six studies on digits (a few arms of the two ReLU
# ablations: every activation and alpha is already covered by the kernel tests); text once, for
# GPT-2's own scale switch and the causal analysis (its conversions are this file's slowest part).
TINY = {("digits", s): DIGITS for s in STUDIES}
TINY[("digits", "relu-alpha")] = {**DIGITS, "arms": ["softmax", "relu alpha=0", "relu alpha=1"]}
TINY[("digits", "relu-activation")] = {**DIGITS, "arms": ["softmax", "relu h=gelu", "relu h=identity"]}
TINY[("text", "scale")] = dict(batch_size=16, eval_every=STEPS, arch={"n_embd": 16, "n_layer": 1, "n_head": 2},
                               head_dims=(16,), arms=["d=16 no scale"])
CASES = list(TINY)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = {}
    for task, study in CASES:
        if task == "text":
            pytest.importorskip("transformers")
        d = tmp_path_factory.mktemp(f"{task}-{study}")
        run_study(task, study, seeds=SEEDS, steps=STEPS, out=str(d), progress=False, **TINY[(task, study)])
        out[(task, study)] = d / f"study_{task}_{study}"
    return out


def _load(base):
    return json.loads(base.with_suffix(".json").read_text())


def _np_mean_std(vals):
    a = np.asarray(vals, dtype=np.float64)
    return a.mean(), (a.std(ddof=1) if len(a) > 1 else 0.0)


@pytest.mark.parametrize("task,study", CASES, ids=[f"{t}-{s}" for t, s in CASES])
def test_files_and_structure(results, task, study):
    base = results[(task, study)]
    res = _load(base)
    assert base.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = base.with_suffix(".md").read_text()
    arms = [a["name"] for a in res["study"]["arms"]]
    expected = [a.name for a in study_arms(task, study).arms]
    assert arms == [a for a in expected if a in (TINY[(task, study)].get("arms") or expected)]
    assert res["seeds"] == SEEDS and res["steps"] == STEPS and res["deterministic"] is True
    assert res["machine"]["torch"] == torch.__version__ and res["wall_s"] > 0
    assert sorted((r["arm"], r["seed"]) for r in res["runs"]) == sorted((a, s) for a in arms for s in SEEDS)
    for r in res["runs"]:
        assert len(r["losses"]) == STEPS and all(math.isfinite(x) for x in r["losses"])
        assert [e["step"] for e in r["evals"]] == [STEPS]
        for k in res["metric_keys"]:
            assert r[k] == r["evals"][-1][k]
        assert r["train_loss_mean"] == pytest.approx(sum(r["losses"]) / STEPS, rel=1e-12)
    for a in arms:
        assert f"| {a} |" in md
    if study == "scale":
        assert "## At initialization" in md


@pytest.mark.parametrize("task,study", CASES, ids=[f"{t}-{s}" for t, s in CASES])
def test_mean_std_and_paired_deltas_match_per_seed_numbers(results, task, study):
    res = _load(results[(task, study)])
    runs = {(r["arm"], r["seed"]): r for r in res["runs"]}
    for arm in res["study"]["arms"]:
        s = res["summary"][arm["name"]]
        for key in ("final_train_loss", "train_loss_mean", "params", *res["metric_keys"]):
            vals = [runs[(arm["name"], seed)][key] for seed in SEEDS]
            m, sd = _np_mean_std(vals)
            assert s[key]["values"] == vals
            assert s[key]["mean"] == pytest.approx(m, rel=1e-12, abs=1e-15)
            assert s[key]["std"] == pytest.approx(sd, rel=1e-9, abs=1e-15)
        base = s.get("baseline")
        if base is None:
            continue
        head = res["metric"]
        diffs = [runs[(arm["name"], seed)][head] - runs[(base, seed)][head] for seed in SEEDS]
        m, sd = _np_mean_std(diffs)
        assert s[f"delta_{head}"]["mean"] == pytest.approx(m, abs=1e-12)
        assert s[f"delta_{head}"]["std"] == pytest.approx(sd, abs=1e-12)
        b = res["summary"][base][head]
        gap = abs(s[head]["mean"] - b["mean"])
        within = gap <= max(s[head]["std"], b["std"]) or abs(m) <= sd
        assert (s["verdict"] == "no measurable difference") == within


@pytest.mark.parametrize("task,study", CASES, ids=[f"{t}-{s}" for t, s in CASES])
def test_each_arm_ran_the_conversion_it_names(results, task, study):
    res = _load(results[(task, study)])
    layers = res["arch"]["depth" if task == "digits" else "n_layer"]
    for r in res["runs"]:
        arm = next(a for a in res["study"]["arms"] if a["name"] == r["arm"])
        assert r["sites"] == layers and r["site_kinds"] == [arm["attention"]] * layers
        assert r["options"] == arm["options"]
        if study == "scale":
            d = int(arm["name"].split()[0].removeprefix("d="))
            want = d ** -0.5 if arm["arch"]["attn_scale"] == "scaled" else 1.0
            assert r["site_scales"] == pytest.approx([want] * layers, rel=1e-6)
    if study == "sas":
        by = {a: res["summary"][a]["params"]["mean"] for a in res["summary"]}
        wide = "softmax, wider MLP (params = sas)"
        assert by["sas"] > by["softmax"]
        assert abs(by[wide] - by["sas"]) <= 0.02 * by["sas"]   # one MLP unit is a few dozen params


def test_same_call_same_numbers(results):
    """Seed 1 alone, after other runs in this process, gives exactly seed 1's numbers."""
    first = [r for r in _load(results[("digits", "sas")])["runs"] if r["seed"] == 1]
    again = run_study("digits", "sas", seeds=[1], steps=STEPS, progress=False, **DIGITS)["runs"]
    assert [r["arm"] for r in first] == [r["arm"] for r in again]
    for a, b in zip(first, again):
        assert a["losses"] == b["losses"] and a["evals"] == b["evals"] and a["params"] == b["params"]


def test_scale_analysis_structure_and_direction(results):
    res = _load(results[("digits", "scale")])
    rows = res["init_analysis"]["rows"]
    dims = DIGITS["head_dims"]
    assert sorted((r["source"], r["head_dim"], r["scaled"]) for r in rows) == sorted(
        (src, d, sc) for src in ("model", "unit") for d in dims for sc in (True, False))
    for r in rows:
        for q in ("max_prob", "softmax_grad", "grad_q"):
            m, sd = _np_mean_std([r["per_seed"][str(s)][q] for s in SEEDS])
            assert r[q]["mean"] == pytest.approx(m) and r[q]["std"] == pytest.approx(sd, abs=1e-12)
        if r["source"] == "unit":   # N(0,1) q, k: the scaled logits have unit std, unscaled √d
            want = 1.0 if r["scaled"] else math.sqrt(r["head_dim"])
            assert r["logit_std"]["mean"] == pytest.approx(want, rel=0.1)
    for d in dims:
        pick = {(r["source"], r["scaled"]): r for r in rows if r["head_dim"] == d}
        for src in ("model", "unit"):
            assert pick[(src, False)]["max_prob"]["mean"] > pick[(src, True)]["max_prob"]["mean"]


@pytest.mark.parametrize("causal", [False, True])
def test_attention_stats_against_sdpa_and_autograd(causal):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 12, 8, generator=g, dtype=torch.float64) for _ in range(3))
    scale, seed = 0.7, 11
    got = attention_stats(q, k, v, scale, causal, seed)

    gen = torch.Generator().manual_seed(seed)      # the same draws as attention_stats makes
    upstream = torch.randn(2, 3, 12, 8, generator=gen, dtype=torch.float64)
    u = torch.randn(2, 3, 12, 12, generator=gen, dtype=torch.float64)
    qq = q.clone().requires_grad_(True)
    out = torch.nn.functional.scaled_dot_product_attention(qq, k, v, is_causal=causal, scale=scale)
    (out * upstream).sum().backward()
    keep = torch.ones(12, 12, dtype=torch.bool).tril() if causal else torch.ones(12, 12, dtype=torch.bool)
    rows = torch.arange(12) >= (5 if causal else 0)
    logits = (scale * q @ k.transpose(-2, -1)).masked_fill(~keep, float("-inf"))
    p, vjp = torch.func.vjp(lambda z: z.softmax(-1), logits)
    u = u.masked_fill(~keep, 0.0)
    (ju,) = vjp(u)
    ju = ju.masked_fill(~keep, 0.0)
    assert got["max_prob"] == pytest.approx(p.amax(-1)[..., rows].mean().item(), rel=1e-12)
    assert got["grad_q"] == pytest.approx(qq.grad.norm(dim=-1)[..., rows].mean().item(), rel=1e-9)
    assert got["softmax_grad"] == pytest.approx((ju.norm(dim=-1) / u.norm(dim=-1))[..., rows].mean().item(),
                                                rel=1e-9)


def test_cli_study_writes_the_files_and_records_the_command(tmp_path, capsys):
    from attnswap.cli import main

    argv = ["study", "--task", "digits", "--study", "sigmoid-bias", "--arms", "sigmoid b=0", "--seeds", "0", "1",
            "--steps", "2", "--batch-size", "8", "--eval-every", "2", "--model-option", "embed_dim=16",
            "--model-option", "depth=1", "--out", str(tmp_path)]
    assert main(argv) == 0
    res = json.loads((tmp_path / "study_digits_sigmoid-bias.json").read_text())
    assert res["command"].startswith("attnswap study --task digits --study sigmoid-bias --arms 'sigmoid b=0'")
    assert res["arch"] == {"embed_dim": 16, "depth": 1} and res["threads"] == 1
    assert [r["options"] for r in res["runs"]] == [{"sigmoid_bias": 0.0}] * 2
    assert "| sigmoid b=0 |" in capsys.readouterr().out
    assert (tmp_path / "study_digits_sigmoid-bias.png").exists()


def test_cli_rejects_bad_study_input(capsys):
    from attnswap.cli import main

    assert main(["study", "--study", "kinds", "--arms", "no-such-arm", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown arm" in err[0]
    assert main(["study", "--study", "kinds", "--steps", "0"]) == 2


@pytest.mark.parametrize("task_name", ["digits", "text"])
def test_model_qkv_are_the_first_layers_own(task_name):
    """proj(SDPA(q, k, v)) from the extracted q, k, v equals the first attention module's output."""
    from attnswap import training
    from attnswap.study.scale import model_qkv

    if task_name == "text":
        pytest.importorskip("transformers")
    width = "embed_dim" if task_name == "digits" else "n_embd"
    task = training.TASKS[task_name](0, 4, arch={width: 32})
    q, k, v = model_qkv(task)
    attn = task.model.blocks[0].attn if task_name == "digits" else task.model.transformer.h[0].attn
    seen = {}

    def grab(module, args, out):
        seen["out"] = out[0] if isinstance(out, tuple) else out

    handle = attn.register_forward_hook(grab)
    ex = task.example
    with torch.no_grad():
        task.model(**ex) if isinstance(ex, dict) else task.model(ex)
        handle.remove()
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=task_name == "text")
        o = o.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
        o = attn.proj(o) if task_name == "digits" else attn.c_proj(o)
    torch.testing.assert_close(o, seen["out"], atol=1e-5, rtol=1e-5)
