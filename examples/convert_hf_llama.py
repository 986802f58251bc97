"""Convert a tiny Llama (random weights from a config; nothing downloaded) to sigmoid attention,
train it for a few steps and generate. Runs in seconds on a CPU.

The same works for a real checkpoint: LlamaForCausalLM.from_pretrained(...) instead of the config.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import attnswap

torch.manual_seed(0)
config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
ids = torch.randint(3, 256, (4, 32))

# b = -ln(n) is the default sigmoid bias; the paper pairs it with QK-norm (qk_norm=True).
swapped = attnswap.convert(model, "sigmoid", {"input_ids": ids, "labels": ids, "use_cache": False},
                           qk_norm=True)
print(swapped.attnswap_report)

swapped.train()
opt = torch.optim.AdamW(swapped.parameters(), lr=3e-3)  # QK-norm weights are parameters too
for step in range(5):
    loss = swapped(input_ids=ids, labels=ids, use_cache=False).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step}: loss {loss.item():.3f}")

swapped.eval()
print("generated:", swapped.generate(ids[:1, :4], max_new_tokens=8, do_sample=False)[0].tolist())
torch.save(swapped.state_dict(), "/tmp/llama_sigmoid.pt")  # a plain state_dict (+ .attnswap.* keys)
