"""Forward kernel: one program per (query block, query head, batch), looping over key blocks.

* sigmoid / ReLU: ``acc += phi(S) V`` with no running max, no row sum, no log-sum-exp. Sigmoid folds
  its bias ``b`` into the argument; ReLU's ``L^-alpha`` is a per-row constant, so it is applied once
  to the accumulator at the end (for ``length="visible"`` the kernel counts the visible keys of each
  row on the fly).
* softmax: FlashAttention-2's online softmax (running max and sum, rescaled accumulator).
* ``STATS`` (softmax, for the backward): the same forward, but instead of the output it stores
  per row the max ``m``, ``log2`` of the row sum ``l`` (the log-sum-exp, kept in two parts so it
  survives huge masks such as finfo.min) and ``D = rowsum(dO * O)`` from the fp32 output (reading
  ``dO`` through the ``Out`` pointer). The op keeps only the rounded output; ``D`` from a bf16/fp16
  O is off by the output's rounding, which the tests' fp16 tolerance on the mask gradient sees.

Key blocks come in two loops: interior blocks with no per-element masking at all (no key tail, not
on the causal diagonal), then boundary blocks (the causal diagonal, the key tail) with ``tl.where``.
Blocks above the causal diagonal are never visited, nor are blocks a visibility mask hides entirely
(:func:`.common.tile_visible`: padded keys, padded query blocks). A user mask (bool or float) is
read per element in every visited block, through its own strides (0 on broadcast dims). Base
offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .compile_check import collecting, launch
from .autotune import AUTOTUNE_KEY, fwd_configs, length_bucket, prune_fwd
from .common import (
    KIND_SOFTMAX,
    TANH_APPROX_ASM,
    activation,
    block_dim,
    check_inputs,
    compute_in_fp32,
    dot_precision,
    dropout_keep,
    kernel_scalars,
    prepare_mask,
    sigmoid_kind,
    tile_visible,
)


@triton.jit
def _fwd_block(
    acc, m_i, l_i, cnt, q, offs_m, start_n,
    K, V, Mask, k_base, v_base, m_base, drop_base,
    skn, skd, svn, svd, smm, smn,
    Tq, Tk, scale, sig_bias, post, mthr, seed_term, drop_thr,
    KIND: tl.constexpr, ACT: tl.constexpr, CAUSAL: tl.constexpr,
    MASK_ADD: tl.constexpr, MASK_VIS: tl.constexpr, MASK_BOOL: tl.constexpr,
    VISIBLE: tl.constexpr, DROPOUT: tl.constexpr, FAST_SIG: tl.constexpr, USE_ASM: tl.constexpr,
    F32: tl.constexpr, DOT_PREC: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kt_ptrs = K + k_base + offs_d[:, None] * skd + offs_n[None, :] * skn  # [D, N]
    if BOUNDARY:
        kt = tl.load(kt_ptrs, mask=(offs_d[:, None] < HEAD_DIM) & (offs_n[None, :] < Tk), other=0.0)
    elif BLOCK_D != HEAD_DIM:
        kt = tl.load(kt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
    else:
        kt = tl.load(kt_ptrs)
    if F32:
        kt = kt.to(tl.float32)
    s = tl.dot(q, kt, input_precision=DOT_PREC) * scale  # [M, N] fp32

    # ---- user mask tile (broadcast through strides)
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
    # ---- which elements are visible (only computed where something can hide one)
    if BOUNDARY:
        vis = offs_n[None, :] < Tk
        if CAUSAL:
            vis = vis & (offs_n[None, :] <= offs_m[:, None])
        if MASK_VIS:
            vis = vis & mv
    elif MASK_VIS:
        vis = mv

    if KIND == 0:  # softmax, online
        if BOUNDARY or MASK_VIS:
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2((s - m_use[:, None]) * 1.4426950408889634)
        corr = tl.exp2((m_i - m_use) * 1.4426950408889634)
        l_i = l_i * corr + tl.sum(p, 1)
        m_i = m_new
        acc = acc * corr[:, None]
    else:
        if KIND == 1:
            p = sigmoid_kind(s + sig_bias, FAST_SIG, USE_ASM)
        else:
            # L^-alpha (or, for length="visible", Tk^-alpha, corrected per row at the end) BEFORE
            # P is cast to V's dtype: h(S) alone overflows fp16 (relu2: S > 256), the weight not.
            p = activation(s, ACT) * post
        if BOUNDARY or MASK_VIS:
            p = tl.where(vis, p, 0.0)
            if VISIBLE:
                cnt += tl.sum(vis.to(tl.int32), 1)
        elif VISIBLE:
            cnt += BLOCK_N

    if DROPOUT:
        idx = drop_base + offs_m[:, None].to(tl.int64) * Tk + offs_n[None, :]
        p = tl.where(dropout_keep(idx, seed_term, drop_thr), p, 0.0)
    offs_dv = tl.arange(0, BLOCK_DV)
    v_ptrs = V + v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd  # [N, Dv]
    if BOUNDARY:
        v = tl.load(v_ptrs, mask=(offs_n[:, None] < Tk) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    elif BLOCK_DV != HEAD_DIM_V:
        v = tl.load(v_ptrs, mask=offs_dv[None, :] < HEAD_DIM_V, other=0.0)
    else:
        v = tl.load(v_ptrs)
    if F32:
        v = v.to(tl.float32)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, m_i, l_i, cnt


@triton.autotune(configs=fwd_configs(), key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": prune_fwd})
@triton.jit
def _attn_fwd(
    Q, K, V, Out, Mask, Cells, Stats,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    smb, smh, smm, smn,
    scb, sch, scm, scn,
    Hq, Tq, Tk, GROUPS,
    scale, sig_bias, post, alpha, mthr, seed_term, drop_thr, drop_scale,
    TQ_BUCKET, TK_BUCKET,
    KIND: tl.constexpr, ACT: tl.constexpr, CAUSAL: tl.constexpr,
    MASK_ADD: tl.constexpr, MASK_VIS: tl.constexpr, MASK_BOOL: tl.constexpr,
    VISIBLE: tl.constexpr, DROPOUT: tl.constexpr, FAST_SIG: tl.constexpr, USE_ASM: tl.constexpr,
    STATS: tl.constexpr, F32: tl.constexpr, DOT_PREC: tl.constexpr,
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
    q_base = b64 * sqb + h64 * sqh
    k_base = b64 * skb + hk64 * skh
    v_base = b64 * svb + hk64 * svh
    m_base = b64 * smb + h64 * smh
    c_base = b64 * scb + h64 * sch
    row_base = (b64 * Hq + h64) * Tq
    drop_base = row_base * Tk

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if F32:
        q = q.to(tl.float32)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_M], dtype=tl.int32)

    # interior key blocks: no key tail, entirely below the causal diagonal for every row
    n_full = (Tk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(Tk, start_m + BLOCK_M)
        n_full = tl.minimum(n_full, ((start_m + 1) // BLOCK_N) * BLOCK_N)
    else:
        hi = Tk
    for start_n in range(0, n_full, BLOCK_N):
        if tile_visible(Cells, c_base, start_m, start_n, scm, scn, Tq, Tk, MASK_VIS, BLOCK_M,
                        BLOCK_N):
            acc, m_i, l_i, cnt = _fwd_block(
                acc, m_i, l_i, cnt, q, offs_m, start_n, K, V, Mask, k_base, v_base, m_base,
                drop_base, skn, skd, svn, svd, smm, smn, Tq, Tk, scale, sig_bias, post, mthr,
                seed_term, drop_thr, KIND, ACT, CAUSAL, MASK_ADD, MASK_VIS, MASK_BOOL, VISIBLE,
                DROPOUT, FAST_SIG, USE_ASM, F32, DOT_PREC, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
                BLOCK_N, False,
            )
    for start_n in range(n_full, hi, BLOCK_N):
        if tile_visible(Cells, c_base, start_m, start_n, scm, scn, Tq, Tk, MASK_VIS, BLOCK_M,
                        BLOCK_N):
            acc, m_i, l_i, cnt = _fwd_block(
                acc, m_i, l_i, cnt, q, offs_m, start_n, K, V, Mask, k_base, v_base, m_base,
                drop_base, skn, skd, svn, svd, smm, smn, Tq, Tk, scale, sig_bias, post, mthr,
                seed_term, drop_thr, KIND, ACT, CAUSAL, MASK_ADD, MASK_VIS, MASK_BOOL, VISIBLE,
                DROPOUT, FAST_SIG, USE_ASM, F32, DOT_PREC, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
                BLOCK_N, True,
            )

    row_ok = offs_m < Tq
    offs_dv = tl.arange(0, BLOCK_DV)
    o_ptrs = Out + b64 * sob + h64 * soh + offs_m[:, None] * som + offs_dv[None, :] * sod
    o_mask = row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
    if STATS:
        # Row max and log2 of the row sum, kept apart: m + log(l) would lose log(l) entirely when
        # m is huge (a row whose scores all carry a finfo.min mask: softmax is uniform there).
        # A row that sees nothing gets (0, +inf), so exp2((s - m) log2e - log2 l) = 0.
        o = acc * tl.where(l_i > 0.0, 1.0 / l_i, 0.0)[:, None]
        if DROPOUT:
            o = o * drop_scale
        do = tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)  # Out is dO here
        srow = Stats + 3 * (row_base + offs_m)
        tl.store(srow, tl.where(l_i > 0.0, m_i, 0.0), mask=row_ok)
        tl.store(srow + 1, tl.where(l_i > 0.0, tl.log2(l_i), float("inf")), mask=row_ok)
        tl.store(srow + 2, tl.sum(o * do, 1), mask=row_ok)
    else:
        if KIND == 0:
            acc = acc * tl.where(l_i > 0.0, 1.0 / l_i, 0.0)[:, None]
        elif KIND == 2:
            if VISIBLE:
                # P carried Tk^-alpha; the row's factor is cnt^-alpha: multiply by (Tk/cnt)^alpha.
                cntf = tl.maximum(cnt.to(tl.float32), 1.0)
                fix = tl.exp2(alpha * (tl.log2(cntf * 0.0 + Tk) - tl.log2(cntf)))
                acc = acc * tl.where(cnt > 0, fix, 0.0)[:, None]
        if DROPOUT:
            acc = acc * drop_scale
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=o_mask)


def launch_forward(q, k, v, attn_mask, p, *, out=None, stats=None, grad_out=None) -> None:
    """Run :func:`_attn_fwd`: writes ``out`` (``[B, Hq, Tq, Dv]``) or, when ``stats`` is given
    (softmax only), the backward's row statistics into ``stats`` (``[B, Hq, Tq, 3]`` fp32: row max,
    log2 row sum, rowsum(dO * O)), reading ``grad_out``."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[3]
    sc = kernel_scalars(p, Tk)
    mi = prepare_mask(attn_mask, p.kind, q, Tk)
    with_stats = stats is not None
    if with_stats:
        assert sc.kind == KIND_SOFTMAX
        o = grad_out
    else:
        o = out
        stats = q.new_empty(1, dtype=torch.float32)
    grid = lambda META: (triton.cdiv(Tq, META["BLOCK_M"]), Hq, B)  # noqa: E731
    launch(
        _attn_fwd, grid,
        q, k, v, o, mi.tensor, mi.cells, stats,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *mi.strides, *mi.cell_strides,
        Hq, Tq, Tk, Hq // Hkv,
        float(p.scale), sc.sig_bias, sc.post, sc.alpha, mi.threshold, sc.seed_term, sc.drop_thr,
        sc.drop_scale,
        length_bucket(Tq), length_bucket(Tk),
        KIND=sc.kind, ACT=sc.act, CAUSAL=bool(p.is_causal),
        MASK_ADD=mi.add, MASK_VIS=mi.vis, MASK_BOOL=mi.is_bool,
        VISIBLE=sc.visible, DROPOUT=sc.dropout, FAST_SIG=sc.fast_sigmoid,
        USE_ASM=TANH_APPROX_ASM and (q.is_cuda or collecting()), STATS=with_stats, F32=compute_in_fp32(q.dtype),
        DOT_PREC=dot_precision(q.dtype), HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=block_dim(D),
        BLOCK_DV=block_dim(Dv),
    )


def forward(q, k, v, attn_mask, p) -> torch.Tensor:
    """``out [B, Hq, Tq, Dv]`` in q's dtype; see the module docstring."""
    check_inputs(q, k, v)
    B, Hq, Tq, _ = q.shape
    Tk, Dv = k.shape[2], v.shape[3]
    out = torch.empty((B, Hq, Tq, Dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if Tk == 0:
        return out.zero_()
    launch_forward(q, k, v, attn_mask, p, out=out)
    return out


def softmax_stats(q, k, v, attn_mask, p, grad_out) -> torch.Tensor:
    """The softmax backward's per-row statistics, ``[B, Hq, Tq, 3]`` fp32: the row max ``m`` and
    ``log2`` of the row sum ``l`` of the masked, scaled scores (``lse = m + ln2 * log2 l``; ``(0,
    +inf)`` for a row that sees no key), and ``D = rowsum(dO * O)`` with O recomputed in fp32
    (dropout included)."""
    B, Hq, Tq, _ = q.shape
    stats = torch.empty((B, Hq, Tq, 3), dtype=torch.float32, device=q.device)
    if stats.numel() == 0:
        return stats
    launch_forward(q, k, v, attn_mask, p, stats=stats, grad_out=grad_out)
    return stats


__all__ = ["forward", "softmax_stats", "launch_forward"]
