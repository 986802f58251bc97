"""Hand-written attention blocks reproducing the code shapes of real models (including spellings
that transformers itself no longer uses, see ``hf.py``).

Every attention block class has ``ATTENTION_SITES = 1``; a case's ``count_attention`` sums that
attribute over the model's submodules (``count_sites_attr``). Every block keeps a dropout on the
probabilities (p = 0.1) so ``train()`` exercises the dropout spelling too.

Blocks work on ``x: [B, T, D]`` (D = 32) and are stacked twice with pre-norm residuals.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cases import ZooCase, count_sites_attr, padded_mask, randn, seeded

D = 32
H = 4
HD = D // H
P_DROP = 0.1


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, heads, -1).transpose(1, 2)  # [B, h, T, d]


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


# --------------------------------------------------------------------------------------------
# blocks
# --------------------------------------------------------------------------------------------

class EinsumAttention(nn.Module):
    """``einsum("bhqd,bhkd->bhqk")`` scores, ``einsum("bhqk,bhkd->bhqd")`` output."""
    ATTENTION_SITES = 1

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.drop = nn.Dropout(P_DROP)
        self.scale = HD ** -0.5

    def forward(self, x, **_):
        q, k, v = (_split_heads(t, H) for t in self.qkv(x).chunk(3, dim=-1))
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * self.scale
        probs = self.drop(scores.softmax(dim=-1))
        return self.proj(_merge_heads(torch.einsum("bhqk,bhkd->bhqd", probs, v)))


class ScaleQAttention(nn.Module):
    """timm style: ``q = q * scale`` before ``q @ k.transpose(-2, -1)``; bool padding mask via
    ``masked_fill(~mask, -inf)``."""
    ATTENTION_SITES = 1

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.proj = nn.Linear(D, D)
        self.attn_drop = nn.Dropout(P_DROP)
        self.scale = HD ** -0.5

    def forward(self, x, attention_mask=None, **_):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, H, HD).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        if attention_mask is not None:
            keep = attention_mask.bool()[:, None, None, :]
            attn = attn.masked_fill(~keep, float("-inf"))
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class BaddbmmAttention(nn.Module):
    """``nn.MultiheadAttention(need_weights=True)`` internals on ``(B*H, T, d)``:
    ``q * math.sqrt(1 / d)``; ``torch.baddbmm(float_mask, q, k.transpose(-2, -1))``; softmax;
    dropout(p, training); ``torch.bmm``."""
    ATTENTION_SITES = 1

    def __init__(self):
        super().__init__()
        self.in_proj = nn.Linear(D, 3 * D)
        self.out_proj = nn.Linear(D, D)
        self.dropout = P_DROP

    def forward(self, x, attention_mask=None, **_):
        B, T, _ = x.shape
        q, k, v = self.in_proj(x).chunk(3, dim=-1)
        # (T, B*H, d) -> (B*H, T, d) like F.multi_head_attention_forward
        q, k, v = (t.transpose(0, 1).contiguous().view(T, B * H, HD).transpose(0, 1) for t in (q, k, v))
        q = q * math.sqrt(1.0 / float(HD))
        if attention_mask is not None:
            add = torch.zeros(B, 1, 1, T, dtype=x.dtype).masked_fill(
                attention_mask[:, None, None, :] == 0, float("-inf"))
            add = add.expand(B, H, T, T).reshape(B * H, T, T)
            w = torch.baddbmm(add, q, k.transpose(-2, -1))
        else:
            w = torch.bmm(q, k.transpose(-2, -1))
        w = F.softmax(w, dim=-1)
        w = F.dropout(w, p=self.dropout, training=self.training)
        out = torch.bmm(w, v)  # (B*H, T, d)
        out = out.transpose(0, 1).contiguous().view(T, B, D).transpose(0, 1)
        return self.out_proj(out)


class Fp32SoftmaxAttention(nn.Module):
    """``F.softmax(scores.float(), dim=-1).to(q.dtype)``; causal additive mask built inline as
    ``full(-inf).triu(1)``; ``/ math.sqrt(d)`` on the scores."""
    ATTENTION_SITES = 1

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(D, D)
        self.k = nn.Linear(D, D)
        self.v = nn.Linear(D, D)
        self.o = nn.Linear(D, D)
        self.drop = nn.Dropout(P_DROP)

    def forward(self, x, **_):
        q, k, v = _split_heads(self.q(x), H), _split_heads(self.k(x), H), _split_heads(self.v(x), H)
        T = x.shape[1]
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(HD)
        causal = torch.full((T, T), float("-inf"), device=x.device, dtype=scores.dtype).triu(1)
        scores = scores + causal
        probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
        probs = self.drop(probs)
        return self.o(_merge_heads(torch.matmul(probs, v)))


class GPT2OldAttention(nn.Module):
    """transformers 4.3x GPT-2: ``Conv1D``-like ``c_attn`` + split; ``/ torch.full([], d ** 0.5)``;
    causal bool buffer ``bias[:, :, k_len - q_len:k_len, :k_len]``;
    ``torch.where(causal, w, finfo.min)``; ``+ attention_mask`` (additive, from the model);
    softmax; ``.type(value.dtype)``; dropout; matmul."""
    ATTENTION_SITES = 1
    MAX_POS = 64

    def __init__(self):
        super().__init__()
        self.register_buffer(
            "bias",
            torch.tril(torch.ones((self.MAX_POS, self.MAX_POS), dtype=torch.bool)).view(
                1, 1, self.MAX_POS, self.MAX_POS),
            persistent=False,
        )
        self.c_attn_weight = nn.Parameter(torch.randn(D, 3 * D) * 0.02)
        self.c_attn_bias = nn.Parameter(torch.zeros(3 * D))
        self.c_proj = nn.Linear(D, D)
        self.attn_dropout = nn.Dropout(P_DROP)

    def _attn(self, query, key, value, attention_mask=None):
        attn_weights = torch.matmul(query, key.transpose(-1, -2))
        attn_weights = attn_weights / torch.full(
            [], value.size(-1) ** 0.5, dtype=attn_weights.dtype, device=attn_weights.device)
        query_length, key_length = query.size(-2), key.size(-2)
        causal_mask = self.bias[:, :, key_length - query_length: key_length, :key_length]
        mask_value = torch.finfo(attn_weights.dtype).min
        mask_value = torch.full([], mask_value, dtype=attn_weights.dtype, device=attn_weights.device)
        attn_weights = torch.where(causal_mask, attn_weights.to(attn_weights.dtype), mask_value)
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask
        attn_weights = nn.functional.softmax(attn_weights, dim=-1)
        attn_weights = attn_weights.type(value.dtype)
        attn_weights = self.attn_dropout(attn_weights)
        return torch.matmul(attn_weights, value)

    def forward(self, x, extended_mask=None, **_):
        size_out = x.size()[:-1] + (3 * D,)
        qkv = torch.addmm(self.c_attn_bias, x.view(-1, x.size(-1)), self.c_attn_weight).view(size_out)
        query, key, value = qkv.split(D, dim=2)
        query, key, value = _split_heads(query, H), _split_heads(key, H), _split_heads(value, H)
        out = self._attn(query, key, value, extended_mask)
        return self.c_proj(_merge_heads(out))


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class LlamaOldAttention(nn.Module):
    """transformers 4.4x Llama: RoPE (``q * cos + rotate_half(q) * sin``); GQA ``repeat_kv`` by
    ``expand`` + ``reshape``; ``matmul / math.sqrt(head_dim)``; 4D additive mask sliced
    ``[:, :, :, :k_len]`` from a wider (static-cache-like) mask; ``softmax(dtype=float32)
    .to(q.dtype)``; ``dropout(p, training)``; matmul."""
    ATTENTION_SITES = 1
    KV_HEADS = 2

    def __init__(self):
        super().__init__()
        self.head_dim = HD
        self.num_heads = H
        self.num_key_value_groups = H // self.KV_HEADS
        self.q_proj = nn.Linear(D, H * HD, bias=False)
        self.k_proj = nn.Linear(D, self.KV_HEADS * HD, bias=False)
        self.v_proj = nn.Linear(D, self.KV_HEADS * HD, bias=False)
        self.o_proj = nn.Linear(H * HD, D, bias=False)
        self.attention_dropout = P_DROP

    @staticmethod
    def repeat_kv(hidden_states, n_rep):
        batch, num_key_value_heads, slen, head_dim = hidden_states.shape
        if n_rep == 1:
            return hidden_states
        hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
        return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)

    def forward(self, x, cos=None, sin=None, causal_mask=None, **_):
        bsz, q_len, _ = x.size()
        q = self.q_proj(x).view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, q_len, self.KV_HEADS, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, q_len, self.KV_HEADS, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = (q * cos) + (_rotate_half(q) * sin)
        k = (k * cos) + (_rotate_half(k) * sin)
        k = self.repeat_kv(k, self.num_key_value_groups)
        v = self.repeat_kv(v, self.num_key_value_groups)
        attn_weights = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)
        if causal_mask is not None:
            attn_weights = attn_weights + causal_mask[:, :, :, : k.shape[-2]]
        attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(q.dtype)
        attn_weights = nn.functional.dropout(attn_weights, p=self.attention_dropout, training=self.training)
        out = torch.matmul(attn_weights, v)
        out = out.transpose(1, 2).contiguous().reshape(bsz, q_len, -1)
        return self.o_proj(out)


class BartOldAttention(nn.Module):
    """transformers 4.3x BART: ``q_proj(h) * scaling``; ``bmm`` on ``(bsz*heads, tgt, d)``;
    ``w.view(bsz, heads, tgt, src) + mask`` then ``view(bsz*heads, tgt, src)``; softmax;
    ``dropout(p, training)``; ``bmm``. Self (causal mask) or cross (key padding mask)."""
    ATTENTION_SITES = 1

    def __init__(self, is_cross: bool):
        super().__init__()
        self.is_cross = is_cross
        self.num_heads = H
        self.head_dim = HD
        self.scaling = HD ** -0.5
        self.dropout = P_DROP
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def _shape(self, tensor, seq_len, bsz):
        return tensor.view(bsz, seq_len, self.num_heads, self.head_dim).transpose(1, 2).contiguous()

    def forward(self, x, memory=None, self_mask=None, cross_mask=None, **_):
        bsz, tgt_len, _ = x.size()
        kv = memory if self.is_cross else x
        attention_mask = cross_mask if self.is_cross else self_mask
        query_states = self.q_proj(x) * self.scaling
        key_states = self._shape(self.k_proj(kv), -1, bsz)
        value_states = self._shape(self.v_proj(kv), -1, bsz)
        proj_shape = (bsz * self.num_heads, -1, self.head_dim)
        query_states = self._shape(query_states, tgt_len, bsz).view(*proj_shape)
        key_states = key_states.reshape(*proj_shape)
        value_states = value_states.reshape(*proj_shape)
        src_len = key_states.size(1)
        attn_weights = torch.bmm(query_states, key_states.transpose(1, 2))
        if attention_mask is not None:
            attn_weights = attn_weights.view(bsz, self.num_heads, tgt_len, src_len) + attention_mask
            attn_weights = attn_weights.view(bsz * self.num_heads, tgt_len, src_len)
        attn_weights = nn.functional.softmax(attn_weights, dim=-1)
        attn_probs = nn.functional.dropout(attn_weights, p=self.dropout, training=self.training)
        attn_output = torch.bmm(attn_probs, value_states)
        attn_output = attn_output.view(bsz, self.num_heads, tgt_len, self.head_dim).transpose(1, 2)
        attn_output = attn_output.reshape(bsz, tgt_len, D)
        return self.out_proj(attn_output)


class DistilBertOldAttention(nn.Module):
    """transformers 4.3x DistilBERT: ``q / math.sqrt(dim_per_head)`` first; ``matmul(q,
    k.transpose(2, 3))``; ``(mask == 0).view(bs, 1, 1, k_len).expand_as(scores)``;
    ``scores.masked_fill(mask, torch.tensor(finfo.min))``; softmax; dropout; matmul."""
    ATTENTION_SITES = 1

    def __init__(self):
        super().__init__()
        self.n_heads = H
        self.dim = D
        self.q_lin = nn.Linear(D, D)
        self.k_lin = nn.Linear(D, D)
        self.v_lin = nn.Linear(D, D)
        self.out_lin = nn.Linear(D, D)
        self.dropout = nn.Dropout(P_DROP)

    def forward(self, x, attention_mask=None, **_):
        bs, q_length, dim = x.size()
        k_length = x.size(1)
        dim_per_head = self.dim // self.n_heads
        mask_reshp = (bs, 1, 1, k_length)

        def shape(t):
            return t.view(bs, -1, self.n_heads, dim_per_head).transpose(1, 2)

        def unshape(t):
            return t.transpose(1, 2).contiguous().view(bs, -1, self.n_heads * dim_per_head)

        q = shape(self.q_lin(x))
        k = shape(self.k_lin(x))
        v = shape(self.v_lin(x))
        q = q / math.sqrt(dim_per_head)
        scores = torch.matmul(q, k.transpose(2, 3))
        mask = (attention_mask == 0).view(mask_reshp).expand_as(scores)
        scores = scores.masked_fill(mask, torch.tensor(torch.finfo(scores.dtype).min))
        weights = nn.functional.softmax(scores, dim=-1)
        weights = self.dropout(weights)
        context = unshape(torch.matmul(weights, v))
        return self.out_lin(context)


class T5OldAttention(nn.Module):
    """transformers 4.3x T5: no scaling; ``scores = matmul(q, k.transpose(3, 2))``; the first
    layer computes ``position_bias`` (relative buckets → ``nn.Embedding``) ``+ mask`` and later
    layers reuse it; ``scores += position_bias`` (in place);
    ``softmax(scores.float(), dim=-1).type_as(scores)``; dropout; matmul."""
    ATTENTION_SITES = 1
    NUM_BUCKETS = 8

    def __init__(self, has_relative_attention_bias: bool):
        super().__init__()
        self.has_relative_attention_bias = has_relative_attention_bias
        self.q = nn.Linear(D, D, bias=False)
        self.k = nn.Linear(D, D, bias=False)
        self.v = nn.Linear(D, D, bias=False)
        self.o = nn.Linear(D, D, bias=False)
        self.dropout = P_DROP
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.NUM_BUCKETS, H)

    def compute_bias(self, q_len, k_len, device=None):
        context = torch.arange(q_len, dtype=torch.long, device=device)[:, None]
        memory = torch.arange(k_len, dtype=torch.long, device=device)[None, :]
        rel = memory - context
        half = self.NUM_BUCKETS // 2
        bucket = torch.clamp(rel, -half, half - 1) + half
        values = self.relative_attention_bias(bucket)  # (q, k, H)
        return values.permute([2, 0, 1]).unsqueeze(0)  # (1, H, q, k)

    def forward(self, x, mask=None, position_bias=None, **_):
        bs, q_len, _ = x.shape
        q, k, v = _split_heads(self.q(x), H), _split_heads(self.k(x), H), _split_heads(self.v(x), H)
        scores = torch.matmul(q, k.transpose(3, 2))
        if position_bias is None:
            position_bias = self.compute_bias(q_len, k.shape[2], device=scores.device)
            if mask is not None:
                position_bias = position_bias + mask  # (bs, H, q, k)
        scores += position_bias
        attn_weights = nn.functional.softmax(scores.float(), dim=-1).type_as(scores)
        attn_weights = nn.functional.dropout(attn_weights, p=self.dropout, training=self.training)
        out = _merge_heads(torch.matmul(attn_weights, v))
        return self.o(out), position_bias


class SwinOldAttention(nn.Module):
    """Swin ``WindowAttention``: ``q * scale; q @ kᵀ``; ``+ relative_position_bias`` gathered from
    a table by a buffer index; shifted block: ``attn.view(B_ // nW, nW, H, N, N) +
    mask.unsqueeze(1).unsqueeze(0)``, ``view(-1, H, N, N)``; ``self.softmax = nn.Softmax(-1)``."""
    ATTENTION_SITES = 1

    def __init__(self, window: int):
        super().__init__()
        self.window = window
        self.num_heads = H
        self.scale = HD ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, H) * 0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
        coords = torch.flatten(coords, 1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += window - 1
        rel[:, :, 1] += window - 1
        rel[:, :, 0] *= 2 * window - 1
        self.register_buffer("relative_position_index", rel.sum(-1), persistent=False)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.attn_drop = nn.Dropout(P_DROP)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1)
        bias = bias.permute(2, 0, 1).contiguous()
        attn = attn + bias.unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.softmax(attn)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B_, N, C)
        return self.proj(x)


class SplitScaleAttention(nn.Module):
    """Scale split as ``d ** -0.25`` on both q and k; ``torch.matmul(q, k.mT)``; bool padding
    mask through ``torch.where(mask, scores, -inf)``."""
    ATTENTION_SITES = 1

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.drop = nn.Dropout(P_DROP)

    def forward(self, x, attention_mask=None, **_):
        q, k, v = (_split_heads(t, H) for t in self.qkv(x).split(D, dim=-1))
        s = HD ** -0.25
        scores = torch.matmul(q * s, k.mT * s)
        if attention_mask is not None:
            keep = attention_mask[:, None, None, :].bool()
            scores = torch.where(keep, scores, torch.tensor(float("-inf"), dtype=scores.dtype))
        probs = self.drop(torch.softmax(scores, -1))
        return self.proj(_merge_heads(probs.matmul(v)))


class SdpaGqaAttention(nn.Module):
    """``F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
    dropout_p=p if training else 0)`` with 4 query heads and 2 kv heads."""
    ATTENTION_SITES = 1
    KV_HEADS = 2

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(D, D)
        self.kv_proj = nn.Linear(D, 2 * self.KV_HEADS * HD)
        self.o_proj = nn.Linear(D, D)

    def forward(self, x, **_):
        q = _split_heads(self.q_proj(x), H)
        k, v = (_split_heads(t, self.KV_HEADS) for t in self.kv_proj(x).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                             dropout_p=P_DROP if self.training else 0.0)
        return self.o_proj(_merge_heads(out))


class XCAttention(nn.Module):
    """timm XCiT cross-covariance attention: q, k, v as ``(B, H, C/H, N)``; ``F.normalize`` over
    tokens; ``(q @ kᵀ) * self.temperature`` with a learnable ``(H, 1, 1)`` temperature (constant
    along the keys: it folds into q); softmax over channels; ``@ v``."""
    ATTENTION_SITES = 1

    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.rand(H, 1, 1) + 0.5)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.attn_drop = nn.Dropout(P_DROP)

    def forward(self, x, **_):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 4, 1)
        q, k, v = qkv.unbind(0)
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).permute(0, 3, 1, 2).reshape(B, N, C)
        return self.proj(x)


class CosineAttention(nn.Module):
    """Swin-v2 / swinv2_cr cosine attention: ``normalize(q) @ normalize(k)ᵀ`` times
    ``clamp(logit_scale, max=log(100)).exp()`` (a learnable per-head ``(H, 1, 1)`` factor), then
    a relative-position bias; bool padding mask."""
    ATTENTION_SITES = 1

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.rand(H, 1, 1) + 1))
        self.bias = nn.Parameter(torch.randn(H, 1, 1) * 0.1)
        self.proj = nn.Linear(D, D)
        self.attn_drop = nn.Dropout(P_DROP)

    def forward(self, x, attention_mask=None, **_):
        q, k, v = (_split_heads(t, H) for t in self.qkv(x).chunk(3, dim=-1))
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        attn = attn + self.bias
        if attention_mask is not None:
            attn = attn.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))
        attn = self.attn_drop(attn.softmax(dim=-1))
        return self.proj(_merge_heads(attn @ v))


class FilledRowsAttention(nn.Module):
    """DeBERTa-v2 / MPT spelling: the mask is outer(query_keep, key_keep), applied as
    ``masked_fill(~keep, finfo.min)`` -- so a padded *query* row sees no key and the original
    gives it uniform weights (the mean of V). The scale is a 0-d tensor buffer."""
    ATTENTION_SITES = 1

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.drop = nn.Dropout(P_DROP)
        self.register_buffer("scale", torch.tensor(float(HD) ** 0.5), persistent=False)

    def forward(self, x, attention_mask=None, **_):
        q, k, v = (_split_heads(t, H) for t in self.qkv(x).chunk(3, dim=-1))
        scores = torch.matmul(q, k.transpose(-1, -2)) / self.scale
        if attention_mask is not None:
            m = attention_mask.bool()
            keep = m[:, None, :, None] & m[:, None, None, :]
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        probs = self.drop(F.softmax(scores, dim=-1))
        return self.proj(_merge_heads(torch.matmul(probs, v)))


class LearnedQueryAttention(nn.Module):
    """Perceiver / attention-pooling cross-attention: queries are learned latents ``(H, L, d)``
    (parameters alone, broadcast over the batch), keys and values come from the input; written
    as matmul / softmax / matmul. The output is pooled back onto the tokens."""
    ATTENTION_SITES = 1
    LATENTS = 3

    def __init__(self):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(H, self.LATENTS, HD))
        self.kv = nn.Linear(D, 2 * D)
        self.proj = nn.Linear(D, D)
        self.drop = nn.Dropout(P_DROP)

    def forward(self, x, **_):
        k, v = (_split_heads(t, H) for t in self.kv(x).chunk(2, dim=-1))
        attn = (self.latents * HD ** -0.5) @ k.transpose(-2, -1)  # (B, H, L, T)
        pooled = _merge_heads(self.drop(attn.softmax(dim=-1)) @ v)  # (B, L, D)
        return self.proj(pooled).mean(dim=1, keepdim=True).expand_as(x)


# --------------------------------------------------------------------------------------------
# models around the blocks
# --------------------------------------------------------------------------------------------

class Stack(nn.Module):
    """``x -> in_proj -> 2 × (x + block(norm(x), **ctx)) -> out_proj``. ``ctx`` holds the mask in
    the spelling each block expects, prepared once per forward like the real models do."""

    def __init__(self, make_block, mask_style: str | None = None, n_layers: int = 2):
        super().__init__()
        self.in_proj = nn.Linear(D, D)
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(n_layers))
        self.blocks = nn.ModuleList(make_block(i) for i in range(n_layers))
        self.out_proj = nn.Linear(D, D)
        self.mask_style = mask_style

    def context(self, x, attention_mask):
        style = self.mask_style
        if style is None or attention_mask is None:
            return {}
        if style == "raw":
            return {"attention_mask": attention_mask}
        if style == "gpt2":  # (B, 1, 1, T) additive, like old GPT2Model
            ext = attention_mask[:, None, None, :].to(dtype=x.dtype)
            return {"extended_mask": (1.0 - ext) * torch.finfo(x.dtype).min}
        raise ValueError(style)

    def forward(self, x, attention_mask=None):
        h = self.in_proj(x)
        ctx = self.context(h, attention_mask)
        for norm, block in zip(self.norms, self.blocks):
            h = h + block(norm(h), **ctx)
        return self.out_proj(h)


class LlamaOldModel(nn.Module):
    EXTRA = 4  # mask is wider than the keys, like a static cache: sliced to k_len in the block

    def __init__(self):
        super().__init__()
        self.in_proj = nn.Linear(D, D)
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(2))
        self.blocks = nn.ModuleList(LlamaOldAttention() for _ in range(2))
        self.out_proj = nn.Linear(D, D)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, HD, 2, dtype=torch.float32) / HD))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x, attention_mask=None):
        B, T, _ = x.shape
        h = self.in_proj(x)
        pos = torch.arange(T, device=x.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None].expand(B, T, HD), emb.sin()[None].expand(B, T, HD)
        min_v = torch.finfo(h.dtype).min
        target = T + self.EXTRA
        causal = torch.full((T, target), min_v, dtype=h.dtype, device=x.device).triu(1)
        causal = causal[None, None].expand(B, 1, T, target).clone()
        if attention_mask is not None:
            pad = attention_mask[:, None, None, :] == 0
            causal[..., :T] = causal[..., :T].masked_fill(pad, min_v)
        for norm, block in zip(self.norms, self.blocks):
            h = h + block(norm(h), cos=cos, sin=sin, causal_mask=causal)
        return self.out_proj(h)


class BartOldModel(nn.Module):
    """Layer 0: causal self-attention; layer 1: cross-attention over ``memory`` (padded)."""

    def __init__(self):
        super().__init__()
        self.in_proj = nn.Linear(D, D)
        self.mem_proj = nn.Linear(D, D)
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(2))
        self.blocks = nn.ModuleList([BartOldAttention(False), BartOldAttention(True)])
        self.out_proj = nn.Linear(D, D)

    def forward(self, x, memory, memory_mask=None):
        B, T, _ = x.shape
        S = memory.shape[1]
        h = self.in_proj(x)
        mem = self.mem_proj(memory)
        min_v = torch.finfo(h.dtype).min
        self_mask = torch.full((T, T), min_v, dtype=h.dtype).triu(1)[None, None].expand(B, 1, T, T)
        cross_mask = None
        if memory_mask is not None:
            inv = 1.0 - memory_mask[:, None, None, :].to(h.dtype).expand(B, 1, T, S)
            cross_mask = inv.masked_fill(inv.to(torch.bool), min_v)
        for norm, block in zip(self.norms, self.blocks):
            h = h + block(norm(h), memory=mem, self_mask=self_mask, cross_mask=cross_mask)
        return self.out_proj(h)


class T5OldModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.in_proj = nn.Linear(D, D)
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(2))
        self.blocks = nn.ModuleList([T5OldAttention(True), T5OldAttention(False)])
        self.out_proj = nn.Linear(D, D)

    def forward(self, x, attention_mask=None):
        h = self.in_proj(x)
        ext = None
        if attention_mask is not None:
            ext = attention_mask[:, None, None, :].to(h.dtype)
            ext = (1.0 - ext) * torch.finfo(h.dtype).min
        position_bias = None
        for norm, block in zip(self.norms, self.blocks):
            out, position_bias = block(norm(h), mask=ext, position_bias=position_bias)
            h = h + out
        return self.out_proj(h)


class SwinOldModel(nn.Module):
    """8x8 token grid, window 4 (nW = 4, N = 16); block 0 plain, block 1 shifted by 2 with the
    0/-100 region mask."""
    GRID = 8
    WINDOW = 4

    def __init__(self):
        super().__init__()
        self.in_proj = nn.Linear(D, D)
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(2))
        self.blocks = nn.ModuleList(SwinOldAttention(self.WINDOW) for _ in range(2))
        self.shifts = (0, self.WINDOW // 2)
        self.out_proj = nn.Linear(D, D)
        self.register_buffer("attn_mask", self._shift_mask(self.WINDOW // 2), persistent=False)

    def _partition(self, x):  # (B, G, G, C) -> (B*nW, w*w, C)
        B, G, _, C = x.shape
        w = self.WINDOW
        x = x.view(B, G // w, w, G // w, w, C).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, w * w, C)

    def _reverse(self, win, B):
        G, w = self.GRID, self.WINDOW
        C = win.shape[-1]
        x = win.view(B, G // w, G // w, w, w, C).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(B, G, G, C)

    def _shift_mask(self, shift):
        G, w = self.GRID, self.WINDOW
        img = torch.zeros(1, G, G, 1)
        cnt = 0
        for hs in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
            for ws in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
                img[:, hs, ws, :] = cnt
                cnt += 1
        win = self._partition(img).squeeze(-1)  # (nW, N)
        mask = win.unsqueeze(1) - win.unsqueeze(2)
        return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)

    def forward(self, x):
        B, L, C = x.shape
        G = self.GRID
        h = self.in_proj(x)
        for norm, block, shift in zip(self.norms, self.blocks, self.shifts):
            y = norm(h).view(B, G, G, C)
            if shift:
                y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
            y = block(self._partition(y), mask=self.attn_mask if shift else None)
            y = self._reverse(y, B)
            if shift:
                y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
            h = h + y.reshape(B, L, C)
        return self.out_proj(h)


# --------------------------------------------------------------------------------------------
# inputs and cases
# --------------------------------------------------------------------------------------------

def _x_inputs(default_seq=8, mask=False, memory=False, fixed_seq=None):
    def inputs(batch: int = 2, seq: int | None = None, seed: int = 0):
        T = fixed_seq or seq or default_seq
        args = (randn(batch, T, D, seed=seed),)
        kwargs = {}
        if memory:
            S = T + 3
            kwargs["memory"] = randn(batch, S, D, seed=seed + 1)
            kwargs["memory_mask"] = padded_mask(batch, S)
        elif mask:
            kwargs["attention_mask"] = padded_mask(batch, T)
        return args, kwargs

    return inputs


def _case(name, build, inputs, tags, note=""):
    return ZooCase(name=f"hand:{name}", build=seeded(build), inputs=inputs,
                   count_attention=count_sites_attr, tags={"hand", "train_ok"} | set(tags), note=note)


def cases() -> list[ZooCase]:
    return [
        _case("einsum", lambda: Stack(lambda i: EinsumAttention()), _x_inputs(), {"einsum"}),
        _case("scale_q", lambda: Stack(lambda i: ScaleQAttention(), "raw"), _x_inputs(mask=True),
              {"scale_q", "padding", "masked_fill"}),
        _case("baddbmm", lambda: Stack(lambda i: BaddbmmAttention(), "raw"), _x_inputs(mask=True),
              {"baddbmm", "bmm", "padding"}),
        _case("softmax_fp32", lambda: Stack(lambda i: Fp32SoftmaxAttention()), _x_inputs(),
              {"fp32_softmax", "causal"}),
        _case("gpt2_old", lambda: Stack(lambda i: GPT2OldAttention(), "gpt2"), _x_inputs(mask=True),
              {"causal", "causal_buffer", "where", "padding"}),
        _case("llama_repeat_kv", LlamaOldModel, _x_inputs(mask=True),
              {"causal", "gqa", "rope", "padding", "sliced_mask", "fp32_softmax"}),
        _case("bart_bmm", BartOldModel, _x_inputs(memory=True),
              {"bmm", "causal", "cross", "padding"}),
        _case("distilbert_masked_fill", lambda: Stack(lambda i: DistilBertOldAttention(), "raw"),
              _x_inputs(mask=True), {"masked_fill", "scale_q", "padding"}),
        _case("t5_position_bias", T5OldModel, _x_inputs(mask=True),
              {"rel_bias", "no_scale", "fp32_softmax", "padding", "inplace"}),
        _case("swin_window", SwinOldModel, _x_inputs(fixed_seq=SwinOldModel.GRID ** 2),
              {"rel_bias", "shifted_window", "nn_softmax", "vision"},
              note="ignores seq: 8x8 grid"),
        _case("split_scale", lambda: Stack(lambda i: SplitScaleAttention(), "raw"),
              _x_inputs(mask=True), {"split_scale", "where", "padding"}),
        _case("sdpa_gqa_causal", lambda: Stack(lambda i: SdpaGqaAttention()), _x_inputs(),
              {"sdpa", "gqa", "causal"}),
        _case("xcit_temperature", lambda: Stack(lambda i: XCAttention()), _x_inputs(),
              {"tensor_scale", "learned_temperature"}),
        _case("cosine_logit_scale", lambda: Stack(lambda i: CosineAttention(), "raw"),
              _x_inputs(mask=True), {"tensor_scale", "learned_temperature", "padding"}),
        _case("filled_query_rows", lambda: Stack(lambda i: FilledRowsAttention(), "raw"),
              _x_inputs(mask=True), {"tensor_scale", "finite_fill", "padding"}),
        _case("learned_queries", lambda: Stack(lambda i: LearnedQueryAttention()), _x_inputs(),
              {"learned_query", "broadcast"}),
    ]
