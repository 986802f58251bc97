"""Train a tiny timm ViT with ReLU attention (h = relu, scaled by 1/n as in arXiv 2309.08586) on
scikit-learn's bundled 8x8 digits. Runs in well under a minute on a CPU.

For the full comparison of every kind, with a plot: attnswap train --task digits
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from timm.models.vision_transformer import VisionTransformer

import attnswap

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
x = (x - x.mean()) / x.std()
y = torch.tensor(digits.target)
perm = torch.randperm(len(y))
train, test = perm[:1400], perm[1400:]

model = VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32,
                          depth=2, num_heads=4, mlp_ratio=2.0, global_pool="avg", class_token=False)
model = attnswap.convert(model, "relu", x[:64], activation="relu")
print(model.attnswap_report)

opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.05)
model.train()
for step in range(200):
    idx = train[torch.randint(0, len(train), (64,))]
    loss = F.cross_entropy(model(x[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 50 == 0:
        print(f"step {step}: loss {loss.item():.3f}")

model.eval()
with torch.no_grad():
    acc = (model(x[test]).argmax(-1) == y[test]).float().mean().item()
print(f"test accuracy with ReLU attention: {acc:.3f}")
