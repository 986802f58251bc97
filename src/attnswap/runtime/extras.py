"""The learnable pieces one retargeted site carries (SAS expansions and QK-norm), and the site
call that uses them.

They live in an :class:`AttentionExtras` module registered on the site's region, so
``model.parameters()``, optimizers and ``state_dict()`` see them under that module's path.
"""

from __future__ import annotations

import torch.nn as nn

from ..kernels.op import attention
from .qk_norm import QKNorm
from .sas import SAS
from .site_call import attention_site, mha_site

__all__ = ["AttentionExtras", "QKNorm", "SAS"]


class AttentionExtras(nn.Module):
    """The learnable transforms of one site, and the site call that uses them."""

    def __init__(self, qk_norm: QKNorm | None = None, sas: SAS | None = None):
        super().__init__()
        self.qk_norm = qk_norm
        self.sas = sas

    def transform(self, q, k, v, mask, *, kind, scale, is_causal, dropout_p, options):
        if self.qk_norm is not None:
            q, k = self.qk_norm(q, k)
        if self.sas is not None:
            return self.sas(q, k, v, mask, scale=scale, is_causal=is_causal, dropout_p=dropout_p,
                            options=options)
        return attention(q, k, v, mask, kind=kind, scale=scale, is_causal=is_causal,
                         dropout_p=dropout_p, **options)

    def forward(self, *args, site: str = "attention", **kwargs):
        fn = mha_site if site == "mha" else attention_site
        return fn(*args, qkv_transform=self.transform, **kwargs)
