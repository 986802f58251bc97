"""``attnswap train`` is reproducible: the same command with the same seed, run twice in fresh
processes, prints (and writes) the same numbers to the last digit, for every kind.

What could break it: the CPU kernels' thread pool finishing tasks in varying order, a kernel
choice that depends on timing or on process state, SAS's parameters drawn from an unseeded
generator, batches drawn from the global RNG. Each run is a separate process (the claim is about
commands, not about calls inside one interpreter), with the default thread count."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("rich")

from cli_run import run  # noqa: E402

KINDS = ["softmax", "sigmoid", "relu", "sas"]


def _train(task: str, out) -> dict:
    r = run("module", "train", "--task", task, "--attention", *KINDS, "--steps", 3,
            "--batch-size", 8, "--seed", 3, "--out", out, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads((out / f"train_{task}.json").read_text())


@pytest.mark.parametrize("task", ["digits", "text"])
def test_same_train_command_gives_the_same_numbers(task, tmp_path):
    pytest.importorskip("sklearn" if task == "digits" else "transformers")
    first, second = _train(task, tmp_path / "a"), _train(task, tmp_path / "b")
    assert [r["kind"] for r in first["runs"]] == KINDS == [r["kind"] for r in second["runs"]]
    for a, b in zip(first["runs"], second["runs"]):
        # Every step's loss and every evaluation, exactly (floats round-trip through JSON).
        assert a["losses"] == b["losses"], a["kind"]
        assert a["evals"] == b["evals"], a["kind"]
        assert a["op_calls"] == b["op_calls"] > 0, a["kind"]
        assert len(set(a["losses"])) > 1, "training did not move: the test would prove nothing"
