"""Why softmax attention is scaled by 1/√d: saturation and vanishing gradients at initialization.

``attnswap.convert`` keeps a model's own scale (it has no "drop the scale" option), so this
analysis does not go through it. It is plain torch math on two sources of q, k and v, per head
dim d and with the scale c = 1/√d or c = 1:

* ``model``: the task's own model built at initialization with that head dim (4 heads, so width
  4·d), fed a real batch; q, k, v are computed from the first attention layer's input with that
  layer's own projection weights — the values the model would really multiply at step 0.
* ``unit``: q, k, v with i.i.d. N(0, 1) entries, the premise of the textbook argument
  (q·k then has variance d).

For P = softmax(c·q kᵀ) (causal for the text model) and a fixed random upstream gradient G on
the output O = P v (loss L = Σ O ⊙ G), it reports the mean over query rows of: max_j P (1/n for
uniform weights, 1 when saturated), the std of the logits c·q·k, ``softmax_grad`` = ‖J·u‖/‖u‖
for the softmax's Jacobian J and a random u (how much of a gradient passes through the softmax:
about 1/n for uniform weights, larger for peaked ones, → 0 when saturated), ‖∂L/∂logits‖ and
‖∂L/∂q‖ (what reaches W_q through the scores). For causal rows only queries that see at least half of the keys
are averaged, so that rows with one visible key (trivially max P = 1) do not blur the picture.
"""

from __future__ import annotations

import math

import torch

from .aggregate import mean_std

__all__ = ["HEAD_DIMS", "attention_stats", "model_qkv", "init_analysis"]

HEAD_DIMS = (16, 32, 64, 128, 256)
QUANTITIES = ("max_prob", "logit_std", "softmax_grad", "grad_logits", "grad_q")


def attention_stats(q, k, v, scale: float, causal: bool, seed: int) -> dict:
    q = q.detach().double().requires_grad_(True)
    k, v = k.detach().double(), v.detach().double()
    logits = scale * q @ k.transpose(-2, -1)
    logits.retain_grad()
    t_q, t_k = logits.shape[-2:]
    if causal:
        keep = torch.ones(t_q, t_k, dtype=torch.bool).tril()
        p = logits.masked_fill(~keep, float("-inf")).softmax(-1)
        rows = torch.arange(t_q) >= (t_k - 1) // 2          # rows that see at least half the keys
    else:
        p = logits.softmax(-1)
        rows = torch.ones(t_q, dtype=torch.bool)
    out = p @ v
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    (out * g).sum().backward()
    # The softmax's own Jacobian on a random upstream gradient: J·u = P ⊙ (u − Σ P u).
    u = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    if causal:
        u = u.masked_fill(~keep, 0.0)
    ju = p.detach() * (u - (p.detach() * u).sum(-1, keepdim=True))
    through = (ju.norm(dim=-1) / u.norm(dim=-1))[..., rows]
    visible = logits if not causal else logits.masked_fill(~keep, float("nan"))
    return {
        "max_prob": p.amax(-1)[..., rows].mean().item(),
        "logit_std": torch.nanmean((visible[..., rows, :] - torch.nanmean(visible[..., rows, :], -1, True)) ** 2)
        .sqrt().item(),
        "grad_logits": logits.grad[..., rows, :].norm(dim=-1).mean().item(),
        "grad_q": q.grad[..., rows, :].norm(dim=-1).mean().item(),
        "softmax_grad": through.mean().item(),
    }


def model_qkv(task) -> tuple:
    """q, k, v ``[B, H, T, d]`` at the first attention layer of ``task.model`` on its example batch."""
    model = task.model.eval()
    if task.name == "digits":
        attn = model.blocks[0].attn
    else:
        attn = model.transformer.h[0].attn
    seen = {}

    def grab(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    ex = task.example   # the tasks' own example inputs: a tensor (digits) or keyword args (text)
    try:
        with torch.no_grad():
            model(**ex) if isinstance(ex, dict) else model(ex)
    except _Stop:
        pass
    finally:
        handle.remove()
    x = seen["x"]
    b, t, _ = x.shape
    with torch.no_grad():
        if task.name == "digits":
            h, d = attn.num_heads, attn.head_dim
            q, k, v = attn.qkv(x).reshape(b, t, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            h, d = attn.num_heads, attn.head_dim
            q, k, v = (z.view(b, t, h, d).transpose(1, 2) for z in attn.c_attn(x).split(h * d, dim=2))
    return q, k, v


class _Stop(Exception):
    pass


def init_analysis(task_name: str, build, seeds, head_dims=HEAD_DIMS, heads: int = 4) -> dict:
    """``build(seed, arch)`` returns the task (see training.TASKS) for that seed and model."""
    width, depth, n_heads = (("embed_dim", "depth", "num_heads") if task_name == "digits"
                             else ("n_embd", "n_layer", "n_head"))
    causal = task_name == "text"
    rows = []
    for d in head_dims:
        per_seed = {("model", s): None for s in seeds}
        for s in seeds:
            task = build(s, {width: heads * d, n_heads: heads, depth: 1})   # only the first layer is looked at
            per_seed[("model", s)] = model_qkv(task)
            q, _, _ = per_seed[("model", s)]
            if q.shape[1] != heads or q.shape[-1] != d:
                raise AssertionError(f"built q of shape {tuple(q.shape)} for {heads} heads of dim {d}")
            gen = torch.Generator().manual_seed(1000 + s)
            per_seed[("unit", s)] = tuple(torch.randn(q.shape, generator=gen) for _ in range(3))
        for source in ("model", "unit"):
            for scaled in (True, False):
                scale = 1 / math.sqrt(d) if scaled else 1.0
                stats = {s: attention_stats(*per_seed[(source, s)], scale, causal, seed=2000 + s) for s in seeds}
                row = {"source": source, "head_dim": d, "scaled": scaled, "scale": scale,
                       "keys": per_seed[(source, seeds[0])][1].shape[-2],
                       "per_seed": {str(s): stats[s] for s in seeds}}
                for qn in QUANTITIES:
                    m, sd = mean_std([stats[s][qn] for s in seeds])
                    row[qn] = {"mean": m, "std": sd}
                rows.append(row)
    return {"head_dims": list(head_dims), "heads": heads, "causal": causal, "rows": rows,
            "method": __doc__.split("\n\n", 1)[1].strip()}
