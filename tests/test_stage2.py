"""Stage 2 (runtime/resin-migrate-stage2) on a disk exactly as stage 1 leaves it.

The disk is made by running stage 1 itself on a legacy Debian disk. The refusals run on
this host's loop devices; the full write needs resin-boot (FAT) mounted, which only a
real kernel with vfat can do, so it runs inside a QEMU VM.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from runtime import stage2names as STAGE2_NAMES
from tests.rig.legacy import (
    LegacyDevice,
    LegacySpec,
    SwapPlacement,
    attached,
    copy_legacy_image,
    mounted_root,
)
from tests.test_stage1 import MOUNT_OPTIONS, PYTHON, backup_script_for
from tests.tools import read_range, sfdisk_json, sh

ROOT = Path(__file__).resolve().parent.parent
STAGE2 = ROOT / "runtime" / "resin-migrate-stage2"


def make_stage1_disk(spec: LegacySpec, bundle: Path, dest: Path) -> Path:
    """A legacy disk after `resin-migrate.pyz stage1` (with a backup of /srv/appdata)."""
    image = copy_legacy_image(spec, dest)
    with attached(image, spec) as dev, mounted_root(dev, options=MOUNT_OPTIONS) as sysroot:
        script = backup_script_for(sysroot, dest.parent)
        result = subprocess.run(
            [PYTHON, str(bundle / "resin-migrate.pyz"), "--bundle", str(bundle), "--disk",
             dev.device, "--sysroot", str(sysroot), "stage1", "--yes", "--backup-script",
             str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    return image


def flash_numbers(image: Path) -> dict[str, int]:
    parts = sfdisk_json(image)["partitions"]
    labels = {}
    for part in parts:
        number = int(part["node"][len(str(image)):])
        found = subprocess.run(["blkid", "-p", "-o", "value", "-s", "LABEL", "-O",
                                str(part["start"] * 512), "-S", str(part["size"] * 512),
                                str(image)], capture_output=True, text=True).stdout.strip()
        if found:
            labels[found] = number
    return labels


def digest_outside(image: Path, skip: tuple[int, int]) -> str:
    """sha256 of the image's bytes outside [skip) (in sectors): all but flash-data."""
    digest = hashlib.sha256()
    start, end = skip[0] * 512, skip[1] * 512
    with image.open("rb") as handle:
        for lo, hi in ((0, start), (end, image.stat().st_size)):
            handle.seek(lo)
            remaining = hi - lo
            while remaining:
                chunk = handle.read(min(remaining, 1 << 22))
                digest.update(chunk)
                remaining -= len(chunk)
    return digest.hexdigest()


@contextmanager
def mounted(device: str, path: Path, options: str = "ro") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    sh("mount", "-o", options, device, path)
    try:
        yield path
    finally:
        sh("umount", path)


def run_stage2_on_host(disk: str, root: Path,
                       work: Path) -> tuple[subprocess.CompletedProcess, Path]:
    marker = work / "rebooted"
    env = {**os.environ, "RESIN_MIGRATE_DISK": disk, "RESIN_MIGRATE_ROOT": str(root),
           "RESIN_MIGRATE_REBOOT": f"touch {marker}", "RESIN_MIGRATE_WORK": str(work / "w")}
    result = subprocess.run(["bash", str(STAGE2)], env=env, capture_output=True, text=True,
                            timeout=600)
    return result, marker


def _flip_image_byte(dev: str, numbers: dict[str, int], tmp: Path) -> None:
    with mounted(f"{dev}p{numbers['flash-rootA']}", tmp / "rootA-rw", "rw") as root:
        image = next((root / "opt").glob("*.zst"))
        with image.open("r+b") as handle:
            handle.seek(image.stat().st_size // 2)
            byte = handle.read(1)
            handle.seek(-1, os.SEEK_CUR)
            handle.write(bytes([byte[0] ^ 0x01]))


def _remove_env(dev: str, numbers: dict[str, int], tmp: Path) -> None:
    with mounted(f"{dev}p{numbers['flash-data']}", tmp / "data-rw", "rw") as data:
        (data / "stage2.env").unlink()


def _overlapping_image(dev: str, numbers: dict[str, int], tmp: Path) -> None:
    with mounted(f"{dev}p{numbers['flash-data']}", tmp / "data-rw", "rw") as data:
        env = (data / "stage2.env").read_text().splitlines()
        env = ["RM_FLASH_START='8192'" if line.startswith("RM_FLASH_START=") else line
               for line in env]
        (data / "stage2.env").write_text("\n".join(env) + "\n")


def _backup_too_large(dev: str, numbers: dict[str, int], tmp: Path) -> None:
    """A resin-data with less room than backup.tgz (the check stage 1 made, once more)."""
    with mounted(f"{dev}p{numbers['flash-data']}", tmp / "data-rw", "rw") as data:
        _set_env(data, RM_BACKUP_ROOM="1000")


@pytest.mark.loop
@pytest.mark.parametrize(("harm", "reason"), [
    (_flip_image_byte, "the image is damaged"),
    (_remove_env, "stage2.env is missing"),
    (_overlapping_image, "would overwrite the flash partitions"),
    (_backup_too_large, "does not fit the room the image's resin-data has (1000 bytes)"),
], ids=["flipped-byte", "missing-env", "overlap", "backup-too-large"])
def test_refusal_before_the_point_of_no_return(harm, reason, tmp_path: Path,
                                               synthetic_bundle: Path) -> None:
    image = make_stage1_disk(LegacySpec(placement=SwapPlacement.LOGICAL), synthetic_bundle,
                             tmp_path / "disk.img")
    numbers = flash_numbers(image)
    data = next(p for p in sfdisk_json(image)["partitions"]
                if p["node"].endswith(str(numbers["flash-data"])))
    data_range = (data["start"], data["start"] + data["size"])
    with attached(image) as dev:
        harm(dev.device, numbers, tmp_path)
        before = digest_outside(image, data_range)
        with mounted(f"{dev.device}p{numbers['flash-rootA']}", tmp_path / "rootA") as root:
            result, marker = run_stage2_on_host(dev.device, root, tmp_path)
        assert result.returncode == 1, result.stderr
        assert marker.exists(), "the reboot command was not called"
        assert reason in result.stderr
        with mounted(f"{dev.device}p{numbers['flash-data']}", tmp_path / "data") as data_dir:
            log = (data_dir / "resin-migrate-stage2.log").read_text()
        assert reason in log and "nothing of the image was written" in log
        assert digest_outside(image, data_range) == before
        # back in the old system, `status` shows why
        status = _status(dev, synthetic_bundle)
        assert "stage 2's log on flash-data" in status and reason in status
        assert "stopped in its checks phase, before writing anything" in status


def _status(dev: LegacyDevice, bundle: Path) -> str:
    """`status` as the old system runs it, from the disk's root."""
    with mounted_root(dev) as sysroot:
        status = subprocess.run(
            [PYTHON, str(bundle / "resin-migrate.pyz"), "--bundle", str(bundle), "--disk",
             dev.device, "--sysroot", str(sysroot), "status"], capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    return status.stdout


def _set_env(data: Path, **values: str) -> None:
    lines = (data / STAGE2_NAMES.ENV_NAME).read_text().splitlines()
    for name, value in values.items():
        lines = [f"{name}='{value}'" if line.startswith(f"{name}=") else line
                 for line in lines]
    (data / STAGE2_NAMES.ENV_NAME).write_text("\n".join(lines) + "\n")


@pytest.mark.loop
@pytest.mark.parametrize(("fault", "armed"), [
    # a check that blocks (a failing disk): nothing armed yet; it hangs before flash-boot
    # (FAT) is mounted, so this host can run it
    ("checks hang", False),
    # stuck after sector 0 was made to boot the flasher: past every check, flash-boot
    # mounted, so in the tools VM
    pytest.param("arm-boot hang", True, marks=pytest.mark.vm),
])
def test_the_guard_brings_the_old_system_back_before_the_point_of_no_return(
        fault: str, armed: bool, tmp_path: Path, synthetic_bundle: Path) -> None:
    image = make_stage1_disk(LegacySpec(), synthetic_bundle, tmp_path / "disk.img")
    numbers = flash_numbers(image)
    data = next(p for p in sfdisk_json(image)["partitions"]
                if p["node"].endswith(str(numbers["flash-data"])))
    data_range = (data["start"], data["start"] + data["size"])
    sector0 = read_range(image, 0, 512)
    with attached(image) as dev, mounted(f"{dev.device}p{numbers['flash-data']}",
                                         tmp_path / "data-rw", "rw") as data_dir:
        _set_env(data_dir, RM_GUARD_TIMEOUT="12")
        (data_dir / STAGE2_NAMES.FAULTS_NAME).write_text(fault + "\n")
    before = digest_outside(image, data_range)
    if armed:
        result = _run_stage2_in_vm(image, numbers, flasher_mount=True)
        assert result.exit_code not in (0, None), result.output[-3000:]
        output = result.output
    else:
        with attached(image) as dev, mounted(f"{dev.device}p{numbers['flash-rootA']}",
                                             tmp_path / "rootA") as root:
            finished, marker = run_stage2_on_host(dev.device, root, tmp_path)
        assert marker.exists(), "the reboot command was not called"
        assert finished.returncode != 0
        output = finished.stderr
    assert "stopped (SIGTERM) in the" in output, output[-3000:]
    # every byte outside flash-data as stage 1 left it: sector 0 too
    assert read_range(image, 0, 512) == sector0
    assert digest_outside(image, data_range) == before
    with attached(image) as dev:
        with mounted(f"{dev.device}p{numbers['flash-data']}", tmp_path / "data") as data_dir:
            log = (data_dir / STAGE2_NAMES.LOG_NAME).read_text()
            journal = (data_dir / STAGE2_NAMES.JOURNAL_NAME).read_text().splitlines()
        assert f"fault point {fault.split()[0]}: hanging (injected, 1 of 1)" in log
        assert "guard: no end of the" in log and "(limit 12 s): rebooting" in log
        assert ("sector 0 restored: the next boot is the previous system's GRUB" in log) == armed
        assert ("phase arm-boot done" in journal) is False and "writing" not in journal
        assert "stopped in its {} phase".format(
            "arm-boot" if armed else "checks") in _status(dev, synthetic_bundle)


def _run_stage2_in_vm(image: Path, numbers: dict[str, int], flasher_mount: bool):
    """Stage 2 in the tools VM; flasher_mount: flash-boot is already mounted read-only at
    /mnt/boot, as the flasher's mnt-boot.mount has it (stage 2 must read it there)."""
    from tests.rig.vm import run_script

    boot = (f"mkdir -p /mnt/boot && mount -o ro /dev/sda{numbers['flash-boot']} /mnt/boot"
            if flasher_mount else ":")
    script = f"""
set -u
mkdir -p /mnt/rootA
mount -o ro /dev/sda{numbers['flash-rootA']} /mnt/rootA
{boot}
RESIN_MIGRATE_ROOT=/mnt/rootA RESIN_MIGRATE_REBOOT=true bash /mnt/stage2/resin-migrate-stage2
code=$?
umount /mnt/rootA
exit $code
"""
    return run_script(script, [image], shares={"stage2": STAGE2.parent}, timeout=600)


def _fat_names(image: Path, directory: str) -> list[str]:
    out = sh("mdir", "-i", image, "-b", f"::/{directory}").stdout.decode()
    return sorted(line.strip().rsplit("/", 1)[-1] for line in out.splitlines() if line.strip())


def _inner_image(bundle: Path, tmp: Path) -> Path:
    """The resinOS image the bundle carries, as the flasher held it (rebuilt: the bundle
    holds only its extents)."""
    from runtime.manifest import load
    from tests.synthetic import build_resinos_image
    from tests.tools import sha256

    raw = tmp / "inner.img"
    build_resinos_image(raw)
    assert sha256(raw) == load(str(bundle)).inner_image.raw_sha256
    return raw


@pytest.mark.vm
@pytest.mark.loop
@pytest.mark.parametrize("placement", [SwapPlacement.PRIMARY, SwapPlacement.LOGICAL],
                         ids=["primary", "logical"])
def test_stage2_writes_resinos_with_config_and_backup(placement, tmp_path: Path,
                                                      synthetic_bundle: Path) -> None:
    import tarfile

    from runtime.manifest import load
    from tests.rig.legacy import BACKUP_VOLUME, appdata_files

    image = make_stage1_disk(LegacySpec(placement=placement), synthetic_bundle,
                             tmp_path / "disk.img")
    numbers = flash_numbers(image)
    table_before = sfdisk_json(image)["partitions"]
    manifest = load(str(synthetic_bundle))
    inner = _inner_image(synthetic_bundle, tmp_path)
    layout = manifest.inner_image.layout

    # flash-boot as stage 1 left it (stage 2 zeroes it at the end)
    flash_part = next(p for p in table_before
                      if p["node"].endswith(str(numbers["flash-boot"])))
    flash_boot = tmp_path / "flash-boot.img"
    flash_boot.write_bytes(read_range(image, flash_part["start"] * 512,
                                      flash_part["size"] * 512))
    flasher_mount = placement is SwapPlacement.PRIMARY
    result = _run_stage2_in_vm(image, numbers, flasher_mount)
    assert result.exit_code == 0, result.output[-3000:] + result.console[-2000:]
    assert "stage 2 complete" in result.output
    assert ("read through the flasher's mount at /mnt/boot" in result.output) == flasher_mount

    # the resinOS table, as sfdisk reads it back from the disk
    table = sfdisk_json(image)
    assert [(p["start"], p["size"]) for p in table["partitions"]] == [
        (p.start, p.size) for p in layout.partitions]
    # the image's bytes in its extents (the rest is free space, skipped), except in the
    # two partitions stage 2 edits
    edited = [(p.start * 512, p.end * 512) for p in layout.partitions
              if p.label in ("resin-boot", "resin-data")]
    assert read_range(image, 0, 4 << 20) == read_range(inner, 0, 4 << 20)
    compared = 0
    for start, length, _ in manifest.inner_image.extents:
        cuts = sorted({start, start + length, *(edge for low, high in edited for edge in
                                                (low, high) if start < edge < start + length)})
        for low, high in zip(cuts, cuts[1:]):
            if any(e_low <= low and high <= e_high for e_low, e_high in edited):
                continue
            assert read_range(image, low, high - low) == read_range(inner, low, high - low)
            compared += high - low
    assert compared > 8 << 20
    for part in layout.partitions:
        if part.fs == "ext4":
            copy = tmp_path / f"p{part.number}.img"
            copy.write_bytes(read_range(image, part.start * 512, part.size * 512))
            assert sh("e2fsck", "-fn", copy, check=False).returncode == 0, part.label
            copy.unlink()

    boot, data = layout.by_label("resin-boot"), layout.by_label("resin-data")
    boot_img, data_img = tmp_path / "resin-boot.img", tmp_path / "resin-data.img"
    boot_img.write_bytes(read_range(image, boot.start * 512, boot.size * 512))
    data_img.write_bytes(read_range(image, data.start * 512, data.size * 512))
    assert sh("fsck.vfat", "-n", boot_img, check=False).returncode == 0
    assert sh("e2fsck", "-fn", data_img, check=False).returncode == 0
    fleet = json.loads((ROOT / "tests" / "data" / "config.json").read_text())
    config = json.loads(sh("mcopy", "-n", "-i", boot_img, "::/config.json", "-").stdout)
    assert "installer" in fleet and config == {
        key: value for key, value in fleet.items() if key != "installer"}
    listing = sh("mdir", "-i", boot_img, "-b", "::/").stdout.decode()
    assert "::/resin-migrate.log" in listing and "::/EFI" not in listing
    # splash, proxy samples and connection samples: flash-boot's, as the real flasher
    # copies them
    for directory in ("splash", "system-proxy", "system-connections"):
        wanted = _fat_names(flash_boot, directory)
        assert wanted and _fat_names(boot_img, directory) == wanted, directory
        for name in wanted:
            path = f"::/{directory}/{name}"
            assert sh("mcopy", "-n", "-i", boot_img, path, "-").stdout == \
                sh("mcopy", "-n", "-i", flash_boot, path, "-").stdout
    log = sh("mcopy", "-n", "-i", boot_img, "::/resin-migrate.log", "-").stdout.decode()
    assert "first 4 MiB written and read back" in log
    # no secret left where resin-data grows: flash-boot (the API key, the keyfiles) and
    # flash-data (keyfiles, backup.tgz) zeroed, the API key nowhere in the former swap area
    for label in ("flash-boot", "flash-data"):
        part = next(p for p in table_before if p["node"].endswith(str(numbers[label])))
        assert read_range(image, part["start"] * 512, part["size"] * 512).count(0) == \
            part["size"] * 512, f"{label} is not zeroed"
        assert f"{label}" in log and "zeroed" in log
    flash = [p for p in table_before
             if int(p["node"][len(str(image)):].lstrip("p")) in
             (numbers["flash-boot"], numbers["flash-rootA"], numbers["flash-data"])]
    area_start = min(p["start"] for p in flash)
    area_end = max(p["start"] + p["size"] for p in flash)
    assert fleet["apiKey"].encode() not in read_range(
        image, area_start * 512, (area_end - area_start) * 512)

    backup = tmp_path / "backup.tgz"
    backup.write_bytes(sh("debugfs", "-R", "cat /backup.tgz", data_img).stdout)
    with tarfile.open(backup) as tar:
        for rel, content in appdata_files().items():
            member = tar.extractfile(f"./{BACKUP_VOLUME}/{rel}")
            assert member is not None and member.read() == content
    print(f"\nstage 2 in the VM: {result.seconds:.1f} s (boot, write, verify, power-off)")
