"""The bootable flasher and resinOS stand-ins (tests/rig/bootimages.py): their shape (the
row's files and units, read back with mtools, debugfs and systemctl --root), the initramfs
migrator's stand-in taking over an unmodified flasher and rebooting one whose image was
renamed, and the repacked flasher booting under systemd into the real stage 2, which writes
the stand-in, which boots and reports."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import types
from pathlib import Path

import pytest

from runtime.grub import entry_script
from runtime.manifest import Manifest
from tests import imaging
from tests.imaging import BootResult, Drive
from tests.releases import RELEASES, Release
from tests.rig import bootimages
from tests.rig.bootimages import (
    FLASHER_RELEASE,
    MIGRATOR_MARKER,
    OLDER_RELEASE,
    PROXY_CONF,
    boot_kit,
    cached_bootable_flasher,
    cached_bootable_resinos,
    parse_report,
    resinos_grub_cfg,
    sparse_copy,
)
from tests.rig.legacy import BACKUP_VOLUME
from tests.tools import read_range, sfdisk_partitions

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "data" / "config.json"
MiB = 1 << 20
GiB = 1 << 30
BOOT_TIMEOUT = 300  # seconds; a boot to power-off takes 20 to 60 s on the CI machines
ROWS = [FLASHER_RELEASE, OLDER_RELEASE]
RESINOS_LABELS = {1: "resin-boot", 2: "resin-rootA", 3: "resin-rootB", 5: "resin-state",
                  6: "resin-data"}
FLASHER_LABELS = {1: "flash-boot", 2: "flash-rootA", 3: "flash-rootB"}
MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _need_images(release: Release) -> None:
    if os.geteuid() != 0 and not bootimages.is_cached(release):
        reason = "building the bootable images needs root once (chroot into the rig's rootfs)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="module", params=ROWS, ids=lambda row: row.name)
def row(request: pytest.FixtureRequest) -> Release:
    return request.param  # type: ignore[no-any-return]


def _flasher(release: Release) -> Path:
    _need_images(release)
    return cached_bootable_flasher(release)


def _resinos(release: Release) -> Path:
    _need_images(release)
    return cached_bootable_resinos(release)


def _label(image: Path, number: int) -> str:
    offset = sfdisk_partitions(image)[number].offset
    return subprocess.run(["blkid", "-p", "-O", str(offset), "-s", "LABEL", "-o", "value",
                           str(image)], capture_output=True, text=True).stdout.strip()


def _fat(image: Path, number: int) -> str:
    return f"{image}@@{sfdisk_partitions(image)[number].offset}"


def _fat_read(image: Path, number: int, path: str) -> bytes:
    proc = subprocess.run(["mtype", "-i", _fat(image, number), f"::{path}"],
                          capture_output=True, env=MTOOLS_ENV)
    assert proc.returncode == 0, f"mtype {path}: {proc.stderr!r}"
    return proc.stdout


def _fat_write(image: Path, number: int, path: str, data: bytes, tmp: Path) -> None:
    source = tmp / "fat-write"
    source.write_bytes(data)
    subprocess.run(["mcopy", "-o", "-i", _fat(image, number), str(source), f"::{path}"],
                   check=True, env=MTOOLS_ENV)


def _ext4(image: Path, number: int) -> str:
    return f"{image}?offset={sfdisk_partitions(image)[number].offset}"


def _ext4_exists(image: Path, number: int, paths: list[str]) -> dict[str, bool]:
    found = {}
    for path in paths:
        proc = subprocess.run(["debugfs", "-R", f"stat {path}", _ext4(image, number)],
                              capture_output=True, text=True)
        found[path] = "Inode:" in proc.stdout
    return found


def _rootfs_tree(image: Path, number: int, dest: Path) -> Path:
    """The whole ext4 filesystem of a partition, copied out with debugfs rdump."""
    dest.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump / {dest}", _ext4(image, number)],
                   capture_output=True, check=True)
    return dest


def _is_enabled(tree: Path, unit: str) -> str:
    return subprocess.run(["systemctl", f"--root={tree}", "is-enabled", unit],
                          capture_output=True, text=True).stdout.strip()


def _stage2_tools() -> list[str]:
    """Every tool runtime/resin-migrate-stage2 checks with `need`, and what it runs besides."""
    text = (ROOT / "runtime" / "resin-migrate-stage2").read_text().replace("\\\n", " ")
    tools: list[str] = []
    for line in text.splitlines():
        m = re.search(r"(?:^|\)\s*)need\s+([^;(){}]+)", line.strip())
        if m:
            tools += [w for w in m.group(1).split() if re.fullmatch(r"[a-z0-9]+", w)]
    assert {"blkid", "losetup", "dd", "sha256sum"} <= set(tools), tools
    return sorted(set(tools) | {"bash", "reboot", "cat", "rm", "zstd", "gzip"})


def _with_serial_console(disk: Path, tmp: Path) -> None:
    """Let a copy of the flasher print on ttyS0 when it boots from its own GRUB: the real
    entry's console=null quiet splash (2.108 and later) hide everything."""
    cfg = _fat_read(disk, 1, "/grub/grub.cfg").decode()
    entry = re.search(r"^linux .*$", cfg, re.MULTILINE)
    assert entry, cfg
    line = entry.group(0).replace("console=null quiet splash ", "") + " console=ttyS0,115200"
    _fat_write(disk, 1, "/grub/grub.cfg", cfg.replace(entry.group(0), line).encode(), tmp)


def _boot(disk: Path, tmp: Path, name: str, **options: object) -> BootResult:
    return imaging.boot([Drive(disk)], reboot=False, log_dir=tmp / name, **options)


def _tail(result: BootResult) -> str:
    return f"{result.reason} after {result.seconds:.0f} s:\n{result.serial0_text[-5000:]}"


# --------------------------------------------------------------------------- no VM


def test_parse_report_reads_the_last_run() -> None:
    console = (
        "[ 1.0] kernel\r\nRESINOS-REPORT start\r\nRESINOS-REPORT labels=a,b\r\n"
        "RESINOS-REPORT start\nRESINOS-REPORT label=resin-boot /dev/sda1\n"
        "noise RESINOS-REPORT config_sha256=abc\nRESINOS-REPORT backup_entry=-rw-r--r-- x=y\n"
        "RESINOS-REPORT boot_file=0123 system-proxy/redsocks.conf\n"
        "RESINOS-REPORT end\n"
    )
    report = parse_report(console)
    assert report.started and report.complete
    assert report.first("labels") is None  # from the first run
    assert report.labels == ["resin-boot"]
    assert report.first("config_sha256") == "abc"
    assert report.all("backup_entry") == ["-rw-r--r-- x=y"]
    assert report.files("boot_file") == {"system-proxy/redsocks.conf": "0123"}
    assert not parse_report("RESINOS-REPORT start\n").complete


def test_the_rig_boots_the_rows_the_issue_names() -> None:
    assert FLASHER_RELEASE is RELEASES["2.113"] and FLASHER_RELEASE.migrator
    assert OLDER_RELEASE is RELEASES["2.51"] and not OLDER_RELEASE.migrator
    assert OLDER_RELEASE.extraenv and not OLDER_RELEASE.balena_names


# --------------------------------------------------------------------------- shape


@pytest.mark.vm
def test_resinos_stand_in_has_the_row_shape(row: Release) -> None:
    image = _resinos(row)
    parts = sfdisk_partitions(image)
    assert sorted(parts) == [1, 2, 3, 4, 5, 6]
    assert (parts[1].offset, parts[1].nbytes) == (4 * MiB, row.boot_mib * MiB)
    assert parts[2].nbytes == parts[3].nbytes == row.root_mib * MiB
    assert parts[6].nbytes == row.data_mib * MiB
    assert all(part.offset % (4 * MiB) == 0 for part in parts.values())
    for number, label in RESINOS_LABELS.items():
        assert _label(image, number) == label
    with image.open("rb") as handle:
        head = handle.read(1024)
    grub = boot_kit().grub
    assert head[:440] == grub.boot_img[:440] and head[510:512] == b"\x55\xaa"
    assert head[512:1024] == grub.core_img[:512]
    assert _fat_read(image, 1, "/grub/grub.cfg").decode() == resinos_grub_cfg(row)
    assert _fat_read(image, 1, f"/{row.image_flag_file}") == b"DO NOT REMOVE THIS FILE\n"
    assert json.loads(_fat_read(image, 1, "/config.json"))["deviceType"] == row.slug
    found = _ext4_exists(image, 2, ["/usr/sbin/init", "/usr/bin/busybox", "/usr/sbin/blkid",
                                    "/boot/bzImage", "/boot/initrd"])
    assert all(found.values()), found


@pytest.mark.vm
def test_flasher_has_the_row_shape_units_and_stage2_tools(row: Release, tmp_path: Path) -> None:
    image = _flasher(row)
    parts = sfdisk_partitions(image)
    assert sorted(parts) == [1, 2, 3, 4, 5, 6]
    # as in REFERENCE's parted listing
    assert (parts[1].offset, parts[1].nbytes) == (8192 * 512, row.boot_mib * MiB)
    for number, label in FLASHER_LABELS.items():
        assert _label(image, number) == label
    assert _fat_read(image, 1, f"/{row.flag_file}") == b"DO NOT REMOVE THIS FILE\n"
    cfg = _fat_read(image, 1, "/grub/grub.cfg").decode()
    assert cfg == _fat_read(image, 1, "/EFI/BOOT/grub.cfg").decode()
    assert f"source {row.extraenv}" in cfg
    assert f"linux /boot/bzImage {row.kernel_args()}\ninitrd /boot/initrd\n" in cfg
    assert ("console=null quiet splash" in cfg) == bool(row.os_cmdline)
    assert _fat_read(image, 1, "/system-proxy/redsocks.conf") == PROXY_CONF
    assert _fat_read(image, 1, "/grub.cfg_internal").decode() == resinos_grub_cfg(row)
    tree = _rootfs_tree(image, 2, tmp_path / "rootA")
    assert (tree / "opt" / row.inner_name).is_file()
    assert (tree / "flash-boot" / row.flag_file).is_file()  # the migrator's trigger
    assert os.readlink(tree / "usr/sbin/init") == "../lib/systemd/systemd"
    for unit in ("resin-init-flasher.service", "resin-device-register.service",
                 "mnt-boot.mount", "temp-conf.service", "rig-kernel-modules.service"):
        assert _is_enabled(tree, unit) == "enabled", unit
    flasher_unit = (tree / "usr/lib/systemd/system/resin-init-flasher.service").read_text()
    assert ("resin-device-register.service" in flasher_unit.split("After=")[1].split("\n")[0]
            ) == row.registration_ordering
    tools = _stage2_tools()
    missing = [t for t in tools if not ((tree / "usr/bin" / t).exists()
                                        or (tree / "usr/sbin" / t).exists())]
    assert not missing, f"stage 2 needs tools the flasher lacks: {missing}"


# --------------------------------------------------------------------------- the migrator


@pytest.mark.vm
def test_migrator_takes_over_an_unmodified_flasher(tmp_path: Path) -> None:
    """Booted from the only disk with `flasher` and the trigger in its rootfs, the initramfs
    step takes over before systemd starts: without the builder, no stage 2."""
    disk = sparse_copy(_flasher(FLASHER_RELEASE), tmp_path / "flasher.img")
    _with_serial_console(disk, tmp_path)
    result = _boot(disk, tmp_path, "unmodified", timeout=BOOT_TIMEOUT)
    assert f"{MIGRATOR_MARKER} taking over" in result.serial0_text, _tail(result)
    assert result.reason == "poweroff"
    assert "systemd[1]" not in result.serial0_text


@pytest.mark.vm
def test_migrator_reboots_a_flasher_whose_image_was_renamed(tmp_path: Path) -> None:
    """What an earlier builder left: the trigger in place, the raw image renamed. The
    migrator finds no image, fails, and the machine reboots (QEMU ends: -no-reboot)."""
    disk = sparse_copy(_flasher(FLASHER_RELEASE), tmp_path / "flasher.img")
    _with_serial_console(disk, tmp_path)
    name = f"/opt/{FLASHER_RELEASE.inner_name}"
    imaging.debugfs(_ext4(disk, 2), [f"ln {name} {name}.zst", f"unlink {name}"], write=True)
    result = _boot(disk, tmp_path, "renamed", timeout=BOOT_TIMEOUT)
    assert f"{MIGRATOR_MARKER} FAIL: no {FLASHER_RELEASE.inner_name} found" in \
        result.serial0_text, _tail(result)
    assert result.reason == "poweroff" and "systemd[1]" not in result.serial0_text


# --------------------------------------------------------------------------- builder


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from builder.progress import Progress
    from builder.repack import BuildOptions, build

    out = tmp_path_factory.mktemp("bootable-bundle") / "nuc"
    build(BuildOptions(image=_flasher(FLASHER_RELEASE), out=out, config=CONFIG),
          Progress(quiet=True))
    return out


@pytest.mark.vm
def test_build_flasher_repacks_it_small_enough(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    sizes = {part["label"]: part["size"] for part in manifest["partitions"]}
    inner = manifest["inner_image"]
    total = sum(p.stat().st_size for p in bundle.iterdir())
    print(f"bundle {total / MiB:.1f} MiB; flash-boot {sizes['flash-boot'] / MiB:.0f} MiB, "
          f"flash-rootA {sizes['flash-rootA'] / MiB:.0f} MiB; inner image "
          f"{inner['raw_size'] / MiB:.0f} MiB raw, {inner['stream_size'] / MiB:.0f} MiB in "
          f"extents, {inner['size'] / MiB:.1f} MiB {inner['compression']}")
    # the flash partitions and a flash-data of 64 MiB fit a legacy swap of 1 GiB
    assert sizes["flash-rootA"] + sizes["flash-boot"] + 64 * MiB < GiB // 2
    # the resinOS image ends well before the swap area of a disk with a 1.5 GiB root
    assert inner["raw_size"] < GiB
    boot = manifest["boot"]
    assert (boot["kernel_label"], boot["kernel"], boot["initrd"]) == (
        "flash-rootA", "/boot/bzImage", "/boot/initrd")
    assert boot["cmdline"].split() == [
        "root=LABEL=flash-rootA", "flasher", "rootwait", "vt.global_cursor_default=0",
        "consoleblank=0", "console=ttyS0,115200n8", "console=tty0", "panic=10"]
    assert manifest["flasher"]["shape"] == "2.113"
    assert manifest["flasher"]["release"] == FLASHER_RELEASE.version


# --------------------------------------------------------------------------- stage 2, for real

SECTOR = 512
EPOCH = 1_577_836_800


def _backup_tgz(tmp: Path) -> tuple[bytes, dict[str, str]]:
    """backup.tgz as stage 1 takes it (runtime.backup.capture): a script copies the app's
    data into the volume's directory; the names it restores to, with their hashes."""
    from runtime.backup import capture

    files = {"hello.txt": b"hello from the legacy device\n",
             "blob.bin": hashlib.sha256(b"blob").digest() * 65536}  # 2 MiB
    source = tmp / "appdata"
    source.mkdir()
    for name, data in files.items():
        (source / name).write_bytes(data)
    script = tmp / "backup.sh"
    script.write_text(f'#!/bin/sh\nset -e\nmkdir "$1/{BACKUP_VOLUME}"\n'
                      f'cp -a "{source}/." "$1/{BACKUP_VOLUME}/"\n')
    script.chmod(0o755)
    workdir = tmp / "backup-work"
    workdir.mkdir()
    archive = Path(capture(str(script), str(workdir), volumes=[BACKUP_VOLUME]))
    return archive.read_bytes(), {f"{BACKUP_VOLUME}/{name}": _sha256(data)
                                  for name, data in files.items()}


def _disk_after_stage1(bundle: Path, disk: Path, backup: bytes, tmp: Path) -> None:
    """What stage 1 leaves, without a legacy system: the flash partitions written from the
    bundle's streams after the area the resinOS image takes; in the first 4 MiB a GRUB whose
    config is the one-shot entry stage 1 installs (runtime.grub.entry_script) for
    flash-rootA's filesystem; in the MiB before flash-boot the flasher's own core.img, made
    by runtime.bootcore with this host's GRUB as stage 1 makes it with the device's;
    flash-data holding stage2.env (runtime/stage2env.py), the armed sector 0 and
    backup.tgz."""
    from runtime import bootcore
    from runtime.grub import Chroot
    from runtime.plan import CORE_SECTORS
    from runtime.stage2env import render, stage2_values
    from runtime.stage2names import ARMED_MBR_NAME, GUARD_TIMEOUT

    manifest = Manifest.from_dict(json.loads((bundle / "manifest.json").read_text()))
    sizes = {part.label: part.size // SECTOR for part in manifest.partitions}
    align = 8192
    boot_start = -(-(manifest.inner_image.raw_size // SECTOR + align) // align) * align
    root_start = boot_start + sizes["flash-boot"]
    data_start = root_start + -(-sizes["flash-rootA"] // align) * align
    data_size = sizes["flash-data"]
    total = data_start + data_size
    imaging.new_sparse(disk, total * SECTOR)
    table = (f"label: dos\nunit: sectors\n\n"
             f"start={boot_start}, size={sizes['flash-boot']}, type=e, bootable\n"
             f"start={root_start}, size={sizes['flash-rootA']}, type=83\n"
             f"start={data_start}, size={data_size}, type=83\n")
    imaging.run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", disk], stdin=table)
    for stream, start in (("flash-boot.gz", boot_start), ("flash-rootA.gz", root_start)):
        with gzip.open(bundle / stream, "rb") as src, open(disk, "r+b") as dst:
            dst.seek(start * SECTOR)
            shutil.copyfileobj(src, dst, 1 << 20)
    # the legacy system's GRUB would run stage 1's entry: here a core.img with prefix
    # (hd0,msdos1)/grub (flash-boot) reads it from flash-boot's /grub/grub.cfg
    grub = boot_kit().grub
    imaging.write_at(disk, 0, grub.boot_img[:440])
    imaging.write_at(disk, SECTOR, grub.core_img)
    root_uuid = imaging.run(["blkid", "-p", "-O", str(root_start * SECTOR), "-s", "UUID",
                             "-o", "value", disk]).stdout.strip()
    entry = entry_script(manifest.boot, root_uuid)
    menu = entry[entry.index("menuentry"):entry.index("END_OF_ENTRY\n", entry.index("menuentry"))]
    cfg = ("serial --unit=0 --speed=115200\nterminal_output serial console\n"
           "set default=resin-migrate-flasher\nset timeout=0\n" + menu)
    flash_boot = f"{disk}@@{boot_start * SECTOR}"
    (tmp / "grub.cfg").write_text(cfg)
    subprocess.run(["mcopy", "-o", "-i", flash_boot, str(tmp / "grub.cfg"), "::/grub/grub.cfg"],
                   check=True, env=MTOOLS_ENV)

    core_start = boot_start - CORE_SECTORS
    with Chroot("/") as host:
        core = bootcore.place_core(bootcore.make_core(host, "/", manifest.boot, root_uuid),
                                   core_start)
    imaging.write_at(disk, core_start * SECTOR, core)
    armed = bootcore.armed_mbr(Path("/", bootcore.GRUB_DIR, "boot.img").read_bytes(),
                               read_range(disk, 0, SECTOR), core_start)

    staging = tmp / "flash-data"
    staging.mkdir()
    (staging / "backup.tgz").write_bytes(backup)
    (staging / ARMED_MBR_NAME).write_bytes(armed)
    core_facts = {"core_start": core_start, "core_sectors": len(core) // SECTOR,
                  "core_sha256": _sha256(core), "armed_mbr_sha256": _sha256(armed)}
    values = stage2_values(manifest, types.SimpleNamespace(protected_start=core_start), total,
                           len(backup), _sha256(backup), core_facts, GUARD_TIMEOUT)
    (staging / "stage2.env").write_text(render(values))
    fs = tmp / "flash-data.img"
    imaging.run(["mkfs.ext4", "-q", "-F", "-L", "flash-data", "-d", staging, fs,
                 f"{data_size * SECTOR // 1024}k"])
    imaging.place(fs, disk, data_start * SECTOR, data_size * SECTOR)
    fs.unlink()


@pytest.mark.vm
def test_real_stage2_writes_the_stand_in_which_boots(bundle: Path, tmp_path: Path) -> None:
    """The repacked flasher boots: the migrator declines, systemd starts stage 2 through
    its own unit and nothing of the flasher's own (no registration, no flashing), stage 2
    writes the resinOS stand-in over the start of the disk and reboots; the disk then boots
    the stand-in, which reports the fleet's config.json without its installer section,
    flash-boot's proxy and splash files, the backup, and the log stage 2 left."""
    backup, backup_files = _backup_tgz(tmp_path)
    disk = tmp_path / "disk.img"
    _disk_after_stage1(bundle, disk, backup, tmp_path)

    flasher_run = _boot(disk, tmp_path, "flasher", timeout=2 * BOOT_TIMEOUT)
    console = flasher_run.serial0_text
    assert "resin-migrate: stage 2 complete" in console, _tail(flasher_run)
    assert f"{MIGRATOR_MARKER} not enabled" in console
    assert "resin-device-register: cannot reach" not in console  # masked
    assert "resin-init-flasher: no internal device" not in console  # masked
    assert flasher_run.reason == "poweroff"  # stage 2 rebooted (-no-reboot: QEMU ended)

    resinos_run = _boot(disk, tmp_path, "resinos", timeout=BOOT_TIMEOUT)
    report = parse_report(resinos_run.serial0_text)
    assert report.complete, _tail(resinos_run)
    assert report.labels == sorted(RESINOS_LABELS.values())
    fleet = json.loads(CONFIG.read_text())
    config = json.loads(report.first("config_json") or "{}")
    assert "installer" in fleet and "installer" not in config
    assert config == {key: value for key, value in fleet.items() if key != "installer"}
    files = report.files("boot_file")
    assert files["system-proxy/redsocks.conf"] == _sha256(PROXY_CONF)
    assert "splash/balena-logo.png" in files
    assert report.first("migrate_log") == "yes"
    assert report.first("boot_efi") == "no"  # legacy BIOS: stage 2 removed /EFI
    assert report.first("backup_sha256") == _sha256(backup)
    # restored by the Supervisor's commands, busybox's tar and GNU tar (the stand-in's init)
    assert report.files("volume_file_sha256") == backup_files
    assert not report.all("restore_error"), report.values
    assert not report.all("error"), report.values
    print(f"\nstage 2 in the flasher: {flasher_run.seconds:.1f} s (boot, write, reboot); "
          f"resinOS stand-in: {resinos_run.seconds:.1f} s")
