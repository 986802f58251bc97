"""``attnswap::attention``: the one canonical op every rewritten site calls.

It is an opaque ``torch.library.custom_op`` (so ``torch.export`` keeps it as one node and the
ONNX translation can key on it) with a fake implementation and a registered autograd formula whose
backward is itself an opaque op, ``attnswap::attention_backward``. The implementation dispatches
on ``impl`` and the device:

* ``"auto"``: softmax without dropout → SDPA (the baseline, on every device) unless a float mask
  has rows of finite fills only (see :func:`resolve_impl`); otherwise CUDA → Triton, CPU → the
  tiled CPU path.
* ``"reference"``: the plain-math oracle (backward by autograd through it).
* ``"cpu"`` / ``"triton"``: force a kernel (``"triton"`` on CPU needs ``TRITON_INTERPRET=1``).
* ``"sdpa"``: ``F.scaled_dot_product_attention`` (softmax without dropout only).

Every execution is counted in :data:`call_counts`, keyed by ``(kind, impl actually run)``, so
tests and users can prove that a converted model ran this op and which kernel computed it.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import reference
from .layout import check_layout, in_layout
from .mask_cache import MaskObjectCache
from ..config import impl_default, triton_interpret
from ..options import AttnswapOptionError, check_op_args, check_seed, op_args_key
from .params import AttentionParams, LENGTH_KEYS, encode_length

call_counts: collections.Counter = collections.Counter()


def reset_call_counts() -> None:
    call_counts.clear()


def total_calls(kind: str | None = None) -> int:
    return sum(n for (k, _impl), n in call_counts.items() if kind is None or k == kind)


# ----------------------------------------------------------------------------------------------
# validation


def _shape(t) -> tuple:
    return tuple(t.shape)


def validate_inputs(q, k, v, attn_mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dims [batch, heads, seq, head_dim]; got shape {_shape(t)}. "
                "Reshape with .view(B, T, H, D).transpose(1, 2) first."
            )
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be floating point; got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"q, k and v must share one dtype; got q={q.dtype}, k={k.dtype}, v={v.dtype}. "
            "Cast them to the same dtype."
        )
    B, Hq, Tq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    if k.shape[3] != D:
        raise ValueError(f"k's head dim {k.shape[3]} differs from q's {D} (q {_shape(q)}, k {_shape(k)})")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(
            f"v's heads and length {tuple(v.shape[1:3])} differ from k's {tuple(k.shape[1:3])}"
        )
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"q's heads ({Hq}) must be a multiple of k's and v's heads ({Hkv}) for grouped-query "
            "attention; allowed Hkv are the divisors of Hq"
        )
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise ValueError(f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise ValueError(
                f"attn_mask must be bool (True = attend) or floating point (added to the scores); "
                f"got {attn_mask.dtype}"
            )
        if attn_mask.dim() > 4:
            raise ValueError(f"attn_mask must have at most 4 dims; got shape {_shape(attn_mask)}")
        target = (B, Hq, Tq, k.shape[2])
        # SDPA's rule (aligned from the right, each dim 1 or the scores'), checked by hand:
        # torch.broadcast_shapes runs ~60 µs of Python per call, more than small kernels.
        ms = attn_mask.shape
        if not all(m == 1 or m == t for m, t in zip(ms, target[4 - len(ms):])):
            raise ValueError(
                f"attn_mask of shape {_shape(attn_mask)} does not broadcast to the scores' shape "
                f"[B, Hq, Tq, Tk] = {list(target)}"
            ) from None


def _check_device(impl: str, q: torch.Tensor) -> None:
    """A kernel pinned by ``impl`` must be able to run where the tensors are."""
    dev = q.device.type
    if impl == "cpu" and dev != "cpu":
        raise AttnswapOptionError("impl", impl, f"the CPU kernel cannot run on {dev} tensors",
                                  "use impl='auto' (or 'triton' on CUDA), or move q, k, v to the CPU")
    if impl == "triton" and dev != "cuda" and not triton_interpret():
        raise AttnswapOptionError("impl", impl, f"the Triton kernels need CUDA tensors (got {dev})",
                                  "use impl='auto' (the CPU kernel), or set TRITON_INTERPRET=1 "
                                  "before importing torch to run them in Triton's interpreter")


def _mask4d(attn_mask):
    """Unsqueeze (never expand) a mask to 4 dims; kernels broadcast it themselves."""
    if attn_mask is None:
        return None
    while attn_mask.dim() < 4:
        attn_mask = attn_mask.unsqueeze(0)
    return attn_mask


# ----------------------------------------------------------------------------------------------
# dispatch


def _fill_only_rows(mask: torch.Tensor) -> bool:
    top = mask.amax(-1)  # a row is all fills when its largest entry is one (and not -inf)
    return bool((reference.float_mask_is_masked(top) & torch.isfinite(top)).any())


_fill_rows_cache = MaskObjectCache()


def _has_fill_only_rows(mask: torch.Tensor) -> bool:
    """Whether a float mask has a query row whose every entry is a finite fill (``finfo.min``).
    Remembered per mask object (five reductions, ~25 µs, where a model's layers share one mask:
    once per forward instead of once per layer and pass)."""
    return _fill_rows_cache.get(mask, "fill_only_rows", lambda: _fill_only_rows(mask))


def resolve_impl(impl: str, device: torch.device, params: AttentionParams, attn_mask=None,
                 concrete: bool = False) -> str:
    """The implementation ``impl`` runs as. ``concrete``: ``attn_mask`` holds real values (an
    eager call), so the choice may read them; a traced op decides on the mask's dtype alone, the
    same way in its forward and in its (traced) backward."""
    if impl != "auto":
        return impl
    kernel = "triton" if device.type == "cuda" else "cpu"
    if params.kind != "softmax" or params.dropout_p != 0.0:
        # Softmax with dropout needs our kernels' seeded dropout (one mask, forward and backward).
        return kernel
    # Softmax is what PyTorch's own fused kernels compute (the baseline the other kinds are
    # measured against): the identity conversion and SAS's softmax run there, except on a float
    # mask with rows of finite fills only (HF's padded query rows). In the model those fills
    # absorb the scores (weights softmax(mask row), gradients still flowing into S); SDPA's
    # backward rebuilds P from a log-sum-exp that rounds back to the row max at finfo.min, so its
    # gradients there are n times too large. Our kernels keep the row max apart: exact.
    if attn_mask is None or attn_mask.dtype == torch.bool:
        return "sdpa"
    if concrete and not _has_fill_only_rows(attn_mask):
        return "sdpa"
    return kernel


def _kernel_module(impl: str):
    if impl == "cpu":
        from . import cpu

        return cpu
    if impl == "triton":
        from . import triton as triton_kernels

        return triton_kernels
    raise AssertionError(impl)


def _params(kind, scale, is_causal, dropout_p, dropout_seed, sigmoid_bias, activation, alpha,
            length, fast_sigmoid) -> AttentionParams:
    seed = int(dropout_seed.item()) if dropout_seed is not None else 0
    return AttentionParams(kind, scale, is_causal, dropout_p, seed, sigmoid_bias, activation,
                           alpha, length, fast_sigmoid)


def _sdpa(q, k, v, mask, p: AttentionParams):
    # SDPA's float mask must match q's dtype; its GQA needs enable_gqa.
    is_causal = p.is_causal
    if mask is not None and is_causal:
        # SDPA refuses a mask together with is_causal: fold the causal triangle into the mask.
        tri = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        mask = mask & tri if mask.dtype == torch.bool else mask.masked_fill(~tri, float("-inf"))
        is_causal = False
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=p.scale,
        enable_gqa=bool(q.shape[1] != k.shape[1]),
    )


def _forward(q, k, v, attn_mask, p: AttentionParams, impl: str, layout: str | None = None):
    if impl == "reference":
        return reference.attention_reference(q, k, v, attn_mask, **p.reference_kwargs())
    if impl == "sdpa":
        return _sdpa(q, k, v, attn_mask, p)
    if impl == "cpu":  # the fused kernel writes any layout directly
        return _kernel_module(impl).forward(q, k, v, attn_mask, p, layout)
    return _kernel_module(impl).forward(q, k, v, attn_mask, p)


def _backward_by_recompute(fn, grad_out, q, k, v, mask, need_mask_grad):
    """Backward of a differentiable torch function by recomputing it under autograd."""
    with torch.enable_grad():
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        mm = mask.detach().requires_grad_(True) if need_mask_grad else mask
        out = fn(qq, kk, vv, mm)
        inputs = (qq, kk, vv) + ((mm,) if need_mask_grad else ())
        grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
    return grads[0], grads[1], grads[2], grads[3] if need_mask_grad else None


def _recompute_fn(p: AttentionParams, impl: str):
    if impl == "reference":
        return lambda a, b, c, m: reference.attention_reference(a, b, c, m, **p.reference_kwargs())
    return lambda a, b, c, m: _sdpa(a, b, c, m, p)


# The reference and SDPA paths are differentiable torch code: their backward recomputes them under
# autograd, outside any custom op (the dispatcher runs a custom op's body below autograd).
_RECOMPUTED_IMPLS = ("reference", "sdpa")


def _backward(grad_out, q, k, v, attn_mask, out, p: AttentionParams, impl: str, need_mask_grad):
    if impl in _RECOMPUTED_IMPLS:
        raise AssertionError(f"impl={impl!r} takes its backward by recomputation")
    return _kernel_module(impl).backward(grad_out, q, k, v, attn_mask, out, p, need_mask_grad)


# ----------------------------------------------------------------------------------------------
# the custom ops


@torch.library.custom_op("attnswap::attention", mutates_args=())
def attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    kind: str,
    scale: float,
    is_causal: bool,
    dropout_p: float,
    dropout_seed: Optional[torch.Tensor],
    sigmoid_bias: Optional[float],
    activation: str,
    alpha: float,
    length: int,
    fast_sigmoid: bool,
    impl: str,
) -> torch.Tensor:
    p = _params(kind, scale, is_causal, dropout_p, dropout_seed, sigmoid_bias, activation, alpha,
                length, fast_sigmoid)
    ran = resolve_impl(impl, q.device, p, attn_mask)
    call_counts[(kind, ran)] += 1
    return _forward(q, k, v, _mask4d(attn_mask), p, ran).contiguous()


@attention_op.register_fake
def _attention_fake(q, k, v, attn_mask, kind, scale, is_causal, dropout_p, dropout_seed,
                    sigmoid_bias, activation, alpha, length, fast_sigmoid, impl):
    return q.new_empty((*q.shape[:3], v.shape[-1]))


@torch.library.custom_op("attnswap::attention_backward", mutates_args=())
def attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    out: torch.Tensor,
    kind: str,
    scale: float,
    is_causal: bool,
    dropout_p: float,
    dropout_seed: Optional[torch.Tensor],
    sigmoid_bias: Optional[float],
    activation: str,
    alpha: float,
    length: int,
    fast_sigmoid: bool,
    impl: str,
    need_mask_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    p = _params(kind, scale, is_causal, dropout_p, dropout_seed, sigmoid_bias, activation, alpha,
                length, fast_sigmoid)
    ran = resolve_impl(impl, q.device, p, attn_mask)
    mask4 = _mask4d(attn_mask)
    dq, dk, dv, dmask = _backward(grad_out.contiguous(), q, k, v, mask4, out, p, ran, need_mask_grad)
    if need_mask_grad:
        dmask = dmask.reshape(attn_mask.shape).to(attn_mask.dtype)
    else:
        dmask = q.new_empty(0)
    # Contiguous gradients whatever the inputs' strides, as the fake implementation promises.
    return (dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous(),
            dmask.contiguous())


@attention_backward_op.register_fake
def _attention_backward_fake(grad_out, q, k, v, attn_mask, out, kind, scale, is_causal, dropout_p,
                             dropout_seed, sigmoid_bias, activation, alpha, length, fast_sigmoid,
                             impl, need_mask_grad):
    dmask = attn_mask.new_empty(attn_mask.shape) if need_mask_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


_NON_TENSOR = ("kind", "scale", "is_causal", "dropout_p", "dropout_seed", "sigmoid_bias",
               "activation", "alpha", "length", "fast_sigmoid", "impl")


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask = inputs[:4]
    ctx.options = inputs[4:]
    ctx.need_mask_grad = (
        attn_mask is not None and attn_mask.dtype.is_floating_point and attn_mask.requires_grad
    )
    ctx.save_for_backward(q, k, v, attn_mask, output)


def _attention_backward(ctx, grad_out):
    q, k, v, attn_mask, out = ctx.saved_tensors
    (kind, scale, is_causal, dropout_p, dropout_seed, sigmoid_bias, activation, alpha, length,
     fast_sigmoid, impl) = ctx.options
    # Resolving the impl needs no seed: reading it (.item()) here would break AOT tracing,
    # where the seed is a fake tensor. Only the recompute path below needs it.
    ran = resolve_impl(impl, q.device, AttentionParams(kind, scale, is_causal, dropout_p),
                       attn_mask)
    if ran in _RECOMPUTED_IMPLS:
        p = _params(kind, scale, is_causal, dropout_p, dropout_seed, sigmoid_bias, activation,
                    alpha, length, fast_sigmoid)
        dq, dk, dv, dmask = _backward_by_recompute(
            _recompute_fn(p, ran), grad_out, q, k, v, attn_mask, ctx.need_mask_grad
        )
        return (dq, dk, dv, dmask) + (None,) * len(_NON_TENSOR)
    dq, dk, dv, dmask = attention_backward_op(
        grad_out, q, k, v, attn_mask, out, *ctx.options, ctx.need_mask_grad
    )
    return (dq, dk, dv, dmask if ctx.need_mask_grad else None) + (None,) * len(_NON_TENSOR)


attention_op.register_autograd(_attention_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# eager calls: the same kernels without the dispatcher


class _EagerAttention(torch.autograd.Function):
    """What ``attention_op`` and its registered autograd do, for eager calls of the fused kernels.

    A custom op's Python dispatch costs ~100-250 µs per forward+backward on CPU (its autograd
    wrapper rebuilds the 15-argument schema for every call, then the backward op dispatches
    again), several times the kernel's own work at the sizes of a small model's layer. When
    nothing traces the call (no dynamo, no fake or proxy tensors, no functorch transform), the op
    is not needed as a graph node, so this runs the same ``_forward`` / ``_backward`` directly.
    ``call_counts`` counts it exactly like the op."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, p: AttentionParams, ran: str, layout: str | None):
        call_counts[(p.kind, ran)] += 1
        out = in_layout(_forward(q, k, v, _mask4d(attn_mask), p, ran, layout), layout)
        ctx.p, ctx.ran = p, ran
        ctx.need_mask_grad = (
            attn_mask is not None and attn_mask.dtype.is_floating_point and attn_mask.requires_grad
        )
        ctx.save_for_backward(q, k, v, attn_mask, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, attn_mask, out = ctx.saved_tensors
        # The CPU kernels take grad_out in any layout (the fused one reads its strides): the
        # usual [B, T, H, D]-in-memory gradient of the model's head merge is not copied.
        go = grad_out if ctx.ran == "cpu" else grad_out.contiguous()
        dq, dk, dv, dmask = _backward(go, q, k, v, _mask4d(attn_mask), out,
                                      ctx.p, ctx.ran, ctx.need_mask_grad)
        if ctx.need_mask_grad:
            dmask = dmask.reshape(attn_mask.shape).to(attn_mask.dtype)
        else:
            dmask = None
        return _as(dq, q), _as(dk, k), _as(dv, v), dmask, None, None, None


def _as(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return grad if grad.dtype == like.dtype else grad.to(like.dtype)  # (a no-op .to costs µs)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _eager_call(q, k, v, attn_mask) -> bool:
    """True when nothing is tracing this call, so the op need not appear as a node."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if _get_current_dispatch_mode() is not None or torch._C._is_torch_function_mode_enabled():
        return False
    return (type(q) in _PLAIN and type(k) in _PLAIN and type(v) in _PLAIN
            and (attn_mask is None or type(attn_mask) in _PLAIN))


# ----------------------------------------------------------------------------------------------
# the public function


_PARAMS_SEEN: dict = {}


def _call_params(head_dim, kind, scale, is_causal, dropout_p, dropout_seed, sigmoid_bias,
                 activation, alpha, length, fast_sigmoid, impl) -> tuple[AttentionParams, str]:
    """The checked arguments of one call as ``(AttentionParams, impl)``. A converted model calls
    with the same few argument sets on every step: each set (and head dim, for the default
    scale) is checked and built once. The key holds every value's type (``op_args_key``),
    because ``True == 1 == 1.0`` share a hash and type-strictness is the point."""
    key = op_args_key((head_dim, kind, scale, is_causal, dropout_p, sigmoid_bias, activation,
                       alpha, length, fast_sigmoid, impl))
    if key is not None:
        hit = _PARAMS_SEEN.get(key)
        if hit is not None:
            if dropout_seed is not None:
                check_seed(dropout_seed)
            return hit
    a = check_op_args(kind=kind, scale=scale, is_causal=is_causal, dropout_p=dropout_p,
                      dropout_seed=dropout_seed, sigmoid_bias=sigmoid_bias, activation=activation,
                      alpha=alpha, length=length, fast_sigmoid=fast_sigmoid, impl=impl)
    scale = 1.0 / math.sqrt(head_dim) if a["scale"] is None else float(a["scale"])
    params = AttentionParams(
        kind=a["kind"], scale=scale, is_causal=a["is_causal"], dropout_p=a["dropout_p"],
        sigmoid_bias=a["sigmoid_bias"], activation=a["activation"], alpha=a["alpha"],
        length=encode_length(a["length"]), fast_sigmoid=a["fast_sigmoid"],
    )
    out = (params, a["impl"])
    if key is not None and len(_PARAMS_SEEN) < 4096:
        _PARAMS_SEEN[key] = out
    return out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    kind: str = "softmax",
    scale: float | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    dropout_seed: int | torch.Tensor | None = None,
    sigmoid_bias: float | None = None,
    activation: str = "relu",
    alpha: float = 1.0,
    length: int | str | None = None,
    fast_sigmoid: bool = False,
    impl: str | None = None,
    layout: str | None = None,
) -> torch.Tensor:
    """Attention of ``kind`` with ``F.scaled_dot_product_attention``'s conventions.

    ``scale`` defaults to ``1/sqrt(head_dim)``. ``impl`` defaults to the ``ATTNSWAP_IMPL``
    environment variable, else ``"auto"``. With ``dropout_p > 0`` and no ``dropout_seed``, a seed
    is drawn from torch's global generator (so ``torch.manual_seed`` makes runs repeatable).
    ``layout`` is the output's memory layout in eager calls: None (contiguous ``[B, H, T, D]``,
    as a matmul returns it) or ``"bthd"`` (``[B, T, H, D]`` in memory, what
    PyTorch's CPU SDPA returns for the usual projection views: the model's
    ``transpose(1, 2).reshape(B, T, H·D)`` is then free, and so is every ``view`` the model's
    code could apply to its SDPA output). The fused CPU kernel writes it directly; other kernels
    are copied into it, and so is the ``attnswap::attention`` op's (contiguous) output in traced
    calls.
    """
    if impl is None:
        impl = impl_default()
    check_layout(layout)
    validate_inputs(q, k, v, attn_mask)
    params, impl = _call_params(q.shape[-1], kind, scale, is_causal, dropout_p, dropout_seed,
                                sigmoid_bias, activation, alpha, length, fast_sigmoid, impl)
    _check_device(impl, q)
    seed = None
    if params.dropout_p > 0.0:
        if dropout_seed is None:
            seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
        elif isinstance(dropout_seed, torch.Tensor):
            seed = dropout_seed
        else:
            seed = torch.tensor(int(dropout_seed), dtype=torch.int64)
    if _eager_call(q, k, v, attn_mask):
        ran = resolve_impl(impl, q.device, params, attn_mask, concrete=True)
        if seed is not None:
            params = dataclasses.replace(params, dropout_seed=int(seed.item()))
        if ran in _RECOMPUTED_IMPLS:
            # Differentiable torch code: autograd through it directly is what the op's
            # backward recomputes, without the recomputation. SDPA's own output strides
            # ([B, T, H, D] in memory on CPU for projection views) are kept where ``layout``
            # asks for them (the sites that were SDPA calls), and made contiguous where the
            # site was a matmul, whose output the model's code may ``view`` as contiguous.
            call_counts[(params.kind, ran)] += 1
            return in_layout(_forward(q, k, v, _mask4d(attn_mask), params, ran), layout)
        return _EagerAttention.apply(q, k, v, attn_mask, params, ran, layout)
    out = attention_op(
        q, k, v, attn_mask, params.kind, params.scale, params.is_causal, params.dropout_p, seed,
        params.sigmoid_bias, params.activation, params.alpha, params.length, params.fast_sigmoid,
        impl,
    )
    # The op's output is contiguous (its fake says so); the strides asked for are a copy in the
    # traced graph, so code after the site traces (and exports) as it did on the original.
    return out if layout is None else in_layout(out, layout)


__all__ = ["attention", "attention_op", "attention_backward_op", "call_counts",
           "reset_call_counts", "total_calls", "LENGTH_KEYS"]
