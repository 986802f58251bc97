"""The CPU kernel's thread pool does not make results depend on scheduling: the same inputs give
bitwise the same outputs and gradients, call after call (every kind; GQA groups split across
tasks, whose dK/dV partial sums are added in task order; a float mask whose gradient tasks add
up; dropout). Workers run their ops single-threaded and results are combined in a fixed order,
whatever order the workers finish in."""

from __future__ import annotations

import pytest
import torch

from attnswap import attention
from attnswap.kernels import cpu, cpu_fused


@pytest.mark.parametrize("kind,kw", [("softmax", {}), ("sigmoid", {}),
                                     ("relu", {"length": "visible"}),
                                     ("sigmoid", {"dropout_p": 0.2, "dropout_seed": 7})])
def test_cpu_pool_results_are_bitwise_repeatable(monkeypatch, kind, kw):
    monkeypatch.setenv(cpu.ENV_THREADS, "3")  # more workers than cores: finishing order varies
    monkeypatch.setenv(cpu.ENV_BLOCK, "32")
    monkeypatch.setenv(cpu_fused.ENV_FUSED, "0")  # the tiled kernel's pool is what this tests
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, D = 1, 6, 2, 96, 16  # 3 query heads per kv head: groups split across tasks
    monkeypatch.setattr(cpu, "PARALLEL_MIN_SCORES", 1)  # always take the pool
    q = torch.randn(B, Hq, T, D, generator=g)
    k, v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    mask = torch.randn(B, Hq, T, T, generator=g)
    do = torch.randn(B, Hq, T, D, generator=g)
    tasks = cpu.plan_tasks(B, Hq, Hkv, cpu.num_workers())
    assert len(tasks) > 1 and any(h0 % (Hq // Hkv) for _, _, h0, _ in tasks)

    def run():
        ins = [t.clone().requires_grad_(True) for t in (q, k, v, mask)]
        out = attention(*ins[:3], ins[3], kind=kind, impl="cpu", is_causal=True, **kw)
        return [out.detach()] + [x.detach() for x in torch.autograd.grad(out, ins, do)]

    first = run()
    for _ in range(4):
        for a, b in zip(first, run()):
            assert torch.equal(a, b)
