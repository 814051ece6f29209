"""The code stays ruff-clean (STYLE.md 13)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def test_ruff_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    if ruff is None:
        pytest.skip("ruff is not installed in this environment (it comes with the [test] extra)")
    proc = subprocess.run([ruff, "check", "pipelines", "bronze", "silver", "gold", "models", "tests", "benchmarks",
                           "notebooks"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
