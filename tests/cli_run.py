"""Running the ``attnswap`` command line as a user does, for the tests: ``python -m attnswap.cli``
or the installed ``attnswap`` console script (next to ``sys.executable``), in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).with_name("attnswap")
ENTRY = {
    "module": [sys.executable, "-m", "attnswap.cli"],
    "script": [str(SCRIPT)],
}


def run(how, *args, cwd=None, timeout=300):
    if how == "script" and not SCRIPT.exists():
        pytest.skip(f"console script not installed at {SCRIPT} (pip install -e .)")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    return subprocess.run(ENTRY[how] + [str(a) for a in args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)
