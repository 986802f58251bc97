"""Backward kernels: P is recomputed blockwise from Q, K, V, dO; nothing T x T is stored
(except the optional float-mask gradient, see below).

By default two kernels, no atomics (deterministic, and safe to autotune since no output
accumulates across launches):

* ``_attn_bwd_dq``: one program per (query block, query head, batch), looping over key blocks like
  the forward: ``dQ = scale * sum_j dS_ij K_j``. For ReLU with ``length="visible"`` it also counts
  each row's visible keys and stores ``L_i^-alpha`` for the second kernel (it runs first).
* ``_attn_bwd_dkdv``: one program per (key block, kv head, batch), looping over the query heads of
  its GQA group and their query blocks: ``dV = sum_i P_ij dO_i``, ``dK = scale * sum_i dS_ij Q_i``.
  Grouped heads are summed inside the program, so K/V are never repeated and no two programs
  write the same dK/dV rows.

The split costs one extra recompute of S (and dP): 7 matmuls per tile. ``ATTNSWAP_TRITON_DQ=atomic``
selects the single-kernel backward instead (FlashAttention-2's, 5 matmuls per tile): the dK/dV
kernel also computes each key block's ``dS K`` and adds it into a zeroed fp32 dQ buffer with
atomics (the autotuner re-zeroes that buffer between the configs it benchmarks), and dQ is the
buffer times ``scale``, cast. dQ's summation order then varies from run to run (fp32 rounding
only). ``length="visible"`` keeps the two kernels (its per-row factor comes from the dQ pass) and
says so with a warning.

With ``dS = dL/dS`` (S including the additive mask), per kind:
sigmoid ``dS = P (1 - P) dP``; ReLU ``dS = h'(S) L^-alpha dP``; softmax ``dS = P (dP - D_i)`` with
``P = exp2((S - m_i) log2 e - log2 l_i)`` and ``D_i = rowsum(dO * O)``: the row max, row sum and D
come from a statistics pass of the forward kernel (:func:`.fwd.softmax_stats`), since the op keeps
neither the log-sum-exp nor an fp32 output. That pass costs one forward (S and PV); computing D
from the saved bf16/fp16 output instead would be cheaper but off by its rounding. With dropout,
``dP = keep / (1 - p) * dO V^T`` and ``dV`` uses the dropped P.

Float-mask gradient (``need_mask_grad``): dL/dmask = dS at unmasked positions. The dK/dV kernel
writes dS into a zero-initialized ``[B, Hq, Tq, Tk]`` fp32 buffer (4 bytes per score: 1 GiB at
B*Hq = 16, T = 4096), which torch then sums over the mask's broadcast dims.
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

from .compile_check import collecting, launch
from .autotune import AUTOTUNE_KEY, dkdv_configs, dq_configs, length_bucket, prune_dkdv, prune_dq
from .common import (
    KIND_SOFTMAX,
    TANH_APPROX_ASM,
    activation,
    activation_grad,
    block_dim,
    check_inputs,
    compute_in_fp32,
    dot_precision,
    dropout_keep,
    kernel_scalars,
    prepare_mask,
    reduce_mask_grad,
    sigmoid_kind,
    tile_visible,
)
from .fwd import softmax_stats


# ---------------------------------------------------------------------------------------------
# dQ


@triton.jit
def _dq_block(
    dq, cnt, q, do, mrow, l2row, delta, offs_m, start_n,
    K, V, Mask, k_base, v_base, m_base, drop_base,
    skn, skd, svn, svd, smm, smn,
    Tq, Tk, scale, sig_bias, post, mthr, seed_term, drop_thr, drop_scale,
    KIND: tl.constexpr, ACT: tl.constexpr, CAUSAL: tl.constexpr,
    MASK_ADD: tl.constexpr, MASK_VIS: tl.constexpr, MASK_BOOL: tl.constexpr,
    VISIBLE: tl.constexpr, DROPOUT: tl.constexpr, FAST_SIG: tl.constexpr, USE_ASM: tl.constexpr,
    F32: tl.constexpr, DOT_PREC: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kt_ptrs = K + k_base + offs_d[:, None] * skd + offs_n[None, :] * skn  # [D, N]
    vt_ptrs = V + v_base + offs_dv[:, None] * svd + offs_n[None, :] * svn  # [Dv, N]
    if BOUNDARY:
        kt = tl.load(kt_ptrs, mask=(offs_d[:, None] < HEAD_DIM) & (offs_n[None, :] < Tk), other=0.0)
        vt = tl.load(vt_ptrs, mask=(offs_dv[:, None] < HEAD_DIM_V) & (offs_n[None, :] < Tk), other=0.0)
    else:
        if BLOCK_D != HEAD_DIM:
            kt = tl.load(kt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        else:
            kt = tl.load(kt_ptrs)
        if BLOCK_DV != HEAD_DIM_V:
            vt = tl.load(vt_ptrs, mask=offs_dv[:, None] < HEAD_DIM_V, other=0.0)
        else:
            vt = tl.load(vt_ptrs)
    if F32:
        kt = kt.to(tl.float32)
        vt = vt.to(tl.float32)
    s = tl.dot(q, kt, input_precision=DOT_PREC) * scale  # [M, N]

    if MASK_ADD or MASK_VIS:
        mptrs = Mask + m_base + offs_m[:, None].to(tl.int64) * smm + offs_n[None, :].to(tl.int64) * smn
        inb = (offs_m[:, None] < Tq) & (offs_n[None, :] < Tk)
        if MASK_BOOL:
            mv = tl.load(mptrs, mask=inb, other=0) != 0
        else:
            mval = tl.load(mptrs, mask=inb, other=0.0).to(tl.float32)
            if MASK_VIS:
                mv = (mval <= mthr) == 0
                s = s + tl.where(mv, mval, 0.0)
            else:
                s = s + mval
    if BOUNDARY:
        vis = offs_n[None, :] < Tk
        if CAUSAL:
            vis = vis & (offs_n[None, :] <= offs_m[:, None])
        if MASK_VIS:
            vis = vis & mv
    elif MASK_VIS:
        vis = mv

    dp = tl.dot(do, vt, input_precision=DOT_PREC)  # [M, N]
    if DROPOUT:
        idx = drop_base + offs_m[:, None].to(tl.int64) * Tk + offs_n[None, :]
        dp = tl.where(dropout_keep(idx, seed_term, drop_thr), dp * drop_scale, 0.0)

    if KIND == 0:
        if BOUNDARY or MASK_VIS:
            s = tl.where(vis, s, float("-inf"))
        p = tl.exp2((s - mrow[:, None]) * 1.4426950408889634 - l2row[:, None])
        ds = p * (dp - delta[:, None])
    elif KIND == 1:
        p = sigmoid_kind(s + sig_bias, FAST_SIG, USE_ASM)
        ds = p * (1.0 - p) * dp
        if BOUNDARY or MASK_VIS:
            ds = tl.where(vis, ds, 0.0)
    else:
        # h'(S) dP times L^-alpha (Tk^-alpha for length="visible", fixed per row at the end)
        # BEFORE the cast to K's dtype: h'(S) dP alone overflows fp16 (relu2: 2 S dP).
        ds = activation_grad(s, ACT) * dp * post
        if BOUNDARY or MASK_VIS:
            ds = tl.where(vis, ds, 0.0)
            if VISIBLE:
                cnt += tl.sum(vis.to(tl.int32), 1)
        elif VISIBLE:
            cnt += BLOCK_N
    dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PREC)
    return dq, cnt


@triton.autotune(configs=dq_configs(), key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": prune_dq})
@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, DQ, Mask, Cells, Stats, Linv,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdom, sdod,
    sdqb, sdqh, sdqm, sdqd,
    smb, smh, smm, smn,
    scb, sch, scm, scn,
    Hq, Tq, Tk, GROUPS,
    scale, sig_bias, post, alpha, mthr, seed_term, drop_thr, drop_scale,
    TQ_BUCKET, TK_BUCKET,
    KIND: tl.constexpr, ACT: tl.constexpr, CAUSAL: tl.constexpr,
    MASK_ADD: tl.constexpr, MASK_VIS: tl.constexpr, MASK_BOOL: tl.constexpr,
    VISIBLE: tl.constexpr, DROPOUT: tl.constexpr, FAST_SIG: tl.constexpr, USE_ASM: tl.constexpr,
    F32: tl.constexpr, DOT_PREC: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:
        # Longest first: a causal query block's work grows with its index, and programs
        # start in launch order, so the short blocks (not the long ones) fill the last wave.
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // GROUPS).to(tl.int64)
    k_base = b64 * skb + hk64 * skh
    v_base = b64 * svb + hk64 * svh
    m_base = b64 * smb + h64 * smh
    c_base = b64 * scb + h64 * sch
    row_base = (b64 * Hq + h64) * Tq
    drop_base = row_base * Tk

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Tq
    q = tl.load(Q + b64 * sqb + h64 * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    do = tl.load(DO + b64 * sdob + h64 * sdoh + offs_m[:, None] * sdom + offs_dv[None, :] * sdod,
                 mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    if F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    if KIND == 0:
        srow = Stats + 3 * (row_base + offs_m)
        mrow = tl.load(srow, mask=row_ok, other=0.0)
        l2row = tl.load(srow + 1, mask=row_ok, other=float("inf"))
        delta = tl.load(srow + 2, mask=row_ok, other=0.0)
    else:
        mrow = tl.zeros([BLOCK_M], dtype=tl.float32)
        l2row = mrow
        delta = mrow

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_M], dtype=tl.int32)
    n_full = (Tk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(Tk, start_m + BLOCK_M)
        n_full = tl.minimum(n_full, ((start_m + 1) // BLOCK_N) * BLOCK_N)
    else:
        hi = Tk
    for start_n in range(0, n_full, BLOCK_N):
        if tile_visible(Cells, c_base, start_m, start_n, scm, scn, Tq, Tk, MASK_VIS, BLOCK_M,
                        BLOCK_N):
            dq, cnt = _dq_block(
                dq, cnt, q, do, mrow, l2row, delta, offs_m, start_n, K, V, Mask, k_base, v_base,
                m_base, drop_base, skn, skd, svn, svd, smm, smn, Tq, Tk, scale, sig_bias, post,
                mthr, seed_term, drop_thr, drop_scale, KIND, ACT, CAUSAL, MASK_ADD, MASK_VIS,
                MASK_BOOL, VISIBLE, DROPOUT, FAST_SIG, USE_ASM, F32, DOT_PREC, HEAD_DIM, HEAD_DIM_V,
                BLOCK_D, BLOCK_DV, BLOCK_N, False,
            )
    for start_n in range(n_full, hi, BLOCK_N):
        if tile_visible(Cells, c_base, start_m, start_n, scm, scn, Tq, Tk, MASK_VIS, BLOCK_M,
                        BLOCK_N):
            dq, cnt = _dq_block(
                dq, cnt, q, do, mrow, l2row, delta, offs_m, start_n, K, V, Mask, k_base, v_base,
                m_base, drop_base, skn, skd, svn, svd, smm, smn, Tq, Tk, scale, sig_bias, post,
                mthr, seed_term, drop_thr, drop_scale, KIND, ACT, CAUSAL, MASK_ADD, MASK_VIS,
                MASK_BOOL, VISIBLE, DROPOUT, FAST_SIG, USE_ASM, F32, DOT_PREC, HEAD_DIM, HEAD_DIM_V,
                BLOCK_D, BLOCK_DV, BLOCK_N, True,
            )

    if KIND == 2:
        if VISIBLE:
            cntf = tl.maximum(cnt.to(tl.float32), 1.0)
            linv = tl.where(cnt > 0, tl.exp2(-alpha * tl.log2(cntf)), 0.0)
            tl.store(Linv + row_base + offs_m, linv, mask=row_ok)
            # dS carried Tk^-alpha: multiply by (Tk/cnt)^alpha
            fix = tl.exp2(alpha * (tl.log2(cntf * 0.0 + Tk) - tl.log2(cntf)))
            dq = dq * (tl.where(cnt > 0, fix, 0.0) * scale)[:, None]
        else:
            dq = dq * scale
    else:
        dq = dq * scale
    tl.store(DQ + b64 * sdqb + h64 * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


# ---------------------------------------------------------------------------------------------
# dK, dV (and the float-mask gradient)


@triton.jit
def _dkdv_block(
    dk, dv, k, v, offs_n, start_m,
    Q, DO, Mask, DMask, Stats, Linv, DQacc, q_base, do_base, m_base, row_base,
    sqm, sqd, sdom, sdod, smm, smn,
    Tq, Tk, scale, sig_bias, post, mthr, seed_term, drop_thr, drop_scale,
    KIND: tl.constexpr, ACT: tl.constexpr, CAUSAL: tl.constexpr,
    MASK_ADD: tl.constexpr, MASK_VIS: tl.constexpr, MASK_BOOL: tl.constexpr,
    VISIBLE: tl.constexpr, DROPOUT: tl.constexpr, FAST_SIG: tl.constexpr, USE_ASM: tl.constexpr,
    DMASK: tl.constexpr, ATOMIC_DQ: tl.constexpr, F32: tl.constexpr, DOT_PREC: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BOUNDARY: tl.constexpr,
):
    # Everything here is transposed: [keys, queries].
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    qt_ptrs = Q + q_base + offs_d[:, None] * sqd + offs_m[None, :] * sqm  # [D, M]
    do_ptrs = DO + do_base + offs_m[:, None] * sdom + offs_dv[None, :] * sdod  # [M, Dv]
    if BOUNDARY:
        qt = tl.load(qt_ptrs, mask=(offs_d[:, None] < HEAD_DIM) & (offs_m[None, :] < Tq), other=0.0)
        do = tl.load(do_ptrs, mask=(offs_m[:, None] < Tq) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    else:
        if BLOCK_D != HEAD_DIM:
            qt = tl.load(qt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        else:
            qt = tl.load(qt_ptrs)
        if BLOCK_DV != HEAD_DIM_V:
            do = tl.load(do_ptrs, mask=offs_dv[None, :] < HEAD_DIM_V, other=0.0)
        else:
            do = tl.load(do_ptrs)
    if F32:
        qt = qt.to(tl.float32)
        do = do.to(tl.float32)
    st = tl.dot(k, qt, input_precision=DOT_PREC) * scale  # [N, M]

    if MASK_ADD or MASK_VIS:
        mptrs = Mask + m_base + offs_n[:, None].to(tl.int64) * smn + offs_m[None, :].to(tl.int64) * smm
        inb = (offs_n[:, None] < Tk) & (offs_m[None, :] < Tq)
        if MASK_BOOL:
            mv = tl.load(mptrs, mask=inb, other=0) != 0
        else:
            mval = tl.load(mptrs, mask=inb, other=0.0).to(tl.float32)
            if MASK_VIS:
                mv = (mval <= mthr) == 0
                st = st + tl.where(mv, mval, 0.0)
            else:
                st = st + mval
    if BOUNDARY:
        vis = (offs_n[:, None] < Tk) & (offs_m[None, :] < Tq)
        if CAUSAL:
            vis = vis & (offs_n[:, None] <= offs_m[None, :])
        if MASK_VIS:
            vis = vis & mv
    elif MASK_VIS:
        vis = mv

    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # [N, M]
    if DROPOUT:
        idx = row_base * Tk + offs_m[None, :].to(tl.int64) * Tk + offs_n[:, None]
        keep = dropout_keep(idx, seed_term, drop_thr)
        dpt = tl.where(keep, dpt * drop_scale, 0.0)

    if KIND == 0:
        srow = Stats + 3 * (row_base + offs_m)
        if BOUNDARY:
            mrow = tl.load(srow, mask=offs_m < Tq, other=0.0)
            l2row = tl.load(srow + 1, mask=offs_m < Tq, other=float("inf"))
            delta = tl.load(srow + 2, mask=offs_m < Tq, other=0.0)
        else:
            mrow = tl.load(srow)
            l2row = tl.load(srow + 1)
            delta = tl.load(srow + 2)
        if BOUNDARY or MASK_VIS:
            st = tl.where(vis, st, float("-inf"))
        pt = tl.exp2((st - mrow[None, :]) * 1.4426950408889634 - l2row[None, :])
        dst = pt * (dpt - delta[None, :])
    elif KIND == 1:
        pt = sigmoid_kind(st + sig_bias, FAST_SIG, USE_ASM)
        if BOUNDARY or MASK_VIS:
            pt = tl.where(vis, pt, 0.0)
        dst = pt * (1.0 - pt) * dpt
    else:
        if VISIBLE:
            if BOUNDARY:
                rs = tl.load(Linv + row_base + offs_m, mask=offs_m < Tq, other=0.0)
            else:
                rs = tl.load(Linv + row_base + offs_m)
            pt = activation(st, ACT) * rs[None, :]
            dst = activation_grad(st, ACT) * dpt * rs[None, :]
        else:
            pt = activation(st, ACT) * post
            dst = activation_grad(st, ACT) * dpt * post
        if BOUNDARY or MASK_VIS:
            pt = tl.where(vis, pt, 0.0)
            dst = tl.where(vis, dst, 0.0)

    if DROPOUT:
        pt = tl.where(keep, pt * drop_scale, 0.0)
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
    dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PREC)
    if ATOMIC_DQ:
        # the 5th matmul: this key block's share of dQ = dS K, added into an fp32 buffer
        dq = tl.dot(tl.trans(dst.to(k.dtype)), k, input_precision=DOT_PREC)  # [M, D]
        dq_ptrs = DQacc + (row_base + offs_m)[:, None] * HEAD_DIM + offs_d[None, :]
        tl.atomic_add(dq_ptrs, dq, mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM))
    if DMASK:
        dm_ptrs = DMask + row_base * Tk + offs_m[None, :].to(tl.int64) * Tk + offs_n[:, None]
        if BOUNDARY:
            tl.store(dm_ptrs, dst, mask=(offs_n[:, None] < Tk) & (offs_m[None, :] < Tq))
        else:
            tl.store(dm_ptrs, dst)
    return dk, dv


@triton.autotune(configs=dkdv_configs(), key=AUTOTUNE_KEY,
                 prune_configs_by={"early_config_prune": prune_dkdv}, reset_to_zero=["DQacc"])
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, Mask, DMask, Stats, Linv, DQacc,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdom, sdod,
    sdkb, sdkh, sdkn, sdkd,
    sdvb, sdvh, sdvn, sdvd,
    smb, smh, smm, smn,
    Hq, Tq, Tk, GROUPS,
    scale, sig_bias, post, alpha, mthr, seed_term, drop_thr, drop_scale,
    TQ_BUCKET, TK_BUCKET,
    KIND: tl.constexpr, ACT: tl.constexpr, CAUSAL: tl.constexpr,
    MASK_ADD: tl.constexpr, MASK_VIS: tl.constexpr, MASK_BOOL: tl.constexpr,
    VISIBLE: tl.constexpr, DROPOUT: tl.constexpr, FAST_SIG: tl.constexpr, USE_ASM: tl.constexpr,
    DMASK: tl.constexpr, ATOMIC_DQ: tl.constexpr, F32: tl.constexpr, DOT_PREC: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)  # causal: key block 0 sees the most queries, so launch order
    hk = tl.program_id(1)     # is already longest first (see _attn_bwd_dq)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < Tk
    k = tl.load(K + b64 * skb + hk64 * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    v = tl.load(V + b64 * svb + hk64 * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    if F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # Query blocks: [lo, full_lo) and [full_hi, end) need per-element masks (causal diagonal, row
    # tail, or this program's key tail); [full_lo, full_hi) needs none. Above-diagonal blocks
    # (queries that see none of these keys) are skipped. Tiles a padding mask hides are visited
    # here (the forward and dQ kernels skip them): any change to these loops' bounds, a branch
    # around their bodies (tried per tile, per head and per program) or an early return of the
    # whole program for a hidden key block takes the best sm90 tile, 64 x 128 at 8 warps / 3
    # stages, from 255 registers to 24-396 B of spills.
    end = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M
    else:
        lo = start_n * 0
        full_lo = start_n * 0
    full_lo = tl.where(start_n + BLOCK_N > Tk, end, full_lo)  # a key-tail block: all masked
    full_lo = tl.minimum(full_lo, end)
    full_hi = tl.maximum((Tq // BLOCK_M) * BLOCK_M, full_lo)

    for g in range(0, GROUPS):
        h64 = hk64 * GROUPS + g
        q_base = b64 * sqb + h64 * sqh
        do_base = b64 * sdob + h64 * sdoh
        m_base = b64 * smb + h64 * smh
        row_base = (b64 * Hq + h64) * Tq
        for start_m in range(lo, full_lo, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, offs_n, start_m, Q, DO, Mask, DMask, Stats, Linv, DQacc, q_base, do_base,
                m_base, row_base, sqm, sqd, sdom, sdod, smm, smn, Tq, Tk, scale, sig_bias, post, mthr,
                seed_term, drop_thr, drop_scale, KIND, ACT, CAUSAL, MASK_ADD, MASK_VIS, MASK_BOOL,
                VISIBLE, DROPOUT, FAST_SIG, USE_ASM, DMASK, ATOMIC_DQ, F32, DOT_PREC, HEAD_DIM, HEAD_DIM_V,
                BLOCK_D, BLOCK_DV, BLOCK_M, True,
            )
        for start_m in range(full_lo, full_hi, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, offs_n, start_m, Q, DO, Mask, DMask, Stats, Linv, DQacc, q_base, do_base,
                m_base, row_base, sqm, sqd, sdom, sdod, smm, smn, Tq, Tk, scale, sig_bias, post, mthr,
                seed_term, drop_thr, drop_scale, KIND, ACT, CAUSAL, MASK_ADD, MASK_VIS, MASK_BOOL,
                VISIBLE, DROPOUT, FAST_SIG, USE_ASM, DMASK, ATOMIC_DQ, F32, DOT_PREC, HEAD_DIM, HEAD_DIM_V,
                BLOCK_D, BLOCK_DV, BLOCK_M, False,
            )
        for start_m in range(full_hi, end, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, offs_n, start_m, Q, DO, Mask, DMask, Stats, Linv, DQacc, q_base, do_base,
                m_base, row_base, sqm, sqd, sdom, sdod, smm, smn, Tq, Tk, scale, sig_bias, post, mthr,
                seed_term, drop_thr, drop_scale, KIND, ACT, CAUSAL, MASK_ADD, MASK_VIS, MASK_BOOL,
                VISIBLE, DROPOUT, FAST_SIG, USE_ASM, DMASK, ATOMIC_DQ, F32, DOT_PREC, HEAD_DIM, HEAD_DIM_V,
                BLOCK_D, BLOCK_DV, BLOCK_M, True,
            )

    dk = dk * scale
    tl.store(DK + b64 * sdkb + hk64 * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + b64 * sdvb + hk64 * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


# ---------------------------------------------------------------------------------------------
# launcher


ENV_DQ = "ATTNSWAP_TRITON_DQ"


def dq_mode() -> str:
    """``ATTNSWAP_TRITON_DQ``: ``"deterministic"`` (default: a dQ kernel and a dK/dV kernel, 7
    matmuls per tile, bitwise repeatable) or ``"atomic"`` (one dK/dV kernel that also adds each
    key block's dS K into an fp32 dQ buffer with atomics: 5 matmuls per tile, FlashAttention-2's
    backward; dQ's summation order then varies run to run)."""
    mode = os.environ.get(ENV_DQ, "deterministic").strip().lower() or "deterministic"
    if mode not in ("deterministic", "atomic"):
        raise ValueError(f"{ENV_DQ}={mode!r}: use 'deterministic' or 'atomic'")
    return mode


def backward(grad_out, q, k, v, attn_mask, out, p, need_mask_grad: bool):
    """``(dq, dk, dv, dmask or None)``; ``dmask`` has ``attn_mask``'s (4-dim) shape, fp32."""
    check_inputs(q, k, v)
    B, Hq, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[3]
    dev = q.device
    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    dk = torch.empty(k.shape, dtype=k.dtype, device=dev)
    dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
    need_mask_grad = bool(need_mask_grad and attn_mask is not None and attn_mask.dtype != torch.bool)
    dmask_full = (torch.zeros((B, Hq, Tq, Tk), dtype=torch.float32, device=dev)
                  if need_mask_grad else None)
    if q.numel() == 0 or k.numel() == 0 or Tq == 0 or Tk == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv, (reduce_mask_grad(dmask_full, attn_mask.shape) if need_mask_grad else None)

    sc = kernel_scalars(p, Tk)
    mi = prepare_mask(attn_mask, p.kind, q, Tk)
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    if sc.kind == KIND_SOFTMAX:
        # (out is not used: D = rowsum(dO * O) is recomputed from the fp32 O, see fwd.py)
        stats = softmax_stats(q, k, v, attn_mask, p, grad_out)
    else:
        stats = dummy
    linv = torch.empty((B, Hq, Tq), dtype=torch.float32, device=dev) if sc.visible else dummy
    common = dict(
        KIND=sc.kind, ACT=sc.act, CAUSAL=bool(p.is_causal),
        MASK_ADD=mi.add, MASK_VIS=mi.vis, MASK_BOOL=mi.is_bool, VISIBLE=sc.visible,
        DROPOUT=sc.dropout, FAST_SIG=sc.fast_sigmoid, USE_ASM=TANH_APPROX_ASM and (q.is_cuda or collecting()),
        F32=compute_in_fp32(q.dtype), DOT_PREC=dot_precision(q.dtype),
        HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=block_dim(D), BLOCK_DV=block_dim(Dv),
    )
    scalars = (Hq, Tq, Tk, Hq // Hkv, float(p.scale), sc.sig_bias, sc.post, sc.alpha, mi.threshold,
               sc.seed_term, sc.drop_thr, sc.drop_scale, length_bucket(Tq), length_bucket(Tk))

    atomic = dq_mode() == "atomic"
    if atomic and sc.visible:
        # length="visible" needs each row's count before dS is complete: the dQ kernel makes it
        warnings.warn("ATTNSWAP_TRITON_DQ=atomic: length='visible' runs the deterministic "
                      "two-kernel backward instead", RuntimeWarning, stacklevel=2)
        atomic = False
    if atomic:
        dqacc = torch.zeros((B, Hq, Tq, D), dtype=torch.float32, device=dev)
    else:
        dqacc = dummy
        grid_q = lambda META: (triton.cdiv(Tq, META["BLOCK_M"]), Hq, B)  # noqa: E731
        launch(
            _attn_bwd_dq, grid_q,
            q, k, v, grad_out, dq, mi.tensor, mi.cells, stats, linv,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), *mi.strides,
            *mi.cell_strides,
            *scalars, **common,
        )
    grid_k = lambda META: (triton.cdiv(Tk, META["BLOCK_N"]), Hkv, B)  # noqa: E731
    launch(
        _attn_bwd_dkdv, grid_k,
        q, k, v, grad_out, dk, dv, mi.tensor, dmask_full if need_mask_grad else dummy, stats, linv,
        dqacc, *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(),
        *dv.stride(), *mi.strides, *scalars, DMASK=need_mask_grad, ATOMIC_DQ=atomic, **common,
    )
    if atomic:
        dq.copy_(dqacc.mul_(float(p.scale)))
    dmask = reduce_mask_grad(dmask_full, attn_mask.shape) if need_mask_grad else None
    return dq, dk, dv, dmask


__all__ = ["backward"]
