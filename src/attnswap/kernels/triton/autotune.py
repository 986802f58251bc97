"""Launch configurations of the attention kernels.

* On a GPU: a list of candidate tiles (``BLOCK_M`` query rows x ``BLOCK_N`` keys, warps, stages),
  pruned per device and head dim: Hopper (sm90, H100/H200) gets large 128-row tiles with 3-stage
  pipelines; other cards a smaller fallback list; any tile whose estimated shared memory exceeds the
  card's opt-in limit is dropped (the smallest always survives). Every config is correct: all
  kernels mask their row, key and head-dim tails whatever the tile.
* Under ``TRITON_INTERPRET=1``: exactly one config (the autotuner crashes with more and no GPU),
  64 x 64 tiles: the interpreter costs ~3 ms per block step nearly regardless of tile size.

The autotune key is the kernel's length buckets (powers of two, so a new sequence length does not
re-tune), head dims, kind flags and, added by the autotuner itself, the tensors' dtypes.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from .common import INTERPRET

# (BLOCK_M, BLOCK_N, num_warps, num_stages)
#
# The Hopper lists hold only tiles that compile for sm90 with 0 register spills and one MUFU op
# per score (sigmoid), checked by compile_check.py / tests/test_kernels_sm90.py at head dims 64
# and 128, bf16/fp16, with and without masks. Dropped for spilling (hd 128, bytes of spill
# stores; Triton 3.8, ptxas 13): fwd (128,64,4,3) 540, (128,32,4,3) 8-88; dQ (128,128,8,2) 112,
# (128,32,4,3) 232, (64,128,4,2) 236; dK/dV (128,128,8,2) 1232, (64,64,4,3) 124,
# (32,128,4,3) 3348, (32,64,4,2) 20, and (128,64,8,2) which also computes every score twice (2
# MUFU ops per score: its layout replicates the transposed tile across warps).
_FWD_HOPPER = [
    (128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 3), (64, 64, 4, 3),
    (64, 32, 4, 2),
]
_FWD_GENERIC = [(128, 64, 4, 2), (64, 64, 4, 2), (64, 32, 4, 2)]

# dQ: BLOCK_M query rows resident, loop over BLOCK_N keys.
_DQ_HOPPER = [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)]
_DQ_GENERIC = [(64, 64, 4, 2), (128, 32, 4, 2), (64, 32, 4, 2)]

# dK/dV: BLOCK_N keys resident, loop over BLOCK_M query rows. (64,128,8,3) spills 296 B when it
# also writes the float-mask gradient (DMASK), 20 B with FAST_SIG's inline asm, 44 B with
# ATOMIC_DQ: dropped there.
_DKDV_HOPPER = [(64, 128, 8, 3), (32, 128, 8, 3)]
_DKDV_GENERIC = [(64, 64, 4, 2), (32, 128, 4, 2), (32, 64, 4, 2)]

_INTERPRETER_TILE = (64, 64)


def _configs(hopper, generic):
    if INTERPRET:
        bm, bn = _INTERPRETER_TILE
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=1)]
    seen, out = set(), []
    for t in hopper + generic:
        if t not in seen:
            seen.add(t)
            bm, bn, w, s = t
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    return out


def fwd_configs():
    return _configs(_FWD_HOPPER, _FWD_GENERIC)


def dq_configs():
    return _configs(_DQ_HOPPER, _DQ_GENERIC)


def dkdv_configs():
    return _configs(_DKDV_HOPPER, _DKDV_GENERIC)


# ATTNSWAP_AUTOTUNE=0: take the first tile that survives pruning instead of benchmarking them all
# (bench/gpu_check.sh runs the test suite on a GPU that way: one compile per specialization).
ENV_AUTOTUNE = "ATTNSWAP_AUTOTUNE"

# ((major, minor), shared memory per block) that the pruners use instead of asking the GPU:
# set by compile_check.compile_only, which compiles for a device that is not there.
DEVICE_OVERRIDE = None


@functools.lru_cache(maxsize=None)
def _device_info(index: int):
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
    return (props.major, props.minor), smem


def _tile(cfg):
    return (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages)


def _make_pruner(hopper, generic, smem_of):
    hopper_set, generic_set = set(hopper), set(generic)

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        q = args.get("Q")
        bd, bdv = args.get("BLOCK_D", 64), args.get("BLOCK_DV", 64)
        elsize = q.element_size() if isinstance(q, torch.Tensor) else 2
        mask = args.get("Mask")
        # A mask read per element is a [BLOCK_M, BLOCK_N] tile per pipeline stage as well.
        mask_el = (mask.element_size() if isinstance(mask, torch.Tensor)
                   and (args.get("MASK_ADD") or args.get("MASK_VIS")) else 0)
        if DEVICE_OVERRIDE is not None:
            cap, smem_limit = DEVICE_OVERRIDE
        elif isinstance(q, torch.Tensor) and q.is_cuda:
            cap, smem_limit = _device_info(q.device.index or 0)
        else:  # pragma: no cover - interpreter never prunes (single config)
            cap, smem_limit = (8, 0), 99 * 1024
        wanted = hopper_set if cap[0] == 9 else generic_set
        cands = [c for c in configs if _tile(c) in wanted] or list(configs)
        fits = [c for c in cands if smem_of(*_tile(c), bd, bdv, elsize, mask_el) <= smem_limit]
        if not fits:
            # nothing fits the estimate: keep the smallest tile and let the compiler decide.
            fits = [min(cands, key=lambda c: smem_of(*_tile(c), bd, bdv, elsize, mask_el))]
        if ((args.get("DMASK") or args.get("FAST_SIG") or args.get("ATOMIC_DQ"))
                and "DMASK" in args and cap[0] == 9):
            # dK/dV writing the mask gradient, with tanh.approx inline asm, or also computing
            # dQ (atomic backward): 64x128 spills (296, 20, 44 B at head dim 128)
            small = [c for c in fits if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 32 * 128]
            fits = small or fits
        if bd > 128 or bdv > 128:
            # 256-wide heads: 128x128 fp32 score tiles plus 128x256 accumulators spill badly.
            small = [c for c in fits if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 64]
            fits = small or fits
        if os.environ.get(ENV_AUTOTUNE, "1") == "0":
            fits = fits[:1]  # the list's first (preferred) tile: one compile, no benchmarking
        return fits

    return prune


def _smem_fwd(bm, bn, w, s, bd, bdv, el, mel=0):
    return el * (bm * bd + s * bn * (bd + bdv)) + s * bm * bn * mel


def _smem_dq(bm, bn, w, s, bd, bdv, el, mel=0):
    return el * (bm * (bd + bdv) + s * bn * (bd + bdv)) + s * bm * bn * mel


def _smem_dkdv(bm, bn, w, s, bd, bdv, el, mel=0):
    return el * (bn * (bd + bdv) + s * bm * (bd + bdv)) + s * bm * bn * mel


prune_fwd = _make_pruner(_FWD_HOPPER, _FWD_GENERIC, _smem_fwd)
prune_dq = _make_pruner(_DQ_HOPPER, _DQ_GENERIC, _smem_dq)
prune_dkdv = _make_pruner(_DKDV_HOPPER, _DKDV_GENERIC, _smem_dkdv)

AUTOTUNE_KEY = ["TQ_BUCKET", "TK_BUCKET", "HEAD_DIM", "HEAD_DIM_V", "KIND", "ACT", "CAUSAL",
                "MASK_ADD", "MASK_VIS", "DROPOUT", "VISIBLE", "GROUPS", "STATS", "DMASK", "ATOMIC_DQ"]


def length_bucket(n: int) -> int:
    """Autotune bucket of a length: the next power of two (at least 64)."""
    return max(64, triton.next_power_of_2(max(int(n), 1)))
