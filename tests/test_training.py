"""Converted models train: loss falls over 30 AdamW steps on a fixed batch, every parameter
(SAS / QK-norm ones included) gets a finite gradient, and state_dict round-trips into a freshly
converted model with identical outputs."""

import pytest
import torch

import attnswap
from zoo import ZOO

STEPS = 30

MODELS = {
    "gpt2": "hf:gpt2-eager",
    "llama-gqa": "hf:llama-eager",
    "timm-vit": "timm:vit_tiny-unfused",
}
KINDS = [("sigmoid", {}), ("relu", {}), ("sas", {})]
# Softmax training is the model's own; QK-norm adds parameters like SAS: one model each keeps
# the suite fast while every parameter-adding path is still trained and round-tripped.
EXTRA = [("gpt2", "sigmoid", {"qk_norm": True})]


def _batch(case):
    args, kwargs = case.inputs(batch=4, seed=0)
    return args, kwargs


def _loss(case, model, args, kwargs):
    out = case.output_of(model(*args, **kwargs))
    if "causal" in case.tags:  # next-token prediction on the batch itself
        ids = kwargs["input_ids"]
        return torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]),
                                                 ids[:, 1:].reshape(-1))
    target = torch.arange(out.shape[0]) % out.shape[-1]
    return torch.nn.functional.cross_entropy(out.reshape(out.shape[0], -1)[:, : out.shape[-1]], target)


CASES = [(m, k, o) for m in MODELS for k, o in KINDS] + EXTRA


@pytest.mark.parametrize("name,kind,options", CASES,
                         ids=[f"{m}-{k}" + "".join(f"-{a}" for a in o) for m, k, o in CASES])
def test_kind_trains_and_round_trips(name, kind, options):
    case = ZOO[MODELS[name]]
    torch.manual_seed(0)
    model = case.build()
    args, kwargs = _batch(case)
    converted = attnswap.convert(model, kind, attnswap.ExampleInputs(args, kwargs), **options)
    converted.train()
    opt = torch.optim.AdamW(converted.parameters(), lr=3e-3)
    attnswap.reset_call_counts()
    losses = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = _loss(case, converted, args, kwargs)
        loss.backward()
        if step == 0:
            missing = [n for n, p in converted.named_parameters()
                       if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
            assert not missing, f"no finite gradient for {missing[:5]}"
        opt.step()
        losses.append(loss.item())
    assert attnswap.total_calls() >= STEPS * len(converted.attnswap_report.sites)
    assert losses[-1] < 0.8 * losses[0], losses

    converted.eval()
    state = converted.state_dict()
    if kind == "sas" or options.get("qk_norm"):
        assert any(".attnswap." in k for k in state)
    fresh = attnswap.convert(case.build(), kind, attnswap.ExampleInputs(args, kwargs), **options)
    fresh.load_state_dict(state)
    fresh.eval()
    with torch.no_grad():
        a = case.output_of(converted(*args, **kwargs))
        b = case.output_of(fresh(*args, **kwargs))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_train_command_prints_the_same_numbers_in_two_fresh_processes(tmp_path):
    """`attnswap train` with one seed gives the same losses and accuracies, bitwise, in every
    run and for every kind (issue 14): two processes, started together, compared field by field
    (wall-clock timings aside)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "attnswap.cli", "train", "--task", "digits",
                               "--steps", "2", "--eval-every", "2", "--threads", "1",
                               "--out", str(tmp_path / f"run{i}")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
             for i in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    a, b = (json.loads((tmp_path / f"run{i}" / "train_digits.json").read_text()) for i in (0, 1))
    assert [r["kind"] for r in a["runs"]] == ["softmax", "sigmoid", "relu", "sas"]
    timing = ("wall_s", "ms_per_step", "step_ms", "time")
    for x, y in zip(a["runs"], b["runs"]):
        for key in x:
            if any(t in key for t in timing):
                continue
            assert x[key] == y[key], f"{x['kind']}: {key} differs between two runs"
        assert x["losses"] and x["evals"]
