"""End to end: a legacy Debian VM migrated unattended to the resinOS stand-in (`invoke e2e`).

Each scenario boots QEMU once and keeps it up across the guest's reboots; see tests/e2e.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import (
    OLD_TOOLS,
    OLDTOOLS_SPEC,
    StaticNetwork,
    fallback,
    migrate,
    table_text,
)
from tests.powercut import instants, run_matrix, table
from tests.rig.bootimages import FLASHER_RELEASE, OLDER_RELEASE
from tests.rig.legacy import LegacySpec, SwapPlacement

pytestmark = [pytest.mark.vm, pytest.mark.loop]


# The logical swap of the default run is the old release's layout below (p1 at sector 63,
# the swap 63 sectors into a cylinder-aligned extended partition); the 1 MiB-aligned one
# runs on loop devices in every run (tests/test_stage1.py) and in the VM with
# `invoke e2e --scenario logical`.
@pytest.mark.parametrize("placement", [SwapPlacement.PRIMARY], ids=["primary-swap"])
def test_legacy_vm_migrates_to_resinos(placement: SwapPlacement, tmp_path: Path) -> None:
    """With the 2.113 flasher: its initramfs migrator declines, systemd runs stage 2."""
    result = migrate(LegacySpec(placement=placement), tmp_path, release=FLASHER_RELEASE)
    print(f"\nmigration of the {placement.value}-swap layout with the {FLASHER_RELEASE.name} "
          f"flasher:\n{result.summary()}")


def test_an_older_flasher_migrates_too(tmp_path: Path) -> None:
    """With the 2.51 flasher: resin names, GRUB variables on its kernel line, no migrator."""
    result = migrate(LegacySpec(), tmp_path, release=OLDER_RELEASE)
    print(f"\nmigration with the {OLDER_RELEASE.name} flasher:\n{result.summary()}")


def test_stage2_refusal_falls_back_and_rollback_restores_swap(tmp_path: Path) -> None:
    result = fallback(LegacySpec(), tmp_path)
    print(f"\nfallback run: {result.boot.seconds:.0f} s; {result.swaps_after}")


def test_static_network_is_carried_to_resin_boot(tmp_path: Path) -> None:
    """A static ethernet address and a WPA-PSK network configured with ifupdown end up as
    keyfiles on the migrated resin-boot; the WiFi key is in no log."""
    network = StaticNetwork()
    result = migrate(LegacySpec(), tmp_path, network=network)
    assert set(network.keyfile_names) <= set(result.keyfiles)
    ethernet = result.keyfiles[network.keyfile_names[0]]
    assert ethernet["ipv4"]["address1"] == f"{network.address}/{network.prefix},{network.gateway}"
    assert ethernet["ethernet"]["mac-address"].upper() == network.mac.upper()
    print(f"\nmigration with a static address ({', '.join(sorted(result.keyfiles))} on "
          f"resin-boot):\n{result.summary()}")


def test_an_old_release_without_sfdisk_and_lsblk_under_lang_c_migrates(tmp_path: Path) -> None:
    """p1 at sector 63 and the logical swap 63 sectors into a cylinder-aligned extended
    partition (DOS compatibility), no sfdisk and no lsblk in the guest, stage 1 under LANG=C:
    the logical-swap migration otherwise (`invoke e2e --scenario oldtools`)."""
    result = migrate(OLDTOOLS_SPEC, tmp_path, old_tools=True)
    said = [line for _, line in result.boot.serial1 if line.startswith("E2E tool ")]
    assert said == [f"E2E tool {tool}: absent" for tool in OLD_TOOLS]
    assert result.tables["legacy"][1][0] == 63
    print(f"\nmigration of an old release's device (no {', '.join(OLD_TOOLS)}, LANG=C):\n"
          f"  legacy table: {table_text(result.tables['legacy'])}\n"
          f"  final table: {table_text(result.tables['final'])}\n{result.summary()}")


@pytest.mark.parametrize("name", [name for name, instant in instants(None).items()
                                  if instant.default])
def test_power_cut_ends_in_resinos_or_the_old_system(name: str, tmp_path: Path) -> None:
    """A handful of the power-cut matrix (the slowest windows: the body write, the head
    write); `invoke e2e --scenario powercut` runs every instant."""
    rows = run_matrix([name], tmp_path)    # its progress and any failure in full: captured
    print(f"\n{table(rows)}")
    assert all(not isinstance(row, str) for row in rows), rows[0]
