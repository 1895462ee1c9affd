"""End to end: a legacy Debian VM migrated unattended to the resinOS stand-in (`invoke e2e`).

Each scenario boots QEMU once and keeps it up across the guest's reboots; see tests/e2e.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import fallback, migrate
from tests.rig.legacy import LegacySpec, SwapPlacement

pytestmark = [pytest.mark.vm, pytest.mark.loop]


@pytest.mark.parametrize("placement", [SwapPlacement.PRIMARY, SwapPlacement.LOGICAL],
                         ids=["primary-swap", "logical-swap"])
def test_legacy_vm_migrates_to_resinos(placement: SwapPlacement, tmp_path: Path) -> None:
    result = migrate(LegacySpec(placement=placement), tmp_path)
    print(f"\nmigration of the {placement.value}-swap layout:\n{result.summary()}")


def test_stage2_refusal_falls_back_and_rollback_restores_swap(tmp_path: Path) -> None:
    result = fallback(LegacySpec(), tmp_path)
    print(f"\nfallback run: {result.boot.seconds:.0f} s; {result.swaps_after}")
