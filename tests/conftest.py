"""Test capabilities: tests marked `loop` need root and loop devices, `vm` needs QEMU.

Elsewhere they skip with the reason printed; in CI (CI=true) a missing capability fails
the test, so a CI run can never pass by skipping what it must run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def _loop_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (loop devices, partx, mount)"
    if not Path("/dev/loop-control").exists():
        return "needs loop devices (/dev/loop-control is missing)"
    return None


def _vm_missing() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "needs QEMU (qemu-system-x86_64; ./setup.sh installs it)"
    return None


_CHECKS = {"loop": _loop_missing, "vm": _vm_missing}


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker, check in _CHECKS.items():
        if item.get_closest_marker(marker) is None:
            continue
        reason = check()
        if reason is None:
            continue
        if IN_CI:
            pytest.fail(f"CI=true and this {marker} test cannot run: {reason}", pytrace=False)
        pytest.skip(f"{marker} test skipped: {reason}")


@pytest.fixture(scope="session")
def synthetic_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle built from the synthetic flasher with the test config.json, once a session."""
    from builder.progress import Progress
    from builder.repack import BuildOptions, build
    from tests.synthetic import cached_flasher

    out = tmp_path_factory.mktemp("bundle") / "nuc"
    config = Path(__file__).resolve().parent / "data" / "config.json"
    build(BuildOptions(image=cached_flasher(), out=out, config=config), Progress(quiet=True))
    return out
