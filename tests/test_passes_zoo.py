"""The identity oracle and coverage on the model zoo (DESIGN.md §5.1, §5.3).

For every positive case, ``convert(model, "softmax")`` finds exactly the model's attention layers
(counted from the model itself) and reproduces the original outputs and all parameter gradients
within 1e-5 (fp32) on inputs other than the example ones (padded batches, a second length for
causal LMs). Every negative is left alone: zero sites, bit-identical outputs, a reason reported.
"""

import warnings

import pytest
import torch

import attnswap
from zoo import ZOO, negatives, positives

ATOL = 1e-5  # fp32


def _convert(case, model, attention="softmax", **options):
    args, kwargs = case.inputs(batch=2, seed=0)
    return attnswap.convert(model, attention, attnswap.ExampleInputs(args, kwargs), **options)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(case, model, batch, seq, seed):
    args, kwargs = case.inputs(batch=batch, seq=seq, seed=seed)
    model.zero_grad(set_to_none=True)
    out = case.output_of(model(*args, **kwargs))
    out.float().square().mean().backward()
    return out.detach(), _grads(model)


@pytest.mark.parametrize("case", positives(), ids=lambda c: c.name)
def test_identity_and_coverage(case):
    model = case.build()
    converted = _convert(case, model)
    report = converted.attnswap_report
    assert len(report.sites) == case.count_attention(model), str(report)
    assert all(r.kind == "softmax" for r in report.sites)
    seqs = (None, 5) if "causal" in case.tags else (None,)
    for seq in seqs:
        attnswap.reset_call_counts()
        ref_out, ref_grads = _run(case, model, batch=3, seq=seq, seed=1)
        out, grads = _run(case, converted, batch=3, seq=seq, seed=1)
        assert attnswap.total_calls() >= len(report.sites), "converted attention did not run"
        torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=1e-4)
        assert grads.keys() == ref_grads.keys()
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], atol=ATOL, rtol=1e-4,
                                       msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", negatives(), ids=lambda c: c.name)
def test_negatives_left_alone(case):
    model = case.build()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        converted = _convert(case, model)
    report = converted.attnswap_report
    assert len(report.sites) == 0, str(report)
    assert report.skipped, "a softmax left alone must come with a reason"
    args, kwargs = case.inputs(batch=2, seed=3)
    with torch.no_grad():
        a = case.output_of(model(*args, **kwargs))
        b = case.output_of(converted(*args, **kwargs))
    assert torch.equal(a, b)
