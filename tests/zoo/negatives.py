"""Negatives: models whose every softmax must be left alone (``positive=False``, 0 sites).

``count_attention`` of a negative returns the number of sites the pass should rewrite: 0 (the
function still inspects the model, counting ``ATTENTION_SITES`` like the hand-written zoo). Each
case carries a ``skip_reason``. (``torch:mha-weights_returned`` in ``torch_models.py`` is a
negative too.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cases import ZooCase, count_sites_attr, padded_mask, randn, seeded

D = 32
H = 4
HD = D // H


def _split_heads(x, heads=H):
    b, t, _ = x.shape
    return x.view(b, t, heads, -1).transpose(1, 2)


def _merge_heads(x):
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


class Classifier(nn.Module):
    """Mean-pooled features → linear → softmax over classes (probabilities are the output)."""
    ATTENTION_SITES = 0

    def __init__(self, classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D))
        self.head = nn.Linear(D, classes)

    def forward(self, x):
        h = self.body(x).mean(dim=1)
        return F.softmax(self.head(h), dim=-1)


class MoERouter(nn.Module):
    """Mixtral-like: ``router_logits = gate(x)``; ``softmax(dim=-1, dtype=float)``; ``topk``;
    renormalise; weighted sum of expert outputs."""
    ATTENTION_SITES = 0

    def __init__(self, experts=4, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(D, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(D, 2 * D), nn.SiLU(), nn.Linear(2 * D, D))
                                     for _ in range(experts))

    def forward(self, x):
        B, T, C = x.shape
        flat = x.reshape(-1, C)
        routing = F.softmax(self.gate(flat), dim=1, dtype=torch.float)
        weights, selected = torch.topk(routing, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        # dense formulation (no data-dependent control flow): gather each expert's weight
        expert_out = torch.stack([e(flat) for e in self.experts], dim=1)  # (BT, E, C)
        dense_w = torch.zeros(flat.shape[0], len(self.experts), dtype=x.dtype).scatter(1, selected, weights)
        out = (dense_w.unsqueeze(-1) * expert_out).sum(dim=1)
        return out.view(B, T, C)


class ParamKeysAttention(nn.Module):
    """Softmax over ``x @ self.keys.T`` (a parameter operand: a learned memory / codebook lookup),
    then ``@ v`` of an activation -- not attention between activations."""
    ATTENTION_SITES = 0

    def __init__(self, slots=4):
        super().__init__()
        self.q = nn.Linear(D, D)
        self.keys = nn.Parameter(torch.randn(slots, D) * D ** -0.5)
        self.v = nn.Linear(D, D)
        self.slots = slots

    def forward(self, x):
        scores = self.q(x) @ self.keys.t() * D ** -0.5  # (B, T, slots)
        probs = scores.softmax(dim=-1)
        v = self.v(x)[:, : self.slots]  # an activation with `slots` rows (needs T >= slots)
        return probs @ v


class NonLastAxisAttention(nn.Module):
    """Slot-attention-like: ``q @ kᵀ`` scores but the softmax is over the *query* axis
    (``dim=-2``), then ``@ v``."""
    ATTENTION_SITES = 0

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        q, k, v = (_split_heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        scores = torch.matmul(q, k.transpose(-2, -1)) * HD ** -0.5
        probs = scores.softmax(dim=-2)
        return self.proj(_merge_heads(torch.matmul(probs, v)))


class ReturnsProbsAttention(nn.Module):
    """``output_attentions``-like: returns ``(out, probs)``; the caller consumes the probabilities."""
    ATTENTION_SITES = 0

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)

    def forward(self, x, attention_mask=None):
        q, k, v = (_split_heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        scores = torch.matmul(q, k.transpose(-2, -1)) * HD ** -0.5
        if attention_mask is not None:
            scores = scores + (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        probs = F.softmax(scores, dim=-1)
        return self.proj(_merge_heads(torch.matmul(probs, v))), probs


class ReturnsProbsModel(nn.Module):
    ATTENTION_SITES = 0

    def __init__(self):
        super().__init__()
        self.attn = ReturnsProbsAttention()

    def forward(self, x, attention_mask=None):
        out, probs = self.attn(x, attention_mask)
        return out, probs


class SoftcapAttention(nn.Module):
    """Gemma2 eager: ``w = matmul(q, kᵀ) * scaling``; ``w = w / softcap; w = tanh(w); w = w *
    softcap``; ``+ causal mask``; ``softmax(dtype=float32).to(q.dtype)``; matmul."""
    ATTENTION_SITES = 0

    def __init__(self, softcap=50.0):
        super().__init__()
        self.softcap = softcap
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        q, k, v = (_split_heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        T = x.shape[1]
        w = torch.matmul(q, k.transpose(2, 3)) * HD ** -0.5
        w = w / self.softcap
        w = torch.tanh(w)
        w = w * self.softcap
        mask = torch.full((T, T), torch.finfo(w.dtype).min, dtype=w.dtype).triu(1)
        w = w + mask
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.proj(_merge_heads(torch.matmul(w, v)))


def _x_inputs(default_seq=8, mask=False):
    def inputs(batch: int = 2, seq: int | None = None, seed: int = 0):
        T = seq or default_seq
        kwargs = {"attention_mask": padded_mask(batch, T)} if mask else {}
        return (randn(batch, T, D, seed=seed),), kwargs

    return inputs


def _neg(name, build, reason, tags=(), inputs=None, output_of=None):
    extra = {"output_of": output_of} if output_of else {}
    return ZooCase(name=f"neg:{name}", build=seeded(build), inputs=inputs or _x_inputs(),
                   count_attention=count_sites_attr, positive=False, skip_reason=reason,
                   tags={"neg", "train_ok"} | set(tags), **extra)


def cases() -> list[ZooCase]:
    return [
        _neg("classifier", Classifier,
             "softmax over classes of a linear head: its input is activation @ parameter, and "
             "its output feeds no matmul with an activation"),
        _neg("moe_router", MoERouter,
             "mixture-of-experts router: softmax over gate(x) (a parameter operand), consumed by "
             "topk/scatter, not by a matmul with V"),
        _neg("param_keys", ParamKeysAttention,
             "scores are x @ parameterᵀ (learned keys), not a product of two activations"),
        _neg("softmax_dim_-2", NonLastAxisAttention,
             "softmax over the query axis (dim=-2), not over keys", tags={"non_last_axis"}),
        _neg("returns_probs", ReturnsProbsModel,
             "attention probabilities are returned to the caller (output_attentions-like): an "
             "external consumer of P", tags={"weights_returned", "padding"},
             inputs=_x_inputs(mask=True)),
        _neg("softcap", SoftcapAttention,
             "Gemma2-style logit soft-capping (tanh) between QKᵀ and softmax: not a scale, bias or "
             "mask", tags={"softcap", "causal"}),
    ]
