"""Converted real models export to ONNX, pass the checker, run in onnxruntime at two batch sizes
and sequence lengths from one file, and match the converted PyTorch model (1e-4, fp32)."""

import numpy as np
import pytest
import torch

import attnswap

pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
import onnx  # noqa: E402

from attnswap import onnx as aonnx  # noqa: E402
from zoo import ZOO  # noqa: E402

ATOL = 1e-4
KINDS = ["softmax", "sigmoid", "relu", "sas"]
TEXT_AXES = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}


def _text_inputs(batch, seq, seed, padded):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 90, (batch, seq), generator=g)
    m = torch.ones(batch, seq, dtype=torch.long)
    if padded:
        m[1, -2:] = 0
    return {"input_ids": x, "attention_mask": m}


CASES = {
    "bert": ("hf:bert-eager", True),
    "gpt2": ("hf:gpt2-eager", False),
    "llama": ("hf:llama-eager", False),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(CASES))
def test_text_model_exports_and_matches(name, kind, tmp_path):
    case, padded = CASES[name]
    model = ZOO[case].build()
    example = _text_inputs(2, 7, 0, padded)
    converted = attnswap.convert(model, kind, example)
    path = tmp_path / f"{name}-{kind}.onnx"
    proto, report = aonnx.export(converted, example, path, dynamic_shapes=TEXT_AXES)
    assert len(report.sites) == len(converted.attnswap_report.sites)
    onnx.checker.check_model(str(path))
    sess = aonnx.session(str(path))
    for batch, seq in ((2, 7), (3, 12)):
        inputs = _text_inputs(batch, seq, 1, padded)
        got = aonnx.run(sess, inputs)[0]
        with torch.no_grad():
            out = converted(**inputs)
        want = (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()
        if padded:  # padded query rows are not read by users; compare the real ones
            keep = inputs["attention_mask"].bool().numpy()
            got, want = got[keep], want[keep]
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_timm_vit_exports_and_matches(kind, tmp_path):
    case = ZOO["timm:vit_tiny-unfused"]
    model = case.build()
    (x,), _ = case.inputs(batch=2)
    converted = attnswap.convert(model, kind, (x,))
    proto, report = aonnx.export(converted, (x,), tmp_path / "vit.onnx",
                                 dynamic_shapes=({0: "batch"},))
    onnx.checker.check_model(proto)
    sess = aonnx.session(proto)
    for batch in (2, 5):
        (xb,), _ = case.inputs(batch=batch, seed=4)
        with torch.no_grad():
            want = converted(xb).numpy()
        np.testing.assert_allclose(aonnx.run(sess, [xb])[0], want, atol=ATOL, rtol=1e-4)


def test_export_of_unconverted_model_with_attention_option(tmp_path):
    model = ZOO["hf:gpt2-eager"].build()
    example = _text_inputs(2, 6, 0, False)
    proto, report = aonnx.export(model, example, attention="relu", activation="relu2")
    assert all(r.kind == "relu" for r in report.sites) and len(report.sites) == 2
    assert "forward" not in model.__dict__


def test_compare_table_has_both_variants():
    model = ZOO["hf:gpt2-eager"].build()
    rows = aonnx.compare(model, _text_inputs(2, 6, 0, False), attention="sigmoid", repeat=2,
                         print_table=False)
    assert [r["variant"] for r in rows] == ["original", "converted"]
    assert all(r["max_abs_err"] < ATOL for r in rows)
