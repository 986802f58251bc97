"""torch / torchvision cases: ``nn.MultiheadAttention`` in its call variants, the
``nn.Transformer*Layer`` modules, and a shrunk torchvision ViT.

How ``nn.MultiheadAttention`` computes (torch 2.14, ``F.multi_head_attention_forward``):

* ``need_weights=True`` (the default!): ``q_scaled = q * math.sqrt(1.0 / E)`` (E = head dim) on
  ``(bsz*heads, T, E)``; ``torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))`` when there
  is a (merged, float) mask, else ``torch.bmm``; ``softmax(dim=-1)``; ``dropout`` if p > 0;
  ``torch.bmm(P, v)``. P is then also viewed to ``(bsz, heads, T, S)`` and ``.mean(dim=1)`` for
  the returned weights -- a second consumer of P, dead when the caller drops the weights.
* ``need_weights=False``: ``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p,
  is_causal)`` on ``(bsz, heads, T, E)``.
* FAST PATH: in ``eval()`` with autograd off (``torch.no_grad()``/``inference_mode``, or no
  argument requiring grad), batch_first, self-attention (``query is key is value``), an even
  number of heads, no float mask, ... ``MultiheadAttention.forward`` returns
  ``torch._native_multi_head_attention(...)`` -- one opaque op with the projections inside; no
  softmax and no SDPA appear in the graph. Likewise ``nn.TransformerEncoderLayer`` calls
  ``torch._transformer_encoder_layer_fwd`` (the whole layer, MLP included) and
  ``nn.TransformerEncoder`` additionally converts a padded batch to a NestedTensor
  (``enable_nested_tensor=True``, the default). Under ``make_fx`` tracing (``torch.export``,
  AOTAutograd) the fast path is disabled by design (``_is_make_fx_tracing()``); under dynamo it is
  whatever ``torch.is_grad_enabled()`` says at trace time. Tests toggle ``train()``/``eval()``
  and grad mode and should expect these ops in eval + no_grad graphs.
"""

from __future__ import annotations

from torch import nn

from .cases import ZooCase, count_modules, padded_mask, randn, seeded

D = 32
HEADS = 2  # even: the MHA fast path needs an even head count


def _x_inputs(default_seq=8, kpm=False, memory=False, causal_mask=False):
    """(x,) plus, optionally, a bool key_padding_mask (True = ignore), a memory tensor of a
    different length (cross-attention) and a float causal mask."""

    def inputs(batch: int = 2, seq: int | None = None, seed: int = 0):
        seq = seq or default_seq
        kwargs = {}
        if memory:
            mem_len = seq + 3
            kwargs["memory"] = randn(batch, mem_len, D, seed=seed + 1)
            if kpm:
                kwargs["key_padding_mask"] = padded_mask(batch, mem_len) == 0
        elif kpm:
            kwargs["key_padding_mask"] = padded_mask(batch, seq) == 0
        if causal_mask:
            kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(seq)
        return (randn(batch, seq, D, seed=seed),), kwargs

    return inputs


class MHABlock(nn.Module):
    """Pre-norm residual block around ``nn.MultiheadAttention`` (batch_first)."""

    def __init__(self, need_weights: bool, return_weights: bool = False, cross: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, HEADS, dropout=0.1, batch_first=True)
        self.need_weights = need_weights
        self.return_weights = return_weights
        self.cross = cross

    def forward(self, x, memory=None, key_padding_mask=None, attn_mask=None):
        h = self.norm(x)
        kv = memory if self.cross else h
        out, weights = self.attn(h, kv, kv, key_padding_mask=key_padding_mask,
                                 attn_mask=attn_mask, need_weights=self.need_weights)
        return x + out, weights


class MHAStack(nn.Module):
    """Two ``MHABlock`` s. Returns the output only, or ``(output, weights of the last block)``
    when the last block has ``return_weights``."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(D, D)

    def forward(self, x, memory=None, key_padding_mask=None, attn_mask=None):
        weights = None
        for block in self.blocks:
            x, weights = block(x, memory, key_padding_mask, attn_mask)
        x = self.head(x)
        if self.blocks[-1].return_weights:
            return x, weights
        return x


def _count_mha_not_returning(m: nn.Module) -> int:
    return sum(1 for b in m.modules() if isinstance(b, MHABlock) and not b.return_weights)


def _mha_case(name, blocks, inputs, tags, positive=True, skip_reason="", note=""):
    return ZooCase(
        name=f"torch:mha-{name}",
        build=seeded(lambda: MHAStack(blocks())),
        inputs=inputs,
        count_attention=_count_mha_not_returning,
        positive=positive,
        skip_reason=skip_reason,
        tags={"torch", "mha"} | set(tags),
        note=note,
    )


class EncoderLayerWrap(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(D, HEADS, dim_feedforward=64, batch_first=True)

    def forward(self, x, key_padding_mask=None):
        return self.layer(x, src_key_padding_mask=key_padding_mask)


class EncoderWrap(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(D, HEADS, dim_feedforward=64, batch_first=True)
        # enable_nested_tensor=True is the default: eval + no_grad + a padding mask takes the
        # NestedTensor fast path (padded positions come back as zeros).
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True)

    def forward(self, x, key_padding_mask=None):
        out = self.encoder(x, src_key_padding_mask=key_padding_mask)
        # The NestedTensor path returns zeros at padded positions, the other paths do not: zero
        # them here so every path (eager fast path, dynamo, export, converted) is comparable.
        if key_padding_mask is not None:
            out = out.masked_fill(key_padding_mask[..., None], 0.0)
        return out


class DecoderLayerWrap(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(D, HEADS, dim_feedforward=64, batch_first=True)

    def forward(self, x, memory, key_padding_mask=None, attn_mask=None):
        return self.layer(x, memory, tgt_mask=attn_mask, tgt_is_causal=attn_mask is not None,
                          memory_key_padding_mask=key_padding_mask)


def _tv_vit():
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=HEADS,
                             hidden_dim=D, mlp_dim=64, num_classes=10)


def _image_inputs(batch: int = 2, seq: int | None = None, seed: int = 0):
    return (randn(batch, 3, 32, 32, seed=seed),), {}


def cases() -> list[ZooCase]:
    mha = nn.MultiheadAttention
    out = [
        ZooCase(
            name="torch:vit_b16-small",
            build=seeded(_tv_vit),
            inputs=_image_inputs,
            count_attention=lambda m: count_modules(m, mha),
            tags={"torch", "torchvision", "vision", "mha", "sdpa", "fastpath", "train_ok"},
            note="EncoderBlock calls self_attention(x, x, x, need_weights=False) → SDPA; "
                 "eval+no_grad → torch._native_multi_head_attention",
        ),
        _mha_case("need_weights", lambda: [MHABlock(True), MHABlock(True)], _x_inputs(),
                  {"weights_discarded", "bmm", "fastpath", "train_ok"},
                  note="need_weights=True, weights dropped by the caller: q*sqrt(1/E); bmm; "
                       "softmax; bmm (+ a dead view/mean of P)"),
        _mha_case("no_weights", lambda: [MHABlock(False), MHABlock(False)], _x_inputs(),
                  {"sdpa", "fastpath", "train_ok"}),
        _mha_case("kpm", lambda: [MHABlock(False), MHABlock(False)], _x_inputs(kpm=True),
                  {"sdpa", "padding", "fastpath", "train_ok"},
                  note="bool key_padding_mask merged into a float attn_mask for SDPA"),
        _mha_case("kpm-need_weights", lambda: [MHABlock(True), MHABlock(True)],
                  _x_inputs(kpm=True),
                  {"weights_discarded", "baddbmm", "padding", "fastpath", "train_ok"},
                  note="merged float mask → baddbmm(mask, q*sqrt(1/E), kᵀ)"),
        _mha_case("attn_mask", lambda: [MHABlock(False), MHABlock(False)],
                  _x_inputs(causal_mask=True), {"sdpa", "causal", "train_ok"},
                  note="float causal attn_mask: never the fast path"),
        _mha_case("cross", lambda: [MHABlock(False, cross=True), MHABlock(False, cross=True)],
                  _x_inputs(memory=True, kpm=True), {"sdpa", "cross", "padding", "train_ok"},
                  note="query is not key: never the fast path; Tq != Tk"),
        _mha_case("mixed_weights", lambda: [MHABlock(True), MHABlock(True, return_weights=True)],
                  _x_inputs(), {"weights_discarded", "weights_returned", "bmm", "train_ok"},
                  note="block 0 drops its weights (a site), block 1 returns them (leave alone): "
                       "1 site of 2 MHA modules"),
        _mha_case("weights_returned", lambda: [MHABlock(True, return_weights=True)], _x_inputs(),
                  {"weights_returned", "bmm", "train_ok"}, positive=False,
                  skip_reason="the attention probabilities are returned to the caller (an "
                              "external consumer of P): replacing softmax would change them"),
        ZooCase(
            name="torch:encoder_layer",
            build=seeded(EncoderLayerWrap),
            inputs=_x_inputs(kpm=True),
            count_attention=lambda m: count_modules(m, mha),
            tags={"torch", "mha", "sdpa", "padding", "fastpath", "train_ok"},
            note="eval+no_grad → torch._transformer_encoder_layer_fwd (whole layer, opaque)",
        ),
        ZooCase(
            name="torch:transformer_encoder",
            build=seeded(EncoderWrap),
            inputs=_x_inputs(kpm=True),
            count_attention=lambda m: count_modules(m, mha),
            tags={"torch", "mha", "sdpa", "padding", "fastpath", "nested", "train_ok"},
            note="eval+no_grad + padding mask → NestedTensor + _transformer_encoder_layer_fwd",
        ),
        ZooCase(
            name="torch:decoder_layer",
            build=seeded(DecoderLayerWrap),
            inputs=_x_inputs(memory=True, kpm=True, causal_mask=True),
            count_attention=lambda m: count_modules(m, mha),
            tags={"torch", "mha", "sdpa", "causal", "cross", "padding", "train_ok"},
            note="self-attn with float causal tgt_mask (+tgt_is_causal) and cross-attn with a "
                 "memory key padding mask; no fast path (decoder layer has none)",
        ),
    ]
    return out

