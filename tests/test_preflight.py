"""Preflight checks that read the device's files, on a root tree made by the test."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.preflight import Preflight


def _sysroot(tmp_path: Path, grub_version: str | None, os_id: str = "ubuntu") -> Path:
    root = tmp_path / "root"
    for directory in ("etc/grub.d", "usr/sbin", "boot/grub", "var/lib/dpkg"):
        (root / directory).mkdir(parents=True)
    for tool in ("update-grub", "grub-reboot", "grub-editenv", "grub-mkimage", "grub-fstest",
                 "grub-probe"):
        (root / "usr/sbin" / tool).write_text("#!/bin/sh\n")
    # what the flasher's own core.img is made of (runtime/bootcore.py)
    (root / "usr/lib/grub/i386-pc").mkdir(parents=True)
    for name in ("boot.img", "biosdisk.mod", "search_fs_uuid.mod"):
        (root / "usr/lib/grub/i386-pc" / name).write_bytes(b"")
    (root / "boot/grub/grubenv").write_text("# GRUB Environment Block\n" + "#" * 998)
    (root / "etc/os-release").write_text(f'ID={os_id}\nPRETTY_NAME="{os_id} test"\n')
    if grub_version:
        (root / "var/lib/dpkg/status").write_text(
            "Package: grub-common\nStatus: install ok installed\nVersion: "
            f"{grub_version}\n\nPackage: zstd\nStatus: install ok installed\nVersion: 1.5\n")
    return root


@pytest.mark.parametrize(("version", "ok"), [("2.06-13+deb12u1", True), ("2.02~beta2-9", True),
                                             ("1.99-21ubuntu3", False), (None, True)])
def test_grub_version(tmp_path: Path, version: str | None, ok: bool) -> None:
    preflight = Preflight(str(_sysroot(tmp_path, version)), str(tmp_path))
    preflight.check_grub()
    [check] = preflight.checks
    assert check.ok is ok, check.found
    if not ok:
        assert "older than 2.00" in check.found


@pytest.mark.parametrize(("os_id", "ok"), [("ubuntu", True), ("debian", True),
                                           ("fedora", False)])
def test_os_is_debian_or_ubuntu(tmp_path: Path, os_id: str, ok: bool) -> None:
    preflight = Preflight(str(_sysroot(tmp_path, None, os_id)), str(tmp_path))
    preflight.check_os()
    assert preflight.checks[0].ok is ok
    assert preflight.checks[0].found == f"{os_id} test"


@pytest.mark.parametrize(("removed", "named"), [
    (["usr/sbin/grub-reboot", "boot/grub/grubenv"],
     ["no grub-reboot", "no /boot/grub/grubenv"]),
    # what the flasher's own core.img is made with
    (["usr/sbin/grub-mkimage", "usr/lib/grub/i386-pc/search_fs_uuid.mod"],
     ["no grub-mkimage", "search_fs_uuid.mod (grub-pc-bin)"]),
], ids=["one-shot-entry", "flasher-core-img"])
def test_missing_grub_pieces_are_named(tmp_path: Path, removed: list[str],
                                       named: list[str]) -> None:
    root = _sysroot(tmp_path, None)
    for path in removed:
        (root / path).unlink()
    preflight = Preflight(str(root), str(tmp_path))
    preflight.check_grub()
    assert preflight.checks[0].ok is False
    for text in named:
        assert text in preflight.checks[0].found


@pytest.mark.parametrize(("spec", "named"), [
    ("UUID=8c6f1e2a-4b3d-4f5e-a7c9-0d1e2f3a4b5c", True),
    ("UUID=8C6F1E2A-4B3D-4F5E-A7C9-0D1E2F3A4B5C", True),
    ("LABEL=legacy-swap", True),
    ("PARTUUID=1e9ac1d5-02", True),
    ("/dev/disk/by-uuid/8c6f1e2a-4b3d-4f5e-a7c9-0d1e2f3a4b5c", True),
    ("/dev/disk/by-partuuid/1e9ac1d5-02", True),
    ("/dev/sda2", True),
    ("/dev/sda5", False),
    ("UUID=00000000-0000-0000-0000-000000000000", False),
    ("LABEL=other", False),
])
def test_fstab_names_the_swap_however_it_is_written(spec: str, named: bool) -> None:
    from runtime.system import FstabEntry
    entry = FstabEntry(0, spec, "none", "swap", "sw", f"{spec} none swap sw 0 0")
    assert entry.names("8c6f1e2a-4b3d-4f5e-a7c9-0d1e2f3a4b5c", "legacy-swap", ["/dev/sda2"],
                       "1e9ac1d5-02") is named
