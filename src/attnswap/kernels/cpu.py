"""Tiled CPU kernels for ``attnswap::attention``: forward and backward of every kind, in torch.

The score matrix is never held for the whole sequence: queries and keys are walked in tiles of
``block_q x block_k`` (batched over batch and heads), so the extra memory is a few tiles plus
O(T·D) buffers, while the work stays in large ``bmm`` / ``baddbmm`` calls (MKL) and vectorized
in-place pointwise ops. Semantics are exactly those of :mod:`.reference` (the oracle).

Layout. A query head ``h`` reads key/value head ``h // G`` (``G = Hq // Hkv``). Instead of
repeating K and V, the queries of one key/value head are stacked as the rows of one matrix:
``q [B, Hq, Tq, D]`` becomes ``[B·Hkv, Tq·G, D]`` with row ``i·G + g`` holding query ``i`` of
group member ``g`` ("rows layout"). A query tile ``[i0, i1)`` is then a contiguous block of rows,
every tile is one ``bmm`` against ``k [B·Hkv, Tk, D]``, and ``dK = dSᵀ Q`` sums over the group
for free. Masks, the causal triangle and the dropout pattern are broadcast onto the 5-dim view
``[B, Hkv, n, G, m]`` of a score tile, never expanded.

Kinds.

* ``softmax``: online softmax (running max and sum) in the forward. The op does not store the
  log-sum-exp, so the backward recomputes it in a first pass, then uses ``D_i = rowsum(dO∘O)``.
* ``sigmoid`` / ``relu``: no running max, no row sum, no rescaling; the backward recomputes P
  from Q, K (and the mask) and needs only dO: ``dV = Pᵀ dO``, ``dP = dO Vᵀ``,
  ``dS = h'(S)·L^−α ⊙ dP`` (sigmoid: ``P(1−P) ⊙ dP``), ``dQ = scale·dS K``, ``dK = scale·dSᵀ Q``.
  The per-row factor ``L^−α`` and the dropout factor ``1/(1−p)`` are folded into dO once.

Masking costs. Key tiles entirely above the causal diagonal are skipped; the causal triangle is
applied only on tiles that cross the diagonal. Masks are applied with broadcast ``mul_``/``add_``
of 0/1 or 0/−inf float tiles: ``masked_fill_``/``where`` are ~30x slower on CPU.

Sigmoid is ``torch.sigmoid(S + b)`` in place: one vectorized pass, accurate to fp32 rounding.
(An earlier build computed ``1 / (1 + 2^(−log2(e)·(S + b)))`` as three in-place passes; measured
again on this torch build, one thread, a 2M-element tile: ``sigmoid_`` 0.40 ns/element against
0.59 for ``exp2_ + add_ + reciprocal_``, and the per-tile forward 8 % faster.) ``fast_sigmoid``
(the GPU kernels' tanh approximation) is ignored here: ``tanh`` is no cheaper than ``sigmoid`` in
torch on a CPU, so there is nothing faster to switch to.

Parallelism. Calls with at least ``PARALLEL_MIN_SCORES`` score elements are split into
(batch, head) blocks run by a small thread pool, each worker running its ops single-threaded
(see "tasks" below for why). ``ATTNSWAP_CPU_THREADS`` sets the number of workers (default
``torch.get_num_threads()``; 0 or 1 disables the pool).

Tile sizes. ``BLOCK_Q`` / ``BLOCK_K`` / ``BLOCK_K_CAUSAL`` (module-level defaults) are shrunk for large batch×heads so a
tile stays under ``MAX_TILE_ELEMS`` elements. The environment variable ``ATTNSWAP_CPU_BLOCK``
overrides both exactly: ``"64"`` (both) or ``"64,128"`` (block_q, block_k); it is read at each call,
so tests can use tiny tiles to exercise partial and diagonal tiles.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from . import cpu_fused
from .dropout import keep_from_index, tile_keep_mask
from .mask_cache import MaskObjectCache
from .params import LENGTH_VISIBLE, AttentionParams
from .reference import compute_dtype, float_mask_is_masked, masked_threshold

BLOCK_Q = 256
BLOCK_K = 512
# Causal: square tiles. The backward walks whole key tiles down the diagonal, so a tile crossing
# it wastes up to block_k²/2 scores; 256x256 measured ~10 % faster than 256x512 at T = 1k–2k.
BLOCK_K_CAUSAL = 256
MIN_BLOCK = 32
# One score tile (all batches and heads together) holds at most this many elements (16 MiB fp32).
MAX_TILE_ELEMS = 1 << 22

ENV_BLOCK = "ATTNSWAP_CPU_BLOCK"
ENV_THREADS = "ATTNSWAP_CPU_THREADS"
# Calls with fewer score elements (B·Hq·Tq·Tk) than this run as one task (no thread pool).
PARALLEL_MIN_SCORES = 1 << 18

_aten = torch.ops.aten
_LOG2E = 1.4426950408889634  # log2(e)


def block_sizes(rows_per_query: int, causal: bool = False) -> tuple[int, int]:
    """(block_q, block_k) for a problem with ``rows_per_query = B·Hq`` score rows per query."""
    env = os.environ.get(ENV_BLOCK, "").strip()
    if env:
        try:
            parts = [int(x) for x in env.replace(" ", "").split(",")]
            if len(parts) == 1:
                parts = parts * 2
            bq, bk = parts
            if bq <= 0 or bk <= 0:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"{ENV_BLOCK}={env!r} must be one positive int or two separated by a comma "
                "(block_q,block_k)"
            ) from None
        return bq, bk
    bq, bk = BLOCK_Q, (BLOCK_K_CAUSAL if causal else BLOCK_K)
    while rows_per_query * bq * bk > MAX_TILE_ELEMS and max(bq, bk) > MIN_BLOCK:
        if bq >= bk and bq > MIN_BLOCK:
            bq //= 2
        else:
            bk //= 2
    return bq, bk


class _Problem:
    """Shapes, the rows-layout operands and per-tile masks of one call."""

    def __init__(self, q, k, v, attn_mask, p: AttentionParams, origin=None, tiles=None):
        self.p = p
        # (b0, h0, B, Hq) of the whole call when this is one task's slice of it (dropout indices).
        self.origin = origin if origin is not None else (0, 0, q.shape[0], q.shape[1])
        self.B, self.Hq, self.Tq, self.D = q.shape
        self.Hkv, self.Tk, self.Dv = k.shape[1], k.shape[2], v.shape[3]
        self.G = self.Hq // self.Hkv
        self.BH = self.B * self.Hkv
        self.ct = compute_dtype(q.dtype)
        self.dtype = q.dtype
        self.mask = attn_mask
        # A mask tensor is usually causal-shaped (HF builds the causal mask outside the attention
        # module): square tiles, so that its diagonal wastes as little as is_causal's does.
        self.bq, self.bk = block_sizes(self.B * self.Hq, p.is_causal or attn_mask is not None)
        # Q pre-multiplied by the scale: S = Qs Kᵀ, and dK = dSᵀ Qs already carries the scale.
        self.qscale = p.scale
        self.score_mult = self.qscale / p.scale  # what a score computed as Qs Kᵀ is multiplied by
        self.qs = self._scaled_rows(q, self.qscale)
        self.k = k.to(self.ct).reshape(self.BH, self.Tk, self.D)
        self.v = v.to(self.ct).reshape(self.BH, self.Tk, self.Dv)
        self.empty = 0 in (self.B, self.Hq, self.Tq, self.Tk)
        self._causal_cache: dict = {}
        self._row_scale = None
        # tiles(bq, bk): the whole call's tile classes (valid for a task's slice of the batch
        # and heads too: "all hidden" / "all visible" over everything holds for any part)
        self._skip, self._free, self._pure = (tiles or (lambda bq, bk: _mask_tiles(attn_mask, p.kind, bq, bk)))(
            self.bq, self.bk)

    # -- layout ---------------------------------------------------------------------------------
    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, Hq, Tq, X]`` → rows layout ``[B·Hkv, Tq·G, X]`` (a view when G == 1)."""
        X = x.shape[-1]
        x = x.reshape(self.B, self.Hkv, self.G, self.Tq, X)
        return x.transpose(2, 3).reshape(self.BH, self.Tq * self.G, X)

    def _scaled_rows(self, x: torch.Tensor, c: float) -> torch.Tensor:
        """``rows(x) * c`` in one pass: q usually arrives as a ``[B, T, H, D]`` projection
        viewed as ``[B, H, T, D]``, where ``rows`` alone already costs a copy."""
        X = x.shape[-1]
        src = x.reshape(self.B, self.Hkv, self.G, self.Tq, X).transpose(2, 3)
        dst = torch.empty(src.shape, dtype=self.ct)
        torch.mul(src, c, out=dst)
        return dst.view(self.BH, self.Tq * self.G, X)

    def unrows(self, x: torch.Tensor) -> torch.Tensor:
        """Rows layout → ``[B, Hq, Tq, X]``."""
        X = x.shape[-1]
        x = x.view(self.B, self.Hkv, self.Tq, self.G, X)
        return x.transpose(2, 3).reshape(self.B, self.Hq, self.Tq, X)

    def view5(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """A ``[B·Hkv, n·G, m]`` tile as ``[B, Hkv, n, G, m]``."""
        return t.view(self.B, self.Hkv, n, self.G, t.shape[-1])

    def heads5(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, h, n, m]`` with h in {1, Hq} → broadcastable to ``[B, Hkv, n, G, m]``."""
        if x.shape[1] == 1:
            return x.unsqueeze(3)
        return x.reshape(x.shape[0], self.Hkv, self.G, x.shape[2], x.shape[3]).transpose(2, 3)

    # -- tiles ----------------------------------------------------------------------------------
    def key_end(self, i1: int) -> int:
        """Keys at or after this index are invisible to every query before ``i1``."""
        return min(self.Tk, i1) if self.p.is_causal else self.Tk

    def query_start(self, j0: int) -> int:
        """The first query tile (on the ``block_q`` grid) that sees a key at or after ``j0``."""
        if not self.p.is_causal:
            return 0
        return self.Tq if j0 >= self.Tq else (j0 // self.bq) * self.bq

    def skip(self, i0: int, j0: int) -> bool:
        """The mask hides every score of this tile (for every batch and head): nothing to do."""
        return self._skip is not None and self._skip(i0 // self.bq, j0 // self.bk)

    def _causal_tile(self, i0, n, j0, m, additive: bool):
        key = (n, m, i0 - j0, additive)
        t = self._causal_cache.get(key)
        if t is None:
            vis = torch.ones(n, m, dtype=torch.bool).tril_(i0 - j0)
            if additive:
                t = torch.zeros(n, m, dtype=self.ct).masked_fill_(~vis, float("-inf"))
            else:
                t = vis.to(self.ct)
            t = t.view(n, 1, m)
            self._causal_cache[key] = t
        return t

    def _mask_slice(self, i0, i1, j0, j1):
        m = self.mask
        qs = slice(i0, i1) if m.shape[2] != 1 else slice(None)
        ks = slice(j0, j1) if m.shape[3] != 1 else slice(None)
        return m[:, :, qs, ks], qs, ks

    def tile_masks(self, i0, i1, j0, j1):
        """(adds, muls): tensors to add to / multiply into the ``[B, Hkv, n, G, m]`` tile view.

        softmax: ``adds`` only (0/−inf for causal and bool masks, the float mask as is);
        sigmoid/relu: ``adds`` = the float mask with masked entries zeroed (applied to S),
        ``muls`` = 0/1 visibility (applied after the activation).
        """
        n, m = i1 - i0, j1 - j0
        softmax = self.p.kind == "softmax"
        adds, muls = [], []
        if self.p.is_causal and j1 - 1 > i0:
            (adds if softmax else muls).append(self._causal_tile(i0, n, j0, m, softmax))
        if self.mask is not None and not self._free(i0 // self.bq, j0 // self.bk):
            mt, _, _ = self._mask_slice(i0, i1, j0, j1)
            if mt.dtype == torch.bool:
                if softmax:
                    adds.append(self.heads5(_bool_additive(mt, self.ct)))
                else:
                    muls.append(self.heads5(mt.to(self.ct)))
            elif softmax:
                adds.append(self.heads5(mt.to(self.ct)))
            else:
                vis = (~float_mask_is_masked(mt)).to(self.ct)
                if not self._pure(i0 // self.bq, j0 // self.bk):
                    lo = torch.finfo(self.ct).min
                    add = torch.clamp_min(mt.to(self.ct), lo).mul_(vis)  # masked → 0 (−inf too)
                    adds.append(self.heads5(add))
                muls.append(self.heads5(vis))
        return adds, muls

    def keep_tile(self, i0, i1, j0, j1):
        """The dropout keep pattern of a tile as a 0/1 float ``[B, Hkv, n, G, m]`` view.

        The whole call's pattern is :func:`.dropout.dropout_keep_mask` over ``[B, Hq, Tq, Tk]``;
        a task owning batches ``b0…`` and heads ``h0…`` reads its block of it.
        """
        p = self.p
        b0, h0, B, Hq = self.origin
        if (b0, h0, B, Hq) == (0, 0, self.B, self.Hq):
            keep = tile_keep_mask(p.dropout_seed, p.dropout_p, (B, Hq, self.Tq, self.Tk),
                                  i0, i1 - i0, j0, j1 - j0)
        else:  # tile_keep_mask's formula, on this task's (batch, head) block
            bh = (torch.arange(b0, b0 + self.B).view(-1, 1) * Hq
                  + torch.arange(h0, h0 + self.Hq).view(1, -1)).view(self.B, self.Hq, 1, 1)
            i = torch.arange(i0, i1, dtype=torch.int64).view(1, 1, -1, 1)
            j = torch.arange(j0, j1, dtype=torch.int64).view(1, 1, 1, -1)
            keep = keep_from_index(p.dropout_seed, (bh * self.Tq + i) * self.Tk + j, p.dropout_p)
        return self.heads5(keep.to(self.ct))

    # -- ReLU's per-row factor L^-alpha ---------------------------------------------------------
    def row_scale(self):
        """``L^−α`` as a float, or per row as ``[B·Hkv, Tq·G, 1]`` (length="visible")."""
        if self._row_scale is not None:
            return self._row_scale
        p = self.p
        if p.kind != "relu":
            r = 1.0
        elif p.length != LENGTH_VISIBLE:
            r = p.relu_factor(self.Tk)
        else:
            n = self.visible_counts()
            r = torch.where(n > 0, n.clamp_min(1.0) ** (-p.alpha), torch.zeros_like(n))
        self._row_scale = r
        return r

    def visible_counts(self) -> torch.Tensor:
        """Per query row, the number of keys it may attend (causal and mask), rows layout."""
        counts = torch.zeros(self.B, self.Hkv, self.Tq, self.G, dtype=self.ct)
        for i0 in range(0, self.Tq, self.bq):
            i1 = min(self.Tq, i0 + self.bq)
            for j0 in range(0, self.key_end(i1), self.bk):
                if self.skip(i0, j0):
                    continue
                j1 = min(self.key_end(i1), j0 + self.bk)
                _, muls = self.tile_masks(i0, i1, j0, j1)
                vis = None
                for t in muls:
                    vis = t if vis is None else vis * t
                if vis is None:
                    counts[:, :, i0:i1] += j1 - j0
                else:
                    c = vis.expand(*vis.shape[:-1], j1 - j0).sum(-1)
                    counts[:, :, i0:i1] += c.expand(self.B, self.Hkv, i1 - i0, self.G)
        return counts.view(self.BH, self.Tq * self.G, 1)

    # -- the mask gradient ----------------------------------------------------------------------
    def add_mask_grad(self, dmask, ds5, i0, i1, j0, j1):
        """Accumulate a tile of dS (``[B, Hkv, n, G, m]``) into dL/dmask (the mask's shape)."""
        mb, mh, mq, mk = self.mask.shape
        dims = [d for d, keep in ((0, mb != 1), (2, mq != 1), (4, mk != 1)) if not keep]
        if mh == 1:
            dims += [1, 3]
        red = ds5.sum(dim=sorted(dims), keepdim=True) if dims else ds5
        # [b, hkv, n, g, m] → [b, Hq or 1, n, m]
        red = red.transpose(2, 3).reshape(red.shape[0], mh, red.shape[2], red.shape[4])
        _, qs, ks = self._mask_slice(i0, i1, j0, j1)
        dmask[:, :, qs, ks] += red


def _bool_additive(mt: torch.Tensor, ct: torch.dtype) -> torch.Tensor:
    """A bool mask tile as 0 (True) / −inf (False) in ``ct``. fp32: integer ops on the bit
    pattern (``(m − 1) · 2²³`` is 0 or 0xFF800000, −inf), ~20x cheaper on CPU than ``log`` of
    the 0/1 floats (~0.5 ms per 256² tile, which put a bool causal mask at ~1.2x is_causal)."""
    if ct == torch.float32:
        return (mt.to(torch.int32) - 1).mul_(1 << 23).view(torch.float32)
    return torch.zeros(mt.shape, dtype=ct).masked_fill_(~mt, float("-inf"))


def _tile_minmax(x: torch.Tensor, bq: int, bk: int):
    """(min, max) of ``x`` ``[b, h, R, C]`` per ``bq x bk`` tile over batch and heads, both
    ``[nR, nC]`` (R or C may be 1, a broadcast dim: one tile along it). Bool masks are read as
    bytes. Two passes over ``x`` (amin, amax: each as fast as one elementwise op in torch)."""
    b, h, R, C = x.shape
    tr, tc = (bq if R > 1 else 1), (bk if C > 1 else 1)
    xr = x.reshape(b * h * R, C)
    if x.dtype == torch.bool:
        if C % 8 == 0 and tc % 8 == 0:
            # 8 mask bytes (each 0 or 1) per int64: min == 0x0101..01 iff all 8 are True,
            # max != 0 iff any is; ~8x fewer elements to reduce than bytes.
            xr, C, tc = xr.contiguous().view(torch.int64), C // 8, tc // 8
        else:
            xr = xr.view(torch.uint8)
    nf = C // tc
    out = []
    for red in (torch.amin, torch.amax):
        parts = [red(xr[:, :nf * tc].reshape(-1, nf, tc), -1)] if nf else []
        if C % tc:
            parts.append(red(xr[:, nf * tc:], -1, keepdim=True))
        rc = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        nR, nC = -(-R // tr), rc.shape[1]
        rc = rc.view(b * h, R, nC)
        if nR * tr != R:  # repeat the last row: neutral for min and max
            rc = torch.cat([rc, rc[:, -1:].expand(b * h, nR * tr - R, nC)], 1)
        out.append(red(red(rc.view(b * h, nR, tr, nC), 2), 0))
    return out[0], out[1]


def _mask_tiles(mask, kind: str, bq: int, bk: int):
    """Per tile of the ``bq x bk`` grid: (skip, free) as lookups ``f(tile_i, tile_j) -> bool``,
    or (None, None) without a mask.

    ``skip``: the mask hides every score of the tile for every batch and head, so the tile adds
    exactly nothing (sigmoid/ReLU: masked weights are 0; softmax: exp(min - row max) is 0 as long
    as the row sees some key, so softmax tiles of a finite-valued float mask are skipped only in
    row blocks where every row does: a row that sees nothing is uniform over its finfo.min
    entries, not 0). ``free``: every score is visible and the mask adds 0 there (bool True,
    float 0): no mask work at all.

    This is what makes a converted model with a causal mask *tensor* (HF builds it outside the
    attention module, so it reaches the op as a [B, 1, T, T] bool or finfo.min float) cost about
    what ``is_causal=True`` costs: the tiles above the diagonal are skipped and those below are
    free; only diagonal tiles read the mask.
    """
    if mask is None:
        return None, None, None
    lo, hi = _tile_minmax(mask, bq, bk)
    pure = None
    if mask.dtype == torch.bool:
        all_true = 1 if lo.dtype == torch.uint8 else 0x0101010101010101
        skip, free = hi == 0, lo == all_true
    else:
        thr = masked_threshold(mask.dtype)
        skip, free = hi <= thr, (lo == 0) & (hi == 0)
        if kind == "softmax":
            # skip only where every row of the row block sees some key
            row_max = mask.amax(-1, keepdim=True)  # [b, h, R, 1]
            rlo, _ = _tile_minmax(row_max, bq, 1)
            skip &= rlo > thr  # [nR, 1]
        else:
            # "pure" tiles hold only 0 and masked entries (HF's causal/padding masks): for
            # sigmoid/ReLU they are a 0/1 visibility, with no bias to add to S.
            pure = _pure_tiles(mask, skip, free, thr, bq, bk)
    one_row, one_col = mask.shape[2] == 1, mask.shape[3] == 1  # broadcast dims: one tile
    look = lambda t: None if t is None else _lookup(t.tolist(), one_row, one_col)  # noqa: E731
    return look(skip), look(free), look(pure)


def _pure_tiles(mask, skip, free, thr: float, bq: int, bk: int) -> torch.Tensor:
    """Per tile: every entry is 0 or masked. Skipped and free tiles are pure by their min/max;
    only the others (the diagonal of a causal mask) are read again, tile by tile: over the
    whole mask a ``masked_fill`` + min/max costs ~10 ms per 2048² fp32 mask on one thread,
    which the first layer of each forward pays (the classification is cached per mask)."""
    pure = skip | free
    R, C = mask.shape[2], mask.shape[3]
    tr, tc = (bq if R > 1 else 1), (bk if C > 1 else 1)
    for i, j in (~pure).nonzero().tolist():
        t = mask[:, :, i * tr:(i + 1) * tr, j * tc:(j + 1) * tc]
        pure[i, j] = bool(((t == 0) | (t <= thr)).all())
    return pure


_tile_cache = MaskObjectCache()


def mask_tiles_cached(mask, kind: str, bq: int, bk: int):
    """:func:`_mask_tiles`, remembered per mask tensor object and version (``mask_cache``)."""
    if mask is None:
        return None, None, None
    key = (bq, bk, kind == "softmax" and mask.dtype != torch.bool)
    return _tile_cache.get(mask, key, lambda: _classify(mask, kind, bq, bk, key))


def _classify(mask, kind: str, bq: int, bk: int, key):
    # A handful of reductions over the whole mask: single-threaded, since each multi-threaded
    # torch op pays a fork/join barrier (see "tasks" below: ~15 ms each on a loaded 2-core
    # machine, against ~1 ms for the whole classification of a 2048² mask on one thread).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _mask_tiles(mask.detach(), kind, bq, bk)
    finally:
        torch.set_num_threads(n)


def _lookup(table, one_row: bool, one_col: bool):
    return lambda i, j: table[0 if one_row else i][0 if one_col else j]


def _grad_buffers(prob: _Problem):
    """dQ as one contiguous ``[B·Hkv, n·G, D]`` accumulator per query tile; dK and dV."""
    dq = [torch.zeros(prob.BH, (min(prob.Tq, i0 + prob.bq) - i0) * prob.G, prob.D, dtype=prob.ct)
          for i0 in range(0, prob.Tq, prob.bq)]
    dk = torch.empty(prob.BH, prob.Tk, prob.D, dtype=prob.ct)
    dv = torch.empty(prob.BH, prob.Tk, prob.Dv, dtype=prob.ct)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# pointwise kinds: sigmoid and relu


def _activation_inplace(name: str, s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """h(s) for ReLU attention, written into ``out`` (which may be ``s`` itself)."""
    if name == "relu":
        return torch.clamp_min(s, 0.0, out=out)
    if name == "relu2":
        torch.clamp_min(s, 0.0, out=out)
        return out.mul_(out)
    if name == "gelu":
        return _aten.gelu.out(s, out=out)
    if name == "softplus":
        return _aten.softplus.out(s, 1.0, 20.0, out=out)
    if name == "identity":
        return out if out is s else out.copy_(s)
    if name == "relu6":
        return torch.clamp(s, 0.0, 6.0, out=out)
    if name == "sigmoid":
        return torch.sigmoid(s, out=out)
    raise ValueError(f"activation={name!r} is not supported by the CPU kernel")


# Activations whose derivative can be read off P = h(S)·vis (and is 0 where vis is 0), so S need
# not be kept; the others keep S and multiply dS by the visibility.
_GRAD_FROM_P = ("relu", "sigmoid", "relu6")


def _pointwise_probs(prob: _Problem, s, i0, i1, j0, j1, keep_s: bool, pbuf):
    """Turn a score tile ``s`` (= Qs Kᵀ) into weights P (masked entries exactly 0).

    Returns (P, muls). P is ``s`` itself unless ``keep_s``, in which case P is written to ``pbuf``
    and ``s`` keeps the (masked-bias-added) scores for the backward.
    """
    p = prob.p
    n = i1 - i0
    adds, muls = prob.tile_masks(i0, i1, j0, j1)
    if adds:
        s5 = prob.view5(s, n)
        for a in adds:
            s5.add_(a, alpha=prob.score_mult)
    if p.kind == "sigmoid":
        P = s.add_(p.sigmoid_b(prob.Tk)).sigmoid_()
    else:
        P = _activation_inplace(p.activation, s, pbuf if keep_s else s)
    if muls:
        P5 = prob.view5(P, n)
        for mm in muls:
            P5.mul_(mm)
    return P, muls


def _pointwise_forward(prob: _Problem) -> torch.Tensor:
    p = prob.p
    BH, G, bq, bk = prob.BH, prob.G, prob.bq, prob.bk
    out = torch.empty(BH, prob.Tq * G, prob.Dv, dtype=prob.ct)
    sbuf = torch.empty(BH * min(bq, prob.Tq) * G * min(bk, prob.Tk), dtype=prob.ct)
    factor = prob.row_scale()
    if p.dropout_p > 0:
        factor = factor * (1.0 / (1.0 - p.dropout_p))
    scaled = isinstance(factor, torch.Tensor) or factor != 1.0
    for i0 in range(0, prob.Tq, bq):
        i1 = min(prob.Tq, i0 + bq)
        n = i1 - i0
        rs = slice(i0 * G, i1 * G)
        qt = prob.qs[:, rs]
        # Accumulate into a contiguous tile: baddbmm_ into a strided slice is ~6x slower. One
        # query tile: that tile is ``out`` itself.
        whole = n == prob.Tq
        acc = out if whole else torch.empty(BH, n * G, prob.Dv, dtype=prob.ct)
        first = True
        kend = prob.key_end(i1)
        for j0 in range(0, kend, bk):
            if prob.skip(i0, j0):
                continue
            j1 = min(kend, j0 + bk)
            s = sbuf[:BH * n * G * (j1 - j0)].view(BH, n * G, j1 - j0)
            torch.bmm(qt, prob.k[:, j0:j1].transpose(1, 2), out=s)
            P, _ = _pointwise_probs(prob, s, i0, i1, j0, j1, keep_s=False, pbuf=None)
            if p.dropout_p > 0:
                prob.view5(P, n).mul_(prob.keep_tile(i0, i1, j0, j1))
            if first:
                torch.bmm(P, prob.v[:, j0:j1], out=acc)
                first = False
            else:
                acc.baddbmm_(P, prob.v[:, j0:j1])
        if first:
            acc.zero_()
        if scaled:
            acc.mul_(factor[:, rs] if isinstance(factor, torch.Tensor) else factor)
        if not whole:
            out[:, rs] = acc
    return out


def _pointwise_backward(prob: _Problem, grad_out, need_mask_grad):
    p = prob.p
    BH, G, bq, bk = prob.BH, prob.G, prob.bq, prob.bk
    act = "sigmoid" if p.kind == "sigmoid" else p.activation
    keep_s = p.kind == "relu" and act not in _GRAD_FROM_P
    # dO with L^-alpha (per row) and 1/(1-p) folded in: dV = Pᵀ dO', dP' = dO' Vᵀ.
    factor = prob.row_scale()
    if p.dropout_p > 0:
        factor = factor * (1.0 / (1.0 - p.dropout_p))
    do = prob.rows(grad_out.to(prob.ct))
    if isinstance(factor, torch.Tensor) or factor != 1.0:
        do = do * factor
    dq, dk, dv = _grad_buffers(prob)
    dmask = (torch.zeros(prob.mask.shape, dtype=prob.ct) if need_mask_grad else None)
    tile = min(bq, prob.Tq) * G * min(bk, prob.Tk) * BH
    sbuf = torch.empty(tile, dtype=prob.ct)
    dpbuf = torch.empty(tile, dtype=prob.ct)
    pbuf = torch.empty(tile, dtype=prob.ct) if (keep_s or p.dropout_p > 0) else None
    for j0 in range(0, prob.Tk, bk):
        j1 = min(prob.Tk, j0 + bk)
        m = j1 - j0
        kt, vt = prob.k[:, j0:j1], prob.v[:, j0:j1]
        # Contiguous accumulators (baddbmm_ into a strided slice is ~6x slower), transposed:
        # dKᵀ += Qᵀ dS runs ~20 % faster in MKL than dK += dSᵀ Q.
        dk_j = torch.zeros(BH, prob.D, m, dtype=prob.ct)
        dv_j = torch.zeros(BH, prob.Dv, m, dtype=prob.ct)
        for i0 in range(prob.query_start(j0), prob.Tq, bq):
            if prob.skip(i0, j0):
                continue
            i1 = min(prob.Tq, i0 + bq)
            n = i1 - i0
            rs = slice(i0 * G, i1 * G)
            qt, dot = prob.qs[:, rs], do[:, rs]
            size = BH * n * G * m
            s = sbuf[:size].view(BH, n * G, m)
            torch.bmm(qt, kt.transpose(1, 2), out=s)
            pb = pbuf[:size].view(BH, n * G, m) if keep_s else None
            P, muls = _pointwise_probs(prob, s, i0, i1, j0, j1, keep_s=keep_s, pbuf=pb)
            dp = dpbuf[:size].view(BH, n * G, m)
            torch.bmm(dot, vt.transpose(1, 2), out=dp)
            if p.dropout_p > 0:
                keep = prob.keep_tile(i0, i1, j0, j1)
                if keep_s:  # P lives in pbuf: keep S; write the dropped P over nothing we need
                    pd = torch.mul(prob.view5(P, n), keep)
                    dv_j.baddbmm_(dot.transpose(1, 2), pd.view(BH, n * G, m))
                else:
                    pd = pbuf[:size].view(BH, n * G, m)
                    torch.mul(prob.view5(P, n), keep, out=prob.view5(pd, n))
                    dv_j.baddbmm_(dot.transpose(1, 2), pd)
                prob.view5(dp, n).mul_(keep)
            else:
                dv_j.baddbmm_(dot.transpose(1, 2), P)
            # dS = h'(S) ⊙ dP, written over dP; exactly 0 at masked positions.
            if act == "sigmoid":
                ds = _aten.sigmoid_backward.grad_input(dp, P, grad_input=dp)
            elif act == "relu":
                ds = _aten.threshold_backward.grad_input(dp, P, 0.0, grad_input=dp)
            elif act == "relu6":
                ds = _aten.hardtanh_backward.grad_input(dp, P, 0.0, 6.0, grad_input=dp)
            else:
                if act == "relu2":  # h' = 2·relu(S)
                    ds = dp.mul_(s.clamp_min_(0.0)).mul_(2.0)
                elif act == "gelu":
                    ds = _aten.gelu_backward.grad_input(dp, s, grad_input=dp)
                elif act == "softplus":
                    ds = _aten.softplus_backward.grad_input(dp, s, 1.0, 20.0, grad_input=dp)
                elif act == "identity":
                    ds = dp
                else:  # pragma: no cover - validated earlier
                    raise ValueError(act)
                ds5 = prob.view5(ds, n)
                for mm in muls:
                    ds5.mul_(mm)
            dq[i0 // bq].baddbmm_(ds, kt, alpha=p.scale)
            dk_j.baddbmm_(qt.transpose(1, 2), ds, alpha=1.0 / prob.score_mult)
            if dmask is not None:
                prob.add_mask_grad(dmask, prob.view5(ds, n), i0, i1, j0, j1)
        dk[:, j0:j1] = dk_j.transpose(1, 2)
        dv[:, j0:j1] = dv_j.transpose(1, 2)
    return torch.cat(dq, dim=1), dk, dv, dmask


# ----------------------------------------------------------------------------------------------
# softmax


def _softmax_forward(prob: _Problem, want_out: bool = True):
    """Online softmax. Returns (out in rows layout or None, (m, log l)), both ``[B·Hkv, Tq·G, 1]``.

    The log-sum-exp is kept as its two parts, the row max ``m`` and ``log l``: with HF-style masks
    (``finfo.min`` entries) ``m`` can be ~1e38, and ``m + log l`` would lose ``log l`` entirely.
    ``P = exp((S − m) − log l)``; ``log l`` is +inf on rows that see no key, so P is 0 there.
    """
    p = prob.p
    BH, G, bq, bk = prob.BH, prob.G, prob.bq, prob.bk
    out = torch.empty(BH, prob.Tq * G, prob.Dv, dtype=prob.ct) if want_out else None
    row_max = torch.empty(BH, prob.Tq * G, 1, dtype=prob.ct)
    log_sum = torch.empty(BH, prob.Tq * G, 1, dtype=prob.ct)
    sbuf = torch.empty(BH * min(bq, prob.Tq) * G * min(bk, prob.Tk), dtype=prob.ct)
    for i0 in range(0, prob.Tq, bq):
        i1 = min(prob.Tq, i0 + bq)
        n = i1 - i0
        rs = slice(i0 * G, i1 * G)
        qt = prob.qs[:, rs]
        m_i = torch.full((BH, n * G, 1), float("-inf"), dtype=prob.ct)
        l_i = torch.zeros(BH, n * G, 1, dtype=prob.ct)
        acc = torch.zeros(BH, n * G, prob.Dv, dtype=prob.ct) if want_out else None
        kend = prob.key_end(i1)
        for j0 in range(0, kend, bk):
            if prob.skip(i0, j0):
                continue
            j1 = min(kend, j0 + bk)
            s = sbuf[:BH * n * G * (j1 - j0)].view(BH, n * G, j1 - j0)
            torch.bmm(qt, prob.k[:, j0:j1].transpose(1, 2), out=s)
            adds, _ = prob.tile_masks(i0, i1, j0, j1)
            s5 = prob.view5(s, n)
            for a in adds:
                s5.add_(a)
            m_new = torch.maximum(m_i, s.amax(-1, keepdim=True))
            m_safe = m_new.nan_to_num(neginf=0.0)  # a row with nothing visible yet: keep it finite
            # exp(x) as 2^(log2(e) x): torch's exp2 is ~6x faster than its exp on this CPU and,
            # unlike exp, keeps that speed for -inf / very negative inputs (masked entries),
            # where exp takes a slow path (~7x slower again).
            s.sub_(m_safe).mul_(_LOG2E).exp2_()
            corr = (m_i - m_safe).mul_(_LOG2E).exp2_()
            l_i.mul_(corr).add_(s.sum(-1, keepdim=True))
            if want_out:
                acc.mul_(corr)
                if p.dropout_p > 0:
                    s5.mul_(prob.keep_tile(i0, i1, j0, j1))
                acc.baddbmm_(s, prob.v[:, j0:j1])
            m_i = m_new
        empty = l_i == 0
        if want_out:
            inv = torch.where(empty, 0.0, 1.0 / l_i)
            if p.dropout_p > 0:
                inv.mul_(1.0 / (1.0 - p.dropout_p))
            out[:, rs] = acc.mul_(inv)
        row_max[:, rs] = m_i.nan_to_num(neginf=0.0)
        log_sum[:, rs] = torch.where(empty, float("inf"), l_i.log())
    return out, (row_max, log_sum)


def _softmax_backward(prob: _Problem, grad_out, out, need_mask_grad):
    p = prob.p
    BH, G, bq, bk = prob.BH, prob.G, prob.bq, prob.bk
    # Pass 1: the log-sum-exp (and, for low-precision inputs, the fp32 output for D).
    exact_out = out is not None and out.dtype == prob.ct
    o32, (row_max, log_sum) = _softmax_forward(prob, want_out=not exact_out)
    if exact_out:
        o32 = prob.rows(out)
    do = prob.rows(grad_out.to(prob.ct))
    drow = (do * o32).sum(-1, keepdim=True)  # D_i = rowsum(dO ∘ O)
    if p.dropout_p > 0:
        do = do * (1.0 / (1.0 - p.dropout_p))
    dq, dk, dv = _grad_buffers(prob)
    dmask = torch.zeros(prob.mask.shape, dtype=prob.ct) if need_mask_grad else None
    tile = min(bq, prob.Tq) * G * min(bk, prob.Tk) * BH
    sbuf = torch.empty(tile, dtype=prob.ct)
    dpbuf = torch.empty(tile, dtype=prob.ct)
    pdbuf = torch.empty(tile, dtype=prob.ct) if p.dropout_p > 0 else None
    for j0 in range(0, prob.Tk, bk):
        j1 = min(prob.Tk, j0 + bk)
        m = j1 - j0
        kt, vt = prob.k[:, j0:j1], prob.v[:, j0:j1]
        # Contiguous accumulators (baddbmm_ into a strided slice is ~6x slower), transposed:
        # dKᵀ += Qᵀ dS runs ~20 % faster in MKL than dK += dSᵀ Q.
        dk_j = torch.zeros(BH, prob.D, m, dtype=prob.ct)
        dv_j = torch.zeros(BH, prob.Dv, m, dtype=prob.ct)
        for i0 in range(prob.query_start(j0), prob.Tq, bq):
            if prob.skip(i0, j0):
                continue
            i1 = min(prob.Tq, i0 + bq)
            n = i1 - i0
            rs = slice(i0 * G, i1 * G)
            qt, dot = prob.qs[:, rs], do[:, rs]
            size = BH * n * G * m
            s = sbuf[:size].view(BH, n * G, m)
            torch.bmm(qt, kt.transpose(1, 2), out=s)
            adds, _ = prob.tile_masks(i0, i1, j0, j1)
            s5 = prob.view5(s, n)
            for a in adds:
                s5.add_(a)
            P = s.sub_(row_max[:, rs]).sub_(log_sum[:, rs]).mul_(_LOG2E).exp2_()
            dp = dpbuf[:size].view(BH, n * G, m)
            torch.bmm(dot, vt.transpose(1, 2), out=dp)
            if p.dropout_p > 0:
                keep = prob.keep_tile(i0, i1, j0, j1)
                pd = pdbuf[:size].view(BH, n * G, m)
                torch.mul(prob.view5(P, n), keep, out=prob.view5(pd, n))
                dv_j.baddbmm_(dot.transpose(1, 2), pd)
                prob.view5(dp, n).mul_(keep)
            else:
                dv_j.baddbmm_(dot.transpose(1, 2), P)
            ds = dp.sub_(drow[:, rs]).mul_(P)  # dS = P ⊙ (dP − D)
            dq[i0 // bq].baddbmm_(ds, kt, alpha=p.scale)
            dk_j.baddbmm_(qt.transpose(1, 2), ds, alpha=1.0 / prob.score_mult)
            if dmask is not None:
                prob.add_mask_grad(dmask, prob.view5(ds, n), i0, i1, j0, j1)
        dk[:, j0:j1] = dk_j.transpose(1, 2)
        dv[:, j0:j1] = dv_j.transpose(1, 2)
    return torch.cat(dq, dim=1), dk, dv, dmask


# ----------------------------------------------------------------------------------------------
# entry points (called by op.py)


def _forward_task(q, k, v, attn_mask, p: AttentionParams, origin=None, tiles=None) -> torch.Tensor:
    """``out [B, Hq, Tq, Dv]`` in the compute dtype, for one task (or the whole call)."""
    prob = _Problem(q, k, v, attn_mask, p, origin, tiles)
    if prob.empty:
        return torch.zeros(prob.B, prob.Hq, prob.Tq, prob.Dv, dtype=prob.ct)
    if p.kind == "softmax":
        out, _ = _softmax_forward(prob)
    elif p.kind in ("sigmoid", "relu"):
        out = _pointwise_forward(prob)
    else:
        raise ValueError(f"kind={p.kind!r} is not supported by the CPU kernel")
    return prob.unrows(out)


def _backward_task(grad_out, q, k, v, attn_mask, out, p: AttentionParams, need_mask_grad,
                   origin=None, tiles=None):
    prob = _Problem(q, k, v, attn_mask, p, origin, tiles)
    if prob.empty:
        dmask = torch.zeros(attn_mask.shape, dtype=prob.ct) if need_mask_grad else None
        return (torch.zeros(q.shape, dtype=prob.ct), torch.zeros(k.shape, dtype=prob.ct),
                torch.zeros(v.shape, dtype=prob.ct), dmask)
    if p.kind == "softmax":
        dq, dk, dv, dmask = _softmax_backward(prob, grad_out, out, need_mask_grad)
    elif p.kind in ("sigmoid", "relu"):
        dq, dk, dv, dmask = _pointwise_backward(prob, grad_out, need_mask_grad)
    else:
        raise ValueError(f"kind={p.kind!r} is not supported by the CPU kernel")
    dq = prob.unrows(dq)
    dk = dk.view(prob.B, prob.Hkv, prob.Tk, prob.D)
    dv = dv.view(prob.B, prob.Hkv, prob.Tk, prob.Dv)
    return dq, dk, dv, dmask


# ----------------------------------------------------------------------------------------------
# tasks: coarse-grained parallelism over (batch, head) blocks
#
# Each torch op parallelizes itself over the intra-op threads, with a fork/join barrier per op.
# A tiled kernel issues hundreds of ops per call, and on a machine where another process holds
# a core, each barrier waits for a descheduled thread: measured on the 2-core bench machine under
# load, a 1M-element add_ took 12 ms on 2 threads against 0.2 ms on 1. So a large call is split
# into independent (batch, head) blocks run by a small pool of Python threads, each running its
# ops single-threaded (torch releases the GIL inside ops); the only barrier is the final join.


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def num_workers() -> int:
    """``ATTNSWAP_CPU_THREADS`` if set (0 or 1: no pool), else ``torch.get_num_threads()``."""
    env = os.environ.get(ENV_THREADS, "").strip()
    if env:
        try:
            n = int(env)
            if n < 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"{ENV_THREADS}={env!r} must be a non-negative int") from None
        return max(1, n)
    return torch.get_num_threads()


def _init_worker(default_threads: int) -> None:
    """Make this worker's torch ops single-threaded, and only this worker's.

    ``torch.set_num_threads`` sets the calling thread's OpenMP/MKL thread count but also the
    process-wide default that threads created later start with; left at 1, every thread the
    user starts afterwards would silently run single-threaded. A short-lived helper thread puts
    the default back (its own setting dies with it). torch initializes a thread's count lazily,
    from that default, at its first parallel op: trigger that first, or it would undo the 1.
    """
    torch.get_num_threads()  # runs the lazy per-thread initialization now
    torch.set_num_threads(1)
    helper = threading.Thread(target=torch.set_num_threads, args=(default_threads,))
    helper.start()
    helper.join()


def _get_pool(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(n, thread_name_prefix="attnswap-cpu",
                                       initializer=_init_worker,
                                       initargs=(torch.get_num_threads(),))
            _pool_size = n
        return _pool


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    parts = max(1, min(n, parts))
    return [(n * i // parts, n * (i + 1) // parts) for i in range(parts)]


def plan_tasks(B: int, Hq: int, Hkv: int, workers: int) -> list[tuple[int, int, int, int]]:
    """(b0, b1, h0, h1) blocks of query heads, about two per worker for load balance.

    A block holds whole key/value groups, or part of one group (then several blocks share a
    key/value head and their dK, dV are summed).
    """
    if workers <= 1:
        return [(0, B, 0, Hq)]
    target = 2 * workers
    if B >= target:
        return [(b0, b1, 0, Hq) for b0, b1 in _split(B, target)]
    per_b = math.ceil(target / B)
    G = Hq // Hkv
    if Hkv >= per_b:
        heads = [(a * G, b * G) for a, b in _split(Hkv, per_b)]
    else:
        per_group = math.ceil(per_b / Hkv)
        heads = [(kv * G + a, kv * G + b) for kv in range(Hkv) for a, b in _split(G, per_group)]
    return [(b, b + 1, h0, h1) for b in range(B) for h0, h1 in heads]


def _tasks_for(q, k, attn_mask):
    B, Hq, Tq = q.shape[:3]
    Tk = k.shape[2]
    if B * Hq * Tq * Tk < PARALLEL_MIN_SCORES:
        return None
    tasks = plan_tasks(B, Hq, k.shape[1], num_workers())
    return tasks if len(tasks) > 1 else None


def _task_slices(task, q_shape, k_shape, mask):
    b0, b1, h0, h1 = task
    Hq, Hkv = q_shape[1], k_shape[1]
    G = Hq // Hkv
    kv0, kv1 = h0 // G, (h1 - 1) // G + 1
    qsl = (slice(b0, b1), slice(h0, h1))
    ksl = (slice(b0, b1), slice(kv0, kv1))
    msl = None
    if mask is not None:
        msl = (slice(b0, b1) if mask.shape[0] != 1 else slice(None),
               slice(h0, h1) if mask.shape[1] != 1 else slice(None))
    return qsl, ksl, msl


def _run(tasks, fn):
    """Run ``fn`` on every task in the pool, under the caller's no-grad / inference mode."""
    inference = torch.is_inference_mode_enabled()

    def call(t):
        # Grad and inference modes are thread-local: carry the caller's into the worker.
        with torch.inference_mode() if inference else torch.no_grad():
            return fn(t)

    pool = _get_pool(num_workers())
    return list(pool.map(call, tasks))


def _reset_pool_after_fork():  # a forked child has the pool object but not its threads
    global _pool, _pool_size
    _pool, _pool_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pool_after_fork)


def _tiles_of(mask, p: AttentionParams):
    if mask is None:
        return None
    return lambda bq, bk: mask_tiles_cached(mask, p.kind, bq, bk)


def _fused_path(pass_: str, q, k, v, attn_mask, p: AttentionParams, need_mask_grad=False):
    """Whether the fused kernel takes this pass; counted either way, with the reason."""
    why = cpu_fused.unsupported(q, k, v, attn_mask, p, need_mask_grad)
    cpu_fused.path_counts[(pass_, "fused" if why is None else f"tiled: {why}")] += 1
    return why is None


def forward(q, k, v, attn_mask, p: AttentionParams, layout: str | None = None) -> torch.Tensor:
    """Attention of kind ``p.kind``: ``out [B, Hq, Tq, Dv]`` in q's dtype. Sigmoid and ReLU run
    the fused kernel (``cpu_fused``) whenever it supports the call; it writes the output in
    ``layout`` (see ``op.attention``), the tiled kernel contiguous."""
    if _fused_path("forward", q, k, v, attn_mask, p):
        return cpu_fused.forward(q, k, v, attn_mask, p, layout)
    tiles = _tiles_of(attn_mask, p)
    q, k, v = q.detach(), k.detach(), v.detach()
    attn_mask = attn_mask.detach() if attn_mask is not None else None
    tasks = _tasks_for(q, k, attn_mask)
    if tasks is None:
        with torch.no_grad():
            return _forward_task(q, k, v, attn_mask, p, tiles=tiles).to(q.dtype)
    B, Hq = q.shape[:2]
    out = q.new_empty((*q.shape[:3], v.shape[-1]))

    def task(t):
        qsl, ksl, msl = _task_slices(t, q.shape, k.shape, attn_mask)
        out[qsl] = _forward_task(q[qsl], k[ksl], v[ksl],
                                 attn_mask[msl] if msl is not None else None, p,
                                 origin=(t[0], t[2], B, Hq), tiles=tiles)  # disjoint blocks

    _run(tasks, task)
    return out


def backward(grad_out, q, k, v, attn_mask, out, p: AttentionParams, need_mask_grad: bool):
    """(dq, dk, dv, dmask or None); dmask has ``attn_mask``'s shape (float masks only)."""
    need_mask_grad = bool(need_mask_grad and attn_mask is not None
                          and attn_mask.dtype.is_floating_point)
    if _fused_path("backward", q, k, v, attn_mask, p, need_mask_grad):
        # any grad_out strides (BLAS takes them); gradients in the inputs' own layouts
        dq, dk, dv = cpu_fused.backward(grad_out, q, k, v, attn_mask, p)
        return dq, dk, dv, None
    tiles = _tiles_of(attn_mask, p)
    grad_out = grad_out.contiguous()
    grad_out, q, k, v = (t.detach() for t in (grad_out, q, k, v))
    attn_mask = attn_mask.detach() if attn_mask is not None else None
    out = out.detach() if out is not None else None
    tasks = _tasks_for(q, k, attn_mask)
    if tasks is None:
        with torch.no_grad():
            return _backward_task(grad_out, q, k, v, attn_mask, out, p, need_mask_grad,
                                  tiles=tiles)
    B, Hq = q.shape[:2]
    G = Hq // k.shape[1]
    # Blocks that split one group share its key/value head: their dK, dV are summed afterwards.
    shared_kv = any(h0 % G or h1 % G for _, _, h0, h1 in tasks)
    dq = q.new_empty(q.shape)
    if shared_kv:  # summed in the compute dtype
        ct = compute_dtype(q.dtype)
        dk, dv = torch.zeros(k.shape, dtype=ct), torch.zeros(v.shape, dtype=ct)
    else:
        dk, dv = k.new_empty(k.shape), v.new_empty(v.shape)

    def task(t):
        qsl, ksl, msl = _task_slices(t, q.shape, k.shape, attn_mask)
        dq_t, dk_t, dv_t, dm_t = _backward_task(
            grad_out[qsl], q[qsl], k[ksl], v[ksl], attn_mask[msl] if msl is not None else None,
            out[qsl] if out is not None else None, p, need_mask_grad, origin=(t[0], t[2], B, Hq),
            tiles=tiles)
        dq[qsl] = dq_t  # disjoint blocks: written by the worker
        if shared_kv:
            return dk_t, dv_t, dm_t
        dk[ksl], dv[ksl] = dk_t, dv_t
        return None, None, dm_t

    results = _run(tasks, task)
    dmask = torch.zeros(attn_mask.shape, dtype=compute_dtype(q.dtype)) if need_mask_grad else None
    for t, (dk_t, dv_t, dm_t) in zip(tasks, results):
        _, ksl, msl = _task_slices(t, q.shape, k.shape, attn_mask)
        if shared_kv:
            dk[ksl] += dk_t
            dv[ksl] += dv_t
        if dmask is not None:
            dmask[msl] += dm_t
    return dq, dk, dv, dmask


__all__ = ["forward", "backward", "block_sizes", "plan_tasks", "num_workers", "BLOCK_Q",
           "BLOCK_K", "BLOCK_K_CAUSAL", "MAX_TILE_ELEMS", "ENV_BLOCK", "ENV_THREADS", "PARALLEL_MIN_SCORES"]
