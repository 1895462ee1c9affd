"""Stage 1 and rollback on real loop devices holding a Debian root and a swap partition.

Marked `loop`: root and loop devices needed. The runtime runs as the device would run it,
`python3 resin-migrate.pyz`, pointed at the loop disk and its mounted root.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime.manifest import load
from runtime.plan import CORE_SECTORS
from runtime.stage2names import ARMED_MBR_NAME
from tests.rig.legacy import (
    APPDATA_DIR,
    BACKUP_VOLUME,
    LegacySpec,
    SwapPlacement,
    appdata_files,
    attached,
    backup_script_text,
    copy_legacy_image,
    mounted_root,
)
from tests.tools import blkid, sfdisk_json, sfdisk_partitions, sh

pytestmark = pytest.mark.loop

# The device's interpreter, which runs the zipapp (also in test_download and test_stage2):
# RESIN_MIGRATE_TEST_PYTHON, when set (tasks.py's test task: an old Python), else python3.
PYTHON = os.environ.get("RESIN_MIGRATE_TEST_PYTHON") or (
    "/usr/bin/python3" if Path("/usr/bin/python3").exists() else "python3")
MOUNT_OPTIONS = ("noatime", "noinit_itable")
# What stage 1 may change in the old root filesystem, by design: its log and state, the
# fstab it edits, and GRUB's entry, configuration and environment.
EXPECTED_ROOT_CHANGES = ("etc/fstab", "etc/grub.d/42_resin-migrate", "boot/grub/grub.cfg",
                         "boot/grub/grubenv", "var/log/resin-migrate.log",
                         "var/lib/resin-migrate")


@dataclass
class Device:
    disk: str
    sysroot: Path
    bundle: Path
    image: Path

    def runtime(self, *args: str, env: dict[str, str] | None = None,
                bundle: Path | None = None) -> subprocess.CompletedProcess:
        pyz = (bundle or self.bundle) / "resin-migrate.pyz"
        argv = [PYTHON, str(pyz), "--bundle", str(bundle or self.bundle), "--disk", self.disk,
                "--sysroot", str(self.sysroot), *args]
        return subprocess.run(argv, capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, timeout=600)

    def partition(self, number: int) -> str:
        return f"{self.disk}p{number}"


@pytest.fixture
def device(request: pytest.FixtureRequest, tmp_path: Path,
           synthetic_bundle: Path) -> Iterator[Device]:
    spec = getattr(request, "param", LegacySpec())
    image = copy_legacy_image(spec, tmp_path / "disk.img")
    with attached(image, spec) as dev, mounted_root(dev, options=MOUNT_OPTIONS) as sysroot:
        yield Device(disk=dev.device, sysroot=sysroot, bundle=synthetic_bundle, image=image)


def backup_script_for(sysroot: Path, directory: Path) -> Path:
    """A customer backup script: copies the device's /srv/appdata into the directory given."""
    script = directory / "backup.sh"
    script.write_text(backup_script_text(str(sysroot / APPDATA_DIR)))
    script.chmod(0o755)
    return script


def backup_script(device: Device, tmp_path: Path) -> Path:
    return backup_script_for(device.sysroot, tmp_path)


def tree_digest(root: Path, skip: tuple[str, ...] = EXPECTED_ROOT_CHANGES) -> dict[str, str]:
    """Every file, link and directory under root (content, mode, owner), minus skip."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if rel.startswith(("proc/", "sys/", "dev/")) or any(
                rel == s or rel.startswith(s + "/") for s in skip):
            continue
        info = path.lstat()
        if stat.S_ISREG(info.st_mode):
            payload = hashlib.sha256(path.read_bytes()).hexdigest()
        elif stat.S_ISLNK(info.st_mode):
            payload = os.readlink(path)
        else:
            payload = ""
        found[rel] = f"{info.st_mode:o} {info.st_uid}:{info.st_gid} {payload}"
    return found


def read_device(path: str, size: int) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(size)


def stream_bytes(bundle: Path, name: str) -> bytes:
    return subprocess.run(["gzip", "-dc", str(bundle / name)], capture_output=True,
                          check=True).stdout


def sfdisk_dump(disk: str) -> str:
    return sh("sfdisk", "-d", disk).stdout.decode()


def next_entry(sysroot: Path) -> str | None:
    out = sh("chroot", sysroot, "grub-editenv", "/boot/grub/grubenv", "list").stdout.decode()
    for line in out.splitlines():
        if line.startswith("next_entry="):
            return line.split("=", 1)[1]
    return None


LAYOUTS = [LegacySpec(placement=SwapPlacement.PRIMARY),
           LegacySpec(placement=SwapPlacement.LOGICAL)]


@pytest.mark.parametrize("device", LAYOUTS, indirect=True, ids=["primary", "logical"])
def test_stage1_then_rollback(device: Device, tmp_path: Path) -> None:
    manifest = load(str(device.bundle))
    before_dump = sfdisk_dump(device.disk)
    before = sfdisk_partitions(device.disk)
    before_tree = tree_digest(device.sysroot)
    boot_area = read_device(device.disk, 2048 * 512)    # MBR and the gap before p1
    fstab_before = (device.sysroot / "etc/fstab").read_text()
    swap_number = next(number for number, part in before.items() if part.type == "82")
    swap = before[swap_number]
    swap_probe = blkid(Path(device.partition(swap_number)))
    # the extended boot record(s) before the swap, which stage 1 rewrites: rollback must
    # put back their bytes, not only what they mean
    extended = [part for part in before.values() if part.type in ("5", "f")]
    ebr_area = (extended[0].start, swap.start) if extended else (0, 0)
    ebrs_before = read_device(device.disk, ebr_area[1] * 512)[ebr_area[0] * 512:]

    checked = device.runtime("check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # the device's GRUB read the bundle's probe of the kernel's filesystem (a file of 256 KiB)
    assert "GRUB reads flash-rootA's filesystem (262144 bytes at /boot/bzImage" in \
        checked.stdout, checked.stdout
    planned = device.runtime("plan")
    assert planned.returncode == 0 and "flash-rootA" in planned.stdout, planned.stderr

    result = device.runtime("stage1", "--yes", "--json", "--backup-script",
                            str(backup_script(device, tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    # its outcome as JSON on stdout (docs/json.md), the log on stderr
    outcome = json.loads(result.stdout)
    assert (outcome["command"], outcome["ok"], outcome["exit_code"], outcome["error"],
            outcome["failed"], outcome["complete"]) == ("stage1", True, 0, None, [], True)
    assert outcome["steps_done"][0] == "plan" and outcome["steps_done"][-1] == "complete"
    assert outcome["backup_taken"] and not outcome["running"]

    # the table, read back by sfdisk: root untouched, flash partitions in the swap extent
    parts = sfdisk_partitions(device.disk)
    assert (parts[1].start, parts[1].size) == (before[1].start, before[1].size)
    numbers = [2, 3, 4] if swap_number == 2 else [5, 6, 7]
    assert [parts[n].type for n in numbers] == ["e", "83", "83"]
    # the swap's first MiB, in no partition, holds the flasher's own core.img
    assert parts[numbers[0]].start == swap.start + CORE_SECTORS
    assert parts[numbers[2]].end == swap.end
    labels = [blkid(Path(device.partition(n))) for n in numbers]
    assert [(found["LABEL"], found["TYPE"]) for found in labels] == [
        ("flash-boot", "vfat"), ("flash-rootA", "ext4"), ("flash-data", "ext4")]
    for number, label in zip(numbers[:2], ("flash-boot", "flash-rootA")):
        part = manifest.partition(label)
        stream = manifest.stream(part.stream)
        assert parts[number].nbytes >= part.size
        assert read_device(device.partition(number), stream.raw_size) == \
            stream_bytes(device.bundle, stream.file)
    assert sh("e2fsck", "-fn", device.partition(numbers[1]), check=False).returncode == 0

    # the old root: the same files but for stage 1's own, an fstab without active swap,
    # and a GRUB entry for the next boot only
    assert tree_digest(device.sysroot) == before_tree
    fstab = (device.sysroot / "etc/fstab").read_text()
    mark = "# disabled by resin-migrate: "
    swap_lines = [line for line in fstab.splitlines()
                  if len(line.removeprefix(mark).split()) > 2
                  and line.removeprefix(mark).split()[2] == "swap"]
    assert len(swap_lines) == 1 and swap_lines[0].startswith(mark)
    entry = (device.sysroot / "etc/grub.d/42_resin-migrate").read_text()
    # the root GRUB searches for: the filesystem holding the kernel (flash-rootA's since
    # balena-intel v2.21.0+rev1, the default test flasher's too)
    assert manifest.boot.kernel_label == "flash-rootA"
    assert f"search --no-floppy --fs-uuid --set=root {labels[1]['UUID']}" in entry
    assert f"linux /boot/bzImage {manifest.boot.cmdline}\n" in entry
    assert "root=LABEL=flash-rootA flasher rootwait" in entry and " panic=10" in entry
    # the one-shot boot waits at no menu and falls back to the system's own entry
    assert 'if [ "${default}" = "resin-migrate-flasher" ]; then' in entry
    assert "set timeout=1" in entry and "set fallback=" in entry
    assert "--id resin-migrate-flasher" in (device.sysroot / "boot/grub/grub.cfg").read_text()
    assert next_entry(device.sysroot) == "resin-migrate-flasher"

    # flash-data: the stage 2 inputs, the backup, the log
    mount = tmp_path / "data"
    mount.mkdir()
    sh("mount", "-o", "ro", device.partition(numbers[2]), mount)
    try:
        assert (mount / "manifest.json").read_bytes() == \
            (device.bundle / "manifest.json").read_bytes()
        env = (mount / "stage2.env").read_text()
        assert f"RM_IMAGE_SHA256='{manifest.inner_image.sha256}'" in env
        # the first sector stage 2 must not write: the flash area, or for logical
        # partitions the extended boot record before them
        protected = swap.start if swap_number == 2 else before[2].start
        assert f"RM_FLASH_START='{protected}'" in env
        with tarfile.open(mount / "backup.tgz") as tar:
            names = {member.name: member for member in tar.getmembers()}
            for rel, data in appdata_files().items():
                extracted = tar.extractfile(names[f"./{BACKUP_VOLUME}/{rel}"])
                assert extracted is not None and extracted.read() == data
        assert "stage 1 finished" in (mount / "resin-migrate-stage1.log").read_text()
        # the sector 0 stage 2 writes first: GRUB's boot.img pointing at the core.img,
        # this disk's identifier and table
        armed = (mount / ARMED_MBR_NAME).read_bytes()
        sector0 = read_device(device.disk, 512)
        assert armed[440:] == sector0[440:] and armed[:440] != sector0[:440]
        assert int.from_bytes(armed[0x5c:0x64], "little") == swap.start
        assert f"RM_ARMED_MBR_SHA256='{hashlib.sha256(armed).hexdigest()}'" in env
        _check_boot_core(device, swap.start, env, boot_area[:512])
    finally:
        sh("umount", mount)

    # taken last, without --reboot: stage 1 says so, status shows its age, and stage1 run
    # again takes it again (the late file below is in it then) and arms the entry again
    assert "does not reach resinOS. Run stage1 again right before rebooting" in result.stderr
    status = device.runtime("status")
    assert "stage 1 complete" in status.stdout and "the backup is 0 min old" in status.stdout
    status_json = json.loads(device.runtime("status", "--json").stdout)
    assert (status_json["json_version"], status_json["phase"], status_json["complete"]) == (
        1, "stage1-complete", True)
    assert status_json["backup_age_seconds"] < 600
    (device.sysroot / APPDATA_DIR / "late.txt").write_text("after stage 1\n")
    again = device.runtime("stage1", "--yes")
    assert again.returncode == 0 and "already complete and the flasher boots next; taking " \
        "the backup again" in again.stderr, again.stderr
    assert next_entry(device.sysroot) == "resin-migrate-flasher"
    sh("mount", "-o", "ro", device.partition(numbers[2]), mount)
    try:
        with tarfile.open(mount / "backup.tgz") as tar:
            late = tar.extractfile(f"./{BACKUP_VOLUME}/late.txt")
            assert late is not None and late.read() == b"after stage 1\n"
        assert f"RM_BACKUP_SIZE='{(mount / 'backup.tgz').stat().st_size}'" in \
            (mount / "stage2.env").read_text()
    finally:
        sh("umount", mount)
    (device.sysroot / APPDATA_DIR / "late.txt").unlink()

    rolled = device.runtime("rollback")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert json.loads(device.runtime("status", "--json").stdout)["phase"] == "none"
    assert sfdisk_dump(device.disk) == before_dump
    restored = blkid(Path(device.partition(swap_number)))
    assert (restored["TYPE"], restored["UUID"], restored.get("LABEL")) == (
        "swap", swap_probe["UUID"], swap_probe.get("LABEL"))
    assert (device.sysroot / "etc/fstab").read_text() == fstab_before
    assert not (device.sysroot / "etc/grub.d/42_resin-migrate").exists()
    assert "resin-migrate-flasher" not in (device.sysroot / "boot/grub/grub.cfg").read_text()
    assert next_entry(device.sysroot) is None
    assert tree_digest(device.sysroot) == before_tree
    sh("blockdev", "--flushbufs", device.disk)
    assert read_device(device.disk, 2048 * 512) == boot_area
    assert read_device(device.disk, ebr_area[1] * 512)[ebr_area[0] * 512:] == ebrs_before


def _check_boot_core(device: Device, core_start: int, env: str, sector0: bytes) -> None:
    """The flasher's core.img at core_start, as stage2.env describes it: GRUB's diskboot.img
    first, its blocklist pointing at its own next sector; sector 0 not changed by stage 1
    (stage 2 arms it). That GRUB boots it is the VM's business (tests/rig/test_bootimages)."""
    sh("blockdev", "--flushbufs", device.disk)
    core = read_device(device.disk, (core_start + CORE_SECTORS) * 512)[core_start * 512:]
    assert b"loading" in core[:512]
    first, length = struct.unpack("<QH", core[500:510])
    assert first == core_start + 1 and 0 < length < CORE_SECTORS
    assert f"RM_CORE_START='{core_start}'" in env
    assert f"RM_CORE_SECTORS='{length + 1}'" in env
    written = hashlib.sha256(core[:(length + 1) * 512]).hexdigest()
    assert f"RM_CORE_SHA256='{written}'" in env
    assert read_device(device.disk, 440) == sector0[:440]     # the boot code; the table is new


@pytest.mark.parametrize("device", LAYOUTS, indirect=True, ids=["primary", "logical"])
@pytest.mark.parametrize("killed_after", ["partition", "write:flash-boot", "grub"])
def test_interrupted_stage1_rolls_back(device: Device, killed_after: str) -> None:
    before_dump = sfdisk_dump(device.disk)
    swap_probe = next(blkid(Path(device.partition(n))) for n in (2, 5)
                      if Path(device.partition(n)).exists()
                      and blkid(Path(device.partition(n))).get("TYPE") == "swap")
    killed = device.runtime("stage1", "--yes", env={"RESIN_MIGRATE_KILL_AFTER": killed_after})
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert sfdisk_dump(device.disk) != before_dump
    status = device.runtime("status")
    assert "interrupted after" in status.stdout and killed_after in status.stdout
    rolled = device.runtime("rollback")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert json.loads(device.runtime("status", "--json").stdout)["phase"] == "none"
    assert sfdisk_dump(device.disk) == before_dump
    swap = next(blkid(Path(device.partition(n))) for n in (2, 5)
                if Path(device.partition(n)).exists()
                and blkid(Path(device.partition(n))).get("TYPE") == "swap")
    assert swap["UUID"] == swap_probe["UUID"]
    assert next_entry(device.sysroot) is None


@pytest.mark.parametrize("body,rule", [
    ('cp -a "$SRC/." "$1/"\n', "README.txt: not a directory"),
    ('ln -s "$SRC" "$1/resin-data"\n', "resin-data: a symlink"),
], ids=["files-at-the-top", "symlinked-volume"])
def test_a_backup_the_supervisor_cannot_restore_is_refused_first(device: Device, tmp_path: Path,
                                                                 body: str, rule: str) -> None:
    """The data copied to the top of DIR, or DIR/resin-data a link to it: refused with the
    rule, before any other step; the disk and the root filesystem as they were."""
    script = tmp_path / "backup.sh"
    script.write_text(f'#!/bin/sh\nset -e\nSRC="{device.sysroot / APPDATA_DIR}"\n{body}')
    script.chmod(0o755)
    table = sfdisk_dump(device.disk)
    tree = tree_digest(device.sysroot)
    fstab = (device.sysroot / "etc/fstab").read_bytes()
    result = device.runtime("stage1", "--yes", "--backup-script", str(script))
    assert result.returncode == 10, result.stdout + result.stderr
    assert "the balena Supervisor cannot restore" in result.stderr and rule in result.stderr
    assert "Nothing was changed" in result.stderr
    assert sfdisk_dump(device.disk) == table and tree_digest(device.sysroot) == tree
    assert (device.sysroot / "etc/fstab").read_bytes() == fstab
    state = device.sysroot / "var/lib/resin-migrate"
    assert not (state / "state.json").exists() and not (state / "backup.tgz").exists()
    assert not (state / "backup").exists()


def test_rollback_after_a_power_cut_emptied_the_fstab_copy(device: Device) -> None:
    """A copy of /etc/fstab lost with the page cache (stage 1 before it synced the copy):
    rollback takes the swap line back in the current file instead of restoring nothing."""
    fstab = device.sysroot / "etc/fstab"
    before = fstab.read_bytes()
    killed = device.runtime("stage1", "--yes", env={"RESIN_MIGRATE_KILL_AFTER": "fstab"})
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert fstab.read_bytes() != before
    (device.sysroot / "var/lib/resin-migrate/fstab.orig").write_bytes(b"")
    rolled = device.runtime("rollback")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert fstab.read_bytes() == before
    assert "the swap line uncommented (the copy" in rolled.stderr


@pytest.mark.parametrize("held", [1.5, None], ids=["held-a-moment", "held-throughout"])
def test_rollback_waits_for_a_partition_in_use_a_moment(device: Device,
                                                        held: float | None) -> None:
    """A new partition held open (as udev's probe holds one right after an unmount):
    rollback tries the kernel's deletion again for a while; held throughout, it fails
    with exit 12 and names the partition, and a later rollback completes."""
    import threading

    before = {p["node"] for p in sfdisk_json(Path(device.disk))["partitions"]}
    killed = device.runtime("stage1", "--yes", env={"RESIN_MIGRATE_KILL_AFTER": "partition"})
    assert killed.returncode == -9, killed.stdout + killed.stderr
    new = sorted(p["node"] for p in sfdisk_json(Path(device.disk))["partitions"]
                 if p["node"] not in before)
    node = new[-1]      # sfdisk names a loop device's partitions /dev/loopNpM
    handle = os.open(node, os.O_RDONLY)
    release = threading.Timer(held, os.close, [handle]) if held else None
    if release:
        release.start()
    try:
        rolled = device.runtime("rollback")
    finally:
        if release:
            release.join()
        else:
            os.close(handle)
    if held:
        assert rolled.returncode == 0, rolled.stdout + rolled.stderr
        log = (device.sysroot / "var/log/resin-migrate.log").read_text()
        number = node[len(device.disk) + 1:]
        assert log.count(f"partition {number} of {device.disk} is busy (try ") >= 1, \
            log[-3000:]
        return
    assert rolled.returncode == 12, rolled.stdout + rolled.stderr
    assert f"the kernel keeps partition {node[len(device.disk) + 1:]} of {device.disk} in " \
           "use" in rolled.stderr and "run rollback again" in rolled.stderr
    again = device.runtime("rollback")
    assert again.returncode == 0, again.stdout + again.stderr


def test_interrupted_stage1_resumes(device: Device) -> None:
    killed = device.runtime("stage1", "--yes",
                            env={"RESIN_MIGRATE_KILL_AFTER": "write:flash-boot"})
    assert killed.returncode == -9
    resumed = device.runtime("stage1", "--yes")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming stage 1" in resumed.stderr + resumed.stdout
    manifest = load(str(device.bundle))
    stream = manifest.stream("flash-rootA.gz")
    assert read_device(device.partition(3), stream.raw_size) == \
        stream_bytes(device.bundle, stream.file)
    assert next_entry(device.sysroot) == "resin-migrate-flasher"


def _image_digest(image: Path) -> str:
    subprocess.run(["sync"], check=True)
    digest = hashlib.sha256()
    with image.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def disk_digest(device: Device) -> str:
    """sha256 of the disk's backing file, once the kernel has finished writing to it.

    ext4 records where it is mounted in its superblock at the first open of a file after
    the mount: open one first, as any running system long has.

    The backing file, not /dev/loopN: writes through the mounted partition bypass the
    whole-disk device's page cache. Right after a mount, ext4 still writes its superblock
    and journal for a moment: wait until two readings a second apart agree.
    """
    (device.sysroot / "etc/os-release").read_bytes()
    previous = _image_digest(device.image)
    for _ in range(20):
        time.sleep(1)
        current = _image_digest(device.image)
        if current == previous:
            return current
        previous = current
    raise AssertionError(f"{device.image} keeps changing with nothing running")


def _copy_bundle(device: Device, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(device.bundle, copy)
    return copy


def _flip_stream_byte(device: Device, tmp_path: Path) -> dict:
    copy = _copy_bundle(device, tmp_path)
    stream = copy / "flash-rootA.gz"
    data = bytearray(stream.read_bytes())
    data[len(data) // 3] ^= 0x01
    stream.write_bytes(bytes(data))
    return {"bundle": copy}


def _shell_in_label(device: Device, tmp_path: Path) -> dict:
    copy = _copy_bundle(device, tmp_path)
    manifest = (copy / "manifest.json").read_text()
    (copy / "manifest.json").write_text(manifest.replace('"label": "flash-data"',
                                                         '"label": "flash-data;reboot"'))
    return {"bundle": copy}


def _without_tool(device: Device, tmp_path: Path) -> dict:
    tools = tmp_path / "tools"
    tools.mkdir()
    for directory in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        for entry in Path(directory).iterdir():
            if entry.name != "mkfs.ext4" and not (tools / entry.name).exists():
                (tools / entry.name).symlink_to(entry)
    return {"env": {"RESIN_MIGRATE_PATH": str(tools)}}


def _as_nobody(device: Device, tmp_path: Path) -> dict:
    # pytest's own temporary directories are private to root: copy where nobody can read
    public = Path(tempfile.mkdtemp(prefix="resin-migrate-nobody-"))
    public.chmod(0o755)
    copy = public / "bundle"
    shutil.copytree(device.bundle, copy)
    return {"bundle": copy, "cleanup": public,
            "prefix": ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]}


def _nothing(device: Device, tmp_path: Path) -> dict:
    return {}


def _other_boot_code(device: Device, tmp_path: Path) -> dict:
    """The MBR's first 440 bytes zeroed: the BIOS starts no GRUB from this disk."""
    with open(device.disk, "r+b") as handle:
        handle.write(bytes(440))
        os.fsync(handle.fileno())
    return {}


def _grub_moved(device: Device, tmp_path: Path) -> dict:
    """boot.img still in the MBR, but the core.img it loads is gone from the gap."""
    with open(device.disk, "r+b") as handle:
        handle.seek(512)
        handle.write(bytes(512))
        os.fsync(handle.fileno())
    return {}


def _probe_grub_cannot_read(device: Device, tmp_path: Path) -> dict:
    """The bundle's probe of the kernel's filesystem made with inline_data, an ext4
    feature the device's GRUB (2.06) does not read, as an older GRUB meets newer ones."""
    import gzip
    import json

    from builder.kernelprobe import file_bytes

    copy = _copy_bundle(device, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    boot = manifest["boot"]
    tree = tmp_path / "probe-tree"
    (tree / boot["kernel"].lstrip("/")).parent.mkdir(parents=True)
    (tree / boot["kernel"].lstrip("/")).write_bytes(file_bytes())
    raw = tmp_path / "probe.img"
    sh("mke2fs", "-F", "-q", "-t", "ext4", "-O", "inline_data", "-d", tree, raw, "16M")
    packed = gzip.compress(raw.read_bytes())
    (copy / boot["probe"]).write_bytes(packed)
    stream = next(entry for entry in manifest["streams"] if entry["file"] == boot["probe"])
    stream.update(size=len(packed), sha256=hashlib.sha256(packed).hexdigest(),
                  raw_size=raw.stat().st_size,
                  raw_sha256=hashlib.sha256(raw.read_bytes()).hexdigest())
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return {"bundle": copy}


def _grub_on_btrfs(device: Device, tmp_path: Path) -> dict:
    """/boot/grub (its files copied) on a btrfs filesystem of its own, on another loop
    device: GRUB reads it but cannot write grubenv there."""
    image = tmp_path / "btrfs.img"
    with image.open("wb") as handle:
        handle.truncate(256 << 20)
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True)
    grub_dir = device.sysroot / "boot/grub"
    saved = tmp_path / "grub-files"
    shutil.copytree(grub_dir, saved, symlinks=True)
    loop = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True,
                          text=True, check=True).stdout.strip()
    subprocess.run(["mount", loop, str(grub_dir)], check=True)
    subprocess.run(["cp", "-a", f"{saved}/.", str(grub_dir)], check=True)

    def undo() -> None:
        subprocess.run(["umount", str(grub_dir)], check=True)
        subprocess.run(["losetup", "-d", loop], check=True)
    return {"undo": undo}


@pytest.mark.parametrize(("device", "prepare", "message"), [
    (LegacySpec(), _as_nobody, "running as uid 65534"),
    (LegacySpec(with_swap_partition=False), _nothing, "swap is a file (/swapfile)"),
    (LegacySpec(swap_mib=128), _nothing, "holds 128 MiB; the flasher's partitions need"),
    (LegacySpec(), _flip_stream_byte, "flash-rootA.gz: sha256"),
    (LegacySpec(), _shell_in_label, "'flash-data;reboot' does not match"),
    (LegacySpec(), _without_tool, "missing: mkfs.ext4"),
    (LegacySpec(), _other_boot_code, "boot code in the MBR of /dev/loop"),
    (LegacySpec(), _grub_moved, "is no GRUB core.img: GRUB was installed elsewhere"),
    (LegacySpec(), _grub_on_btrfs, "grub-probe says /boot/grub is on btrfs: GRUB cannot "
                                   "write grubenv there"),
    (LegacySpec(), _probe_grub_cannot_read, "this device's GRUB cannot read a filesystem "
                                            "made like flash-rootA of the flasher"),
], indirect=["device"], ids=["not-root", "swap-file", "swap-too-small", "corrupt-stream",
                             "shell-in-label", "missing-tool", "mbr-not-grub", "core-moved",
                             "grub-on-btrfs", "kernel-fs-unreadable"])
def test_refusals_change_nothing(device: Device, tmp_path: Path, prepare, message) -> None:
    extra = prepare(device, tmp_path)
    try:
        _refused_twice(device, extra, message)
    finally:
        if "cleanup" in extra:
            shutil.rmtree(extra["cleanup"])
        if "undo" in extra:
            extra["undo"]()


def _refused_twice(device: Device, extra: dict, message: str) -> None:
    """check and stage1 both refuse with the message, and the disk's bytes stay the same."""
    before = disk_digest(device)
    bundle = extra.get("bundle", device.bundle)
    for command in (["check"], ["stage1", "--yes", "--json"]):
        argv = [PYTHON, str(bundle / "resin-migrate.pyz"), "--bundle", str(bundle), "--disk",
                device.disk, "--sysroot", str(device.sysroot), *command]
        result = subprocess.run([*extra.get("prefix", []), *argv], capture_output=True,
                                text=True, env={**os.environ, **extra.get("env", {})})
        output = result.stdout + result.stderr
        assert result.returncode == 10, output
        assert message in output
        assert "Traceback" not in output
    # stage1 --json (docs/json.md): the refusal and the failed check that says why
    found = json.loads(result.stdout)
    assert (found["json_version"], found["command"], found["ok"], found["exit_code"]) == (
        1, "stage1", False, 10)
    assert found["steps_done"] == [] and not found["complete"] and found["error"]
    assert any(message in " ".join((check["found"], check["needed"], check["hint"]))
               for check in found["failed"]) or message in found["error"], found
    assert disk_digest(device) == before
    # not even the log or the state directory
    assert not (device.sysroot / "var/log/resin-migrate.log").exists()
    assert not (device.sysroot / "var/lib/resin-migrate").exists()


def _gpt_copy(tmp_path: Path) -> Path:
    image = copy_legacy_image(LegacySpec(), tmp_path / "disk.img")
    dump = subprocess.run(["sfdisk", "-d", str(image)], capture_output=True, text=True,
                          check=True).stdout
    lines = [line for line in dump.splitlines() if " : " in line]
    script = "label: gpt\n" + "\n".join(
        line.replace("type=83", "type=0FC63DAF-8483-4772-8E79-3D69D8477DE4")
            .replace("type=82", "type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F")
            .replace(", bootable", "") for line in lines) + "\n"
    subprocess.run(["sfdisk", "-q", str(image)], input=script.encode(), check=True)
    return image


def test_gpt_disk_is_refused_and_unchanged(tmp_path: Path, synthetic_bundle: Path) -> None:
    image = _gpt_copy(tmp_path)
    with attached(image, LegacySpec()) as dev, \
            mounted_root(dev, options=MOUNT_OPTIONS) as sysroot:
        device = Device(dev.device, sysroot, synthetic_bundle, image)
        before = disk_digest(device)
        result = device.runtime("check")
        assert result.returncode == 10
        assert "partition table" in result.stdout and "gpt" in result.stdout
        assert disk_digest(device) == before


def test_no_swap_partition_is_refused(tmp_path: Path, synthetic_bundle: Path) -> None:
    image = copy_legacy_image(LegacySpec(), tmp_path / "disk.img")
    subprocess.run(["sfdisk", "-q", "--part-type", str(image), "2", "83"], check=True)
    table = sfdisk_json(image)["partitions"][1]
    with image.open("r+b") as handle:   # wipe the swap signature
        handle.seek(table["start"] * 512)
        handle.write(bytes(1 << 20))
    with attached(image, LegacySpec()) as dev, \
            mounted_root(dev, options=MOUNT_OPTIONS) as sysroot:
        device = Device(dev.device, sysroot, synthetic_bundle, image)
        before = disk_digest(device)
        result = device.runtime("check")
        assert result.returncode == 10
        assert "no swap partition on the disk" in result.stdout
        assert disk_digest(device) == before



def test_stage1_memory_stays_small_with_a_1gib_stream(tmp_path: Path,
                                                      synthetic_bundle: Path) -> None:
    """Peak RSS of stage 1 while it writes and verifies a 1 GiB flash-rootA stream: a device
    may have 512 MiB of RAM and, after swapoff, no swap. A bound, not a timing."""
    import json
    import random

    from runtime.manifest import dumps, loads

    bundle = tmp_path / "bundle"
    shutil.copytree(synthetic_bundle, bundle)
    raw = tmp_path / "rootA.img"
    rng = random.Random(7)
    # an ext4 filesystem holding the manifest's kernel (stage 1's GRUB entry finds its
    # partition by its UUID; GRUB's own grub-fstest must read it there) with 1 MiB of noise
    # every 64 MiB after its first block group
    kernel = rng.randbytes(256 << 10)
    tree = tmp_path / "rootA-tree"
    (tree / "boot").mkdir(parents=True)
    (tree / "boot" / "bzImage").write_bytes(kernel)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "flash-rootA", "-d", str(tree), str(raw),
                    "1G"], check=True)
    with raw.open("r+b") as handle:
        for offset in range(128 << 20, 1 << 30, 64 << 20):
            handle.seek(offset)
            handle.write(rng.randbytes(1 << 20))
    with (bundle / "flash-rootA.gz").open("wb") as out:
        subprocess.run(["gzip", "-1", "-c", str(raw)], stdout=out, check=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    def digest(path: Path) -> str:
        return subprocess.run(["sha256sum", str(path)], capture_output=True, text=True,
                              check=True).stdout.split()[0]

    for stream in manifest["streams"]:
        if stream["file"] == "flash-rootA.gz":
            stream.update(size=(bundle / "flash-rootA.gz").stat().st_size,
                          sha256=digest(bundle / "flash-rootA.gz"),
                          raw_size=1 << 30, raw_sha256=digest(raw))
    for part in manifest["partitions"]:
        if part["label"] == "flash-rootA":
            part["size"] = 1 << 30
    assert manifest["boot"]["kernel"] == "/boot/bzImage"
    manifest["boot"].update(kernel_size=len(kernel),
                            kernel_sha256=hashlib.sha256(kernel).hexdigest())
    (bundle / "manifest.json").write_bytes(dumps(loads(json.dumps(manifest).encode())))
    raw.unlink()

    spec = LegacySpec(swap_mib=1280)
    image = copy_legacy_image(spec, tmp_path / "disk.img")
    with attached(image, spec) as dev, mounted_root(dev, options=MOUNT_OPTIONS) as sysroot:
        device = Device(dev.device, sysroot, bundle, image)
        result = device.runtime("stage1", "--yes")
        assert result.returncode == 0, result.stdout + result.stderr
        log_text = (sysroot / "var/log/resin-migrate.log").read_text()
    peak = [line for line in log_text.splitlines() if "peak memory of this process" in line]
    kib = int(peak[-1].split("peak memory of this process: ")[1].split(" KiB")[0])
    print(f"\nstage1 peak RSS writing and verifying a 1 GiB stream: {kib / 1024:.1f} MiB")
    assert kib < 64 * 1024


def _three_primaries(tmp_path: Path) -> tuple[Path, LegacySpec]:
    """Root, swap, and a data partition after the swap: no primary slot for three more."""
    spec = LegacySpec(placement=SwapPlacement.PRIMARY)
    image = copy_legacy_image(spec, tmp_path / "disk.img")
    swap = sfdisk_json(image)["partitions"][1]
    data_start = swap["start"] + swap["size"]
    subprocess.run(["sfdisk", "-q", "--append", str(image)],
                   input=f"start={data_start}, size=204800, type=83\n".encode(), check=True)
    return image, spec


def test_no_free_primary_slot_gets_an_extended_partition(tmp_path: Path,
                                                         synthetic_bundle: Path) -> None:
    image, spec = _three_primaries(tmp_path)
    with attached(image, spec) as dev, mounted_root(dev, options=MOUNT_OPTIONS) as sysroot:
        device = Device(dev.device, sysroot, synthetic_bundle, image)
        before = sfdisk_dump(device.disk)
        result = device.runtime("stage1", "--yes")
        assert result.returncode == 0, result.stdout + result.stderr
        parts = sfdisk_json(Path(device.disk))["partitions"]
        assert [(p["node"][len(device.disk):], p["type"]) for p in parts] == [
            ("p1", "83"), ("p2", "5"), ("p3", "83"), ("p5", "e"), ("p6", "83"), ("p7", "83")]
        # the kernel knows the new partitions, as sysfs shows them
        for number, label in ((5, "flash-boot"), (6, "flash-rootA"), (7, "flash-data")):
            assert blkid(Path(device.partition(number)))["LABEL"] == label
        assert device.runtime("rollback").returncode == 0
        assert sfdisk_dump(device.disk) == before
        assert blkid(Path(device.partition(2)))["TYPE"] == "swap"
        assert not Path(device.partition(5)).exists()


def test_active_swap_is_switched_off_and_back_on(device: Device) -> None:
    swap = device.partition(2)
    sh("swapon", swap)
    try:
        checked = device.runtime("check")
        assert "active, 0 MiB used" in checked.stdout, checked.stdout
        assert device.runtime("stage1", "--yes").returncode == 0
        assert swap not in Path("/proc/swaps").read_text()
        rolled = device.runtime("rollback")
        assert rolled.returncode == 0, rolled.stderr
        assert swap in Path("/proc/swaps").read_text()
    finally:
        sh("swapoff", swap, check=False)


def test_another_disk_with_boot_code_is_named_with_the_root_disk(device: Device,
                                                                  tmp_path: Path) -> None:
    """Three more disks: one with GRUB's boot code, one with a partition table alone
    (sfdisk writes no boot code), one empty. Only the first could be booted instead."""
    from runtime.preflight import Preflight
    from tests.imagewrite import loop_device

    images = {name: tmp_path / f"{name}.img" for name in ("grub", "table", "empty")}
    for image in images.values():
        with image.open("wb") as handle:
            handle.truncate(8 << 20)
    sh("sfdisk", "-q", images["table"], input=b"label: dos\nstart=2048, type=83\n")
    sh("sfdisk", "-q", images["grub"], input=b"label: dos\nstart=2048, type=83\n")
    with images["grub"].open("r+b") as handle:
        handle.write(Path("/usr/lib/grub/i386-pc/boot.img").read_bytes()[:440])
    before = disk_digest(device)
    with loop_device(images["grub"]) as grub_disk, loop_device(images["table"]) as table, \
            loop_device(images["empty"]) as empty:
        candidates = [grub_disk, table, empty, device.disk]
        checks = Preflight(str(device.sysroot), str(device.bundle), device.disk,
                           boot_disks=candidates).run()
    found = next(check for check in checks.checks if check.name == "other boot disks")
    assert found.ok is False
    assert found.found == f"boot code on {grub_disk} as well as on {device.disk}"
    assert f"unplug {grub_disk}" in found.hint
    assert not checks.passed
    assert disk_digest(device) == before
