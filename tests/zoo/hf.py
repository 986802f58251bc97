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
* Masks (from ``masking_utils``), measured on these configs: eager always gets a materialised
  float ``(B, 1, Tq, Tk)`` mask of 0 / ``finfo.min`` (causal ones included; built in the graph as
  ``torch.where(bool_mask, zeros, finfo.min)``); sdpa gets a bool ``(B, 1, Tq, Tk)`` mask (True =
  attend) or None. In *eager execution* an unpadded causal LM gets ``mask=None,
  is_causal=True`` (Llama also ``enable_gqa=True``); under dynamo and torch.export the causal mask
  is materialised as bool (index-arithmetic ops in the graph) and SDPA sees ``is_causal=False`` and
  ``repeat_kv``-expanded k/v. BART's decoder self-attention keeps ``mask=None, is_causal=True``
  under dynamo but gets a bool mask under torch.export.
* ViT passes ``attention_mask=None``. Gemma2 (5.24) has no sdpa support at all.

The hand-written zoo (``handwritten.py``) keeps the older spellings (BART bmm, DistilBERT
masked_fill, T5 ``softmax(scores.float()).type_as(scores)``, GPT-2 sliced bool buffer).
"""

from __future__ import annotations

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
        # use_cache=False: otherwise the output holds a DynamicCache, which torch.export cannot
        # flatten (and which nobody compares). generate() sets its own use_cache.
        kwargs = {"input_ids": ids, "use_cache": False}
        if padded:
            mask = padded_mask(batch, seq)
            kwargs = {"input_ids": ids * mask, "attention_mask": mask, "use_cache": False}
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
        return (), {"input_ids": ids * mask, "attention_mask": mask, "decoder_input_ids": dec,
                    "use_cache": False}

    return inputs


def _image_inputs(size: int, channels: int = 3, key: str | None = "pixel_values"):
    def inputs(batch: int = 2, seq: int | None = None, seed: int = 0):
        x = randn(batch, channels, size, size, seed=seed)
        return ((), {key: x}) if key else ((x,), {})

    return inputs


M = "transformers.models."


def _bert(impl):
    return ZooCase(
        name=f"hf:bert-{impl}",
        build=seeded(_build("BertModel", "BertConfig", impl, vocab_size=VOCAB, hidden_size=32,
                            num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)),
        inputs=_encoder_inputs(),
        count_attention=_counter(M + "bert.modeling_bert", "BertSelfAttention", "BertCrossAttention"),
        tags={"hf", impl, "padding", "encoder", "train_ok"},
    )


def _distilbert(impl):
    return ZooCase(
        name=f"hf:distilbert-{impl}",
        build=seeded(_build("DistilBertModel", "DistilBertConfig", impl, vocab_size=VOCAB, dim=32,
                            n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
                            pad_token_id=0)),
        inputs=_encoder_inputs(),
        count_attention=_counter(M + "distilbert.modeling_distilbert", "DistilBertSelfAttention"),
        tags={"hf", impl, "padding", "encoder", "train_ok"},
    )


def _gpt2(impl, upcast=False):
    tags = {"hf", impl, "causal", "decoder", "generate", "train_ok"}
    if upcast:
        tags |= {"baddbmm", "fp32_softmax"}
    return ZooCase(
        name=f"hf:gpt2-{impl}" + ("-upcast" if upcast else ""),
        build=seeded(_build("GPT2LMHeadModel", "GPT2Config", impl, vocab_size=VOCAB, n_positions=64,
                            n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2,
                            reorder_and_upcast_attn=upcast)),
        inputs=_causal_inputs(),
        count_attention=_counter(M + "gpt2.modeling_gpt2", "GPT2Attention"),
        tags=tags,
        note=("GPT2Attention._upcast_and_reordered_attn: torch.empty fp32 buffer; "
              "baddbmm(buf, q.float(), k.float(), beta=0, alpha=scaling) under autocast off; "
              "+ mask; softmax; .type(v.dtype); dropout module; matmul" if upcast else ""),
    )


def _gemma2(impl, softcap=None):
    """Gemma2: GQA, RoPE, scale ``query_pre_attn_scalar ** -0.5``, alternating sliding-window
    (window 4) / full causal layers. With ``attn_logit_softcapping`` set it is a negative (tanh
    soft-capping between QKᵀ and softmax). Eager only: transformers 5.24 refuses sdpa for Gemma2."""
    positive = softcap is None
    tags = {"hf", impl, "causal", "decoder", "gqa", "rope", "sliding_window", "train_ok"}
    if positive:
        tags.add("generate")
    else:
        tags |= {"neg", "softcap"}
    count = _counter(M + "gemma2.modeling_gemma2", "Gemma2Attention")
    return ZooCase(
        name=f"hf:gemma2-{impl}" if positive else f"neg:hf_gemma2-softcap-{impl}",
        build=seeded(_build("Gemma2ForCausalLM", "Gemma2Config", impl, vocab_size=VOCAB,
                            hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            query_pre_attn_scalar=8, sliding_window=4,
                            attn_logit_softcapping=softcap, final_logit_softcapping=None,
                            max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2)),
        inputs=_causal_inputs(),
        count_attention=count if positive else (lambda m: 0),
        positive=positive,
        skip_reason="" if positive else (
            "Gemma2 logit soft-capping: w / softcap → tanh → * softcap between QKᵀ and softmax "
            "is neither a scale, a bias nor a mask"),
        tags=tags,
    )


def _llama(impl, padded=False):
    tags = {"hf", impl, "causal", "decoder", "gqa", "rope", "generate", "train_ok"}
    if padded:
        tags.add("padding")
    return ZooCase(
        name=f"hf:llama-{impl}" + ("-padded" if padded else ""),
        build=seeded(_build("LlamaForCausalLM", "LlamaConfig", impl, vocab_size=VOCAB, hidden_size=64,
                            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)),
        inputs=_causal_inputs(padded=padded),
        count_attention=_counter(M + "llama.modeling_llama", "LlamaAttention"),
        tags=tags,
        note=("sdpa: no mask → is_causal=True + enable_gqa=True; padding mask → bool mask + repeat_kv"
              if impl == "sdpa" else ""),
    )


def _t5(impl):
    return ZooCase(
        name=f"hf:t5-{impl}",
        build=seeded(_build("T5Model", "T5Config", impl, vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
                            num_layers=2, num_decoder_layers=2, num_heads=4,
                            relative_attention_num_buckets=8, relative_attention_max_distance=16,
                            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
        inputs=_seq2seq_inputs(),
        # encoder self + decoder self + decoder cross
        count_attention=_counter(M + "t5.modeling_t5", "T5Attention"),
        tags={"hf", impl, "padding", "causal", "cross", "rel_bias", "encoder_decoder", "train_ok"},
    )


def _bart(impl):
    return ZooCase(
        name=f"hf:bart-{impl}",
        build=seeded(_build("BartModel", "BartConfig", impl, vocab_size=VOCAB, d_model=32,
                            encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                            max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)),
        inputs=_seq2seq_inputs(),
        # encoder self + decoder causal self + decoder cross
        count_attention=_counter(M + "bart.modeling_bart", "BartAttention"),
        tags={"hf", impl, "padding", "causal", "cross", "encoder_decoder", "train_ok"},
    )


def _vit(impl):
    return ZooCase(
        name=f"hf:vit-{impl}",
        build=seeded(_build("ViTModel", "ViTConfig", impl, image_size=32, patch_size=8, num_channels=3,
                            hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64)),
        inputs=_image_inputs(32),
        count_attention=_counter(M + "vit.modeling_vit", "ViTAttention"),
        tags={"hf", impl, "vision", "train_ok"},
    )


def cases() -> list[ZooCase]:
    out = []
    for impl in IMPLS:
        out += [_bert(impl), _distilbert(impl), _gpt2(impl), _llama(impl), _llama(impl, padded=True),
                _t5(impl), _bart(impl), _vit(impl)]
    # Gemma2ForCausalLM refuses attn_implementation="sdpa" in transformers 5.24 (_supports_sdpa
    # is False): eager only.
    out += [_gpt2("eager", upcast=True), _gemma2("eager"), _gemma2("eager", softcap=50.0)]
    return out
