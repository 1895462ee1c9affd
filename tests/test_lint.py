"""The project's static checks run with the tests, so CI enforces them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("argv", [
    [sys.executable, "-m", "ruff", "check", "."],
    [sys.executable, "-m", "mypy"],
    # the runtime runs on the device's python3, as old as 3.4 (Ubuntu 14.04)
    [str(BIN / "vermin"), "--target=3.4-", "--violations", "--no-tips", "--eval-annotations",
     "runtime"],
    ["shellcheck", "runtime/resin-migrate-stage2", "deploy/ansible/confirm-ssh-port.sh"],
], ids=["ruff", "mypy", "vermin", "shellcheck"])
def test_static_check_passes(argv: list[str]) -> None:
    if shutil.which(argv[0]) is None and not Path(argv[0]).exists():
        pytest.fail(f"{argv[0]} is not installed; run ./setup.sh")
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
