"""Convert a small GPT-2 (random weights, built from a config) to sigmoid attention and print
what attnswap changed. Runs in seconds on a CPU."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import attnswap

torch.manual_seed(0)
config = GPT2Config(vocab_size=256, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                    bos_token_id=0, eos_token_id=0, attn_implementation="eager")
model = GPT2LMHeadModel(config).eval()
ids = torch.randint(0, 256, (2, 16))

identity = attnswap.convert(model, "softmax", {"input_ids": ids})
sigmoid = attnswap.convert(model, "sigmoid", {"input_ids": ids})
print(sigmoid.attnswap_report)

with torch.no_grad():
    ref = model(input_ids=ids).logits
    same = identity(input_ids=ids).logits
    swapped = sigmoid(input_ids=ids).logits
print(f"softmax rewrite vs original: max |Δ| = {(same - ref).abs().max():.2e}  (identity oracle)")
print(f"sigmoid attention vs original: max |Δ| = {(swapped - ref).abs().max():.2e}")
print("op executions:", dict(attnswap.call_counts))
print("greedy tokens (sigmoid):", sigmoid.generate(ids[:1, :4], max_new_tokens=8, do_sample=False)[0].tolist())
