"""ONNX vs PyTorch for BERT (padded batch), GPT-2, Llama (GQA) and a timm ViT, each as the
original softmax model and as a converted one, in PyTorch and in onnxruntime (CPU, graph
optimizations on): max abs/rel error and median latency, all measured in this process.

    python bench/onnx_compare.py [--attention sigmoid] [--repeat 20]
"""

import argparse

import timm
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from attnswap import onnx as aonnx


def text(batch=2, seq=64, vocab=1000, padded=False):
    ids = torch.randint(1, vocab, (batch, seq))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, -seq // 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def models():
    torch.manual_seed(0)
    small = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    yield "bert", BertModel(BertConfig(vocab_size=1000, attn_implementation="eager", **small)).eval(), text(padded=True)
    yield "gpt2", GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_embd=128, n_layer=2, n_head=4,
                                             attn_implementation="eager")).eval(), text()
    yield "llama", LlamaForCausalLM(LlamaConfig(vocab_size=1000, num_key_value_heads=2,
                                                attn_implementation="eager", **small)).eval(), text()
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10).eval()
    yield "timm vit_tiny (64px)", vit, (torch.randn(2, 3, 64, 64),)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--attention", default="sigmoid")
    ap.add_argument("--repeat", type=int, default=20)
    a = ap.parse_args()
    rows = []
    for name, model, inputs in models():
        print(f"== {name}")
        rows += aonnx.compare(model, inputs, attention=a.attention, repeat=a.repeat)
    print("\n| model | variant | attention | sites | max abs err | max rel err | torch ms | ORT ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['variant']} | {r['attention']} | {r['sites']} | "
              f"{r['max_abs_err']:.2e} | {r['max_rel_err']:.2e} | {r['torch_ms']:.2f} | {r['ort_ms']:.2f} |")


if __name__ == "__main__":
    main()
