"""``nn.MultiheadAttention`` called with a bool padding mask and a float attention mask (as
PyTorch's own nn.Transformer tutorial does): torch turns the bool mask into a float one inside
``F._canonical_mask`` and emits a deprecation warning there, which is a dynamo graph break in the
middle of the attention, so the site could not be compiled. Doing that same conversion before
the region's compiled code runs gives the identical masks without the break."""

from __future__ import annotations

import torch


def _float_of(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def consistent_mha_masks(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    args = list(args)
    kpm = kwargs.get("key_padding_mask", args[3] if len(args) > 3 else None)
    am = kwargs.get("attn_mask", args[5] if len(args) > 5 else None)
    if not (isinstance(kpm, torch.Tensor) and isinstance(am, torch.Tensor)):
        return tuple(args), kwargs
    if kpm.dtype == torch.bool and am.dtype.is_floating_point:
        kpm = _float_of(kpm, am.dtype)
    elif am.dtype == torch.bool and kpm.dtype.is_floating_point:
        am = _float_of(am, kpm.dtype)
    else:
        return tuple(args), kwargs
    kwargs = dict(kwargs)
    if "key_padding_mask" in kwargs or len(args) <= 3:
        kwargs["key_padding_mask"] = kpm
    else:
        args[3] = kpm
    if "attn_mask" in kwargs or len(args) <= 5:
        kwargs["attn_mask"] = am
    else:
        args[5] = am
    return tuple(args), kwargs
