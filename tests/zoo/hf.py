"""HuggingFace transformers cases, each with ``attn_implementation="eager"`` and ``"sdpa"``.

How transformers 5.24 writes these attentions (read from the installed sources):

* eager: one ``eager_attention_forward(module, q, k, v, attention_mask, scaling, dropout)`` per model
  file, all of shape ``torch.matmul(q, k.transpose(2, 3)) * scaling`` (GPT-2: ``transpose(-1, -2)``)
  → ``+ attention_mask`` (a 4D additive float mask from ``masking_utils``, may be ``None``) →
  ``nn.functional.softmax(w, dim=-1)`` (Llama and ViT: ``softmax(w, dim=-1, dtype=torch.float32)
  .to(q.dtype)``; GPT-2 adds ``.type(value.dtype)``) → ``nn.functional.dropout(p, training=module
  .training)`` → ``torch.matmul(w, v)``; the function returns ``(out, attn_weights)`` and the
  caller drops the weights unless attentions are being recorded.
  - T5: the same function with ``scaling=1.0`` (so a ``* 1.0``) and ``+ position_bias`` then
    ``+ attention_mask`` (two separate adds; no fp32 softmax any more).
  - Llama: ``repeat_kv`` (``x[:, :, None].expand(...).reshape(...)``) on k and v first.
  - BART: the 4D matmul form above (no longer ``bmm`` on ``(bsz*heads, tgt, d)``).
  - DistilBERT: the BERT form (no longer ``q / sqrt(d)`` + ``masked_fill``).
* sdpa: ``integrations/sdpa_attention.py::sdpa_attention_forward`` →
  ``F.scaled_dot_product_attention(q, k, v, attn_mask=..., dropout_p=..., scale=scaling,
  is_causal=q_len > 1 and mask is None and module.is_causal, enable_gqa=...)``. GQA uses
  ``enable_gqa=True`` only when the mask is None (else ``repeat_kv``); T5's position bias is
  merged into a float mask (``torch.where(bool_mask, position_bias, finfo.min)`` or
  ``position_bias + float_mask``) and ``is_causal`` is forced False.

The hand-written zoo (``handwritten.py``) keeps the older spellings (BART bmm, DistilBERT
masked_fill, T5 ``softmax(scores.float()).type_as(scores)``, GPT-2 sliced bool buffer).
"""

from __future__ import annotations

import torch

from .cases import ZooCase, count_modules, padded_mask, randn, seeded, token_ids

VOCAB = 96
IMPLS = ("eager", "sdpa")


def _build(model_name: str, config_name: str, impl: str, **cfg):
    """A constructor that imports transformers only when called (importing the zoo stays cheap)."""

    def make():
        import transformers

        config = getattr(transformers, config_name)(**cfg)
        return getattr(transformers, model_name)._from_config(config, attn_implementation=impl)

    make.__name__ = f"build_{model_name}_{impl}"
    return make


def _counter(module: str, *class_names: str):
    """count_attention: the number of modules of the model's attention classes (lazy import)."""

    def count(model) -> int:
        import importlib

        mod = importlib.import_module(module)
        return count_modules(model, tuple(getattr(mod, n) for n in class_names))

    return count


def _encoder_inputs(default_seq: int = 8, vocab: int = VOCAB):
    def inputs(batch: int = 2, seq: int | None = None, seed: int = 0):
        seq = seq or default_seq
        ids = token_ids(batch, seq, vocab, seed)
        mask = padded_mask(batch, seq)
        ids = ids * mask  # pad id 0 on padded positions
        return (), {"input_ids": ids, "attention_mask": mask}

    return inputs


def _causal_inputs(default_seq: int = 8, vocab: int = VOCAB, padded: bool = False):
    def inputs(batch: int = 2, seq: int | None = None, seed: int = 0):
        seq = seq or default_seq
        ids = token_ids(batch, seq, vocab, seed)
        kwargs = {"input_ids": ids}
        if padded:
            mask = padded_mask(batch, seq)
            kwargs = {"input_ids": ids * mask, "attention_mask": mask}
        return (), kwargs

    return inputs


def _seq2seq_inputs(default_seq: int = 8, vocab: int = VOCAB):
    """Encoder ids with a padded mask; decoder ids shorter than the encoder's (Tq != Tk in
    cross-attention)."""

    def inputs(batch: int = 2, seq: int | None = None, seed: int = 0):
        seq = seq or default_seq
        ids = token_ids(batch, seq, vocab, seed)
        mask = padded_mask(batch, seq)
        dec = token_ids(batch, max(2, seq - 2), vocab, seed + 1)
        return (), {"input_ids": ids * mask, "attention_mask": mask, "decoder_input_ids": dec}

    return inputs


def _image_inputs(size: int, channels: int = 3, key: str | None = "pixel_values"):
    def inputs(batch: int = 2, seq: int | None = None, seed: int = 0):
        x = randn(batch, channels, size, size, seed=seed)
        return ((), {key: x}) if key else ((x,), {})

    return inputs


def _bert(impl):
    from transformers import BertConfig, BertModel
    from transformers.models.bert.modeling_bert import BertCrossAttention, BertSelfAttention

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
    return ZooCase(
        name=f"hf:bert-{impl}",
        build=seeded(_from_config(BertModel, cfg, impl)),
        inputs=_encoder_inputs(),
        count_attention=lambda m: count_modules(m, (BertSelfAttention, BertCrossAttention)),
        tags={"hf", impl, "padding", "encoder", "train_ok"},
    )


def _distilbert(impl):
    from transformers import DistilBertConfig, DistilBertModel
    from transformers.models.distilbert.modeling_distilbert import DistilBertSelfAttention

    cfg = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                           max_position_embeddings=64)
    return ZooCase(
        name=f"hf:distilbert-{impl}",
        build=seeded(_from_config(DistilBertModel, cfg, impl)),
        inputs=_encoder_inputs(),
        count_attention=lambda m: count_modules(m, DistilBertSelfAttention),
        tags={"hf", impl, "padding", "encoder", "train_ok"},
    )


def _gpt2(impl):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return ZooCase(
        name=f"hf:gpt2-{impl}",
        build=seeded(_from_config(GPT2LMHeadModel, cfg, impl)),
        inputs=_causal_inputs(),
        count_attention=lambda m: count_modules(m, GPT2Attention),
        tags={"hf", impl, "causal", "decoder", "generate", "train_ok"},
    )


def _llama(impl, padded=False):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaAttention

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=64, pad_token_id=0)
    tags = {"hf", impl, "causal", "decoder", "gqa", "rope", "generate", "train_ok"}
    if padded:
        tags.add("padding")
    return ZooCase(
        name=f"hf:llama-{impl}" + ("-padded" if padded else ""),
        build=seeded(_from_config(LlamaForCausalLM, cfg, impl)),
        inputs=_causal_inputs(padded=padded),
        count_attention=lambda m: count_modules(m, LlamaAttention),
        tags=tags,
        note=("sdpa: mask is None → enable_gqa=True; with a padding mask → repeat_kv + bool mask"
              if impl == "sdpa" else ""),
    )


def _t5(impl):
    from transformers import T5Config, T5Model
    from transformers.models.t5.modeling_t5 import T5Attention

    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                   num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                   relative_attention_max_distance=16, decoder_start_token_id=0, pad_token_id=0)
    return ZooCase(
        name=f"hf:t5-{impl}",
        build=seeded(_from_config(T5Model, cfg, impl)),
        inputs=_seq2seq_inputs(),
        # encoder self + decoder self + decoder cross
        count_attention=lambda m: count_modules(m, T5Attention),
        tags={"hf", impl, "padding", "causal", "cross", "rel_bias", "encoder_decoder", "train_ok"},
    )


def _bart(impl):
    from transformers import BartConfig, BartModel
    from transformers.models.bart.modeling_bart import BartAttention

    cfg = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                     decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)
    return ZooCase(
        name=f"hf:bart-{impl}",
        build=seeded(_from_config(BartModel, cfg, impl)),
        inputs=_seq2seq_inputs(),
        # encoder self + decoder causal self + decoder cross
        count_attention=lambda m: count_modules(m, BartAttention),
        tags={"hf", impl, "padding", "causal", "cross", "encoder_decoder", "train_ok"},
    )


def _vit(impl):
    from transformers import ViTConfig, ViTModel
    from transformers.models.vit.modeling_vit import ViTAttention

    cfg = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32,
                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    return ZooCase(
        name=f"hf:vit-{impl}",
        build=seeded(_from_config(ViTModel, cfg, impl)),
        inputs=_image_inputs(32),
        count_attention=lambda m: count_modules(m, ViTAttention),
        tags={"hf", impl, "vision", "train_ok"},
    )


def cases() -> list[ZooCase]:
    out = []
    for impl in IMPLS:
        out += [_bert(impl), _distilbert(impl), _gpt2(impl), _llama(impl), _llama(impl, padded=True),
                _t5(impl), _bart(impl), _vit(impl)]
    return out
