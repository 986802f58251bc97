"""The ``attnswap`` command line through its real entry points: ``python -m attnswap.cli`` and the
installed ``attnswap`` console script (next to ``sys.executable``). Tiny settings throughout."""

from __future__ import annotations

import json
import textwrap

import pytest

pytest.importorskip("rich")

from cli_run import run  # noqa: E402

# Each case through one entry point (both are covered; every call pays for importing torch).
BAD = {
    "unknown-model": ("script", ["inspect", "hf:no-such-model"], "unknown model"),
    "module-does-not-import": ("module", ["inspect", "no_such_pkg.models:make"], "cannot import module"),
    "unknown-kind": ("script", ["convert", "torch:transformer-encoder", "--attention", "cosine",
                                "--out", "x"], "unknown attention kind"),
    "unknown-kind-train": ("module", ["train", "--attention", "softmax", "linear", "--steps", "1"],
                           "unknown attention kind"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit_2(case, tmp_path):
    how, args, words = BAD[case]
    r = run(how, *args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("attnswap: error:") and words in lines[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


def test_inspect_builtin_json():
    r = run("script", "inspect", "torch:transformer-encoder", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["model"] == "torch:transformer-encoder" and len(rep["sites"]) == 2


def test_inspect_and_convert_user_factory(tmp_path):
    (tmp_path / "mymodels.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.qkv = nn.Linear(16, 48)
            def forward(self, x):
                q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
                w = (q @ k.transpose(-2, -1) / 8 ** 0.5).softmax(dim=-1)
                return (w @ v).transpose(1, 2).reshape(x.shape)

        def make():
            torch.manual_seed(0)
            return Block(), torch.randn(2, 5, 16)
    """))
    r = run("module", "inspect", "mymodels:make", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "1 site(s)" in r.stdout
    out = tmp_path / "conv"
    r = run("script", "convert", "mymodels:make", "--attention", "relu", "--option", "activation=relu2",
            "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "attnswap.json").read_text())
    assert meta["model"] == "mymodels:make" and meta["attention"] == "relu"
    assert meta["options"] == {"activation": "relu2"} and meta["sites"] == 1
    import torch

    state = torch.load(out / "model.pt")
    assert set(state) == {"qkv.weight", "qkv.bias"}


def test_convert_builtin_module_entry(tmp_path):
    r = run("module", "convert", "torch:transformer-encoder", "--attention", "sas", "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "o" / "attnswap.json").read_text())
    assert meta["sites"] == 2 and meta["attention"] == "sas"
    import torch

    assert any(".attnswap." in k for k in torch.load(tmp_path / "o" / "model.pt"))


def test_zoo_json():
    r = run("script", "zoo", "--json", "--models", "torch:transformer-encoder", "--attention", "sigmoid",
            "--reps", "1")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    (row,) = data["models"]
    assert row["sites"] == 2 and row["identity_max_abs_err"] < 1e-4
    assert set(row["ratio"]) == {"sigmoid"} and row["ratio"]["sigmoid"] > 0


def test_zoo_list_module_entry():
    r = run("module", "zoo", "--list")
    assert r.returncode == 0, r.stderr
    assert "hf:gpt2-tiny" in r.stdout and "torch:transformer-encoder" in r.stdout


@pytest.mark.parametrize("how,task,kinds", [
    ("script", "digits", ["softmax", "sigmoid"]),
    ("module", "text", ["relu"]),
])
def test_train_tiny(how, task, kinds, tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn" if task == "digits" else "transformers")
    r = run(how, "train", "--task", task, "--attention", *kinds, "--steps", 2, "--batch-size", 8,
            "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    png = tmp_path / f"train_{task}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((tmp_path / f"train_{task}.json").read_text())
    assert [x["kind"] for x in res["runs"]] == kinds and all(x["steps"] == 2 for x in res["runs"])
    md = (tmp_path / f"train_{task}.md").read_text()
    assert all(f"| {k} |" in md for k in kinds)
