"""The tools VM (tests.rig.vm): a script runs inside the rig's Debian with test disks
attached; what it wrote is read back on the host with independent tools (mtools)."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.rig import vm

MiB = 1 << 20
FAT_START_SECTOR = 2048
FAT_OFFSET = FAT_START_SECTOR * 512
IN_CI = os.environ.get("CI", "").lower() == "true"


def sh(*argv: object, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "MTOOLS_SKIP_CHECK": "1"}
    return subprocess.run(
        [str(a) for a in argv], input=stdin, capture_output=True, text=True, check=True, env=env
    )


def fat_disk(path: Path, size_mib: int = 64) -> Path:
    """A sparse disk with an msdos table and one FAT16 partition from 1 MiB to the end,
    made without mounting (sfdisk, mkfs.fat --offset), holding HOST.TXT (mtools)."""
    with open(path, "wb") as f:
        f.truncate(size_mib * MiB)
    sh("sfdisk", "-q", "--no-reread", "--no-tell-kernel", path,
       stdin=f"label: dos\nstart={FAT_START_SECTOR}, type=6\n")
    blocks_kib = (size_mib * MiB - FAT_OFFSET) // 1024
    sh("mkfs.fat", "-F", "16", "-n", "TESTDISK", "-i", "1234abcd", "--offset",
       FAT_START_SECTOR, path, blocks_kib)
    host_file = path.with_suffix(".host.txt")
    host_file.write_text("written on the host\n")
    sh("mcopy", "-i", f"{path}@@{FAT_OFFSET}", host_file, "::/HOST.TXT")
    return path


def mtype(image: Path, name: str) -> str:
    return sh("mtype", "-i", f"{image}@@{FAT_OFFSET}", f"::/{name}").stdout


def mcopy_out(image: Path, name: str, dest: Path) -> bytes:
    sh("mcopy", "-n", "-i", f"{image}@@{FAT_OFFSET}", f"::/{name}", dest)
    return dest.read_bytes()


@pytest.fixture(scope="session")
def tools_vm() -> None:
    """The kernel, initrd and root disk, built once (needs root when not cached)."""
    if not vm.is_cached() and os.geteuid() != 0:
        reason = "the tools VM root disk is not cached and building it needs root"
        if IN_CI:
            pytest.fail(f"CI=true and this vm test cannot run: {reason}", pytrace=False)
        pytest.skip(f"vm test skipped: {reason}")
    if shutil.which("mcopy") is None:
        pytest.fail("mtools is not installed; run ./setup.sh")
    vm.boot_files()
    vm.root_disk()


# --------------------------------------------------------------------------- no VM


def test_parse_output_takes_the_last_marker_out() -> None:
    assert vm._parse_output("a\nb\n\nRESIN-MIGRATE-VM-EXIT 3\n") == ("a\nb\n", 3, None)
    assert vm._parse_output("no newline\nRESIN-MIGRATE-VM-EXIT 0\n") == ("no newline", 0, None)
    assert vm._parse_output("half a line") == ("half a line", None, None)
    # a background process of the script wrote after the marker: kept
    assert vm._parse_output("x\n\nRESIN-MIGRATE-VM-EXIT 1\nlate\n") == ("x\nlate\n", 1, None)
    assert vm._parse_output("\nRESIN-MIGRATE-VM-SETUP-ERROR no share\n") == (
        "", None, "no share")


def test_qemu_argv(tmp_path: Path) -> None:
    odd = tmp_path / "a,b.img"
    argv = vm.qemu_argv(
        kernel=Path("/k"), initrd=Path("/i"), root=Path("/root.img"), script=Path("/s"),
        disks=[Path("/d0"), Path("/d1"), odd], shares={"bundle": Path("/x")},
        serials=(Path("/c"), Path("/o")),
    )
    text = " ".join(argv)
    assert "-enable-kvm" not in argv and "tcg,thread=multi" in argv and "qemu64" in argv
    assert "-no-reboot" in argv and argv[argv.index("-kernel") + 1] == "/k"
    assert "if=none,id=disk3,file=/root.img,format=raw,cache=unsafe,snapshot=on" in argv
    assert "virtio-blk-pci,drive=disk3" in argv
    assert "ide-hd,drive=disk0,bus=ide.0,unit=0,serial=resin-disk0" in argv
    assert "ide-hd,drive=disk1,bus=ide.0,unit=1,serial=resin-disk1" in argv
    assert "ide-hd,drive=disk2,bus=ide.1,unit=0,serial=resin-disk2" in argv
    assert "bootindex" not in text  # direct kernel boot
    assert f"file={str(odd).replace(',', ',,')},format=raw,cache=unsafe" in text
    assert "local,path=/x,mount_tag=bundle,security_model=none,readonly=on" in argv
    assert "name=opt/resin-migrate/shares,string=bundle" in argv
    assert argv[argv.index("-nic") + 1] == "none"


def test_run_script_refuses_bad_arguments(tmp_path: Path) -> None:
    disks = [tmp_path / f"d{i}.img" for i in range(5)]
    for d in disks:
        d.write_bytes(b"")
    with pytest.raises(ValueError, match="at most 4"):
        vm.run_script("true", disks)
    with pytest.raises(ValueError, match="not a disk"):
        vm.run_script("true", [tmp_path / "missing.img"])
    with pytest.raises(ValueError, match="bad share tag"):
        vm.run_script("true", [], shares={"a,b": tmp_path})


def test_wrapper_passes_shellcheck(tmp_path: Path) -> None:
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed; run ./setup.sh")
    wrapper = tmp_path / "wrapper"
    wrapper.write_text(vm._WRAPPER_TEXT)
    result = subprocess.run(["shellcheck", wrapper], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# --------------------------------------------------------------------------- VM


@pytest.mark.vm
def test_script_output_and_exit_code(tools_vm: None, tmp_path: Path) -> None:
    disks = []
    for i, size in enumerate((64, 80)):
        disks.append(tmp_path / f"disk{i}.img")
        with open(disks[-1], "wb") as f:
            f.truncate(size * MiB)
    script = "uname -r\nls /dev/sd*\nlsblk -dno NAME,SERIAL,SIZE /dev/sd?\n"
    script += "echo to stderr >&2\nexit 3"  # no newline at the end
    result = vm.run_script(script, disks, timeout=240)
    kernel_version = (vm.boot_files()[0].parent / "version").read_text().strip()
    assert result.exit_code == 3, result.console[-3000:] + result.output
    lines = result.output.splitlines()
    assert lines[0] == kernel_version
    assert lines[1:3] == ["/dev/sda", "/dev/sdb"]
    # disks[0] is sda, disks[1] is sdb (the serials QEMU gave them)
    assert re.split(r"\s+", lines[3]) == ["sda", "resin-disk0", "64M"]
    assert re.split(r"\s+", lines[4]) == ["sdb", "resin-disk1", "80M"]
    assert lines[5:] == ["to stderr"]
    assert "Linux version" in result.console
    assert "\r" not in result.output
    print(f"boot, script, power-off: {result.seconds:.1f} s")


@pytest.mark.vm
def test_script_writes_a_fat_partition(tools_vm: None, tmp_path: Path) -> None:
    disk = fat_disk(tmp_path / "fat.img")
    script = """\
set -eu
mkdir -p /mnt/fat
mount -t vfat /dev/sda1 /mnt/fat
cat /mnt/fat/HOST.TXT
echo "written in the VM on $(uname -r)" > /mnt/fat/FROMVM.TXT
umount /mnt/fat
echo done
"""
    result = vm.run_script(script, [disk], timeout=240)
    assert result.exit_code == 0, result.console[-3000:] + result.output
    assert result.output == "written on the host\ndone\n"
    text = mtype(disk, "FROMVM.TXT")
    assert text.startswith("written in the VM on ") and text.endswith("-amd64\n")
    partition = tmp_path / "partition.img"  # fsck.fat has no --offset
    sh("dd", f"if={disk}", f"of={partition}", "bs=1M", f"skip={FAT_OFFSET // MiB}", "status=none")
    sh("fsck.fat", "-n", partition)  # clean: unmounted in the VM, dirty bit cleared
    print(f"boot, script, power-off: {result.seconds:.1f} s")


@pytest.mark.vm
def test_share_is_mounted_read_only(tools_vm: None, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    payload = random.Random(7).randbytes(3 * MiB + 123)
    (share / "payload.bin").write_bytes(payload)
    disk = fat_disk(tmp_path / "fat.img")
    script = """\
set -eu
mkdir -p /mnt/fat
mount -t vfat /dev/sda1 /mnt/fat
cp /mnt/bundle/payload.bin /mnt/fat/PAYLOAD.BIN
if touch /mnt/bundle/new 2>/dev/null; then echo "share is writable"; exit 1; fi
findmnt -no FSTYPE,OPTIONS /mnt/bundle
umount /mnt/fat
"""
    result = vm.run_script(script, [disk], shares={"bundle": share}, timeout=240)
    assert result.exit_code == 0, result.console[-3000:] + result.output
    fstype, options = result.output.split()
    assert fstype == "9p" and "ro" in options.split(",")
    assert mcopy_out(disk, "PAYLOAD.BIN", tmp_path / "out.bin") == payload
    assert sorted(p.name for p in share.iterdir()) == ["payload.bin"]
    print(f"boot, script, power-off: {result.seconds:.1f} s")


@pytest.mark.vm
def test_reboot_by_the_script_ends_the_run(tools_vm: None) -> None:
    result = vm.run_script("echo rebooting\nreboot\nsleep infinity\n", [], timeout=120)
    assert result.exit_code is None  # never finished, and no setup error either
    assert result.output.startswith("rebooting\n")
    assert "reboot: Restarting system" in result.console
    print(f"boot, script, reboot: {result.seconds:.1f} s")


@pytest.mark.vm
def test_timeout_kills_the_vm(tools_vm: None, tmp_path: Path) -> None:
    result = vm.run_script("echo sleeping\nsleep infinity\n", [], timeout=60)
    assert result.exit_code is None
    assert 60 <= result.seconds < 60 + 10
    assert result.output == "sleeping\n"  # the logs so far
    assert "Linux version" in result.console
    print(f"timed out after {result.seconds:.1f} s")
