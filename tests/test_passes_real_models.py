"""Architectures whose attention the passes used to get wrong or miss, built from small configs
as a user would (random weights, nothing downloaded): the identity oracle in outputs and
parameter gradients (fp32, 1e-5), SAS given the model's real head axis, or "left alone with
this reason".
"""

from __future__ import annotations

import warnings

import pytest
import torch

import attnswap

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

ATOL, RTOL = 1e-5, 1e-4  # fp32


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _tensor_of(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


def _run(model, inputs):
    args, kwargs = inputs
    model.zero_grad(set_to_none=True)
    out = _tensor_of(model(*args, **kwargs))
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None}


def assert_identity(model, example, check, kind="softmax"):
    """``convert(model, kind)`` reproduces ``model`` on ``check`` (softmax, or SAS with its
    identity init); returns the converted model. Every site must have become ``kind``."""
    model = model.float().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", attnswap.AttentionSwapWarning)  # nothing left behind
        converted = attnswap.convert(model, kind, attnswap.ExampleInputs(*example))
    report = converted.attnswap_report
    assert report.sites and all(s.kind == kind for s in report.sites), str(report)
    ref_out, ref_grads = _run(model, check)
    out, grads = _run(converted, check)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=RTOL)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=ATOL, rtol=RTOL,
                                   msg=lambda m: f"{name}: {m}")
    return converted


def _text(seed, batch=2, seq=7, left=False):
    ids = torch.randint(1, 100, (batch, seq), generator=_g(seed))
    mask = torch.ones(batch, seq, dtype=torch.long)
    if left:
        mask[1, :3] = 0
    else:
        mask[1, 4:] = 0
    return (), {"input_ids": ids, "attention_mask": mask}


def _image(seed, size=32, batch=2):
    return (torch.randn(batch, 3, size, size, generator=_g(seed)),), {}


def _sas_heads(converted) -> dict:
    """Heads of each site's SAS query expansion, by the module path that holds it."""
    return {name.rsplit(".attnswap", 1)[0]: m.heads for name, m in converted.named_modules()
            if ".attnswap" in name and name.endswith("sas.q_heads")}


# ------------------------------------------------------------------------------------------------
# finfo.min fills with fully masked query rows


def deberta_v2():
    from transformers import DebertaV2Config, DebertaV2Model
    torch.manual_seed(0)
    return DebertaV2Model(DebertaV2Config(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, relative_attention=True,
        position_buckets=8, pos_att_type=["p2c", "c2p"], max_relative_positions=16))


def test_deberta_v2_padded_batch_identity_and_sas_heads():
    """DeBERTa-v2: the mask is outer(keep, keep), filled with finfo.min, on flattened heads."""
    model = deberta_v2()
    assert_identity(model, _text(0), _text(1))
    converted = assert_identity(model, _text(0), _text(1), kind="sas")
    assert set(_sas_heads(converted).values()) == {4}


@pytest.mark.parametrize("relative", [False, True], ids=["plain", "disentangled"])
def test_deberta_v1_identity_and_sigmoid_runs(relative):
    """DeBERTa (v1) adds `rel_att: int = 0` to the scores when it has no relative term, and with
    one it slices its relative embeddings by `torch.tensor(span)` — an `.item()` between the
    scores and the softmax that used to break the region's graph there."""
    from transformers import DebertaConfig, DebertaModel
    from attnswap.kernels import op
    torch.manual_seed(0)
    extra = dict(relative_attention=True, pos_att_type=["c2p", "p2c"],
                 max_relative_positions=16) if relative else {}
    model = DebertaModel(DebertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=64, **extra))
    assert_identity(model, _text(0), _text(1))
    converted = attnswap.convert(model.eval(), "sigmoid", attnswap.ExampleInputs(*_text(0)))
    op.reset_call_counts()
    with torch.no_grad():
        converted(**_text(1)[1])
    assert op.total_calls("sigmoid") == 2


def test_mpt_left_padding_identity():
    from transformers import MptConfig, MptModel
    torch.manual_seed(0)
    model = MptModel(MptConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, max_seq_len=64))
    assert_identity(model, _text(0, left=True), _text(1, left=True))


def test_bloom_baddbmm_flattened_heads_get_sas():
    from transformers import BloomConfig, BloomModel
    torch.manual_seed(0)
    model = BloomModel(BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4))
    converted = assert_identity(model, _text(0, left=True), _text(1, left=True), kind="sas")
    assert set(_sas_heads(converted).values()) == {4}


# ------------------------------------------------------------------------------------------------
# learned temperatures and cosine attention (factors constant along the keys)


def _tv_swin_v2():
    from torchvision.models.swin_transformer import (PatchMergingV2, SwinTransformer,
                                                     SwinTransformerBlockV2)
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                           window_size=[4, 4], block=SwinTransformerBlockV2,
                           downsample_layer=PatchMergingV2, num_classes=10)


def _hf_swinv2():
    from transformers import Swinv2Config, Swinv2Model
    return Swinv2Model(Swinv2Config(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2],
                                    num_heads=[2, 4], window_size=4))


VISION = {
    "hf-swinv2": (_hf_swinv2, 32),
    "torchvision-swin_v2": (_tv_swin_v2, 32),
    "timm-swinv2_cr": (lambda: timm.create_model(
        "swinv2_cr_tiny_ns_224", pretrained=False, img_size=32, embed_dim=16, depths=(2, 2),
        num_heads=(2, 4), window_size=4, num_classes=10), 32),
    "timm-edgenext_xca": (lambda: timm.create_model("edgenext_xx_small", pretrained=False,
                                                    num_classes=10), 64),
    "timm-xcit": (lambda: timm.create_model("xcit_nano_12_p16_224", pretrained=False,
                                            img_size=32, depth=2, num_classes=10), 32),
}
SITES = {"hf-swinv2": 4, "torchvision-swin_v2": 4, "timm-swinv2_cr": 4, "timm-edgenext_xca": 3,
         "timm-xcit": 4}  # attention layers of each small config


@pytest.mark.parametrize("name", list(VISION))
def test_learned_temperature_folds_into_q(name):
    build, size = VISION[name]
    torch.manual_seed(0)
    converted = assert_identity(build(), _image(0, size), _image(1, size))
    assert len(converted.attnswap_report.sites) == SITES[name]


def test_timm_attention_pool_latent_unfused():
    """Learned-query attention pooling written as matmul / softmax / matmul."""
    from timm.layers.attention_pool import AttentionPoolLatent
    torch.manual_seed(0)
    model = AttentionPoolLatent(32, num_heads=4, latent_len=3)
    model.fused_attn = False
    x = lambda s: ((torch.randn(2, 7, 32, generator=_g(s)),), {})  # noqa: E731
    assert_identity(model, x(0), x(1))


# ------------------------------------------------------------------------------------------------
# SAS on windowed sites: the model's own head axis


def _nest():
    from timm.models.nest import Nest
    return Nest(img_size=32, patch_size=4, num_levels=2, embed_dims=(16, 32), num_heads=(2, 4),
                depths=(1, 1), num_classes=10)


WINDOWED = {
    # name: (build, image size, heads per site)
    "timm-nest": (_nest, 32, [2, 4]),
    "timm-hiera": (lambda: timm.create_model("hiera_tiny_224", pretrained=False, num_classes=10,
                                             img_size=64, embed_dim=16, num_heads=1,
                                             stages=(1, 1, 1, 1)), 64, [1, 2, 4, 8]),
    "timm-twins_svt": (lambda: timm.create_model(
        "twins_svt_small", pretrained=False, num_classes=10, img_size=32, embed_dims=(16, 32),
        num_heads=(2, 4), depths=(1, 1), sr_ratios=(2, 1), wss=(2, 2), mlp_ratios=(2, 2)),
        32, [2, 4]),
    "torchvision-maxvit": (lambda: torchvision.models.maxvit.MaxVit(
        input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16],
        block_layers=[1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10), 32, [2, 2]),
}


@pytest.mark.parametrize("name", list(WINDOWED))
def test_windowed_sites_get_sas_on_their_heads(name):
    build, size, heads = WINDOWED[name]
    torch.manual_seed(0)
    converted = assert_identity(build(), _image(0, size), _image(1, size), kind="sas")
    got = list(_sas_heads(converted).values())
    assert got, "no SAS module was created"
    if heads is not None:
        assert got == heads, got


# ------------------------------------------------------------------------------------------------
# left alone, with the reason


def test_mvitv2_slice_assigned_rel_pos_is_reported():
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg
    torch.manual_seed(0)
    model = MultiScaleVit(MultiScaleVitCfg(depths=(1, 1), embed_dim=16, num_heads=1),
                          img_size=(32, 32), num_classes=10).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = attnswap.convert(model, "sigmoid", _image(0)[0])
    report = converted.attnswap_report
    assert len(report.sites) == 0
    assert len(report.skipped) == 2, str(report)
    assert all("slice assignment" in s.reason and "modified in place" in s.reason
               for s in report.skipped), str(report)


@pytest.mark.parametrize("batch_first", [False, True])
def test_nn_transformer_with_consistent_masks(batch_first):
    """torch.nn.Transformer with float masks throughout and ``tgt_is_causal=True`` (the form
    whose mask checks do not graph-break inside PyTorch): all three attentions convert."""
    torch.manual_seed(0)
    model = torch.nn.Transformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1,
                                 dim_feedforward=64, dropout=0.0, batch_first=batch_first)

    def inputs(seed):
        g = _g(seed)
        S, T, B = 6, 5, 2
        src = torch.randn(B, S, 32, generator=g)
        tgt = torch.randn(B, T, 32, generator=g)
        if not batch_first:
            src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
        spm = torch.zeros(B, S)
        spm[1, -2:] = float("-inf")
        tpm = torch.zeros(B, T)
        tpm[1, -1:] = float("-inf")
        return (), dict(src=src, tgt=tgt, tgt_mask=torch.nn.Transformer.generate_square_subsequent_mask(T),
                        src_key_padding_mask=spm, tgt_key_padding_mask=tpm,
                        memory_key_padding_mask=spm, tgt_is_causal=True)

    converted = assert_identity(model, inputs(0), inputs(1))
    assert len(converted.attnswap_report.sites) == 3


class UntraceableWindows(torch.nn.Module):
    """A rank-5 site whose heads cannot be traced to a channel split (one projection per head,
    stacked): SAS must say so rather than guess which axis holds the heads."""

    def __init__(self):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(16, 24) for _ in range(2))

    def forward(self, x):
        B, T, _ = x.shape
        per_head = torch.stack([h(x) for h in self.heads], dim=1)  # [B, H, T, 3d]
        q, k, v = (t.reshape(B, 2, 2, T // 2, 8).transpose(1, 2)  # [B, windows, H, T/2, d]
                   for t in per_head.chunk(3, dim=-1))
        return (torch.softmax(q @ k.transpose(-2, -1) * 0.3, dim=-1) @ v).sum(dim=(1, 2))


def test_untraceable_rank5_head_axis_is_reported_for_sas():
    torch.manual_seed(0)
    model = UntraceableWindows().eval()
    x = (torch.randn(2, 6, 16, generator=_g(0)),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = attnswap.convert(model, "sas", x)
    report = converted.attnswap_report
    assert any("could not be traced" in s.reason for s in report.skipped), str(report)
    with torch.no_grad():
        torch.testing.assert_close(converted(*x), model(*x), atol=ATOL, rtol=RTOL)
