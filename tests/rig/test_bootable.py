"""The legacy device booting by itself under BIOS (tests.rig.bootable): GRUB installed in
the tools VM, the autorun unit run once per disk, both serial ports read live."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests import imaging
from tests.imaging import Drive
from tests.rig import bootable, vm
from tests.rig.bootable import (
    DONE_FILE,
    EXIT_MARKER,
    NO_AUTORUN_LINE,
    SKIP_LINE,
    START_MARKER,
    BootResult,
    boot,
    bootable_legacy_image,
)
from tests.rig.legacy import ROOT_UUID, LegacySpec, SwapPlacement, partitions

PRIMARY = LegacySpec()
LOGICAL = LegacySpec(placement=SwapPlacement.LOGICAL)
IN_CI = os.environ.get("CI", "").lower() == "true"
BOOT_TIMEOUT = 240  # one boot takes about 40 s here; the reboot test boots twice


def sh(*argv: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=check,
                          env=env)


def root_fs(disk: Path, spec: LegacySpec) -> str:
    """The root filesystem of disk for e2fsprogs, without a loop device."""
    return f"{disk}?offset={partitions(spec)[0].start * 512}"


def debugfs_cat(disk: Path, spec: LegacySpec, path: str) -> str | None:
    """The file's content, None when it does not exist."""
    fs = root_fs(disk, spec)
    if "Inode:" not in sh("debugfs", "-R", f"stat {path}", fs, check=False).stdout:
        return None
    return sh("debugfs", "-R", f"cat {path}", fs).stdout


def kernel_version() -> str:
    return (vm.boot_files()[0].parent / "version").read_text().strip()


def phases(result: BootResult) -> str:
    """When the boot's milestones showed up on the serial ports (seconds after QEMU started)."""
    marks = {
        "GRUB": "Loading Linux",
        "kernel": "Linux version",
        "userspace": "Run /init as init process",
        "multi-user": "Reached target multi-user.target",
        "autorun": START_MARKER,
    }
    parts = []
    for name, needle in marks.items():
        times = [t for t, _ in result.lines(needle)]
        if times:
            parts.append(f"{name} " + "/".join(f"{t:.1f}" for t in times))
    return f"{result.reason} after {result.seconds:.1f} s; " + ", ".join(parts)


def failure(result: BootResult) -> str:
    return (f"reason {result.reason} after {result.seconds:.0f} s\n--- serial1 ---\n"
            f"{result.serial1_text[-3000:]}\n--- serial0 (tail) ---\n"
            f"{result.serial0_text[-3000:]}")


_BUILT: dict[LegacySpec, Path] = {}


def image_of(spec: LegacySpec) -> Path:
    """The cached bootable image of spec; reports how long getting it took (cold or warm)."""
    if spec in _BUILT:
        return _BUILT[spec]
    if not vm.is_cached() and os.geteuid() != 0:
        reason = "the tools VM is not cached and building it needs root"
        if IN_CI:
            pytest.fail(f"CI=true and this vm test cannot run: {reason}", pytrace=False)
        pytest.skip(f"vm test skipped: {reason}")
    started = time.monotonic()
    path = bootable_legacy_image(spec)
    print(f"\nbootable_legacy_image({spec.placement.name}): {time.monotonic() - started:.1f} s")
    _BUILT[spec] = path
    return path


def throwaway(spec: LegacySpec, tmp_path: Path) -> Path:
    disk = tmp_path / "disk.img"
    sh("cp", "--sparse=always", image_of(spec), disk)
    return disk


# --------------------------------------------------------------------------- no VM


def test_qemu_argv_is_a_bios_boot_that_survives_reboots(tmp_path: Path) -> None:
    odd = tmp_path / "a,b.img"
    argv = imaging.qemu_argv([Drive(odd), Drive(Path("/extra"))], [Path("/s0"), Path("/s1")],
                             fw_cfg={"opt/autorun": Path("/script")})
    assert "-no-reboot" not in argv and "-kernel" not in argv and "-enable-kvm" not in argv
    assert "tcg,thread=multi" in argv and "qemu64" in argv
    assert argv[argv.index("-nic") + 1] == "none"
    drive = f"if=none,id=disk0,file={str(odd).replace(',', ',,')},format=raw,cache=unsafe"
    assert drive in argv and "snapshot=on" not in " ".join(argv)
    assert "ide-hd,drive=disk0,bus=ide.0,unit=0,serial=resin-disk0,bootindex=0" in argv
    assert "ide-hd,drive=disk1,bus=ide.0,unit=1,serial=resin-disk1" in argv
    assert "name=opt/autorun,file=/script" in argv
    assert "file,id=ttyS0,path=/s0" in argv and "file,id=ttyS1,path=/s1" in argv
    no_script = imaging.qemu_argv([Drive(odd)], [Path("/s0")], reboot=False)
    assert "-fw_cfg" not in no_script and "-no-reboot" in no_script
    with pytest.raises(ValueError, match="at most 4 IDE"):
        imaging.qemu_argv([Drive(odd)] * 5, [])


def test_lines_are_stamped_as_they_arrive(tmp_path: Path) -> None:
    path = tmp_path / "serial.log"
    path.write_bytes(b"")
    lines = imaging._Lines(path)
    try:
        with open(path, "ab") as f:
            f.write(b"\r\nLoading Linux ...\r\npart")
            f.flush()
            assert lines.poll(1.0) == ["", "Loading Linux ..."]
            f.write(b"ial\r\n[\x1b[0;32m  OK  \x1b[0m] Reached \x1b[0;1;39mx\x1b[0m.\r\nlogin: ")
            f.flush()
            assert lines.poll(2.5) == ["partial", "[  OK  ] Reached x."]
            assert lines.partial() == "login: "
        lines.flush(3.0)
        assert lines.lines == [(1.0, ""), (1.0, "Loading Linux ..."), (2.5, "partial"),
                               (2.5, "[  OK  ] Reached x."), (3.0, "login: ")]
    finally:
        lines.close()
    result = BootResult(serials=[[(1.0, "a x"), (4.0, "b")], [(2.0, "x"), (3.0, "c")]],
                        reason="poweroff", seconds=5.0, returncode=0)
    assert result.lines("x") == [(1.0, "a x"), (2.0, "x")]
    assert result.first("x", port=1) == 2.0 and result.first("nowhere") is None
    assert result.serial1_text == "x\nc\n"


def test_boot_refuses_bad_arguments(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"")
    with pytest.raises(ValueError, match="not a disk"):
        boot(tmp_path / "missing.img")
    with pytest.raises(ValueError, match="at most 3 extra"):
        boot(disk, extra_disks=[disk] * 4)
    with pytest.raises(ValueError, match="timeout"):
        boot(disk, timeout=0)


def test_wrapper_passes_shellcheck(tmp_path: Path) -> None:
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed; run ./setup.sh")
    for name, text in (("wrapper", bootable._WRAPPER_TEXT), ("install", bootable._INSTALL_SCRIPT)):
        script = tmp_path / name
        script.write_text(text)
        result = subprocess.run(["shellcheck", "-s", "bash", script], capture_output=True,
                                text=True)
        assert result.returncode == 0, f"{name}:\n{result.stdout}"


# --------------------------------------------------------------------------- VM


@pytest.mark.vm
@pytest.mark.loop
def test_boots_by_bios_and_runs_the_autorun_script(tmp_path: Path) -> None:
    disk = throwaway(PRIMARY, tmp_path)
    with open(disk, "rb") as f:
        mbr = f.read(512)
    assert b"GRUB" in mbr[:440] and mbr[510:] == b"\x55\xaa"
    script = """\
uname -r
python3 --version
cat /proc/cmdline
swapon --show=NAME,TYPE --noheadings
grub-editenv list
echo "grub-editenv: $?"
test -e /var/lib/resin-migrate-autorun.done && echo "done file: yes"
poweroff
"""
    result = boot(disk, autorun=script, timeout=BOOT_TIMEOUT)
    print(f"boot, script, power-off: {phases(result)}")
    assert result.reason == "poweroff", failure(result)
    assert result.lines("Loading Linux", port=0), failure(result)  # GRUB, serial terminal
    assert result.lines("Linux version", port=0), failure(result)  # the kernel's console
    out = result.serial1_text.splitlines()
    assert out[0] == START_MARKER, failure(result)
    assert out[1] == kernel_version()
    assert re.fullmatch(r"Python 3\.\d+\.\d+", out[2])
    cmdline = out[3].split()
    assert f"root=UUID={ROOT_UUID}" in cmdline and "console=ttyS0,115200" in cmdline
    assert "quiet" not in cmdline
    assert out[4].split() == ["/dev/sda2", "partition"]  # the swap partition is active
    assert "grub-editenv: 0" in out and "done file: yes" in out
    # live stamps: the kernel before the script, the script before the power-off
    assert result.first("Linux version") < result.first(START_MARKER) <= result.seconds
    assert result.first("reboot: Power down", port=0) >= result.first(START_MARKER)
    # the done file is on the disk, the root filesystem was unmounted cleanly
    assert debugfs_cat(disk, PRIMARY, DONE_FILE)
    sh("e2fsck", "-fn", root_fs(disk, PRIMARY))


@pytest.mark.vm
@pytest.mark.loop
def test_autorun_runs_once_across_a_reboot(tmp_path: Path) -> None:
    disk = throwaway(PRIMARY, tmp_path)
    script = """\
if [ -e /root/autorun-ran ]; then echo "SECOND RUN"; exit 1; fi
echo "first run, uptime $(cut -d' ' -f1 /proc/uptime)" | tee /root/autorun-ran
sync
echo rebooting
reboot
sleep 120
"""
    result = boot(disk, autorun=script, timeout=BOOT_TIMEOUT, until=SKIP_LINE)
    print(f"boot, script, reboot, boot: {phases(result)}")
    assert result.reason == "marker", failure(result)  # QEMU did not exit at the reboot
    assert len(result.lines("Linux version", port=0)) == 2, failure(result)
    assert result.lines("reboot: Restarting system", port=0), failure(result)
    assert len(result.lines(START_MARKER, port=1)) == 1
    assert not result.lines("SECOND RUN") and not result.lines(EXIT_MARKER)
    rebooting = result.first("rebooting", port=1)
    second_kernel = result.lines("Linux version", port=0)[1][0]
    skipped = result.first(SKIP_LINE, port=1)
    assert rebooting is not None and skipped is not None
    assert rebooting < second_kernel < skipped
    assert debugfs_cat(disk, PRIMARY, "/root/autorun-ran").startswith("first run, uptime ")
    assert debugfs_cat(disk, PRIMARY, DONE_FILE)


@pytest.mark.vm
@pytest.mark.loop
def test_logical_swap_boots_and_is_active(tmp_path: Path) -> None:
    disk = throwaway(LOGICAL, tmp_path)
    script = "swapon --show=NAME,TYPE --noheadings\nfindmnt -no SOURCE /\npoweroff\n"
    result = boot(disk, autorun=script, timeout=BOOT_TIMEOUT)
    print(f"boot, script, power-off (logical swap): {phases(result)}")
    assert result.reason == "poweroff", failure(result)
    out = result.serial1_text.splitlines()
    assert [line.split() for line in out[:3]] == [
        [START_MARKER], ["/dev/sda5", "partition"], ["/dev/sda1"]], failure(result)


@pytest.mark.vm
@pytest.mark.loop
def test_without_autorun_the_unit_does_nothing(tmp_path: Path) -> None:
    disk = throwaway(PRIMARY, tmp_path)
    result = boot(disk, timeout=BOOT_TIMEOUT, until=NO_AUTORUN_LINE)
    print(f"boot without autorun: {phases(result)}")
    assert result.reason == "marker", failure(result)
    assert not result.lines(START_MARKER)
    assert debugfs_cat(disk, PRIMARY, DONE_FILE) is None


@pytest.mark.vm
@pytest.mark.loop
def test_timeout_kills_qemu(tmp_path: Path) -> None:
    disk = throwaway(PRIMARY, tmp_path)
    started = time.monotonic()
    result = boot(disk, autorun="sleep infinity\n", timeout=10)
    assert result.reason == "timeout"
    assert 10 <= result.seconds < 10 + 6 and time.monotonic() - started < 10 + 8
    assert result.serial0, "nothing read from serial0 in 10 s"  # GRUB at least
