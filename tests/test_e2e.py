"""End to end: a legacy Debian VM migrated unattended to the resinOS stand-in (`invoke e2e`).

Each scenario boots QEMU once and keeps it up across the guest's reboots; see tests/e2e.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import StaticNetwork, fallback, migrate
from tests.fleet import run_fleet
from tests.powercut import instants, run_matrix, table
from tests.rig.bootimages import OLDER_RELEASE
from tests.rig.legacy import LegacySpec

pytestmark = [pytest.mark.vm, pytest.mark.loop]


def test_a_fleet_migrates_in_waves_with_a_refusal(tmp_path: Path) -> None:
    """deploy/ansible's playbook, serial [1, 2], max_fail_percentage 50, on three VMs: a
    primary-swap device by Ansible's modules, then together an old release's device (p1 at
    63, logical swap, no sfdisk and lsblk, LANG=C) by raw tasks with the streams from HTTPS,
    and a device whose swap is a file, which check refuses (tests/fleet.py). The default
    run's primary and oldtools migrations are these; `invoke e2e --scenario primary` or
    `oldtools` runs them alone, by the autorun script."""
    result = run_fleet(tmp_path, progress=print)   # shown when it fails
    print(f"\nfleet:\n{result.summary()}")


def test_stage2_refusal_falls_back_and_rollback_restores_swap(tmp_path: Path) -> None:
    result = fallback(LegacySpec(), tmp_path, progress=print)
    print(f"\nfallback run: {result.boot.seconds:.0f} s; {result.swaps_after}")


def test_static_network_with_an_older_flasher(tmp_path: Path) -> None:
    """A static ethernet address and a WPA-PSK network configured with ifupdown end up as
    keyfiles on the migrated resin-boot; the WiFi key is in no log. The flasher is 2.51's
    (resin names, GRUB variables on its kernel line, no migrator): the `older` scenario of
    `invoke e2e` with the network of `static`."""
    network = StaticNetwork()
    result = migrate(LegacySpec(), tmp_path, release=OLDER_RELEASE, network=network,
                     progress=print)
    assert set(network.keyfile_names) <= set(result.keyfiles)
    ethernet = result.keyfiles[network.keyfile_names[0]]
    assert ethernet["ipv4"]["address1"] == f"{network.address}/{network.prefix},{network.gateway}"
    assert ethernet["ethernet"]["mac-address"].upper() == network.mac.upper()
    print(f"\nmigration with a static address ({', '.join(sorted(result.keyfiles))} on "
          f"resin-boot) and the {OLDER_RELEASE.name} flasher:\n{result.summary()}")


@pytest.mark.parametrize("name", [name for name, instant in instants(None).items()
                                  if instant.default])
def test_power_cut_ends_in_resinos_or_the_old_system(name: str, tmp_path: Path) -> None:
    """One instant of the power-cut matrix, the widest window (the body write half done);
    `invoke e2e --scenario powercut` runs every instant."""
    rows = run_matrix([name], tmp_path)    # its progress and any failure in full: captured
    print(f"\n{table(rows)}")
    assert all(not isinstance(row, str) for row in rows), rows[0]
