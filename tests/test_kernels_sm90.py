"""What the Triton kernels compile to on Hopper (sm90), checked without a GPU.

``attnswap.kernels.triton.compile_check`` runs the real launch path (``fwd.forward`` and
``bwd.backward``: argument preparation, Triton's specialization of every argument, the autotuner's
pruning for an sm90 device with 232,448 B of shared memory) and compiles every surviving autotune
config instead of launching it; ptxas and cuobjdump (shipped with Triton) report registers,
spills and the SASS. Asserted per compiled kernel and config:

* 0 bytes of register spills;
* shared memory within Hopper's opt-in limit;
* MUFU ops per score: exactly 1 for sigmoid (the accurate path: one ``ex2``, the reciprocal on
  the FMA pipe; ``fast_sigmoid``: one ``tanh``). The kernels before this check used ``ex2`` plus
  ``div.full`` (``MUFU.RCP``): 2 per score, which fails here.

Cases: sigmoid with a causal bool mask, ``fast_sigmoid``, and the 5-matmul atomic-dQ backward.

The compile runs in a subprocess (TRITON_INTERPRET must be unset there) and takes about a minute
on two cores; the shared-memory estimate's own test below is instant.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
CASES = ["sigmoid-causal-bool-hd128", "sigmoid-fast-hd128", "sigmoid-atomic-dq-hd128"]


def _compile(cases):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "attnswap.kernels.triton.compile_check", *cases],
                       env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0 and "ptxas" in r.stderr and "not found" in r.stderr.lower():
        pytest.skip("ptxas is not available")
    assert r.returncode == 0, r.stderr[-4000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_every_sm90_config_compiles_without_spills_at_one_mufu_per_score():
    pytest.importorskip("triton.backends.compiler")
    got = _compile(CASES)
    kernels = {(d["case"], d["kernel"]) for d in got}
    for case in CASES:  # forward, dQ and dK/dV each compiled, every config the pruner keeps
        for k in ("_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv"):
            if "atomic" in case and k == "_attn_bwd_dq":  # the 5-matmul backward has none
                assert (case, k) not in kernels
                continue
            assert (case, k) in kernels, f"{case}: {k} was not compiled"
    for d in got:
        what = f"{d['case']} {d['kernel']} {d['config']}"
        print(what, f"regs {d['regs']} spills {d['spill_stores']} smem {d['shared']} "
              f"MUFU {d['mufu']} per score {d['mufu_per_score']:.3f}")
        assert d["spill_stores"] == 0 and d["spill_loads"] == 0, f"{what} spills registers"
        assert 0 < d["shared"] <= 232_448, f"{what} needs {d['shared']} B of shared memory"
        assert abs(d["mufu_per_score"] - 1.0) < 0.01, f"{what}: {d['mufu']} MUFU ops"
        if "fast" in d["case"]:
            assert set(d["mufu"]) == {"TANH"}, what
        else:
            assert set(d["mufu"]) == {"EX2"}, f"{what}: the accurate sigmoid must not use RCP"


def test_shared_memory_estimate_counts_the_mask_tile():
    """Causal + bool mask at 128x128, 3 stages, hd 128, bf16: Q + 3 stages of K and V tiles is
    229,376 B, and the mask tile per stage takes it to 278,528 B, past Hopper's 232,448 B: the
    pruner must drop that tile there and keep it without a mask."""
    import triton

    from attnswap.kernels.triton import autotune

    cfgs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in autotune._FWD_HOPPER]
    q = torch.empty(1, 1, 1, 128, dtype=torch.bfloat16)
    big = (128, 128, 8, 3)
    old = autotune.DEVICE_OVERRIDE
    autotune.DEVICE_OVERRIDE = ((9, 0), 232_448)
    try:
        def kept(mask, vis):
            args = dict(Q=q, Mask=mask, MASK_ADD=False, MASK_VIS=vis, BLOCK_D=128, BLOCK_DV=128)
            return {autotune._tile(c) for c in autotune.prune_fwd(cfgs, args)}

        assert big in kept(torch.empty(1, dtype=torch.float32), False)  # no mask read
        with_mask = kept(torch.empty(1, dtype=torch.uint8), True)
        assert big not in with_mask and (128, 64, 8, 3) in with_mask
    finally:
        autotune.DEVICE_OVERRIDE = old
    assert autotune._smem_fwd(128, 128, 8, 3, 128, 128, 2, 1) == 278_528
