"""The bootable flasher and resinOS stand-ins (tests/rig/bootimages.py): their shape, that a
legacy BIOS boots each straight from its own disk in QEMU, and that the builder repacks the
flasher into a bundle small enough for a legacy swap partition."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import pytest

from tests.rig import bootimages
from tests.rig.bootimages import (
    FLASHER_CMDLINE,
    FLASHER_CONFIG,
    INIT_MARKER,
    INNER_NAME,
    RESINOS_CONFIG,
    boot_disk,
    boot_kit,
    bootimages_key,
    cached_bootable_flasher,
    cached_bootable_resinos,
    parse_report,
    partition_offsets,
    replace_in_ext4,
    sparse_copy,
)

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
GiB = 1 << 30
BOOT_TIMEOUT = 300  # seconds; a boot to power-off takes about 20 s on an idle CI machine

RESINOS_LABELS = {1: "resin-boot", 2: "resin-rootA", 3: "resin-rootB", 5: "resin-state",
                  6: "resin-data"}
FLASHER_LABELS = {1: "flash-boot", 2: "flash-rootA", 3: "flash-rootB"}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _need_images() -> None:
    if os.geteuid() != 0 and not bootimages.is_cached():
        reason = "building the bootable images needs root once (chroot into the rig's rootfs)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def resinos_image() -> Path:
    _need_images()
    return cached_bootable_resinos()


@pytest.fixture(scope="module")
def flasher_image() -> Path:
    _need_images()
    return cached_bootable_flasher()


def _run(argv: list[str | os.PathLike[str]]) -> str:
    proc = subprocess.run([os.fspath(a) for a in argv], capture_output=True, text=True,
                          check=False, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    assert proc.returncode == 0, f"{argv}: {proc.stderr}"
    return proc.stdout


def _label(image: Path, number: int) -> str:
    offset, _ = partition_offsets(image)[number]
    out = subprocess.run(["blkid", "-p", "-O", str(offset), "-s", "LABEL", "-o", "value",
                          str(image)], capture_output=True, text=True, check=False)
    return out.stdout.strip()


def _fat_read(image: Path, number: int, path: str) -> bytes:
    offset, _ = partition_offsets(image)[number]
    proc = subprocess.run(["mtype", "-i", f"{image}@@{offset}", f"::{path}"],
                          capture_output=True, check=False,
                          env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    assert proc.returncode == 0, f"mtype {path}: {proc.stderr!r}"
    return proc.stdout


def _ext4_entries(image: Path, number: int, paths: list[str]) -> dict[str, bool]:
    offset, _ = partition_offsets(image)[number]
    found = {}
    for path in paths:
        proc = subprocess.run(["debugfs", "-R", f"stat {path}", f"{image}?offset={offset}"],
                              capture_output=True, text=True, check=False)
        found[path] = proc.returncode == 0 and "Inode:" in proc.stdout
    return found


def _stage2_tools() -> list[str]:
    """Every tool runtime/resin-init-flasher checks with `need`, and what it runs besides."""
    text = (ROOT / "runtime" / "resin-init-flasher").read_text().replace("\\\n", " ")
    tools: list[str] = []
    for line in text.splitlines():
        m = re.search(r"(?:^|\)\s*)need\s+([^;(){}]+)", line.strip())
        if m:
            tools += [w for w in m.group(1).split() if re.fullmatch(r"[a-z0-9]+", w)]
    assert {"blkid", "losetup", "dd", "sha256sum"} <= set(tools), tools
    return sorted(set(tools) | {"bash", "reboot", "cat", "rm", "zstd", "gzip"})


# --------------------------------------------------------------------------- no VM


def test_parse_report_reads_the_last_run() -> None:
    console = (
        "[ 1.0] kernel\r\nRESINOS-REPORT start\r\nRESINOS-REPORT labels=a,b\r\n"
        "RESINOS-REPORT start\nRESINOS-REPORT label=resin-boot /dev/sda1\n"
        "noise RESINOS-REPORT config_sha256=abc\nRESINOS-REPORT backup_entry=-rw-r--r-- x=y\n"
        "RESINOS-REPORT end\n"
    )
    report = parse_report(console)
    assert report.started and report.complete
    assert report.first("labels") is None  # from the first run
    assert report.labels == ["resin-boot"]
    assert report.first("config_sha256") == "abc"
    assert report.all("backup_entry") == ["-rw-r--r-- x=y"]
    assert not parse_report("RESINOS-REPORT start\n").complete


@pytest.mark.vm
def test_resinos_stand_in_has_the_reference_shape(resinos_image: Path) -> None:
    parts = partition_offsets(resinos_image)
    assert sorted(parts) == [1, 2, 3, 4, 5, 6]
    assert parts[1][0] == 4 * MiB and parts[1][1] == 40 * MiB
    assert all(offset % (4 * MiB) == 0 for offset, _ in parts.values())
    for number, label in RESINOS_LABELS.items():
        assert _label(resinos_image, number) == label
    head = resinos_image.read_bytes()[:1024]
    kit = boot_kit()
    assert head[:440] == kit.boot_img.read_bytes()[:440]
    assert head[510:512] == b"\x55\xaa"
    assert head[512:1024] == kit.core_img.read_bytes()[:512]
    assert _fat_read(resinos_image, 1, "/config.json") == RESINOS_CONFIG
    grub_cfg = _fat_read(resinos_image, 1, "/grub/grub.cfg").decode()
    assert "root=LABEL=resin-rootA" in grub_cfg and "console=ttyS0,115200" in grub_cfg
    assert _fat_read(resinos_image, 1, "/bzImage") == kit.vmlinuz.read_bytes()
    found = _ext4_entries(resinos_image, 2, ["/usr/sbin/init", "/usr/bin/busybox",
                                             "/usr/sbin/blkid"])
    assert all(found.values()), found


@pytest.mark.vm
def test_flasher_has_the_reference_shape_and_stage2_tools(flasher_image: Path) -> None:
    parts = partition_offsets(flasher_image)
    assert sorted(parts) == [1, 2, 3, 4, 5, 6]
    assert parts[1] == (8192 * 512, 81920 * 512)  # as in REFERENCE's parted listing
    for number, label in FLASHER_LABELS.items():
        assert _label(flasher_image, number) == label
    assert _fat_read(flasher_image, 1, "/config.json") == FLASHER_CONFIG
    assert _fat_read(flasher_image, 1, "/resin-image-flasher") == b""
    grub_cfg = _fat_read(flasher_image, 1, "/grub.cfg").decode()
    assert f"linux /vmlinuz {FLASHER_CMDLINE}" in grub_cfg
    assert "initrd /initrd" in grub_cfg
    wanted = [f"/opt/{INNER_NAME}", "/usr/bin/resin-init-flasher", "/etc/resin-init-flasher.conf",
              "/usr/sbin/init"]
    found = _ext4_entries(flasher_image, 2, wanted)
    assert all(found.values()), found
    tools = _stage2_tools()
    found = _ext4_entries(flasher_image, 2, [f"{d}/{t}" for t in tools
                                             for d in ("/usr/bin", "/usr/sbin")])
    missing = [t for t in tools if not (found[f"/usr/bin/{t}"] or found[f"/usr/sbin/{t}"])]
    assert not missing, f"stage 2 needs tools the flasher lacks: {missing}"


# --------------------------------------------------------------------------- QEMU


@pytest.mark.vm
def test_resinos_stand_in_boots_by_bios_and_reports(resinos_image: Path, tmp_path: Path) -> None:
    disk = sparse_copy(resinos_image, tmp_path / "resinos.img")
    result = boot_disk(disk, timeout=BOOT_TIMEOUT, console_log=tmp_path / "console.log")
    tail = result.console[-4000:]
    assert not result.timed_out, f"no power-off after {result.seconds:.0f} s:\n{tail}"
    report = parse_report(result.console)
    assert report.complete, tail
    assert report.labels == sorted(RESINOS_LABELS.values()), tail
    assert report.first("labels") == ",".join(sorted(RESINOS_LABELS.values()))
    assert report.first("config_sha256") == _sha256(RESINOS_CONFIG)
    assert report.first("migrate_log") == "no"
    assert report.first("backup") == "no"
    assert report.first("root") == "/dev/sda2"
    assert "root=LABEL=resin-rootA" in (report.first("cmdline") or "")
    assert int(report.first("data_free_kib") or 0) > 16 * 1024  # room for a backup
    assert not report.all("error") and not report.all("warning"), report.values
    print(f"resinOS stand-in: BIOS boot to power-off in {result.seconds:.1f} s")


@pytest.mark.vm
def test_flasher_boots_by_bios_and_runs_stage2(flasher_image: Path, tmp_path: Path) -> None:
    disk = sparse_copy(flasher_image, tmp_path / "flasher.img")
    stage2 = b"""#!/bin/bash
echo STAGE2-RAN
echo "STAGE2-CMDLINE $(cat /proc/cmdline)"
blkid
mkdir -p /tmp/flash-boot
mount -t vfat -o ro "$(blkid -L flash-boot)" /tmp/flash-boot &&
    echo "STAGE2-CONFIG-SHA256 $(sha256sum < /tmp/flash-boot/config.json | cut -d' ' -f1)"
umount /tmp/flash-boot
echo "STAGE2-LOOP $(losetup -f)"
reboot -f
"""
    replace_in_ext4(disk, 2, "/usr/bin/resin-init-flasher", stage2)
    result = boot_disk(disk, timeout=BOOT_TIMEOUT, console_log=tmp_path / "console.log")
    tail = result.console[-4000:]
    assert not result.timed_out, f"no reboot after {result.seconds:.0f} s:\n{tail}"
    assert "STAGE2-RAN" in result.console, tail
    assert f"STAGE2-CONFIG-SHA256 {_sha256(FLASHER_CONFIG)}" in result.console, tail
    cmdline = re.search(r"STAGE2-CMDLINE (.*)", result.console)
    assert cmdline and FLASHER_CMDLINE in cmdline.group(1), tail
    assert 'LABEL="flash-rootA"' in result.console and 'LABEL="flash-boot"' in result.console
    assert "STAGE2-LOOP /dev/loop" in result.console, tail  # the loop module is loaded
    assert f"{INIT_MARKER} stage2-exit" not in result.console  # it rebooted itself
    print(f"flasher: BIOS boot, test stage 2 and reboot in {result.seconds:.1f} s")


# --------------------------------------------------------------------------- builder


@pytest.mark.vm
def test_build_flasher_repacks_it_small_enough(flasher_image: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "invoke"), "build-flasher", "--image",
         str(flasher_image), "--out", str(out), "--config", "tests/data/config.json",
         "--quiet"],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bundle written" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    sizes = {part["label"]: part["size"] for part in manifest["partitions"]}
    inner = manifest["inner_image"]
    bundle = sum(p.stat().st_size for p in out.iterdir())
    print(proc.stdout)
    print(f"bundle {bundle / MiB:.1f} MiB; flash-boot {sizes['flash-boot'] / MiB:.0f} MiB, "
          f"flash-rootA {sizes['flash-rootA'] / MiB:.0f} MiB; inner image "
          f"{inner['raw_size'] / MiB:.0f} MiB raw, {inner['size'] / MiB:.1f} MiB "
          f"{inner['compression']}")
    # the flash partitions and a flash-data of 64 MiB fit a legacy swap of about 1 GiB
    assert sizes["flash-rootA"] + sizes["flash-boot"] + 64 * MiB < GiB // 2
    # the resinOS image ends well before the swap area of a disk with a 1.5 GiB root
    assert inner["raw_size"] < GiB
    assert manifest["boot"]["kernel"] == "/vmlinuz"
    assert manifest["boot"]["initrd"] == "/initrd"
    assert manifest["boot"]["cmdline"] == FLASHER_CMDLINE
    assert inner["raw_sha256"] == _file_sha256(cached_bootable_resinos())


# --------------------------------------------------------------------------- stage 2, for real

SECTOR = 512
EPOCH = 1_577_836_800


@pytest.fixture(scope="module")
def bundle(flasher_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from builder.progress import Progress
    from builder.repack import BuildOptions, build

    out = tmp_path_factory.mktemp("bootable-bundle") / f"nuc-{bootimages_key()}"
    build(BuildOptions(image=flasher_image, out=out, config=ROOT / "tests/data/config.json"),
          Progress(quiet=True))
    return out


def _backup_tgz() -> tuple[bytes, dict[str, str]]:
    files = {"app-data/hello.txt": b"hello from the legacy device\n",
             "app-data/blob.bin": hashlib.sha256(b"blob").digest() * 65536}  # 2 MiB
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), EPOCH, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), {name: _sha256(data) for name, data in files.items()}


def _disk_after_stage1(bundle: Path, disk: Path, backup: bytes) -> int:
    """What stage 1 leaves, without a legacy system: the flash partitions written from the
    bundle's streams after the area the resinOS image takes, the flasher's GRUB in the
    first 4 MiB, flash-data holding stage2.env (runtime/stage2env.py) and backup.tgz.
    Returns the disk's size in sectors."""
    from runtime.manifest import Manifest
    from runtime.stage2env import render, stage2_values

    manifest = Manifest.from_dict(json.loads((bundle / "manifest.json").read_text()))
    sizes = {part.label: part.size // SECTOR for part in manifest.partitions}
    align = 8192
    boot_start = -(-(manifest.inner_image.raw_size // SECTOR + align) // align) * align
    root_start = boot_start + sizes["flash-boot"]
    data_start = root_start + -(-sizes["flash-rootA"] // align) * align
    data_size = sizes["flash-data"]
    total = data_start + data_size
    with open(disk, "wb") as f:
        f.truncate(total * SECTOR)
    table = (f"label: dos\nunit: sectors\n\n"
             f"start={boot_start}, size={sizes['flash-boot']}, type=e, bootable\n"
             f"start={root_start}, size={sizes['flash-rootA']}, type=83\n"
             f"start={data_start}, size={data_size}, type=83\n")
    subprocess.run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(disk)], input=table,
                   text=True, check=True)
    for stream, start in (("flash-boot.gz", boot_start), ("flash-rootA.gz", root_start)):
        with gzip.open(bundle / stream, "rb") as src, open(disk, "r+b") as dst:
            dst.seek(start * SECTOR)
            shutil.copyfileobj(src, dst, 1 << 20)
    kit = boot_kit()
    with open(disk, "r+b") as f:  # the flasher's own GRUB: (hd0,msdos1) is flash-boot
        f.write(kit.boot_img.read_bytes()[:440])
        f.seek(SECTOR)
        f.write(kit.core_img.read_bytes())

    staging = disk.parent / "flash-data"
    staging.mkdir()
    (staging / "backup.tgz").write_bytes(backup)
    values = stage2_values(manifest, types.SimpleNamespace(protected_start=boot_start), total,
                           len(backup), _sha256(backup))
    (staging / "stage2.env").write_text(render(values))
    fs = disk.parent / "flash-data.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "flash-data", "-d", str(staging), str(fs),
                    f"{data_size * SECTOR // 1024}k"], check=True)
    subprocess.run(["dd", f"if={fs}", f"of={disk}", f"bs={SECTOR}", f"seek={data_start}",
                    "conv=notrunc,sparse", "status=none"], check=True)
    fs.unlink()
    return total


@pytest.mark.vm
def test_real_stage2_writes_the_stand_in_which_boots(bundle: Path, tmp_path: Path) -> None:
    """The repacked flasher boots, its init runs the real stage 2, which writes the resinOS
    stand-in over the start of the disk and reboots; the disk then boots the stand-in, which
    reports the fleet's config.json, the backup, and the log stage 2 left."""
    backup, backup_files = _backup_tgz()
    disk = tmp_path / "disk.img"
    _disk_after_stage1(bundle, disk, backup)

    flasher_run = boot_disk(disk, timeout=2 * BOOT_TIMEOUT,
                            console_log=tmp_path / "flasher-console.log")
    tail = flasher_run.console[-5000:]
    assert not flasher_run.timed_out, f"stage 2 did not end in {flasher_run.seconds:.0f} s:\n{tail}"
    assert "stage2: stage 2 complete" in flasher_run.console, tail
    assert f"{INIT_MARKER} stage2-exit" not in flasher_run.console, tail  # it rebooted itself

    resinos_run = boot_disk(disk, timeout=BOOT_TIMEOUT, console_log=tmp_path / "console.log")
    tail = resinos_run.console[-4000:]
    report = parse_report(resinos_run.console)
    assert report.complete, tail
    assert report.labels == sorted(RESINOS_LABELS.values()), tail
    config = (ROOT / "tests/data/config.json").read_bytes()
    assert report.first("config_sha256") == _sha256(config)
    assert report.first("migrate_log") == "yes"
    assert report.first("boot_efi") == "no"  # legacy BIOS: stage 2 removed /EFI
    assert report.first("backup") == "yes"
    assert report.first("backup_sha256") == _sha256(backup)
    files = {}
    for value in report.all("backup_file_sha256"):
        digest, name = value.split(" ", 1)
        files[name] = digest
    assert files == backup_files
    assert len(report.all("backup_entry")) == len(backup_files)
    assert not report.all("error"), report.values
    print(f"stage 2 in the flasher: {flasher_run.seconds:.1f} s (boot, write, reboot); "
          f"resinOS stand-in: {resinos_run.seconds:.1f} s")
