"""The model zoo itself: every case builds, runs, is deterministic and counts its attention.

Also records what dynamo captures of each case (graphs, graph breaks, attention-looking ops in the
graphs). Nothing is asserted about that; it is printed (``pytest -s`` / ``-rP``) and attached to
the test report as properties (``--junitxml``).
"""

from __future__ import annotations

import collections
import warnings

import pytest
import torch

from zoo import ZOO, ZooCase, by_tag, negatives, positives

CASES = list(ZOO.values())
IDS = [c.name for c in CASES]

SOURCES = ("hf", "timm", "torch", "hand", "neg")


def _seqs(case: ZooCase):
    """Causal cases run at two sequence lengths; the rest at their default."""
    return (8, 5) if ("causal" in case.tags or "generate" in case.tags) else (None,)


def _first_param(model: torch.nn.Module) -> torch.Tensor:
    return next(p for p in model.parameters()).detach().clone()


# ---------------------------------------------------------------------------------------------
# registry sanity
# ---------------------------------------------------------------------------------------------

def test_registry():
    assert len(positives()) > 0 and len(negatives()) > 0
    for name, case in ZOO.items():
        assert name == case.name
        assert name.split(":", 1)[0] in SOURCES, name
        if not case.positive:
            assert case.skip_reason, name
    for impl in ("eager", "sdpa"):
        assert len([c for c in by_tag("hf") if impl in c.tags]) >= 7
    assert by_tag("generate") and by_tag("gqa") and by_tag("cross") and by_tag("rel_bias")


# ---------------------------------------------------------------------------------------------
# build + forward
# ---------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_builds_and_runs(case: ZooCase):
    model = case.build()
    assert not model.training, "build() must return an eval() model"
    assert all(p.dtype == torch.float32 for p in model.parameters())

    n = case.count_attention(model)
    if case.positive:
        assert n > 0
    else:
        assert n == 0

    # seeded: a second build has the same weights, the same seed gives the same inputs
    torch.testing.assert_close(_first_param(case.build()), _first_param(model), rtol=0, atol=0)
    a1, k1 = case.inputs(batch=2, seed=3)
    a2, k2 = case.inputs(batch=2, seed=3)
    for x, y in zip(list(a1) + list(k1.values()), list(a2) + list(k2.values())):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)

    for batch in (2, 3):
        for seq in _seqs(case):
            args, kwargs = case.inputs(batch=batch, seq=seq)
            with torch.no_grad():
                out = case.output_of(model(*args, **kwargs))
            assert isinstance(out, torch.Tensor)
            assert out.shape[0] == batch
            if seq is not None and out.dim() >= 3 and "encoder_decoder" not in case.tags:
                assert out.shape[1] == seq, (out.shape, seq)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("case", [c for c in CASES if "train_ok" in c.tags],
                         ids=[c.name for c in CASES if "train_ok" in c.tags])
def test_train_step(case: ZooCase):
    model = case.build().train()
    args, kwargs = case.inputs(batch=2)
    out = case.output_of(model(*args, **kwargs))
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads, "no parameter received a gradient"
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("case", by_tag("shifted_window"), ids=[c.name for c in by_tag("shifted_window")])
def test_swin_has_a_shifted_block(case: ZooCase):
    model = case.build()
    shifts = []
    for m in model.modules():
        s = getattr(m, "shift_size", None)
        if s is None:
            s = getattr(m, "shifts", None)
        if s is not None:
            shifts += list(s) if isinstance(s, (tuple, list)) else [s]
    assert any(int(s) > 0 for s in shifts)


# ---------------------------------------------------------------------------------------------
# what dynamo captures (informational)
# ---------------------------------------------------------------------------------------------

_ATTN_OPS = ("softmax", "scaled_dot_product_attention", "multi_head_attention",
             "transformer_encoder_layer", "baddbmm", "bmm", "matmul", "einsum")


def _attention_ops(graphs) -> dict[str, int]:
    ops: collections.Counter = collections.Counter()
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op == "call_module":
                name = type(gm.get_submodule(node.target)).__name__
            elif node.op in ("call_function", "call_method"):
                name = node.target if isinstance(node.target, str) else getattr(
                    node.target, "__name__", str(node.target))
            else:
                continue
            if any(k in name.lower() for k in _ATTN_OPS):
                ops[name] += 1
    return dict(sorted(ops.items()))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dynamo_capture_report(case: ZooCase, record_property):
    """eval() + no_grad (inference: where the nn.MultiheadAttention / TransformerEncoderLayer
    fast paths would trigger). Prints graphs, breaks, break reasons and attention ops."""
    import torch._dynamo

    model = case.build()
    args, kwargs = case.inputs(batch=2)
    torch._dynamo.reset()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        explained = torch._dynamo.explain(model)(*args, **kwargs)
    torch._dynamo.reset()
    reasons = sorted({br.reason.splitlines()[0][:160] for br in explained.break_reasons})
    ops = _attention_ops(explained.graphs)
    record_property("dynamo_graphs", explained.graph_count)
    record_property("dynamo_graph_breaks", explained.graph_break_count)
    record_property("dynamo_break_reasons", "; ".join(reasons))
    record_property("dynamo_attention_ops", repr(ops))
    print(f"\n[zoo-dynamo] {case.name}: graphs={explained.graph_count} "
          f"breaks={explained.graph_break_count} ops={ops} reasons={reasons}")
