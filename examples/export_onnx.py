"""Export a tiny GPT-2 with ReLU attention to ONNX and check it against PyTorch in onnxruntime.
Needs the onnx extra: pip install "attnswap[onnx]". Runs in seconds on a CPU."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import attnswap
import attnswap.onnx

torch.manual_seed(0)
config = GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                    bos_token_id=0, eos_token_id=0)
model = GPT2LMHeadModel._from_config(config, attn_implementation="eager").eval()
ids = torch.randint(0, 256, (2, 16))
example = {"input_ids": ids, "use_cache": False}

# 1. export with the attention swapped (the model itself is left untouched)
proto, report = attnswap.onnx.export(model, example, "/tmp/gpt2_relu.onnx", attention="relu",
                                     activation="relu2")
print(report)
print("wrote /tmp/gpt2_relu.onnx:", len(proto.graph.node), "nodes")

# 2. run it in onnxruntime and compare with the converted PyTorch model
converted = attnswap.convert(model, "relu", example, activation="relu2")
sess = attnswap.onnx.session(proto)
ort_out = attnswap.onnx.run(sess, {"input_ids": ids})
with torch.no_grad():
    ref = converted(**example).logits
err = attnswap.onnx.compare_outputs(ref, ort_out[:1])
print(f"onnxruntime vs PyTorch: max |Δ| = {err.max_abs:.2e}")
