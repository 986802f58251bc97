"""timm cases, each with fused attention on (``F.scaled_dot_product_attention``) and off (the
explicit ``q * scale; q @ k.transpose(-2, -1); softmax; @ v`` path).

timm 1.0.31 decides ``self.fused_attn`` in each attention module's ``__init__`` from the global
``timm.layers.use_fused_attn()`` (default on for torch >= 2.0; Swin's ``WindowAttention`` asks
``use_fused_attn(experimental=True)`` and so is *off* unless ``set_fused_attn(True,
experimental=True)``). To avoid mutating that global, the zoo builds the model and then sets the
``fused_attn`` attribute of every module that has one (it is a plain attribute in eager mode).

Code shapes (unfused):
* ``layers/attention.py::Attention`` (ViT): ``q = q * self.scale; attn = q @ k.transpose(-2, -1);
  attn = maybe_add_mask(attn, resolve_self_attn_mask(...)); attn.softmax(dim=-1); attn_drop; @ v``.
* Swin ``WindowAttention``: ``q * scale; q @ kᵀ; + _get_rel_pos_bias()`` (table gathered by a
  buffer index); shifted blocks: ``attn.view(-1, nW, H, N, N) + mask.unsqueeze(1).unsqueeze(0)``,
  ``view(-1, H, N, N)``; ``self.softmax`` is an ``nn.Softmax(dim=-1)`` module.
  Fused: rel bias (+ window mask expanded to ``(B_, H, N, N)``) passed as SDPA ``attn_mask``.
* EVA ``EvaAttention``: RoPE applied to q, k after the prefix (cls) token via
  ``torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope)], 2).type_as(v)``, then
  the ViT form.
"""

from __future__ import annotations

from torch import nn

from .cases import ZooCase, count_modules, randn, seeded

FUSED = (("fused", True), ("unfused", False))


def set_fused(model: nn.Module, flag: bool) -> nn.Module:
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = flag
    return model


def _image_inputs(size: int):
    def inputs(batch: int = 2, seq: int | None = None, seed: int = 0):
        return (randn(batch, 3, size, size, seed=seed),), {}

    return inputs


def _create(name: str, fused: bool, **kwargs):
    def make():
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
        return set_fused(model, fused)

    return make


def _counter(module: str, name: str):
    def count(model) -> int:
        import importlib

        return count_modules(model, getattr(importlib.import_module(module), name))

    return count


def _vit(tag, fused):
    return ZooCase(
        name=f"timm:vit_tiny-{tag}",
        build=seeded(_create("vit_tiny_patch16_224", fused, img_size=32, patch_size=8,
                             embed_dim=32, depth=2, num_heads=2)),
        inputs=_image_inputs(32),
        count_attention=_counter("timm.layers", "Attention"),
        tags={"timm", "vision", "sdpa" if fused else "eager", "train_ok"},
    )


def _swin(tag, fused):
    return ZooCase(
        name=f"timm:swin_tiny-{tag}",
        # 64/4 = 16x16 tokens, window 4: stage 1 has 16 windows, stage 2 (8x8) has 4; odd blocks of
        # each stage are shifted (shift 2) and carry the (nW, N, N) 0/-100 mask.
        build=seeded(_create("swin_tiny_patch4_window7_224", fused, img_size=64, window_size=4,
                             patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4))),
        inputs=_image_inputs(64),
        count_attention=_counter("timm.models.swin_transformer", "WindowAttention"),
        tags={"timm", "vision", "sdpa" if fused else "eager", "rel_bias", "shifted_window",
              "nn_softmax", "train_ok"},
    )


def _eva(tag, fused):
    return ZooCase(
        name=f"timm:eva02_tiny-{tag}",
        build=seeded(_create("eva02_tiny_patch14_224", fused, img_size=32, patch_size=8,
                             embed_dim=32, depth=2, num_heads=2, ref_feat_shape=(4, 4))),
        inputs=_image_inputs(32),
        count_attention=_counter("timm.models.eva", "EvaAttention"),
        tags={"timm", "vision", "sdpa" if fused else "eager", "rope", "train_ok"},
    )


def cases() -> list[ZooCase]:
    out = []
    for tag, fused in FUSED:
        out += [_vit(tag, fused), _swin(tag, fused), _eva(tag, fused)]
    return out
